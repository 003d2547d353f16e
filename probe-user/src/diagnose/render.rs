//! A report as text for people: worst first, one paragraph per affected destination, the
//! healthy ones in one line. Works from the report alone (the JSON an agent sends), so
//! `connprobe diagnose` and `connprobe analyze` print the same thing.
use std::{collections::BTreeMap, fmt::Write};

use super::verdict::{
    Burst, DnsFigures, FailureFigures, Finding, NameCount, Owners, Pattern, PoolMember, Report,
    Verdict,
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
        "connprobe verdicts for {} .. {} ({}, {})",
        w.start,
        w.end,
        humantime::format_duration(std::time::Duration::from_secs(w.seconds.round() as u64)),
        counted(w.events, "event", "events")
    );
    if let Some(observed) = w.observed_seconds
        && observed + 0.5 < w.seconds
    {
        let observed =
            humantime::format_duration(std::time::Duration::from_secs(observed.round() as u64));
        let _ = writeln!(
            out,
            "Note: the agent has been running for {observed} of this {} window; the verdicts \
             rest on those {observed}.",
            humantime::format_duration(std::time::Duration::from_secs(w.seconds.round() as u64))
        );
    }
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
        // "10.0.3.7:443 (api.internal, client)": the name a DNS answer gave, where known.
        let name = match (&d.name, &d.side) {
            (Some(n), Some(side)) => format!("{} ({n}, {side})", d.destination),
            (Some(n), None) => format!("{} ({n})", d.destination),
            (None, Some(side)) => format!("{} ({side})", d.destination),
            (None, None) => d.destination.clone(),
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

/// The top verdict with its evidence and next step, the others in a line each.
fn paragraph(out: &mut String, name: &str, side: Option<&str>, verdicts: &[Verdict]) {
    let mut lines = paragraph_lines(name, side, verdicts).into_iter();
    if let Some(head) = lines.next() {
        out.push_str(&head);
        out.push('\n');
    }
    for line in lines {
        wrap(out, &line);
    }
}

/// The lines of a destination's paragraph, unwrapped: `name: verdict (confidence, shape)`, the
/// evidence with who is behind it, `Next: ...`, and `Also ...` for every other verdict. Who is
/// behind the destination's events is said once, in the top verdict's evidence: it is the same
/// for all.
pub fn paragraph_lines(name: &str, side: Option<&str>, verdicts: &[Verdict]) -> Vec<String> {
    let Some((top, rest)) = verdicts.split_first() else {
        return Vec::new();
    };
    let mut lines = vec![format!(
        "{name}: {} ({:.0}% confidence, {})",
        top.id().as_str(),
        top.confidence * 100.0,
        shape(top)
    )];
    let mut evidence = evidence_sentence(&top.finding);
    if let Some(processes) = processes_sentence(side, top.finding.owners()) {
        evidence.push(' ');
        evidence.push_str(&processes);
    }
    lines.push(evidence);
    lines.push(format!("Next: {}", top.next_step));
    for v in rest {
        lines.push(format!(
            "Also {} ({:.0}%, {}): {}",
            v.id().as_str(),
            v.confidence * 100.0,
            shape(v),
            evidence_sentence(&v.finding)
        ));
    }
    lines
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

/// `, through backend 10.1.4.7:8080` or `, through backends A (2), B (1)`; empty when no
/// failure was translated.
fn backends(by_backend: &BTreeMap<String, u64>) -> String {
    match by_backend.len() {
        0 => String::new(),
        1 => format!(
            ", through backend {}",
            by_backend.keys().next().expect("one")
        ),
        _ => format!(
            ", through backends {}",
            by_backend
                .iter()
                .map(|(b, n)| format!("{b} ({n})"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
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
    let failures = |f: &FailureFigures| {
        (
            f.matching,
            counted(f.attempts, "connect", "connects"),
            errnos(&f.errnos) + &backends(&f.backends),
        )
    };
    match finding {
        Finding::Refused(e) => {
            let (matching, attempts, errnos) = failures(&e.figures.failures);
            format!(
                "{matching} of {attempts} refused: the SYN was answered with a reset{errnos}.{}",
                after_dns_timeout(&e.figures.failures)
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
                "{matching} of {attempts} got no answer to {} ({} timed out in the kernel, {} \
                 given up by the application; {}{}){errnos}.{dropped}{}",
                if matching == 1 {
                    "its SYN"
                } else {
                    "their SYNs"
                },
                f.timeouts,
                f.cancelled_after_syn_retransmit,
                counted(f.syn_retransmits, "SYN retransmit", "SYN retransmits"),
                f.waited_p50_ms
                    .map(|w| format!(", median wait {w:.0} ms"))
                    .unwrap_or_default(),
                after_dns_timeout(&f.failures),
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
            format!(
                "{matching} of {attempts} failed with an ICMP unreachable{errnos}.{}",
                after_dns_timeout(&e.figures)
            )
        }
        Finding::Lossy(e) => {
            let f = &e.figures;
            match f.retransmit_ratio {
                Some(r) => format!(
                    "{} of {} retransmitted ({}) over {}.",
                    f.segments_retransmitted,
                    counted(f.segments_sent, "segment", "segments"),
                    pct(r),
                    closed_with_retransmits(f.connections_closed, f.connections_with_retransmits),
                ),
                None => format!(
                    "{} retransmitted on established connections that are still open.",
                    counted(f.established_retransmit_segments, "segment", "segments")
                ),
            }
        }
        Finding::ResetMidstream(e) => format!(
            "{} reset by the peer ({} of connections closed).",
            counted(
                e.figures.resets_received,
                "established connection",
                "established connections"
            ),
            pct(e.figures.reset_share)
        ),
        Finding::LocalResets(e) => {
            let f = &e.figures;
            let answering = match (f.resets_sent, f.answering_syn) {
                (1, 1) => ", answering a SYN without a listening socket".to_string(),
                (1, _) => String::new(),
                (_, n) => format!(
                    ", {n} of them answering {} without a listening socket",
                    if n == 1 { "a SYN" } else { "SYNs" }
                ),
            };
            format!(
                "this host sent {}{answering}; {} accepted{}.",
                counted(f.resets_sent, "reset", "resets"),
                counted(f.connections_accepted, "connection", "connections"),
                reset_reasons(&f.by_reason)
            )
        }
        Finding::SlowHandshakes(e) => {
            let f = &e.figures;
            format!(
                "{} of {} took {:.1} ms or more (median of the slow ones {:.1} ms) against a \
                 baseline of {:.1} ms, with {}.",
                f.slow,
                counted(f.handshakes, "handshake", "handshakes"),
                f.threshold_ms,
                f.slow_p50_ms,
                f.baseline_p50_ms,
                counted(f.failures, "failure", "failures")
            )
        }
        Finding::PoolPartialFailure(e) => {
            let names = |list: &[PoolMember]| -> String {
                list.iter()
                    .map(|m| format!("{} ({} failing)", m.destination, pct(m.failure_ratio)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let behind = match &e.figures.behind {
                Some(address) => format!("behind {address}, backends "),
                None => String::new(),
            };
            format!(
                "{behind}failing: {}; healthy: {}.",
                names(&e.figures.failing),
                names(&e.figures.healthy)
            )
        }
        Finding::DnsTimeout(e) => dns_sentence(&e.figures, "got no answer"),
        Finding::DnsServfail(e) => dns_sentence(&e.figures, "were answered SERVFAIL"),
        Finding::DnsRefused(e) => dns_sentence(&e.figures, "were answered REFUSED"),
        Finding::Healthy(e) => health_sentence(&e.figures),
        Finding::NotEnoughData(e) => health_sentence(&e.figures.figures),
    }
}

/// ` 7 of these 9 failures came within 30 s after a DNS query for api.internal went unanswered
/// (see the dns_timeout verdict on 10.0.0.53:53).`, or nothing.
fn after_dns_timeout(f: &FailureFigures) -> String {
    let Some(a) = &f.after_dns_timeout else {
        return String::new();
    };
    let names = a
        .names
        .iter()
        .map(|n| n.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let query = match a.names.len() {
        1 => format!("a DNS query for {names}"),
        _ => format!("DNS queries for their names ({names})"),
    };
    let (verdict, resolvers) = match a.resolvers.len() {
        1 => ("verdict", a.resolvers[0].clone()),
        _ => ("verdicts", a.resolvers.join(", ")),
    };
    format!(
        " {} of these {} came within {} s after {query} went unanswered (see the dns_timeout \
         {verdict} on {resolvers}).",
        a.failures,
        counted(f.matching, "failure", "failures"),
        a.within_seconds,
    )
}

/// `3 of 20 queries (15.0%) got no answer, for api.lab (2), db.lab (1); 1 NXDOMAIN, for x.svc
/// (1).`
fn dns_sentence(f: &DnsFigures, what: &str) -> String {
    let names = |list: &[NameCount]| -> String {
        list.iter()
            .map(|n| format!("{} ({})", n.name, n.queries))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut text = format!(
        "{} of {} {what} ({}), for {}",
        f.matching,
        counted(f.queries, "query", "queries"),
        pct(f.share),
        names(&f.names)
    );
    if f.nxdomain > 0 {
        let _ = write!(
            text,
            "; {} NXDOMAIN, for {}",
            f.nxdomain,
            names(&f.nxdomain_names)
        );
    }
    text.push('.');
    text
}

/// `1 connect`, `2 connects`: a count and its noun.
pub fn counted(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `2 closed connections, 2 of them with retransmits`; `1 closed connection, with
/// retransmits`.
fn closed_with_retransmits(closed: u64, with: u64) -> String {
    let closed_text = counted(closed, "closed connection", "closed connections");
    match (closed, with) {
        (1, 1) => format!("{closed_text}, with retransmits"),
        (1, _) => format!("{closed_text}, without retransmits"),
        _ => format!("{closed_text}, {with} of them with retransmits"),
    }
}

fn health_sentence(f: &super::verdict::Figures) -> String {
    format!(
        "{}, {}, {} failed{}.",
        counted(f.events, "event", "events"),
        counted(f.attempts, "connect", "connects"),
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

    /// Issue 18: "1 resets", "1 connections". Every count in every sentence agrees with its
    /// noun.
    #[test]
    fn one_of_anything_is_singular() {
        let finding =
            |json: serde_json::Value| -> Finding { serde_json::from_value(json).unwrap() };
        let failures = serde_json::json!({"attempts": 1, "failures": 1, "matching": 1,
            "failure_ratio": 1.0, "errnos": {"ECONNREFUSED": 1}});
        let mut refused = failures.clone();
        refused["resets_received_in_syn_sent"] = 1.into();
        let mut blackhole = failures.clone();
        for (k, v) in [
            ("timeouts", 1),
            ("cancelled_after_syn_retransmit", 0),
            ("syn_retransmits", 1),
            ("syn_retransmit_segments", 1),
            ("established_after_syn_retransmit", 0),
        ] {
            blackhole[k] = v.into();
        }
        blackhole["waited_p50_ms"] = serde_json::Value::Null;
        let cases = [
            (
                serde_json::json!({"verdict": "refused", "evidence": refused}),
                "1 of 1 connect refused: the SYN was answered with a reset (ECONNREFUSED x1).",
            ),
            (
                serde_json::json!({"verdict": "blackhole", "evidence": blackhole}),
                "1 of 1 connect got no answer to its SYN (1 timed out in the kernel, 0 given up \
                 by the application; 1 SYN retransmit) (ECONNREFUSED x1).",
            ),
            (
                serde_json::json!({"verdict": "unreachable", "evidence": failures}),
                "1 of 1 connect failed with an ICMP unreachable (ECONNREFUSED x1).",
            ),
            (
                serde_json::json!({"verdict": "lossy", "evidence": {"connections_closed": 1,
                    "connections_with_retransmits": 1, "segments_sent": 1,
                    "segments_retransmitted": 1, "retransmit_ratio": 1.0,
                    "established_retransmit_segments": 1, "syn_retransmit_segments": 0,
                    "other_retransmit_segments": 0}}),
                "1 of 1 segment retransmitted (100.0%) over 1 closed connection, with \
                 retransmits.",
            ),
            (
                serde_json::json!({"verdict": "lossy", "evidence": {"connections_closed": 0,
                    "connections_with_retransmits": 0, "segments_sent": 0,
                    "segments_retransmitted": 0, "retransmit_ratio": null,
                    "established_retransmit_segments": 1, "syn_retransmit_segments": 0,
                    "other_retransmit_segments": 0}}),
                "1 segment retransmitted on established connections that are still open.",
            ),
            (
                serde_json::json!({"verdict": "reset_midstream", "evidence": {
                    "resets_received": 1, "connections_closed": 1, "reset_share": 1.0,
                    "by_state": {}}}),
                "1 established connection reset by the peer (100.0% of connections closed).",
            ),
            (
                serde_json::json!({"verdict": "local_resets", "evidence": {"resets_sent": 1,
                    "answering_syn": 1, "connections_accepted": 1, "by_state": {},
                    "by_reason": {}}}),
                "this host sent 1 reset, answering a SYN without a listening socket; 1 \
                 connection accepted.",
            ),
            (
                serde_json::json!({"verdict": "local_resets", "evidence": {"resets_sent": 2,
                    "answering_syn": 1, "connections_accepted": 0, "by_state": {},
                    "by_reason": {}}}),
                "this host sent 2 resets, 1 of them answering a SYN without a listening socket; \
                 0 connections accepted.",
            ),
            (
                serde_json::json!({"verdict": "slow_handshakes", "evidence": {"handshakes": 1,
                    "slow": 1, "baseline_p50_ms": 1.0, "earlier_p50_ms": 1.0,
                    "recent_p50_ms": 1.0, "slow_p50_ms": 50.0, "threshold_ms": 11.0,
                    "failures": 1}}),
                "1 of 1 handshake took 11.0 ms or more (median of the slow ones 50.0 ms) against \
                 a baseline of 1.0 ms, with 1 failure.",
            ),
            (
                serde_json::json!({"verdict": "healthy", "evidence": {"events": 1,
                    "attempts": 1, "established": 1, "failures": 0, "failure_ratio": 0.0,
                    "latency_p50_ms": 0.1, "latency_p99_ms": 0.1, "retransmit_ratio": null,
                    "connections_closed": 0, "errnos": {}}}),
                "1 event, 1 connect, 0 failed.",
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(evidence_sentence(&finding(json)), flat(expected));
        }
        let one = judge(
            &[connect_ok("10.0.0.1:80", at(1.0), 100)],
            window(0.0, 60.0),
        );
        assert!(text(&one).contains("(1m, 1 event)"), "{}", text(&one));
    }

    #[test]
    fn an_empty_window_says_so() {
        let text = text(&judge(&[], window(0.0, 60.0)));
        assert!(text.contains("No TCP events in this window"), "{text}");
    }
}
