//! Evidence bundles: when a destination's last minute crosses a trigger threshold, one JSON file
//! with its stats, the verdicts and the raw events around the trigger, written atomically into
//! `--evidence-dir`. The triggers read the aggregator's snapshot (its last minute: the same
//! failure ratio and p99 `connprobe top` shows); the verdicts and events come from the flight
//! recorder. Bounded in number (oldest deleted), in size (events capped), and in rate
//! (a cool-down per destination, so one incident writes one bundle, not hundreds).
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use strum::{IntoStaticStr, VariantArray};

use super::{
    engine::{Window, judge_with_dns},
    format_time,
    recorder::FlightRecorder,
    round,
    verdict::{Report, Verdict},
};
use crate::{
    aggregate::{Aggregator, Snapshot, WindowStats},
    destination::Destination,
    dns::SharedDns,
    event::{Event, FailureReason},
};

/// Bundle files start with this and end with `.json`; nothing else in the directory is touched.
pub const BUNDLE_PREFIX: &str = "connprobe-evidence-";

/// The trigger looks at each destination's last minute (the aggregator's `last_1m`): long
/// enough for a ratio over a few dozen connects, short enough to fire while the incident is on.
pub const STATS_WINDOW: Duration = Duration::from_secs(60);
/// A bundle holds the events and verdicts of the five minutes before the trigger, the default
/// window of `connprobe diagnose`: the lead-up matters as much as the failure.
pub const LOOKBACK: Duration = Duration::from_secs(300);
/// After a bundle, a destination stays quiet this long: one incident, one bundle.
pub const COOLDOWN: Duration = Duration::from_secs(300);
/// Bundles kept; the oldest are deleted. 20 bundles of at most a few MB each.
pub const MAX_BUNDLES: usize = 20;
/// Destinations with a problem verdict that a bundle's report lists besides the triggered one
/// (healthy ones are left out): context such as a failing pool, at a bounded size.
pub const MAX_REPORT_DESTINATIONS: usize = 50;
/// Raw events in a bundle (the newest are kept): about 300 bytes each as JSON, so ~3 MB.
pub const MAX_EVENTS_PER_BUNDLE: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error("cannot create the evidence directory {0}: {1}")]
    CreateDir(PathBuf, io::Error),
    #[error("cannot write the evidence bundle {0}: {1}")]
    Write(PathBuf, io::Error),
    #[error("cannot list the evidence directory {0}: {1}")]
    List(PathBuf, io::Error),
    #[error("the flight recorder's lock is poisoned")]
    Poisoned,
}

/// When to write a bundle, where, and how many.
#[derive(Clone, Debug)]
pub struct TriggerConfig {
    pub evidence_dir: PathBuf,
    /// Failure ratio over the last minute that fires...
    pub failure_ratio: f64,
    /// ...or p99 handshake latency that fires...
    pub latency: Duration,
    /// ...once a destination made at least this many connects in that minute.
    pub min_attempts: u64,
    pub lookback: Duration,
    pub cooldown: Duration,
    pub max_bundles: usize,
    pub max_events_per_bundle: usize,
}

impl TriggerConfig {
    /// The defaults of the flags, writing into `evidence_dir`.
    pub fn new(evidence_dir: PathBuf) -> Self {
        TriggerConfig {
            evidence_dir,
            failure_ratio: 0.2,
            latency: Duration::from_secs(1),
            min_attempts: 10,
            lookback: LOOKBACK,
            cooldown: COOLDOWN,
            max_bundles: MAX_BUNDLES,
            max_events_per_bundle: MAX_EVENTS_PER_BUNDLE,
        }
    }
}

/// Why a destination fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum TriggerCause {
    FailureRatio,
    Latency,
}

/// A destination's last minute as the bundle's `stats` hold it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TriggerStats {
    pub attempts: u64,
    pub established: u64,
    pub failures: u64,
    pub failure_ratio: f64,
    pub failures_by_reason: BTreeMap<&'static str, u64>,
    pub latency_p50_us: Option<u64>,
    pub latency_p99_us: Option<u64>,
}

