//! The verdict rules: each looks at one destination's evidence and either names its verdict,
//! with a confidence, the shape in time, the evidence and a next step, or stays silent. Every
//! threshold is a named constant with the reason for its value.
use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime},
};

use super::{
    after_dns::DnsTimeouts,
    fold::{DestinationEvidence, FailedConnect},
    pattern::{Episode, shape},
    processes::ProcessCounts,
    round,
    verdict::{
        BlackholeFigures, ConntrackFigures, Evidence, FailureFigures, Figures, Finding,
        GroupReport, ListenOverflowFigures, LocalDropFigures, LocalResetsFigures, LossyFigures,
        NotEnoughDataFigures, Owners, PoolFigures, PoolMember, RefusedFigures,
        ResetMidstreamFigures, SlowHandshakeFigures, Verdict, VerdictId,
    },
};
use crate::{
    destination::Destination,
    event::{Endpoint, FailureReason},
    quantile,
};

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

/// `local_drop` outranks `blackhole` when the drops this host saw explain at least this share
/// of the unanswered connects: then the cause is here, whatever else the path does.
pub const LOCAL_DROP_EXPLAINS: f64 = 0.5;

/// A failure counts as coinciding with conntrack's failures when it ends within this long of a
/// second in which conntrack failed: a dropped SYN makes its connect fail seconds later (the
/// kernel retries at 1 s, 3 s, ...), and an application gives up after its own timeout.
pub const CONNTRACK_COINCIDENCE: Duration = Duration::from_secs(10);

/// What the engine knows beyond one destination's events.
#[derive(Debug, Default)]
pub(super) struct Context {
    /// This host's listeners whose accept queue overflowed in the window.
    pub(super) overflowing: Vec<Endpoint>,
    /// Conntrack's failures in the window, per sample: (time, [insert_failed, drop, early_drop]).
    pub(super) conntrack: Vec<(SystemTime, [u64; 3])>,
    /// Client-side DNS queries that got no answer in the window, by name.
    pub(super) dns_timeouts: DnsTimeouts,
}

impl Context {
    /// This host's overflowing listener that serves `dest` (the same address, or any address
    /// on its port).
    fn overflowing_listener(&self, dest: Endpoint) -> Option<Endpoint> {
        self.overflowing
            .iter()
            .find(|l| l.port() == dest.port() && (l.ip() == dest.ip() || l.ip().is_unspecified()))
            .copied()
    }
}

/// Every verdict that applies to one destination, most likely first; `healthy` or
/// `not_enough_data` when none does.
pub(super) fn destination_verdicts(
    key: &Destination,
    ev: &DestinationEvidence,
    context: &Context,
) -> Vec<Verdict> {
    let dest = &key.addr.to_string();
    let owners = ev.processes.owners();
    let overflowing = (!key.is_server())
        .then(|| context.overflowing_listener(key.addr))
        .flatten();
    let mut verdicts: Vec<Verdict> = [
        refused(dest, ev, &owners, context),
        local_drop(key, ev, &owners),
        conntrack_full(dest, ev, &owners, &context.conntrack),
        blackhole(dest, ev, &owners, overflowing, context),
        unreachable(key, ev, &owners, context),
        lossy(dest, ev, &owners),
        reset_midstream(dest, ev, &owners),
        local_resets(dest, ev, &owners),
        listen_overflow(key, ev, &owners),
        slow_handshakes(dest, ev, &owners, overflowing),
    ]
    .into_iter()
    .flatten()
    .collect();
    if verdicts.is_empty() {
        verdicts.push(healthy_or_not_enough(dest, ev, &owners));
    }
    local_drop_before_blackhole(&mut verdicts, ev);
    rank(&mut verdicts);
    verdicts
}

