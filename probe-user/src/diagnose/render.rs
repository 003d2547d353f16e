//! A report as text for people: worst first, one paragraph per affected destination, the
//! healthy ones in one line. Works from the report alone (the JSON an agent sends), so
//! `connprobe diagnose` and `connprobe analyze` print the same thing.
use std::fmt::Write;

use serde_json::{Map, Value};

use super::verdict::{Burst, Pattern, Report, Verdict, VerdictId};

/// Destinations listed by name in the healthy and not-enough-data lines before "and N more".
const LISTED_IN_SUMMARY: usize = 8;
/// Paragraph lines are wrapped to fit a terminal.
const WIDTH: usize = 100;
const INDENT: &str = "  ";

pub fn text(report: &Report) -> String {
    let mut out = String::new();
    let w = &report.window;
    let _ = writeln!(
        out,
        "connprobe verdicts for {} .. {} ({}, {} events)",
        w.start,
        w.end,
        humantime::format_duration(std::time::Duration::from_secs(w.seconds.round() as u64)),
        w.events
    );
    if w.truncated {
        out.push_str(
            "Note: the flight recorder had already forgotten the start of this window; the \
             verdicts rest on its newer part (raise --recorder-events to keep more).\n",
        );
    }
    if report.destinations.is_empty() {
        out.push_str("\nNo TCP events in this window: not enough data to judge anything.\n");
        return out;
    }
    let mut healthy = Vec::new();
    let mut thin = Vec::new();
    for d in &report.destinations {
        let Some(top) = d.verdicts.first() else {
            continue;
        };
        let name = match &d.side {
            Some(side) => format!("{} ({side})", d.destination),
            None => d.destination.clone(),
        };
        match top.verdict {
            // Named with their side: a service this host calls and one it offers on the same
            // address are two rows.
            VerdictId::Healthy => healthy.push(name),
            // Failures that no verdict explains get a paragraph; few events only a mention.
            VerdictId::NotEnoughData if u(&top.evidence, "failures") == 0 => thin.push(name),
            _ => {
                out.push('\n');
                paragraph(&mut out, &name, &d.verdicts);
            }
        }
    }
    for g in &report.groups {
        out.push('\n');
        paragraph(&mut out, &format!("pool on port {}", g.port), &g.verdicts);
    }
    out.push('\n');
    if !healthy.is_empty() {
        let _ = writeln!(out, "Healthy: {}.", listing(&healthy));
    }
    if !thin.is_empty() {
        let _ = writeln!(out, "Not enough data: {}.", listing(&thin));
    }
    if healthy.is_empty() && thin.is_empty() {
        out.push_str("No destination is healthy.\n");
    }
    out
}

fn listing(names: &[String]) -> String {
    let mut text = names
        .iter()
        .take(LISTED_IN_SUMMARY)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LISTED_IN_SUMMARY {
        let _ = write!(text, " and {} more", names.len() - LISTED_IN_SUMMARY);
    }
    text
}

fn paragraph(out: &mut String, name: &str, verdicts: &[Verdict]) {
    let Some((top, rest)) = verdicts.split_first() else {
        return;
    };
    let _ = writeln!(
        out,
        "{name}: {} ({:.0}% confidence, {})",
        top.verdict.as_str(),
        top.confidence * 100.0,
        shape(top)
    );
    wrap(out, &evidence_sentence(top.verdict, &top.evidence));
    wrap(out, &format!("Next: {}", top.next_step));
    for v in rest {
        wrap(
            out,
            &format!(
                "Also {} ({:.0}%, {}): {}",
                v.verdict.as_str(),
                v.confidence * 100.0,
                shape(v),
                evidence_sentence(v.verdict, &v.evidence)
            ),
        );
    }
}

/// Writes `text` indented, wrapped at `WIDTH` columns on spaces, continuation lines indented
/// further.
fn wrap(out: &mut String, text: &str) {
    let mut column = 0;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let len = word.chars().count();
        if column == 0 {
            out.push_str(INDENT);
            column = INDENT.len();
        } else if column + 1 + len > WIDTH {
            out.push('\n');
            out.push_str(INDENT);
            out.push_str(INDENT);
            column = 2 * INDENT.len();
        } else {
            out.push(' ');
            column += 1;
        }
        out.push_str(word);
        column += len;
    }
    out.push('\n');
}

