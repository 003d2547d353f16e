//! The aggregator: the one owner of per-destination state. Every event counts at its
//! [`Destination`]; the state of each destination label (lifetime counts by series label, the
//! last 1 and 5 minutes by event time) lives here, in a fixed number of label slots, and every
//! exporter reads it through a [`Snapshot`]: `/metrics` (a Prometheus collector), the terminal
//! table, the evidence triggers.
//!
//! **Slots.** A slot is one `destination` label: a destination's address (the client, server
//! and unknown sides of one address share it; `side` is a label of the series inside). With
//! `by_comm`, a slot is the pair (address, owning process name), `comm="unknown"` when the owner
//! is not known.
//!
//! **Connects.** Attempts, failures and handshake latency count the connects this host opened
//! (side client or unknown). Connects this host accepted (side server) count as `accepted`, not
//! as attempts: a failure ratio means "of the connects made, how many failed", and with both
//! ends on one host (loopback, the lab) each connection would count twice.
//!
//! **Admission.** At most `max_destinations` destinations have a label. A new destination takes
//! a free one; one idle for `destination_idle` (by event time against the `now` passed to
//! [`Aggregator::expire_idle`]) frees it, and its series go with it, so its counters restart if
//! it returns. Its windows do not: the last 1 and 5 minutes are history, not series, so a
//! destination that gave up its label keeps them (in a slot without a label, at most
//! `max_destinations` of those, the longest idle reused first) until they have aged out, and
//! the table, `top` and the triggers still see the traffic it had; if it returns, its windows
//! carry on. A tenth of the slots (rounded down) are kept for destinations whose event is a
//! failed connect, so a failing destination that appears after healthy ones filled the table
//! still gets a label. Everything else is counted under `destination="other"` (one extra label
//! value, outside the cap). `connprobe_destinations_folded_total` counts each distinct
//! destination once while it is folded: folded destinations are remembered by a 64-bit
//! fingerprint in a set of bounded size ([`folded::CAPACITY`]); one that is idle for
//! `destination_idle`, or that later gets a slot, is forgotten and counts again if it is folded
//! again. Memory is bounded whatever the number of distinct destinations: the slots, the fold
//! set and the lookup table all have fixed maximum sizes.
use std::{
    cmp::Ordering,
    collections::HashMap,
    fmt::Write as _,
    hash::BuildHasher,
    time::{Duration, SystemTime},
};

use crate::{
    destination::Destination,
    event::{Comm, ConnectOutcome, Direction, Endpoint, Event, EventDetail, Phase, Side},
    workload::ContainerLabel,
};

pub mod backends;
pub mod folded;
pub mod series;
pub mod window;

pub use series::{CONNECT_DURATION_BUCKETS, DurationHistogram, Series, SideLabel};
pub use window::{BUCKET, Counts, LatencyHistogram, LatencyPercentiles, WindowStats, covered};

use backends::BackendTable;
pub use backends::{BackendCounts, BackendSummary};
use folded::FoldedSet;
use window::Ring;

/// The label of destinations without a slot of their own.
pub const OTHER: &str = "other";
/// The `comm` label when the owning process is unknown (with `by_comm`).
pub const UNKNOWN_COMM: &str = "unknown";
/// Buckets in the 1-minute and 5-minute windows.
pub const BUCKETS_1M: usize = 6;
pub const BUCKETS_5M: usize = 30;
/// How long windows remember: past this, an unlabelled slot holds nothing.
const HISTORY: Duration = Duration::from_secs(BUCKET.as_secs() * BUCKETS_5M as u64);

/// The hasher of the slot index (one lookup per event) and of folded fingerprints: foldhash,
/// a few times faster than SipHash on these small keys, and randomly seeded per process.
type Hasher = foldhash::fast::RandomState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AggregatorConfig {
    /// Destinations that get their own label (`--max-destinations`).
    pub max_destinations: usize,
    /// A destination with no event for this long frees its slot (`--destination-idle`).
    pub destination_idle: Duration,
    /// A slot per (destination, process name) (`--by comm`).
    pub by_comm: bool,
    /// A slot per (destination, container) (`--by container`); with `by_comm` too, per all three.
    pub by_container: bool,
}

/// The owner labels slots are split by.
#[derive(Clone, Copy, Debug)]
struct By {
    comm: bool,
    container: bool,
}

/// What a slot is: one destination label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SlotKey {
    addr: Endpoint,
    /// Only with `by_comm`; `None` for an unknown owner.
    comm: Option<Comm>,
    /// Only with `by_container`; `None` for an owner whose cgroup is not known.
    container: Option<ContainerLabel>,
}

