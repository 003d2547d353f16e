//! The verdict rules: each looks at one destination's evidence and either names its verdict,
//! with a confidence, the shape in time, the evidence and a next step, or stays silent. Every
//! threshold is a named constant with the reason for its value.
use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime},
};

use super::{
    fold::{DestinationEvidence, FailedConnect},
    pattern::{Episode, shape},
    processes::ProcessCounts,
    round,
    verdict::{
        BlackholeFigures, Evidence, FailureFigures, Figures, Finding, GroupReport,
        LocalResetsFigures, LossyFigures, NotEnoughDataFigures, Owners, PoolFigures, PoolMember,
        RefusedFigures, ResetMidstreamFigures, SlowHandshakeFigures, Verdict,
    },
};
use crate::{destination::Destination, event::FailureReason, quantile};

/// Confidence from the amount of evidence is n / (n + EVIDENCE_HALF): three matching events
/// make the engine half sure, ten about 77%, a hundred 97%. One event is an anecdote.
pub const EVIDENCE_HALF: f64 = 3.0;

/// A kind of failure below this share of a destination's attempts is background noise that a
/// busy healthy service sees (deploys, clients restarting); it stays in the evidence of
/// `healthy` instead of becoming a verdict...
pub const NOISE_RATIO: f64 = 0.01;
/// ...unless there are at least this many of them: a handful of refusals is worth naming even
/// among many thousands of good connects.
pub const NOISE_COUNT: u64 = 3;

/// A failure ratio from which the impact part of confidence is full: one connect in ten
/// failing is an outage for whoever makes them.
pub const FULL_IMPACT_RATIO: f64 = 0.1;

/// Retransmitted/sent segments above which a path is lossy. Healthy datacenter and internet
/// paths stay well under 1%; from 2% TCP throughput falls markedly (throughput ~ 1/sqrt(loss)).
pub const LOSSY_RETRANSMIT_RATIO: f64 = 0.02;
/// Segments sent (from close events) a destination needs before its ratio is trusted: a few
/// short connections with one retransmitted SYN-ACK or tail probe give meaningless ratios.
pub const LOSSY_MIN_SEGMENTS: u64 = 50;
/// Without close events (long-lived connections still open), this many retransmit hits in the
/// established phase are enough to call the path lossy, at lower confidence.
pub const LOSSY_MIN_RETRANSMITS: u64 = 10;

/// Share of connections ended by a reset from which the reset part of confidence is full.
pub const FULL_RESET_SHARE: f64 = 0.2;

/// A handshake is slow when it takes SLOW_FACTOR times the destination's own baseline...
pub const SLOW_FACTOR: f64 = 4.0;
/// ...and at least this much longer: below 10 ms of extra handshake no user notices, and
/// scheduling noise on a loaded host reaches a few milliseconds on loopback-fast baselines.
pub const SLOW_MIN_EXCESS: Duration = Duration::from_millis(10);
/// Handshakes needed to have a baseline at all.
pub const SLOW_MIN_HANDSHAKES: usize = 8;
/// Slow handshakes needed, in count and in share, for the verdict.
pub const SLOW_MIN_COUNT: u64 = 3;
pub const SLOW_MIN_SHARE: f64 = 0.05;

/// A pool member failing at least this share of its connects is failing...
pub const POOL_FAILING_RATIO: f64 = 0.2;
/// ...one failing at most this share is healthy.
pub const POOL_HEALTHY_RATIO: f64 = 0.05;
/// Connects a member needs in the window to count in a pool comparison.
pub const POOL_MIN_ATTEMPTS: u64 = 3;

/// A destination with fewer events than this (connects, closes, resets) gets `not_enough_data`
/// rather than `healthy`: two good connects say little.
pub const MIN_EVENTS_TO_JUDGE: u64 = 3;

/// Every verdict that applies to one destination, most likely first; `healthy` or
/// `not_enough_data` when none does.
pub(super) fn destination_verdicts(key: &Destination, ev: &DestinationEvidence) -> Vec<Verdict> {
    let dest = &key.addr.to_string();
    let owners = ev.processes.owners();
    let mut verdicts: Vec<Verdict> = [
        refused(dest, ev, &owners),
        blackhole(dest, ev, &owners),
        unreachable(key, ev, &owners),
        lossy(dest, ev, &owners),
        reset_midstream(dest, ev, &owners),
        local_resets(dest, ev, &owners),
        slow_handshakes(dest, ev, &owners),
    ]
    .into_iter()
    .flatten()
    .collect();
    if verdicts.is_empty() {
        verdicts.push(healthy_or_not_enough(dest, ev, &owners));
    }
    rank(&mut verdicts);
    verdicts
}

