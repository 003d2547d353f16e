//! `connprobe analyze EVENTS.jsonl`: judges a JSON event log after the fact. Reads plain or
//! gzip-compressed logs (by content, so `-` and misnamed files work too), line by line.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{self, BufRead, BufReader, Read},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::Context;

use super::{
    engine::{Judge, Window, judge},
    fleet::{self, FleetReport},
    render,
    verdict::Report,
};
use crate::{
    dns::exchange::{DnsExchange, DnsLine},
    event::Event,
};

/// The first two bytes of a gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// `connprobe analyze FILE...`: the report on the logs in `files` (`-`: standard input), all of
/// them or their last `window`, as text or JSON. Each file is one host's log, named by its file
/// name, unless its lines carry a `host` field (added by a log shipper that merged several
/// hosts' logs): then each line belongs to the host it names. One host gets the report its
/// agent would give; several get the fleet's comparison (see `fleet`) and each host's report.
pub fn run_analyze(files: &[PathBuf], window: Option<Duration>, json: bool) -> anyhow::Result<()> {
    let mut inputs: Vec<(String, Box<dyn Read>)> = Vec::new();
    for file in files {
        let name = file.display().to_string();
        let input: Box<dyn Read> = if file == Path::new("-") {
            Box::new(io::stdin().lock())
        } else {
            Box::new(File::open(file).with_context(|| format!("cannot open {name}"))?)
        };
        inputs.push((name, input));
    }
    let mut reports = reports_by_host(inputs, window)?;
    let text = if reports.len() == 1 {
        let (_, report) = reports.pop_first().expect("one host");
        if json {
            serde_json::to_string_pretty(&report).context("cannot format the report")?
        } else {
            render::text(&report)
        }
    } else {
        let fleet = FleetReport::new(reports);
        if json {
            serde_json::to_string_pretty(&fleet).context("cannot format the report")?
        } else {
            fleet::text(&fleet)
        }
    };
    let mut text = text;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    use std::io::Write;
    io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("cannot write the report")
}

/// Each host's report on the logs in `inputs` (name, reader): a log's lines belong to the host
/// of its name (see [`host_of_file`]) unless they name their own `host`.
fn reports_by_host(
    inputs: Vec<(String, Box<dyn Read + '_>)>,
    window: Option<Duration>,
) -> anyhow::Result<BTreeMap<String, Report>> {
    let mut hosts = PerHost::new(window);
    let mut used = BTreeSet::new();
    for (name, input) in inputs {
        // Two files called events.jsonl in different folders are two hosts, named by path.
        let mut host = host_of_file(Path::new(&name));
        if !used.insert(host.clone()) {
            host = name.clone();
        }
        let lines = open_lines(input, &name)?;
        for_each_line(lines, &name, |shipped, event| {
            hosts.add(shipped.unwrap_or_else(|| host.clone()), event)
        })?;
    }
    Ok(hosts.finish())
}

/// A host's name from its log's file name: `web-1.jsonl.gz` is `web-1`; standard input is
/// `stdin`.
fn host_of_file(file: &Path) -> String {
    if file == Path::new("-") {
        return "stdin".into();
    }
    let mut name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.display().to_string());
    for suffix in [".gz", ".jsonl", ".ndjson", ".json", ".log"] {
        if let Some(stem) = name.strip_suffix(suffix)
            && !stem.is_empty()
        {
            name = stem.to_owned();
        }
    }
    name
}

/// Each host's events, judged apart: streamed into a judge per host, or, with a window, the
/// recent ones kept per host and judged on the window that ends at the newest event of all.
struct PerHost {
    window: Option<Duration>,
    judges: BTreeMap<String, Judge>,
    recent: BTreeMap<String, RecentEvents>,
}

impl PerHost {
    fn new(window: Option<Duration>) -> Self {
        PerHost {
            window,
            judges: BTreeMap::new(),
            recent: BTreeMap::new(),
        }
    }