impl TriggerStats {
    fn of(window: &WindowStats) -> Self {
        let c = &window.counts;
        TriggerStats {
            attempts: c.attempts,
            established: c.established,
            failures: c.failures_total(),
            failure_ratio: c.failure_ratio().unwrap_or(0.0),
            failures_by_reason: FailureReason::VARIANTS
                .iter()
                .filter(|r| c.failure(**r) > 0)
                .map(|r| (r.name(), c.failure(*r)))
                .collect(),
            latency_p50_us: window.latency.map(|l| l.p50.as_micros() as u64),
            latency_p99_us: window.latency.map(|l| l.p99.as_micros() as u64),
        }
    }
}

/// A destination that crossed a threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct Fired {
    pub destination: Destination,
    pub cause: TriggerCause,
    pub stats: TriggerStats,
}

#[derive(Serialize)]
struct Trigger {
    destination: String,
    side: Option<&'static str>,
    cause: &'static str,
    at: String,
    failure_ratio_threshold: f64,
    latency_threshold_ms: f64,
    min_attempts: u64,
    stats_window_seconds: f64,
}

/// One bundle file.
#[derive(Serialize)]
struct Bundle<'a> {
    trigger: Trigger,
    stats: &'a TriggerStats,
    verdicts: Vec<Verdict>,
    report: &'a Report,
    events_total: usize,
    events_dropped: usize,
    events: &'a [&'a Event],
}

/// Checks the triggers (call `tick` about once a second) and writes the bundles.
pub struct EvidenceWriter {
    config: TriggerConfig,
    last_fired: HashMap<Destination, SystemTime>,
    written: Arc<AtomicU64>,
    sequence: u64,
    /// The DNS path's recent exchanges, judged with the events (see `with_dns`).
    dns: Option<SharedDns>,
}

impl EvidenceWriter {
    /// Creates the evidence directory if needed.
    pub fn new(config: TriggerConfig) -> Result<Self, EvidenceError> {
        fs::create_dir_all(&config.evidence_dir)
            .map_err(|e| EvidenceError::CreateDir(config.evidence_dir.clone(), e))?;
        Ok(EvidenceWriter {
            config,
            last_fired: HashMap::new(),
            written: Arc::new(AtomicU64::new(0)),
            sequence: 0,
            dns: None,
        })
    }

    /// Judges the DNS path's recent exchanges with the events: a bundle's verdicts then say
    /// which failures followed an unanswered query for the destination's name.
    pub fn with_dns(mut self, dns: Option<SharedDns>) -> Self {
        self.dns = dns;
        self
    }

