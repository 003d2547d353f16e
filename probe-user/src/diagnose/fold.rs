//! What the engine keeps of one destination's events: counters, and the times that burst
//! detection needs. Compact, so a long log can be judged without holding its events.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use super::pattern::Episode;
use super::processes::ProcessCounts;
use super::rules::ratio;
use crate::{
    destination::Destination,
    event::{
        ConnectOutcome, Direction, Drop, Endpoint, Event, EventDetail, FailureReason, Phase,
        TcpState,
    },
};

/// The kernel's drop reason for a handshake's last ACK refused by a full accept queue.
pub(super) const LISTEN_OVERFLOW_REASON: &str = "TCP_LISTEN_OVERFLOW";

/// Names a destination keeps for its failed connects (`dst_name`); past these, failures
/// carry none, so which names a destination keeps follows the order of the events.
pub(super) const NAMES_PER_DESTINATION: usize = 8;

/// A connect that failed, reduced to what the verdicts need.
#[derive(Clone, Copy, Debug)]
pub(super) struct FailedConnect {
    pub(super) time: SystemTime,
    pub(super) reason: FailureReason,
    pub(super) syn_retransmits: u32,
    pub(super) waited_us: Option<u64>,
    /// Where a DNAT on this host sent it, if one did.
    pub(super) backend: Option<Endpoint>,
    /// This host's port: which of the dropped SYNs were its.
    pub(super) local_port: u16,
    /// Its `dst_name`: an index into its destination's `names`, if it had one that fits.
    pub(super) name: Option<u8>,
}

impl FailedConnect {
    /// The connect's SYNs got no answer: the kernel timed out, or the application gave up.
    pub(super) fn unanswered(&self) -> bool {
        matches!(
            self.reason,
            FailureReason::Timeout | FailureReason::Cancelled
        )
    }
}

impl FailedConnect {
    /// From its SYN (where the wait is known) to its failure.
    pub(super) fn episode(&self) -> Episode {
        let waited = Duration::from_micros(self.waited_us.unwrap_or(0));
        let start = self.time.checked_sub(waited).unwrap_or(self.time);
        Episode {
            start: truncate_to_millis(start),
            end: self.time,
        }
    }
}

/// Everything seen for one destination, compact: counters plus the times that burst
/// detection needs.
#[derive(Debug)]
pub(super) struct DestinationEvidence {
    pub(super) first: SystemTime,
    pub(super) last: SystemTime,
    pub(super) events: u64,
    pub(super) attempts: u64,
    pub(super) established: u64,
    pub(super) established_after_syn_retransmit: u64,
    pub(super) failed: Vec<FailedConnect>,
    pub(super) errnos: BTreeMap<String, u64>,
    /// (time, handshake µs) of established connects that needed no SYN retransmit.
    pub(super) handshakes: Vec<(SystemTime, u64)>,
    /// Handshake µs of every established connect with a known latency.
    pub(super) latencies_us: Vec<u64>,
    pub(super) syn_retransmit_segments: u64,
    pub(super) established_retransmit_segments: u64,
    pub(super) established_retransmit_times: Vec<SystemTime>,
    pub(super) other_retransmit_segments: u64,
    pub(super) closes: u64,
    pub(super) segments_sent: u64,
    pub(super) segments_retransmitted: u64,
    pub(super) closes_with_retransmits: Vec<SystemTime>,
    pub(super) resets_received_in_syn_sent: u64,
    pub(super) resets_received_midstream: Vec<SystemTime>,
    pub(super) resets_received_by_state: BTreeMap<String, u64>,
    pub(super) resets_sent: Vec<SystemTime>,
    pub(super) resets_sent_socketless: u64,
    pub(super) resets_sent_by_state: BTreeMap<String, u64>,
    /// Sent resets by the kernel's reason (`NO_SOCKET`, `TCP_ABORT_ON_CLOSE`, ...); resets
    /// without one (received, or sent by a kernel before 6.10) are not counted here.
    pub(super) resets_sent_by_reason: BTreeMap<String, u64>,
    /// The owners of its events (retransmits included): who serves it or who connects to it.
    pub(super) processes: ProcessCounts,
    /// This host's ports of established connects that needed a SYN retransmit.
    pub(super) ports_established_after_syn_retransmit: Vec<u16>,
    /// Handshake segments (SYN, SYN-ACK, RST) and DNS packets the kernel dropped on this host,
    /// by its reason, and by packet and way (`SYN sent`, `SYN|ACK received`, ...).
    pub(super) packet_drops_by_reason: BTreeMap<String, u64>,
    pub(super) packet_drops_by_packet: BTreeMap<String, u64>,
    /// Dropped SYNs and SYN-ACKs: when, by reason, and this host's ports of their connects.
    pub(super) syn_drop_times: Vec<SystemTime>,
    pub(super) syn_drops_by_reason: BTreeMap<String, u64>,
    pub(super) ports_with_syn_drops: BTreeSet<u16>,
    /// SYNs that arrived for this host's service and were dropped before it (server side).
    pub(super) syn_drops_received: u64,
    /// Data segments counted dropped, by reason.
    pub(super) data_drops_by_reason: BTreeMap<String, u64>,
    /// Listen overflows of this host's listener at the destination (server side).
    pub(super) listen_overflows: u64,
    pub(super) listen_overflow_times: Vec<SystemTime>,
    pub(super) listen_backlog: Option<u32>,
    pub(super) listen_queued_max: u32,
    /// Handshakes' last ACKs the kernel dropped with `TCP_LISTEN_OVERFLOW` (Linux 6.18).
    pub(super) listen_overflow_drops: u64,
    /// The name the most recent connect's DNS answer gave (`dst_name`), if any.
    pub(super) name: Option<std::sync::Arc<str>>,
    /// The names of its failed connects (`dst_name`), at most `NAMES_PER_DESTINATION`.
    pub(super) failed_names: Vec<std::sync::Arc<str>>,
}