/// What a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// A destination with its label: its series are exported.
    Labelled,
    /// A destination that gave up its label when idle: only its windows are kept, until they
    /// age out or the slot is needed.
    Unlabelled,
}

/// One destination (or the fold, `other`). Slots are reused, with their window buffers, so a
/// warm aggregator does not allocate for a new destination.
struct Slot {
    key: SlotKey,
    state: SlotState,
    last_seen: SystemTime,
    /// The side of its latest connect attempt (client, or unknown).
    attempts_side: Option<Side>,
    life: Counts,
    series: Series,
    ring: Ring,
}

impl Slot {
    fn new() -> Self {
        Slot {
            key: SlotKey {
                addr: Endpoint::new([0, 0, 0, 0].into(), 0),
                comm: None,
                container: None,
            },
            state: SlotState::Free,
            last_seen: SystemTime::UNIX_EPOCH,
            attempts_side: None,
            life: Counts::default(),
            series: Series::default(),
            ring: Ring::default(),
        }
    }

    /// Starts the slot over for `key`.
    fn assign(&mut self, key: SlotKey, time: SystemTime) {
        self.key = key;
        self.ring.clear();
        self.last_seen = time;
        self.label(time);
    }

    /// Gives the slot's destination a label, with its series from zero; its windows stay.
    fn label(&mut self, time: SystemTime) {
        self.state = SlotState::Labelled;
        self.last_seen = self.last_seen.max(time);
        self.attempts_side = None;
        self.life = Counts::default();
        self.series = Series::default();
    }

    fn labelled(&self) -> bool {
        self.state == SlotState::Labelled
    }

    fn apply(&mut self, event: &Event, destination: Destination) {
        if event.time > self.last_seen {
            self.last_seen = event.time;
        }
        let side = SideLabel::of(destination.side);
        let (life, series) = (&mut self.life, &mut self.series);
        match &event.detail {
            EventDetail::Connect(_) if destination.is_server() => {
                life.accepted += 1;
                self.ring.update(event.time, |w, _| w.accepted += 1);
            }
            EventDetail::Connect(c) => {
                self.attempts_side = destination.side;
                series.attempt();
                life.attempts += 1;
                match c.outcome {
                    ConnectOutcome::Established => {
                        life.established += 1;
                        if let Some(latency) = c.latency {
                            series.handshake(latency);
                        }
                        self.ring.update(event.time, |w, h| {
                            w.attempts += 1;
                            w.established += 1;
                            if let Some(latency) = c.latency {
                                h.record(latency);
                            }
                        });
                    }
                    ConnectOutcome::Failed { reason, .. } => {
                        series.failure(reason);
                        let r = reason as usize;
                        life.failures[r] += 1;
                        self.ring.update(event.time, |w, _| {
                            w.attempts += 1;
                            w.failures[r] += 1;
                        });
                    }
                }
            }
            EventDetail::Retransmit(rt) => {
                let segments = u64::from(rt.segments);
                let phase = rt.state.phase();
                series.retransmits(side, phase, segments);
                let count = |w: &mut Counts| {
                    w.retransmitted_segments += segments;
                    if phase == Phase::Syn {
                        w.syn_retransmitted_segments += segments;
                    }
                };
                count(life);
                self.ring.update(event.time, |w, _| count(w));
            }
            EventDetail::Reset(rs) => {
                series.reset(side, rs.direction);
                let count = |w: &mut Counts| match rs.direction {
                    Direction::Sent => w.resets_sent += 1,
                    Direction::Received => w.resets_received += 1,
                };
                count(life);
                self.ring.update(event.time, |w, _| count(w));
            }
            EventDetail::Drop(d) => {
                series.dropped(&d.reason, d.packets);
                life.drops += d.packets;
                self.ring.update(event.time, |w, _| w.drops += d.packets);
            }
            EventDetail::ListenOverflow(o) => {
                series.listen_overflows(o.overflows);
                life.listen_overflows += o.overflows;
                self.ring
                    .update(event.time, |w, _| w.listen_overflows += o.overflows);
            }
            // Counted by the aggregator itself, not at a destination (see `record`).
            EventDetail::Conntrack(_) => {}
            EventDetail::Close(cl) => {
                let sent = u64::from(cl.segments_sent);
                let retransmitted = u64::from(cl.segments_retransmitted);
                series.segments_sent(side, sent);
                let count = |w: &mut Counts| {
                    w.close_segments_sent += sent;
                    w.close_segments_retransmitted += retransmitted;
                };
                count(life);
                self.ring.update(event.time, |w, _| count(w));
            }
        }
    }