    /// Bundles written since start (for a `_total` metric).
    pub fn bundles_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// The same count, shareable with a metrics exporter that lives elsewhere.
    pub fn bundles_written_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.written)
    }

    /// Which destinations cross a threshold in the snapshot's last minute, cool-down aside.
    pub fn triggered(&self, snapshot: &Snapshot) -> Vec<Fired> {
        let latency = self.config.latency;
        let mut fired: Vec<Fired> = Vec::new();
        for summary in &snapshot.destinations {
            let Some(destination) = summary.attempted() else {
                continue;
            };
            let w = &summary.last_1m;
            if w.counts.attempts < self.config.min_attempts.max(1)
                || fired.iter().any(|f| f.destination == destination)
            {
                continue;
            }
            let cause = if w.failure_ratio().unwrap_or(0.0) >= self.config.failure_ratio {
                TriggerCause::FailureRatio
            } else if w.latency.is_some_and(|l| l.p99 >= latency) {
                TriggerCause::Latency
            } else {
                continue;
            };
            fired.push(Fired {
                destination,
                cause,
                stats: TriggerStats::of(w),
            });
        }
        fired.sort_by_key(|f| f.destination);
        fired
    }

    /// Checks every destination and writes a bundle for each that fired and is not cooling
    /// down. Holds each lock only to read. Returns the bundles written.
    pub fn tick(
        &mut self,
        aggregator: &Mutex<Aggregator>,
        recorder: &Mutex<FlightRecorder>,
        now: SystemTime,
    ) -> Result<Vec<PathBuf>, EvidenceError> {
        let cooldown = self.config.cooldown;
        self.last_fired
            .retain(|_, t| now.duration_since(*t).unwrap_or_default() < cooldown);
        let snapshot = aggregator
            .lock()
            .map_err(|_| EvidenceError::Poisoned)?
            .snapshot(now);
        let fired: Vec<Fired> = self
            .triggered(&snapshot)
            .into_iter()
            .filter(|f| !self.last_fired.contains_key(&f.destination))
            .collect();
        if fired.is_empty() {
            return Ok(Vec::new());
        }
        let window_start = now.checked_sub(self.config.lookback).unwrap_or(now);
        let events = recorder
            .lock()
            .map_err(|_| EvidenceError::Poisoned)?
            .events_since(window_start);
        let window = Window::ending_at(now, self.config.lookback);
        let exchanges = self.dns.as_ref().map_or_else(Vec::new, |dns| {
            dns.lock()
                .unwrap_or_else(|e| e.into_inner())
                .recent_since(window.start)
        });
        let full = judge_with_dns(&events, &exchanges, window);
        let mut paths = Vec::new();
        for f in fired {
            // Cool down even if writing fails: a full disk must not be retried every second.
            self.last_fired.insert(f.destination, now);
            let report = bundle_report(&full, &f.destination);
            let path = self.write_bundle(&f, &report, &events, now)?;
            paths.push(path);
        }
        self.prune()?;
        Ok(paths)
    }

    fn write_bundle(
        &mut self,
        fired: &Fired,
        report: &Report,
        events: &[Event],
        now: SystemTime,
    ) -> Result<PathBuf, EvidenceError> {
        let key = fired.destination;
        let destination = key.addr.to_string();
        let mine: Vec<&Event> = events
            .iter()
            .filter(|e| Destination::of(e) == key)
            .collect();
        let kept = &mine[mine.len().saturating_sub(self.config.max_events_per_bundle)..];
        let side = key.side_name().map(str::to_string);
        let verdicts = report
            .destinations
            .iter()
            .find(|d| d.destination == destination && d.side == side)
            .map(|d| d.verdicts.clone())
            .unwrap_or_default();
        let bundle = Bundle {
            trigger: Trigger {
                destination: destination.clone(),
                side: key.side_name(),
                cause: fired.cause.into(),
                at: format_time(now),
                failure_ratio_threshold: self.config.failure_ratio,
                latency_threshold_ms: round(self.config.latency.as_secs_f64() * 1000.0, 3),
                min_attempts: self.config.min_attempts,
                stats_window_seconds: STATS_WINDOW.as_secs_f64(),
            },
            stats: &fired.stats,
            verdicts,
            report,
            events_total: mine.len(),
            events_dropped: mine.len() - kept.len(),
            events: kept,
        };
        let millis = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        self.sequence += 1;
        let safe: String = destination
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let name = format!(
            "{BUNDLE_PREFIX}{millis:013}-{:04}-{safe}.json",
            self.sequence % 10_000
        );
        let path = self.config.evidence_dir.join(&name);
        let body = serde_json::to_vec_pretty(&bundle).map_err(io::Error::other);
        let written = body.and_then(|b| write_atomically(&self.config.evidence_dir, &name, &b));
        written.map_err(|e| EvidenceError::Write(path.clone(), e))?;
        self.written.fetch_add(1, Ordering::Relaxed);
        Ok(path)
    }

    /// Deletes the oldest bundles past the bound. Names sort by time (zero-padded millis).
    fn prune(&self) -> Result<(), EvidenceError> {
        let dir = &self.config.evidence_dir;
        let mut bundles = list_bundles(dir).map_err(|e| EvidenceError::List(dir.clone(), e))?;
        bundles.sort();
        let excess = bundles.len().saturating_sub(self.config.max_bundles);
        for old in &bundles[..excess] {
            // Someone may have removed it already; that is fine.
            let _ = fs::remove_file(old);
        }
        Ok(())
    }
}

/// How often [`EvidenceWriter::spawn`] checks the triggers.
pub const TICK: Duration = Duration::from_secs(1);

