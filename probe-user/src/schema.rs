//! The JSON event log's schema: one serde type, [`LogLine`], through which every event is
//! written (the log, evidence bundles) and read back (`connprobe analyze`). One flat object per
//! event (README "The JSON event log"): `type` first, then the agent's sequence number `seq`,
//! then the fields every event has, then the kind's own. `Event` is serialised and deserialised through it, so there is no second
//! description of the format anywhere; the log writer's fast formatter is pinned to it
//! byte for byte by a test.
use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::event::{
    Close, Comm, Connect, ConnectOutcome, Conntrack, Direction, Drop, DropReason, Endpoint, Errno,
    Event, EventDetail, FailureReason, ListenOverflow, Outcome, Phase, Process, Protocol, Reset,
    ResetReason, Retransmit, Side, TcpFlags, TcpState,
};
use crate::workload::Workload;

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LogLine {
    Connect(Line<ConnectFields>),
    Retransmit(Line<RetransmitFields>),
    Reset(Line<ResetFields>),
    Close(Line<CloseFields>),
    Drop(Line<DropFields>),
    ListenOverflow(Line<ListenOverflowFields>),
    /// About a network namespace, not a connection: only the time and the figures.
    Conntrack(SampleLine<ConntrackFields>),
}

/// A line about a network namespace rather than a connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleLine<F> {
    /// As in [`Line::seq`].
    #[serde(default)]
    pub seq: u64,
    #[serde(with = "rfc3339_micros")]
    pub time: SystemTime,
    #[serde(flatten)]
    pub fields: F,
}