    fn comm_label(&self, by_comm: bool, is_other: bool) -> Option<String> {
        by_comm.then(|| match (is_other, self.key.comm) {
            (true, _) => OTHER.to_string(),
            (false, Some(comm)) => comm.to_string_lossy().into_owned(),
            (false, None) => UNKNOWN_COMM.to_string(),
        })
    }

    fn container_label(&self, by: By, is_other: bool) -> Option<String> {
        by.container.then(|| match (is_other, self.key.container) {
            (true, _) => OTHER.to_string(),
            (false, Some(container)) => container.as_str().to_string(),
            (false, None) => UNKNOWN_COMM.to_string(),
        })
    }

    /// What [`DestinationSummary::label`] says of this slot.
    fn summary_label(&self, by: By, is_other: bool) -> String {
        let mut label = match is_other {
            true => OTHER.to_string(),
            false => self.key.addr.to_string(),
        };
        if let Some(comm) = self.comm_label(by.comm, is_other) {
            let _ = write!(label, " ({comm})");
        }
        if let Some(container) = self.container_label(by, is_other) {
            let _ = write!(label, " [{container}]");
        }
        label
    }

    fn summary(&self, now: SystemTime, by: By, is_other: bool) -> DestinationSummary {
        let comm = self.comm_label(by.comm, is_other);
        DestinationSummary {
            destination: (!is_other).then_some(self.key.addr),
            labelled: self.labelled(),
            comm,
            container: self.container_label(by, is_other),
            attempts_side: self.attempts_side,
            last_seen: self.last_seen,
            lifetime: self.life,
            series: self.series.clone(),
            last_1m: self.ring.window(now, BUCKETS_1M),
            last_5m: self.ring.window(now, BUCKETS_5M),
        }
    }
}

/// One destination label's state as the exporters read it.
#[derive(Clone, Debug, PartialEq)]
pub struct DestinationSummary {
    /// `None` for the fold, `destination="other"`.
    pub destination: Option<Endpoint>,
    /// Whether it has its label now (and series in `/metrics`); false for one that gave up its
    /// label when idle but still has events in its windows.
    pub labelled: bool,
    /// The `comm` label, with `--by comm` only.
    pub comm: Option<String>,
    /// The `container` label (short id, `host` or `unknown`), with `--by container` only.
    pub container: Option<String>,
    /// The side its connect attempts were made from (client, or unknown).
    pub attempts_side: Option<Side>,
    /// The latest event time seen.
    pub last_seen: SystemTime,
    /// Since the destination got its label.
    pub lifetime: Counts,
    /// The same lifetime counts by the labels of its Prometheus series.
    pub series: Series,
    /// The last minute of event time (the current 10-second bucket and the five before it).
    pub last_1m: WindowStats,
    /// The last five minutes (the current 10-second bucket and the 29 before it).
    pub last_5m: WindowStats,
}

impl DestinationSummary {
    /// The `destination` label value: `ip:port` (IPv6 in brackets) or `other`.
    pub fn destination_label(&self) -> String {
        match self.destination {
            Some(addr) => addr.to_string(),
            None => OTHER.to_string(),
        }
    }

    /// The destination label, with ` (comm)` under `--by-comm`.
    pub fn label(&self) -> String {
        let mut label = self.destination_label();
        if let Some(comm) = &self.comm {
            let _ = write!(label, " ({comm})");
        }
        if let Some(container) = &self.container {
            let _ = write!(label, " [{container}]");
        }
        label
    }

    /// The destination its connect attempts count at, for the evidence triggers; `None` for
    /// the fold.
    pub fn attempted(&self) -> Option<Destination> {
        Some(Destination {
            side: self.attempts_side,
            addr: self.destination?,
        })
    }

    /// Worst first: most failed connects in the last minute, then in the last five, then most
    /// resets in the last minute, then the highest retransmit ratio and p99 latency, then most
    /// attempts; ties by label.
    pub fn worst_first(a: &Self, b: &Self) -> Ordering {
        fn key(s: &DestinationSummary) -> (u64, u64, u64, f64, Duration, u64) {
            let w = &s.last_1m;
            (
                w.counts.failures_total(),
                s.last_5m.counts.failures_total(),
                w.counts.resets_sent + w.counts.resets_received,
                w.retransmit_ratio().unwrap_or(0.0),
                w.latency.map(|l| l.p99).unwrap_or_default(),
                w.counts.attempts,
            )
        }
        let (ka, kb) = (key(a), key(b));
        kb.0.cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
            .then(kb.3.total_cmp(&ka.3))
            .then(kb.4.cmp(&ka.4))
            .then(kb.5.cmp(&ka.5))
            .then_with(|| a.label().cmp(&b.label()))
    }
}