    fn add(&mut self, host: String, record: Record) {
        match self.window {
            None => record.add_to(self.judges.entry(host).or_insert_with(|| Judge::new(None))),
            Some(length) => self
                .recent
                .entry(host)
                .or_insert_with(|| RecentEvents::new(length))
                .push(record),
        }
    }

    /// Every host's report; an empty log is one host with nothing to judge.
    fn finish(self) -> BTreeMap<String, Report> {
        let mut reports: BTreeMap<String, Report> = match self.window {
            None => self
                .judges
                .into_iter()
                .map(|(host, j)| (host, j.finish()))
                .collect(),
            Some(length) => {
                let end = self
                    .recent
                    .values()
                    .filter_map(|r| r.newest)
                    .max()
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                self.recent
                    .into_iter()
                    .map(|(host, r)| (host, r.judge(Window::ending_at(end, length))))
                    .collect()
            }
        };
        if reports.is_empty() {
            let empty = match self.window {
                None => Judge::new(None).finish(),
                Some(length) => judge(&[], Window::ending_at(SystemTime::UNIX_EPOCH, length)),
            };
            reports.insert(String::new(), empty);
        }
        reports
    }
}

/// The `host` field a log shipper adds to each line (Vector's `host`, Fluent Bit's
/// `hostname` renamed to it): not part of the agent's schema, so read apart.
#[derive(serde::Deserialize)]
struct Shipped {
    host: Option<String>,
}

/// Judges the log in `input` (`name` is for messages): all of it, or the `window` ending at
/// its last event.
pub fn analyze_reader<'a, R: Read + 'a>(
    input: R,
    name: &str,
    window: Option<Duration>,
) -> anyhow::Result<Report> {
    let lines = open_lines(input, name)?;
    match window {
        None => {
            let mut judge = Judge::new(None);
            for_each_record(lines, name, |record| record.add_to(&mut judge))?;
            Ok(judge.finish())
        }
        Some(length) => {
            let mut recent = RecentEvents::new(length);
            for_each_record(lines, name, |record| recent.push(record))?;
            let end = recent.newest.unwrap_or(SystemTime::UNIX_EPOCH);
            Ok(recent.judge(Window::ending_at(end, length)))
        }
    }
}

/// The lines of `input`, decompressed when it is gzip (by content, not by name).
fn open_lines<'a, R: Read + 'a>(input: R, name: &str) -> anyhow::Result<Box<dyn BufRead + 'a>> {
    let mut buffered = BufReader::new(input);
    let head = buffered
        .fill_buf()
        .with_context(|| format!("cannot read {name}"))?;
    Ok(if head.starts_with(&GZIP_MAGIC) {
        Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(
            buffered,
        )))
    } else {
        Box::new(buffered)
    })
}

/// A line longer than this is no connprobe event (they are a few hundred bytes): it is
/// refused without being held in memory.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// One line of input, read with [`read_line`].
enum LineRead {
    /// End of input.
    End,
    /// A line ending in a newline (`complete`) or cut off by the end of input.
    Line { complete: bool },
    /// A line longer than [`MAX_LINE_BYTES`], skipped to its end.
    TooLong,
}

/// Reads one line into `line` (without its newline), holding at most `MAX_LINE_BYTES`.
fn read_line(input: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<LineRead> {
    line.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let buf = match input.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => LineRead::End,
                (true, true) => LineRead::TooLong,
                (true, false) => LineRead::Line { complete: false },
            });
        }
        any = true;
        let (part, found) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long && line.len() + part.len() <= MAX_LINE_BYTES {
            line.extend_from_slice(part);
        } else {
            too_long = true;
            line.clear();
        }
        let used = found.unwrap_or(buf.len());
        input.consume(used);
        if found.is_some() {
            return Ok(match too_long {
                true => LineRead::TooLong,
                false => LineRead::Line { complete: true },
            });
        }
    }
}

