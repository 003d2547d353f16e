use std::{
    sync::{Arc, Mutex, MutexGuard, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use super::*;
use crate::{
    event::{
        FailureReason, TcpState,
        testing::{self, owned_by},
    },
    export::prometheus::{PrometheusExporter, Sources},
    tally::Tally,
};

/// Seconds after the test epoch.
pub(crate) fn at(secs: u64) -> SystemTime {
    testing::at(secs as f64)
}

/// An event from this host (10.200.0.1:40000, pid 42 `curl`) to `dst`.
pub(crate) fn event(time: SystemTime, side: Option<Side>, dst: &str, detail: EventDetail) -> Event {
    owned_by(
        testing::event(side, "10.200.0.1:40000", dst, time, detail),
        42,
        "curl",
    )
}

pub(crate) fn established(time: SystemTime, dst: &str, latency_us: u64) -> Event {
    event(
        time,
        Some(Side::Client),
        dst,
        testing::established(latency_us),
    )
}

pub(crate) fn failed(time: SystemTime, dst: &str, reason: FailureReason) -> Event {
    event(time, Some(Side::Client), dst, testing::failed(reason, 0))
}

fn retransmit(time: SystemTime, dst: &str, state: TcpState, segments: u32) -> Event {
    event(
        time,
        Some(Side::Client),
        dst,
        testing::retransmitted(state, segments),
    )
}

fn reset(
    time: SystemTime,
    side: Option<Side>,
    direction: Direction,
    state: Option<TcpState>,
) -> Event {
    event(
        time,
        side,
        "10.200.0.2:8081",
        testing::reset(direction, state, None),
    )
}

fn close(time: SystemTime, dst: &str, sent: u32, retransmitted: u32) -> Event {
    event(
        time,
        Some(Side::Client),
        dst,
        testing::closed(sent, retransmitted),
    )
}

/// One event of each kind other than connect, for a destination's every family to appear.
pub(crate) fn every_other_kind() -> Vec<EventDetail> {
    vec![
        testing::retransmitted(TcpState::SynSent, 1),
        testing::retransmitted(TcpState::Established, 4),
        testing::reset(Direction::Received, Some(TcpState::Established), None),
        testing::closed(9, 4),
        testing::data_dropped("10.0.0.1:80", testing::at(0.0), "NETFILTER_DROP", 3).detail,
        testing::overflowed("10.0.0.1:80", testing::at(0.0), 2, Some(1)).detail,
    ]
}

/// An aggregator as the pipeline has it: behind its lock, fed with the tally's delivered
/// counts, read by the Prometheus exporter.
pub(crate) struct Fixture {
    pub(crate) aggregator: Arc<Mutex<Aggregator>>,
    pub(crate) tally: Arc<Tally>,
    exporter: PrometheusExporter,
}

impl Fixture {
    pub(crate) fn new(max: usize, by_comm: bool) -> Self {
        Self::with_config(AggregatorConfig {
            by_comm,
            ..config(max)
        })
    }

    pub(crate) fn with_config(config: AggregatorConfig) -> Self {
        let aggregator = Arc::new(Mutex::new(Aggregator::new(config)));
        let tally = Arc::new(Tally::default());
        let exporter = PrometheusExporter::new(Sources {
            aggregator: aggregator.clone(),
            tally: tally.clone(),
            bundles_written: None,
        });
        Fixture {
            aggregator,
            tally,
            exporter,
        }
    }

    /// The exporter reads `bundles` for `connprobe_evidence_bundles_total`.
    pub(crate) fn bundles(&mut self, bundles: Arc<AtomicU64>) {
        self.exporter = PrometheusExporter::new(Sources {
            aggregator: self.aggregator.clone(),
            tally: self.tally.clone(),
            bundles_written: Some(bundles),
        });
    }

    /// One event through the pipeline: delivered, then aggregated.
    pub(crate) fn record(&self, event: &Event) {
        self.tally.add_delivered(event.kind(), 1);
        self.agg().record(event);
    }

    pub(crate) fn agg(&self) -> MutexGuard<'_, Aggregator> {
        self.aggregator.lock().unwrap()
    }

    pub(crate) fn encode(&self) -> String {
        self.exporter.encode()
    }
}

fn config(max: usize) -> AggregatorConfig {
    AggregatorConfig {
        max_destinations: max,
        destination_idle: Duration::from_secs(600),
        by_comm: false,
        by_container: false,
    }
}

/// The value of the sample line that starts with `series` (name and labels), if any.
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// Distinct destination label values in the exposition.
fn destinations(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split("destination=\"").nth(1))
        .map(|rest| rest.split('"').next().unwrap().to_string())
        .collect()
}

