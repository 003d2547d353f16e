//! `/metrics`: a Prometheus collector that reads what the agent already holds, at scrape time.
//!
//! Per-destination families come from an aggregator [`Snapshot`] (taken under its lock, for
//! the length of a copy); event and loss counts from the [`Tally`]; the bundle count from the
//! evidence writer's counter. Nothing is pushed into a registry from the hot path, and a
//! destination's series go away with its slot. Names and labels are a contract (dashboards and
//! alert rules depend on them): see README "Prometheus metrics". Label values come from the
//! same derived names as the JSON log.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::SystemTime,
};

use prometheus::{
    Registry, TextEncoder,
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};
use strum::VariantArray;

use crate::{
    aggregate::{Aggregator, BackendSummary, DestinationSummary, OTHER, SideLabel, Snapshot},
    event::{Direction, EventKind, FailureReason, Phase},
    tally::{LossStage, Tally},
};

/// Every family: name, help, type, and the labels of its series before `comm` (which
/// per-destination families get last under `--by-comm`).
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    per_destination: bool,
    labels: &'static [&'static str],
}

const FAMILIES: [Family; 19] = [
    Family {
        name: "connprobe_connect_attempts_total",
        help: "Connects this host opened to the destination (established or failed).",
        kind: MetricType::COUNTER,
        per_destination: true,
        labels: &["destination"],
    },
    Family {
        name: "connprobe_connect_failures_total",
        help: "Connects to the destination that failed, by reason (refused, timeout, unreachable, \
               cancelled, other).",
        kind: MetricType::COUNTER,
        per_destination: true,
        labels: &["destination", "reason"],
    },
    Family {
        name: "connprobe_connect_duration_seconds",
        help: "Handshake time of established connects to the destination (SYN sent to \
               ESTABLISHED).",
        kind: MetricType::HISTOGRAM,
        per_destination: true,
        labels: &["destination"],
    },
    Family {
        name: "connprobe_retransmits_total",
        help: "TCP segments retransmitted, by side and connection phase (syn, established, or \
               the TCP state's name); summed they match the kernel's TcpRetransSegs less \
               TCPRetransFail.",
        kind: MetricType::COUNTER,
        per_destination: true,
        labels: &["destination", "side", "phase"],
    },
    Family {
        name: "connprobe_segments_sent_total",
        help: "TCP data segments sent, retransmissions included, counted when the connection \
               closes: the denominator of the retransmit ratio.",
        kind: MetricType::COUNTER,
        per_destination: true,
        labels: &["destination", "side"],
    },
    Family {
        name: "connprobe_resets_total",
        help: "TCP resets, by side and direction (sent, received).",
        kind: MetricType::COUNTER,
        per_destination: true,
        labels: &["destination", "side", "direction"],
    },
    Family {
        name: "connprobe_drops_total",
        help: "Packets of the destination's TCP connections (and DNS packets) that the kernel \
               dropped on this host, by the kernel's drop reason (enum skb_drop_reason).",
        kind: MetricType::COUNTER,
        per_destination: true,
        labels: &["destination", "reason"],
    },
    Family {
        name: "connprobe_listen_overflows_total",
        help: "SYNs or handshake completions dropped because the accept queue of this host's \
               listener at the destination was full (its network namespace's ListenOverflows).",
        kind: MetricType::COUNTER,
        per_destination: true,
        labels: &["destination"],
    },
    Family {
        name: "connprobe_conntrack_drops_total",
        help: "Connection tracking failures in the network namespaces connprobe reads, by kind: \
               insert_failed, drop (table full), early_drop (entries evicted to make room).",
        kind: MetricType::COUNTER,
        per_destination: false,
        labels: &["kind"],
    },
    Family {
        name: "connprobe_events_total",
        help: "Events delivered from the kernel to the agent, by type.",
        kind: MetricType::COUNTER,
        per_destination: false,
        labels: &["type"],
    },
    Family {
        name: "connprobe_events_lost_total",
        help: "Events lost, by stage: ringbuf (kernel ring buffer full), map (connect start \
               evicted from the kernel socket map), queue (agent queue full), log (log write \
               failed).",
        kind: MetricType::COUNTER,
        per_destination: false,
        labels: &["stage"],
    },
    Family {
        name: "connprobe_own_traffic_events_total",
        help: "Events of the agent's own connections (to or from its HTTP endpoint: scrapes, \
               diagnose, top), left out of the log, the destinations and the verdicts unless \
               --include-own-traffic is given.",
        kind: MetricType::COUNTER,
        per_destination: false,
        labels: &[],
    },
    Family {
        name: "connprobe_destinations_tracked",
        help: "Destinations that currently have their own destination label.",
        kind: MetricType::GAUGE,
        per_destination: false,
        labels: &[],
    },
    Family {
        name: "connprobe_destinations_folded_total",
        help: "Distinct destinations counted into destination=\"other\" because every label \
               slot was taken; one that stays idle for --destination-idle counts again if it \
               returns.",
        kind: MetricType::COUNTER,
        per_destination: false,
        labels: &[],
    },
    Family {
        name: "connprobe_evidence_bundles_total",
        help: "Evidence bundles written to --evidence-dir because a destination crossed a \
               trigger threshold.",
        kind: MetricType::COUNTER,
        per_destination: false,
        labels: &[],
    },
    Family {
        name: "connprobe_build_info",
        help: "Always 1; the version label says which connprobe is running.",
        kind: MetricType::GAUGE,
        per_destination: false,
        labels: &["version"],
    },
    Family {
        name: "connprobe_backend_connect_attempts_total",
        help: "Connects this host opened to a translated (DNAT) destination, by the backend \
               their SYN went to (seen after the nat hooks); bounded like destinations, the rest \
               under destination=\"other\", backend=\"other\".",
        kind: MetricType::COUNTER,
        per_destination: false,
        labels: &["destination", "backend"],
    },
    Family {
        name: "connprobe_backend_connect_failures_total",
        help: "Connects to a translated (DNAT) destination that failed, by backend and reason.",
        kind: MetricType::COUNTER,
        per_destination: false,
        labels: &["destination", "backend", "reason"],
    },
    Family {
        name: "connprobe_program_runs_missed_total",
        help: "Runs of connprobe's eBPF programs that the kernel skipped because a BPF program \
               was already running on that CPU (the programs' recursion_misses); what those runs \
               would have reported is lost.",
        kind: MetricType::COUNTER,
        per_destination: false,
        labels: &[],
    },
];