/// When this host's drops explain the unanswered connects, `local_drop` is at least as likely
/// as `blackhole` (ties go to `local_drop`, see [`rank`]).
fn local_drop_before_blackhole(verdicts: &mut [Verdict], ev: &DestinationEvidence) {
    let (unanswered, explained) = ev.unanswered_connects();
    if unanswered == 0 || ratio(explained, unanswered) < LOCAL_DROP_EXPLAINS {
        return;
    }
    let blackhole = verdicts
        .iter()
        .find(|v| v.id() == VerdictId::Blackhole)
        .map(|v| v.confidence);
    if let (Some(blackhole), Some(local)) = (
        blackhole,
        verdicts.iter_mut().find(|v| v.id() == VerdictId::LocalDrop),
    ) {
        local.confidence = local.confidence.max(blackhole);
    }
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

pub(crate) fn verdict(
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
    context: &Context,
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
        after_dns_timeout: context.dns_timeouts.after(ev, matching),
    };
    Some(verdict(
        finding(figures),
        confidence(n, consistency),
        &episodes,
        ev.active(),
        next_step,
    ))
}

pub(crate) fn instants(times: &[SystemTime]) -> Vec<Episode> {
    times.iter().copied().map(Episode::at).collect()
}

fn evidence<F>(figures: F, owners: &Owners) -> Evidence<F> {
    Evidence {
        figures,
        owners: owners.clone(),
    }
}

fn refused(
    dest: &str,
    ev: &DestinationEvidence,
    owners: &Owners,
    context: &Context,
) -> Option<Verdict> {
    let matching: Vec<_> = ev
        .failed
        .iter()
        .filter(|f| f.reason == FailureReason::Refused)
        .copied()
        .collect();
    failure_verdict(
        ev,
        &matching,
        context,
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

fn blackhole(
    dest: &str,
    ev: &DestinationEvidence,
    owners: &Owners,
    overflowing: Option<Endpoint>,
    context: &Context,
) -> Option<Verdict> {
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
        context,
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
                    syn_drops_on_this_host: syn_drops(ev),
                    overflowing_listener: overflowing.map(|l| l.to_string()),
                },
                owners,
            ))
        },
        match (overflowing, syn_drops(ev)) {
            (Some(listener), _) => format!(
                "SYNs to {dest} go unanswered because the accept queue of this host's listener at \
                 {listener} overflowed: see its listen_overflow verdict ({listener} (server))."
            ),
            (None, 0) => format!(
                "SYNs to {dest} go unanswered and connprobe saw none of them dropped on this \
                 host: they are lost on the path or at the server. Look for a firewall or \
                 security group dropping them and for a routing hole on the path; on the server, \
                 check the listen backlog (`nstat -az TcpExtListenOverflows`, `ss -ltn` Recv-Q)."
            ),
            (None, n) => format!(
                "SYNs to {dest} go unanswered; this host dropped {n} of their SYNs or replies \
                 (see local_drop) and the rest are lost on the path or at the server: look for a \
                 firewall or security group dropping them and for a routing hole on the path."
            ),
        },
    )
}

/// SYNs and SYN-ACKs of the destination dropped on this host.
fn syn_drops(ev: &DestinationEvidence) -> u64 {
    ev.syn_drops_by_reason.values().sum()
}

