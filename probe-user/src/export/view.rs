//! `GET /destinations`: the agent's per-destination state as one JSON document, what
//! `connprobe top` shows (and what a script can read). One serde type, [`View`], for writing
//! (the agent) and reading (`top`), built from what the agent already holds:
//!
//! - the aggregator's [`Snapshot`]: each destination's last minute or five (attempts, failures
//!   by reason, handshake percentiles, SYN retransmits, resets), worst first;
//! - the [`Tally`]: events delivered, produced, lost by stage, the agent's own traffic;
//! - the verdict engine, judging the flight recorder's events of the same window (what
//!   `/diagnose` does): each destination's top verdict, and for the one asked about
//!   (`destination=`), every verdict with its evidence, its handshake-latency histogram and its
//!   last events.
//!
//! Query: `window=1m` (default) or `5m`; `destination=ADDR` (percent-encoded, `other` for the
//! fold; under `--by-comm` the label with its ` (comm)`) adds `detail`.
use std::{
    collections::BTreeMap,
    fmt,
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use strum::VariantArray;

use crate::{
    aggregate::{self, Aggregator, DestinationSummary},
    destination::Destination,
    diagnose::{
        self, FlightRecorder,
        client::report_at,
        verdict::{DestinationReport, Pattern, ProcessEvidence, Report, VerdictId},
    },
    event::{Event, EventKind, FailureReason},
    tally::Tally,
};

/// Events listed in a destination's detail.
pub const DETAIL_EVENTS: usize = 20;

/// The windows the view can cover: the aggregator's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ViewWindow {
    #[default]
    #[serde(rename = "1m")]
    OneMinute,
    #[serde(rename = "5m")]
    FiveMinutes,
}

impl ViewWindow {
    pub fn length(self) -> Duration {
        aggregate::BUCKET * self.buckets() as u32
    }

    pub fn buckets(self) -> usize {
        match self {
            ViewWindow::OneMinute => aggregate::BUCKETS_1M,
            ViewWindow::FiveMinutes => aggregate::BUCKETS_5M,
        }
    }

    /// The other one (the console's `w` key).
    pub fn toggled(self) -> Self {
        match self {
            ViewWindow::OneMinute => ViewWindow::FiveMinutes,
            ViewWindow::FiveMinutes => ViewWindow::OneMinute,
        }
    }
}

impl fmt::Display for ViewWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ViewWindow::OneMinute => "1m",
            ViewWindow::FiveMinutes => "5m",
        })
    }
}

impl FromStr for ViewWindow {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "1m" | "60s" | "60" => Ok(ViewWindow::OneMinute),
            "5m" | "300s" | "300" => Ok(ViewWindow::FiveMinutes),
            _ => Err(format!("the window is 1m or 5m, not {s:?}")),
        }
    }
}

