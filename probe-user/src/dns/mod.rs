//! DNS: every query, its answer or its silence, and the name behind each connect.
//!
//! Data flows as everywhere else in the agent: the cgroup_skb programs (probe-ebpf `dns`) copy
//! DNS packets into their own ring buffer -> [`capture`] decodes the record -> [`message`]
//! parses the DNS message (simple-dns) -> [`exchange`] matches queries to answers and calls the
//! silent ones timeouts -> [`stats`] counts them per resolver (metrics, verdicts) and [`names`]
//! remembers which name each answered address stands for (the join with connects); the JSON
//! log gets one `dns` line per exchange.
use std::{
    os::fd::AsFd as _,
    sync::{Arc, Mutex, mpsc::SyncSender, mpsc::TrySendError},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch, task::JoinHandle};

use crate::{decode::Clock, export::json_log::LogBatch, tally::LossStage, tally::Tally};

pub mod capture;
pub mod exchange;
pub mod message;
pub mod metrics;
pub mod names;
pub mod stats;
pub mod verdicts;

use capture::Transport;
use exchange::{DnsExchange, DnsOutcome, Tracker};
use names::NameCache;
use stats::DnsStats;

/// Client-side exchanges kept for the verdicts (the flight recorder of DNS).
pub const RECENT: usize = 20_000;

/// The DNS port watched always.
pub const DNS_PORT: u16 = 53;

#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Ports watched: 53 and every `--dns-port`.
    pub ports: Vec<u16>,
    pub timeout: Duration,
    pub max_pending: usize,
    pub max_names: usize,
    pub max_resolvers: usize,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsConfigError {
    #[error("--dns-port can be given at most {max} times (besides 53), not {given}")]
    TooManyPorts { max: usize, given: usize },
    #[error("--dns-timeout must be more than 0")]
    ZeroTimeout,
}

impl DnsConfig {
    /// Checks the flags: every port fits in the kernel's table.
    pub fn new(
        extra_ports: &[u16],
        timeout: Duration,
        max_pending: usize,
        max_names: usize,
        max_resolvers: usize,
    ) -> Result<Self, DnsConfigError> {
        let mut ports = vec![DNS_PORT];
        for p in extra_ports {
            if !ports.contains(p) {
                ports.push(*p);
            }
        }
        if ports.len() > probe_common::MAX_DNS_PORTS {
            return Err(DnsConfigError::TooManyPorts {
                max: probe_common::MAX_DNS_PORTS - 1,
                given: ports.len() - 1,
            });
        }
        if timeout.is_zero() {
            return Err(DnsConfigError::ZeroTimeout);
        }
        Ok(DnsConfig {
            ports,
            timeout,
            max_pending,
            max_names,
            max_resolvers,
        })
    }

    /// The ports as the kernel programs' global.
    pub fn kernel_ports(&self) -> probe_common::DnsPorts {
        let mut ports = probe_common::DnsPorts::default();
        for (slot, p) in ports.ports.iter_mut().zip(&self.ports) {
            *slot = *p;
        }
        ports.count = self.ports.len() as u32;
        ports
    }
}

/// Counts of the DNS path, besides the exchanges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsCounts {
    /// Packets delivered from the kernel.
    pub packets: u64,
    /// Packets whose payload is not a DNS message (or whose record did not decode).
    pub malformed: u64,
    /// The kernel's counters: packets it tried to hand over, and those lost in its ring.
    pub kernel_produced: u64,
    pub lost_ringbuf: u64,
    /// Exchanges whose log lines were dropped (queue full or writer gone).
    pub lost_queue: u64,
    pub exchanges: u64,
}

/// Everything the DNS path holds; one lock, taken by the DNS reader per drain, by the TCP
/// consumer per batch (names) and by scrapes.
pub struct DnsState {
    tracker: Tracker,
    /// The most recent client-side exchanges (at most [`RECENT`]), for the verdicts.
    recent: std::collections::VecDeque<DnsExchange>,
    pub stats: DnsStats,
    pub names: NameCache,
    pub counts: DnsCounts,
    /// The kernel's DNS ring, once the reader has started: drained by whoever needs it current
    /// (see [`drain`]).
    ring: Option<RingBuf<MapData>>,
    /// Exchanges ended (answered, timed out) and not yet handed to the log.
    pending_log: Vec<DnsExchange>,
}

pub type SharedDns = Arc<Mutex<DnsState>>;