/// Each event of the log in `input` (`name` is for messages), plain or gzip; DNS lines are
/// left out.
pub fn read_events<'a, R: Read + 'a>(
    input: R,
    name: &str,
    mut each: impl FnMut(Event),
) -> anyhow::Result<()> {
    for_each_record(open_lines(input, name)?, name, |record| {
        if let Record::Event(event) = record {
            each(event);
        }
    })
}

fn for_each_record(
    lines: impl BufRead,
    name: &str,
    mut each: impl FnMut(Record),
) -> anyhow::Result<()> {
    for_each_line(lines, name, |_, record| each(record))
}

/// Each event or DNS exchange of the log, with the `host` field a shipper added to its line, if
/// any. A line that is neither is an error that names it, except a last line cut off without
/// its newline (a writer stopped mid-line): that one is skipped, and said.
fn for_each_line(
    mut lines: impl BufRead,
    name: &str,
    mut each: impl FnMut(Option<String>, Record),
) -> anyhow::Result<()> {
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        number += 1;
        let read = read_line(&mut lines, &mut line)
            .with_context(|| format!("cannot read {name} at line {number}"))?;
        let complete = match read {
            LineRead::End => return Ok(()),
            LineRead::TooLong => anyhow::bail!(
                "{name} line {number} is not a connprobe event: it is longer than {} MiB \
                 (events are a few hundred bytes)",
                MAX_LINE_BYTES >> 20
            ),
            LineRead::Line { complete } => complete,
        };
        let Ok(text) = std::str::from_utf8(&line) else {
            anyhow::bail!(
                "{name} line {number} is not a connprobe event: it is not UTF-8 text \
                 (a binary file?)"
            );
        };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        // DNS exchanges share the log: the resolvers' verdicts, and the names' timeouts. The
        // agent writes `type` first; a shipper may have reordered the keys.
        let dns = || {
            serde_json::from_str::<DnsLine<'_>>(text).and_then(|line| {
                DnsExchange::try_from(line)
                    .map(Record::Dns)
                    .map_err(serde::de::Error::custom)
            })
        };
        let parsed = if text.starts_with(r#"{"type":"dns""#) {
            dns()
        } else {
            match serde_json::from_str::<Event>(text) {
                Ok(event) => Ok(Record::Event(event)),
                Err(_) if text.contains(r#""type":"dns""#) => dns(),
                Err(e) => Err(e),
            }
        };
        let record = match parsed {
            Ok(record) => record,
            Err(e) if !complete => {
                tracing::warn!(
                    "{name} ends in an incomplete line (line {number}, {} bytes, no newline: \
                     {e}); skipped it",
                    line.len()
                );
                return Ok(());
            }
            Err(e) => {
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("{name} line {number} is not a connprobe event"));
            }
        };
        // Only lines that mention it are parsed twice.
        let host = if text.contains("\"host\"") {
            serde_json::from_str::<Shipped>(text)
                .with_context(|| format!("{name} line {number}: `host` is not a string"))?
                .host
        } else {
            None
        };
        each(host, record);
    }
}

/// One line of the log: a connection event, or a DNS exchange.
enum Record {
    Event(Event),
    Dns(DnsExchange),
}

impl Record {
    fn time(&self) -> SystemTime {
        match self {
            Record::Event(e) => e.time,
            Record::Dns(x) => x.time,
        }
    }

    fn add_to(&self, judge: &mut Judge) {
        match self {
            Record::Event(e) => judge.add(e),
            Record::Dns(x) => judge.add_dns(x),
        }
    }
}

/// The events of the last `length` before the newest seen so far, kept without holding the
/// whole log: anything older than the newest minus `length` can never be in the final window,
/// whatever the order of the lines.
struct RecentEvents {
    length: Duration,
    newest: Option<SystemTime>,
    records: Vec<Record>,
    prune_at: usize,
}

impl RecentEvents {
    fn new(length: Duration) -> Self {
        RecentEvents {
            length,
            newest: None,
            records: Vec::new(),
            prune_at: 1024,
        }
    }