/// Index of each family in [`FAMILIES`].
const ATTEMPTS: usize = 0;
const FAILURES: usize = 1;
const DURATION: usize = 2;
const RETRANSMITS: usize = 3;
const SEGMENTS_SENT: usize = 4;
const RESETS: usize = 5;
const DROPS: usize = 6;
const LISTEN_OVERFLOWS: usize = 7;
const CONNTRACK: usize = 8;
const EVENTS: usize = 9;
const LOST: usize = 10;
const OWN_TRAFFIC: usize = 11;
const TRACKED: usize = 12;
const FOLDED: usize = 13;
const BUNDLES: usize = 14;
const BUILD_INFO: usize = 15;
const BACKEND_ATTEMPTS: usize = 16;
const BACKEND_FAILURES: usize = 17;
const MISSED_RUNS: usize = 18;

/// What the collector reads.
#[derive(Clone)]
pub struct Sources {
    pub aggregator: Arc<Mutex<Aggregator>>,
    pub tally: Arc<Tally>,
    /// The evidence writer's count of bundles written, when it runs.
    pub bundles_written: Option<Arc<AtomicU64>>,
}

struct AgentCollector {
    descs: Vec<Desc>,
    sources: Sources,
}

impl Collector for AgentCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snapshot = self
            .sources
            .aggregator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot(SystemTime::now());
        let bundles = self
            .sources
            .bundles_written
            .as_ref()
            .map_or(0, |b| b.load(Relaxed));
        families(&snapshot, &self.sources.tally, bundles)
    }
}

/// The agent's metrics, in one registry.
pub struct PrometheusExporter {
    registry: Registry,
}