/// Most confident first; ties broken by the fixed order of the IDs, so output is stable.
fn rank(verdicts: &mut [Verdict]) {
    verdicts.sort_by(|a, b| {
        b.confidence
            .partial_cmp(&a.confidence)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.id().cmp(&b.id()))
    });
}

/// Grows with the amount of matching evidence (`n`) and its consistency (0..1).
pub fn confidence(n: u64, consistency: f64) -> f64 {
    let n = n as f64;
    round(n / (n + EVIDENCE_HALF) * consistency.clamp(0.0, 1.0), 3)
}

pub(super) fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Whether `n` events out of `population` stand above background noise.
fn significant(n: u64, population: u64) -> bool {
    n > 0 && (n >= NOISE_COUNT || ratio(n, population.max(n)) >= NOISE_RATIO)
}

fn impact(share: f64, full_at: f64) -> f64 {
    0.5 + 0.5 * (share / full_at).min(1.0)
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    quantile::of_sorted(sorted, p)
}

fn ms(us: u64) -> f64 {
    round(us as f64 / 1000.0, 3)
}

fn verdict(
    finding: Finding,
    confidence: f64,
    episodes: &[Episode],
    active: (SystemTime, SystemTime),
    next_step: String,
) -> Verdict {
    let (pattern, bursts) = shape(episodes, active);
    Verdict {
        finding,
        confidence,
        pattern,
        bursts,
        next_step,
    }
}

/// The part of a connect-failure verdict shared by refused, blackhole and unreachable: `None`
/// when the matching failures are noise, else the verdict `finding` makes of the figures.
fn failure_verdict(
    ev: &DestinationEvidence,
    matching: &[FailedConnect],
    finding: impl FnOnce(FailureFigures) -> Finding,
    next_step: String,
) -> Option<Verdict> {
    let n = matching.len() as u64;
    if !significant(n, ev.attempts) {
        return None;
    }
    let share_of_failures = ratio(n, ev.failures());
    let consistency = share_of_failures * impact(ev.failure_ratio(), FULL_IMPACT_RATIO);
    let episodes: Vec<Episode> = matching.iter().map(FailedConnect::episode).collect();
    let figures = FailureFigures {
        attempts: ev.attempts,
        failures: ev.failures(),
        matching: n,
        failure_ratio: round(ev.failure_ratio(), 4),
        errnos: ev.errnos.clone(),
        backends: matching.iter().filter_map(|f| f.backend).fold(
            BTreeMap::new(),
            |mut by, backend| {
                *by.entry(backend.to_string()).or_default() += 1;
                by
            },
        ),
    };
    Some(verdict(
        finding(figures),
        confidence(n, consistency),
        &episodes,
        ev.active(),
        next_step,
    ))
}

fn instants(times: &[SystemTime]) -> Vec<Episode> {
    times.iter().copied().map(Episode::at).collect()
}

fn evidence<F>(figures: F, owners: &Owners) -> Evidence<F> {
    Evidence {
        figures,
        owners: owners.clone(),
    }
}

fn refused(dest: &str, ev: &DestinationEvidence, owners: &Owners) -> Option<Verdict> {
    let matching: Vec<_> = ev
        .failed
        .iter()
        .filter(|f| f.reason == FailureReason::Refused)
        .copied()
        .collect();
    failure_verdict(
        ev,
        &matching,
        |failures| {
            Finding::Refused(evidence(
                RefusedFigures {
                    failures,
                    resets_received_in_syn_sent: ev.resets_received_in_syn_sent,
                },
                owners,
            ))
        },
        format!(
            "SYNs to {dest} are answered with a reset: check that the service runs and listens \
             there (`ss -ltn`), that the load balancer in front has a healthy backend, and that \
             no firewall rule rejects with a TCP reset."
        ),
    )
}