    fn push(&mut self, record: Record) {
        let time = record.time();
        self.newest = Some(self.newest.map_or(time, |t| t.max(time)));
        self.records.push(record);
        if self.records.len() >= self.prune_at {
            let cutoff =
                Window::ending_at(self.newest.unwrap_or(SystemTime::UNIX_EPOCH), self.length).start;
            self.records.retain(|r| r.time() >= cutoff);
            self.prune_at = (self.records.len() * 2).max(1024);
        }
    }

    fn judge(&self, window: Window) -> Report {
        let mut judge = Judge::new(Some(window));
        for record in &self.records {
            record.add_to(&mut judge);
        }
        judge.finish()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::diagnose::engine::tests::{evidence, mixed_log};
    use crate::diagnose::verdict::VerdictId;
    use crate::event::{
        FailureReason, Side, TcpState,
        testing::{at, connect_failed, connect_ok, reset_sent_by_service, reset_sent_for_reason},
    };

    /// The events as the agent logs them.
    fn jsonl(events: &[Event]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            serde_json::to_writer(&mut out, e).unwrap();
            out.push(b'\n');
        }
        out
    }

    #[test]
    fn a_log_gives_the_same_verdicts_as_the_events() {
        let events = mixed_log();
        let direct = judge(
            &events,
            Window::ending_at(at(600.0), Duration::from_secs(3600)),
        );
        let from_log = analyze_reader(&jsonl(&events)[..], "t.jsonl", None).unwrap();
        assert_eq!(from_log.verdicts_only(), direct.verdicts_only());
        assert!(!direct.destinations.is_empty());
    }

    #[test]
    fn the_agent_and_its_log_agree_despite_the_logs_coarser_times() {
        use crate::diagnose::{FlightRecorder, client::diagnose_at};
        use std::sync::Mutex;
        // Nanosecond times, some a hair before a millisecond boundary: the log keeps only
        // microseconds.
        let mut events = mixed_log();
        for i in 0..600 {
            let t = at(i as f64);
            events.push(if (100..110).contains(&i) || (300..304).contains(&i) {
                connect_failed("10.0.5.5:80", t, FailureReason::Refused, 0)
            } else {
                connect_ok("10.0.5.5:80", t, 700 + i)
            });
        }
        for (i, e) in events.iter_mut().enumerate() {
            e.time += Duration::from_nanos([999_999, 1, 123_456_789, 500_000_999][i % 4]);
        }
        let recorder = Mutex::new(FlightRecorder::new(100_000));
        recorder.lock().unwrap().extend(&events);
        let (status, body) = diagnose_at(
            &recorder,
            None,
            std::time::SystemTime::UNIX_EPOCH,
            Duration::from_secs(900),
            at(610.0),
        );
        assert_eq!(status, 200);
        let agent: Report = serde_json::from_str(&body).unwrap();
        let log = analyze_reader(&jsonl(&events)[..], "t.jsonl", None).unwrap();
        assert_eq!(log.verdicts_only(), agent.verdicts_only());
        assert!(
            agent
                .destinations
                .iter()
                .any(|d| d.verdicts[0].id().is_problem())
        );
    }

