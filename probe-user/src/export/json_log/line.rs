//! The log writer's fast path: events formatted as JSON lines straight into the buffer that is
//! written, without building a `serde_json` value or escaping keys that never need it.
//!
//! The format is [`crate::schema`]'s, and only its: `same_bytes_as_the_schema` pins this
//! formatter to `serde_json`'s output of the schema type, byte for byte, for every kind and
//! shape of event. What it buys is measured by the bench (`connprobe run --log-encoder serde`
//! is the same agent writing through serde).
use std::{io::Write as _, net::IpAddr, time::SystemTime};

use crate::event::{ConnectOutcome, Event, EventDetail, Outcome};

/// Formats events as JSON lines into a reused buffer: keys are constant bytes, numbers go
/// through `itoa`, plain ASCII strings are copied without escaping, and the date and time of
/// day are formatted once per second.
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
        self.raw(event.kind().name().as_bytes());
        self.raw(b"\",\"seq\":");
        self.number(event.seq);
        self.raw(b",\"time\":\"");
        self.time(event.time);
        if let EventDetail::Conntrack(c) = &event.detail {
            // About a namespace: no connection fields.
            self.raw(b"\",\"netns\":");
            self.number(c.netns);
            self.raw(b",\"insert_failed\":");
            self.number(c.insert_failed);
            self.raw(b",\"drop\":");
            self.number(c.drop);
            self.raw(b",\"early_drop\":");
            self.number(c.early_drop);
            self.raw(b"}\n");
            return;
        }
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
        self.option_str(event.side.map(|s| s.name()));
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
                self.raw(<&str>::from(Outcome::from(c.outcome)).as_bytes());
                self.raw(b"\",\"reason\":");
                match c.outcome {
                    ConnectOutcome::Established => self.raw(b"null,\"errno\":null"),
                    ConnectOutcome::Failed { reason, errno } => {
                        self.string(reason.name());
                        self.raw(b",\"errno\":");
                        self.option_str(errno.map(|e| e.name()).as_deref());
                    }
                }
                self.raw(b",\"latency_us\":");
                self.option_number(c.latency.map(|d| d.as_micros() as u64));
                self.raw(b",\"syn_retransmits\":");
                self.number(c.syn_retransmits);
                if let Some(name) = &c.dst_name {
                    self.raw(b",\"dst_name\":");
                    self.string(name);
                }
            }
            EventDetail::Retransmit(r) => {
                self.raw(b",\"phase\":\"");
                self.raw(r.state.phase().name().as_bytes());
                self.raw(b"\",\"state\":\"");
                self.raw(r.state.name().as_bytes());
                self.raw(b"\",\"segments\":");
                self.number(r.segments);
            }
            EventDetail::Reset(r) => {
                self.raw(b",\"direction\":\"");
                self.raw(r.direction.name().as_bytes());
                self.raw(b"\",\"state\":");
                self.option_str(r.state.map(|s| s.name()));
                self.raw(b",\"reset_reason\":");
                self.option_str(r.reason.as_ref().map(|r| r.as_str()));
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
            EventDetail::Drop(d) => {
                self.raw(b",\"reason\":");
                self.string(d.reason.as_str());
                self.raw(b",\"protocol\":\"");
                self.raw(d.protocol.name().as_bytes());
                self.raw(b"\",\"tcp_flags\":");
                match d.tcp_flags {
                    Some(flags) => {
                        let _ = write!(self.line, "\"{flags}\"");
                    }
                    None => self.raw(b"null"),
                }
                self.raw(b",\"direction\":\"");
                self.raw(d.direction.name().as_bytes());
                self.raw(b"\",\"packets\":");
                self.number(d.packets);
            }
            EventDetail::ListenOverflow(o) => {
                self.raw(b",\"overflows\":");
                self.number(o.overflows);
                self.raw(b",\"backlog\":");
                self.option_number(o.backlog.map(u64::from));
                self.raw(b",\"queued\":");
                self.number(o.queued);
            }
            // Written above, without the connection fields.
            EventDetail::Conntrack(_) => {}
        }
        match &event.workload {
            Some(w) => {
                self.raw(b",\"cgroup\":");
                self.string(&w.cgroup);
                self.raw(b",\"container_id\":");
                self.option_str(w.container_id.as_deref());
                self.raw(b",\"pod_uid\":");
                self.option_str(w.pod_uid.as_deref());
            }
            None => self.raw(b",\"cgroup\":null,\"container_id\":null,\"pod_uid\":null"),
        }
        match event.backend {
            Some(b) => {
                self.raw(b",\"backend_ip\":\"");
                self.ip(b.ip());
                self.raw(b"\",\"backend_port\":");
                self.number(b.port());
            }
            None => self.raw(b",\"backend_ip\":null,\"backend_port\":null"),
        }
        self.raw(b"}\n");
    }

    /// The lines pushed since the last [`Self::clear`].
    pub fn buffered(&self) -> &[u8] {
        &self.line
    }

    /// Appends a line made elsewhere (a `dns` line, through serde).
    pub fn push_line(&mut self, line: &[u8]) {
        self.line.extend_from_slice(line);
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

    /// A JSON string escaped as `serde_json` escapes it: `"` and `\`, the short forms of
    /// backspace, form feed, newline, carriage return and tab, `\u00XX` for other control
    /// characters; everything else as it is.
    fn string(&mut self, s: &str) {
        self.line.push(b'"');
        let mut start = 0;
        for (i, &b) in s.as_bytes().iter().enumerate() {
            let escape: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\x08' => b"\\b",
                b'\x0c' => b"\\f",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..=0x1f => b"",
                _ => continue,
            };
            self.line.extend_from_slice(&s.as_bytes()[start..i]);
            if escape.is_empty() {
                let _ = write!(self.line, "\\u{:04x}", b);
            } else {
                self.line.extend_from_slice(escape);
            }
            start = i + 1;
        }
        self.line.extend_from_slice(&s.as_bytes()[start..]);
        self.line.push(b'"');
    }

    fn ip(&mut self, ip: IpAddr) {
        match ip {
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

    /// `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` in UTC, as humantime writes it; the part up to the
    /// second is formatted once per second.
    fn time(&mut self, time: SystemTime) {
        let since = time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        if self.second != Some(secs) {
            let whole = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            self.second_text.copy_from_slice(&text.as_bytes()[..19]);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::schema::tests::every_shape;

    /// The fast formatter writes exactly what `serde_json` writes for the schema type.
    #[test]
    fn same_bytes_as_the_schema() {
        let mut formatter = LineFormatter::new();
        for event in every_shape() {
            let mut expected = serde_json::to_vec(&event).unwrap();
            expected.push(b'\n');
            assert_eq!(
                String::from_utf8_lossy(formatter.format(&event)),
                String::from_utf8_lossy(&expected)
            );
        }
    }

    #[test]
    fn connect_line_has_the_documented_fields() {
        let mut event = crate::event::testing::client(
            "10.200.0.2:8081",
            SystemTime::UNIX_EPOCH
                + Duration::from_secs(1_795_000_000)
                + Duration::from_micros(123_456),
            crate::event::testing::failed(crate::event::FailureReason::Refused, 0),
        );
        event.src = "10.200.0.1:40000".parse().unwrap();
        event.process = Some(crate::event::Process {
            pid: 4242,
            comm: crate::event::Comm::from_str_lossy("curl"),
        });
        if let EventDetail::Connect(c) = &mut event.detail {
            c.latency = Some(Duration::from_micros(153));
        }
        assert_eq!(
            String::from_utf8_lossy(LineFormatter::new().format(&event)),
            concat!(
                r#"{"type":"connect","seq":0,"time":"2026-11-18T11:06:40.123456Z","pid":4242,"comm":"curl","#,
                r#""side":"client","src_ip":"10.200.0.1","src_port":40000,"dst_ip":"10.200.0.2","#,
                r#""dst_port":8081,"outcome":"failed","reason":"refused","errno":"ECONNREFUSED","#,
                r#""latency_us":153,"syn_retransmits":0,"cgroup":null,"container_id":null,"#,
                r#""pod_uid":null,"backend_ip":null,"backend_port":null}"#,
                "\n"
            )
        );
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
        let mut event = every_shape().remove(0);
        for s in secs {
            for micros in [0u64, 1, 999_999, 123_456] {
                let time =
                    SystemTime::UNIX_EPOCH + Duration::from_secs(s) + Duration::from_micros(micros);
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

    fn sample() -> Event {
        let mut event = every_shape().remove(0);
        event.detail = crate::event::testing::reset(crate::event::Direction::Sent, None, None);
        event
    }

    fn line(event: &Event) -> String {
        String::from_utf8(LineFormatter::new().format(event).to_vec()).unwrap()
    }

    #[test]
    fn unknown_owner_and_side_are_null() {
        let mut event = sample();
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
        let mut event = sample();
        event.process = Some(crate::event::Process {
            pid: 1,
            comm: crate::event::Comm::from_kernel(&raw),
        });
        let v: serde_json::Value = serde_json::from_str(&line(&event)).unwrap();
        assert_eq!(v["comm"], "\"\\\u{1}\u{fffd}\n\t");
    }

    #[test]
    fn ipv4_mapped_addresses_are_written_as_ipv4() {
        let mut event = sample();
        event.dst = "[::ffff:10.0.0.9]:80".parse().unwrap();
        let v: serde_json::Value = serde_json::from_str(&line(&event)).unwrap();
        assert_eq!(v["dst_ip"], "10.0.0.9");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let parse = |text: &str| serde_json::from_str::<Event>(text);
        assert!(parse("").is_err());
        assert!(parse("{}").is_err());
        assert!(parse(r#"{"type":"nope","time":"2026-01-01T00:00:00Z","src_ip":"1.2.3.4","src_port":1,"dst_ip":"1.2.3.4","dst_port":2}"#).is_err());
    }

    #[test]
    fn strings_escape_like_serde_json() {
        let mut formatter = LineFormatter::new();
        for event in every_shape() {
            let Some(process) = &event.process else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_slice(formatter.format(&event)).unwrap();
            assert_eq!(v["comm"], process.comm.to_string_lossy().as_ref());
        }
    }

    #[test]
    fn ipv6_addresses_are_written_in_canonical_form() {
        let mut event = sample();
        event.src = "[fd00:200:61::1]:443".parse().unwrap();
        event.dst = "[2001:db8::a:0:0:1]:8080".parse().unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(LineFormatter::new().format(&event)).unwrap();
        assert_eq!(v["src_ip"], "fd00:200:61::1");
        assert_eq!(v["dst_ip"], "2001:db8::a:0:0:1");
        assert_eq!(v["dst_port"], 8080);
    }
}
