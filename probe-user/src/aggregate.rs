//! Per-destination statistics from the decoded event stream: lifetime counts, the last 1 and 5
//! minutes (by event time), and the per-destination Prometheus series, within a fixed number
//! of label slots.
//!
//! **What a destination is.** Side client: the remote `ip:port` (`event.dst`). Side server:
//! this host's `ip:port` (`event.src`), so a service it offers is one row and client ephemeral
//! ports never become labels. Side unknown: the client view (`event.dst`), since the
//! unattributed events are mostly this host's own connects; their `side` label is `unknown`.
//! A reset sent without a socket answers a SYN, so it is taken as side server. With
//! `by_comm`, a destination is the pair (`ip:port`, owning process name); `comm="unknown"`
//! when the owner is not known.
//!
//! **Connects.** Attempts, failures and handshake latency count the connects this host opened
//! (side client or unknown). Connects this host accepted (side server) count as `accepted` in
//! the summaries, not as attempts: a failure ratio means "of the connects made, how many
//! failed", and with both ends on one host (loopback, the lab) each connection would count
//! twice.
//!
//! **Slots.** At most `max_destinations` destinations have their own label. A new destination
//! takes a free slot; one idle for `destination_idle` (by event time against the `now` passed
//! to [`Aggregator::expire_idle`]) frees it and its series are removed, so its counters restart
//! if it returns. A tenth of the slots (rounded down) are kept for destinations whose event is
//! a failed connect, so a failing destination that appears after healthy ones filled the table
//! still gets a label. Everything else is counted under `destination="other"` (one extra
//! label value, outside the cap). `connprobe_destinations_folded_total` counts each distinct
//! destination once while it is folded: folded destinations are remembered by a 64-bit
//! fingerprint in a set of bounded size ([`folded::CAPACITY`]); one that is idle for
//! `destination_idle`, or that later gets a slot, is forgotten and counts again if it is folded
//! again. Memory is bounded whatever the number of distinct destinations: the slots, the fold
//! set and the lookup table all have fixed maximum sizes.
use std::{
    cmp::Ordering,
    collections::HashMap,
    fmt::Write as _,
    hash::{BuildHasher, RandomState},
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use prometheus::{Histogram, IntCounter};

use crate::{
    event::{
        Comm, Direction, Event, EventDetail, FailureReason, Outcome, Phase, Side, TcpState,
        canonical_ip,
    },
    export::prometheus::Metrics,
};

pub mod folded;
pub mod window;

pub use window::{BUCKET, Counts, LatencyHistogram, LatencyPercentiles, WindowStats};

use folded::FoldedSet;
use window::{Ring, reason_index};

/// The label of destinations without a slot of their own.
pub const OTHER: &str = "other";
/// The `comm` label when the owning process is unknown (with `by_comm`).
pub const UNKNOWN_COMM: &str = "unknown";
/// Buckets in the 1-minute and 5-minute windows.
const BUCKETS_1M: usize = 6;
const BUCKETS_5M: usize = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AggregatorConfig {
    /// Destinations that get their own label (`--max-destinations`).
    pub max_destinations: usize,
    /// A destination with no event for this long frees its slot (`--destination-idle`).
    pub destination_idle: Duration,
    /// Add a `comm` label (`--by-comm`); must match the [`Metrics`] passed alongside.
    pub by_comm: bool,
}

/// The `side` label values, indexed by `SideIndex`.
const SIDES: [&str; 3] = ["client", "server", "unknown"];
type SideIndex = usize;
const CLIENT: SideIndex = 0;
const SERVER: SideIndex = 1;
const UNKNOWN: SideIndex = 2;
/// `syn`, `established`, then every TCP state by number (unknown numbers as state 0).
const PHASES: usize = 2 + 14;

fn phase_index(phase: Phase) -> usize {
    match phase {
        Phase::Syn => 0,
        Phase::Established => 1,
        Phase::Other(TcpState(n)) if (n as usize) < PHASES - 2 => 2 + n as usize,
        Phase::Other(_) => 2,
    }
}

fn phase_label(index: usize) -> std::borrow::Cow<'static, str> {
    match index {
        0 => Phase::Syn.as_str(),
        1 => Phase::Established.as_str(),
        n => Phase::Other(TcpState((n - 2) as u8)).as_str(),
    }
}

fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Sent => 0,
        Direction::Received => 1,
    }
}

const DIRECTIONS: [&str; 2] = ["sent", "received"];

