//! Every verdict on synthetic event streams, mixtures, and the boundaries. The builders are
//! shared with the other diagnose tests.
use std::time::SystemTime;

use super::*;
pub(crate) use crate::event::testing::{
    accepted, at, close, connect_failed, connect_ok, owned_by, reset_received,
    reset_sent_by_service, reset_sent_for_reason, retransmit,
};
use crate::{
    diagnose::verdict::{Pattern, Verdict},
    event::{FailureReason, Side, TcpState},
};

/// A verdict's evidence as the JSON report has it.
pub(crate) fn evidence(v: &Verdict) -> serde_json::Value {
    serde_json::to_value(v).unwrap()["evidence"].clone()
}

pub(crate) fn window(from: f64, to: f64) -> Window {
    Window {
        start: at(from),
        end: at(to),
    }
}

/// A bit of everything over ten minutes: refused, blackholed, lossy, healthy destinations, a
/// pool with one bad member, a local service resetting.
pub(crate) fn mixed_log() -> Vec<Event> {
    let mut events = Vec::new();
    for i in 0..60 {
        let t = i as f64 * 10.0;
        events.push(connect_failed(
            "10.0.0.1:8081",
            at(t),
            FailureReason::Refused,
            0,
        ));
        events.push(connect_failed(
            "10.0.0.2:8082",
            at(t + 1.0),
            FailureReason::Timeout,
            2,
        ));
        events.push(connect_ok("10.0.0.3:443", at(t + 2.0), 900 + i));
        events.push(close("10.0.0.3:443", at(t + 3.0), 1000, 60));
        events.push(retransmit(
            "10.0.0.3:443",
            at(t + 2.5),
            TcpState::Established,
            30,
        ));
        events.push(connect_ok("10.0.0.4:80", at(t + 4.0), 300));
        for b in 1..=3 {
            let dest = format!("10.0.1.{b}:8080");
            if b == 2 {
                events.push(connect_failed(
                    &dest,
                    at(t + 5.0),
                    FailureReason::Refused,
                    0,
                ));
            } else {
                events.push(connect_ok(&dest, at(t + 5.0), 500));
            }
        }
        events.push(reset_sent_by_service(
            "10.9.9.9:9000",
            at(t + 6.0),
            Some(Side::Server),
            None,
        ));
    }
    events
}

fn top(report: &Report, dest: &str) -> Verdict {
    report
        .destinations
        .iter()
        .find(|d| d.destination == dest)
        .unwrap_or_else(|| panic!("no {dest} in {report:#?}"))
        .verdicts[0]
        .clone()
}

fn find(report: &Report, dest: &str, id: VerdictId) -> Option<Verdict> {
    report
        .destinations
        .iter()
        .filter(|d| d.destination == dest)
        .flat_map(|d| d.verdicts.iter())
        .find(|v| v.id() == id)
        .cloned()
}

fn judged(events: &[Event]) -> Report {
    judge(events, window(-10.0, 10_000.0))
}

/// `n` connects to `dest` over 100 s, `bad` of them produced by `failure`, the rest good.
fn stream(dest: &str, n: usize, bad: usize, failure: impl Fn(SystemTime) -> Event) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let t = at(i as f64 * 100.0 / n as f64);
            if i % (n / bad.max(1)).max(1) == 0 && i / (n / bad.max(1)).max(1) < bad {
                failure(t)
            } else {
                connect_ok(dest, t, 500)
            }
        })
        .collect()
}

#[test]
fn refused() {
    let events = stream("10.0.0.1:80", 40, 40, |t| {
        connect_failed("10.0.0.1:80", t, FailureReason::Refused, 0)
    });
    let report = judged(&events);
    let v = top(&report, "10.0.0.1:80");
    assert_eq!(v.id(), VerdictId::Refused);
    assert!(v.confidence > 0.9, "{v:?}");
    assert_eq!(evidence(&v)["matching"], 40);
    assert_eq!(evidence(&v)["errnos"]["ECONNREFUSED"], 40);
    assert!(v.next_step.contains("10.0.0.1:80"));
    assert_eq!(report.destinations[0].side.as_deref(), Some("client"));
}

#[test]
fn blackhole_needs_unanswered_syns() {
    let mut events = Vec::new();
    for i in 0..10 {
        events.push(connect_failed(
            "10.0.0.2:80",
            at(i as f64 * 10.0),
            FailureReason::Timeout,
            2,
        ));
        events.push(connect_failed(
            "10.0.0.2:80",
            at(i as f64 * 10.0 + 5.0),
            FailureReason::Cancelled,
            1,
        ));
    }
    let v = top(&judged(&events), "10.0.0.2:80");
    assert_eq!(v.id(), VerdictId::Blackhole);
    assert_eq!(evidence(&v)["timeouts"], 10);
    assert_eq!(evidence(&v)["cancelled_after_syn_retransmit"], 10);
    assert_eq!(evidence(&v)["syn_retransmits"], 30);

    // The application giving up before any SYN was retransmitted says nothing about the path.
    let early: Vec<_> = (0..10)
        .map(|i| connect_failed("10.0.0.2:80", at(i as f64), FailureReason::Cancelled, 0))
        .collect();
    assert!(find(&judged(&early), "10.0.0.2:80", VerdictId::Blackhole).is_none());
}

#[test]
fn unreachable() {
    let events = stream("10.0.0.5:22", 30, 15, |t| {
        connect_failed("10.0.0.5:22", t, FailureReason::Unreachable, 0)
    });
    let v = top(&judged(&events), "10.0.0.5:22");
    assert_eq!(v.id(), VerdictId::Unreachable);
    assert_eq!(evidence(&v)["matching"], 15);
    assert!(v.next_step.contains("ip route get 10.0.0.5"));
}