/// The whole document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct View {
    pub agent: AgentStatus,
    pub window: WindowSpan,
    pub events: EventTotals,
    /// Worst first (the aggregator's order: most failed connects in the window, then ...).
    pub destinations: Vec<DestinationRow>,
    /// Destinations with a label of their own now (`connprobe_destinations_tracked`).
    pub tracked: usize,
    /// `connprobe_destinations_folded_total`.
    pub folded_total: u64,
    /// The destination asked about with `destination=`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<DestinationDetail>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub version: String,
    /// RFC 3339 UTC, milliseconds: when this view was made, and when the agent started.
    pub now: String,
    pub started: String,
    pub uptime_seconds: f64,
    /// Whether destinations are split by process name (`--by comm`).
    pub by_comm: bool,
    /// Whether destinations are split by container (`--by container`).
    #[serde(default)]
    pub by_container: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowSpan {
    pub name: ViewWindow,
    /// The event time the figures cover: the window's whole 10-second buckets and the current
    /// one so far, at most the agent's uptime. Rates divide by it.
    pub seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventTotals {
    /// Since the agent started, by type (`connprobe_events_total`).
    pub delivered: BTreeMap<String, u64>,
    pub delivered_total: u64,
    pub produced_in_kernel: u64,
    /// By stage (`connprobe_events_lost_total`): every stage, 0 included.
    pub lost: BTreeMap<String, u64>,
    pub undecodable: u64,
    /// Events of the agent's own connections, left out (`connprobe_own_traffic_events_total`).
    pub own_traffic: u64,
}

/// One destination over the window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DestinationRow {
    /// `ip:port` (`[v6]:port`), or `other` for the destinations folded together.
    pub destination: String,
    /// The process name, under `--by comm` only.
    pub comm: Option<String>,
    /// The container's short id, `host` or `unknown`, under `--by container` only.
    #[serde(default)]
    pub container: Option<String>,
    /// False for a destination that gave up its label when idle (no series in `/metrics`).
    pub labelled: bool,
    /// RFC 3339 UTC, milliseconds.
    pub last_seen: String,
    /// Connects this host opened to it, established or failed.
    pub attempts: u64,
    pub attempts_per_second: f64,
    pub established: u64,
    /// Connects this host accepted on it (a service of this host).
    pub accepted: u64,
    /// Failed connects by reason (`refused`, `timeout`, `unreachable`, `cancelled`, `other`);
    /// only reasons that occurred.
    pub failures: BTreeMap<String, u64>,
    /// Failed / attempted; null without attempts.
    pub failure_ratio: Option<f64>,
    /// Handshake times of established connects; null without any.
    pub handshake: Option<HandshakeLatency>,
    /// SYNs (and SYN-ACKs) resent.
    pub syn_retransmits: u64,
    /// Segments resent, every phase.
    pub retransmitted_segments: u64,
    /// Of the connections that closed: retransmitted / sent segments.
    pub retransmit_ratio: Option<f64>,
    pub resets_received: u64,
    pub resets_sent: u64,
    /// The verdict engine's top verdict on this address over the window (the worse of its
    /// client and server sides); null for `other` and when the flight recorder holds none of
    /// its events.
    pub verdict: Option<VerdictBrief>,
    /// The processes behind its events (from the verdict's evidence), most events first.
    #[serde(default)]
    pub processes: Vec<ProcessEvidence>,
}

impl DestinationRow {
    /// `ADDR`, `ADDR (comm)`, `ADDR [container]` or `ADDR (comm) [container]`, as the
    /// query's `destination=` takes it.
    pub fn label(&self) -> String {
        let mut label = self.destination.clone();
        if let Some(comm) = &self.comm {
            label.push_str(&format!(" ({comm})"));
        }
        if let Some(container) = &self.container {
            label.push_str(&format!(" [{container}]"));
        }
        label
    }

    pub fn failures_total(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// Percentiles in milliseconds (bucket midpoints: within 12.5% of the exact value).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HandshakeLatency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub samples: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerdictBrief {
    pub verdict: VerdictId,
    /// `client` or `server`: which side of the address the verdict is about.
    pub side: Option<String>,
    pub confidence: f64,
    pub pattern: Pattern,
}

/// The destination asked about.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DestinationDetail {
    /// As asked (`ADDR`, `ADDR (comm)` or `other`).
    pub destination: String,
    /// The engine's reports on this address over the window, one per side, each with every
    /// verdict, its evidence and next step (as `/diagnose` has them).
    pub reports: Vec<DestinationReport>,
    /// Handshake times over the window, by histogram bucket; only buckets with samples.
    pub handshake_histogram: Vec<HistogramBucket>,
    /// Its last events (at most [`DETAIL_EVENTS`]), oldest first, as JSON log lines.
    pub events: Vec<Event>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramBucket {
    /// Microseconds, `from` included, `to` excluded.
    pub from_us: u64,
    pub to_us: u64,
    pub count: u64,
}

/// What a request asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ViewRequest {
    pub window: ViewWindow,
    /// A destination's label for `detail`.
    pub destination: Option<String>,
}

impl ViewRequest {
    /// From a query string (`window=5m&destination=10.0.0.2%3A8081`).
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut request = ViewRequest::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = super::http::percent_decode(value)
                .ok_or_else(|| format!("bad {key} {value:?}: not percent-encoded UTF-8"))?;
            match key {
                "window" => request.window = value.parse()?,
                "destination" => request.destination = Some(value),
                _ => {}
            }
        }
        Ok(request)
    }

    /// The query string that asks for this.
    pub fn query(&self) -> String {
        let mut query = format!("window={}", self.window);
        if let Some(destination) = &self.destination {
            query.push_str("&destination=");
            query.push_str(&percent_encode(destination));
        }
        query
    }
}