/// Which side an event belongs to and its destination address (see the module docs).
fn view(event: &Event) -> (SideIndex, SocketAddr) {
    let side = match event.side {
        Some(Side::Client) => CLIENT,
        Some(Side::Server) => SERVER,
        None => match &event.detail {
            EventDetail::Reset(r) if r.direction == Direction::Sent && r.state.is_none() => SERVER,
            _ => UNKNOWN,
        },
    };
    let addr = if side == SERVER { event.src } else { event.dst };
    (side, SocketAddr::new(canonical_ip(addr.ip()), addr.port()))
}

fn is_failed_connect(event: &Event, side: SideIndex) -> bool {
    side != SERVER
        && matches!(&event.detail, EventDetail::Connect(c) if c.outcome == Outcome::Failed)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct DestinationKey {
    addr: SocketAddr,
    /// Only with `by_comm`; `None` for an unknown owner.
    comm: Option<Comm>,
}

/// Handles on the series a slot has created, so the hot path is one atomic add and expiry
/// knows exactly what to remove. Created on a destination's first event of each kind.
#[derive(Default)]
struct Series {
    attempts: Option<IntCounter>,
    failures: [Option<IntCounter>; 5],
    duration: Option<Histogram>,
    retransmits: [[Option<IntCounter>; PHASES]; 3],
    segments_sent: [Option<IntCounter>; 3],
    resets: [[Option<IntCounter>; 2]; 3],
}

impl Series {
    /// Removes every series created for `destination`/`comm` from the registry.
    fn remove(&mut self, m: &Metrics, destination: &str, comm: &str) {
        // Removing a series that is not there is not an error worth reporting.
        if self.attempts.take().is_some() {
            let _ = m
                .connect_attempts
                .remove_label_values(m.labels(&[destination, comm]));
        }
        for (reason, cell) in FailureReason::ALL.iter().zip(&mut self.failures) {
            if cell.take().is_some() {
                let _ = m.connect_failures.remove_label_values(m.labels(&[
                    destination,
                    reason.as_str(),
                    comm,
                ]));
            }
        }
        if self.duration.take().is_some() {
            let _ = m
                .connect_duration
                .remove_label_values(m.labels(&[destination, comm]));
        }
        for (side, cells) in SIDES.iter().zip(&mut self.retransmits) {
            for (phase, cell) in cells.iter_mut().enumerate() {
                if cell.take().is_some() {
                    let phase = phase_label(phase);
                    let _ = m.retransmits.remove_label_values(m.labels(&[
                        destination,
                        side,
                        &phase,
                        comm,
                    ]));
                }
            }
        }
        for (side, cell) in SIDES.iter().zip(&mut self.segments_sent) {
            if cell.take().is_some() {
                let _ = m
                    .segments_sent
                    .remove_label_values(m.labels(&[destination, side, comm]));
            }
        }
        for (side, cells) in SIDES.iter().zip(&mut self.resets) {
            for (direction, cell) in DIRECTIONS.iter().zip(cells) {
                if cell.take().is_some() {
                    let _ = m.resets.remove_label_values(m.labels(&[
                        destination,
                        side,
                        direction,
                        comm,
                    ]));
                }
            }
        }
    }
}

/// One destination with a label (or the fold, `other`). Slots are reused, with their label
/// strings and window buffers, so a warm aggregator does not allocate for a new destination
/// beyond what the metrics registry does.
struct Slot {
    key: DestinationKey,
    live: bool,
    /// The `destination` label value.
    destination: String,
    /// The `comm` label value (empty without `by_comm`).
    comm: String,
    last_seen: SystemTime,
    life: Counts,
    ring: Ring,
    series: Series,
}

impl Slot {
    fn new() -> Self {
        Slot {
            key: DestinationKey {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                comm: None,
            },
            live: false,
            destination: String::new(),
            comm: String::new(),
            last_seen: SystemTime::UNIX_EPOCH,
            life: Counts::default(),
            ring: Ring::default(),
            series: Series::default(),
        }
    }

    fn assign(&mut self, key: DestinationKey, by_comm: bool, time: SystemTime) {
        self.key = key;
        self.live = true;
        self.destination.clear();
        let _ = write!(self.destination, "{}", key.addr);
        self.comm.clear();
        if by_comm {
            match key.comm {
                Some(comm) => self.comm.push_str(&comm.to_string_lossy()),
                None => self.comm.push_str(UNKNOWN_COMM),
            }
        }
        self.last_seen = time;
        self.life = Counts::default();
        self.ring.clear();
    }

    fn release(&mut self, m: &Metrics) {
        self.series.remove(m, &self.destination, &self.comm);
        self.live = false;
    }

    fn apply(&mut self, m: &Metrics, event: &Event, side: SideIndex) {
        if event.time > self.last_seen {
            self.last_seen = event.time;
        }
        let (d, comm) = (self.destination.as_str(), self.comm.as_str());
        let series = &mut self.series;
        let life = &mut self.life;
        match &event.detail {
            EventDetail::Connect(_) if side == SERVER => {
                life.accepted += 1;
                self.ring.update(event.time, |w, _| w.accepted += 1);
            }
            EventDetail::Connect(c) => {
                series
                    .attempts
                    .get_or_insert_with(|| {
                        m.connect_attempts.with_label_values(m.labels(&[d, comm]))
                    })
                    .inc();
                life.attempts += 1;
                match c.outcome {
                    Outcome::Established => {
                        life.established += 1;
                        if let Some(latency) = c.latency {
                            series
                                .duration
                                .get_or_insert_with(|| {
                                    m.connect_duration.with_label_values(m.labels(&[d, comm]))
                                })
                                .observe(latency.as_secs_f64());
                        }
                        self.ring.update(event.time, |w, h| {
                            w.attempts += 1;
                            w.established += 1;
                            if let Some(latency) = c.latency {
                                h.record(latency);
                            }
                        });
                    }
                    Outcome::Failed => {
                        let reason = c.reason.unwrap_or(FailureReason::Other);
                        let r = reason_index(reason);
                        series.failures[r]
                            .get_or_insert_with(|| {
                                m.connect_failures.with_label_values(m.labels(&[
                                    d,
                                    reason.as_str(),
                                    comm,
                                ]))
                            })
                            .inc();
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
                let p = phase_index(rt.state.phase());
                series.retransmits[side][p]
                    .get_or_insert_with(|| {
                        let phase = phase_label(p);
                        m.retransmits
                            .with_label_values(m.labels(&[d, SIDES[side], &phase, comm]))
                    })
                    .inc_by(segments);
                life.retransmitted_segments += segments;
                self.ring
                    .update(event.time, |w, _| w.retransmitted_segments += segments);
            }
            EventDetail::Reset(rs) => {
                let dir = direction_index(rs.direction);
                series.resets[side][dir]
                    .get_or_insert_with(|| {
                        m.resets.with_label_values(m.labels(&[
                            d,
                            SIDES[side],
                            DIRECTIONS[dir],
                            comm,
                        ]))
                    })
                    .inc();
                let count = |w: &mut Counts| match rs.direction {
                    Direction::Sent => w.resets_sent += 1,
                    Direction::Received => w.resets_received += 1,
                };
                count(life);
                self.ring.update(event.time, |w, _| count(w));
            }
            EventDetail::Close(cl) => {
                let sent = u64::from(cl.segments_sent);
                let retransmitted = u64::from(cl.segments_retransmitted);
                series.segments_sent[side]
                    .get_or_insert_with(|| {
                        m.segments_sent
                            .with_label_values(m.labels(&[d, SIDES[side], comm]))
                    })
                    .inc_by(sent);
                let count = |w: &mut Counts| {
                    w.close_segments_sent += sent;
                    w.close_segments_retransmitted += retransmitted;
                };
                count(life);
                self.ring.update(event.time, |w, _| count(w));
            }
        }
    }

    fn summary(&self, now: SystemTime, by_comm: bool, is_other: bool) -> DestinationSummary {
        DestinationSummary {
            destination: (!is_other).then_some(self.key.addr),
            comm: by_comm.then(|| self.comm.clone()),
            last_seen: self.last_seen,
            lifetime: self.life,
            last_1m: self.ring.window(now, BUCKETS_1M),
            last_5m: self.ring.window(now, BUCKETS_5M),
        }
    }
}

/// One destination's statistics, for the terminal table and the diagnosis.
#[derive(Clone, Debug, PartialEq)]
pub struct DestinationSummary {
    /// `None` for the fold, `destination="other"`.
    pub destination: Option<SocketAddr>,
    /// The `comm` label, with `--by-comm` only.
    pub comm: Option<String>,
    /// The latest event time seen.
    pub last_seen: SystemTime,
    /// Since the destination got its slot.
    pub lifetime: Counts,
    /// The last minute of event time (the current 10-second bucket and the five before it).
    pub last_1m: WindowStats,
    /// The last five minutes (the current 10-second bucket and the 29 before it).
    pub last_5m: WindowStats,
}

impl DestinationSummary {
    /// `ip:port` (IPv6 in brackets) or `other`, with ` (comm)` under `--by-comm`.
    pub fn label(&self) -> String {
        let mut label = match self.destination {
            Some(addr) => addr.to_string(),
            None => OTHER.to_string(),
        };
        if let Some(comm) = &self.comm {
            let _ = write!(label, " ({comm})");
        }
        label
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

/// Per-destination statistics and series within `max_destinations` label slots.
///
/// Lives behind the pipeline's lock; [`Aggregator::record`] is the hot path (one hash lookup
/// and a few atomic adds for a known destination, no allocation). `/metrics` does not need
/// this lock: the series it owns are atomics in the shared registry.
pub struct Aggregator {
    config: AggregatorConfig,
    reserve: usize,
    metrics: Metrics,
    index: HashMap<DestinationKey, usize>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    other: Slot,
    folded: FoldedSet,
    fingerprints: RandomState,
}

impl Aggregator {
    /// `metrics` must have been built with the same `by_comm`; the aggregator shares its
    /// series.
    pub fn new(config: AggregatorConfig, metrics: &Metrics) -> Self {
        assert_eq!(
            config.by_comm,
            metrics.by_comm(),
            "aggregator and metrics disagree on the comm label"
        );
        let mut other = Slot::new();
        other.destination.push_str(OTHER);
        if config.by_comm {
            other.comm.push_str(OTHER);
        }
        Aggregator {
            config,
            reserve: config.max_destinations / 10,
            metrics: metrics.clone(),
            index: HashMap::with_capacity(config.max_destinations.min(1 << 16)),
            slots: Vec::new(),
            free: Vec::new(),
            other,
            folded: FoldedSet::new(folded::CAPACITY),
            fingerprints: RandomState::new(),
        }
    }

    /// Counts one event: in `connprobe_events_total`, and in its destination's statistics and
    /// series (or in `other`'s when it gets no slot).
    pub fn record(&mut self, event: &Event) {
        self.metrics.events_counter(event.kind()).inc();
        let (side, addr) = view(event);
        let comm = if self.config.by_comm {
            event.process.as_ref().map(|p| p.comm)
        } else {
            None
        };
        let key = DestinationKey { addr, comm };
        let slot = match self.index.get(&key) {
            Some(&i) => &mut self.slots[i],
            None => match self.admit(key, event, side) {
                Some(i) => &mut self.slots[i],
                None => {
                    let fingerprint = self.fingerprints.hash_one(key);
                    if self.folded.note(fingerprint, event.time) {
                        self.metrics.destinations_folded.inc();
                    }
                    if !self.other.live {
                        self.other.live = true;
                        self.other.life = Counts::default();
                        self.other.ring.clear();
                        self.other.last_seen = event.time;
                    }
                    &mut self.other
                }
            },
        };
        slot.apply(&self.metrics, event, side);
    }

    /// Gives `key` a slot if the policy allows it.
    fn admit(&mut self, key: DestinationKey, event: &Event, side: SideIndex) -> Option<usize> {
        let max = self.config.max_destinations;
        let limit = if is_failed_connect(event, side) {
            max
        } else {
            max - self.reserve
        };
        if self.index.len() >= limit {
            return None;
        }
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::new());
                self.slots.len() - 1
            }
        };
        self.slots[i].assign(key, self.config.by_comm, event.time);
        self.index.insert(key, i);
        self.metrics
            .destinations_tracked
            .set(self.index.len() as i64);
        if !self.folded.is_empty() {
            self.folded.forget(self.fingerprints.hash_one(key));
        }
        Some(i)
    }

    /// Frees the slot of every destination whose last event is `destination_idle` or more
    /// before `now`, removing its series; `other` goes the same way. Call about once a second.
    pub fn expire_idle(&mut self, now: SystemTime) {
        let idle = self.config.destination_idle;
        let expired = |last: SystemTime| now.duration_since(last).is_ok_and(|d| d >= idle);
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.live && expired(slot.last_seen) {
                slot.release(&self.metrics);
                self.index.remove(&slot.key);
                self.free.push(i);
            }
        }
        if self.other.live && expired(self.other.last_seen) {
            self.other.release(&self.metrics);
        }
        self.folded.expire(now, idle);
        self.metrics
            .destinations_tracked
            .set(self.index.len() as i64);
    }

    /// Destinations with their own label now.
    pub fn tracked(&self) -> usize {
        self.index.len()
    }

    /// Every destination with a slot, and `other` if anything is folded, worst first
    /// ([`DestinationSummary::worst_first`]); windows end at `now`.
    pub fn summaries(&self, now: SystemTime) -> Vec<DestinationSummary> {
        let by_comm = self.config.by_comm;
        let mut out: Vec<_> = self
            .slots
            .iter()
            .filter(|s| s.live)
            .map(|s| s.summary(now, by_comm, false))
            .collect();
        if self.other.live {
            out.push(self.other.summary(now, by_comm, true));
        }
        out.sort_by(DestinationSummary::worst_first);
        out
    }
}

#[cfg(test)]
pub(crate) mod tests;