#[test]
fn lossy_from_close_ratios() {
    let mut events = Vec::new();
    for i in 0..30 {
        events.push(connect_ok("10.0.0.3:443", at(i as f64), 800));
        events.push(close("10.0.0.3:443", at(i as f64 + 0.5), 200, 10));
    }
    let v = top(&judged(&events), "10.0.0.3:443");
    assert_eq!(v.id(), VerdictId::Lossy);
    assert_eq!(evidence(&v)["retransmit_ratio"], 0.05);
    assert!(v.confidence > 0.85, "{v:?}");

    // Half a percent is a healthy path.
    let fine: Vec<_> = (0..30)
        .flat_map(|i| {
            [
                connect_ok("10.0.0.3:443", at(i as f64), 800),
                close(
                    "10.0.0.3:443",
                    at(i as f64 + 0.5),
                    200,
                    u32::from(i % 2 == 0),
                ),
            ]
        })
        .collect();
    assert_eq!(top(&judged(&fine), "10.0.0.3:443").id(), VerdictId::Healthy);
}

#[test]
fn lossy_from_retransmits_of_open_connections() {
    let mut events = vec![connect_ok("10.0.0.3:443", at(0.0), 800)];
    for i in 0..20 {
        events.push(retransmit(
            "10.0.0.3:443",
            at(1.0 + i as f64),
            TcpState::Established,
            2,
        ));
    }
    let v = top(&judged(&events), "10.0.0.3:443");
    assert_eq!(v.id(), VerdictId::Lossy);
    assert!(v.confidence <= 0.5, "no ratio, so at most half sure: {v:?}");
    assert_eq!(evidence(&v)["established_retransmit_segments"], 40);
}

#[test]
fn reset_midstream_on_client_connections() {
    let mut events = Vec::new();
    for i in 0..20 {
        events.push(connect_ok("10.0.0.6:5432", at(i as f64 * 5.0), 700));
        events.push(reset_received(
            "10.0.0.6:5432",
            at(i as f64 * 5.0 + 2.0),
            TcpState::Established,
        ));
        events.push(close("10.0.0.6:5432", at(i as f64 * 5.0 + 2.0), 20, 0));
    }
    let v = top(&judged(&events), "10.0.0.6:5432");
    assert_eq!(v.id(), VerdictId::ResetMidstream);
    assert_eq!(evidence(&v)["resets_received"], 20);
    assert_eq!(evidence(&v)["by_state"]["ESTABLISHED"], 20);

    // Resets answering SYNs are refusals, not mid-stream resets.
    let refused: Vec<_> = (0..10)
        .flat_map(|i| {
            [
                reset_received("10.0.0.6:5432", at(i as f64), TcpState::SynSent),
                connect_failed("10.0.0.6:5432", at(i as f64), FailureReason::Refused, 0),
            ]
        })
        .collect();
    let report = judged(&refused);
    assert_eq!(top(&report, "10.0.0.6:5432").id(), VerdictId::Refused);
    assert!(find(&report, "10.0.0.6:5432", VerdictId::ResetMidstream).is_none());
    assert_eq!(
        evidence(&top(&report, "10.0.0.6:5432"))["resets_received_in_syn_sent"],
        10
    );
}

#[test]
fn local_resets_count_against_the_local_service() {
    let mut events = Vec::new();
    for i in 0..15 {
        // Socketless resets answering SYNs: the kernel may or may not say "server".
        let side = if i % 2 == 0 { Some(Side::Server) } else { None };
        events.push(reset_sent_by_service(
            "10.9.9.9:9000",
            at(i as f64),
            side,
            None,
        ));
    }
    let report = judged(&events);
    assert_eq!(report.destinations.len(), 1, "{report:#?}");
    let d = &report.destinations[0];
    assert_eq!(d.destination, "10.9.9.9:9000");
    assert_eq!(d.side.as_deref(), Some("server"));
    let v = &d.verdicts[0];
    assert_eq!(v.id(), VerdictId::LocalResets);
    assert_eq!(evidence(v)["answering_syn"], 15);
    assert!(v.next_step.contains("nothing listens"), "{}", v.next_step);
}

/// TCP_CLOSE: where `tcp_close` has moved a socket by the time it sends its reset.
const CLOSE: TcpState = TcpState::Close;

#[test]
fn local_resets_count_the_kernels_reasons() {
    let mut events = Vec::new();
    for i in 0..12 {
        events.push(reset_sent_for_reason(
            "10.9.9.9:9000",
            at(i as f64),
            Some(CLOSE),
            "TCP_ABORT_ON_CLOSE",
        ));
    }
    for i in 0..3 {
        events.push(reset_sent_for_reason(
            "10.9.9.9:9000",
            at(i as f64 + 0.5),
            None,
            "NO_SOCKET",
        ));
    }
    // A reset from a kernel without reasons (a log spanning an upgrade) is not counted.
    events.push(reset_sent_by_service(
        "10.9.9.9:9000",
        at(20.0),
        Some(Side::Server),
        None,
    ));
    let v = top(&judged(&events), "10.9.9.9:9000");
    assert_eq!(v.id(), VerdictId::LocalResets);
    assert_eq!(evidence(&v)["resets_sent"], 16);
    assert_eq!(evidence(&v)["by_reason"]["TCP_ABORT_ON_CLOSE"], 12);
    assert_eq!(evidence(&v)["by_reason"]["NO_SOCKET"], 3);
    assert_eq!(evidence(&v)["by_reason"].as_object().unwrap().len(), 2);
    assert_eq!(evidence(&v)["by_state"]["CLOSE"], 12);
    assert_eq!(evidence(&v)["by_state"]["none"], 4);
}

