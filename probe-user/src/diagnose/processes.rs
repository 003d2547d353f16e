//! The processes behind one destination's events: for a service this host offers, the process
//! that owns its listening socket; for one it calls, the processes that connect. Verdicts name
//! them in their evidence (`processes`), so a verdict says whose connections it is about.
//!
//! Bounded under any traffic: a destination counts the events of its first `PROCESSES_KEPT`
//! processes one by one and those of any later process together, so thousands of short-lived
//! clients cost no more than eight.
use super::verdict::{Owners, ProcessEvidence};
use crate::event::{Comm, Process};

/// Processes a destination counts by name. A service and its workers, or the few programs that
/// call a destination, fit; past that, a longer list would not be read.
pub const PROCESSES_KEPT: usize = 8;

/// Events per owning process of one destination, for its first `PROCESSES_KEPT` processes.
#[derive(Clone, Debug, Default)]
pub(super) struct ProcessCounts {
    kept: Vec<ProcessCount>,
    /// Events of processes seen after the first `PROCESSES_KEPT`.
    unlisted_events: u64,
}

#[derive(Clone, Copy, Debug)]
struct ProcessCount {
    pid: u32,
    comm: Comm,
    events: u64,
}

impl ProcessCount {
    fn is(&self, pid: u32, comm: &Comm) -> bool {
        self.pid == pid && self.comm.as_bytes() == comm.as_bytes()
    }
}

impl ProcessCounts {
    /// Counts one event owned by `process`.
    pub(super) fn add(&mut self, process: &Process) {
        self.count(process.pid, process.comm, 1);
    }

    fn count(&mut self, pid: u32, comm: Comm, events: u64) {
        if let Some(kept) = self.kept.iter_mut().find(|p| p.is(pid, &comm)) {
            kept.events += events;
        } else if self.kept.len() < PROCESSES_KEPT {
            self.kept.push(ProcessCount { pid, comm, events });
        } else {
            self.unlisted_events += events;
        }
    }

    /// The counts of several destinations together (a pool's members): the busiest
    /// `PROCESSES_KEPT` keep their names, whatever order the parts come in.
    pub(super) fn merged<'a>(parts: impl IntoIterator<Item = &'a ProcessCounts>) -> Self {
        let mut all = ProcessCounts::default();
        let mut every: Vec<ProcessCount> = Vec::new();
        for part in parts {
            all.unlisted_events += part.unlisted_events;
            for p in &part.kept {
                match every.iter_mut().find(|e| e.is(p.pid, &p.comm)) {
                    Some(e) => e.events += p.events,
                    None => every.push(*p),
                }
            }
        }
        sort_busiest_first(&mut every);
        for p in every {
            all.count(p.pid, p.comm, p.events);
        }
        all
    }

    /// The owners of a verdict's evidence: each process with its events, most events first,
    /// ties by pid and name (empty when no event named its process), and the events of
    /// processes past the first `PROCESSES_KEPT`.
    pub(super) fn owners(&self) -> Owners {
        let mut ranked = self.kept.clone();
        sort_busiest_first(&mut ranked);
        Owners {
            processes: ranked
                .iter()
                .map(|p| ProcessEvidence {
                    pid: p.pid,
                    comm: p.comm.to_string_lossy().into_owned(),
                    events: p.events,
                })
                .collect(),
            unlisted_process_events: self.unlisted_events,
        }
    }
}

fn sort_busiest_first(counts: &mut [ProcessCount]) {
    counts.sort_by(|a, b| {
        b.events
            .cmp(&a.events)
            .then(a.pid.cmp(&b.pid))
            .then_with(|| a.comm.as_bytes().cmp(b.comm.as_bytes()))
    });
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn to_json(counts: &ProcessCounts) -> Value {
        serde_json::to_value(counts.owners().processes).unwrap()
    }

    fn process(pid: u32, comm: &str) -> Process {
        Process {
            pid,
            comm: Comm::from_str_lossy(comm),
        }
    }

    fn counted(events: &[(u32, &str)]) -> ProcessCounts {
        let mut counts = ProcessCounts::default();
        for (pid, comm) in events {
            counts.add(&process(*pid, comm));
        }
        counts
    }

    #[test]
    fn most_events_first_ties_by_pid_then_name() {
        let counts = counted(&[
            (30, "b"),
            (20, "worker"),
            (10, "curl"),
            (20, "worker"),
            (30, "a"),
            (10, "curl"),
        ]);
        assert_eq!(
            to_json(&counts),
            json!([
                {"pid": 10, "comm": "curl", "events": 2},
                {"pid": 20, "comm": "worker", "events": 2},
                {"pid": 30, "comm": "a", "events": 1},
                {"pid": 30, "comm": "b", "events": 1},
            ])
        );
        assert_eq!(counts.owners().unlisted_process_events, 0);
        assert_eq!(to_json(&ProcessCounts::default()), json!([]));
    }

    #[test]
    fn a_kernel_name_is_its_bytes_up_to_the_nul() {
        let mut padded = [0u8; 16];
        padded[..4].copy_from_slice(b"curl");
        let mut stale = padded;
        stale[8] = b'x'; // left over after the NUL
        let mut counts = ProcessCounts::default();
        for raw in [&padded, &stale] {
            counts.add(&Process {
                pid: 7,
                comm: Comm::from_kernel(raw),
            });
        }
        assert_eq!(
            to_json(&counts),
            json!([{"pid": 7, "comm": "curl", "events": 2}])
        );
    }

    #[test]
    fn past_the_bound_events_are_counted_together() {
        let mut events = Vec::new();
        for pid in 0..1000u32 {
            events.push((pid, "client"));
            events.push((pid % 4, "client"));
        }
        let counts = counted(&events);
        assert_eq!(counts.kept.len(), PROCESSES_KEPT);
        let listed = to_json(&counts);
        let listed = listed.as_array().unwrap();
        assert_eq!(listed.len(), PROCESSES_KEPT);
        // The first eight seen keep their exact counts; pids 0..4 came back every other event.
        assert_eq!(
            listed[0],
            json!({"pid": 0, "comm": "client", "events": 251})
        );
        assert_eq!(listed[4], json!({"pid": 4, "comm": "client", "events": 1}));
        let listed_events: u64 = listed.iter().map(|p| p["events"].as_u64().unwrap()).sum();
        assert_eq!(
            listed_events + counts.owners().unlisted_process_events,
            2000
        );
    }

    #[test]
    fn merged_parts_keep_the_busiest_in_any_order() {
        let a = counted(&[(1, "app"), (1, "app"), (2, "cron")]);
        let b = counted(&[(1, "app"), (3, "batch"), (3, "batch"), (3, "batch")]);
        let many = counted(&(100..110).map(|pid| (pid, "one-off")).collect::<Vec<_>>());
        let ab = ProcessCounts::merged([&a, &b, &many]);
        let ba = ProcessCounts::merged([&many, &b, &a]);
        assert_eq!(to_json(&ab), to_json(&ba));
        let listed = to_json(&ab);
        assert_eq!(listed.as_array().unwrap().len(), PROCESSES_KEPT);
        assert_eq!(listed[0], json!({"pid": 1, "comm": "app", "events": 3}));
        assert_eq!(listed[1], json!({"pid": 3, "comm": "batch", "events": 3}));
        assert_eq!(listed[2], json!({"pid": 2, "comm": "cron", "events": 1}));
        // 8 one-offs were kept by `many`, 2 were not; 5 of the kept ones fit the merged list.
        assert_eq!(ab.owners().unlisted_process_events, 2 + 3);
        assert_eq!(ba.owners().unlisted_process_events, 5);
    }
}