impl DestinationEvidence {
    pub(super) fn new(time: SystemTime) -> Self {
        let time = truncate_to_millis(time);
        DestinationEvidence {
            first: time,
            last: time,
            events: 0,
            attempts: 0,
            established: 0,
            established_after_syn_retransmit: 0,
            failed: Vec::new(),
            errnos: BTreeMap::new(),
            handshakes: Vec::new(),
            latencies_us: Vec::new(),
            syn_retransmit_segments: 0,
            established_retransmit_segments: 0,
            established_retransmit_times: Vec::new(),
            other_retransmit_segments: 0,
            closes: 0,
            segments_sent: 0,
            segments_retransmitted: 0,
            closes_with_retransmits: Vec::new(),
            resets_received_in_syn_sent: 0,
            resets_received_midstream: Vec::new(),
            resets_received_by_state: BTreeMap::new(),
            resets_sent: Vec::new(),
            resets_sent_socketless: 0,
            name: None,
            failed_names: Vec::new(),
            resets_sent_by_state: BTreeMap::new(),
            resets_sent_by_reason: BTreeMap::new(),
            processes: ProcessCounts::default(),
            ports_established_after_syn_retransmit: Vec::new(),
            packet_drops_by_reason: BTreeMap::new(),
            packet_drops_by_packet: BTreeMap::new(),
            syn_drop_times: Vec::new(),
            syn_drops_by_reason: BTreeMap::new(),
            ports_with_syn_drops: BTreeSet::new(),
            syn_drops_received: 0,
            data_drops_by_reason: BTreeMap::new(),
            listen_overflows: 0,
            listen_overflow_times: Vec::new(),
            listen_backlog: None,
            listen_queued_max: 0,
            listen_overflow_drops: 0,
        }
    }