#[test]
fn local_resets_next_step_follows_the_dominant_reason() {
    let cases: [(&str, Option<TcpState>, &[&str]); 8] = [
        ("NO_SOCKET", None, &["nothing listens", "`ss -ltn`"]),
        (
            "TCP_ABORT_ON_CLOSE",
            Some(CLOSE),
            &[
                "closes connections with unread data",
                "read what the peer sent",
            ],
        ),
        (
            "TCP_ABORT_ON_DATA",
            Some(TcpState::FinWait2),
            &["data arrives after the application has closed"],
        ),
        (
            "TCP_STATE",
            Some(CLOSE),
            &["aborts connections", "SO_LINGER 0"],
        ),
        (
            "TCP_ABORT_ON_LINGER",
            Some(TcpState::FinWait2),
            &["aborts connections", "TCP_LINGER2"],
        ),
        (
            "TCP_KEEPALIVE_TIMEOUT",
            Some(TcpState::Established),
            &["keepalive probes went unanswered"],
        ),
        (
            "TCP_ABORT_ON_MEMORY",
            Some(CLOSE),
            &["/proc/net/sockstat", "tcp_mem"],
        ),
        (
            "TCP_INVALID_ACK_SEQUENCE",
            Some(TcpState::SynRecv),
            &["enum sk_rst_reason"],
        ),
    ];
    for (reason, state, fragments) in cases {
        let events: Vec<_> = (0..10)
            .map(|i| reset_sent_for_reason("10.9.9.9:9000", at(i as f64), state, reason))
            .collect();
        let v = top(&judged(&events), "10.9.9.9:9000");
        assert_eq!(v.id(), VerdictId::LocalResets, "{reason}");
        assert!(
            v.next_step
                .starts_with("This host resets connections to its own 10.9.9.9:9000: "),
            "{}",
            v.next_step
        );
        assert!(
            v.next_step.contains(&format!("the kernel says {reason}")),
            "{}",
            v.next_step
        );
        for fragment in fragments {
            assert!(v.next_step.contains(fragment), "{reason}: {}", v.next_step);
        }
    }

    // The reason outweighs the state: mostly aborts on close, a few answers to strays.
    let mut mixed: Vec<_> = (0..3)
        .map(|i| reset_sent_for_reason("10.9.9.9:9000", at(i as f64), None, "NO_SOCKET"))
        .collect();
    mixed.extend((0..5).map(|i| {
        reset_sent_for_reason(
            "10.9.9.9:9000",
            at(i as f64 + 0.5),
            Some(CLOSE),
            "TCP_ABORT_ON_CLOSE",
        )
    }));
    let v = top(&judged(&mixed), "10.9.9.9:9000");
    assert!(
        v.next_step.contains("TCP_ABORT_ON_CLOSE"),
        "{}",
        v.next_step
    );
    assert!(!v.next_step.contains("nothing listens"), "{}", v.next_step);

    // A tie goes to the first name, whatever the order of the events.
    let tie: Vec<_> = [("TCP_STATE", Some(CLOSE)), ("NO_SOCKET", None)]
        .into_iter()
        .flat_map(|(reason, state)| {
            (0..4).map(move |i| reset_sent_for_reason("10.9.9.9:9000", at(i as f64), state, reason))
        })
        .collect();
    let v = top(&judged(&tie), "10.9.9.9:9000");
    assert!(v.next_step.contains("NO_SOCKET"), "{}", v.next_step);
}

#[test]
fn local_resets_without_reasons_judge_by_state_as_before() {
    let socketless: Vec<_> = (0..10)
        .map(|i| reset_sent_by_service("10.9.9.9:9000", at(i as f64), Some(Side::Server), None))
        .collect();
    let v = top(&judged(&socketless), "10.9.9.9:9000");
    assert_eq!(v.id(), VerdictId::LocalResets);
    assert_eq!(
        v.next_step,
        "This host resets connections to its own 10.9.9.9:9000: most answer SYNs, so nothing \
         listens there: start the service or stop sending traffic to it (`ss -ltn`)."
    );
    assert_eq!(evidence(&v)["by_reason"], serde_json::json!({}));

    let open: Vec<_> = (0..10)
        .map(|i| {
            reset_sent_by_service(
                "10.9.9.9:9000",
                at(i as f64),
                Some(Side::Server),
                Some(TcpState::Established),
            )
        })
        .collect();
    let v = top(&judged(&open), "10.9.9.9:9000");
    assert_eq!(v.id(), VerdictId::LocalResets);
    assert_eq!(
        v.next_step,
        "This host resets connections to its own 10.9.9.9:9000: they come from open sockets, so \
         the application closes connections with unread data or with SO_LINGER 0: check its \
         logs and how it closes."
    );
}

#[test]
fn slow_handshakes_against_the_destinations_own_baseline() {
    let mut events = Vec::new();
    for i in 0..40 {
        let us = if i >= 30 { 250_000 } else { 1_000 + i };
        events.push(connect_ok("10.0.0.7:443", at(i as f64), us));
    }
    let v = top(&judged(&events), "10.0.0.7:443");
    assert_eq!(v.id(), VerdictId::SlowHandshakes);
    assert_eq!(evidence(&v)["slow"], 10);
    assert_eq!(evidence(&v)["slow_p50_ms"], 250.0);
    assert!(evidence(&v)["baseline_p50_ms"].as_f64().unwrap() < 1.1);

    // Uniformly slow is this destination's normal: no baseline to be slow against.
    let uniform: Vec<_> = (0..40)
        .map(|i| connect_ok("10.0.0.7:443", at(i as f64), 250_000))
        .collect();
    assert_eq!(
        top(&judged(&uniform), "10.0.0.7:443").id(),
        VerdictId::Healthy
    );

    // Five times slower but only by microseconds: nobody notices.
    let tiny: Vec<_> = (0..40)
        .map(|i| {
            connect_ok(
                "10.0.0.7:443",
                at(i as f64),
                if i >= 30 { 500 } else { 100 },
            )
        })
        .collect();
    assert_eq!(top(&judged(&tiny), "10.0.0.7:443").id(), VerdictId::Healthy);
}