/// The aggregator's state at one moment, for the exporters.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Every destination with a label, and `other` if anything is folded, then those without a
    /// label whose last five minutes hold events, all worst first
    /// ([`DestinationSummary::worst_first`]); windows end at the snapshot's time. `/metrics`
    /// reads the labelled ones, the windowed views all of them.
    pub destinations: Vec<DestinationSummary>,
    /// Whether slots are per (destination, process name).
    pub by_comm: bool,
    /// Whether slots are per (destination, container).
    pub by_container: bool,
    /// Destinations with their own label.
    pub tracked: usize,
    /// Distinct destinations folded into `other` (see the module docs).
    pub folded_total: u64,
    /// Connects to translated (DNAT) destinations by backend.
    pub backends: Vec<BackendSummary>,
    /// Connection tracking's failures, summed over the namespaces read.
    pub conntrack: ConntrackTotals,
}

/// Connection tracking's failures since the agent started, summed over the namespaces it reads
/// (`connprobe_conntrack_drops_total` by `kind`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackTotals {
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
}

/// Per-destination state within `max_destinations` label slots.
///
/// Lives behind the pipeline's lock; [`Aggregator::record`] is the hot path: one hash lookup
/// and a few additions for a known destination, no allocation.
pub struct Aggregator {
    config: AggregatorConfig,
    reserve: usize,
    /// Labelled and unlabelled slots by key.
    index: HashMap<SlotKey, usize, Hasher>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Slots with a label.
    labelled: usize,
    other: Slot,
    folded: FoldedSet,
    folded_total: u64,
    fingerprints: Hasher,
    conntrack: ConntrackTotals,
    backends: BackendTable,
}

impl Aggregator {
    pub fn new(config: AggregatorConfig) -> Self {
        Aggregator {
            config,
            reserve: config.max_destinations / 10,
            index: HashMap::with_capacity_and_hasher(
                config.max_destinations.min(1 << 16),
                Hasher::default(),
            ),
            slots: Vec::new(),
            free: Vec::new(),
            labelled: 0,
            other: Slot::new(),
            folded: FoldedSet::new(folded::CAPACITY),
            folded_total: 0,
            fingerprints: Hasher::default(),
            conntrack: ConntrackTotals::default(),
            backends: BackendTable::new(config.max_destinations),
        }
    }

    pub fn config(&self) -> &AggregatorConfig {
        &self.config
    }

    fn by(&self) -> By {
        By {
            comm: self.config.by_comm,
            container: self.config.by_container,
        }
    }

    /// Counts one event in its destination's state (or in `other`'s when it gets no slot).
    /// Conntrack's samples are about a namespace: they count in the aggregator's totals.
    pub fn record(&mut self, event: &Event) {
        if let EventDetail::Conntrack(c) = &event.detail {
            self.conntrack.insert_failed += c.insert_failed;
            self.conntrack.drop += c.drop;
            self.conntrack.early_drop += c.early_drop;
            return;
        }
        if event.backend.is_some() {
            self.backends.record(event);
        }
        let destination = Destination::of(event);
        let comm = if self.config.by_comm {
            event.process.as_ref().map(|p| p.comm)
        } else {
            None
        };
        let container = match self.config.by_container {
            true => event.workload.as_ref().map(|w| w.container_label()),
            false => None,
        };
        let key = SlotKey {
            addr: destination.addr,
            comm,
            container,
        };
        let known = self.index.get(&key).copied();
        let slot = match known {
            Some(i) if self.slots[i].labelled() => Some(i),
            _ => self.admit(key, known, event, destination),
        };
        let slot = match slot {
            Some(i) => &mut self.slots[i],
            None => {
                let fingerprint = self.fingerprints.hash_one(key);
                if self.folded.note(fingerprint, event.time) {
                    self.folded_total += 1;
                }
                if !self.other.labelled() {
                    // The fold's windows carry on, like any destination's.
                    self.other.key = key;
                    self.other.label(event.time);
                }
                &mut self.other
            }
        };
        slot.apply(event, destination);
    }