/// The destination's SYNs (or their replies) are dropped on this host: on the client side, the
/// unanswered connects whose SYN or SYN-ACK the kernel dropped; on a service's side, SYNs that
/// arrived and were dropped before it.
fn local_drop(key: &Destination, ev: &DestinationEvidence, owners: &Owners) -> Option<Verdict> {
    let dest = key.addr;
    let dropped = syn_drops(ev);
    if dropped == 0 {
        return None;
    }
    let (unanswered, explained) = ev.unanswered_connects();
    let (n, population, consistency) = if key.is_server() {
        let n = ev.syn_drops_received;
        let population = n + ev.established;
        (
            n,
            population,
            impact(ratio(n, population), FULL_IMPACT_RATIO),
        )
    } else {
        let share = ratio(explained, unanswered);
        (
            explained,
            ev.attempts,
            share * impact(ev.failure_ratio(), FULL_IMPACT_RATIO),
        )
    };
    if !significant(n, population) {
        return None;
    }
    let figures = LocalDropFigures {
        attempts: ev.attempts,
        unanswered,
        explained,
        syn_drops: dropped,
        by_reason: ev.syn_drops_by_reason.clone(),
        by_packet: ev.packet_drops_by_packet.clone(),
        syns_received_dropped: ev.syn_drops_received,
        connections_accepted: if key.is_server() { ev.established } else { 0 },
    };
    let reason = dominant(&ev.syn_drops_by_reason).unwrap_or("?");
    let replies = ev
        .packet_drops_by_packet
        .iter()
        .filter(|(p, _)| p.starts_with("SYN|ACK"))
        .map(|(_, n)| n)
        .sum::<u64>();
    let what = if key.is_server() {
        format!("SYNs to this host's {dest} are dropped on this host before they reach the service")
    } else if replies * 2 > dropped {
        format!("the replies to SYNs sent to {dest} are dropped on this host")
    } else {
        format!("SYNs to {dest} are dropped on this host")
    };
    Some(verdict(
        Finding::LocalDrop(evidence(figures, owners)),
        confidence(n, consistency),
        &instants(&ev.syn_drop_times),
        ev.active(),
        format!(
            "{what}: {}.",
            drop_cause(reason, dest, replies * 2 > dropped)
        ),
    ))
}

/// What to do about packets the kernel dropped for `reason` (an `enum skb_drop_reason` name
/// without its `SKB_DROP_REASON_` prefix), naming it. `replies`: the drops are mostly SYN-ACKs.
fn drop_cause(reason: &str, dest: Endpoint, replies: bool) -> String {
    let ip = dest.ip();
    match reason {
        "NETFILTER_DROP" => format!(
            "a firewall rule on this host drops them (the kernel says {reason}): look for the \
             rule with `nft list ruleset` and `iptables -L -v -n` (`ip6tables` for IPv6), in \
             every network namespace on the path, and for a full conntrack table"
        ),
        "NO_SOCKET" if replies => format!(
            "they arrive after the client gave up and closed its socket (the kernel says \
             {reason}): the server answers slower than the client waits; raise the client's \
             connect timeout or find why the server is slow to answer"
        ),
        "NO_SOCKET" => format!(
            "no socket takes them (the kernel says {reason}): nothing listens on {dest} in the \
             namespace they reach; check `ss -ltn` there"
        ),
        "IP_RPFILTER" => format!(
            "reverse-path filtering drops them (the kernel says {reason}): the packets come in \
             on another interface than the route back to their source (asymmetric routing); \
             check `ip route get {ip}` and `sysctl net.ipv4.conf.all.rp_filter`"
        ),
        "OTHERHOST" => format!(
            "they arrive addressed to another host's MAC address (the kernel says {reason}): \
             check the neighbour tables and bridges on the path"
        ),
        r if r.starts_with("NEIGH_") => format!(
            "the next hop's link-layer address cannot be resolved (the kernel says {reason}): \
             check `ip neigh` and `ip route get {ip}`, and that the next hop is up"
        ),
        "IP_OUTNOROUTES" | "IP_INNOROUTES" | "IP_INADDRERRORS" => format!(
            "there is no route for them (the kernel says {reason}): check `ip route get {ip}`"
        ),
        r if r.starts_with("QDISC_")
            || r.starts_with("FQ_")
            || r.starts_with("CAKE_")
            || r == "TC_EGRESS"
            || r == "TC_INGRESS" =>
        {
            format!(
                "the traffic control on an interface drops them (the kernel says {reason}): \
                 check `tc -s qdisc` and `tc -s filter` on the interfaces on the path"
            )
        }
        "TCP_LISTEN_OVERFLOW" => format!(
            "the listener's accept queue is full (the kernel says {reason}): see its \
             listen_overflow verdict"
        ),
        "SOCKET_BACKLOG" | "SOCKET_RCVBUFF" | "PROTO_MEM" | "NOMEM" => format!(
            "the kernel is short of buffer memory for them (the kernel says {reason}): check \
             `/proc/net/sockstat` against `net.ipv4.tcp_mem` and the socket buffer sizes"
        ),
        "XFRM_POLICY" => {
            format!("an IPsec policy drops them (the kernel says {reason}): check `ip xfrm policy`")
        }
        "BPF_CGROUP_EGRESS" | "SECURITY_HOOK" => format!(
            "a cgroup BPF program or a security module refuses them (the kernel says \
             {reason}): check `bpftool cgroup tree` and the LSM's policy"
        ),
        _ => format!(
            "the kernel says {reason} (see `enum skb_drop_reason` in the kernel's \
             include/net/dropreason-core.h): `perf trace -e skb:kfree_skb` or `dropwatch` \
             shows where"
        ),
    }
}

