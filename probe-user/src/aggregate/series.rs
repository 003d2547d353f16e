//! A destination's lifetime counts by the labels of its Prometheus series: what `/metrics`
//! exposes, kept here as plain numbers and read by the exporter from a snapshot.
use std::{collections::BTreeMap, time::Duration};

use strum::{EnumCount, IntoStaticStr, VariantArray};

use crate::event::{Direction, DropReason, FailureReason, Phase, Side};

/// Buckets of `connprobe_connect_duration_seconds`: 50 us to 10 s, 1-2.5-5 steps.
pub const CONNECT_DURATION_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// The `side` label of a per-destination series: the event's side, `unknown` where the kernel
/// did not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, IntoStaticStr, VariantArray, EnumCount)]
#[strum(serialize_all = "lowercase")]
pub enum SideLabel {
    Client,
    Server,
    Unknown,
}

impl SideLabel {
    pub fn of(side: Option<Side>) -> Self {
        match side {
            Some(Side::Client) => SideLabel::Client,
            Some(Side::Server) => SideLabel::Server,
            None => SideLabel::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// One counter cell: `None` until its first event, so a series exists only once something
/// happened to it (a destination without failures has no failure series).
pub type Cell = Option<u64>;

fn add(cell: &mut Cell, n: u64) {
    *cell = Some(cell.unwrap_or(0) + n);
}

/// The lifetime counts of one destination label, by the other labels of each family.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    /// `connprobe_connect_attempts_total`.
    pub attempts: Cell,
    /// `connprobe_connect_failures_total` by reason.
    pub failures: [Cell; FailureReason::COUNT],
    /// `connprobe_connect_duration_seconds`.
    pub duration: Option<DurationHistogram>,
    /// `connprobe_retransmits_total` by side and phase.
    pub retransmits: [[Cell; Phase::COUNT]; SideLabel::COUNT],
    /// `connprobe_segments_sent_total` by side.
    pub segments_sent: [Cell; SideLabel::COUNT],
    /// `connprobe_resets_total` by side and direction.
    pub resets: [[Cell; Direction::COUNT]; SideLabel::COUNT],
    /// `connprobe_drops_total` by the kernel's reason (a few per destination at most).
    pub drops: BTreeMap<DropReason, u64>,
    /// `connprobe_listen_overflows_total`.
    pub listen_overflows: Cell,
}

impl Series {
    pub(super) fn attempt(&mut self) {
        add(&mut self.attempts, 1);
    }

    pub(super) fn failure(&mut self, reason: FailureReason) {
        add(&mut self.failures[reason as usize], 1);
    }

    pub(super) fn handshake(&mut self, latency: Duration) {
        self.duration
            .get_or_insert_with(DurationHistogram::default)
            .observe(latency);
    }

    pub(super) fn retransmits(&mut self, side: SideLabel, phase: Phase, segments: u64) {
        add(
            &mut self.retransmits[side as usize][phase as usize],
            segments,
        );
    }

    pub(super) fn segments_sent(&mut self, side: SideLabel, segments: u64) {
        add(&mut self.segments_sent[side as usize], segments);
    }

    pub(super) fn reset(&mut self, side: SideLabel, direction: Direction) {
        add(&mut self.resets[side as usize][direction as usize], 1);
    }

    pub(super) fn dropped(&mut self, reason: &DropReason, packets: u64) {
        match self.drops.get_mut(reason) {
            Some(n) => *n += packets,
            None => {
                self.drops.insert(reason.clone(), packets);
            }
        }
    }

    pub(super) fn listen_overflows(&mut self, overflows: u64) {
        add(&mut self.listen_overflows, overflows);
    }
}

/// Handshake times in the buckets of [`CONNECT_DURATION_BUCKETS`], as Prometheus counts them:
/// a time goes into the first bucket whose bound it does not exceed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DurationHistogram {
    /// Per bucket, not cumulative; times past the last bound are only in `count`.
    pub buckets: [u64; CONNECT_DURATION_BUCKETS.len()],
    pub count: u64,
    pub sum_seconds: f64,
}

impl DurationHistogram {
    fn observe(&mut self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        if let Some(i) = CONNECT_DURATION_BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_seconds += seconds;
    }

    /// `(upper bound, cumulative count)` per bucket.
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        CONNECT_DURATION_BUCKETS
            .iter()
            .zip(self.buckets.iter())
            .scan(0, |total, (bound, n)| {
                *total += n;
                Some((*bound, *total))
            })
    }
}