fn shape(v: &Verdict) -> String {
    match v.pattern {
        Pattern::Steady => "steady".to_string(),
        Pattern::Bursty => {
            let bursts: Vec<String> = v.bursts.iter().take(3).map(burst).collect();
            let more = v.bursts.len().saturating_sub(3);
            let mut text = format!("bursty: {}", bursts.join("; "));
            if more > 0 {
                let _ = write!(text, "; {more} more");
            }
            text
        }
    }
}

fn burst(b: &Burst) -> String {
    format!(
        "{} from {} for {:.1}s",
        b.failures,
        b.start.get(11..23).unwrap_or(&b.start),
        b.duration_seconds
    )
}

fn u(ev: &Map<String, Value>, key: &str) -> u64 {
    ev.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn f(ev: &Map<String, Value>, key: &str) -> Option<f64> {
    ev.get(key).and_then(Value::as_f64)
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn errnos(ev: &Map<String, Value>) -> String {
    match ev.get("errnos").and_then(Value::as_object) {
        Some(map) if !map.is_empty() => {
            let list: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k} x{}", v.as_u64().unwrap_or(0)))
                .collect();
            format!(" ({})", list.join(", "))
        }
        _ => String::new(),
    }
}

/// `; reasons: TCP_ABORT_ON_CLOSE 12, NO_SOCKET 3`, most frequent first; empty when the
/// kernel gave none.
fn reset_reasons(ev: &Map<String, Value>) -> String {
    let Some(map) = ev.get("by_reason").and_then(Value::as_object) else {
        return String::new();
    };
    let mut counts: Vec<(&str, u64)> = map
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_u64().unwrap_or(0)))
        .collect();
    if counts.is_empty() {
        return String::new();
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let list: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    format!("; reasons: {}", list.join(", "))
}

