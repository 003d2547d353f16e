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

use serde::Deserialize;

use crate::event::{
    Close, Comm, Connect, Direction, Errno, Event, EventDetail, EventType, FailureReason, Outcome,
    Process, Reset, ResetReason, Retransmit, Side, TcpState, canonical_ip,
};
use crate::export::prometheus::{LossStage, Metrics};

/// Batches waiting for the writer (each up to the reader's batch size); past this, the newest
/// batch is dropped and its events counted (stage queue).
pub const QUEUE_BATCHES: usize = 64;
/// The writer writes out and flushes whenever no batch came for this long, and at least this
/// often while batches keep coming.
const IDLE_FLUSH: Duration = Duration::from_millis(200);

/// Bytes of lines gathered before one write to the log.
const WRITE_CHUNK: usize = 256 * 1024;

/// The log writer thread's state: lines are formatted straight into the chunk that is written,
/// so each byte is copied once on its way to the kernel.
struct LogWriter {
    out: Box<dyn Write + Send>,
    formatter: LineFormatter,
    /// Events whose lines are in the formatter's buffer.
    pending: u64,
    /// When the buffer was last written out: lines never wait much longer than [`IDLE_FLUSH`].
    last_write: std::time::Instant,
    metrics: Arc<Metrics>,
    failing: bool,
}