impl DnsState {
    pub fn new(config: &DnsConfig, clock: Clock) -> Self {
        DnsState {
            tracker: Tracker::new(config.timeout, config.max_pending, clock),
            recent: std::collections::VecDeque::new(),
            stats: DnsStats::new(config.max_resolvers),
            names: NameCache::new(config.max_names),
            counts: DnsCounts::default(),
            ring: None,
            pending_log: Vec::new(),
        }
    }

    pub fn shared(config: &DnsConfig, clock: Clock) -> SharedDns {
        Arc::new(Mutex::new(Self::new(config, clock)))
    }

    /// Client-side exchanges whose query was sent at or after `start`.
    pub fn recent_since(&self, start: std::time::SystemTime) -> Vec<DnsExchange> {
        self.recent
            .iter()
            .filter(|x| x.time >= start)
            .cloned()
            .collect()
    }

    pub fn evicted(&self) -> u64 {
        self.tracker.counts.evicted
    }

    pub fn unmatched(&self) -> u64 {
        self.tracker.counts.unmatched
    }

    pub fn pending(&self) -> usize {
        self.tracker.pending()
    }

    /// One ring buffer record: its messages are matched; finished exchanges go to `out`.
    pub fn ingest(&mut self, record: &[u8], now: Instant, out: &mut Vec<DnsExchange>) {
        self.counts.packets += 1;
        let capture = match capture::decode(record) {
            Ok(c) => c,
            Err(e) => {
                if self.counts.malformed == 0 {
                    tracing::warn!("undecodable DNS record from the kernel: {e}");
                }
                self.counts.malformed += 1;
                return;
            }
        };
        let first = out.len();
        match capture.transport {
            Transport::Udp => match message::parse(capture.payload, capture.cut) {
                Ok(m) => self.tracker.observe(&capture, &m, out),
                Err(_) => self.counts.malformed += 1,
            },
            Transport::Tcp => {
                for (bytes, cut) in message::tcp_messages(capture.payload, capture.cut) {
                    match message::parse(bytes, cut) {
                        Ok(m) => self.tracker.observe(&capture, &m, out),
                        // A segment that continues an earlier message starts mid-message.
                        Err(_) => self.counts.malformed += 1,
                    }
                }
                if capture.closing {
                    self.tracker.connection_closed(&capture, out);
                }
            }
        }
        self.finished(first, now, out);
    }

    /// Queries past the timeout at the monotonic time `now_mono_ns` become timeouts.
    /// [`DnsState::expire`] into the exchanges waiting for the log.
    fn expire_pending(&mut self, now_mono_ns: u64, now: Instant) {
        let mut out = std::mem::take(&mut self.pending_log);
        self.expire(now_mono_ns, now, &mut out);
        self.pending_log = out;
    }

    pub fn expire(&mut self, now_mono_ns: u64, now: Instant, out: &mut Vec<DnsExchange>) {
        let first = out.len();
        self.tracker.expire(now_mono_ns, out);
        self.finished(first, now, out);
    }

    /// An exchange as if it had just ended, for tests of what reads the recent ones.
    #[cfg(test)]
    pub(crate) fn finish_for_test(&mut self, x: DnsExchange) {
        self.finished(0, Instant::now(), &[x]);
    }

    fn finished(&mut self, first: usize, now: Instant, out: &[DnsExchange]) {
        for x in &out[first..] {
            self.counts.exchanges += 1;
            self.stats.record(x);
            if x.side != crate::event::Side::Client {
                continue;
            }
            if self.recent.len() >= RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(x.clone());
            if let DnsOutcome::Answered { answers, .. } = &x.outcome {
                for (addr, ttl) in answers {
                    self.names.insert(*addr, x.name.clone(), *ttl, now);
                }
            }
        }
    }
}

/// One line for the end of a run: packets, exchanges, and what was lost or rejected.
pub fn summary(state: &SharedDns) -> String {
    let s = lock(state);
    let c = &s.counts;
    format!(
        "dns: packets={} (produced in kernel={}) exchanges={} pending={}; lost: ringbuf={} \
         queue={}; malformed={} evicted={} unmatched_answers={}",
        c.packets,
        c.kernel_produced,
        c.exchanges,
        s.pending(),
        c.lost_ringbuf,
        c.lost_queue,
        c.malformed,
        s.evicted(),
        s.unmatched(),
    )
}

/// CLOCK_MONOTONIC now, in the kernel's `bpf_ktime_get_ns` terms.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How often the DNS reader looks for queries past their timeout (and drains the ring, should
/// a wakeup have been missed).
const TICK: Duration = Duration::from_millis(100);