    #[test]
    fn dns_lines_give_the_same_verdicts_as_the_agent() {
        use crate::diagnose::after_dns::tests::{RESOLVER, answered, failed_for, query};
        use crate::diagnose::engine::judge_with_dns;
        use crate::dns::exchange::DnsOutcome;
        let mut events = mixed_log();
        let mut exchanges = Vec::new();
        for i in 0..10 {
            let t = 100.0 + f64::from(i) * 40.0;
            exchanges.push(query("api.lab", at(t), DnsOutcome::Timeout));
            exchanges.push(query("api.lab", at(t + 5.0), answered()));
            events.push(failed_for("10.0.0.2:443", "api.lab", at(t + 6.0)));
        }
        // Nanoseconds, as the agent has them: the log keeps microseconds.
        for x in &mut exchanges {
            x.time += Duration::from_nanos(999_999);
        }
        let mut log = jsonl(&events);
        for x in &exchanges {
            serde_json::to_writer(&mut log, &DnsLine::from(x)).unwrap();
            log.push(b'\n');
        }
        let length = Duration::from_secs(3600);
        let agent = judge_with_dns(&events, &exchanges, Window::ending_at(at(600.0), length));
        assert_eq!(agent.verdict_ids(RESOLVER), vec![VerdictId::DnsTimeout]);
        let joined = &agent
            .destinations
            .iter()
            .find(|d| d.destination == "10.0.0.2:443")
            .unwrap()
            .verdicts[0];
        assert_eq!(evidence(joined)["after_dns_timeout"]["failures"], 10);
        // As a shipper may write it back: the keys in another order.
        let mut reordered = Vec::new();
        for line in log.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let mut value: serde_json::Value = serde_json::from_slice(line).unwrap();
            let kind = value.as_object_mut().unwrap().remove("type").unwrap();
            value["type"] = kind;
            serde_json::to_writer(&mut reordered, &value).unwrap();
            reordered.push(b'\n');
        }
        assert!(!reordered.starts_with(br#"{"type""#));
        for window in [None, Some(length)] {
            for log in [&log, &reordered] {
                let from_log = analyze_reader(&log[..], "t.jsonl", window).unwrap();
                assert_eq!(from_log.verdicts_only(), agent.verdicts_only());
            }
        }
    }

    #[test]
    fn gzip_is_read_by_content() {
        let events = mixed_log();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&jsonl(&events)).unwrap();
        let compressed = gz.finish().unwrap();
        let plain = analyze_reader(&jsonl(&events)[..], "t.jsonl", None).unwrap();
        let zipped = analyze_reader(&compressed[..], "t.jsonl.gz", None).unwrap();
        assert_eq!(zipped, plain);
    }

    #[test]
    fn a_window_ends_at_the_last_event() {
        let mut events = Vec::new();
        // Refused long ago, healthy in the last minute.
        for i in 0..20 {
            events.push(connect_failed(
                "10.0.0.1:80",
                at(i as f64),
                FailureReason::Refused,
                0,
            ));
        }
        for i in 0..3000 {
            events.push(connect_ok("10.0.0.1:80", at(1000.0 + i as f64 * 0.02), 400));
        }
        let log = jsonl(&events);
        let all = analyze_reader(&log[..], "t", None).unwrap();
        assert_eq!(all.destinations[0].verdicts[0].id().as_str(), "refused");
        let last = analyze_reader(&log[..], "t", Some(Duration::from_secs(60))).unwrap();
        assert_eq!(last.destinations[0].verdicts[0].id().as_str(), "healthy");
        assert_eq!(last.window.end, "2026-11-18T11:24:19.980Z");
        assert_eq!(last.window.events, 3000);
        let direct = judge(
            &events,
            Window::ending_at(at(1059.98), Duration::from_secs(60)),
        );
        assert_eq!(last, direct);
    }

    #[test]
    fn a_logs_reset_reasons_reach_the_verdict() {
        let events: Vec<_> = (0..10)
            .map(|i| {
                reset_sent_for_reason(
                    "10.9.9.9:9000",
                    at(i as f64),
                    Some(TcpState::Close),
                    "TCP_ABORT_ON_CLOSE",
                )
            })
            .collect();
        let report = analyze_reader(&jsonl(&events)[..], "t.jsonl", None).unwrap();
        let v = &report.destinations[0].verdicts[0];
        assert_eq!(v.id().as_str(), "local_resets");
        assert_eq!(evidence(v)["by_reason"]["TCP_ABORT_ON_CLOSE"], 10);
        assert!(
            v.next_step.contains("TCP_ABORT_ON_CLOSE"),
            "{}",
            v.next_step
        );
    }