impl PrometheusExporter {
    pub fn new(sources: Sources) -> Self {
        let config = *sources
            .aggregator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config();
        let descs = FAMILIES
            .iter()
            .map(|f| {
                Desc::new(
                    f.name.to_string(),
                    f.help.to_string(),
                    label_names(f, config.by_comm, config.by_container)
                        .into_iter()
                        .map(str::to_string)
                        .collect(),
                    HashMap::new(),
                )
                .expect("metric names, help and labels are valid")
            })
            .collect();
        let registry = Registry::new();
        registry
            .register(Box::new(AgentCollector { descs, sources }))
            .expect("the collector is registered once");
        PrometheusExporter { registry }
    }

    /// Adds a collector of another part of the agent (DNS) to the same registry.
    pub fn register(&self, collector: Box<dyn Collector>) {
        self.registry
            .register(collector)
            .expect("each collector is registered once, with its own families");
    }

    /// Every metric in the text exposition format 0.0.4.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("text encoding of gathered metrics cannot fail");
        out
    }
}

fn label_names(family: &Family, by_comm: bool, by_container: bool) -> Vec<&'static str> {
    let mut names = family.labels.to_vec();
    if family.per_destination && by_comm {
        names.push("comm");
    }
    if family.per_destination && by_container {
        names.push("container");
    }
    names
}

/// The families of one snapshot; series that always exist (events by type, losses by stage,
/// the destination gauges, build info) are there at 0 from the start.
fn families(snapshot: &Snapshot, tally: &Tally, bundles: u64) -> Vec<MetricFamily> {
    let mut metrics: Vec<Vec<proto::Metric>> = FAMILIES.iter().map(|_| Vec::new()).collect();
    // Destinations without a label now are in the snapshot for their windows only.
    for d in snapshot.destinations.iter().filter(|d| d.labelled) {
        destination_series(d, &mut metrics);
    }
    let c = &snapshot.conntrack;
    for (kind, n) in [
        ("insert_failed", c.insert_failed),
        ("drop", c.drop),
        ("early_drop", c.early_drop),
    ] {
        metrics[CONNTRACK].push(counter(&[("kind", kind)], n as f64));
    }
    backend_series(&snapshot.backends, &mut metrics);
    for kind in EventKind::VARIANTS.iter().filter(|k| k.from_kernel()) {
        let value = tally.delivered(*kind) as f64;
        metrics[EVENTS].push(counter(&[("type", kind.name())], value));
    }
    for stage in LossStage::VARIANTS {
        let value = tally.lost(*stage) as f64;
        metrics[LOST].push(counter(&[("stage", stage.name())], value));
    }
    metrics[OWN_TRAFFIC].push(counter(&[], tally.own_traffic() as f64));
    metrics[MISSED_RUNS].push(counter(&[], tally.missed_runs() as f64));
    metrics[TRACKED].push(gauge(&[], snapshot.tracked as f64));
    metrics[FOLDED].push(counter(&[], snapshot.folded_total as f64));
    metrics[BUNDLES].push(counter(&[], bundles as f64));
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    metrics[BUILD_INFO].push(gauge(&version, 1.0));
    FAMILIES
        .iter()
        .zip(metrics)
        .map(|(f, metrics)| {
            let mut family = MetricFamily::default();
            family.set_name(f.name.to_string());
            family.set_help(f.help.to_string());
            family.set_field_type(f.kind);
            family.set_metric(metrics);
            family
        })
        .collect()
}