impl LogWriter {
    fn new(out: Box<dyn Write + Send>, metrics: Arc<Metrics>) -> Self {
        LogWriter {
            out,
            formatter: LineFormatter::new(),
            pending: 0,
            last_write: std::time::Instant::now(),
            metrics,
            failing: false,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Vec<Event>>) {
        loop {
            match rx.recv_timeout(IDLE_FLUSH) {
                Ok(batch) => {
                    for event in &batch {
                        self.formatter.push(event);
                        self.pending += 1;
                        if self.formatter.buffered().len() >= WRITE_CHUNK {
                            self.write_out(false);
                        }
                    }
                    if self.last_write.elapsed() >= IDLE_FLUSH {
                        self.write_out(true);
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.write_out(true),
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.write_out(true);
    }

    /// Writes the gathered lines; on failure their events are counted lost (stage log).
    fn write_out(&mut self, flush: bool) {
        let mut result = self.out.write_all(self.formatter.buffered());
        if flush && result.is_ok() {
            result = self.out.flush();
        }
        match result {
            Ok(()) => self.failing = false,
            Err(e) => {
                self.metrics.add_lost(LossStage::Log, self.pending);
                if !self.failing {
                    tracing::error!(
                        "writing the JSON log failed: {e}; events are counted as lost (stage log)"
                    );
                    self.failing = true;
                }
            }
        }
        self.formatter.clear();
        self.pending = 0;
        self.last_write = std::time::Instant::now();
    }
}

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

/// Writes queued batches of events as JSON lines on a thread of its own, so a slow disk never
/// stalls the ring buffer reader. One wakeup per batch, not per event. Flushes whenever the
/// queue runs dry for a moment, and at the end, when every sender is gone. Write errors count
/// every event they cost (stage log).
pub fn spawn_writer(
    out: Box<dyn Write + Send>,
    metrics: Arc<Metrics>,
) -> io::Result<(SyncSender<Vec<Event>>, thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::sync_channel::<Vec<Event>>(QUEUE_BATCHES);
    let handle = thread::Builder::new()
        .name("connprobe-log".into())
        .spawn(move || {
            crate::privileges::drop_in_this_thread();
            LogWriter::new(out, metrics).run(rx)
        })?;
    Ok((tx, handle))
}

/// Writes one event as a JSON line. For many lines, keep a [`LineFormatter`] instead.
pub fn write_line<W: Write>(out: &mut W, event: &Event) -> io::Result<()> {
    out.write_all(LineFormatter::new().format(event))
}

/// The event as a JSON value, exactly as the log writes it (for documents that embed events,
/// like evidence bundles; not for the hot path).
pub fn to_value(event: &Event) -> serde_json::Value {
    serde_json::from_slice(LineFormatter::new().format(event))
        .expect("the line formatter writes valid JSON")
}

/// Formats events as JSON lines into a reused buffer: keys are constant bytes, numbers go
/// through `itoa`, plain ASCII strings are copied without escaping, and the date and time of
/// day are formatted once per second. This is the agent's hottest code after the kernel's: serde
/// spent most of its time escaping keys that never need it.
pub struct LineFormatter {
    line: Vec<u8>,
    numbers: itoa::Buffer,
    /// `YYYY-MM-DDTHH:MM:SS` of `second`.
    second_text: [u8; 19],
    second: Option<u64>,
}

impl Default for LineFormatter {
    fn default() -> Self {
        Self::new()
    }
}

impl LineFormatter {
    pub fn new() -> Self {
        LineFormatter {
            line: Vec::with_capacity(512),
            numbers: itoa::Buffer::new(),
            second_text: [0; 19],
            second: None,
        }
    }

    /// The event as one JSON object and a newline.
    pub fn format(&mut self, event: &Event) -> &[u8] {
        self.line.clear();
        self.push(event);
        &self.line
    }

    /// Appends the event's line to what the buffer holds (see [`Self::buffered`]).
    pub fn push(&mut self, event: &Event) {
        self.raw(b"{\"type\":\"");
        self.raw(event.kind().as_str().as_bytes());
        self.raw(b"\",\"time\":\"");
        self.time(event.time);
        self.raw(b"\",\"pid\":");
        match &event.process {
            Some(p) => {
                self.number(p.pid);
                self.raw(b",\"comm\":");
                self.string(&p.comm.to_string_lossy());
            }
            None => self.raw(b"null,\"comm\":null"),
        }
        self.raw(b",\"side\":");
        self.option_str(event.side.map(Side::as_str));
        self.raw(b",\"src_ip\":\"");
        self.ip(event.src.ip());
        self.raw(b"\",\"src_port\":");
        self.number(event.src.port());
        self.raw(b",\"dst_ip\":\"");
        self.ip(event.dst.ip());
        self.raw(b"\",\"dst_port\":");
        self.number(event.dst.port());
        match &event.detail {
            EventDetail::Connect(c) => {
                self.raw(b",\"outcome\":\"");
                self.raw(c.outcome.as_str().as_bytes());
                self.raw(b"\",\"reason\":");
                self.option_str(c.reason.map(FailureReason::as_str));
                self.raw(b",\"errno\":");
                self.option_str(c.errno.map(Errno::name).as_deref());
                self.raw(b",\"latency_us\":");
                self.option_number(c.latency.map(|d| d.as_micros() as u64));
                self.raw(b",\"syn_retransmits\":");
                self.number(c.syn_retransmits);
            }
            EventDetail::Retransmit(r) => {
                self.raw(b",\"phase\":\"");
                self.raw(r.state.phase().as_str().as_bytes());
                self.raw(b"\",\"state\":\"");
                self.raw(r.state.name().as_bytes());
                self.raw(b"\",\"segments\":");
                self.number(r.segments);
            }
            EventDetail::Reset(r) => {
                self.raw(b",\"direction\":\"");
                self.raw(r.direction.as_str().as_bytes());
                self.raw(b"\",\"state\":");
                self.option_str(r.state.map(TcpState::name));
                self.raw(b",\"reset_reason\":");
                self.option_str(r.reason.as_ref().map(ResetReason::as_str));
            }
            EventDetail::Close(c) => {
                self.raw(b",\"duration_ms\":");
                self.option_number(c.duration.map(|d| d.as_millis() as u64));
                self.raw(b",\"bytes_sent\":");
                self.number(c.bytes_sent);
                self.raw(b",\"bytes_received\":");
                self.number(c.bytes_received);
                self.raw(b",\"segments_sent\":");
                self.number(c.segments_sent);
                self.raw(b",\"segments_retransmitted\":");
                self.number(c.segments_retransmitted);
            }
        }
        self.raw(b"}\n");
    }

    /// The lines pushed since the last [`Self::clear`].
    pub fn buffered(&self) -> &[u8] {
        &self.line
    }

    pub fn clear(&mut self) {
        self.line.clear();
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.line.extend_from_slice(bytes);
    }

    fn number(&mut self, n: impl itoa::Integer) {
        let text = self.numbers.format(n);
        self.line.extend_from_slice(text.as_bytes());
    }

    fn option_number(&mut self, n: Option<u64>) {
        match n {
            Some(n) => self.number(n),
            None => self.raw(b"null"),
        }
    }

    fn option_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.string(s),
            None => self.raw(b"null"),
        }
    }

    /// A JSON string: copied as is when it is plain printable ASCII, escaped otherwise.
    fn string(&mut self, s: &str) {
        self.line.push(b'"');
        let plain = s
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
        if plain {
            self.line.extend_from_slice(s.as_bytes());
        } else {
            for c in s.chars() {
                match c {
                    '"' => self.raw(b"\\\""),
                    '\\' => self.raw(b"\\\\"),
                    '\n' => self.raw(b"\\n"),
                    '\r' => self.raw(b"\\r"),
                    '\t' => self.raw(b"\\t"),
                    c if (c as u32) < 0x20 || c == '\u{7f}' => {
                        let _ = write!(self.line, "\\u{:04x}", c as u32);
                    }
                    c => {
                        let mut utf8 = [0u8; 4];
                        self.raw(c.encode_utf8(&mut utf8).as_bytes());
                    }
                }
            }
        }
        self.line.push(b'"');
    }

    fn ip(&mut self, ip: IpAddr) {
        match canonical_ip(ip) {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.line.push(b'.');
                    }
                    self.number(octet);
                }
            }
            IpAddr::V6(v6) => {
                let _ = write!(self.line, "{v6}");
            }
        }
    }

