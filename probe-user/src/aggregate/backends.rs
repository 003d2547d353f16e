//! Connect attempts and failures per (virtual destination, backend): what
//! `connprobe_backend_connect_attempts_total` and `..._failures_total` export and what the pool
//! verdict reads. Only connects this host opened whose SYN a DNAT on this host translated count
//! here (their destination's own counts are in the destination's slot as always).
//!
//! Bounded: at most `capacity` pairs have their own labels; connects of further pairs count
//! under `destination="other", backend="other"`. A pair idle for the destination idle time goes.
use std::{collections::HashMap, time::SystemTime};

use strum::EnumCount;

use crate::event::{ConnectOutcome, Endpoint, Event, EventDetail, FailureReason, Side};

/// Counts of one pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCounts {
    pub attempts: u64,
    /// By [`FailureReason`] as index.
    pub failures: [u64; FailureReason::COUNT],
}

impl BackendCounts {
    pub fn failures_total(&self) -> u64 {
        self.failures.iter().sum()
    }
}

/// One pair as the exporters read it; `None` addresses are the fold (`other`).
#[derive(Clone, Debug, PartialEq)]
pub struct BackendSummary {
    pub destination: Option<Endpoint>,
    pub backend: Option<Endpoint>,
    pub counts: BackendCounts,
    pub last_seen: SystemTime,
}

pub struct BackendTable {
    capacity: usize,
    pairs: HashMap<(Endpoint, Endpoint), (BackendCounts, SystemTime)>,
    other: Option<(BackendCounts, SystemTime)>,
}

impl BackendTable {
    pub fn new(capacity: usize) -> Self {
        BackendTable {
            capacity: capacity.max(1),
            pairs: HashMap::new(),
            other: None,
        }
    }

    /// Counts a translated connect this host opened.
    pub fn record(&mut self, event: &Event) {
        let (Some(backend), EventDetail::Connect(c)) = (event.backend, &event.detail) else {
            return;
        };
        if event.side == Some(Side::Server) {
            return;
        }
        let key = (event.dst, backend);
        let fresh = (BackendCounts::default(), event.time);
        let entry = if self.pairs.contains_key(&key) || self.pairs.len() < self.capacity {
            self.pairs.entry(key).or_insert(fresh)
        } else {
            self.other.get_or_insert(fresh)
        };
        entry.0.attempts += 1;
        if let ConnectOutcome::Failed { reason, .. } = c.outcome {
            entry.0.failures[reason as usize] += 1;
        }
        entry.1 = entry.1.max(event.time);
    }

    /// Forgets pairs whose last connect is at least `idle` before `now`.
    pub fn expire_idle(&mut self, now: SystemTime, idle: std::time::Duration) {
        let fresh = |last: &SystemTime| now.duration_since(*last).map_or(true, |d| d < idle);
        self.pairs.retain(|_, (_, last)| fresh(last));
        if self.other.as_ref().is_some_and(|(_, last)| !fresh(last)) {
            self.other = None;
        }
    }

    /// Every pair, by destination then backend, the fold last.
    pub fn summaries(&self) -> Vec<BackendSummary> {
        let mut out: Vec<BackendSummary> = self
            .pairs
            .iter()
            .map(
                |(&(destination, backend), &(counts, last_seen))| BackendSummary {
                    destination: Some(destination),
                    backend: Some(backend),
                    counts,
                    last_seen,
                },
            )
            .collect();
        out.sort_by_key(|s| (s.destination, s.backend));
        if let Some((counts, last_seen)) = self.other {
            out.push(BackendSummary {
                destination: None,
                backend: None,
                counts,
                last_seen,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::testing::{self, at};

    fn via(backend: &str, mut event: Event) -> Event {
        event.backend = Some(backend.parse().unwrap());
        event
    }

    #[test]
    fn translated_connects_count_by_backend_and_the_table_is_bounded() {
        let mut table = BackendTable::new(2);
        let vip = "10.96.0.10:80";
        for _ in 0..3 {
            table.record(&via(
                "10.1.4.7:8080",
                testing::client(vip, at(1.0), testing::failed(FailureReason::Refused, 0)),
            ));
            table.record(&via(
                "10.1.4.8:8080",
                testing::client(vip, at(1.0), testing::established(50)),
            ));
        }
        // Untranslated connects, accepted ones and other kinds do not count.
        table.record(&testing::client(vip, at(1.0), testing::established(50)));
        table.record(&via(
            "10.1.4.8:8080",
            testing::accepted("10.96.0.10:80", at(1.0)),
        ));
        table.record(&via(
            "10.1.4.8:8080",
            testing::client(vip, at(1.0), testing::closed(1, 0)),
        ));
        // A third pair is past the bound: the fold.
        table.record(&via(
            "10.1.4.9:8080",
            testing::client(vip, at(2.0), testing::established(5)),
        ));
        let s = table.summaries();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].backend, Some("10.1.4.7:8080".parse().unwrap()));
        assert_eq!(s[0].counts.attempts, 3);
        assert_eq!(s[0].counts.failures[FailureReason::Refused as usize], 3);
        assert_eq!((s[1].counts.attempts, s[1].counts.failures_total()), (3, 0));
        assert_eq!((s[2].destination, s[2].counts.attempts), (None, 1));
        table.expire_idle(
            at(1.0) + std::time::Duration::from_secs(600),
            std::time::Duration::from_secs(600),
        );
        assert_eq!(
            table.summaries().len(),
            1,
            "only the fold, seen last at 2 s, is left"
        );
    }
}