/// Every series of one destination label that has seen an event.
fn destination_series(d: &DestinationSummary, metrics: &mut [Vec<proto::Metric>]) {
    let destination = d.destination_label();
    let labels = |extra: &[(&'static str, &str)]| {
        let mut pairs = vec![("destination", destination.as_str())];
        pairs.extend_from_slice(extra);
        if let Some(comm) = &d.comm {
            pairs.push(("comm", comm.as_str()));
        }
        if let Some(container) = &d.container {
            pairs.push(("container", container.as_str()));
        }
        label_pairs(pairs)
    };
    let s = &d.series;
    if let Some(n) = s.attempts {
        metrics[ATTEMPTS].push(metric(labels(&[]), counter_value(n)));
    }
    for (reason, cell) in FailureReason::VARIANTS.iter().zip(&s.failures) {
        if let Some(n) = cell {
            let pairs = labels(&[("reason", reason.name())]);
            metrics[FAILURES].push(metric(pairs, counter_value(*n)));
        }
    }
    if let Some(h) = &s.duration {
        let mut histogram = proto::Histogram::default();
        histogram.set_sample_count(h.count);
        histogram.set_sample_sum(h.sum_seconds);
        histogram.set_bucket(
            h.cumulative()
                .map(|(bound, count)| {
                    let mut bucket = proto::Bucket::default();
                    bucket.set_upper_bound(bound);
                    bucket.set_cumulative_count(count);
                    bucket
                })
                .collect(),
        );
        let mut m = proto::Metric::default();
        m.set_label(labels(&[]));
        m.set_histogram(histogram);
        metrics[DURATION].push(m);
    }
    for (side, cells) in SideLabel::VARIANTS.iter().zip(&s.retransmits) {
        for (phase, cell) in Phase::VARIANTS.iter().zip(cells) {
            if let Some(n) = cell {
                let pairs = labels(&[("side", side.name()), ("phase", phase.name())]);
                metrics[RETRANSMITS].push(metric(pairs, counter_value(*n)));
            }
        }
    }
    for (side, cell) in SideLabel::VARIANTS.iter().zip(&s.segments_sent) {
        if let Some(n) = cell {
            let pairs = labels(&[("side", side.name())]);
            metrics[SEGMENTS_SENT].push(metric(pairs, counter_value(*n)));
        }
    }
    for (side, cells) in SideLabel::VARIANTS.iter().zip(&s.resets) {
        for (direction, cell) in Direction::VARIANTS.iter().zip(cells) {
            if let Some(n) = cell {
                let pairs = labels(&[("side", side.name()), ("direction", direction.name())]);
                metrics[RESETS].push(metric(pairs, counter_value(*n)));
            }
        }
    }
    for (reason, n) in &s.drops {
        let pairs = labels(&[("reason", reason.as_str())]);
        metrics[DROPS].push(metric(pairs, counter_value(*n)));
    }
    if let Some(n) = s.listen_overflows {
        metrics[LISTEN_OVERFLOWS].push(metric(labels(&[]), counter_value(n)));
    }
}

/// Attempts and failures per (destination, backend) pair.
fn backend_series(backends: &[BackendSummary], metrics: &mut [Vec<proto::Metric>]) {
    for b in backends {
        let name =
            |e: Option<crate::event::Endpoint>| e.map_or(OTHER.to_string(), |e| e.to_string());
        let (destination, backend) = (name(b.destination), name(b.backend));
        let pairs = [
            ("destination", destination.as_str()),
            ("backend", backend.as_str()),
        ];
        metrics[BACKEND_ATTEMPTS].push(counter(&pairs, b.counts.attempts as f64));
        for (reason, &n) in FailureReason::VARIANTS.iter().zip(&b.counts.failures) {
            if n > 0 {
                let mut labels = pairs.to_vec();
                labels.push(("reason", reason.name()));
                metrics[BACKEND_FAILURES].push(counter(&labels, n as f64));
            }
        }
    }
}

/// Label pairs sorted by name, as the exposition format has them.
fn label_pairs(mut pairs: Vec<(&str, &str)>) -> Vec<proto::LabelPair> {
    pairs.sort_by_key(|(name, _)| *name);
    pairs
        .into_iter()
        .map(|(name, value)| {
            let mut pair = proto::LabelPair::default();
            pair.set_name(name.to_string());
            pair.set_value(value.to_string());
            pair
        })
        .collect()
}

enum Value {
    Counter(f64),
    Gauge(f64),
}

fn counter_value(n: u64) -> Value {
    Value::Counter(n as f64)
}

fn metric(labels: Vec<proto::LabelPair>, value: Value) -> proto::Metric {
    let mut m = proto::Metric::default();
    m.set_label(labels);
    match value {
        Value::Counter(v) => {
            let mut c = proto::Counter::default();
            c.set_value(v);
            m.set_counter(c);
        }
        Value::Gauge(v) => {
            let mut g = proto::Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        }
    }
    m
}

fn counter(labels: &[(&str, &str)], value: f64) -> proto::Metric {
    metric(label_pairs(labels.to_vec()), Value::Counter(value))
}

fn gauge(labels: &[(&str, &str)], value: f64) -> proto::Metric {
    metric(label_pairs(labels.to_vec()), Value::Gauge(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregate::{
            AggregatorConfig,
            tests::{self as agg, Fixture},
        },
        event::{Comm, FailureReason, Side},
    };

    fn sample_lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn known_series_start_at_zero() {
        let text = Fixture::new(10, false).encode();
        for t in ["connect", "retransmit", "reset", "close", "drop"] {
            let line = format!("connprobe_events_total{{type=\"{t}\"}} 0");
            assert!(text.contains(&line), "{line} missing in\n{text}");
        }
        // Made by the agent from counters, not delivered by the kernel: not counted there.
        assert!(!text.contains("type=\"listen_overflow\""), "{text}");
        for k in ["insert_failed", "drop", "early_drop"] {
            let line = format!("connprobe_conntrack_drops_total{{kind=\"{k}\"}} 0");
            assert!(text.contains(&line), "{line} missing in\n{text}");
        }
        for s in ["ringbuf", "map", "queue", "log"] {
            let line = format!("connprobe_events_lost_total{{stage=\"{s}\"}} 0");
            assert!(text.contains(&line), "{line} missing in\n{text}");
        }
        assert!(text.contains("\nconnprobe_destinations_tracked 0\n"));
        assert!(text.contains("\nconnprobe_own_traffic_events_total 0\n"));
        assert!(text.contains("\nconnprobe_destinations_folded_total 0\n"));
        let build = format!(
            "connprobe_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        // Per-destination families have no series until a destination shows up.
        assert!(
            sample_lines(&text)
                .iter()
                .all(|l| !l.contains("destination=")),
            "{text}"
        );
    }

    #[test]
    fn backends_behind_a_destination_have_their_own_series() {
        let fixture = Fixture::new(10, false);
        let t = agg::at(0);
        let via = |backend: &str, mut e: crate::event::Event| {
            e.backend = Some(backend.parse().unwrap());
            e
        };
        let vip = "10.96.0.10:80";
        fixture.record(&via(
            "10.1.4.7:8080",
            agg::failed(t, vip, FailureReason::Refused),
        ));
        fixture.record(&via("10.1.4.8:8080", agg::established(t, vip, 100)));
        let text = fixture.encode();
        for line in [
            r#"connprobe_backend_connect_attempts_total{backend="10.1.4.7:8080",destination="10.96.0.10:80"} 1"#,
            r#"connprobe_backend_connect_attempts_total{backend="10.1.4.8:8080",destination="10.96.0.10:80"} 1"#,
            r#"connprobe_backend_connect_failures_total{backend="10.1.4.7:8080",destination="10.96.0.10:80",reason="refused"} 1"#,
            r#"connprobe_connect_attempts_total{destination="10.96.0.10:80"} 2"#,
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(!text.contains(r#"backend="10.1.4.8:8080",destination="10.96.0.10:80",reason"#));
    }

    #[test]
    fn every_metric_has_help_and_the_documented_type() {
        let fixture = Fixture::new(10, true);
        // Make the per-destination families appear.
        let d = "10.0.0.1:80";
        let t = agg::at(0);
        fixture.record(&agg::established(t, d, 1000));
        fixture.record(&agg::failed(t, d, FailureReason::Refused));
        for detail in agg::every_other_kind() {
            fixture.record(&agg::event(t, Some(Side::Client), d, detail));
        }
        let text = fixture.encode();
        let expected = [
            ("connprobe_connect_attempts_total", "counter"),
            ("connprobe_connect_failures_total", "counter"),
            ("connprobe_connect_duration_seconds", "histogram"),
            ("connprobe_retransmits_total", "counter"),
            ("connprobe_segments_sent_total", "counter"),
            ("connprobe_resets_total", "counter"),
            ("connprobe_drops_total", "counter"),
            ("connprobe_listen_overflows_total", "counter"),
            ("connprobe_conntrack_drops_total", "counter"),
            ("connprobe_events_total", "counter"),
            ("connprobe_events_lost_total", "counter"),
            ("connprobe_own_traffic_events_total", "counter"),
            ("connprobe_program_runs_missed_total", "counter"),
            ("connprobe_destinations_tracked", "gauge"),
            ("connprobe_destinations_folded_total", "counter"),
            ("connprobe_evidence_bundles_total", "counter"),
            ("connprobe_build_info", "gauge"),
        ];
        for (name, kind) in expected {
            let help = text
                .lines()
                .find(|l| l.starts_with(&format!("# HELP {name} ")))
                .unwrap_or_else(|| panic!("no HELP for {name}"));
            assert!(help.len() > name.len() + 20, "{help}");
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} is not a {kind}"
            );
        }
        let families: std::collections::BTreeSet<_> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert_eq!(families.len(), expected.len(), "{families:?}");
        assert!(text.contains(
            r#"connprobe_retransmits_total{comm="curl",destination="10.0.0.1:80",phase="syn",side="client"} 1"#
        ), "{text}");
        // Buckets from 50 us to 10 s, then +Inf.
        assert!(text.contains(r#"le="0.00005""#), "{text}");
        assert!(text.contains(r#"le="10""#));
        assert!(text.contains(r#"le="+Inf""#));
        assert!(sample_lines(&text).iter().all(|l| !l.contains("le=\"20\"")));
    }

    /// `promtool check metrics` on what the agent really serves: every family populated through
    /// the aggregator, with and without the comm label, including a folded destination.
    #[test]
    fn promtool_finds_nothing_to_report() {
        use std::{io::Write, process::Command, time::Duration};

        for by_comm in [false, true] {
            let fixture = Fixture::with_config(AggregatorConfig {
                max_destinations: 2,
                destination_idle: Duration::from_secs(600),
                by_comm,
                by_container: false,
            });
            let t = agg::at(0);
            fixture.record(&agg::established(t, "10.0.0.1:80", 120));
            fixture.record(&agg::failed(t, "[fd00::1]:443", FailureReason::Refused));
            fixture.record(&agg::established(t, "10.0.0.3:80", 120));
            let mut weird = agg::failed(t, "10.0.0.1:80", FailureReason::Timeout);
            weird.process.as_mut().unwrap().comm =
                Comm::from_kernel(b"a\"b\\c\nd\xff\0\0\0\0\0\0\0\0");
            fixture.record(&weird);
            for detail in agg::every_other_kind() {
                fixture.record(&agg::event(t, Some(Side::Client), "10.0.0.1:80", detail));
            }
            fixture.tally.add_lost(LossStage::Map, 2);
            let text = fixture.encode();

            let child = Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn();
            let mut child = child.expect(
                "promtool is needed by this test: install the Debian package `prometheus` \
                 (Fedora: `golang-github-prometheus`); `cargo xtask test` installs it",
            );
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && report.trim().is_empty(),
                "promtool: {report}\non:\n{text}"
            );
            assert!(text.contains("destination=\"other\""), "{text}");
        }
    }

    #[test]
    fn losses_and_bundles_are_read_where_they_are_counted() {
        let mut fixture = Fixture::new(10, false);
        fixture.tally.add_lost(LossStage::Queue, 3);
        fixture.tally.set_kernel(crate::tally::KernelCounts {
            lost_ringbuf: 12,
            ..Default::default()
        });
        fixture.tally.add_delivered(EventKind::Close, 1);
        let bundles = Arc::new(AtomicU64::new(2));
        fixture.bundles(bundles.clone());
        let text = fixture.encode();
        assert!(text.contains("connprobe_events_lost_total{stage=\"ringbuf\"} 12\n"));
        assert!(text.contains("connprobe_events_lost_total{stage=\"queue\"} 3\n"));
        assert!(text.contains("connprobe_events_total{type=\"close\"} 1\n"));
        assert!(text.contains("\nconnprobe_evidence_bundles_total 2\n"));
        bundles.fetch_add(1, Relaxed);
        assert!(
            fixture
                .encode()
                .contains("\nconnprobe_evidence_bundles_total 3\n")
        );
    }
}
