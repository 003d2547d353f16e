//! Matching queries to answers. A query waits in a bounded table keyed by (side, transport,
//! client, resolver, id) — for TCP the connection is the (client, resolver) pair, several
//! queries on it told apart by id — until its answer comes (an `answered` exchange), its
//! deadline passes or its TCP connection closes first (a `timeout`). The same query sent again
//! over UDP while the first waits means the first went unanswered: it is a timeout too (over
//! TCP it is a retransmitted segment, and ignored). When the table
//! is full the oldest query is dropped and counted as evicted.
use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{
    capture::{Capture, Transport},
    message::{Message, Rcode},
};
use crate::{
    decode::Clock,
    event::{Comm, Direction, Endpoint, Process, Side},
};

/// How a query ended.
#[derive(Clone, Debug, PartialEq)]
pub enum DnsOutcome {
    Answered {
        rcode: Rcode,
        latency: Duration,
        /// A and AAAA addresses of the answer, with their TTLs (seconds).
        answers: Vec<(IpAddr, u32)>,
    },
    Timeout,
}

/// One query and its answer or silence, seen from one side.
#[derive(Clone, Debug, PartialEq)]
pub struct DnsExchange {
    /// The agent's sequence number (one counter with the TCP events), given as the exchange is
    /// handed to the log.
    pub seq: u64,
    /// When the query was sent (client) or received (server).
    pub time: SystemTime,
    pub process: Option<Process>,
    pub side: Side,
    pub transport: Transport,
    pub client: Endpoint,
    pub resolver: Endpoint,
    pub id: u16,
    pub name: Arc<str>,
    pub qtype: Arc<str>,
    pub outcome: DnsOutcome,
}

impl DnsExchange {
    /// This host's end and the remote end, as every line of the log has them.
    pub fn ends(&self) -> (Endpoint, Endpoint) {
        match self.side {
            Side::Client => (self.client, self.resolver),
            Side::Server => (self.resolver, self.client),
        }
    }
}

/// The log's `dns` line (README "DNS"): written by the JSON log, read back by
/// `connprobe analyze` (`DnsExchange::try_from`).
#[derive(Debug, Serialize, Deserialize)]
pub struct DnsLine<'a> {
    #[serde(rename = "type")]
    pub kind: DnsLineKind,
    pub seq: u64,
    #[serde(with = "crate::schema::rfc3339_micros")]
    pub time: SystemTime,
    pub pid: Option<u32>,
    #[serde(borrow)]
    pub comm: Option<Cow<'a, str>>,
    pub side: Side,
    pub src_ip: IpAddr,
    pub src_port: u16,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    pub transport: Transport,
    pub id: u16,
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    #[serde(borrow)]
    pub qtype: Cow<'a, str>,
    pub outcome: DnsOutcomeKind,
    #[serde(borrow)]
    pub rcode: Option<Cow<'a, str>>,
    pub latency_us: Option<u64>,
    pub answers: Vec<IpAddr>,
}

/// The `type` of a `dns` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsLineKind {
    Dns,
}

/// The `outcome` of a `dns` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsOutcomeKind {
    Answered,
    Timeout,
}

impl<'a> From<&'a DnsExchange> for DnsLine<'a> {
    fn from(x: &'a DnsExchange) -> Self {
        let (src, dst) = x.ends();
        let (outcome, rcode, latency_us, answers) = match &x.outcome {
            DnsOutcome::Answered {
                rcode,
                latency,
                answers,
            } => (
                DnsOutcomeKind::Answered,
                Some(Cow::Borrowed(rcode.name())),
                Some(latency.as_micros() as u64),
                answers.iter().map(|(a, _)| *a).collect(),
            ),
            DnsOutcome::Timeout => (DnsOutcomeKind::Timeout, None, None, Vec::new()),
        };
        DnsLine {
            kind: DnsLineKind::Dns,
            seq: x.seq,
            time: x.time,
            pid: x.process.as_ref().map(|p| p.pid),
            comm: x.process.as_ref().map(|p| p.comm.to_string_lossy()),
            side: x.side,
            src_ip: src.ip(),
            src_port: src.port(),
            dst_ip: dst.ip(),
            dst_port: dst.port(),
            transport: x.transport,
            id: x.id,
            name: Cow::Borrowed(&x.name),
            qtype: Cow::Borrowed(&x.qtype),
            outcome,
            rcode,
            latency_us,
            answers,
        }
    }
}

/// Why a `dns` line is no exchange.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsLineError {
    #[error("an answered query needs its rcode and latency_us")]
    AnsweredWithout,
    #[error("unknown rcode {0:?}")]
    UnknownRcode(String),
}