fn blackhole(dest: &str, ev: &DestinationEvidence, owners: &Owners) -> Option<Verdict> {
    let matching: Vec<_> = ev
        .failed
        .iter()
        .filter(|f| {
            f.reason == FailureReason::Timeout
                || (f.reason == FailureReason::Cancelled && f.syn_retransmits >= 1)
        })
        .copied()
        .collect();
    let timeouts = matching
        .iter()
        .filter(|f| f.reason == FailureReason::Timeout)
        .count();
    let syn_retransmits: u64 = matching.iter().map(|f| u64::from(f.syn_retransmits)).sum();
    let mut waited: Vec<u64> = matching.iter().filter_map(|f| f.waited_us).collect();
    waited.sort_unstable();
    let cancelled = (matching.len() - timeouts) as u64;
    failure_verdict(
        ev,
        &matching,
        |failures| {
            Finding::Blackhole(evidence(
                BlackholeFigures {
                    failures,
                    timeouts: timeouts as u64,
                    cancelled_after_syn_retransmit: cancelled,
                    syn_retransmits,
                    syn_retransmit_segments: ev.syn_retransmit_segments,
                    established_after_syn_retransmit: ev.established_after_syn_retransmit,
                    waited_p50_ms: percentile(&waited, 0.5).map(ms),
                },
                owners,
            ))
        },
        format!(
            "SYNs to {dest} go unanswered: look for a firewall or security group dropping them \
             and for a routing hole on the path; on the server, check the listen backlog \
             (`nstat -az TcpExtListenOverflows`, `ss -ltn` Recv-Q)."
        ),
    )
}

fn unreachable(key: &Destination, ev: &DestinationEvidence, owners: &Owners) -> Option<Verdict> {
    let (dest, ip) = (key.addr, key.addr.ip());
    let matching: Vec<_> = ev
        .failed
        .iter()
        .filter(|f| f.reason == FailureReason::Unreachable)
        .copied()
        .collect();
    failure_verdict(
        ev,
        &matching,
        |failures| Finding::Unreachable(evidence(failures, owners)),
        format!(
            "An ICMP unreachable comes back for {dest}: check the route (`ip route get {ip}`), \
             the neighbour table (`ip neigh`), and any firewall rule rejecting with ICMP."
        ),
    )
}

fn lossy(dest: &str, ev: &DestinationEvidence, owners: &Owners) -> Option<Verdict> {
    let affected = ev.closes_with_retransmits.len() as u64;
    let (n, consistency, times) = match ev.retransmit_ratio() {
        Some(r) if ev.segments_sent >= LOSSY_MIN_SEGMENTS => {
            if r < LOSSY_RETRANSMIT_RATIO {
                return None;
            }
            let spread = ratio(affected, ev.closes);
            let times = if ev.established_retransmit_times.is_empty() {
                &ev.closes_with_retransmits
            } else {
                &ev.established_retransmit_times
            };
            (
                affected.max(ev.established_retransmit_times.len() as u64),
                (r / (2.0 * LOSSY_RETRANSMIT_RATIO)).min(1.0) * (0.5 + 0.5 * spread),
                times,
            )
        }
        _ => {
            let hits = ev.established_retransmit_times.len() as u64;
            if ev.established_retransmit_segments < LOSSY_MIN_RETRANSMITS {
                return None;
            }
            // No ratio to go by: the connections are still open. Half as sure.
            (hits, 0.5, &ev.established_retransmit_times)
        }
    };
    let figures = LossyFigures {
        connections_closed: ev.closes,
        connections_with_retransmits: affected,
        segments_sent: ev.segments_sent,
        segments_retransmitted: ev.segments_retransmitted,
        retransmit_ratio: ev.retransmit_ratio().map(|r| round(r, 4)),
        established_retransmit_segments: ev.established_retransmit_segments,
        syn_retransmit_segments: ev.syn_retransmit_segments,
        other_retransmit_segments: ev.other_retransmit_segments,
    };
    Some(verdict(
        Finding::Lossy(evidence(figures, owners)),
        confidence(n, consistency),
        &instants(times),
        ev.active(),
        format!(
            "Segments to {dest} are lost or queued out: check interface errors and drops on \
             this host and the path (`ip -s link`, `nstat`), congestion on the links, and MTU \
             problems; compare with other destinations behind the same path."
        ),
    ))
}