/// This host's listener at the destination dropped SYNs (or handshakes' last ACKs) because its
/// accept queue was full.
fn listen_overflow(
    key: &Destination,
    ev: &DestinationEvidence,
    owners: &Owners,
) -> Option<Verdict> {
    if !key.is_server() {
        return None;
    }
    // The namespace's counter includes the last ACKs the kernel dropped with a reason.
    let n = ev.listen_overflows.max(ev.listen_overflow_drops);
    let population = n + ev.established;
    if !significant(n, population) {
        return None;
    }
    let dest = key.addr;
    let backlog = match ev.listen_backlog {
        Some(b) => format!(" (backlog {b})"),
        None => String::new(),
    };
    let figures = ListenOverflowFigures {
        overflows: n,
        backlog: ev.listen_backlog,
        queued_max: ev.listen_queued_max,
        connections_accepted: ev.established,
        dropped_acks: ev.listen_overflow_drops,
    };
    Some(verdict(
        Finding::ListenOverflow(evidence(figures, owners)),
        confidence(n, impact(ratio(n, population), FULL_IMPACT_RATIO)),
        &instants(&ev.listen_overflow_times),
        ev.active(),
        format!(
            "The accept queue of {dest}{backlog} overflowed {n} times: the service does not \
             accept connections as fast as they come, and the kernel drops the SYNs it has no \
             room for. Raise the backlog (the listen() argument, capped by \
             net.core.somaxconn) or make the service accept faster (more workers, less work \
             between accept() calls); `ss -ltn` shows its queue (Recv-Q) against the backlog \
             (Send-Q)."
        ),
    ))
}

/// Failures at the destination that coincide with connection tracking's failures on this host.
fn conntrack_full(
    dest: &str,
    ev: &DestinationEvidence,
    owners: &Owners,
    conntrack: &[(SystemTime, [u64; 3])],
) -> Option<Verdict> {
    if conntrack.is_empty() {
        return None;
    }
    let near = |t: SystemTime| {
        conntrack.iter().any(|(at, _)| {
            let gap = if t >= *at {
                t.duration_since(*at)
            } else {
                at.duration_since(t)
            };
            gap.unwrap_or_default() <= CONNTRACK_COINCIDENCE
        })
    };
    let matching: Vec<&FailedConnect> = ev
        .failed
        .iter()
        .filter(|f| f.reason != FailureReason::Refused && near(f.time))
        .collect();
    let n = matching.len() as u64;
    if !significant(n, ev.attempts) {
        return None;
    }
    // Conntrack's failures over the seconds around these failures.
    let mut totals = [0u64; 3];
    for (at, counts) in conntrack {
        if matching.iter().any(|f| {
            let gap = if f.time >= *at {
                f.time.duration_since(*at)
            } else {
                at.duration_since(f.time)
            };
            gap.unwrap_or_default() <= CONNTRACK_COINCIDENCE
        }) {
            for (total, n) in totals.iter_mut().zip(counts) {
                *total += n;
            }
        }
    }
    let times: Vec<SystemTime> = matching.iter().map(|f| f.time).collect();
    let figures = ConntrackFigures {
        attempts: ev.attempts,
        failures: ev.failures(),
        coinciding: n,
        insert_failed: totals[0],
        drop: totals[1],
        early_drop: totals[2],
    };
    Some(verdict(
        Finding::ConntrackFull(evidence(figures, owners)),
        confidence(
            n,
            ratio(n, ev.failures()) * impact(ev.failure_ratio(), FULL_IMPACT_RATIO),
        ),
        &instants(&times),
        ev.active(),
        format!(
            "Connects to {dest} fail while connection tracking on this host fails to track new \
             connections ({} insert failures, {} packets dropped for a full table, {} entries \
             evicted early): compare `conntrack -C` with net.netfilter.nf_conntrack_max (and \
             `conntrack -S`), raise the limit and the hash size, or exempt this traffic from \
             tracking (`notrack`).",
            totals[0], totals[1], totals[2]
        ),
    ))
}