#[test]
fn destination_is_remote_for_clients_and_local_for_servers() {
    let f = Fixture::new(10, false);
    let t = at(0);
    f.record(&reset(
        t,
        Some(Side::Client),
        Direction::Received,
        Some(TcpState::SynSent),
    ));
    f.record(&reset(
        t,
        Some(Side::Server),
        Direction::Sent,
        Some(TcpState::Established),
    ));
    // A reset sent without a socket answers a SYN: server side.
    f.record(&reset(t, None, Direction::Sent, None));
    // Side unknown otherwise: the client view, labelled side="unknown".
    f.record(&reset(
        t,
        None,
        Direction::Received,
        Some(TcpState::Established),
    ));
    let text = f.encode();
    let expect = [
        r#"connprobe_resets_total{destination="10.200.0.2:8081",direction="received",side="client"}"#,
        r#"connprobe_resets_total{destination="10.200.0.1:40000",direction="sent",side="server"}"#,
        r#"connprobe_resets_total{destination="10.200.0.2:8081",direction="received",side="unknown"}"#,
    ];
    assert_eq!(sample(&text, expect[0]), Some(1.0), "{text}");
    assert_eq!(sample(&text, expect[1]), Some(2.0), "{text}");
    assert_eq!(sample(&text, expect[2]), Some(1.0), "{text}");
    assert_eq!(f.agg().tracked(), 2);
    // IPv4-mapped addresses are the IPv4 destination.
    f.record(&established(t, "[::ffff:10.200.0.2]:8081", 100));
    assert_eq!(f.agg().tracked(), 2);
}