impl EvidenceWriter {
    /// Runs the triggers on their own thread, every [`TICK`], until `stop` turns true. A
    /// failure to write is logged once per run of failures, not every second.
    pub fn spawn(
        mut self,
        aggregator: Arc<Mutex<Aggregator>>,
        recorder: Arc<Mutex<FlightRecorder>>,
        stop: Arc<AtomicBool>,
    ) -> io::Result<thread::JoinHandle<()>> {
        let handle = thread::Builder::new()
            .name("connprobe-evidence".into())
            .spawn(move || {
                let mut failing = false;
                while !stop.load(Ordering::Relaxed) {
                    thread::sleep(TICK);
                    match self.tick(&aggregator, &recorder, SystemTime::now()) {
                        Ok(paths) => {
                            failing = false;
                            for path in paths {
                                tracing::info!("evidence bundle written: {}", path.display());
                            }
                        }
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!("{e}");
                        }
                        Err(_) => {}
                    }
                }
            })?;
        Ok(handle)
    }
}

/// The report a bundle carries: the triggered destination, other destinations with a problem
/// (worst first, bounded), and the pools.
fn bundle_report(full: &Report, key: &Destination) -> Report {
    let destination = key.addr.to_string();
    let side = key.side_name().map(str::to_string);
    let mut report = full.clone();
    let mut others = 0;
    report.destinations.retain(|d| {
        if d.destination == destination && d.side == side {
            return true;
        }
        let keep = others < MAX_REPORT_DESTINATIONS
            && d.verdicts.first().is_some_and(|v| v.id().is_problem());
        others += usize::from(keep);
        keep
    });
    report
}