    /// `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` in UTC; times before 1970 are written as 1970.
    fn time(&mut self, time: SystemTime) {
        let since = time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        if self.second != Some(secs) {
            self.second_text = civil_time(secs);
            self.second = Some(secs);
        }
        let text = self.second_text;
        self.raw(&text);
        let mut digits = *b".000000Z";
        let mut rest = since.subsec_micros();
        for slot in digits[1..7].iter_mut().rev() {
            *slot = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        self.raw(&digits);
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time (days to civil date: Howard Hinnant's algorithm).
fn civil_time(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let of_day = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut value: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year.clamp(0, 9999) as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, of_day / 3_600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    out
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
    reset_reason: Option<String>,
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
            reason: l.reset_reason.as_deref().map(ResetReason::new),
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
                reason: None,
            })),
            sample(EventDetail::Reset(Reset {
                direction: Direction::Sent,
                state: None,
                reason: Some(ResetReason::new("NO_SOCKET")),
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
            reason: None,
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
            reason: None,
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
            reason: None,
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

    #[test]
    fn timestamps_match_humantime_across_dates() {
        let mut formatter = LineFormatter::new();
        // Leap days, year ends, the epoch, far future; and a walk of odd steps between them.
        let mut secs: Vec<u64> = vec![0, 951_782_400, 951_868_799, 1_709_164_800, 4_102_444_799];
        let mut t = 0u64;
        while t < 4_000_000_000 {
            secs.push(t);
            t += 7_654_321;
        }
        for s in secs {
            for micros in [0u64, 1, 999_999, 123_456] {
                let time =
                    SystemTime::UNIX_EPOCH + Duration::from_secs(s) + Duration::from_micros(micros);
                let mut event = sample(EventDetail::Reset(Reset {
                    direction: Direction::Sent,
                    state: None,
                    reason: None,
                }));
                event.time = time;
                let v: serde_json::Value =
                    serde_json::from_slice(formatter.format(&event)).unwrap();
                assert_eq!(
                    v["time"],
                    humantime::format_rfc3339_micros(time).to_string(),
                    "{s}.{micros}"
                );
            }
        }
    }

    #[test]
    fn strings_escape_like_serde_json() {
        let mut formatter = LineFormatter::new();
        for raw in [
            &b"plain"[..],
            b"with space",
            b"q\"uote",
            b"back\\slash",
            b"\x00\x01\x1f\x7f",
            b"tab\tnl\ncr\r",
            b"\xc3\xa9t\xc3\xa9",
            b"\xff\xfe",
        ] {
            let mut bytes = [0u8; 16];
            bytes[..raw.len()].copy_from_slice(raw);
            let comm = Comm::from_kernel(&bytes);
            let mut event = sample(EventDetail::Reset(Reset {
                direction: Direction::Sent,
                state: None,
                reason: None,
            }));
            event.process = Some(Process { pid: 7, comm });
            let v: serde_json::Value = serde_json::from_slice(formatter.format(&event))
                .unwrap_or_else(|e| panic!("{raw:?}: {e}"));
            assert_eq!(v["comm"], comm.to_string_lossy().as_ref(), "{raw:?}");
        }
    }

    #[test]
    fn ipv6_addresses_are_written_in_canonical_form() {
        let mut event = sample(EventDetail::Reset(Reset {
            direction: Direction::Sent,
            state: None,
            reason: None,
        }));
        event.src = "[fd00:200:61::1]:443".parse().unwrap();
        event.dst = "[2001:db8::a:0:0:1]:8080".parse().unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(LineFormatter::new().format(&event)).unwrap();
        assert_eq!(v["src_ip"], "fd00:200:61::1");
        assert_eq!(v["dst_ip"], "2001:db8::a:0:0:1");
        assert_eq!(v["dst_port"], 8080);
    }
}
