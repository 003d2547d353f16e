//! A report as text for people: worst first, one paragraph per affected destination, the
//! healthy ones in one line. Works from the report alone (the JSON an agent sends), so
//! `connprobe diagnose` and `connprobe analyze` print the same thing.
use std::{collections::BTreeMap, fmt::Write};

use super::verdict::{
    Burst, FailureFigures, Finding, Owners, Pattern, PoolMember, Report, Verdict,
};

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
        match &top.finding {
            // Named with their side: a service this host calls and one it offers on the same
            // address are two rows.
            Finding::Healthy(_) => healthy.push(name),
            // Failures that no verdict explains get a paragraph; few events only a mention.
            Finding::NotEnoughData(e) if e.figures.figures.failures == 0 => thin.push(name),
            _ => {
                out.push('\n');
                paragraph(&mut out, &name, d.side.as_deref(), &d.verdicts);
            }
        }
    }
    for g in &report.groups {
        out.push('\n');
        // A pool is of client destinations.
        paragraph(
            &mut out,
            &format!("pool on port {}", g.port),
            Some("client"),
            &g.verdicts,
        );
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

/// The top verdict with its evidence and next step, the others in a line each. Who is behind the
/// destination's events is said once, in the top verdict's evidence: it is the same for all.
fn paragraph(out: &mut String, name: &str, side: Option<&str>, verdicts: &[Verdict]) {
    let Some((top, rest)) = verdicts.split_first() else {
        return;
    };
    let _ = writeln!(
        out,
        "{name}: {} ({:.0}% confidence, {})",
        top.id().as_str(),
        top.confidence * 100.0,
        shape(top)
    );
    let mut evidence = evidence_sentence(&top.finding);
    if let Some(processes) = processes_sentence(side, owners(&top.finding)) {
        evidence.push(' ');
        evidence.push_str(&processes);
    }
    wrap(out, &evidence);
    wrap(out, &format!("Next: {}", top.next_step));
    for v in rest {
        wrap(
            out,
            &format!(
                "Also {} ({:.0}%, {}): {}",
                v.id().as_str(),
                v.confidence * 100.0,
                shape(v),
                evidence_sentence(&v.finding)
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

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn errnos(errnos: &BTreeMap<String, u64>) -> String {
    if errnos.is_empty() {
        return String::new();
    }
    let list: Vec<String> = errnos.iter().map(|(k, n)| format!("{k} x{n}")).collect();
    format!(" ({})", list.join(", "))
}

/// `NETFILTER_DROP 24, NO_SOCKET 2`: most frequent first.
fn counts(by: &BTreeMap<String, u64>) -> String {
    let mut list: Vec<(&str, u64)> = by.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    list.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    list.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `; reasons: TCP_ABORT_ON_CLOSE 12, NO_SOCKET 3`, most frequent first; empty when the
/// kernel gave none.
fn reset_reasons(by_reason: &BTreeMap<String, u64>) -> String {
    let mut counts: Vec<(&str, u64)> = by_reason.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    if counts.is_empty() {
        return String::new();
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let list: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    format!("; reasons: {}", list.join(", "))
}

/// Every verdict's evidence names its owners.
fn owners(finding: &Finding) -> &Owners {
    match finding {
        Finding::Refused(e) => &e.owners,
        Finding::LocalDrop(e) => &e.owners,
        Finding::ConntrackFull(e) => &e.owners,
        Finding::ListenOverflow(e) => &e.owners,
        Finding::Blackhole(e) => &e.owners,
        Finding::Unreachable(e) => &e.owners,
        Finding::Lossy(e) => &e.owners,
        Finding::ResetMidstream(e) => &e.owners,
        Finding::LocalResets(e) => &e.owners,
        Finding::SlowHandshakes(e) => &e.owners,
        Finding::PoolPartialFailure(e) => &e.owners,
        Finding::Healthy(e) => &e.owners,
        Finding::NotEnoughData(e) => &e.owners,
    }
}

/// Who is behind a destination's events, from its evidence's `processes`: `Served by nginx (pid
/// 812).` for a service of this host, `From curl (pid 4242) and 2 other processes.` for one it
/// calls; `None` when no event named its process. Entries are (pid, name) pairs and a name is a
/// thread's, so the busiest process's other names are its threads (`From java and 3 other
/// threads of pid 900.`), and other processes are counted by pid.
fn processes_sentence(side: Option<&str>, owners: &Owners) -> Option<String> {
    let (first, rest) = owners.processes.split_first()?;
    let pid_of = |p: &super::verdict::ProcessEvidence| p.pid;
    let pid = pid_of(first);
    let comm = printable(&first.comm);
    let threads = rest.iter().filter(|p| pid_of(p) == pid).count();
    let mut other_pids: Vec<u32> = rest.iter().map(pid_of).filter(|p| *p != pid).collect();
    other_pids.sort_unstable();
    other_pids.dedup();
    let lead = match side {
        Some("server") => "Served by",
        Some("client") => "From",
        _ => "Sockets of",
    };
    let mut who = match (threads, comm.is_empty()) {
        (0, true) => format!("pid {pid}"),
        (0, false) => format!("{comm} (pid {pid})"),
        (n, _) => format!(
            "{} and {n} other {} of pid {pid}",
            if comm.is_empty() {
                "an unnamed thread"
            } else {
                &comm
            },
            plural(n, "thread", "threads")
        ),
    };
    let mut more = Vec::new();
    if !other_pids.is_empty() {
        let n = other_pids.len();
        more.push(format!("{n} other {}", plural(n, "process", "processes")));
    }
    // Processes past the bound are counted, not named.
    if owners.unlisted_process_events > 0 {
        more.push("more".to_string());
    }
    if let Some((last, between)) = more.split_last() {
        for part in between {
            who.push_str(", ");
            who.push_str(part);
        }
        // A comma where the list already has one, or an "and" of its own.
        let joint = if threads > 0 || !between.is_empty() {
            ", and"
        } else {
            " and"
        };
        let _ = write!(who, "{joint} {last}");
    }
    Some(format!("{lead} {who}."))
}

fn plural(n: usize, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

/// A process name for text: control characters escaped.
fn printable(comm: &str) -> String {
    let mut text = String::new();
    for c in comm.chars() {
        if c.is_control() {
            text.extend(c.escape_debug());
        } else {
            text.push(c);
        }
    }
    text
}

/// The evidence of a verdict in one sentence.
pub fn evidence_sentence(finding: &Finding) -> String {
    let failures = |f: &FailureFigures| (f.matching, f.attempts, errnos(&f.errnos));
    match finding {
        Finding::Refused(e) => {
            let (matching, attempts, errnos) = failures(&e.figures.failures);
            format!(
                "{matching} of {attempts} connects refused: the SYN was answered with a \
                 reset{errnos}."
            )
        }
        Finding::Blackhole(e) => {
            let f = &e.figures;
            let (matching, attempts, errnos) = failures(&f.failures);
            let dropped = match f.syn_drops_on_this_host {
                0 => String::new(),
                n => format!(" {n} of their SYNs or replies were dropped on this host."),
            };
            format!(
                "{matching} of {attempts} connects got no answer to their SYNs ({} timed out in \
                 the kernel, {} given up by the application; {} SYN retransmits{}){errnos}.\
                 {dropped}",
                f.timeouts,
                f.cancelled_after_syn_retransmit,
                f.syn_retransmits,
                f.waited_p50_ms
                    .map(|w| format!(", median wait {w:.0} ms"))
                    .unwrap_or_default(),
            )
        }
        Finding::LocalDrop(e) => {
            let f = &e.figures;
            let packets = match counts(&f.by_packet) {
                p if p.is_empty() => p,
                p => format!(" ({p})"),
            };
            if f.connections_accepted > 0 || f.syns_received_dropped > 0 {
                format!(
                    "{} SYNs dropped on this host before they reached the service, {} \
                     connections accepted; reasons: {}{packets}.",
                    f.syns_received_dropped,
                    f.connections_accepted,
                    counts(&f.by_reason)
                )
            } else {
                format!(
                    "{} of {} unanswered connects had a SYN or its reply dropped on this host; {} \
                     dropped, reasons: {}{packets}.",
                    f.explained,
                    f.unanswered,
                    f.syn_drops,
                    counts(&f.by_reason)
                )
            }
        }
        Finding::ListenOverflow(e) => {
            let f = &e.figures;
            let backlog = f
                .backlog
                .map(|b| format!(" (backlog {b})"))
                .unwrap_or_default();
            format!(
                "{} SYNs or handshakes dropped because the accept queue{backlog} was full, up to {} \
                 connections waiting in it; {} connections accepted.",
                f.overflows, f.queued_max, f.connections_accepted
            )
        }
        Finding::ConntrackFull(e) => {
            let f = &e.figures;
            format!(
                "{} of {} failed connects ended while connection tracking failed on this host ({} \
                 insert failures, {} drops for a full table, {} early drops).",
                f.coinciding, f.failures, f.insert_failed, f.drop, f.early_drop
            )
        }
        Finding::Unreachable(e) => {
            let (matching, attempts, errnos) = failures(&e.figures);
            format!("{matching} of {attempts} connects failed with an ICMP unreachable{errnos}.")
        }
        Finding::Lossy(e) => {
            let f = &e.figures;
            match f.retransmit_ratio {
                Some(r) => format!(
                    "{} of {} segments retransmitted ({}) over {} closed connections, {} of them \
                     with retransmits.",
                    f.segments_retransmitted,
                    f.segments_sent,
                    pct(r),
                    f.connections_closed,
                    f.connections_with_retransmits
                ),
                None => format!(
                    "{} segments retransmitted on established connections that are still open.",
                    f.established_retransmit_segments
                ),
            }
        }
        Finding::ResetMidstream(e) => format!(
            "{} established connections reset by the peer ({} of connections closed).",
            e.figures.resets_received,
            pct(e.figures.reset_share)
        ),
        Finding::LocalResets(e) => {
            let f = &e.figures;
            format!(
                "this host sent {} resets, {} of them answering SYNs without a listening socket; \
                 {} connections accepted{}.",
                f.resets_sent,
                f.answering_syn,
                f.connections_accepted,
                reset_reasons(&f.by_reason)
            )
        }
        Finding::SlowHandshakes(e) => {
            let f = &e.figures;
            format!(
                "{} of {} handshakes took {:.1} ms or more (median of the slow ones {:.1} ms) \
                 against a baseline of {:.1} ms, with {} failures.",
                f.slow, f.handshakes, f.threshold_ms, f.slow_p50_ms, f.baseline_p50_ms, f.failures
            )
        }
        Finding::PoolPartialFailure(e) => {
            let names = |list: &[PoolMember]| -> String {
                list.iter()
                    .map(|m| format!("{} ({} failing)", m.destination, pct(m.failure_ratio)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!(
                "failing: {}; healthy: {}.",
                names(&e.figures.failing),
                names(&e.figures.healthy)
            )
        }
        Finding::Healthy(e) => health_sentence(&e.figures),
        Finding::NotEnoughData(e) => health_sentence(&e.figures.figures),
    }
}

fn health_sentence(f: &super::verdict::Figures) -> String {
    format!(
        "{} events, {} connects, {} failed{}.",
        f.events,
        f.attempts,
        f.failures,
        errnos(&f.errnos)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::engine::{judge, tests::window};
    use crate::event::{
        FailureReason, Side, TcpState,
        testing::{
            accepted, at, connect_failed, connect_ok, owned_by, reset_sent_by_service,
            reset_sent_for_reason,
        },
    };

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
                Some(TcpState::Close),
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
    fn a_paragraph_names_who_serves_or_who_connects_once() {
        let mut events = Vec::new();
        for i in 0..6 {
            let t = at(i as f64);
            events.push(owned_by(accepted("10.9.9.9:8443", t), 812, "nginx"));
            events.push(owned_by(
                reset_sent_for_reason("10.9.9.9:8443", t, Some(TcpState::Close), "TCP_STATE"),
                812,
                "nginx",
            ));
            for (pid, comm) in [(4242, "curl"), (17, "wget"), (4242, "curl")] {
                events.push(owned_by(
                    connect_failed("10.0.0.3:5432", t, FailureReason::Refused, 0),
                    pid,
                    comm,
                ));
            }
        }
        let flat_text = flat(&text(&judge(&events, window(0.0, 60.0))));
        assert!(
            flat_text.contains(
                "this host sent 6 resets, 0 of them answering SYNs without a listening socket; 6 \
                 connections accepted; reasons: TCP_STATE 6. Served by nginx (pid 812). Next:"
            ),
            "{flat_text}"
        );
        assert!(
            flat_text.contains(
                "18 of 18 connects refused: the SYN was answered with a reset (ECONNREFUSED \
                 x18). From curl (pid 4242) and 1 other process. Next:"
            ),
            "{flat_text}"
        );
        assert_eq!(flat_text.matches("(pid").count(), 2, "{flat_text}");
    }

    #[test]
    fn the_processes_sentence_counts_the_others() {
        let ev = |processes: serde_json::Value, unlisted: u64| -> Owners {
            serde_json::from_value(
                serde_json::json!({"processes": processes, "unlisted_process_events": unlisted}),
            )
            .unwrap()
        };
        let curl = serde_json::json!({"pid": 4242, "comm": "curl", "events": 9});
        let other = |pid: u32| serde_json::json!({"pid": pid, "comm": "job", "events": 1});
        assert_eq!(
            processes_sentence(Some("client"), &ev(serde_json::json!([curl]), 0)).as_deref(),
            Some("From curl (pid 4242).")
        );
        assert_eq!(
            processes_sentence(
                Some("client"),
                &ev(serde_json::json!([curl, other(1), other(2)]), 0)
            )
            .as_deref(),
            Some("From curl (pid 4242) and 2 other processes.")
        );
        // Past the bound the others are counted, not named.
        let eight: Vec<_> = std::iter::once(curl.clone())
            .chain((1..8).map(other))
            .collect();
        assert_eq!(
            processes_sentence(Some("client"), &ev(serde_json::json!(eight), 40)).as_deref(),
            Some("From curl (pid 4242), 7 other processes, and more.")
        );
        // A name is a thread's: other names of the busiest pid are its threads, and other
        // processes are counted by pid, not by name.
        let thread =
            |comm: &str, pid: u32| serde_json::json!({"pid": pid, "comm": comm, "events": 1});
        let threads = serde_json::json!([
            thread("lab-bh-kern0", 9),
            thread("lab-bh-kern1", 9),
            thread("lab-bh-app0", 9),
            thread("lab-bh-app1", 9),
        ]);
        assert_eq!(
            processes_sentence(Some("client"), &ev(threads, 0)).as_deref(),
            Some("From lab-bh-kern0 and 3 other threads of pid 9.")
        );
        let mixed = serde_json::json!([
            thread("java", 9),
            thread("worker-a", 7),
            thread("GC Thread#0", 9),
            thread("worker-b", 7),
            thread("curl", 8),
        ]);
        assert_eq!(
            processes_sentence(Some("client"), &ev(mixed.clone(), 0)).as_deref(),
            Some("From java and 1 other thread of pid 9, and 2 other processes.")
        );
        assert_eq!(
            processes_sentence(Some("client"), &ev(mixed, 3)).as_deref(),
            Some("From java and 1 other thread of pid 9, 2 other processes, and more.")
        );
        assert_eq!(
            processes_sentence(Some("server"), &ev(serde_json::json!([curl]), 0)).as_deref(),
            Some("Served by curl (pid 4242).")
        );
        assert_eq!(
            processes_sentence(None, &ev(serde_json::json!([curl]), 0)).as_deref(),
            Some("Sockets of curl (pid 4242).")
        );
        // A name is shown as it is, control characters escaped; none at all, only the pid.
        let odd = serde_json::json!([{"pid": 5, "comm": "a\nb", "events": 1}]);
        assert_eq!(
            processes_sentence(Some("server"), &ev(odd, 0)).as_deref(),
            Some("Served by a\\nb (pid 5).")
        );
        let nameless = serde_json::json!([{"pid": 5, "comm": "", "events": 1}]);
        assert_eq!(
            processes_sentence(Some("server"), &ev(nameless, 0)).as_deref(),
            Some("Served by pid 5.")
        );
        // Nobody known (or a report from before processes were named): nothing said.
        assert_eq!(
            processes_sentence(Some("server"), &ev(serde_json::json!([]), 0)),
            None
        );
        assert_eq!(processes_sentence(Some("server"), &Owners::default()), None);
    }

    #[test]
    fn an_empty_window_says_so() {
        let text = text(&judge(&[], window(0.0, 60.0)));
        assert!(text.contains("No TCP events in this window"), "{text}");
    }
}