#[test]
fn pool_partial_failure_names_the_bad_backend() {
    let report = judge(&mixed_log(), window(0.0, 600.0));
    assert_eq!(report.groups.len(), 1, "{:#?}", report.groups);
    let g = &report.groups[0];
    assert_eq!(g.port, 8080);
    let v = &g.verdicts[0];
    assert_eq!(v.id(), VerdictId::PoolPartialFailure);
    assert_eq!(evidence(v)["failing"][0]["destination"], "10.0.1.2:8080");
    assert_eq!(evidence(v)["healthy"].as_array().unwrap().len(), 2);
    assert!(
        v.next_step.contains("10.0.1.2:8080 fails"),
        "{}",
        v.next_step
    );
    assert!(v.confidence > 0.9);

    // Every member failing is not a bad backend but something common to all.
    let all_bad: Vec<_> = (1..=3)
        .flat_map(|b| {
            (0..10).map(move |i| {
                connect_failed(
                    &format!("10.0.1.{b}:8080"),
                    at(i as f64),
                    FailureReason::Refused,
                    0,
                )
            })
        })
        .collect();
    assert!(judged(&all_bad).groups.is_empty());
}

/// The `processes` of a verdict's evidence as (pid, comm, events).
fn processes(v: &Verdict) -> Vec<(u64, String, u64)> {
    evidence(v)["processes"]
        .as_array()
        .unwrap_or_else(|| panic!("no processes in {:?}", v.finding))
        .iter()
        .map(|p| {
            (
                p["pid"].as_u64().unwrap(),
                p["comm"].as_str().unwrap().to_string(),
                p["events"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn client_verdicts_name_the_processes_that_connect() {
    let dest = "10.0.0.1:5432";
    let mut events = Vec::new();
    for i in 0..12 {
        let t = at(i as f64);
        let (pid, comm) = match i % 4 {
            0 => (17, "psql"),
            1 => (0, ""), // no known owner: not counted
            _ => (4242, "app"),
        };
        events.push(owned_by(
            connect_failed(dest, t, FailureReason::Refused, 0),
            pid,
            comm,
        ));
    }
    // A retransmit is an event of its owner too.
    events.push(owned_by(
        retransmit(dest, at(20.0), TcpState::SynSent, 1),
        17,
        "psql",
    ));
    let report = judged(&events);
    let d = &report.destinations[0];
    assert_eq!(d.side.as_deref(), Some("client"));
    assert_eq!(d.verdicts[0].id(), VerdictId::Refused);
    for v in &d.verdicts {
        assert_eq!(
            processes(v),
            vec![(4242, "app".to_string(), 6), (17, "psql".to_string(), 4)],
            "{:?}",
            v.id()
        );
        assert_eq!(evidence(v)["unlisted_process_events"], 0);
    }
    // The evidence the verdict had before is all still there.
    assert_eq!(evidence(&d.verdicts[0])["matching"], 12);
}

#[test]
fn server_verdicts_name_the_process_that_serves() {
    let local = "10.9.9.9:8443";
    let mut events = Vec::new();
    for i in 0..6 {
        let t = at(i as f64);
        events.push(owned_by(accepted(local, t), 812, "nginx"));
        events.push(owned_by(
            reset_sent_for_reason(local, t, Some(CLOSE), "TCP_ABORT_ON_CLOSE"),
            812,
            "nginx",
        ));
        // Resets answering SYNs have no socket, so no owner.
        events.push(owned_by(
            reset_sent_for_reason(local, t, None, "NO_SOCKET"),
            0,
            "",
        ));
    }
    let v = top(&judged(&events), local);
    assert_eq!(v.id(), VerdictId::LocalResets);
    assert_eq!(processes(&v), vec![(812, "nginx".to_string(), 12)]);
    assert_eq!(evidence(&v)["resets_sent"], 12);

    // Nothing listens: no event knows a process, and the list says so.
    let nobody: Vec<_> = (0..5)
        .map(|i| {
            owned_by(
                reset_sent_for_reason(local, at(i as f64), None, "NO_SOCKET"),
                0,
                "",
            )
        })
        .collect();
    let v = top(&judged(&nobody), local);
    assert_eq!(v.id(), VerdictId::LocalResets);
    assert_eq!(evidence(&v)["processes"], serde_json::json!([]));
}

#[test]
fn a_destination_names_at_most_eight_processes() {
    let dest = "10.0.0.9:443";
    // A process per connect, and one that comes back: it keeps its place and its count.
    let mut events: Vec<_> = (0..100u32)
        .map(|i| owned_by(connect_ok(dest, at(f64::from(i)), 500), 1000 + i, "job"))
        .collect();
    events.extend(
        (0..5).map(|i| owned_by(connect_ok(dest, at(200.0 + f64::from(i)), 500), 1003, "job")),
    );
    let v = top(&judged(&events), dest);
    let listed = processes(&v);
    assert_eq!(listed.len(), 8, "{listed:?}");
    assert_eq!(listed[0], (1003, "job".to_string(), 6));
    assert_eq!(listed[1], (1000, "job".to_string(), 1));
    assert_eq!(evidence(&v)["unlisted_process_events"], 92);
    assert_eq!(evidence(&v)["events"], 105);
}

#[test]
fn a_pool_names_the_processes_whose_connects_fail() {
    let mut events = Vec::new();
    for i in 0..10 {
        let t = at(i as f64);
        for b in 1..=3 {
            let dest = format!("10.0.1.{b}:8080");
            let e = if b == 2 {
                connect_failed(&dest, t, FailureReason::Refused, 0)
            } else {
                connect_ok(&dest, t, 500)
            };
            // The batch job only reaches the healthy members.
            let (pid, comm) = if b == 2 || i % 2 == 0 {
                (4242, "app")
            } else {
                (99, "batch")
            };
            events.push(owned_by(e, pid, comm));
        }
    }
    let report = judged(&events);
    let v = &report.groups[0].verdicts[0];
    assert_eq!(v.id(), VerdictId::PoolPartialFailure);
    assert_eq!(processes(v), vec![(4242, "app".to_string(), 10)]);
    assert_eq!(evidence(v)["unlisted_process_events"], 0);
}

#[test]
fn mixture_of_lossy_and_occasionally_refused_ranks_both() {
    let mut events = Vec::new();
    for i in 0..100 {
        let t = at(i as f64);
        if i % 25 == 0 {
            events.push(connect_failed("10.0.0.8:443", t, FailureReason::Refused, 0));
        } else {
            events.push(connect_ok("10.0.0.8:443", t, 900));
            events.push(close("10.0.0.8:443", at(i as f64 + 0.5), 300, 15));
        }
    }
    let report = judged(&events);
    let ids = report.verdict_ids("10.0.0.8:443");
    assert_eq!(
        ids,
        vec![VerdictId::Lossy, VerdictId::Refused],
        "{report:#?}"
    );
    let (lossy, refused) = (
        find(&report, "10.0.0.8:443", VerdictId::Lossy).unwrap(),
        find(&report, "10.0.0.8:443", VerdictId::Refused).unwrap(),
    );
    assert!(lossy.confidence > refused.confidence);
    assert!(
        refused.confidence > 0.2,
        "occasional, but named: {refused:?}"
    );
}

#[test]
fn one_refusal_among_many_good_connects_is_noise() {
    let events = stream("10.0.0.9:80", 500, 1, |t| {
        connect_failed("10.0.0.9:80", t, FailureReason::Refused, 0)
    });
    let v = top(&judged(&events), "10.0.0.9:80");
    assert_eq!(v.id(), VerdictId::Healthy);
    assert_eq!(evidence(&v)["failures"], 1);
}

#[test]
fn a_little_noise_of_several_kinds_is_still_healthy() {
    let mut events = stream("10.0.0.9:80", 1000, 2, |t| {
        connect_failed("10.0.0.9:80", t, FailureReason::Refused, 0)
    });
    events.push(connect_failed(
        "10.0.0.9:80",
        at(50.5),
        FailureReason::Timeout,
        1,
    ));
    events.push(connect_failed(
        "10.0.0.9:80",
        at(70.5),
        FailureReason::Timeout,
        1,
    ));
    let v = top(&judged(&events), "10.0.0.9:80");
    assert_eq!(v.id(), VerdictId::Healthy, "{v:?}");
    assert_eq!(evidence(&v)["failures"], 4);
    assert_eq!(evidence(&v)["errnos"]["ETIMEDOUT"], 2);
}

#[test]
fn too_few_events_is_not_enough_data() {
    let events = vec![
        connect_ok("10.0.0.10:80", at(0.0), 300),
        connect_ok("10.0.0.10:80", at(1.0), 300),
    ];
    let report = judged(&events);
    let v = top(&report, "10.0.0.10:80");
    assert_eq!(v.id(), VerdictId::NotEnoughData);
    assert!(v.confidence > 0.0 && v.confidence < 1.0);
    assert_eq!(report.destinations[0].verdicts.len(), 1);
    assert!(judged(&[]).destinations.is_empty());
}

#[test]
fn confidence_grows_with_the_amount_of_evidence() {
    type Builder = fn(usize) -> (Vec<Event>, &'static str, VerdictId);
    let builders: [Builder; 8] = [
        |n| {
            let e = (0..n)
                .map(|i| connect_failed("10.0.0.1:80", at(i as f64), FailureReason::Refused, 0))
                .collect();
            (e, "10.0.0.1:80", VerdictId::Refused)
        },
        |n| {
            let e = (0..n)
                .map(|i| connect_failed("10.0.0.1:80", at(i as f64), FailureReason::Timeout, 1))
                .collect();
            (e, "10.0.0.1:80", VerdictId::Blackhole)
        },
        |n| {
            let e = (0..n)
                .map(|i| connect_failed("10.0.0.1:80", at(i as f64), FailureReason::Unreachable, 0))
                .collect();
            (e, "10.0.0.1:80", VerdictId::Unreachable)
        },
        |n| {
            let e = (0..n)
                .map(|i| close("10.0.0.1:80", at(i as f64), 100, 5))
                .collect();
            (e, "10.0.0.1:80", VerdictId::Lossy)
        },
        |n| {
            let e = (0..n)
                .flat_map(|i| {
                    [
                        reset_received("10.0.0.1:80", at(i as f64), TcpState::Established),
                        close("10.0.0.1:80", at(i as f64), 10, 0),
                    ]
                })
                .collect();
            (e, "10.0.0.1:80", VerdictId::ResetMidstream)
        },
        |n| {
            let e = (0..n)
                .map(|i| {
                    reset_sent_by_service("10.9.9.9:9000", at(i as f64), Some(Side::Server), None)
                })
                .collect();
            (e, "10.9.9.9:9000", VerdictId::LocalResets)
        },
        |n| {
            let e = (0..4 * n)
                .map(|i| {
                    let slow = i % 4 == 3;
                    connect_ok(
                        "10.0.0.1:80",
                        at(i as f64),
                        if slow { 300_000 } else { 900 },
                    )
                })
                .collect();
            (e, "10.0.0.1:80", VerdictId::SlowHandshakes)
        },
        |n| {
            let e = (0..n)
                .map(|i| connect_ok("10.0.0.1:80", at(i as f64), 900))
                .collect();
            (e, "10.0.0.1:80", VerdictId::Healthy)
        },
    ];
    for build in builders {
        let mut last = 0.0;
        for n in [4, 12, 60] {
            let (events, dest, id) = build(n);
            let report = judged(&events);
            let v = find(&report, dest, id).unwrap_or_else(|| panic!("{id:?} at n={n}"));
            assert!(
                v.confidence > last,
                "{id:?}: confidence {} at n={n} is not above {last}",
                v.confidence
            );
            assert!(v.confidence < 1.0);
            last = v.confidence;
        }
    }
}

#[test]
fn confidence_grows_with_consistency() {
    // Same number of refusals; fewer of them among other failures means less sure of the cause.
    let pure: Vec<_> = (0..20)
        .map(|i| connect_failed("10.0.0.1:80", at(i as f64), FailureReason::Refused, 0))
        .collect();
    let mut muddled = pure.clone();
    muddled.extend(
        (0..20).map(|i| connect_failed("10.0.0.1:80", at(i as f64 + 0.5), FailureReason::Other, 0)),
    );
    let a = find(&judged(&pure), "10.0.0.1:80", VerdictId::Refused).unwrap();
    let b = find(&judged(&muddled), "10.0.0.1:80", VerdictId::Refused).unwrap();
    assert!(
        a.confidence > b.confidence,
        "{} vs {}",
        a.confidence,
        b.confidence
    );
}

#[test]
fn bursts_of_refusals_are_bursty_with_their_times() {
    let mut events = Vec::new();
    for i in 0..300 {
        let t = i as f64;
        let in_burst = (100..110).contains(&i) || (200..205).contains(&i);
        if in_burst {
            events.push(connect_failed(
                "10.0.0.1:80",
                at(t),
                FailureReason::Refused,
                0,
            ));
        } else {
            events.push(connect_ok("10.0.0.1:80", at(t), 500));
        }
    }
    let v = top(&judged(&events), "10.0.0.1:80");
    assert_eq!(v.id(), VerdictId::Refused);
    assert_eq!(v.pattern, Pattern::Bursty);
    assert_eq!(v.bursts.len(), 2);
    assert_eq!(v.bursts[0].failures, 10);
    // From the first refused connect's SYN, 1 ms before its failure, to the last failure.
    assert_eq!(v.bursts[0].duration_seconds, 9.001);
    assert_eq!(v.bursts[1].failures, 5);

    let steady: Vec<_> = (0..300)
        .map(|i| {
            if i % 10 == 0 {
                connect_failed("10.0.0.1:80", at(i as f64), FailureReason::Refused, 0)
            } else {
                connect_ok("10.0.0.1:80", at(i as f64), 500)
            }
        })
        .collect();
    assert_eq!(
        top(&judged(&steady), "10.0.0.1:80").pattern,
        Pattern::Steady
    );
}

/// Issue 18: the pattern disagreed with its own evidence. Twelve refusals within one
/// millisecond and nothing else were `steady` with one burst listed; three connects giving up
/// together after two seconds of SYN retransmits were `bursty`. One rule now: a problem that
/// was there for all the time the destination was watched is `steady` and lists no burst.
#[test]
fn a_lone_episode_is_steady_and_lists_no_burst() {
    let start = at(0.0);
    let refusals: Vec<Event> = (0..12)
        .map(|i| {
            let t = start + std::time::Duration::from_micros(80 * i);
            connect_failed("127.0.0.1:1", t, FailureReason::Refused, 0)
        })
        .chain((0..12).map(|i| {
            let t = start + std::time::Duration::from_micros(80 * i + 10);
            reset_received("127.0.0.1:1", t, TcpState::SynSent)
        }))
        .collect();
    let v = top(&judged(&refusals), "127.0.0.1:1");
    assert_eq!(v.id(), VerdictId::Refused);
    assert_eq!((v.pattern, v.bursts.len()), (Pattern::Steady, 0), "{v:#?}");

    // Three connects started together at `from`, their SYNs resent after 1 and 2 s, given up
    // at 2.001 s.
    let give_ups = |from: f64| {
        let mut events = Vec::new();
        for s in [1.0, 2.0] {
            for _ in 0..3 {
                events.push(retransmit(
                    "10.0.0.2:8082",
                    at(from + s),
                    TcpState::SynSent,
                    1,
                ));
            }
        }
        for _ in 0..3 {
            events.push(connect_failed(
                "10.0.0.2:8082",
                at(from + 2.001),
                FailureReason::Cancelled,
                2,
            ));
        }
        events
    };
    let v = top(&judged(&give_ups(0.0)), "10.0.0.2:8082");
    assert_eq!(v.id(), VerdictId::Blackhole);
    assert_eq!((v.pattern, v.bursts.len()), (Pattern::Steady, 0), "{v:#?}");

    // The same give-ups after a minute of good connects: an episode set apart by quiet.
    let mut after_good: Vec<Event> = (0..60)
        .map(|i| connect_ok("10.0.0.2:8082", at(i as f64), 300))
        .collect();
    after_good.extend(give_ups(60.0));
    let v = top(&judged(&after_good), "10.0.0.2:8082");
    assert_eq!(v.id(), VerdictId::Blackhole);
    assert_eq!(v.pattern, Pattern::Bursty, "{v:#?}");
    assert_eq!(v.bursts.len(), 1);
    assert_eq!(
        (v.bursts[0].failures, v.bursts[0].duration_seconds),
        (3, 2.001),
        "the episode runs from the SYNs to the give-ups"
    );
}

#[test]
fn worst_destinations_first() {
    let report = judge(&mixed_log(), window(0.0, 600.0));
    let order: Vec<_> = report
        .destinations
        .iter()
        .map(|d| (d.destination.as_str(), d.verdicts[0].id()))
        .collect();
    let first_healthy = order
        .iter()
        .position(|(_, v)| !v.is_problem())
        .expect("some healthy");
    assert!(order[..first_healthy].iter().all(|(_, v)| v.is_problem()));
    assert!(
        order[first_healthy..].iter().all(|(_, v)| !v.is_problem()),
        "{order:?}"
    );
    assert!(order.contains(&("10.0.0.1:8081", VerdictId::Refused)));
    assert!(order.contains(&("10.0.0.2:8082", VerdictId::Blackhole)));
    assert!(order.contains(&("10.0.0.3:443", VerdictId::Lossy)));
    assert!(order.contains(&("10.0.0.4:80", VerdictId::Healthy)));
    assert!(order.contains(&("10.9.9.9:9000", VerdictId::LocalResets)));
}

#[test]
fn only_the_window_counts_and_order_does_not() {
    let events = mixed_log();
    let mut reversed = events.clone();
    reversed.reverse();
    assert_eq!(
        judge(&events, window(0.0, 600.0)),
        judge(&reversed, window(0.0, 600.0))
    );
    let early = judge(&events, window(0.0, 59.0));
    assert_eq!(
        early.window.events,
        events.iter().filter(|e| e.time < at(59.5)).count() as u64
    );
    assert_eq!(early.window.start, "2026-11-18T11:06:40.000Z");
    assert_eq!(early.window.seconds, 59.0);
}

#[test]
fn mapped_addresses_are_one_destination() {
    let mut events = vec![connect_ok("10.0.0.1:80", at(0.0), 1)];
    events.push(connect_ok("[::ffff:10.0.0.1]:80", at(1.0), 1));
    events.push(connect_ok("10.0.0.1:80", at(2.0), 1));
    let report = judged(&events);
    assert_eq!(report.destinations.len(), 1);
    assert_eq!(report.destinations[0].destination, "10.0.0.1:80");
}

#[test]
fn json_has_the_documented_shape() {
    let report = judge(&mixed_log(), window(0.0, 600.0));
    let v = serde_json::to_value(&report).unwrap();
    for key in ["start", "end", "seconds", "events"] {
        assert!(v["window"].get(key).is_some(), "window.{key}");
    }
    let d = &v["destinations"][0];
    assert!(d["destination"].is_string() && d["side"].is_string());
    let verdict = &d["verdicts"][0];
    for key in [
        "verdict",
        "confidence",
        "pattern",
        "bursts",
        "evidence",
        "next_step",
    ] {
        assert!(verdict.get(key).is_some(), "verdict.{key}");
    }
    assert!(verdict["evidence"].is_object());
    assert_eq!(v["groups"][0]["port"], 8080);
    assert_eq!(
        v["groups"][0]["verdicts"][0]["verdict"],
        "pool_partial_failure"
    );
    let back: Report = serde_json::from_value(v).unwrap();
    assert_eq!(back, report);
}

/// The ranked verdicts of `dest` on `side`.
fn on_side(report: &Report, dest: &str, side: &str) -> Vec<Verdict> {
    report
        .destinations
        .iter()
        .find(|d| d.destination == dest && d.side.as_deref() == Some(side))
        .unwrap_or_else(|| panic!("no {dest} ({side}) in {report:#?}"))
        .verdicts
        .clone()
}

/// Ten connects to `dest` from ports 40000.. that the kernel gave up on after two SYNs, and the
/// SYNs of the first `with_drops` of them dropped on this host for `reason`.
fn unanswered_with_drops(dest: &str, with_drops: u16, reason: &str) -> Vec<Event> {
    use crate::event::{
        Direction,
        testing::{connect_failed_from, dropped},
    };
    let mut events = Vec::new();
    for i in 0..10u16 {
        let t = f64::from(i) * 10.0;
        let port = 40_000 + i;
        if i < with_drops {
            for s in 0..2 {
                events.push(dropped(
                    dest,
                    port,
                    at(t + f64::from(s)),
                    reason,
                    0x02,
                    Direction::Sent,
                ));
            }
        }
        events.push(connect_failed_from(
            dest,
            port,
            at(t + 3.0),
            FailureReason::Timeout,
            1,
        ));
    }
    events
}

#[test]
fn local_drop_outranks_blackhole_when_the_drops_explain_it() {
    let report = judged(&unanswered_with_drops(
        "10.0.0.2:8082",
        10,
        "NETFILTER_DROP",
    ));
    let verdicts = on_side(&report, "10.0.0.2:8082", "client");
    let ids: Vec<VerdictId> = verdicts.iter().map(Verdict::id).collect();
    assert_eq!(
        ids[..2],
        [VerdictId::LocalDrop, VerdictId::Blackhole],
        "{verdicts:#?}"
    );
    let local = &verdicts[0];
    assert_eq!(evidence(local)["by_reason"]["NETFILTER_DROP"], 20);
    assert_eq!(evidence(local)["by_packet"]["SYN sent"], 20);
    assert_eq!(evidence(local)["unanswered"], 10);
    assert_eq!(evidence(local)["explained"], 10);
    assert!(
        local.next_step.contains("nft list ruleset"),
        "{}",
        local.next_step
    );
    assert!(
        local.next_step.contains("NETFILTER_DROP"),
        "{}",
        local.next_step
    );
    // Blackhole says the drops are here, not "look elsewhere".
    assert_eq!(evidence(&verdicts[1])["syn_drops_on_this_host"], 20);
    assert!(
        verdicts[1].next_step.contains("see local_drop"),
        "{}",
        verdicts[1].next_step
    );
}

#[test]
fn blackhole_stays_first_when_the_drops_explain_little() {
    let report = judged(&unanswered_with_drops("10.0.0.2:8082", 1, "NETFILTER_DROP"));
    let verdicts = on_side(&report, "10.0.0.2:8082", "client");
    assert_eq!(verdicts[0].id(), VerdictId::Blackhole, "{verdicts:#?}");
    let local = verdicts.iter().find(|v| v.id() == VerdictId::LocalDrop);
    assert!(local.is_none_or(|l| l.confidence < verdicts[0].confidence));

    // No drop seen at all: blackhole says the SYNs die elsewhere.
    let report = judged(&unanswered_with_drops("10.0.0.2:8082", 0, "NETFILTER_DROP"));
    let verdicts = on_side(&report, "10.0.0.2:8082", "client");
    assert_eq!(
        verdicts.iter().map(Verdict::id).collect::<Vec<_>>(),
        [VerdictId::Blackhole]
    );
    assert!(
        verdicts[0]
            .next_step
            .contains("saw none of them dropped on this host")
    );
}

#[test]
fn local_drop_names_the_kernels_reason() {
    use crate::event::{
        Direction,
        testing::{connect_failed_from, dropped},
    };
    // The SYN-ACKs come back after the client gave up: NO_SOCKET on the received replies.
    let mut events = Vec::new();
    for i in 0..6u16 {
        let t = f64::from(i) * 10.0;
        events.push(connect_failed_from(
            "10.0.0.3:443",
            41_000 + i,
            at(t),
            FailureReason::Cancelled,
            1,
        ));
        events.push(dropped(
            "10.0.0.3:443",
            41_000 + i,
            at(t + 0.5),
            "NO_SOCKET",
            0x12,
            Direction::Received,
        ));
    }
    let v = top(&judged(&events), "10.0.0.3:443");
    assert_eq!(v.id(), VerdictId::LocalDrop, "{v:#?}");
    assert_eq!(evidence(&v)["by_packet"]["SYN|ACK received"], 6);
    assert!(
        v.next_step.contains("after the client gave up"),
        "{}",
        v.next_step
    );
    // Reverse-path filtering: asymmetric routing.
    let report = judged(&unanswered_with_drops("10.0.0.4:80", 10, "IP_RPFILTER"));
    let v = &on_side(&report, "10.0.0.4:80", "client")[0];
    assert_eq!(v.id(), VerdictId::LocalDrop);
    assert!(
        v.next_step.contains("asymmetric routing"),
        "{}",
        v.next_step
    );
}

#[test]
fn listen_overflow_on_the_listeners_server_side() {
    use crate::event::testing::overflowed;
    let mut events = vec![
        accepted("10.0.0.5:8080", at(0.0)),
        accepted("10.0.0.5:8080", at(0.1)),
        overflowed("10.0.0.5:8080", at(2.0), 4, Some(1)),
        overflowed("10.0.0.5:8080", at(3.0), 4, Some(1)),
    ];
    // This host's clients of the same listener time out.
    for i in 0..4 {
        events.push(connect_failed(
            "10.0.0.5:8080",
            at(4.0 + f64::from(i)),
            FailureReason::Timeout,
            1,
        ));
    }
    let report = judged(&events);
    let server = on_side(&report, "10.0.0.5:8080", "server");
    assert_eq!(server[0].id(), VerdictId::ListenOverflow, "{server:#?}");
    assert_eq!(evidence(&server[0])["overflows"], 8);
    assert_eq!(evidence(&server[0])["backlog"], 1);
    assert_eq!(evidence(&server[0])["connections_accepted"], 2);
    assert!(
        server[0].next_step.contains("somaxconn"),
        "{}",
        server[0].next_step
    );
    // The client side's blackhole points to the listener.
    let client = on_side(&report, "10.0.0.5:8080", "client");
    assert_eq!(client[0].id(), VerdictId::Blackhole);
    assert_eq!(
        evidence(&client[0])["overflowing_listener"],
        "10.0.0.5:8080"
    );
    assert!(
        client[0].next_step.contains("listen_overflow"),
        "{}",
        client[0].next_step
    );

    // A listener that overflowed once among many connections is noise.
    let mut quiet: Vec<Event> = (0..200)
        .map(|i| accepted("10.0.0.5:8080", at(f64::from(i))))
        .collect();
    quiet.push(overflowed("10.0.0.5:8080", at(50.0), 1, Some(128)));
    let server = on_side(&judged(&quiet), "10.0.0.5:8080", "server");
    assert!(
        server.iter().all(|v| v.id() != VerdictId::ListenOverflow),
        "{server:#?}"
    );
}

#[test]
fn conntrack_full_when_failures_coincide_with_conntrack_failures() {
    use crate::event::testing::conntrack;
    let mut events = Vec::new();
    for i in 0..6 {
        let t = f64::from(i) * 2.0;
        events.push(connect_failed(
            "10.0.0.6:443",
            at(t + 3.0),
            FailureReason::Timeout,
            1,
        ));
        events.push(conntrack(at(t), 2, 3));
    }
    let report = judged(&events);
    let verdicts = on_side(&report, "10.0.0.6:443", "client");
    let ct = verdicts
        .iter()
        .find(|v| v.id() == VerdictId::ConntrackFull)
        .unwrap_or_else(|| panic!("no conntrack_full in {verdicts:#?}"));
    assert_eq!(evidence(ct)["coinciding"], 6);
    assert_eq!(evidence(ct)["insert_failed"], 12);
    assert_eq!(evidence(ct)["drop"], 18);
    assert!(
        ct.next_step.contains("nf_conntrack_max"),
        "{}",
        ct.next_step
    );
    // Conntrack's failures long before the failures explain nothing; conntrack samples are
    // about namespaces and make no destination of their own.
    let mut apart = vec![conntrack(at(0.0), 2, 3)];
    for i in 0..6 {
        apart.push(connect_failed(
            "10.0.0.6:443",
            at(500.0 + f64::from(i)),
            FailureReason::Timeout,
            1,
        ));
    }
    let report = judged(&apart);
    assert_eq!(report.destinations.len(), 1, "{report:#?}");
    let verdicts = on_side(&report, "10.0.0.6:443", "client");
    assert!(
        verdicts.iter().all(|v| v.id() != VerdictId::ConntrackFull),
        "{verdicts:#?}"
    );
}