/// Everything but unreserved characters percent-encoded.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What a view is made from.
#[derive(Clone)]
pub struct ViewSources {
    pub aggregator: Arc<Mutex<Aggregator>>,
    pub recorder: Arc<Mutex<FlightRecorder>>,
    pub tally: Arc<Tally>,
    /// When the agent started.
    pub started: SystemTime,
}

impl ViewSources {
    /// The view for `request` at `now`.
    pub fn view(&self, request: &ViewRequest, now: SystemTime) -> View {
        let window = request.window;
        let snapshot = self
            .aggregator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot(now);
        let uptime = now.duration_since(self.started).unwrap_or_default();
        let seconds = aggregate::covered(now, window.buckets()).min(uptime);
        // The same engine and window as /diagnose.
        let report = report_at(&self.recorder, None, self.started, window.length(), now).ok();
        let destinations = snapshot
            .destinations
            .iter()
            .map(|s| row(s, window, seconds, report.as_ref()))
            .collect();
        let detail = request
            .destination
            .as_ref()
            .map(|label| self.detail(label, window, report.as_ref(), now));
        View {
            agent: AgentStatus {
                version: env!("CARGO_PKG_VERSION").to_string(),
                now: diagnose::format_time(now),
                started: diagnose::format_time(self.started),
                uptime_seconds: diagnose::round(uptime.as_secs_f64(), 3),
                by_comm: snapshot.by_comm,
                by_container: snapshot.by_container,
            },
            window: WindowSpan {
                name: window,
                seconds: diagnose::round(seconds.as_secs_f64(), 3),
            },
            events: totals(&self.tally),
            destinations,
            tracked: snapshot.tracked,
            folded_total: snapshot.folded_total,
            detail,
        }
    }