    #[test]
    fn a_log_from_before_reset_reasons_is_judged_as_before() {
        let events: Vec<_> = (0..10)
            .map(|i| reset_sent_by_service("10.9.9.9:9000", at(i as f64), Some(Side::Server), None))
            .collect();
        let now = String::from_utf8(jsonl(&events)).unwrap();
        let before = now.replace(",\"reset_reason\":null", "");
        assert_ne!(before, now);
        let from_old = analyze_reader(before.as_bytes(), "old.jsonl", None).unwrap();
        let from_new = analyze_reader(now.as_bytes(), "new.jsonl", None).unwrap();
        assert_eq!(from_old, from_new);
        let v = &from_old.destinations[0].verdicts[0];
        assert!(v.next_step.contains("most answer SYNs"), "{}", v.next_step);
    }

    /// `events` as log lines, each with `"host": host` added the way a shipper adds it.
    fn shipped(events: &[Event], host: &str) -> String {
        String::from_utf8(jsonl(events))
            .unwrap()
            .lines()
            .map(|l| format!("{},\"host\":\"{host}\"}}\n", l.strip_suffix('}').unwrap()))
            .collect()
    }

    #[test]
    fn lines_go_to_the_host_they_name_and_files_to_their_own() {
        let refused: Vec<Event> = (0..4)
            .map(|i| connect_failed("10.0.0.9:443", at(f64::from(i)), FailureReason::Refused, 0))
            .collect();
        let ok: Vec<Event> = (0..4)
            .map(|i| connect_ok("10.0.0.9:443", at(f64::from(i)), 150))
            .collect();
        let merged = format!("{}{}", shipped(&refused, "web-1"), shipped(&ok, "web-2"));
        let own = jsonl(&refused);
        let inputs: Vec<(String, Box<dyn Read>)> = vec![
            ("shipped.jsonl".into(), Box::new(merged.as_bytes())),
            ("/var/log/web-3.jsonl.gz".into(), Box::new(&own[..])),
        ];
        let reports = reports_by_host(inputs, None).unwrap();
        assert_eq!(
            reports.keys().collect::<Vec<_>>(),
            ["web-1", "web-2", "web-3"]
        );
        let top = |host: &str| reports[host].destinations[0].verdicts[0].id();
        assert_eq!(top("web-1"), VerdictId::Refused);
        assert_eq!(top("web-2"), VerdictId::Healthy);
        assert_eq!(top("web-3"), VerdictId::Refused);
        // Judged apart, each host's report is what its own log alone gives.
        let alone = analyze_reader(&own[..], "web-3", None).unwrap();
        assert_eq!(reports["web-3"], alone);
        let fleet = fleet::text(&FleetReport::new(reports));
        assert!(
            fleet.contains("10.0.0.9:443: refused from 2 of 3 hosts: the destination or its load balancer fails"),
            "{fleet}"
        );
    }

    #[test]
    fn same_named_files_are_told_apart_by_path() {
        let ok = jsonl(&[connect_ok("10.0.0.1:80", at(0.0), 100)]);
        let inputs: Vec<(String, Box<dyn Read>)> = vec![
            ("a/events.jsonl".into(), Box::new(&ok[..])),
            ("b/events.jsonl".into(), Box::new(&ok[..])),
        ];
        let reports = reports_by_host(inputs, None).unwrap();
        assert_eq!(
            reports.keys().collect::<Vec<_>>(),
            ["b/events.jsonl", "events"]
        );
        assert_eq!(host_of_file(Path::new("-")), "stdin");
    }

    #[test]
    fn a_host_that_is_not_a_string_is_named_by_line() {
        let line = format!(
            "{},\"host\":7}}\n",
            String::from_utf8(jsonl(&[connect_ok("10.0.0.1:80", at(0.0), 100)]))
                .unwrap()
                .trim_end()
                .strip_suffix('}')
                .unwrap()
        );
        let inputs: Vec<(String, Box<dyn Read>)> =
            vec![("x.jsonl".into(), Box::new(line.as_bytes()))];
        let err = reports_by_host(inputs, None).unwrap_err();
        assert_eq!(format!("{err:#}").split(':').next(), Some("x.jsonl line 1"));
    }

