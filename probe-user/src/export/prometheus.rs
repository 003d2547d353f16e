//! The Prometheus metrics: one registry that owns every `connprobe_*` series.
//!
//! Names and labels are a contract (dashboards and alert rules depend on them): see issue 3 and
//! README. Every counter is atomic, so `/metrics` encodes without taking the aggregator's lock;
//! the aggregator creates and removes the per-destination series (it alone knows which
//! destinations have a label) and keeps a handle on each so that the hot path is one atomic add.
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::event::EventType;

/// `Content-Type` of [`Metrics::encode`]'s output: the text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets of `connprobe_connect_duration_seconds`: 50 us to 10 s, 1-2.5-5 steps.
pub const CONNECT_DURATION_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Where events were lost, the `stage` label of `connprobe_events_lost_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LossStage {
    /// The kernel could not reserve room in the ring buffer: the reader fell behind.
    Ringbuf,
    /// A connect's start record was evicted from the kernel's socket map.
    Map,
    /// The agent's queue to a consumer was full.
    Queue,
    /// Writing the JSON log failed.
    Log,
}

impl LossStage {
    pub const ALL: [LossStage; 4] = [
        LossStage::Ringbuf,
        LossStage::Map,
        LossStage::Queue,
        LossStage::Log,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LossStage::Ringbuf => "ringbuf",
            LossStage::Map => "map",
            LossStage::Queue => "queue",
            LossStage::Log => "log",
        }
    }

    fn index(self) -> usize {
        match self {
            LossStage::Ringbuf => 0,
            LossStage::Map => 1,
            LossStage::Queue => 2,
            LossStage::Log => 3,
        }
    }
}

pub(crate) fn event_index(kind: EventType) -> usize {
    match kind {
        EventType::Connect => 0,
        EventType::Retransmit => 1,
        EventType::Reset => 2,
        EventType::Close => 3,
    }
}

/// Every metric connprobe exports, registered in one [`Registry`].
///
/// Per-destination families carry a `comm` label only when built with `by_comm`; it is always
/// the last label, so [`Metrics::labels`] can cut it off. Cloning shares the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    by_comm: bool,
    pub(crate) connect_attempts: IntCounterVec,
    pub(crate) connect_failures: IntCounterVec,
    pub(crate) connect_duration: HistogramVec,
    pub(crate) retransmits: IntCounterVec,
    pub(crate) segments_sent: IntCounterVec,
    pub(crate) resets: IntCounterVec,
    events: [IntCounter; 4],
    lost: [IntCounter; 4],
    pub(crate) destinations_tracked: IntGauge,
    pub(crate) destinations_folded: IntCounter,
    evidence_bundles: IntCounter,
}

impl Metrics {
    /// Registers every metric; the series known to exist (events by type, losses by stage,
    /// the destination gauges, build info) start at 0 (build info at 1).
    pub fn new(by_comm: bool) -> Self {
        let registry = Registry::new();
        let per_destination = |extra: &[&'static str]| {
            let mut names = vec!["destination"];
            names.extend_from_slice(extra);
            if by_comm {
                names.push("comm");
            }
            names
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let vec = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("metric name, help and labels are valid");
            registry
                .register(Box::new(vec.clone()))
                .expect("each metric is registered once");
            vec
        };

        let connect_attempts = counter_vec(
            "connprobe_connect_attempts_total",
            "Connects this host opened to the destination (established or failed).",
            &per_destination(&[]),
        );
        let connect_failures = counter_vec(
            "connprobe_connect_failures_total",
            "Connects to the destination that failed, by reason (refused, timeout, unreachable, \
             cancelled, other).",
            &per_destination(&["reason"]),
        );
        let connect_duration = HistogramVec::new(
            HistogramOpts::new(
                "connprobe_connect_duration_seconds",
                "Handshake time of established connects to the destination (SYN sent to \
                 ESTABLISHED).",
            )
            .buckets(CONNECT_DURATION_BUCKETS.to_vec()),
            &per_destination(&[]),
        )
        .expect("histogram definition is valid");
        registry
            .register(Box::new(connect_duration.clone()))
            .expect("each metric is registered once");
        let retransmits = counter_vec(
            "connprobe_retransmits_total",
            "TCP segments retransmitted, by side and connection phase (syn, established, or the \
             TCP state's name); summed they match the kernel's TcpRetransSegs.",
            &per_destination(&["side", "phase"]),
        );
        let segments_sent = counter_vec(
            "connprobe_segments_sent_total",
            "TCP data segments sent, retransmissions included, counted when the connection \
             closes: the denominator of the retransmit ratio.",
            &per_destination(&["side"]),
        );
        let resets = counter_vec(
            "connprobe_resets_total",
            "TCP resets, by side and direction (sent, received).",
            &per_destination(&["side", "direction"]),
        );
        let events_vec = counter_vec(
            "connprobe_events_total",
            "Events delivered from the kernel to the agent, by type.",
            &["type"],
        );
        let lost_vec = counter_vec(
            "connprobe_events_lost_total",
            "Events lost, by stage: ringbuf (kernel ring buffer full), map (connect start \
             evicted from the kernel socket map), queue (agent queue full), log (log write \
             failed).",
            &["stage"],
        );
        let destinations_tracked = IntGauge::new(
            "connprobe_destinations_tracked",
            "Destinations that currently have their own destination label.",
        )
        .expect("gauge definition is valid");
        let destinations_folded = IntCounter::new(
            "connprobe_destinations_folded_total",
            "Distinct destinations counted into destination=\"other\" because every label slot \
             was taken; one that stays idle for --destination-idle counts again if it returns.",
        )
        .expect("counter definition is valid");
        let evidence_bundles = IntCounter::new(
            "connprobe_evidence_bundles_total",
            "Evidence bundles written to --evidence-dir because a destination crossed a trigger \
             threshold.",
        )
        .expect("counter definition is valid");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "connprobe_build_info",
                "Always 1; the version label says which connprobe is running.",
            ),
            &["version"],
        )
        .expect("gauge definition is valid");
        for collector in [
            Box::new(destinations_tracked.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(destinations_folded.clone()),
            Box::new(evidence_bundles.clone()),
            Box::new(build_info.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        Metrics {
            registry,
            by_comm,
            connect_attempts,
            connect_failures,
            connect_duration,
            retransmits,
            segments_sent,
            resets,
            events: EventType::ALL.map(|t| events_vec.with_label_values(&[t.as_str()])),
            lost: LossStage::ALL.map(|s| lost_vec.with_label_values(&[s.as_str()])),
            destinations_tracked,
            destinations_folded,
            evidence_bundles,
        }
    }

    /// Raises `connprobe_evidence_bundles_total` to the evidence writer's running total.
    pub fn sync_evidence_bundles(&self, total: u64) {
        let current = self.evidence_bundles.get();
        if total > current {
            self.evidence_bundles.inc_by(total - current);
        }
    }

    /// Whether per-destination series carry a `comm` label.
    pub fn by_comm(&self) -> bool {
        self.by_comm
    }

    /// Label values for a per-destination family: `values` in the family's order, with the
    /// trailing `comm` value dropped unless the metrics were built `by_comm`.
    pub(crate) fn labels<'a, 'b>(&self, values: &'b [&'a str]) -> &'b [&'a str] {
        if self.by_comm {
            values
        } else {
            &values[..values.len() - 1]
        }
    }

    /// Counts one event delivered to the agent (`connprobe_events_total{type}`).
    /// [`crate::aggregate::Aggregator::record`] calls it; call it yourself only for events that
    /// do not go through an aggregator.
    pub fn event_delivered(&self, kind: EventType) {
        self.events[event_index(kind)].inc();
    }

    pub(crate) fn events_counter(&self, kind: EventType) -> &IntCounter {
        &self.events[event_index(kind)]
    }

    /// Adds `n` events lost at `stage` (`connprobe_events_lost_total{stage}`).
    pub fn add_lost(&self, stage: LossStage, n: u64) {
        self.lost[stage.index()].inc_by(n);
    }

    /// Raises the lost count of `stage` to a cumulative total read elsewhere (e.g. the kernel's
    /// per-CPU counters); a total below the current count is ignored, so this never goes down.
    pub fn sync_lost(&self, stage: LossStage, total: u64) {
        let counter = &self.lost[stage.index()];
        let current = counter.get();
        if total > current {
            counter.inc_by(total - current);
        }
    }

    /// The current lost count of `stage`.
    pub fn lost(&self, stage: LossStage) -> u64 {
        self.lost[stage.index()].get()
    }

    /// The current delivered count of `kind`.
    pub fn delivered(&self, kind: EventType) -> u64 {
        self.events[event_index(kind)].get()
    }

    /// Every metric in the text exposition format (see [`CONTENT_TYPE`]). Reads atomics only.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("text encoding of registered metrics cannot fail");
        out
    }

    /// The registry, for a caller that wants to add its own collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn known_series_start_at_zero() {
        let metrics = Metrics::new(false);
        let text = metrics.encode();
        for t in ["connect", "retransmit", "reset", "close"] {
            let line = format!("connprobe_events_total{{type=\"{t}\"}} 0");
            assert!(text.contains(&line), "{line} missing in\n{text}");
        }
        for s in ["ringbuf", "map", "queue", "log"] {
            let line = format!("connprobe_events_lost_total{{stage=\"{s}\"}} 0");
            assert!(text.contains(&line), "{line} missing in\n{text}");
        }
        assert!(text.contains("\nconnprobe_destinations_tracked 0\n"));
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
    fn every_metric_has_help_and_the_documented_type() {
        let metrics = Metrics::new(true);
        // Make the per-destination families appear.
        let d = "10.0.0.1:80";
        metrics
            .connect_attempts
            .with_label_values(&[d, "curl"])
            .inc();
        metrics
            .connect_failures
            .with_label_values(&[d, "refused", "curl"])
            .inc();
        metrics
            .connect_duration
            .with_label_values(&[d, "curl"])
            .observe(0.001);
        metrics
            .retransmits
            .with_label_values(&[d, "client", "syn", "curl"])
            .inc();
        metrics
            .segments_sent
            .with_label_values(&[d, "client", "curl"])
            .inc();
        metrics
            .resets
            .with_label_values(&[d, "client", "received", "curl"])
            .inc();
        let text = metrics.encode();
        let expected = [
            ("connprobe_connect_attempts_total", "counter"),
            ("connprobe_connect_failures_total", "counter"),
            ("connprobe_connect_duration_seconds", "histogram"),
            ("connprobe_retransmits_total", "counter"),
            ("connprobe_segments_sent_total", "counter"),
            ("connprobe_resets_total", "counter"),
            ("connprobe_events_total", "counter"),
            ("connprobe_events_lost_total", "counter"),
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
        ));
        // Buckets from 50 us to 10 s, then +Inf.
        assert!(text.contains(r#"le="0.00005""#), "{text}");
        assert!(text.contains(r#"le="10""#));
        assert!(sample_lines(&text).iter().all(|l| !l.contains("le=\"20\"")));
    }

    /// `promtool check metrics` on what the agent really serves: every family populated through
    /// the aggregator, with and without the comm label, including a folded destination.
    #[test]
    fn promtool_finds_nothing_to_report() {
        use crate::aggregate::{Aggregator, AggregatorConfig, tests as agg};
        use crate::event::{FailureReason, Side};
        use std::{io::Write, process::Command, time::Duration};

        for by_comm in [false, true] {
            let metrics = Metrics::new(by_comm);
            let mut aggregator = Aggregator::new(
                AggregatorConfig {
                    max_destinations: 2,
                    destination_idle: Duration::from_secs(600),
                    by_comm,
                },
                &metrics,
            );
            let t = agg::at(0);
            aggregator.record(&agg::established(t, "10.0.0.1:80", 120));
            aggregator.record(&agg::failed(t, "[fd00::1]:443", FailureReason::Refused));
            aggregator.record(&agg::established(t, "10.0.0.3:80", 120));
            let mut weird = agg::failed(t, "10.0.0.1:80", FailureReason::Timeout);
            weird.process.as_mut().unwrap().comm =
                crate::event::Comm::from_kernel(b"a\"b\\c\nd\xff\0\0\0\0\0\0\0\0");
            aggregator.record(&weird);
            for detail in agg::every_other_kind() {
                aggregator.record(&agg::event(t, Some(Side::Client), "10.0.0.1:80", detail));
            }
            metrics.add_lost(LossStage::Map, 2);
            let text = metrics.encode();

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
    fn losses_count_and_sync_to_a_cumulative_total() {
        let metrics = Metrics::new(false);
        metrics.add_lost(LossStage::Queue, 3);
        metrics.sync_lost(LossStage::Ringbuf, 10);
        metrics.sync_lost(LossStage::Ringbuf, 7);
        metrics.sync_lost(LossStage::Ringbuf, 12);
        metrics.event_delivered(EventType::Close);
        assert_eq!(metrics.lost(LossStage::Queue), 3);
        assert_eq!(metrics.lost(LossStage::Ringbuf), 12);
        assert_eq!(metrics.delivered(EventType::Close), 1);
        let text = metrics.encode();
        assert!(text.contains("connprobe_events_lost_total{stage=\"ringbuf\"} 12\n"));
        assert!(text.contains("connprobe_events_total{type=\"close\"} 1\n"));
    }
}