/// The evidence of a verdict in one sentence.
pub fn evidence_sentence(id: VerdictId, ev: &Map<String, Value>) -> String {
    let attempts = u(ev, "attempts");
    let matching = u(ev, "matching");
    match id {
        VerdictId::Refused => format!(
            "{matching} of {attempts} connects refused: the SYN was answered with a reset{}.",
            errnos(ev)
        ),
        VerdictId::Blackhole => format!(
            "{matching} of {attempts} connects got no answer to their SYNs ({} timed out in the \
             kernel, {} given up by the application; {} SYN retransmits{}){}.",
            u(ev, "timeouts"),
            u(ev, "cancelled_after_syn_retransmit"),
            u(ev, "syn_retransmits"),
            f(ev, "waited_p50_ms")
                .map(|w| format!(", median wait {w:.0} ms"))
                .unwrap_or_default(),
            errnos(ev)
        ),
        VerdictId::Unreachable => format!(
            "{matching} of {attempts} connects failed with an ICMP unreachable{}.",
            errnos(ev)
        ),
        VerdictId::Lossy => match f(ev, "retransmit_ratio") {
            Some(r) => format!(
                "{} of {} segments retransmitted ({}) over {} closed connections, {} of them \
                 with retransmits.",
                u(ev, "segments_retransmitted"),
                u(ev, "segments_sent"),
                pct(r),
                u(ev, "connections_closed"),
                u(ev, "connections_with_retransmits")
            ),
            None => format!(
                "{} segments retransmitted on established connections that are still open.",
                u(ev, "established_retransmit_segments")
            ),
        },
        VerdictId::ResetMidstream => format!(
            "{} established connections reset by the peer ({} of connections closed).",
            u(ev, "resets_received"),
            pct(f(ev, "reset_share").unwrap_or(0.0))
        ),
        VerdictId::LocalResets => format!(
            "this host sent {} resets, {} of them answering SYNs without a listening socket; \
             {} connections accepted{}.",
            u(ev, "resets_sent"),
            u(ev, "answering_syn"),
            u(ev, "connections_accepted"),
            reset_reasons(ev)
        ),
        VerdictId::SlowHandshakes => format!(
            "{} of {} handshakes took {:.1} ms or more (median of the slow ones {:.1} ms) \
             against a baseline of {:.1} ms, with {} failures.",
            u(ev, "slow"),
            u(ev, "handshakes"),
            f(ev, "threshold_ms").unwrap_or(0.0),
            f(ev, "slow_p50_ms").unwrap_or(0.0),
            f(ev, "baseline_p50_ms").unwrap_or(0.0),
            u(ev, "failures")
        ),
        VerdictId::PoolPartialFailure => {
            let names = |key: &str| -> String {
                ev.get(key)
                    .and_then(Value::as_array)
                    .map(|list| {
                        list.iter()
                            .map(|m| {
                                format!(
                                    "{} ({} failing)",
                                    m["destination"].as_str().unwrap_or("?"),
                                    pct(m["failure_ratio"].as_f64().unwrap_or(0.0))
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
            };
            format!(
                "failing: {}; healthy: {}.",
                names("failing"),
                names("healthy")
            )
        }
        VerdictId::Healthy | VerdictId::NotEnoughData => format!(
            "{} events, {} connects, {} failed{}.",
            u(ev, "events"),
            attempts,
            u(ev, "failures"),
            errnos(ev)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::engine::{
        judge,
        tests::{
            at, connect_failed, connect_ok, reset_sent_by_service, reset_sent_for_reason, window,
        },
    };
    use crate::event::{FailureReason, Side, TcpState};

    #[test]
    fn worst_first_and_healthy_in_one_line() {
        let mut events = Vec::new();
        for i in 0..20 {
            events.push(connect_ok("10.0.0.1:80", at(i as f64), 300));
            events.push(connect_ok("10.0.0.2:80", at(i as f64), 300));
            events.push(connect_failed(
                "10.0.0.3:5432",
                at(i as f64),
                FailureReason::Refused,
                0,
            ));
        }
        let text = text(&judge(&events, window(0.0, 60.0)));
        let refused = text.find("10.0.0.3:5432 (client): refused").expect(&text);
        let healthy = text
            .find("Healthy: 10.0.0.1:80 (client), 10.0.0.2:80 (client).")
            .expect(&text);
        assert!(refused < healthy, "{text}");
        assert!(text.contains("20 of 20 connects refused"), "{text}");
        assert!(text.contains("Next: SYNs to 10.0.0.3:5432"), "{text}");
    }

    #[test]
    fn unexplained_failures_get_a_paragraph() {
        let events: Vec<_> = (0..10)
            .map(|i| connect_failed("10.0.0.4:80", at(i as f64), FailureReason::Other, 0))
            .collect();
        let text = text(&judge(&events, window(0.0, 60.0)));
        assert!(
            text.contains("10.0.0.4:80 (client): not_enough_data"),
            "{text}"
        );
        assert!(text.contains("10 failed (EPROTO x10)"), "{text}");
        assert!(!text.contains("Not enough data:"), "{text}");
    }

    /// The text with its wrapping undone.
    fn flat(text: &str) -> String {
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn local_resets_list_the_kernels_reasons_most_frequent_first() {
        let mut events: Vec<_> = (0..3)
            .map(|i| reset_sent_for_reason("10.9.9.9:9000", at(i as f64), None, "NO_SOCKET"))
            .collect();
        events.extend((0..12).map(|i| {
            reset_sent_for_reason(
                "10.9.9.9:9000",
                at(i as f64 + 0.5),
                Some(TcpState(7)),
                "TCP_ABORT_ON_CLOSE",
            )
        }));
        let flat_text = flat(&text(&judge(&events, window(0.0, 60.0))));
        assert!(
            flat_text.contains(
                "this host sent 15 resets, 3 of them answering SYNs without a listening socket; 0 \
                 connections accepted; reasons: TCP_ABORT_ON_CLOSE 12, NO_SOCKET 3."
            ),
            "{flat_text}"
        );

        // Without reasons (a kernel before 6.10) the sentence is as it was.
        let old: Vec<_> = (0..4)
            .map(|i| reset_sent_by_service("10.9.9.9:9000", at(i as f64), Some(Side::Server), None))
            .collect();
        let flat_text = flat(&text(&judge(&old, window(0.0, 60.0))));
        assert!(
            flat_text.contains(
                "this host sent 4 resets, 4 of them answering SYNs without a listening socket; 0 \
                 connections accepted."
            ),
            "{flat_text}"
        );
        assert!(!flat_text.contains("reasons:"), "{flat_text}");
    }

    #[test]
    fn an_empty_window_says_so() {
        let text = text(&judge(&[], window(0.0, 60.0)));
        assert!(text.contains("No TCP events in this window"), "{text}");
    }
}