#[test]
fn counters_follow_the_events() {
    let f = Fixture::new(10, false);
    let d = "10.200.0.2:8080";
    let t = at(0);
    for us in [100, 200, 300] {
        f.record(&established(t, d, us));
    }
    f.record(&failed(t, d, FailureReason::Refused));
    f.record(&failed(t, d, FailureReason::Timeout));
    f.record(&retransmit(t, d, TcpState::SynSent, 1));
    f.record(&retransmit(t, d, TcpState::Established, 7));
    f.record(&retransmit(t, d, TcpState::Established, 3));
    f.record(&retransmit(t, d, TcpState::CloseWait, 2));
    f.record(&close(t, d, 100, 10));
    f.record(&close(t, d, 50, 0));
    // Accepted by this host: not an attempt.
    let mut accepted = established(t, d, 100);
    accepted.side = Some(Side::Server);
    accepted.src = d.parse().unwrap();
    f.record(&accepted);

    let text = f.encode();
    let s = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series}\n{text}"));
    let dl = r#"destination="10.200.0.2:8080""#;
    assert_eq!(s(&format!("connprobe_connect_attempts_total{{{dl}}}")), 5.0);
    assert_eq!(
        s(&format!(
            r#"connprobe_connect_failures_total{{{dl},reason="refused"}}"#
        )),
        1.0
    );
    assert_eq!(
        s(&format!(
            r#"connprobe_connect_failures_total{{{dl},reason="timeout"}}"#
        )),
        1.0
    );
    assert_eq!(
        s(&format!("connprobe_connect_duration_seconds_count{{{dl}}}")),
        3.0
    );
    assert_eq!(
        s(&format!(
            r#"connprobe_connect_duration_seconds_bucket{{{dl},le="0.00025"}}"#
        )),
        2.0
    );
    assert!((s(&format!("connprobe_connect_duration_seconds_sum{{{dl}}}")) - 0.0006).abs() < 1e-9);
    let retx = |phase: &str| {
        s(&format!(
            r#"connprobe_retransmits_total{{{dl},phase="{phase}",side="client"}}"#
        ))
    };
    assert_eq!(retx("syn"), 1.0);
    assert_eq!(retx("established"), 10.0);
    assert_eq!(retx("close_wait"), 2.0);
    assert_eq!(
        s(&format!(
            r#"connprobe_segments_sent_total{{{dl},side="client"}}"#
        )),
        150.0
    );
    assert_eq!(s(r#"connprobe_events_total{type="connect"}"#), 6.0);
    assert_eq!(s(r#"connprobe_events_total{type="retransmit"}"#), 4.0);
    assert_eq!(s(r#"connprobe_events_total{type="close"}"#), 2.0);
    assert_eq!(s(r#"connprobe_events_total{type="reset"}"#), 0.0);
    assert_eq!(s("connprobe_destinations_tracked"), 1.0);
    // No failure series for reasons that never happened.
    assert!(!text.contains(r#"reason="cancelled""#));

    let sum = &f.agg().summaries(t)[0];
    assert_eq!(sum.destination, Some(d.parse().unwrap()));
    let life = sum.lifetime;
    assert_eq!((life.attempts, life.established, life.accepted), (5, 3, 1));
    assert_eq!(life.failure(FailureReason::Refused), 1);
    assert_eq!(life.failures_total(), 2);
    assert_eq!(life.retransmitted_segments, 13);
    assert_eq!(
        (life.close_segments_sent, life.close_segments_retransmitted),
        (150, 10)
    );
    assert_eq!(sum.last_1m.counts, life);
    assert_eq!(sum.last_1m.failure_ratio(), Some(0.4));
    assert_eq!(sum.last_1m.retransmit_ratio(), Some(10.0 / 150.0));
}

#[test]
fn table_is_capped_and_overflow_folds_into_other() {
    // 10 slots, 1 kept for failing destinations: 9 for healthy ones.
    let f = Fixture::new(10, false);
    for port in 0..30u16 {
        let d = format!("10.0.0.1:{}", 1000 + port);
        // Several events each: a folded destination counts once.
        for s in 0..3 {
            f.record(&established(at(s), &d, 100));
        }
    }
    let text = f.encode();
    assert_eq!(f.agg().tracked(), 9);
    assert_eq!(sample(&text, "connprobe_destinations_tracked"), Some(9.0));
    assert_eq!(
        sample(&text, "connprobe_destinations_folded_total"),
        Some(21.0)
    );
    let labels = destinations(&text);
    assert_eq!(labels.len(), 10, "{labels:?}");
    assert!(labels.contains("other"));
    assert_eq!(
        sample(
            &text,
            r#"connprobe_connect_attempts_total{destination="other"}"#
        ),
        Some(63.0)
    );
    let summaries = f.agg().summaries(at(3));
    assert_eq!(summaries.len(), 10);
    assert_eq!(
        summaries.iter().filter(|s| s.destination.is_none()).count(),
        1
    );
}

#[test]
fn failing_destination_gets_a_reserved_slot_after_healthy_ones_filled_the_table() {
    let f = Fixture::new(10, false);
    for port in 0..20u16 {
        f.record(&established(
            at(0),
            &format!("10.0.0.1:{}", 1000 + port),
            100,
        ));
    }
    assert_eq!(f.agg().tracked(), 9);
    f.record(&failed(at(1), "10.0.0.9:8081", FailureReason::Refused));
    assert_eq!(f.agg().tracked(), 10);
    let text = f.encode();
    assert_eq!(
        sample(
            &text,
            r#"connprobe_connect_failures_total{destination="10.0.0.9:8081",reason="refused"}"#
        ),
        Some(1.0)
    );
    // Its later healthy events stay on its own label.
    f.record(&established(at(2), "10.0.0.9:8081", 100));
    // The reserve is used up: the next failing destination folds.
    f.record(&failed(at(2), "10.0.0.9:8082", FailureReason::Refused));
    assert_eq!(f.agg().tracked(), 10);
    let text = f.encode();
    assert_eq!(
        sample(
            &text,
            r#"connprobe_connect_attempts_total{destination="10.0.0.9:8081"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"connprobe_connect_failures_total{destination="other",reason="refused"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "connprobe_destinations_folded_total"),
        Some(12.0)
    );
}

#[test]
fn idle_destinations_free_their_slot_and_series() {
    let f = Fixture::with_config(AggregatorConfig {
        max_destinations: 2,
        destination_idle: Duration::from_secs(30),
        by_comm: false,
        by_container: false,
    });
    f.record(&established(at(0), "10.0.0.1:80", 100));
    f.record(&established(at(0), "10.0.0.2:80", 100));
    f.record(&established(at(20), "10.0.0.2:80", 100));
    // Full (2 slots, no reserve below 10): the third folds.
    f.record(&established(at(20), "10.0.0.3:80", 100));
    assert_eq!(f.agg().tracked(), 2);
    f.agg().expire_idle(at(29));
    assert_eq!(f.agg().tracked(), 2);
    f.agg().expire_idle(at(30));
    assert_eq!(f.agg().tracked(), 1);
    let text = f.encode();
    assert!(!text.contains("10.0.0.1:80"), "{text}");
    assert!(text.contains("10.0.0.2:80"));
    assert_eq!(sample(&text, "connprobe_destinations_tracked"), Some(1.0));
    // The folded destination takes the free slot on its next event; it is no longer folded.
    f.record(&established(at(31), "10.0.0.3:80", 100));
    assert_eq!(f.agg().tracked(), 2);
    // The first one returns: its counter restarts, but the table is full again, so it folds.
    f.record(&established(at(32), "10.0.0.1:80", 100));
    let text = f.encode();
    assert_eq!(
        sample(
            &text,
            r#"connprobe_connect_attempts_total{destination="10.0.0.3:80"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "connprobe_destinations_folded_total"),
        Some(2.0)
    );
    // Everything idle: every label and `other` go, and the folded set forgets. Their last five
    // minutes stay in the windowed views, without labels, until they age out.
    f.agg().expire_idle(at(100));
    assert_eq!(f.agg().tracked(), 0);
    assert!(f.agg().summaries(at(100)).iter().all(|s| !s.labelled));
    let text = f.encode();
    assert!(destinations(&text).is_empty(), "{text}");
    // A destination folded before and idle since counts again when folded again.
    f.record(&established(at(101), "10.0.0.4:80", 100));
    f.record(&established(at(101), "10.0.0.5:80", 100));
    f.record(&established(at(101), "10.0.0.1:80", 100));
    assert_eq!(
        sample(&f.encode(), "connprobe_destinations_folded_total"),
        Some(3.0)
    );
}

/// Issue 18: with `--destination-idle 3s` the table's last minute showed 0 attempts for
/// destinations with traffic within it, because freeing a label slot cleared its windows.
#[test]
fn a_freed_label_keeps_the_windows_history() {
    let f = Fixture::with_config(AggregatorConfig {
        max_destinations: 10,
        destination_idle: Duration::from_secs(3),
        by_comm: false,
        by_container: false,
    });
    let d = "10.0.0.1:80";
    // A connect every 5 s, each followed by its close 4 s later: idle for 3 s in between.
    for i in 0..6 {
        let t = 100 + 5 * i;
        f.record(&established(at(t), d, 100));
        f.agg().expire_idle(at(t + 3));
        f.record(&close(at(t + 4), d, 10, 0));
        f.agg().expire_idle(at(t + 4));
    }
    f.agg().expire_idle(at(133));
    let summaries = f.agg().summaries(at(133));
    let s = summaries
        .iter()
        .find(|s| s.label() == d)
        .expect("still in the views");
    assert!(!s.labelled, "idle for 3 s: no label");
    assert_eq!(s.last_1m.counts.attempts, 6, "{s:#?}");
    assert_eq!(s.last_1m.counts.close_segments_sent, 60);
    // No series while it has no label...
    assert!(!destinations(&f.encode()).contains(d));
    // ...and back with one, its windows carry on while its counters restart.
    f.record(&established(at(134), d, 100));
    let s = f.agg().summaries(at(134)).remove(0);
    assert!(s.labelled);
    assert_eq!(s.last_1m.counts.attempts, 7);
    assert_eq!(s.lifetime.attempts, 1);
    assert_eq!(
        sample(
            &f.encode(),
            r#"connprobe_connect_attempts_total{destination="10.0.0.1:80"}"#
        ),
        Some(1.0)
    );
    // Five minutes after its last event, nothing is left of it.
    f.agg().expire_idle(at(134 + 300));
    assert!(f.agg().summaries(at(134 + 300)).is_empty());
    assert_eq!(f.agg().index.len(), 0);
}

/// Slots without a label are bounded too: at most as many as labels, the longest idle reused.
#[test]
fn unlabelled_slots_are_bounded() {
    let f = Fixture::with_config(AggregatorConfig {
        max_destinations: 10,
        destination_idle: Duration::from_secs(3),
        by_comm: false,
        by_container: false,
    });
    for i in 0..100u64 {
        f.record(&established(
            at(i * 4),
            &format!("10.0.0.1:{}", 1000 + i),
            100,
        ));
        f.agg().expire_idle(at(i * 4 + 3));
    }
    assert!(f.agg().slots.len() <= 20, "{}", f.agg().slots.len());
    assert!(f.agg().index.len() <= 20);
    // The newest are the ones kept.
    let labels: Vec<_> = f
        .agg()
        .summaries(at(400))
        .iter()
        .map(|s| s.label())
        .collect();
    assert!(labels.contains(&"10.0.0.1:1099".to_string()), "{labels:?}");
    assert!(!labels.contains(&"10.0.0.1:1000".to_string()), "{labels:?}");
}

#[test]
fn windows_give_ratios_and_percentiles_by_event_time() {
    let f = Fixture::new(10, false);
    let d = "10.0.0.1:443";
    // Four minutes ago: 10 established at 10 ms, 10 refused.
    for _ in 0..10 {
        f.record(&established(at(0), d, 10_000));
        f.record(&failed(at(0), d, FailureReason::Refused));
    }
    f.record(&close(at(0), d, 1000, 100));
    // In the last minute: 99 established at 100 us, 1 at 1 s, 1 timeout.
    for _ in 0..99 {
        f.record(&established(at(240), d, 100));
    }
    f.record(&established(at(241), d, 1_000_000));
    f.record(&failed(at(242), d, FailureReason::Timeout));
    f.record(&close(at(242), d, 1000, 10));
    let s = &f.agg().summaries(at(245))[0];
    let m1 = &s.last_1m;
    assert_eq!(m1.length, Duration::from_secs(60));
    assert_eq!(m1.counts.attempts, 101);
    assert_eq!(m1.counts.failure(FailureReason::Timeout), 1);
    assert_eq!(m1.counts.failure(FailureReason::Refused), 0);
    assert_eq!(m1.failure_ratio(), Some(1.0 / 101.0));
    assert_eq!(m1.retransmit_ratio(), Some(0.01));
    let l = m1.latency.unwrap();
    assert_eq!(l.samples, 100);
    assert_eq!(l.p50, Duration::from_micros(104));
    assert_eq!(l.p90, Duration::from_micros(104));
    assert_eq!(l.p99, Duration::from_micros(104));
    let m5 = &s.last_5m;
    assert_eq!(m5.length, Duration::from_secs(300));
    assert_eq!(m5.counts.attempts, 121);
    assert_eq!(m5.failure_ratio(), Some(11.0 / 121.0));
    assert_eq!(m5.retransmit_ratio(), Some(110.0 / 2000.0));
    let l = m5.latency.unwrap();
    assert_eq!(l.samples, 110);
    assert_eq!(l.p50, Duration::from_micros(104));
    assert_eq!(l.p90, Duration::from_micros(104));
    assert_eq!(l.p99, Duration::from_micros(9_216));
    // Five minutes on, the windows are empty but the lifetime counts stay.
    let s = &f.agg().summaries(at(600))[0];
    assert_eq!(s.last_5m.counts.attempts, 0);
    assert_eq!(s.last_5m.latency, None);
    assert_eq!(s.last_5m.failure_ratio(), None);
    assert_eq!(s.lifetime.attempts, 121);
}

#[test]
fn summaries_are_worst_first() {
    let f = Fixture::new(10, false);
    let t = at(0);
    f.record(&established(t, "10.0.0.1:80", 100));
    f.record(&established(t, "10.0.0.1:80", 100));
    f.record(&failed(t, "10.0.0.2:80", FailureReason::Refused));
    for _ in 0..3 {
        f.record(&failed(t, "10.0.0.3:80", FailureReason::Timeout));
    }
    f.record(&established(t, "10.0.0.4:80", 100));
    f.record(&close(t, "10.0.0.4:80", 100, 5));
    let order: Vec<_> = f.agg().summaries(t).iter().map(|s| s.label()).collect();
    assert_eq!(
        order,
        ["10.0.0.3:80", "10.0.0.2:80", "10.0.0.4:80", "10.0.0.1:80"]
    );
}

#[test]
fn by_comm_adds_a_bounded_comm_label() {
    let f = Fixture::new(10, true);
    let d = "10.0.0.1:80";
    f.record(&established(at(0), d, 100));
    let mut wget = established(at(0), d, 100);
    wget.process.as_mut().unwrap().comm = Comm::from_str_lossy("wget");
    f.record(&wget);
    let mut nobody = established(at(0), d, 100);
    nobody.process = None;
    f.record(&nobody);
    for port in 0..20u16 {
        f.record(&established(at(0), &format!("10.0.0.2:{port}"), 100));
    }
    assert_eq!(f.agg().tracked(), 9);
    let text = f.encode();
    for comm in ["curl", "wget", "unknown"] {
        let series =
            format!(r#"connprobe_connect_attempts_total{{comm="{comm}",destination="{d}"}}"#);
        assert_eq!(sample(&text, &series), Some(1.0), "{series}\n{text}");
    }
    assert_eq!(
        sample(
            &text,
            r#"connprobe_connect_attempts_total{comm="other",destination="other"}"#
        ),
        Some(14.0)
    );
    let labels: Vec<_> = f.agg().summaries(at(0)).iter().map(|s| s.label()).collect();
    assert!(
        labels.contains(&"10.0.0.1:80 (wget)".to_string()),
        "{labels:?}"
    );
}

#[test]
fn memory_stays_flat_whatever_the_number_of_destinations() {
    let f = Fixture::new(500, false);
    for i in 0..200_000u32 {
        let d = format!("10.{}.{}.{}:80", (i >> 16) & 255, (i >> 8) & 255, i & 255);
        f.record(&established(at(u64::from(i) / 1000), &d, 100));
    }
    assert_eq!(f.agg().tracked(), 450);
    assert!(f.agg().slots.len() <= 500);
    assert!(f.agg().index.capacity() < 2048);
    assert_eq!(f.agg().folded.len(), folded::CAPACITY);
    // Every destination past the table counts, remembered or not.
    assert_eq!(
        sample(&f.encode(), "connprobe_destinations_folded_total"),
        Some(199_550.0)
    );
}