fn reset_midstream(dest: &str, ev: &DestinationEvidence, owners: &Owners) -> Option<Verdict> {
    let n = ev.resets_received_midstream.len() as u64;
    if !significant(n, ev.closes) {
        return None;
    }
    let share = ratio(n, ev.closes.max(n));
    let figures = ResetMidstreamFigures {
        resets_received: n,
        connections_closed: ev.closes,
        reset_share: round(share, 4),
        by_state: ev.resets_received_by_state.clone(),
    };
    Some(verdict(
        Finding::ResetMidstream(evidence(figures, owners)),
        confidence(n, impact(share, FULL_RESET_SHARE)),
        &instants(&ev.resets_received_midstream),
        ev.active(),
        format!(
            "The peer at {dest} resets established connections: compare the reset times with \
             idle timeouts of load balancers, proxies and NAT on the path, and with restarts or \
             crashes of the backend; TCP keepalives shorter than the idle timeout help."
        ),
    ))
}

fn local_resets(dest: &str, ev: &DestinationEvidence, owners: &Owners) -> Option<Verdict> {
    let n = ev.resets_sent.len() as u64;
    let population = ev.attempts + ev.resets_sent_socketless;
    if !significant(n, population) {
        return None;
    }
    let share = ratio(n, population.max(n));
    let cause = if let Some(reason) = dominant(&ev.resets_sent_by_reason) {
        reset_cause(reason)
    } else if ev.resets_sent_socketless * 2 >= n {
        // Without the kernel's reasons (before 6.10, or a log from then), the state tells.
        "most answer SYNs, so nothing listens there: start the service or stop sending traffic \
         to it (`ss -ltn`)"
            .to_string()
    } else {
        "they come from open sockets, so the application closes connections with unread data \
         or with SO_LINGER 0: check its logs and how it closes"
            .to_string()
    };
    let figures = LocalResetsFigures {
        resets_sent: n,
        answering_syn: ev.resets_sent_socketless,
        connections_accepted: ev.established,
        by_state: ev.resets_sent_by_state.clone(),
        by_reason: ev.resets_sent_by_reason.clone(),
    };
    Some(verdict(
        Finding::LocalResets(evidence(figures, owners)),
        confidence(n, impact(share, FULL_RESET_SHARE)),
        &instants(&ev.resets_sent),
        ev.active(),
        format!("This host resets connections to its own {dest}: {cause}."),
    ))
}

/// The most frequent key; a tie goes to the first name, so the choice is stable.
fn dominant(counts: &BTreeMap<String, u64>) -> Option<&str> {
    counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(name, _)| name.as_str())
}

/// What to do about the resets the kernel sent for `reason` (an `enum sk_rst_reason` name
/// without its `SK_RST_REASON_` prefix), naming it.
fn reset_cause(reason: &str) -> String {
    match reason {
        "NO_SOCKET" => format!(
            "the segments they answer find no socket, so nothing listens there (the kernel says \
             {reason}): start the service or stop sending traffic to it (`ss -ltn`)"
        ),
        "TCP_ABORT_ON_CLOSE" => format!(
            "the application closes connections with unread data (the kernel says {reason}): \
             read what the peer sent before closing, or shut down the write side first and read \
             until the peer closes"
        ),
        "TCP_ABORT_ON_DATA" => format!(
            "data arrives after the application has closed its end (the kernel says {reason}): \
             the peer still sends when this side is done, so shut down only the write side and \
             read until the peer closes, or make the peer stop sending"
        ),
        "TCP_STATE" | "TCP_ABORT_ON_LINGER" => format!(
            "the application aborts connections instead of closing them, with SO_LINGER 0 or a \
             linger timeout (the kernel says {reason}): check where it sets SO_LINGER or \
             TCP_LINGER2, and close normally unless the resets are intended"
        ),
        "TCP_KEEPALIVE_TIMEOUT" => format!(
            "keepalive probes went unanswered (the kernel says {reason}): the peers are gone or \
             the path to them is broken; look for clients that crashed or lost their network, \
             and for NAT or firewall state that expires on the path"
        ),
        "TCP_ABORT_ON_MEMORY" => format!(
            "the kernel ran short of TCP memory or had too many orphaned sockets (the kernel says \
             {reason}): check `/proc/net/sockstat` against `net.ipv4.tcp_mem` and \
             `net.ipv4.tcp_max_orphans`"
        ),
        _ => format!(
            "the kernel says {reason} (see `enum sk_rst_reason` in the kernel's \
             include/net/rstreason.h): compare the reset times with the application's logs and \
             with what its peers send"
        ),
    }
}

