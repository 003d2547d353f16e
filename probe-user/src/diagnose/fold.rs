//! What the engine keeps of one destination's events: counters, and the times that burst
//! detection needs. Compact, so a long log can be judged without holding its events.
use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use super::pattern::Episode;
use super::processes::ProcessCounts;
use super::rules::ratio;
use crate::{
    destination::Destination,
    event::{
        ConnectOutcome, Direction, Endpoint, Event, EventDetail, FailureReason, Phase, TcpState,
    },
};

/// A connect that failed, reduced to what the verdicts need.
#[derive(Clone, Copy, Debug)]
pub(super) struct FailedConnect {
    pub(super) time: SystemTime,
    pub(super) reason: FailureReason,
    pub(super) syn_retransmits: u32,
    pub(super) waited_us: Option<u64>,
    /// Where a DNAT on this host sent it, if one did.
    pub(super) backend: Option<Endpoint>,
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
            resets_sent_by_state: BTreeMap::new(),
            resets_sent_by_reason: BTreeMap::new(),
            processes: ProcessCounts::default(),
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
                        } else if let Some(us) = latency_us {
                            self.handshakes.push((time, us));
                        }
                    }
                    ConnectOutcome::Failed { reason, errno } => {
                        if let Some(errno) = errno {
                            *self.errnos.entry(errno.name().into_owned()).or_default() += 1;
                        }
                        self.failed.push(FailedConnect {
                            time,
                            reason,
                            syn_retransmits: c.syn_retransmits,
                            waited_us: c.latency.map(|l| l.as_micros() as u64),
                            backend: event.backend,
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

fn truncate_to_millis(time: SystemTime) -> SystemTime {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_millis(since.as_millis() as u64)
}
