//! What the pipeline counted, in one plain place: events delivered from the kernel by kind,
//! produced in the kernel, lost by stage, undecodable records, failed kernel reads. (The events
//! the agent makes from counters it reads, `samplers`, are not the ring buffer's and are not
//! counted here.) The reader, the log writer
//! and the pipeline (from the kernel's per-CPU counters) write it; the stderr tally line,
//! `/metrics` and `/diagnose` read it. Atomics: no writer waits for a reader.
use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use strum::{EnumCount, IntoStaticStr, VariantArray};

use crate::event::EventKind;

/// Where events were lost, the `stage` label of `connprobe_events_lost_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, IntoStaticStr, VariantArray, EnumCount)]
#[strum(serialize_all = "lowercase")]
pub enum LossStage {
    /// The kernel could not reserve room in the ring buffer: the reader fell behind.
    Ringbuf,
    /// A connect's start record was evicted from the kernel's socket map.
    Map,
    /// The agent's queue to the log writer was full.
    Queue,
    /// Writing the JSON log failed.
    Log,
}

impl LossStage {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// The kernel programs' own cumulative counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounts {
    /// Events the programs tried to emit (delivered + lost in the ring buffer).
    pub produced: u64,
    pub lost_ringbuf: u64,
    pub lost_map: u64,
    pub read_errors: u64,
    /// Runs of the programs that the kernel skipped because a BPF program was already running
    /// on that CPU (`recursion_misses`, see [`crate::loader::missed_runs`]): whatever those runs
    /// would have reported is lost before any counter of ours could see it.
    pub missed_runs: u64,
}

#[derive(Debug, Default)]
pub struct Tally {
    delivered: [AtomicU64; EventKind::COUNT],
    lost: [AtomicU64; LossStage::COUNT],
    produced: AtomicU64,
    kernel_read_errors: AtomicU64,
    missed_runs: AtomicU64,
    undecodable: AtomicU64,
    /// The next event's sequence number: events numbered so far.
    sequence: AtomicU64,
    own_traffic: AtomicU64,
    /// Events the agent made from counters it read (`samplers`), not the ring buffer's: they
    /// take sequence numbers too.
    sampled: AtomicU64,
}

impl Tally {
    /// `n` events of `kind` handed to the consumers.
    pub fn add_delivered(&self, kind: EventKind, n: u64) {
        self.delivered[kind as usize].fetch_add(n, Relaxed);
    }

    pub fn delivered(&self, kind: EventKind) -> u64 {
        self.delivered[kind as usize].load(Relaxed)
    }

    /// The sequence number of the next event reported ([`crate::event::Event::seq`]): one
    /// counter for the agent's life, whichever reader delivers.
    pub fn next_seq(&self) -> u64 {
        self.sequence.fetch_add(1, Relaxed)
    }

    /// `n` events lost at `stage` in the agent (queue, log).
    pub fn add_lost(&self, stage: LossStage, n: u64) {
        self.lost[stage as usize].fetch_add(n, Relaxed);
    }

    pub fn lost(&self, stage: LossStage) -> u64 {
        self.lost[stage as usize].load(Relaxed)
    }

    /// Every stage's losses, by the stage's name.
    pub fn lost_by_stage(&self) -> BTreeMap<String, u64> {
        LossStage::VARIANTS
            .iter()
            .map(|s| (s.name().to_string(), self.lost(*s)))
            .collect()
    }

    /// `n` events of the agent's own connections (its HTTP endpoint's), left out of everything
    /// else (see `own_traffic`).
    pub fn add_own_traffic(&self, n: u64) {
        self.own_traffic.fetch_add(n, Relaxed);
    }

    pub fn own_traffic(&self) -> u64 {
        self.own_traffic.load(Relaxed)
    }

    /// `n` events made by the samplers handed to the consumers.
    pub fn add_sampled(&self, n: u64) {
        self.sampled.fetch_add(n, Relaxed);
    }