fn slow_handshakes(dest: &str, ev: &DestinationEvidence, owners: &Owners) -> Option<Verdict> {
    if ev.handshakes.len() < SLOW_MIN_HANDSHAKES {
        return None;
    }
    let mut by_time = ev.handshakes.clone();
    by_time.sort_unstable();
    let half = by_time.len() / 2;
    let p50_of = |part: &[(SystemTime, u64)]| {
        let mut us: Vec<u64> = part.iter().map(|(_, us)| *us).collect();
        us.sort_unstable();
        percentile(&us, 0.5).unwrap_or(0)
    };
    let earlier = p50_of(&by_time[..half]);
    let recent = p50_of(&by_time[half..]);
    let baseline = earlier.min(recent);
    let threshold =
        ((baseline as f64 * SLOW_FACTOR) as u64).max(baseline + SLOW_MIN_EXCESS.as_micros() as u64);
    let slow: Vec<(SystemTime, u64)> = by_time
        .iter()
        .filter(|(_, us)| *us >= threshold)
        .copied()
        .collect();
    let n = slow.len() as u64;
    let share = ratio(n, by_time.len() as u64);
    if n < SLOW_MIN_COUNT || share < SLOW_MIN_SHARE {
        return None;
    }
    let mut slow_us: Vec<u64> = slow.iter().map(|(_, us)| *us).collect();
    slow_us.sort_unstable();
    let slow_p50 = percentile(&slow_us, 0.5).unwrap_or(0);
    let episodes: Vec<Episode> = slow.iter().map(|(t, _)| Episode::at(*t)).collect();
    let figures = SlowHandshakeFigures {
        handshakes: by_time.len() as u64,
        slow: n,
        baseline_p50_ms: ms(baseline),
        earlier_p50_ms: ms(earlier),
        recent_p50_ms: ms(recent),
        slow_p50_ms: ms(slow_p50),
        threshold_ms: ms(threshold),
        failures: ev.failures(),
    };
    Some(verdict(
        Finding::SlowHandshakes(evidence(figures, owners)),
        confidence(n, impact(share, 0.25) * (1.0 - ev.failure_ratio())),
        &episodes,
        ev.active(),
        format!(
            "Handshakes with {dest} take {} ms against a usual {} ms: the server or something \
             in between queues SYNs; check the server's load and accept queue (`ss -ltn` \
             Recv-Q), and CPU or softirq saturation on the path.",
            ms(slow_p50),
            ms(baseline)
        ),
    ))
}

fn healthy_or_not_enough(dest: &str, ev: &DestinationEvidence, owners: &Owners) -> Verdict {
    let mut latencies = ev.latencies_us.clone();
    latencies.sort_unstable();
    let figures = Figures {
        events: ev.events,
        attempts: ev.attempts,
        established: ev.established,
        failures: ev.failures(),
        failure_ratio: round(ev.failure_ratio(), 4),
        latency_p50_ms: percentile(&latencies, 0.5).map(ms),
        latency_p99_ms: percentile(&latencies, 0.99).map(ms),
        retransmit_ratio: ev.retransmit_ratio().map(|r| round(r, 4)),
        connections_closed: ev.closes,
        errnos: ev.errnos.clone(),
    };
    // Failures that match no verdict's mapping: errors other than refused, timeout and
    // unreachable, and applications giving up before any SYN was retransmitted.
    let unmatched = ev
        .failed
        .iter()
        .filter(|f| {
            f.reason == FailureReason::Other
                || (f.reason == FailureReason::Cancelled && f.syn_retransmits == 0)
        })
        .count() as u64;
    let unexplained = significant(unmatched, ev.attempts);
    if ev.events < MIN_EVENTS_TO_JUDGE || unexplained {
        let next_step = if unexplained {
            format!(
                "Connects to {dest} fail in a way no verdict explains (see the errnos): look \
                 at the application's own errors."
            )
        } else {
            "Too few events to judge: widen the window or wait for more traffic.".to_string()
        };
        let figures = NotEnoughDataFigures {
            figures,
            min_events: MIN_EVENTS_TO_JUDGE,
        };
        let n = ev.events.min(MIN_EVENTS_TO_JUDGE.saturating_sub(1)).max(1);
        return verdict(
            Finding::NotEnoughData(evidence(figures, owners)),
            confidence(
                n,
                1.0 - ratio(ev.events, MIN_EVENTS_TO_JUDGE).min(1.0) * 0.5,
            ),
            &[],
            ev.active(),
            next_step,
        );
    }
    verdict(
        Finding::Healthy(evidence(figures, owners)),
        confidence(
            ev.events,
            1.0 - ev.failure_ratio() - ev.retransmit_ratio().unwrap_or(0.0),
        ),
        &[],
        ev.active(),
        "Nothing to do.".to_string(),
    )
}