fn unreachable(
    key: &Destination,
    ev: &DestinationEvidence,
    owners: &Owners,
    context: &Context,
) -> Option<Verdict> {
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
        context,
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

fn slow_handshakes(
    dest: &str,
    ev: &DestinationEvidence,
    owners: &Owners,
    overflowing: Option<Endpoint>,
) -> Option<Verdict> {
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
        overflowing_listener: overflowing.map(|l| l.to_string()),
    };
    let next_step = match overflowing {
        Some(listener) => format!(
            "Handshakes with {dest} take {} ms against a usual {} ms because the accept queue \
             of this host's listener at {listener} overflows and SYNs must be resent: see its \
             listen_overflow verdict ({listener} (server)).",
            ms(slow_p50),
            ms(baseline)
        ),
        None => format!(
            "Handshakes with {dest} take {} ms against a usual {} ms: the server or something \
             in between queues SYNs; check the server's load and accept queue (`ss -ltn` \
             Recv-Q), and CPU or softirq saturation on the path.",
            ms(slow_p50),
            ms(baseline)
        ),
    };
    Some(verdict(
        Finding::SlowHandshakes(evidence(figures, owners)),
        confidence(n, impact(share, 0.25) * (1.0 - ev.failure_ratio())),
        &episodes,
        ev.active(),
        next_step,
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

/// A pool's members split by their failure ratio, where some fail while at least as many work.
pub(super) struct PoolSplit<'a, T> {
    /// Failing at least [`POOL_FAILING_RATIO`] of their connects.
    pub failing: Vec<&'a T>,
    /// Failing at most [`POOL_HEALTHY_RATIO`].
    pub healthy: Vec<&'a T>,
    /// How clearly the pool splits: the failing members' mean failure ratio, times the healthy
    /// ones' mean success ratio, times the share of the non-failing members that are healthy.
    pub consistency: f64,
}

/// Splits `members` (each with enough attempts to judge, [`POOL_MIN_ATTEMPTS`]) into failing
/// and healthy; `None` unless one or a few fail (at most as many as work): a bad member, not
/// the network. One rule for destinations sharing a port and backends behind one address.
pub(super) fn split_pool<T>(
    members: &[T],
    failure_ratio: impl Fn(&T) -> f64,
) -> Option<PoolSplit<'_, T>> {
    let failing: Vec<&T> = members
        .iter()
        .filter(|m| failure_ratio(m) >= POOL_FAILING_RATIO)
        .collect();
    let healthy: Vec<&T> = members
        .iter()
        .filter(|m| failure_ratio(m) <= POOL_HEALTHY_RATIO)
        .collect();
    if failing.is_empty() || healthy.is_empty() || failing.len() > healthy.len() {
        return None;
    }
    let mean = |list: &[&T]| list.iter().map(|m| failure_ratio(m)).sum::<f64>() / list.len() as f64;
    let clean_share = ratio(healthy.len() as u64, (members.len() - failing.len()) as u64);
    let consistency = mean(&failing) * (1.0 - mean(&healthy)) * clean_share;
    Some(PoolSplit {
        failing,
        healthy,
        consistency,
    })
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
        let Some(PoolSplit {
            failing,
            healthy,
            consistency,
        }) = split_pool(&members, |(_, ev)| ev.failure_ratio())
        else {
            continue;
        };
        let failures: u64 = failing.iter().map(|(_, ev)| ev.failures()).sum();
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