    /// Gives `key` a label if the policy allows it: back in the slot that kept its windows
    /// (`known`), or in a new one.
    fn admit(
        &mut self,
        key: SlotKey,
        known: Option<usize>,
        event: &Event,
        destination: Destination,
    ) -> Option<usize> {
        let max = self.config.max_destinations;
        let failed_connect = !destination.is_server()
            && matches!(
                &event.detail,
                EventDetail::Connect(c) if matches!(c.outcome, ConnectOutcome::Failed { .. })
            );
        let limit = if failed_connect {
            max
        } else {
            max - self.reserve
        };
        if self.labelled >= limit {
            return None;
        }
        let i = match known {
            Some(i) => {
                self.slots[i].label(event.time);
                i
            }
            None => {
                let i = self.vacant_slot();
                self.slots[i].assign(key, event.time);
                self.index.insert(key, i);
                i
            }
        };
        self.labelled += 1;
        if !self.folded.is_empty() {
            self.folded.forget(self.fingerprints.hash_one(key));
        }
        Some(i)
    }

    /// A slot for a new destination: a free one, a new one while there are fewer than twice
    /// `max_destinations`, else the unlabelled one idle the longest (its windows are lost).
    fn vacant_slot(&mut self) -> usize {
        if let Some(i) = self.free.pop() {
            return i;
        }
        if self.slots.len() < 2 * self.config.max_destinations.max(1) {
            self.slots.push(Slot::new());
            return self.slots.len() - 1;
        }
        // Labels are at most max_destinations, so at least as many slots are unlabelled.
        let i = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == SlotState::Unlabelled)
            .min_by_key(|(_, s)| s.last_seen)
            .map(|(i, _)| i)
            .expect("half the slots are without a label");
        let old = self.slots[i].key;
        self.index.remove(&old);
        self.slots[i].state = SlotState::Free;
        i
    }

    /// Takes the label of every destination whose last event is `destination_idle` or more
    /// before `now` (`other` goes the same way); frees the slots whose windows hold nothing
    /// any more. Call about once a second.
    pub fn expire_idle(&mut self, now: SystemTime) {
        let idle = self.config.destination_idle;
        let older =
            |last: SystemTime, age: Duration| now.duration_since(last).is_ok_and(|d| d >= age);
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.state == SlotState::Labelled && older(slot.last_seen, idle) {
                slot.state = SlotState::Unlabelled;
                self.labelled -= 1;
            }
            if slot.state == SlotState::Unlabelled && older(slot.last_seen, HISTORY) {
                slot.state = SlotState::Free;
                self.index.remove(&slot.key);
                self.free.push(i);
            }
        }
        if self.other.labelled() && older(self.other.last_seen, idle) {
            self.other.state = SlotState::Unlabelled;
        }
        self.folded.expire(now, idle);
        self.backends.expire_idle(now, idle);
    }

    /// Destinations with their own label now.
    pub fn tracked(&self) -> usize {
        self.labelled
    }

    /// The state of every destination, windows ending at `now`.
    pub fn snapshot(&self, now: SystemTime) -> Snapshot {
        let by = self.by();
        // Unlabelled ones only while their windows hold something.
        let shown = |s: &DestinationSummary| s.labelled || s.last_5m.counts != Counts::default();
        let mut destinations: Vec<_> = self
            .slots
            .iter()
            .filter(|s| s.state != SlotState::Free)
            .map(|s| s.summary(now, by, false))
            .filter(shown)
            .collect();
        if self.other.state != SlotState::Free {
            let other = self.other.summary(now, by, true);
            if shown(&other) {
                destinations.push(other);
            }
        }
        destinations.sort_by(DestinationSummary::worst_first);
        Snapshot {
            destinations,
            by_comm: by.comm,
            by_container: by.container,
            tracked: self.tracked(),
            folded_total: self.folded_total,
            conntrack: self.conntrack,
            backends: self.backends.summaries(),
        }
    }

    /// The handshake latencies over the last `buckets` buckets up to `now` of the destination
    /// `label` ([`DestinationSummary::label`]: its address, `other`, with ` (comm)` under
    /// `--by-comm`); `None` when no slot holds it.
    pub fn latency_histogram(
        &self,
        label: &str,
        now: SystemTime,
        buckets: usize,
    ) -> Option<LatencyHistogram> {
        let by = self.by();
        let holds = |s: &Slot, is_other: bool| {
            s.state != SlotState::Free && s.summary_label(by, is_other) == label
        };
        if holds(&self.other, true) {
            return Some(self.other.ring.latency(now, buckets));
        }
        self.slots
            .iter()
            .find(|s| holds(s, false))
            .map(|s| s.ring.latency(now, buckets))
    }

    /// The destinations of [`Aggregator::snapshot`].
    pub fn summaries(&self, now: SystemTime) -> Vec<DestinationSummary> {
        self.snapshot(now).destinations
    }
}

#[cfg(test)]
pub(crate) mod tests;