    fn detail(
        &self,
        label: &str,
        window: ViewWindow,
        report: Option<&Report>,
        now: SystemTime,
    ) -> DestinationDetail {
        let histogram = self
            .aggregator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .latency_histogram(label, now, window.buckets());
        // The address without the ` (comm)` and ` [container]` of --by.
        let address = label.split([' ']).next().unwrap_or(label);
        let reports = report
            .map(|r| {
                r.destinations
                    .iter()
                    .filter(|d| d.destination == address)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let since = now.checked_sub(window.length()).unwrap_or(now);
        let events = self
            .recorder
            .lock()
            .map(|r| {
                r.last_where(DETAIL_EVENTS, |e| {
                    e.time >= since && Destination::of(e).addr.to_string() == address
                })
            })
            .unwrap_or_default();
        DestinationDetail {
            destination: label.to_string(),
            reports,
            handshake_histogram: histogram
                .map(|h| {
                    h.buckets()
                        .into_iter()
                        .map(|(from_us, to_us, count)| HistogramBucket {
                            from_us,
                            to_us,
                            count,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            events,
        }
    }

    /// The `/destinations` handler: the query string in, an HTTP status and a JSON body out.
    pub fn handler(self) -> impl Fn(Option<String>) -> (u16, String) + Send + Sync + 'static {
        move |query| {
            let request = match ViewRequest::parse(query.as_deref()) {
                Ok(request) => request,
                Err(message) => {
                    return (400, serde_json::json!({ "error": message }).to_string());
                }
            };
            match serde_json::to_string(&self.view(&request, SystemTime::now())) {
                Ok(body) => (200, body),
                Err(e) => (
                    500,
                    serde_json::json!({ "error": format!("cannot format the view: {e}") })
                        .to_string(),
                ),
            }
        }
    }
}

fn totals(tally: &Tally) -> EventTotals {
    EventTotals {
        delivered: EventKind::VARIANTS
            .iter()
            .map(|k| (k.name().to_string(), tally.delivered(*k)))
            .collect(),
        delivered_total: tally.delivered_total(),
        produced_in_kernel: tally.produced(),
        lost: tally.lost_by_stage(),
        undecodable: tally.undecodable(),
        own_traffic: tally.own_traffic(),
    }
}

fn row(
    s: &DestinationSummary,
    window: ViewWindow,
    seconds: Duration,
    report: Option<&Report>,
) -> DestinationRow {
    let w = match window {
        ViewWindow::OneMinute => &s.last_1m,
        ViewWindow::FiveMinutes => &s.last_5m,
    };
    let c = &w.counts;
    let ms = |d: Duration| diagnose::round(d.as_secs_f64() * 1e3, 3);
    let top = s
        .destination
        .and_then(|addr| report.and_then(|r| top_verdict(r, &addr.to_string())));
    DestinationRow {
        destination: s.destination_label(),
        comm: s.comm.clone(),
        container: s.container.clone(),
        labelled: s.labelled,
        last_seen: diagnose::format_time(s.last_seen),
        attempts: c.attempts,
        attempts_per_second: match seconds.as_secs_f64() {
            secs if secs > 0.0 => diagnose::round(c.attempts as f64 / secs, 3),
            _ => 0.0,
        },
        established: c.established,
        accepted: c.accepted,
        failures: FailureReason::VARIANTS
            .iter()
            .filter(|r| c.failure(**r) > 0)
            .map(|r| (r.name().to_string(), c.failure(*r)))
            .collect(),
        failure_ratio: c.failure_ratio().map(|r| diagnose::round(r, 4)),
        handshake: w.latency.map(|l| HandshakeLatency {
            p50_ms: ms(l.p50),
            p90_ms: ms(l.p90),
            p99_ms: ms(l.p99),
            samples: l.samples,
        }),
        syn_retransmits: c.syn_retransmitted_segments,
        retransmitted_segments: c.retransmitted_segments,
        retransmit_ratio: c.retransmit_ratio().map(|r| diagnose::round(r, 4)),
        resets_received: c.resets_received,
        resets_sent: c.resets_sent,
        processes: top
            .map(|(_, v)| v.finding.owners().processes.clone())
            .unwrap_or_default(),
        verdict: top.map(|(side, v)| VerdictBrief {
            verdict: v.id(),
            side: side.clone(),
            confidence: v.confidence,
            pattern: v.pattern,
        }),
    }
}

/// The worse top verdict of the address's sides: a problem before healthy before not enough
/// data, then the more confident.
fn top_verdict<'a>(
    report: &'a Report,
    address: &str,
) -> Option<(&'a Option<String>, &'a diagnose::Verdict)> {
    report
        .destinations
        .iter()
        .filter(|d| d.destination == address)
        .filter_map(|d| Some((&d.side, d.verdicts.first()?)))
        .max_by(|(sa, a), (sb, b)| {
            let rank = |v: &diagnose::Verdict| match v.id() {
                id if id.is_problem() => 2,
                VerdictId::Healthy => 1,
                _ => 0,
            };
            rank(a)
                .cmp(&rank(b))
                .then(a.confidence.total_cmp(&b.confidence))
                // At a tie, the side that connects: its failures are what the row counts.
                .then((sa.as_deref() == Some("client")).cmp(&(sb.as_deref() == Some("client"))))
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        aggregate::{
            AggregatorConfig,
            tests::{at, established, event, failed},
        },
        event::{Direction, Side, TcpState, testing},
    };

    /// An agent that started at 0 s: refusals to 10.200.0.2:8081, good connects to :8080, a
    /// lossy :8083, all in the last minute at 30 s.
    pub(crate) fn sources() -> ViewSources {
        let sources = ViewSources {
            aggregator: Arc::new(Mutex::new(Aggregator::new(AggregatorConfig {
                max_destinations: 100,
                destination_idle: Duration::from_secs(600),
                by_comm: false,
                by_container: false,
            }))),
            recorder: Arc::new(Mutex::new(FlightRecorder::new(1000))),
            tally: Arc::new(Tally::default()),
            started: at(0),
        };
        let mut events = Vec::new();
        for i in 0..12 {
            events.push(failed(
                at(20 + i),
                "10.200.0.2:8081",
                FailureReason::Refused,
            ));
            events.push(event(
                at(20 + i),
                Some(Side::Client),
                "10.200.0.2:8081",
                testing::reset(Direction::Received, Some(TcpState::SynSent), None),
            ));
        }
        for i in 0..30 {
            events.push(established(at(i), "10.200.0.2:8080", 150 + 10 * i));
        }
        events.push(event(
            at(25),
            Some(Side::Client),
            "10.200.0.2:8083",
            testing::retransmitted(TcpState::SynSent, 2),
        ));
        events.push(failed(at(27), "10.200.0.2:8083", FailureReason::Timeout));
        for e in &events {
            sources.tally.add_delivered(e.kind(), 1);
            sources.aggregator.lock().unwrap().record(e);
            sources.recorder.lock().unwrap().push(e);
        }
        sources
    }

    #[test]
    fn the_view_of_a_fixed_state() {
        let view = sources().view(&ViewRequest::default(), at(35));
        assert_eq!(view.agent.uptime_seconds, 35.0);
        assert_eq!(view.window.name, ViewWindow::OneMinute);
        assert_eq!(view.window.seconds, 35.0, "no more than the agent's uptime");
        assert_eq!(view.events.delivered_total, 56);
        assert_eq!(view.events.lost["ringbuf"], 0);
        let order: Vec<_> = view
            .destinations
            .iter()
            .map(|d| d.destination.as_str())
            .collect();
        assert_eq!(
            order,
            ["10.200.0.2:8081", "10.200.0.2:8083", "10.200.0.2:8080"]
        );
        let refused = &view.destinations[0];
        assert_eq!(refused.attempts, 12);
        assert_eq!(refused.failures["refused"], 12);
        assert_eq!(refused.failure_ratio, Some(1.0));
        assert_eq!(refused.resets_received, 12);
        assert_eq!(refused.attempts_per_second, round3(12.0 / 35.0));
        let verdict = refused.verdict.as_ref().unwrap();
        assert_eq!(verdict.verdict, VerdictId::Refused);
        assert_eq!(verdict.side.as_deref(), Some("client"));
        assert_eq!(refused.processes[0].comm, "curl");
        let lossy = &view.destinations[1];
        assert_eq!((lossy.syn_retransmits, lossy.failures["timeout"]), (2, 1));
        let healthy = &view.destinations[2];
        assert_eq!(healthy.handshake.as_ref().unwrap().samples, 30);
        assert_eq!(
            healthy.verdict.as_ref().unwrap().verdict,
            VerdictId::Healthy
        );
        assert!(view.detail.is_none());

        // Round trip: `top` reads what the agent writes.
        let json = serde_json::to_string(&view).unwrap();
        assert_eq!(serde_json::from_str::<View>(&json).unwrap(), view);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["window"]["name"], "1m");
        assert_eq!(value["destinations"][0]["verdict"]["verdict"], "refused");
    }

    fn round3(x: f64) -> f64 {
        diagnose::round(x, 3)
    }

    #[test]
    fn the_detail_of_one_destination() {
        let request = ViewRequest {
            window: ViewWindow::FiveMinutes,
            destination: Some("10.200.0.2:8080".to_string()),
        };
        let view = sources().view(&request, at(35));
        let detail = view.detail.unwrap();
        assert_eq!(detail.reports.len(), 1);
        assert_eq!(detail.reports[0].verdicts[0].id(), VerdictId::Healthy);
        let samples: u64 = detail.handshake_histogram.iter().map(|b| b.count).sum();
        assert_eq!(samples, 30);
        assert_eq!(detail.handshake_histogram[0].from_us, 128);
        assert_eq!(detail.events.len(), DETAIL_EVENTS);
        assert_eq!(detail.events.last().unwrap().time, at(29));
    }

    #[test]
    fn queries() {
        assert_eq!(ViewRequest::parse(None), Ok(ViewRequest::default()));
        let request = ViewRequest {
            window: ViewWindow::FiveMinutes,
            destination: Some("[fd00::2]:8080 (curl)".to_string()),
        };
        let query = request.query();
        assert_eq!(
            query,
            "window=5m&destination=%5Bfd00%3A%3A2%5D%3A8080%20%28curl%29"
        );
        assert_eq!(ViewRequest::parse(Some(&query)), Ok(request));
        assert!(ViewRequest::parse(Some("window=2m")).is_err());
        assert!(ViewRequest::parse(Some("destination=%zz")).is_err());
    }

    #[test]
    fn the_handler_answers_json() {
        let handler = sources().handler();
        let (status, body) = handler(Some("window=5m".to_string()));
        assert_eq!(status, 200);
        let view: View = serde_json::from_str(&body).unwrap();
        assert_eq!(view.window.name, ViewWindow::FiveMinutes);
        let (status, body) = handler(Some("window=1h".to_string()));
        assert_eq!(status, 400);
        assert!(body.contains("1m or 5m"), "{body}");
    }
}