/// Reads the DNS ring buffer until told to stop; matched and timed-out exchanges go to the
/// log. At the stop, what is still waiting is left out (neither answered nor timed out yet).
///
/// The ring lives in the shared state rather than in this task: the event consumer drains it
/// too, before it names connects ([`drain`]). The kernel does not wake this task for each DNS
/// record (a wakeup per query cost more than the query's capture, see probe-ebpf `dns`), so
/// without that an answer could still sit in the ring when the connect that follows it is
/// named. This task keeps a descriptor of the ring for readiness (a far-behind ring wakes it)
/// and drains it on every tick.
pub fn spawn_reader(
    ring: RingBuf<MapData>,
    state: SharedDns,
    log: Option<SyncSender<LogBatch>>,
    tally: Arc<Tally>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<anyhow::Result<()>> {
    // Set here, not in the task: after a fallback the last reader started holds the live ring.
    let readiness = ring.as_fd().try_clone_to_owned();
    lock(&state).ring = Some(ring);
    tokio::spawn(async move {
        let readiness = readiness.context("cannot duplicate the DNS ring buffer's descriptor")?;
        // SAFETY: the OwnedFd is the AsyncFd's own and stays open while it is registered.
        let fd =
            unsafe { AsyncFd::register_with_interest(readiness, tokio::io::Interest::READABLE) }
                .context("cannot poll the DNS ring buffer")?;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                guard = fd.readable() => {
                    let mut guard = guard.context("polling the DNS ring buffer failed")?;
                    drain(&state);
                    guard.clear_ready();
                    // Exchanges go to the log in batches (one queue slot each): at most a
                    // tick late, or as soon as a batch is full.
                    if lock(&state).pending_log.len() >= crate::reader::BATCH {
                        hand_on(&log, &state, &tally);
                    }
                }
                _ = tick.tick() => {
                    drain(&state);
                    lock(&state).expire_pending(monotonic_ns(), Instant::now());
                    hand_on(&log, &state, &tally);
                }
                _ = stop.changed() => break,
            }
        }
        drain(&state);
        hand_on(&log, &state, &tally);
        Ok(())
    })
}

fn lock(state: &SharedDns) -> std::sync::MutexGuard<'_, DnsState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads every record the DNS ring holds into the state (queries pending, answers matched, names
/// learnt); the exchanges that ended wait for the DNS reader's next hand-on to the log. Called by
/// the DNS reader and by the event consumer before it names connects: an answer is in the ring
/// before the application that asked can read it, so a connect that follows it finds its name.
pub fn drain(state: &SharedDns) {
    let now = Instant::now();
    let mut state = lock(state);
    let Some(mut ring) = state.ring.take() else {
        return;
    };
    let mut out = std::mem::take(&mut state.pending_log);
    while let Some(item) = ring.next() {
        state.ingest(&item, now, &mut out);
    }
    state.pending_log = out;
    state.ring = Some(ring);
}

fn hand_on(log: &Option<SyncSender<LogBatch>>, state: &SharedDns, tally: &Tally) {
    let mut batch = std::mem::take(&mut lock(state).pending_log);
    if batch.is_empty() {
        return;
    }
    for exchange in batch.iter_mut() {
        exchange.seq = tally.next_seq();
    }
    let Some(log) = log else { return };
    let lost = match log.try_send(LogBatch::Dns(batch)) {
        Ok(()) => return,
        Err(TrySendError::Full(lost)) => {
            tally.add_lost(LossStage::Queue, lost.len() as u64);
            lost.len()
        }
        Err(TrySendError::Disconnected(lost)) => {
            tally.add_lost(LossStage::Log, lost.len() as u64);
            lost.len()
        }
    };
    lock(state).counts.lost_queue += lost as u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_53_and_each_dns_port_once_within_the_kernels_table() {
        let c = DnsConfig::new(&[5353, 53, 5353], Duration::from_secs(5), 1, 1, 1).unwrap();
        assert_eq!(c.ports, vec![53, 5353]);
        let k = c.kernel_ports();
        assert_eq!((k.count, &k.ports[..3]), (2, &[53, 5353, 0][..]));
        let many: Vec<u16> = (1..=8).collect();
        assert_eq!(
            DnsConfig::new(&many, Duration::from_secs(5), 1, 1, 1).unwrap_err(),
            DnsConfigError::TooManyPorts { max: 7, given: 8 }
        );
        assert!(DnsConfig::new(&[], Duration::ZERO, 1, 1, 1).is_err());
    }
}
