//! The JSON event log: one flat object per line (NDJSON), and the parser that reads it back for
//! `connprobe analyze`.
use std::{
    fs::OpenOptions,
    io::{self, Write},
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError, SyncSender},
    },
    thread,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;

use serde::{Deserialize, Serialize, Serializer, ser::SerializeMap};

use crate::event::{
    Close, Comm, Connect, Direction, Errno, Event, EventDetail, EventType, FailureReason, Outcome,
    Process, Reset, Retransmit, Side, TcpState, canonical_ip,
};
use crate::export::prometheus::{LossStage, Metrics};

/// Events waiting for the writer; past this the newest are dropped and counted (stage queue).
pub const QUEUE: usize = 65_536;
/// The writer flushes whenever no event came for this long.
const IDLE_FLUSH: Duration = Duration::from_millis(200);

/// Opens the log (`-` is standard output) before anything is loaded, so a bad path fails at
/// once. Files are appended to.
pub fn open(path: &Path) -> anyhow::Result<Box<dyn Write + Send>> {
    if path == Path::new("-") {
        return Ok(Box::new(io::stdout()));
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot write the JSON log to {}", path.display()))?;
    Ok(Box::new(file))
}

/// Writes queued events as JSON lines on a thread of its own, so a slow disk never stalls the
/// ring buffer reader. Flushes whenever the queue runs dry for a moment, and at the end, when
/// every sender is gone. Write errors count every event they cost (stage log).
pub fn spawn_writer(
    out: Box<dyn Write + Send>,
    metrics: Arc<Metrics>,
) -> io::Result<(SyncSender<Event>, thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::sync_channel::<Event>(QUEUE);
    let handle = thread::Builder::new()
        .name("connprobe-log".into())
        .spawn(move || {
            let mut out = io::BufWriter::with_capacity(256 * 1024, out);
            let mut failing = false;
            let report = |e: io::Error, failing: &mut bool| {
                if !*failing {
                    tracing::error!(
                        "writing the JSON log failed: {e}; events are counted as lost (stage log)"
                    );
                    *failing = true;
                }
            };
            loop {
                match rx.recv_timeout(IDLE_FLUSH) {
                    Ok(event) => {
                        if let Err(e) = write_line(&mut out, &event) {
                            metrics.add_lost(LossStage::Log, 1);
                            report(e, &mut failing);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(e) = out.flush() {
                            report(e, &mut failing);
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            if let Err(e) = out.flush() {
                report(e, &mut failing);
            }
        })?;
    Ok((tx, handle))
}

/// Writes one event as a JSON line.
pub fn write_line<W: Write>(out: &mut W, event: &Event) -> io::Result<()> {
    serde_json::to_writer(&mut *out, event).map_err(io::Error::other)?;
    out.write_all(b"\n")
}

/// RFC 3339 UTC with microseconds, e.g. `2026-11-30T05:01:02.123456Z`.
pub fn format_time(time: SystemTime) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_micros(time)
}

/// Serializes a `Display` value as a JSON string without an intermediate `String`.
struct Displayed<T>(T);

impl<T: std::fmt::Display> Serialize for Displayed<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", self.kind().as_str())?;
        map.serialize_entry("time", &Displayed(format_time(self.time)))?;
        match &self.process {
            Some(p) => {
                map.serialize_entry("pid", &p.pid)?;
                map.serialize_entry("comm", &p.comm.to_string_lossy())?;
            }
            None => {
                map.serialize_entry("pid", &None::<u32>)?;
                map.serialize_entry("comm", &None::<&str>)?;
            }
        }
        map.serialize_entry("side", &self.side.map(Side::as_str))?;
        map.serialize_entry("src_ip", &canonical_ip(self.src.ip()))?;
        map.serialize_entry("src_port", &self.src.port())?;
        map.serialize_entry("dst_ip", &canonical_ip(self.dst.ip()))?;
        map.serialize_entry("dst_port", &self.dst.port())?;
        match &self.detail {
            EventDetail::Connect(c) => {
                map.serialize_entry("outcome", c.outcome.as_str())?;
                map.serialize_entry("reason", &c.reason.map(FailureReason::as_str))?;
                map.serialize_entry("errno", &c.errno.map(Errno::name))?;
                map.serialize_entry("latency_us", &c.latency.map(|d| d.as_micros() as u64))?;
                map.serialize_entry("syn_retransmits", &c.syn_retransmits)?;
            }
            EventDetail::Retransmit(r) => {
                map.serialize_entry("phase", &r.state.phase().as_str())?;
                map.serialize_entry("state", r.state.name())?;
                map.serialize_entry("segments", &r.segments)?;
            }
            EventDetail::Reset(r) => {
                map.serialize_entry("direction", r.direction.as_str())?;
                map.serialize_entry("state", &r.state.map(TcpState::name))?;
            }
            EventDetail::Close(c) => {
                map.serialize_entry("duration_ms", &c.duration.map(|d| d.as_millis() as u64))?;
                map.serialize_entry("bytes_sent", &c.bytes_sent)?;
                map.serialize_entry("bytes_received", &c.bytes_received)?;
                map.serialize_entry("segments_sent", &c.segments_sent)?;
                map.serialize_entry("segments_retransmitted", &c.segments_retransmitted)?;
            }
        }
        map.end()
    }
}

/// One line as it stands in the log; every field but `type` and `time` may be missing or null.
#[derive(Deserialize)]
struct Line {
    #[serde(rename = "type")]
    kind: String,
    time: String,
    pid: Option<u32>,
    comm: Option<String>,
    side: Option<String>,
    src_ip: IpAddr,
    src_port: u16,
    dst_ip: IpAddr,
    dst_port: u16,
    outcome: Option<String>,
    reason: Option<String>,
    errno: Option<String>,
    latency_us: Option<u64>,
    syn_retransmits: Option<u32>,
    state: Option<String>,
    segments: Option<u32>,
    direction: Option<String>,
    duration_ms: Option<u64>,
    bytes_sent: Option<u64>,
    bytes_received: Option<u64>,
    segments_sent: Option<u32>,
    segments_retransmitted: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, or not the shape of an event (the message names the field).
    #[error("{0}")]
    Json(serde_json::Error),
    #[error("bad time {0:?}: {1}")]
    Time(String, humantime::TimestampError),
    #[error("unknown event type {0:?}")]
    Type(String),
    #[error("field {0} is missing or has an unknown value")]
    Field(&'static str),
}

/// Parses one line of the log.
pub fn parse_line(line: &str) -> Result<Event, ParseError> {
    let l: Line = serde_json::from_str(line).map_err(ParseError::Json)?;
    let time =
        humantime::parse_rfc3339(&l.time).map_err(|e| ParseError::Time(l.time.clone(), e))?;
    let kind = EventType::parse(&l.kind).ok_or_else(|| ParseError::Type(l.kind.clone()))?;
    let detail = match kind {
        EventType::Connect => EventDetail::Connect(Connect {
            outcome: l
                .outcome
                .as_deref()
                .and_then(Outcome::parse)
                .ok_or(ParseError::Field("outcome"))?,
            reason: match l.reason.as_deref() {
                None => None,
                Some(r) => Some(FailureReason::parse(r).ok_or(ParseError::Field("reason"))?),
            },
            errno: match l.errno.as_deref() {
                None => None,
                Some(e) => Some(Errno::parse(e).ok_or(ParseError::Field("errno"))?),
            },
            latency: l.latency_us.map(Duration::from_micros),
            syn_retransmits: l.syn_retransmits.unwrap_or(0),
        }),
        EventType::Retransmit => EventDetail::Retransmit(Retransmit {
            state: l
                .state
                .as_deref()
                .and_then(TcpState::parse)
                .ok_or(ParseError::Field("state"))?,
            segments: l.segments.ok_or(ParseError::Field("segments"))?,
        }),
        EventType::Reset => EventDetail::Reset(Reset {
            direction: l
                .direction
                .as_deref()
                .and_then(Direction::parse)
                .ok_or(ParseError::Field("direction"))?,
            state: match l.state.as_deref() {
                None => None,
                Some(s) => Some(TcpState::parse(s).ok_or(ParseError::Field("state"))?),
            },
        }),
        EventType::Close => EventDetail::Close(Close {
            duration: l.duration_ms.map(Duration::from_millis),
            bytes_sent: l.bytes_sent.unwrap_or(0),
            bytes_received: l.bytes_received.unwrap_or(0),
            segments_sent: l.segments_sent.unwrap_or(0),
            segments_retransmitted: l.segments_retransmitted.unwrap_or(0),
        }),
    };
    Ok(Event {
        time,
        process: l.pid.map(|pid| Process {
            pid,
            comm: Comm::from_str_lossy(l.comm.as_deref().unwrap_or("")),
        }),
        side: l.side.as_deref().and_then(Side::parse),
        src: SocketAddr::new(l.src_ip, l.src_port),
        dst: SocketAddr::new(l.dst_ip, l.dst_port),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, micros: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
    }

    fn sample(detail: EventDetail) -> Event {
        Event {
            time: at(1_795_000_000, 123_456),
            process: Some(Process {
                pid: 4242,
                comm: Comm::from_str_lossy("curl"),
            }),
            side: Some(Side::Client),
            src: "10.200.0.1:40000".parse().unwrap(),
            dst: "10.200.0.2:8081".parse().unwrap(),
            detail,
        }
    }

    fn line(event: &Event) -> String {
        let mut out = Vec::new();
        write_line(&mut out, event).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn connect_line_has_the_documented_fields() {
        let event = sample(EventDetail::Connect(Connect {
            outcome: Outcome::Failed,
            reason: Some(FailureReason::Refused),
            errno: Some(Errno(111)),
            latency: Some(Duration::from_micros(153)),
            syn_retransmits: 0,
        }));
        assert_eq!(
            line(&event),
            concat!(
                r#"{"type":"connect","time":"2026-11-18T11:06:40.123456Z","pid":4242,"comm":"curl","#,
                r#""side":"client","src_ip":"10.200.0.1","src_port":40000,"dst_ip":"10.200.0.2","#,
                r#""dst_port":8081,"outcome":"failed","reason":"refused","errno":"ECONNREFUSED","#,
                r#""latency_us":153,"syn_retransmits":0}"#,
                "\n"
            )
        );
    }

    #[test]
    fn every_kind_round_trips() {
        let events = [
            sample(EventDetail::Connect(Connect {
                outcome: Outcome::Established,
                reason: None,
                errno: None,
                latency: Some(Duration::from_micros(87)),
                syn_retransmits: 1,
            })),
            sample(EventDetail::Retransmit(Retransmit {
                state: TcpState::ESTABLISHED,
                segments: 7,
            })),
            sample(EventDetail::Reset(Reset {
                direction: Direction::Received,
                state: Some(TcpState::SYN_SENT),
            })),
            sample(EventDetail::Reset(Reset {
                direction: Direction::Sent,
                state: None,
            })),
            sample(EventDetail::Close(Close {
                duration: Some(Duration::from_millis(1500)),
                bytes_sent: 1 << 33,
                bytes_received: 17,
                segments_sent: 900,
                segments_retransmitted: 12,
            })),
        ];
        for event in events {
            let text = line(&event);
            let back = parse_line(text.trim_end()).unwrap();
            assert_eq!(back, event, "{text}");
        }
    }

    #[test]
    fn unknown_owner_and_side_are_null() {
        let mut event = sample(EventDetail::Reset(Reset {
            direction: Direction::Sent,
            state: None,
        }));
        event.process = None;
        event.side = None;
        let v: serde_json::Value = serde_json::from_str(&line(&event)).unwrap();
        assert!(v["pid"].is_null() && v["comm"].is_null() && v["side"].is_null());
        assert!(v["state"].is_null());
        assert_eq!(v["direction"], "sent");
    }

    #[test]
    fn any_comm_bytes_give_valid_json() {
        let mut raw = [0u8; 16];
        raw[..6].copy_from_slice(b"\"\\\x01\xff\n\t");
        let mut event = sample(EventDetail::Reset(Reset {
            direction: Direction::Sent,
            state: None,
        }));
        event.process = Some(Process {
            pid: 1,
            comm: Comm::from_kernel(&raw),
        });
        let text = line(&event);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["comm"], "\"\\\u{1}\u{fffd}\n\t");
    }

    #[test]
    fn ipv4_mapped_addresses_are_written_as_ipv4() {
        let mut event = sample(EventDetail::Reset(Reset {
            direction: Direction::Sent,
            state: None,
        }));
        event.dst = "[::ffff:10.0.0.9]:80".parse().unwrap();
        let v: serde_json::Value = serde_json::from_str(&line(&event)).unwrap();
        assert_eq!(v["dst_ip"], "10.0.0.9");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_line("").is_err());
        assert!(parse_line("{}").is_err());
        assert!(parse_line(r#"{"type":"nope","time":"2026-01-01T00:00:00Z","src_ip":"1.2.3.4","src_port":1,"dst_ip":"1.2.3.4","dst_port":2}"#).is_err());
    }
}