/// A `pool_partial_failure` of the backends behind one virtual address (see `backends`); the
/// owners are left out, as the destinations' own verdicts name them.
pub(super) fn verdict_for_pool(
    figures: PoolFigures,
    confidence: f64,
    episodes: &[Episode],
    active: (SystemTime, SystemTime),
    next_step: String,
) -> Verdict {
    verdict(
        Finding::PoolPartialFailure(evidence(figures, &Owners::default())),
        confidence,
        episodes,
        active,
        next_step,
    )
}

/// Client destinations sharing a port where one or a few fail while the others work: a bad
/// backend, not the network.
pub(super) fn pool_verdicts(
    destinations: &HashMap<Destination, DestinationEvidence>,
) -> Vec<GroupReport> {
    let mut by_port: BTreeMap<u16, Vec<(&Destination, &DestinationEvidence)>> = BTreeMap::new();
    for (key, ev) in destinations {
        if !key.is_server() && ev.attempts >= POOL_MIN_ATTEMPTS {
            by_port.entry(key.addr.port()).or_default().push((key, ev));
        }
    }
    let mut groups = Vec::new();
    for (port, mut members) in by_port {
        members.sort_by_key(|(k, _)| **k);
        let failing: Vec<_> = members
            .iter()
            .filter(|(_, ev)| ev.failure_ratio() >= POOL_FAILING_RATIO)
            .collect();
        let healthy: Vec<_> = members
            .iter()
            .filter(|(_, ev)| ev.failure_ratio() <= POOL_HEALTHY_RATIO)
            .collect();
        if failing.is_empty() || healthy.is_empty() || failing.len() > healthy.len() {
            continue;
        }
        let failures: u64 = failing.iter().map(|(_, ev)| ev.failures()).sum();
        let failing_ratio = failing
            .iter()
            .map(|(_, ev)| ev.failure_ratio())
            .sum::<f64>()
            / failing.len() as f64;
        let healthy_ratio = healthy
            .iter()
            .map(|(_, ev)| ev.failure_ratio())
            .sum::<f64>()
            / healthy.len() as f64;
        let clean_share = ratio(healthy.len() as u64, (members.len() - failing.len()) as u64);
        let consistency = failing_ratio * (1.0 - healthy_ratio) * clean_share;
        let describe = |list: &[&(&Destination, &DestinationEvidence)]| -> Vec<PoolMember> {
            list.iter()
                .map(|(k, ev)| PoolMember {
                    destination: k.addr.to_string(),
                    attempts: ev.attempts,
                    failures: ev.failures(),
                    failure_ratio: round(ev.failure_ratio(), 4),
                })
                .collect()
        };
        let names = |list: &[&(&Destination, &DestinationEvidence)]| -> String {
            list.iter()
                .map(|(k, _)| k.addr.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let episodes: Vec<Episode> = failing
            .iter()
            .flat_map(|(_, ev)| ev.failed.iter().map(FailedConnect::episode))
            .collect();
        let active = members
            .iter()
            .fold(None, |acc: Option<(SystemTime, SystemTime)>, (_, ev)| {
                Some(match acc {
                    None => ev.active(),
                    Some((a, b)) => (a.min(ev.first), b.max(ev.last)),
                })
            })
            .unwrap_or((SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH));
        // Whose connects fail: the processes of the failing members.
        let owners = ProcessCounts::merged(failing.iter().map(|(_, ev)| &ev.processes)).owners();
        let figures = PoolFigures {
            port,
            failing: describe(&failing),
            healthy: describe(&healthy),
            members: members.len() as u64,
            behind: None,
        };
        let v = verdict(
            Finding::PoolPartialFailure(evidence(figures, &owners)),
            confidence(failures, consistency),
            &episodes,
            active,
            format!(
                "Among the destinations on port {port}, {} {} while {} work: the network is \
                 fine, the failing backend is not; take it out of rotation and check its \
                 service and health checks.",
                names(&failing),
                if failing.len() == 1 { "fails" } else { "fail" },
                names(&healthy)
            ),
        );
        groups.push(GroupReport {
            port,
            verdicts: vec![v],
        });
    }
    groups
}