impl TryFrom<DnsLine<'_>> for DnsExchange {
    type Error = DnsLineError;

    /// The exchange a `dns` line was written from, but the answers' TTLs (the log has none: 0).
    fn try_from(line: DnsLine<'_>) -> Result<Self, Self::Error> {
        let src = Endpoint::new(line.src_ip, line.src_port);
        let dst = Endpoint::new(line.dst_ip, line.dst_port);
        let (client, resolver) = match line.side {
            Side::Client => (src, dst),
            Side::Server => (dst, src),
        };
        let outcome = match line.outcome {
            DnsOutcomeKind::Timeout => DnsOutcome::Timeout,
            DnsOutcomeKind::Answered => {
                let (Some(rcode), Some(us)) = (line.rcode, line.latency_us) else {
                    return Err(DnsLineError::AnsweredWithout);
                };
                DnsOutcome::Answered {
                    rcode: Rcode::from_name(&rcode)
                        .ok_or_else(|| DnsLineError::UnknownRcode(rcode.into_owned()))?,
                    latency: Duration::from_micros(us),
                    answers: line.answers.into_iter().map(|a| (a, 0)).collect(),
                }
            }
        };
        Ok(DnsExchange {
            seq: line.seq,
            time: line.time,
            process: line.pid.map(|pid| Process {
                pid,
                comm: Comm::from_str_lossy(line.comm.as_deref().unwrap_or("")),
            }),
            side: line.side,
            transport: line.transport,
            client,
            resolver,
            id: line.id,
            name: Arc::from(line.name.as_ref()),
            qtype: Arc::from(line.qtype.as_ref()),
            outcome,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    side: Side,
    transport: Transport,
    client: Endpoint,
    resolver: Endpoint,
    id: u16,
}

struct Pending {
    mono_ns: u64,
    /// Tells this entry from a later query under the same key in the age queue.
    serial: u64,
    process: Option<Process>,
    name: Arc<str>,
    qtype: Arc<str>,
}

/// What the tracker counted besides exchanges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerCounts {
    /// Queries dropped unmatched because the table was full.
    pub evicted: u64,
    /// Responses that matched no waiting query (asked before the agent started, or evicted).
    pub unmatched: u64,
}

pub struct Tracker {
    timeout: Duration,
    capacity: usize,
    clock: Clock,
    pending: HashMap<Key, Pending>,
    /// Keys by age (oldest first), with the serial of the entry they were queued for.
    ages: VecDeque<(u64, u64, Key)>,
    serial: u64,
    pub counts: TrackerCounts,
}

impl Tracker {
    pub fn new(timeout: Duration, capacity: usize, clock: Clock) -> Self {
        Tracker {
            timeout,
            capacity: capacity.max(1),
            clock,
            pending: HashMap::new(),
            ages: VecDeque::new(),
            serial: 0,
            counts: TrackerCounts::default(),
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes one parsed message of a captured packet; finished exchanges go to `out`.
    pub fn observe(
        &mut self,
        capture: &Capture<'_>,
        message: &Message,
        out: &mut Vec<DnsExchange>,
    ) {
        // A query this host sent, or an answer it received, is the client's view.
        let side = match (message.response, capture.direction) {
            (false, Direction::Sent) | (true, Direction::Received) => Side::Client,
            (false, Direction::Received) | (true, Direction::Sent) => Side::Server,
        };
        let (client, resolver) = match message.response {
            false => (capture.src, capture.dst),
            true => (capture.dst, capture.src),
        };
        let key = Key {
            side,
            transport: capture.transport,
            client,
            resolver,
            id: message.id,
        };
        if !message.response {
            if self.pending.contains_key(&key) {
                // Over TCP the same id again is the kernel resending a segment.
                if capture.transport == Transport::Tcp {
                    return;
                }
                if let Some(earlier) = self.pending.remove(&key) {
                    out.push(self.finish(key, earlier, DnsOutcome::Timeout));
                }
            }
            while self.pending.len() >= self.capacity {
                if !self.evict_oldest() {
                    break;
                }
            }
            self.serial += 1;
            self.ages.push_back((capture.mono_ns, self.serial, key));
            self.pending.insert(
                key,
                Pending {
                    mono_ns: capture.mono_ns,
                    serial: self.serial,
                    // The sender of a query is its owner on the client side; a server's
                    // answer is sent by the resolver process.
                    process: capture.process.clone(),
                    name: message.name.clone(),
                    qtype: message.qtype.clone(),
                },
            );
            return;
        }
        let Some(mut query) = self.pending.remove(&key) else {
            self.counts.unmatched += 1;
            return;
        };
        if query.process.is_none() {
            query.process = capture.process.clone();
        }
        let outcome = DnsOutcome::Answered {
            rcode: message.rcode,
            latency: Duration::from_nanos(capture.mono_ns.saturating_sub(query.mono_ns)),
            answers: message.answers.iter().map(|a| (a.addr, a.ttl)).collect(),
        };
        out.push(self.finish(key, query, outcome));
    }

    /// A TCP segment with FIN or RST: queries still waiting on that connection get no answer.
    pub fn connection_closed(&mut self, capture: &Capture<'_>, out: &mut Vec<DnsExchange>) {
        let (a, b) = (capture.src, capture.dst);
        let closed: Vec<Key> = self
            .pending
            .keys()
            .filter(|k| {
                k.transport == Transport::Tcp
                    && ((k.client == a && k.resolver == b) || (k.client == b && k.resolver == a))
            })
            .copied()
            .collect();
        for key in closed {
            if let Some(query) = self.pending.remove(&key) {
                out.push(self.finish(key, query, DnsOutcome::Timeout));
            }
        }
    }

    /// Queries older than the timeout at `now_mono_ns` become timeouts.
    pub fn expire(&mut self, now_mono_ns: u64, out: &mut Vec<DnsExchange>) {
        let timeout = self.timeout.as_nanos() as u64;
        while let Some(&(at, serial, key)) = self.ages.front() {
            let live = self.pending.get(&key).is_some_and(|p| p.serial == serial);
            if live && now_mono_ns.saturating_sub(at) < timeout {
                break;
            }
            self.ages.pop_front();
            if live && let Some(query) = self.pending.remove(&key) {
                out.push(self.finish(key, query, DnsOutcome::Timeout));
            }
        }
        // Entries answered long ago leave stale keys behind; keep the queue bounded too.
        if self.ages.len() > 2 * self.capacity {
            let pending = &self.pending;
            self.ages
                .retain(|(_, s, k)| pending.get(k).is_some_and(|p| p.serial == *s));
        }
    }

    fn evict_oldest(&mut self) -> bool {
        while let Some((_, serial, key)) = self.ages.pop_front() {
            if self.pending.get(&key).is_some_and(|p| p.serial == serial) {
                self.pending.remove(&key);
                self.counts.evicted += 1;
                return true;
            }
        }
        false
    }

    fn finish(&self, key: Key, query: Pending, outcome: DnsOutcome) -> DnsExchange {
        DnsExchange {
            seq: 0,
            time: self.clock.wall(query.mono_ns),
            process: query.process,
            side: key.side,
            transport: key.transport,
            client: key.client,
            resolver: key.resolver,
            id: key.id,
            name: query.name,
            qtype: query.qtype,
            outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::message::Answer;

    #[test]
    fn a_dns_line_reads_back_as_its_exchange() {
        let mut x = DnsExchange {
            seq: 9,
            time: SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456),
            process: Some(Process {
                pid: 7,
                comm: Comm::from_str_lossy("curl \"x\""),
            }),
            side: Side::Server,
            transport: Transport::Tcp,
            client: CLIENT.parse().unwrap(),
            resolver: RESOLVER.parse().unwrap(),
            id: 0x1234,
            name: "a\\b.lab".into(),
            qtype: "AAAA".into(),
            outcome: DnsOutcome::Answered {
                rcode: Rcode::SERVFAIL,
                latency: Duration::from_micros(1500),
                answers: vec![("fd00::7".parse().unwrap(), 0)],
            },
        };
        for outcome in [x.outcome.clone(), DnsOutcome::Timeout] {
            x.outcome = outcome;
            let json = serde_json::to_string(&DnsLine::from(&x)).unwrap();
            assert!(json.starts_with(r#"{"type":"dns","#), "{json}");
            let line: DnsLine<'_> = serde_json::from_str(&json).unwrap();
            assert_eq!(DnsExchange::try_from(line).unwrap(), x);
        }
        let bad = serde_json::to_string(&DnsLine::from(&x))
            .unwrap()
            .replace(r#""outcome":"timeout""#, r#""outcome":"answered""#);
        let line: DnsLine<'_> = serde_json::from_str(&bad).unwrap();
        assert_eq!(
            DnsExchange::try_from(line),
            Err(DnsLineError::AnsweredWithout)
        );
    }

    const CLIENT: &str = "10.0.0.1:40000";
    const RESOLVER: &str = "10.0.0.2:53";

    fn capture(direction: Direction, from: &str, to: &str, ms: u64) -> Capture<'static> {
        Capture {
            mono_ns: ms * 1_000_000,
            direction,
            transport: Transport::Udp,
            src: from.parse().unwrap(),
            dst: to.parse().unwrap(),
            process: None,
            payload: &[],
            cut: false,
            closing: false,
        }
    }

    fn message(id: u16, response: bool, rcode: Rcode) -> Message {
        Message {
            id,
            response,
            rcode,
            name: "api.lab.test".into(),
            qtype: "A".into(),
            answers: match response {
                true => vec![Answer {
                    addr: "10.0.3.7".parse().unwrap(),
                    ttl: 30,
                }],
                false => vec![],
            },
        }
    }

    fn tracker(capacity: usize) -> Tracker {
        Tracker::new(
            Duration::from_secs(5),
            capacity,
            Clock::at(SystemTime::UNIX_EPOCH),
        )
    }

    #[test]
    fn answer_matches_its_query_on_each_side() {
        let mut t = tracker(16);
        let mut out = Vec::new();
        // Both ends on this host: the client sends, the server receives, and back.
        t.observe(
            &capture(Direction::Sent, CLIENT, RESOLVER, 10),
            &message(7, false, Rcode::NOERROR),
            &mut out,
        );
        t.observe(
            &capture(Direction::Received, CLIENT, RESOLVER, 10),
            &message(7, false, Rcode::NOERROR),
            &mut out,
        );
        t.observe(
            &capture(Direction::Sent, RESOLVER, CLIENT, 12),
            &message(7, true, Rcode::SERVFAIL),
            &mut out,
        );
        t.observe(
            &capture(Direction::Received, RESOLVER, CLIENT, 13),
            &message(7, true, Rcode::SERVFAIL),
            &mut out,
        );
        assert_eq!(out.len(), 2);
        let server = &out[0];
        let client = &out[1];
        assert_eq!((server.side, client.side), (Side::Server, Side::Client));
        assert_eq!(client.ends().1, RESOLVER.parse().unwrap());
        assert_eq!(server.ends().0, RESOLVER.parse().unwrap());
        let DnsOutcome::Answered { rcode, latency, .. } = &client.outcome else {
            panic!()
        };
        assert_eq!(
            (*rcode, *latency),
            (Rcode::SERVFAIL, Duration::from_millis(3))
        );
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn silence_is_a_timeout_and_a_repeat_times_out_the_first() {
        let mut t = tracker(16);
        let mut out = Vec::new();
        t.observe(
            &capture(Direction::Sent, CLIENT, RESOLVER, 0),
            &message(1, false, Rcode::NOERROR),
            &mut out,
        );
        t.observe(
            &capture(Direction::Sent, CLIENT, RESOLVER, 1000),
            &message(1, false, Rcode::NOERROR),
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].outcome, DnsOutcome::Timeout);
        t.expire(5_999_000_000, &mut out);
        assert_eq!(out.len(), 1);
        t.expire(6_000_000_000, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].outcome, DnsOutcome::Timeout);
        // A late answer matches nothing.
        t.observe(
            &capture(Direction::Received, RESOLVER, CLIENT, 7000),
            &message(1, true, Rcode::NOERROR),
            &mut out,
        );
        assert_eq!((out.len(), t.counts.unmatched), (2, 1));
    }

    #[test]
    fn the_table_is_bounded_and_evictions_counted() {
        let mut t = tracker(4);
        let mut out = Vec::new();
        for id in 0..10 {
            t.observe(
                &capture(Direction::Sent, CLIENT, RESOLVER, u64::from(id)),
                &message(id, false, Rcode::NOERROR),
                &mut out,
            );
        }
        assert_eq!((t.pending(), t.counts.evicted), (4, 6));
        assert!(out.is_empty());
        t.expire(u64::MAX / 2, &mut out);
        assert_eq!((out.len(), t.pending()), (4, 0));
    }

    #[test]
    fn a_closing_tcp_connection_times_out_its_queries() {
        let mut t = tracker(16);
        let mut out = Vec::new();
        let mut query = capture(Direction::Sent, CLIENT, RESOLVER, 0);
        query.transport = Transport::Tcp;
        t.observe(&query, &message(5, false, Rcode::NOERROR), &mut out);
        let mut fin = capture(Direction::Received, RESOLVER, CLIENT, 50);
        fin.transport = Transport::Tcp;
        fin.closing = true;
        t.connection_closed(&fin, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].outcome, DnsOutcome::Timeout);
    }
}