    #[test]
    fn a_bad_line_is_named_by_number() {
        let mut log = jsonl(&[connect_ok("10.0.0.1:80", at(0.0), 1)]);
        log.extend_from_slice(b"\n{\"type\":\"connect\"}\n");
        let err = analyze_reader(&log[..], "events.jsonl", None).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("events.jsonl line 3 is not a connprobe event"),
            "{text}"
        );
    }

    /// `len` bytes of `fill` then a newline, made as they are read (never held whole).
    struct Endless {
        left: u64,
        fill: u8,
    }

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Ok(0);
            }
            let n = buf.len().min(self.left as usize);
            buf[..n].fill(self.fill);
            self.left -= n as u64;
            if self.left == 0 {
                buf[n - 1] = b'\n';
            }
            Ok(n)
        }
    }

    fn error_of(log: &[u8]) -> String {
        format!("{:#}", analyze_reader(log, "bad.jsonl", None).unwrap_err())
    }

    #[test]
    fn a_cut_off_last_line_is_skipped_and_the_rest_judged() {
        let events: Vec<_> = (0..5)
            .map(|i| connect_failed("10.0.0.1:80", at(i as f64), FailureReason::Refused, 0))
            .collect();
        let whole = jsonl(&events);
        let full = analyze_reader(&whole[..], "t", None).unwrap();
        // The last line loses its end and its newline, as a writer killed mid-line leaves it.
        let cut = &whole[..whole.len() - 40];
        let report = analyze_reader(cut, "t", None).unwrap();
        assert_eq!(report.window.events, 4);
        assert_eq!(full.window.events, 5);
        // A line cut short in the middle of the log is an error that names it.
        let mut middle = whole[..whole.len() / 2].to_vec();
        middle.push(b'\n');
        middle.extend_from_slice(&whole);
        let text = error_of(&middle);
        assert!(
            text.contains("bad.jsonl line 3 is not a connprobe event"),
            "{text}"
        );
    }

    #[test]
    fn binary_junk_is_a_clear_error() {
        let mut junk = jsonl(&[connect_ok("10.0.0.1:80", at(0.0), 1)]);
        junk.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
        junk.push(b'\n');
        let text = error_of(&junk);
        assert!(
            text.contains("bad.jsonl line 2 is not a connprobe event"),
            "{text}"
        );
        // Valid UTF-8 that is not JSON, JSON that is not an object, nesting bombs.
        for line in [
            &b"\xef\xbb\xbfhello"[..],
            b"[1,2,3]",
            b"null",
            &[b'['; 100_000],
            b"{\"type\":\"connect\",\"seq\":-1}",
        ] {
            let mut log = line.to_vec();
            log.push(b'\n');
            let text = error_of(&log);
            assert!(
                text.contains("bad.jsonl line 1 is not a connprobe event"),
                "{text}"
            );
        }
        // A damaged gzip stream.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&jsonl(&mixed_log())).unwrap();
        let mut compressed = gz.finish().unwrap();
        let half = compressed.len() / 2;
        compressed[half..].iter_mut().for_each(|b| *b ^= 0x5a);
        assert!(analyze_reader(&compressed[..], "t.gz", None).is_err());
    }

    #[test]
    fn a_100_mb_line_is_refused_without_holding_it() {
        let mut log = jsonl(&[connect_ok("10.0.0.1:80", at(0.0), 1)]);
        log.extend_from_slice(b"{\"type\":\"connect\",\"comm\":\"");
        let huge = io::Read::chain(
            &log[..],
            Endless {
                left: 100 << 20,
                fill: b'a',
            },
        );
        let err = analyze_reader(huge, "big.jsonl", None).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("big.jsonl line 2 is not a connprobe event: it is longer than 1 MiB"),
            "{text}"
        );
        // Without a newline at all.
        let endless = Endless {
            left: 3 << 20,
            fill: b' ',
        };
        let tail = io::Read::chain(&b"x"[..], endless);
        assert!(analyze_reader(tail, "t", None).is_err());
    }
}