    pub fn sampled(&self) -> u64 {
        self.sampled.load(Relaxed)
    }

    /// Events delivered, every kind.
    pub fn delivered_total(&self) -> u64 {
        EventKind::VARIANTS.iter().map(|k| self.delivered(*k)).sum()
    }

    /// Events the kernel programs tried to emit, as last read from their counters.
    pub fn produced(&self) -> u64 {
        self.produced.load(Relaxed)
    }

    /// Program runs the kernel skipped (see [`KernelCounts::missed_runs`]).
    pub fn missed_runs(&self) -> u64 {
        self.missed_runs.load(Relaxed)
    }

    /// One more record the decoder rejected; true for the first.
    pub fn add_undecodable(&self) -> bool {
        self.undecodable.fetch_add(1, Relaxed) == 0
    }

    pub fn undecodable(&self) -> u64 {
        self.undecodable.load(Relaxed)
    }

    /// Takes the kernel's cumulative counters. Losses only grow: a total below the count
    /// already held is ignored.
    pub fn set_kernel(&self, kernel: KernelCounts) {
        self.produced.store(kernel.produced, Relaxed);
        self.kernel_read_errors.store(kernel.read_errors, Relaxed);
        // The programs' own counters go with their file descriptors at detach: keep the most.
        self.missed_runs.fetch_max(kernel.missed_runs, Relaxed);
        self.lost[LossStage::Ringbuf as usize].fetch_max(kernel.lost_ringbuf, Relaxed);
        self.lost[LossStage::Map as usize].fetch_max(kernel.lost_map, Relaxed);
    }

    /// One line: events by kind, produced, lost by stage, undecodable, read errors, program
    /// runs the kernel skipped, the agent's own traffic left out.
    pub fn line(&self) -> String {
        let kinds = EventKind::VARIANTS
            .iter()
            .filter(|k| k.from_kernel())
            .map(|k| format!("{}={}", k.name(), self.delivered(*k)))
            .collect::<Vec<_>>()
            .join(" ");
        let lost = LossStage::VARIANTS
            .iter()
            .map(|s| format!("{}={}", s.name(), self.lost(*s)))
            .collect::<Vec<_>>()
            .join(" ");
        format!(
            "events: {kinds}; produced in kernel={}; lost: {lost}; undecodable={} \
             kernel_read_errors={} missed_runs={}; own_traffic={}; sampled={}",
            self.produced.load(Relaxed),
            self.undecodable(),
            self.kernel_read_errors.load(Relaxed),
            self.missed_runs(),
            self.own_traffic(),
            self.sampled(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_line_names_every_kind_and_stage() {
        let tally = Tally::default();
        tally.add_delivered(EventKind::Connect, 1);
        tally.add_lost(LossStage::Queue, 2);
        tally.add_own_traffic(4);
        let line = tally.line();
        assert!(
            line.contains("connect=1 retransmit=0 reset=0 close=0 drop=0;"),
            "{line}"
        );
        assert!(
            line.contains("lost: ringbuf=0 map=0 queue=2 log=0"),
            "{line}"
        );
        assert!(line.ends_with("; own_traffic=4; sampled=0"), "{line}");
    }

    #[test]
    fn losses_count_and_follow_the_kernels_cumulative_totals() {
        let tally = Tally::default();
        tally.add_lost(LossStage::Queue, 3);
        for ringbuf in [10, 7, 12] {
            tally.set_kernel(KernelCounts {
                lost_ringbuf: ringbuf,
                ..KernelCounts::default()
            });
        }
        tally.add_delivered(EventKind::Close, 1);
        assert_eq!(tally.lost(LossStage::Queue), 3);
        assert_eq!(tally.lost(LossStage::Ringbuf), 12);
        assert_eq!(tally.delivered(EventKind::Close), 1);
        assert_eq!(tally.lost_by_stage()["ringbuf"], 12);
        assert!(tally.add_undecodable());
        assert!(!tally.add_undecodable());
        assert_eq!(tally.undecodable(), 2);
    }
}