/// The bundles in `dir`, unsorted.
pub fn list_bundles(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(BUNDLE_PREFIX) && name.ends_with(".json") {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// Writes `dir/name` so that readers see either nothing or the whole file: a hidden temporary
/// file in the same directory, flushed to disk, then renamed over.
fn write_atomically(dir: &Path, name: &str, body: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(body)?;
        file.sync_all()?;
        fs::rename(&tmp, dir.join(name))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::AggregatorConfig;
    use crate::event::testing::{at, connect_failed, connect_ok};

    /// What the pipeline feeds: the aggregator and the flight recorder, each behind its lock.
    struct Recorded {
        aggregator: Mutex<Aggregator>,
        recorder: Mutex<FlightRecorder>,
    }

    impl Recorded {
        fn new(capacity: usize) -> Self {
            Recorded {
                aggregator: Mutex::new(Aggregator::new(AggregatorConfig {
                    max_destinations: 500,
                    destination_idle: Duration::from_secs(600),
                    by_comm: false,
                    by_container: false,
                })),
                recorder: Mutex::new(FlightRecorder::new(capacity)),
            }
        }

        fn push(&self, event: &Event) {
            self.aggregator.lock().unwrap().record(event);
            self.recorder.lock().unwrap().push(event);
        }

        fn tick(&self, writer: &mut EvidenceWriter, now: SystemTime) -> Vec<PathBuf> {
            writer.tick(&self.aggregator, &self.recorder, now).unwrap()
        }

        fn snapshot(&self, now: SystemTime) -> Snapshot {
            self.aggregator.lock().unwrap().snapshot(now)
        }
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "connprobe-evidence-test-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn refusing(recorder: &Recorded, dest: &str, from: f64, n: usize) {
        for i in 0..n {
            recorder.push(&connect_failed(
                dest,
                at(from + i as f64 * 0.1),
                FailureReason::Refused,
                0,
            ));
        }
    }

    #[test]
    fn a_failing_destination_gets_one_bundle_per_cooldown() {
        let dir = TempDir::new("cooldown");
        let mut writer = EvidenceWriter::new(TriggerConfig::new(dir.0.clone())).unwrap();
        let recorder = Recorded::new(1000);
        {
            let r = &recorder;
            for i in 0..20 {
                r.push(&connect_ok("10.0.0.9:80", at(100.0 + i as f64), 500));
            }
            refusing(r, "10.0.0.1:80", 100.0, 15);
            for i in 0..15 {
                r.push(&connect_ok("10.0.0.1:80", at(101.0 + i as f64), 500));
            }
        }
        let written = recorder.tick(&mut writer, at(120.0));
        assert_eq!(written.len(), 1, "only the failing destination fires");
        assert_eq!(writer.bundles_written(), 1);
        for s in 1..30 {
            assert!(recorder.tick(&mut writer, at(120.0 + s as f64)).is_empty());
        }
        assert_eq!(list_bundles(&dir.0).unwrap().len(), 1);

        let text = fs::read_to_string(&written[0]).unwrap();
        let bundle: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(bundle["trigger"]["destination"], "10.0.0.1:80");
        assert_eq!(bundle["trigger"]["cause"], "failure_ratio");
        assert_eq!(bundle["stats"]["failures"], 15);
        assert_eq!(bundle["verdicts"][0]["verdict"], "refused");
        assert_eq!(bundle["events"].as_array().unwrap().len(), 30);
        assert_eq!(bundle["events"][0]["type"], "connect");
        let listed = bundle["report"]["destinations"].as_array().unwrap();
        assert_eq!(
            listed.len(),
            1,
            "the healthy destination is left out: {listed:?}"
        );
        let leftovers: Vec<_> = fs::read_dir(&dir.0)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary file is left behind");

        // After the cool-down, a still-failing destination fires again.
        {
            let r = &recorder;
            refusing(r, "10.0.0.1:80", 430.0, 15);
        }
        assert_eq!(recorder.tick(&mut writer, at(440.0)).len(), 1);
        assert_eq!(writer.bundles_written(), 2);
    }

    #[test]
    fn a_bundle_says_which_failures_followed_a_dns_timeout() {
        use crate::diagnose::after_dns::tests::{RESOLVER, failed_for, query};
        use crate::dns::{DnsConfig, DnsState, exchange::DnsOutcome};
        let dir = TempDir::new("dns");
        let config = DnsConfig::new(&[], Duration::from_secs(5), 100, 100, 100).unwrap();
        let dns = DnsState::shared(&config, crate::decode::Clock::now());
        dns.lock()
            .unwrap()
            .finish_for_test(query("api.lab", at(99.0), DnsOutcome::Timeout));
        let mut writer = EvidenceWriter::new(TriggerConfig::new(dir.0.clone()))
            .unwrap()
            .with_dns(Some(dns));
        let recorder = Recorded::new(1000);
        for i in 0..12 {
            recorder.push(&failed_for(
                "10.0.0.2:443",
                "api.lab",
                at(100.0 + f64::from(i)),
            ));
        }
        let written = recorder.tick(&mut writer, at(120.0));
        assert_eq!(written.len(), 1);
        let bundle: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&written[0]).unwrap()).unwrap();
        let after = &bundle["verdicts"][0]["evidence"]["after_dns_timeout"];
        assert_eq!(after["failures"], 12, "{bundle:#}");
        assert_eq!(after["names"][0]["name"], "api.lab");
        assert_eq!(after["resolvers"][0], RESOLVER);
    }

    #[test]
    fn too_few_attempts_or_a_healthy_minute_do_not_fire() {
        let dir = TempDir::new("quiet");
        let mut writer = EvidenceWriter::new(TriggerConfig::new(dir.0.clone())).unwrap();
        let recorder = Recorded::new(1000);
        {
            let r = &recorder;
            refusing(r, "10.0.0.1:80", 100.0, 5);
            for i in 0..50 {
                r.push(&connect_ok("10.0.0.2:80", at(100.0 + i as f64), 900));
            }
        }
        assert!(recorder.tick(&mut writer, at(150.0)).is_empty());
        assert_eq!(writer.bundles_written(), 0);
    }

    #[test]
    fn slow_p99_fires_on_latency() {
        let dir = TempDir::new("latency");
        let mut writer = EvidenceWriter::new(TriggerConfig::new(dir.0.clone())).unwrap();
        let recorder = Recorded::new(1000);
        {
            let r = &recorder;
            for i in 0..20 {
                let us = if i % 5 == 0 { 1_500_000 } else { 800 };
                r.push(&connect_ok("10.0.0.3:443", at(100.0 + i as f64), us));
            }
        }
        let fired = writer.triggered(&recorder.snapshot(at(125.0)));
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].cause, TriggerCause::Latency);
        assert_eq!(recorder.tick(&mut writer, at(125.0)).len(), 1);
    }

    #[test]
    fn bundles_are_bounded_in_number_and_size() {
        let dir = TempDir::new("bounds");
        let mut config = TriggerConfig::new(dir.0.clone());
        config.max_bundles = 3;
        config.max_events_per_bundle = 7;
        let mut writer = EvidenceWriter::new(config).unwrap();
        let recorder = Recorded::new(10_000);
        // Ten different failing destinations, each firing once.
        for d in 0..10 {
            let dest = format!("10.0.1.{d}:8080");
            refusing(&recorder, &dest, 1000.0 + d as f64, 12);
            recorder.tick(&mut writer, at(1001.5 + d as f64));
        }
        assert_eq!(writer.bundles_written(), 10);
        let mut kept = list_bundles(&dir.0).unwrap();
        kept.sort();
        assert_eq!(kept.len(), 3, "the oldest are deleted");
        let newest = kept.last().unwrap().to_string_lossy().into_owned();
        assert!(newest.contains("10_0_1_9_8080"), "{newest}");
        let bundle: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(kept.last().unwrap()).unwrap()).unwrap();
        assert_eq!(bundle["events"].as_array().unwrap().len(), 7);
        assert_eq!(bundle["events_total"], 12);
        assert_eq!(bundle["events_dropped"], 5);
    }

    #[test]
    fn the_trigger_thread_stops_when_told() {
        let dir = TempDir::new("thread");
        let writer = EvidenceWriter::new(TriggerConfig::new(dir.0.clone())).unwrap();
        let recorded = Recorded::new(100);
        let (aggregator, recorder) = (Arc::new(recorded.aggregator), Arc::new(recorded.recorder));
        let stop = Arc::new(AtomicBool::new(false));
        let counter = writer.bundles_written_counter();
        let handle = writer
            .spawn(aggregator, recorder, Arc::clone(&stop))
            .unwrap();
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap();
        assert_eq!(counter.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn atomic_write_replaces_whole_files_and_leaves_no_temporary() {
        let dir = TempDir::new("atomic");
        fs::create_dir_all(&dir.0).unwrap();
        write_atomically(&dir.0, "x.json", b"first").unwrap();
        write_atomically(&dir.0, "x.json", b"second").unwrap();
        assert_eq!(fs::read(dir.0.join("x.json")).unwrap(), b"second");
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1);
        // A directory that is gone fails cleanly, without a stray file.
        let gone = dir.0.join("missing");
        assert!(write_atomically(&gone, "y.json", b"z").is_err());
    }

    #[test]
    fn the_stats_are_the_aggregators_last_minute() {
        let recorder = Recorded::new(1000);
        for i in 0..10 {
            recorder.push(&connect_ok("10.0.0.1:80", at(i as f64), 1000 * (i + 1)));
        }
        for i in 0..4 {
            recorder.push(&connect_failed(
                "10.0.0.1:80",
                at(10.0 + i as f64),
                FailureReason::Refused,
                0,
            ));
        }
        recorder.push(&connect_ok("10.0.0.2:80", at(12.0), 100));
        let snapshot = recorder.snapshot(at(14.0));
        assert_eq!(snapshot.destinations.len(), 2);
        let s = TriggerStats::of(&snapshot.destinations[0].last_1m);
        assert_eq!((s.attempts, s.established, s.failures), (14, 10, 4));
        assert_eq!(s.failures_by_reason["refused"], 4);
        assert!((s.failure_ratio - 4.0 / 14.0).abs() < 1e-12);
        // The aggregator's histogram: the nearest-rank sample's bucket, within 12.5%.
        let near = |got: Option<u64>, want: f64| (got.unwrap() as f64 - want).abs() <= want * 0.125;
        assert!(near(s.latency_p50_us, 5000.0), "{s:?}");
        assert!(near(s.latency_p99_us, 10_000.0), "{s:?}");
        let fired = EvidenceWriter::new(TriggerConfig::new(std::env::temp_dir()))
            .unwrap()
            .triggered(&snapshot);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].destination.to_string(), "10.0.0.1:80");
        assert_eq!(fired[0].destination.side_name(), Some("client"));
    }
}