    pub(super) fn add(&mut self, key: &Destination, event: &Event) {
        // Milliseconds, as reports print them: an agent's nanoseconds and its log's
        // microseconds then give the same bursts and the same order.
        let time = truncate_to_millis(event.time);
        self.first = self.first.min(time);
        self.last = self.last.max(time);
        if let Some(process) = &event.process {
            self.processes.add(process);
        }
        match &event.detail {
            EventDetail::Connect(c) => {
                self.events += 1;
                self.attempts += 1;
                if c.dst_name.is_some() {
                    self.name = c.dst_name.clone();
                }
                // A connect was under way from its SYN.
                if let Some(started) = c.latency.and_then(|l| event.time.checked_sub(l)) {
                    self.first = self.first.min(truncate_to_millis(started));
                }
                match c.outcome {
                    ConnectOutcome::Established => {
                        self.established += 1;
                        let latency_us = c.latency.map(|l| l.as_micros() as u64);
                        if let Some(us) = latency_us {
                            self.latencies_us.push(us);
                        }
                        if c.syn_retransmits > 0 {
                            self.established_after_syn_retransmit += 1;
                            self.ports_established_after_syn_retransmit
                                .push(event.src.port());
                        } else if let Some(us) = latency_us {
                            self.handshakes.push((time, us));
                        }
                    }
                    ConnectOutcome::Failed { reason, errno } => {
                        if let Some(errno) = errno {
                            *self.errnos.entry(errno.name().into_owned()).or_default() += 1;
                        }
                        let name = c.dst_name.as_ref().and_then(|n| self.failed_name(n));
                        self.failed.push(FailedConnect {
                            time,
                            reason,
                            syn_retransmits: c.syn_retransmits,
                            waited_us: c.latency.map(|l| l.as_micros() as u64),
                            local_port: event.src.port(),
                            backend: event.backend,
                            name,
                        });
                    }
                }
            }
            EventDetail::Retransmit(r) => match r.state.phase() {
                Phase::Syn => self.syn_retransmit_segments += u64::from(r.segments),
                Phase::Established => {
                    self.established_retransmit_segments += u64::from(r.segments);
                    self.established_retransmit_times.push(time);
                }
                _ => self.other_retransmit_segments += u64::from(r.segments),
            },
            EventDetail::Close(c) => {
                self.events += 1;
                self.closes += 1;
                self.segments_sent += u64::from(c.segments_sent);
                self.segments_retransmitted += u64::from(c.segments_retransmitted);
                if c.segments_retransmitted > 0 {
                    self.closes_with_retransmits.push(time);
                }
            }
            EventDetail::Drop(d) => self.dropped(key, event, d, time),
            EventDetail::ListenOverflow(o) => {
                self.events += 1;
                self.listen_overflows += o.overflows;
                self.listen_overflow_times.push(time);
                self.listen_backlog = o.backlog.or(self.listen_backlog);
                self.listen_queued_max = self.listen_queued_max.max(o.queued);
            }
            // About a namespace: the engine keeps these (see `Judge::add`).
            EventDetail::Conntrack(_) => {}
            EventDetail::Reset(r) => {
                self.events += 1;
                let state = r.state.map_or("none", TcpState::name).to_string();
                let server = key.is_server();
                match r.direction {
                    Direction::Received => {
                        *self.resets_received_by_state.entry(state).or_default() += 1;
                        match r.state {
                            Some(TcpState::SynSent) => self.resets_received_in_syn_sent += 1,
                            Some(s) if s.is_midstream() && !server => {
                                self.resets_received_midstream.push(time)
                            }
                            _ => {}
                        }
                    }
                    Direction::Sent => {
                        *self.resets_sent_by_state.entry(state).or_default() += 1;
                        if let Some(reason) = &r.reason {
                            *self
                                .resets_sent_by_reason
                                .entry(reason.as_str().to_string())
                                .or_default() += 1;
                        }
                        if server {
                            self.resets_sent.push(time);
                            if r.state.is_none() {
                                self.resets_sent_socketless += 1;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The index of a failed connect's name, kept if there is room.
    fn failed_name(&mut self, name: &std::sync::Arc<str>) -> Option<u8> {
        let index = match self.failed_names.iter().position(|n| n == name) {
            Some(i) => i,
            None if self.failed_names.len() < NAMES_PER_DESTINATION => {
                self.failed_names.push(name.clone());
                self.failed_names.len() - 1
            }
            None => return None,
        };
        Some(index as u8)
    }

    fn dropped(&mut self, key: &Destination, event: &Event, d: &Drop, time: SystemTime) {
        let reason = d.reason.as_str().to_string();
        if d.is_counted() {
            *self.data_drops_by_reason.entry(reason).or_default() += d.packets;
            return;
        }
        self.events += 1;
        if d.reason.as_str() == LISTEN_OVERFLOW_REASON {
            self.listen_overflow_drops += d.packets;
        }
        let packet = match d.tcp_flags {
            Some(flags) => format!("{flags} {}", d.direction.name()),
            None => format!("{} {}", d.protocol.name(), d.direction.name()),
        };
        *self.packet_drops_by_packet.entry(packet).or_default() += d.packets;
        *self
            .packet_drops_by_reason
            .entry(reason.clone())
            .or_default() += d.packets;
        if d.is_syn() {
            self.syn_drop_times.push(time);
            *self.syn_drops_by_reason.entry(reason).or_default() += d.packets;
            if key.is_server() {
                if d.direction == Direction::Received {
                    self.syn_drops_received += d.packets;
                }
            } else {
                self.ports_with_syn_drops.insert(event.src.port());
            }
        }
    }

    /// Connects whose SYNs got no answer (they failed without one, or needed a retransmit), and
    /// how many of them had a SYN or SYN-ACK dropped on this host.
    pub(super) fn unanswered_connects(&self) -> (u64, u64) {
        let failed = self.failed.iter().filter(|f| f.unanswered());
        let mut unanswered = 0;
        let mut explained = 0;
        let ports = failed
            .map(|f| f.local_port)
            .chain(self.ports_established_after_syn_retransmit.iter().copied());
        for port in ports {
            unanswered += 1;
            if self.ports_with_syn_drops.contains(&port) {
                explained += 1;
            }
        }
        (unanswered, explained)
    }

    pub(super) fn failures(&self) -> u64 {
        self.failed.len() as u64
    }

    pub(super) fn failure_ratio(&self) -> f64 {
        ratio(self.failures(), self.attempts)
    }

    pub(super) fn retransmit_ratio(&self) -> Option<f64> {
        (self.segments_sent > 0).then(|| ratio(self.segments_retransmitted, self.segments_sent))
    }

    pub(super) fn active(&self) -> (SystemTime, SystemTime) {
        (self.first, self.last)
    }
}

pub(super) fn truncate_to_millis(time: SystemTime) -> SystemTime {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_millis(since.as_millis() as u64)
}