/// The fields every line has, then the kind's own (`fields`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Line<F> {
    /// The agent's sequence number of the event (see [`Event::seq`]); absent in logs from
    /// before it: read as 0.
    #[serde(default)]
    pub seq: u64,
    /// RFC 3339 UTC with microseconds.
    #[serde(with = "rfc3339_micros")]
    pub time: SystemTime,
    pub pid: Option<u32>,
    /// Always valid text: bytes that are not UTF-8 become U+FFFD.
    pub comm: Option<String>,
    pub side: Option<Side>,
    pub src_ip: IpAddr,
    pub src_port: u16,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    #[serde(flatten)]
    pub fields: F,
    /// The owner's cgroup v2 path; absent in logs from before workloads: read as unknown.
    #[serde(default)]
    pub cgroup: Option<String>,
    #[serde(default)]
    pub container_id: Option<String>,
    #[serde(default)]
    pub pod_uid: Option<String>,
    /// Where a DNAT on this host sent the connection; null when nothing translated it.
    #[serde(default)]
    pub backend_ip: Option<IpAddr>,
    #[serde(default)]
    pub backend_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectFields {
    pub outcome: Outcome,
    /// Set exactly when the connect failed.
    pub reason: Option<FailureReason>,
    pub errno: Option<Errno>,
    pub latency_us: Option<u64>,
    #[serde(default)]
    pub syn_retransmits: u32,
    /// The name a recent DNS answer gave for `dst_ip`; absent when none is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetransmitFields {
    /// Derived from `state`; written for readers of the log, not read back.
    pub phase: Phase,
    pub state: TcpState,
    pub segments: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResetFields {
    pub direction: Direction,
    pub state: Option<TcpState>,
    /// Absent in logs from before reset reasons: read as none.
    #[serde(default)]
    pub reset_reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloseFields {
    pub duration_ms: Option<u64>,
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub bytes_received: u64,
    #[serde(default)]
    pub segments_sent: u32,
    #[serde(default)]
    pub segments_retransmitted: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DropFields {
    pub reason: String,
    pub protocol: Protocol,
    /// `null` for UDP and for a count of data segments.
    pub tcp_flags: Option<TcpFlags>,
    pub direction: Direction,
    pub packets: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListenOverflowFields {
    pub overflows: u64,
    pub backlog: Option<u32>,
    pub queued: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConntrackFields {
    pub netns: u32,
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
}

/// A line that is valid JSON of the right shape but describes no possible event.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("a failed connect needs a reason")]
    MissingReason,
    #[error("an established connect has no reason or errno")]
    EstablishedWithReason,
    #[error("a UDP packet has no TCP flags")]
    UdpWithFlags,
}

impl Line<()> {
    fn common(event: &Event) -> Self {
        Line {
            seq: event.seq,
            time: event.time,
            pid: event.process.as_ref().map(|p| p.pid),
            comm: event
                .process
                .as_ref()
                .map(|p| p.comm.to_string_lossy().into_owned()),
            side: event.side,
            src_ip: event.src.ip(),
            src_port: event.src.port(),
            dst_ip: event.dst.ip(),
            dst_port: event.dst.port(),
            fields: (),
            cgroup: event.workload.as_ref().map(|w| w.cgroup.clone()),
            container_id: event.workload.as_ref().and_then(|w| w.container_id.clone()),
            pod_uid: event.workload.as_ref().and_then(|w| w.pod_uid.clone()),
            backend_ip: event.backend.map(|b| b.ip()),
            backend_port: event.backend.map(|b| b.port()),
        }
    }

    fn with<F>(self, fields: F) -> Line<F> {
        Line {
            seq: self.seq,
            time: self.time,
            pid: self.pid,
            comm: self.comm,
            side: self.side,
            src_ip: self.src_ip,
            src_port: self.src_port,
            dst_ip: self.dst_ip,
            dst_port: self.dst_port,
            fields,
            cgroup: self.cgroup,
            container_id: self.container_id,
            pod_uid: self.pod_uid,
            backend_ip: self.backend_ip,
            backend_port: self.backend_port,
        }
    }
}

impl From<&Event> for LogLine {
    fn from(event: &Event) -> Self {
        let line = Line::common(event);
        match &event.detail {
            EventDetail::Connect(c) => {
                let (reason, errno) = match c.outcome {
                    ConnectOutcome::Established => (None, None),
                    ConnectOutcome::Failed { reason, errno } => (Some(reason), errno),
                };
                LogLine::Connect(line.with(ConnectFields {
                    outcome: Outcome::from(c.outcome),
                    reason,
                    errno,
                    latency_us: c.latency.map(|d| d.as_micros() as u64),
                    syn_retransmits: c.syn_retransmits,
                    dst_name: c.dst_name.as_deref().map(str::to_owned),
                }))
            }
            EventDetail::Retransmit(r) => LogLine::Retransmit(line.with(RetransmitFields {
                phase: r.state.phase(),
                state: r.state,
                segments: r.segments,
            })),
            EventDetail::Reset(r) => LogLine::Reset(line.with(ResetFields {
                direction: r.direction,
                state: r.state,
                reset_reason: r.reason.as_ref().map(|r| r.as_str().to_owned()),
            })),
            EventDetail::Close(c) => LogLine::Close(line.with(CloseFields {
                duration_ms: c.duration.map(|d| d.as_millis() as u64),
                bytes_sent: c.bytes_sent,
                bytes_received: c.bytes_received,
                segments_sent: c.segments_sent,
                segments_retransmitted: c.segments_retransmitted,
            })),
            EventDetail::Drop(d) => LogLine::Drop(line.with(DropFields {
                reason: d.reason.as_str().to_owned(),
                protocol: d.protocol,
                tcp_flags: d.tcp_flags,
                direction: d.direction,
                packets: d.packets,
            })),
            EventDetail::ListenOverflow(o) => {
                LogLine::ListenOverflow(line.with(ListenOverflowFields {
                    overflows: o.overflows,
                    backlog: o.backlog,
                    queued: o.queued,
                }))
            }
            EventDetail::Conntrack(c) => LogLine::Conntrack(SampleLine {
                seq: event.seq,
                time: event.time,
                fields: ConntrackFields {
                    netns: c.netns,
                    insert_failed: c.insert_failed,
                    drop: c.drop,
                    early_drop: c.early_drop,
                },
            }),
        }
    }
}

impl<F> Line<F> {
    fn event(self, detail: EventDetail) -> Event {
        Event {
            seq: self.seq,
            time: self.time,
            process: self.pid.map(|pid| Process {
                pid,
                comm: Comm::from_str_lossy(self.comm.as_deref().unwrap_or("")),
            }),
            side: self.side,
            src: Endpoint::new(self.src_ip, self.src_port),
            dst: Endpoint::new(self.dst_ip, self.dst_port),
            detail,
            workload: self.cgroup.map(|cgroup| {
                Arc::new(Workload {
                    cgroup,
                    container_id: self.container_id,
                    pod_uid: self.pod_uid,
                })
            }),
            backend: self
                .backend_ip
                .zip(self.backend_port)
                .map(|(ip, port)| Endpoint::new(ip, port)),
        }
    }
}

impl TryFrom<LogLine> for Event {
    type Error = SchemaError;

    fn try_from(line: LogLine) -> Result<Self, SchemaError> {
        Ok(match line {
            LogLine::Connect(l) => {
                let f = &l.fields;
                let outcome = match (f.outcome, f.reason) {
                    (Outcome::Established, None) if f.errno.is_none() => {
                        ConnectOutcome::Established
                    }
                    (Outcome::Established, _) => return Err(SchemaError::EstablishedWithReason),
                    (Outcome::Failed, Some(reason)) => ConnectOutcome::Failed {
                        reason,
                        errno: f.errno,
                    },
                    (Outcome::Failed, None) => return Err(SchemaError::MissingReason),
                };
                let detail = EventDetail::Connect(Connect {
                    outcome,
                    latency: f.latency_us.map(Duration::from_micros),
                    syn_retransmits: f.syn_retransmits,
                    dst_name: f.dst_name.as_deref().map(Into::into),
                });
                l.event(detail)
            }
            LogLine::Retransmit(l) => {
                let detail = EventDetail::Retransmit(Retransmit {
                    state: l.fields.state,
                    segments: l.fields.segments,
                });
                l.event(detail)
            }
            LogLine::Reset(l) => {
                let detail = EventDetail::Reset(Reset {
                    direction: l.fields.direction,
                    state: l.fields.state,
                    reason: l.fields.reset_reason.as_deref().map(ResetReason::new),
                });
                l.event(detail)
            }
            LogLine::Close(l) => {
                let f = &l.fields;
                let detail = EventDetail::Close(Close {
                    duration: f.duration_ms.map(Duration::from_millis),
                    bytes_sent: f.bytes_sent,
                    bytes_received: f.bytes_received,
                    segments_sent: f.segments_sent,
                    segments_retransmitted: f.segments_retransmitted,
                });
                l.event(detail)
            }
            LogLine::Drop(l) => {
                let f = &l.fields;
                if f.protocol == Protocol::Udp && f.tcp_flags.is_some() {
                    return Err(SchemaError::UdpWithFlags);
                }
                let detail = EventDetail::Drop(Drop {
                    reason: DropReason::new(&f.reason),
                    protocol: f.protocol,
                    tcp_flags: f.tcp_flags,
                    direction: f.direction,
                    packets: f.packets,
                });
                l.event(detail)
            }
            LogLine::ListenOverflow(l) => {
                let f = &l.fields;
                let detail = EventDetail::ListenOverflow(ListenOverflow {
                    overflows: f.overflows,
                    backlog: f.backlog,
                    queued: f.queued,
                });
                l.event(detail)
            }
            LogLine::Conntrack(l) => {
                let f = l.fields;
                let mut event = Event::namespace_sample(
                    l.time,
                    EventDetail::Conntrack(Conntrack {
                        netns: f.netns,
                        insert_failed: f.insert_failed,
                        drop: f.drop,
                        early_drop: f.early_drop,
                    }),
                );
                event.seq = l.seq;
                event
            }
        })
    }
}

/// An event is written and read as its log line.
impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        LogLine::from(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Event::try_from(LogLine::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Times as RFC 3339 UTC with microseconds (`2026-11-30T05:15:03.568555Z`).
pub(crate) mod rfc3339_micros {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(*time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text)
            .map_err(|e| serde::de::Error::custom(format_args!("bad time {text:?}: {e}")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::testing::{self, reset};

    /// One event of every kind and shape the log can hold: established and failed connects (with
    /// and without errno and latency), retransmits in several phases, resets sent and received
    /// (socketless, with a reason), closes, unknown owners and sides, IPv6, odd process names.
    pub(crate) fn every_shape() -> Vec<Event> {
        let t = SystemTime::UNIX_EPOCH
            + Duration::from_secs(1_795_000_000)
            + Duration::from_micros(123_456);
        let mut named = testing::established(87);
        if let EventDetail::Connect(c) = &mut named {
            c.dst_name = Some("api.lab.test".into());
        }
        let mut events = vec![
            testing::client("10.200.0.2:8081", t, testing::established(87)),
            testing::client("10.200.0.2:8081", t, named),
            testing::client(
                "10.200.0.2:8081",
                t,
                testing::failed(FailureReason::Refused, 0),
            ),
            testing::client(
                "10.200.0.2:8081",
                t,
                testing::failed(FailureReason::Cancelled, 2),
            ),
            testing::client(
                "10.200.0.2:8081",
                t,
                testing::failed(FailureReason::Other, 1),
            ),
            testing::client(
                "10.200.0.2:8083",
                t,
                testing::retransmitted(TcpState::Established, 7),
            ),
            testing::client(
                "10.200.0.2:8083",
                t,
                testing::retransmitted(TcpState::SynSent, 1),
            ),
            testing::client(
                "10.200.0.2:8083",
                t,
                testing::retransmitted(TcpState::FinWait1, 2),
            ),
            testing::client(
                "10.200.0.2:8081",
                t,
                reset(Direction::Received, Some(TcpState::SynSent), None),
            ),
            testing::event(
                Some(Side::Server),
                "10.0.0.1:1",
                "10.0.0.2:55500",
                t,
                reset(Direction::Sent, None, Some("NO_SOCKET")),
            ),
            testing::client("10.200.0.2:8083", t, testing::closed(900, 12)),
            testing::accepted("[fd00:200:61::1]:443", t),
        ];
        events.extend([
            testing::dropped(
                "10.200.0.2:8082",
                40001,
                t,
                "NETFILTER_DROP",
                0x02,
                Direction::Sent,
            ),
            testing::dropped(
                "[fd00:200:61::2]:8082",
                40002,
                t,
                "NO_SOCKET",
                0x12,
                Direction::Received,
            ),
            testing::data_dropped("10.200.0.2:8083", t, "TCP_OFO_DROP", 17),
            testing::overflowed("10.200.0.2:8088", t, 6, Some(1)),
            testing::overflowed("0.0.0.0:8089", t, 1, None),
            testing::conntrack(t, 2, 3),
        ]);
        let mut dns = testing::dropped(
            "10.0.0.53:53",
            5353,
            t,
            "SOCKET_RCVBUFF",
            0,
            Direction::Received,
        );
        if let EventDetail::Drop(d) = &mut dns.detail {
            d.protocol = Protocol::Udp;
            d.tcp_flags = None;
        }
        dns.process = None;
        events.push(dns);
        let mut unknown = testing::client(
            "[2001:db8::a:0:0:1]:8080",
            t,
            reset(Direction::Sent, None, None),
        );
        unknown.process = None;
        unknown.side = None;
        events.push(unknown);
        let mut pod = testing::client(
            "10.96.0.10:80",
            t,
            testing::failed(FailureReason::Refused, 0),
        );
        pod.workload = Some(Arc::new(Workload::from_cgroup(
            "/kubepods.slice/kubepods-besteffort.slice/\
             kubepods-besteffort-pod5a1c3e7b_2f4d_4b8a_9c6e_1d2f3a4b5c6d.slice/\
             cri-containerd-3f4e1a2b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f.scope",
        )));
        pod.backend = Some("10.1.4.7:8080".parse().unwrap());
        events.push(pod);
        let mut host = testing::client("10.1.1.1:80", t, testing::closed(1, 0));
        host.workload = Some(Arc::new(Workload::from_cgroup(
            "/system.slice/nginx.service",
        )));
        events.push(host);
        let mut no_latency = testing::client("10.1.1.1:80", t, testing::established(1));
        if let EventDetail::Connect(c) = &mut no_latency.detail {
            c.latency = None;
        }
        events.push(no_latency);
        let mut big = testing::close("10.1.1.1:80", t, 1, 0);
        if let EventDetail::Close(c) = &mut big.detail {
            c.bytes_sent = 1 << 33;
            c.duration = None;
        }
        events.push(big);
        let mut last = testing::client("10.1.1.1:80", t, testing::established(2));
        last.seq = u64::MAX;
        events.push(last);
        for raw in [
            &b"plain"[..],
            b"with space",
            b"q\"uote",
            b"back\\slash",
            b"\x00\x01\x08\x0c\x1f\x7f",
            b"tab\tnl\ncr\r",
            b"\xc3\xa9t\xc3\xa9",
            b"\xff\xfe",
        ] {
            let mut bytes = [0u8; 16];
            bytes[..raw.len()].copy_from_slice(raw);
            let mut e = testing::client("10.1.1.1:80", t, testing::established(5));
            e.process = Some(Process {
                pid: 7,
                comm: Comm::from_kernel(&bytes),
            });
            events.push(e);
        }
        for (seq, event) in events.iter_mut().enumerate() {
            if event.seq == 0 {
                event.seq = seq as u64;
            }
        }
        events
    }

    #[test]
    fn every_shape_round_trips() {
        for event in every_shape() {
            let text = serde_json::to_string(&event).unwrap();
            let back: Event = serde_json::from_str(&text).unwrap();
            // Names are kept as text: a name with invalid UTF-8 comes back with U+FFFD.
            let mut expected = event.clone();
            if let Some(p) = &mut expected.process {
                p.comm = Comm::from_str_lossy(&p.comm.to_string_lossy());
            }
            assert_eq!(back, expected, "{text}");
        }
    }

    #[test]
    fn impossible_connects_are_errors() {
        let base = r#""time":"2026-01-01T00:00:00Z","pid":null,"comm":null,"side":"client","src_ip":"1.2.3.4","src_port":1,"dst_ip":"1.2.3.5","dst_port":2,"latency_us":null,"syn_retransmits":0"#;
        let failed =
            format!(r#"{{"type":"connect",{base},"outcome":"failed","reason":null,"errno":null}}"#);
        assert!(
            serde_json::from_str::<Event>(&failed)
                .unwrap_err()
                .to_string()
                .contains("needs a reason")
        );
        let odd = format!(
            r#"{{"type":"connect",{base},"outcome":"established","reason":"refused","errno":null}}"#
        );
        assert!(serde_json::from_str::<Event>(&odd).is_err());
        let unknown =
            format!(r#"{{"type":"connect",{base},"outcome":"maybe","reason":null,"errno":null}}"#);
        assert!(serde_json::from_str::<Event>(&unknown).is_err());
        let udp_with_flags = format!(
            r#"{{"type":"drop",{base},"reason":"NO_SOCKET","protocol":"udp","tcp_flags":"SYN","direction":"sent","packets":1}}"#
        );
        assert!(serde_json::from_str::<Event>(&udp_with_flags).is_err());
    }

    #[test]
    fn a_conntrack_line_has_no_connection_fields() {
        let event = testing::conntrack(SystemTime::UNIX_EPOCH, 2, 3);
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            r#"{"type":"conntrack","seq":0,"time":"1970-01-01T00:00:00.000000Z","netns":1,"insert_failed":2,"drop":3,"early_drop":0}"#
        );
    }
}
