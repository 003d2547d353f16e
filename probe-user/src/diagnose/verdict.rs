//! What the engine says: a report of ranked verdicts per destination and per pool of
//! destinations sharing a port. These types are the `--json` output and the body of
//! `GET /diagnose`, so `connprobe diagnose` renders its text from the deserialised report.
//! Each verdict's evidence is a typed struct ([`Finding`]): the JSON and the text (`render`)
//! are two renderings of the same fields.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use strum::{EnumDiscriminants, EnumString, IntoStaticStr};

use crate::event::serde_by_name;

/// The judgement of one window of events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub window: WindowSummary,
    /// Worst first: destinations with a problem verdict, then healthy, then not enough data.
    pub destinations: Vec<DestinationReport>,
    /// Pools of client destinations sharing a port where one or a few fail.
    pub groups: Vec<GroupReport>,
}

/// The window the report judged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowSummary {
    /// RFC 3339 UTC, milliseconds.
    pub start: String,
    pub end: String,
    pub seconds: f64,
    /// Events inside the window.
    pub events: u64,
    /// True when the flight recorder had already dropped events from inside the window, so
    /// the verdicts rest on its newer part only.
    #[serde(default)]
    pub truncated: bool,
    /// Events the agent lost since it started, by stage (`connprobe diagnose` only): verdicts
    /// rest on the events that were delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_lost: Option<std::collections::BTreeMap<String, u64>>,
    /// How much of the window the agent was running for (`connprobe diagnose` only): less
    /// than `seconds` when it started inside the window, and the verdicts rest on that part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_seconds: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DestinationReport {
    /// `ip:port` (`[v6]:port`): the remote end for clients, this host's end for servers.
    pub destination: String,
    /// `client`, `server`, or null when the kernel did not say.
    pub side: Option<String>,
    /// The name a DNS answer gave for a client destination's address (its connects'
    /// `dst_name`, the most recent); absent when none is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Ranked, most likely first.
    pub verdicts: Vec<Verdict>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupReport {
    pub port: u16,
    pub verdicts: Vec<Verdict>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// `verdict` (the id) and `evidence` (what it rests on).
    #[serde(flatten)]
    pub finding: Finding,
    /// 0..1: grows with the amount and the consistency of the evidence.
    pub confidence: f64,
    pub pattern: Pattern,
    pub bursts: Vec<Burst>,
    pub next_step: String,
}

impl Verdict {
    pub fn id(&self) -> VerdictId {
        VerdictId::from(&self.finding)
    }
}

/// A verdict and its evidence; [`VerdictId`] is derived from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, EnumDiscriminants)]
#[serde(tag = "verdict", content = "evidence", rename_all = "snake_case")]
#[strum_discriminants(
    name(VerdictId),
    derive(Hash, PartialOrd, Ord, IntoStaticStr, EnumString),
    strum(serialize_all = "snake_case")
)]
pub enum Finding {
    Refused(Evidence<RefusedFigures>),
    /// Before `blackhole`: on a tie, the drops this host saw are the better explanation.
    LocalDrop(Evidence<LocalDropFigures>),
    ConntrackFull(Evidence<ConntrackFigures>),
    Blackhole(Evidence<BlackholeFigures>),
    Unreachable(Evidence<FailureFigures>),
    Lossy(Evidence<LossyFigures>),
    ResetMidstream(Evidence<ResetMidstreamFigures>),
    LocalResets(Evidence<LocalResetsFigures>),
    ListenOverflow(Evidence<ListenOverflowFigures>),
    SlowHandshakes(Evidence<SlowHandshakeFigures>),
    PoolPartialFailure(Evidence<PoolFigures>),
    /// A resolver (`ip:53`, client side) left queries unanswered.
    DnsTimeout(Evidence<DnsFigures>),
    /// A resolver answered SERVFAIL.
    DnsServfail(Evidence<DnsFigures>),
    /// A resolver answered REFUSED.
    DnsRefused(Evidence<DnsFigures>),
    Healthy(Evidence<Figures>),
    NotEnoughData(Evidence<NotEnoughDataFigures>),
}

/// A verdict's figures and whose connections they are about.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence<F> {
    #[serde(flatten)]
    pub figures: F,
    #[serde(flatten)]
    pub owners: Owners,
}

/// The processes behind the events: for a service of this host, the owner of its listening
/// socket; for a destination it calls, the processes that connect; for a pool, those of its
/// failing members. Most events first; empty when no event knew its process.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Owners {
    #[serde(default)]
    pub processes: Vec<ProcessEvidence>,
    /// Events of processes past the bound, which `processes` does not list.
    #[serde(default)]
    pub unlisted_process_events: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessEvidence {
    pub pid: u32,
    pub comm: String,
    pub events: u64,
}

/// What a DNS verdict rests on: the resolver's queries in the window, those that ended this
/// verdict's way, and the names behind them (names are evidence, never labels).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DnsFigures {
    pub queries: u64,
    pub matching: u64,
    /// `matching` / `queries`.
    pub share: f64,
    /// The names with the most matching queries, most first (at most 5).
    pub names: Vec<NameCount>,
    /// NXDOMAIN answers in the window: no verdict on their own (search-domain expansion makes
    /// them normal), listed for context.
    pub nxdomain: u64,
    pub nxdomain_names: Vec<NameCount>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameCount {
    pub name: String,
    pub queries: u64,
}

/// What every connect-failure verdict (refused, blackhole, unreachable) rests on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailureFigures {
    pub attempts: u64,
    pub failures: u64,
    /// Failures of this verdict's kind.
    pub matching: u64,
    pub failure_ratio: f64,
    pub errnos: BTreeMap<String, u64>,
    /// For a virtual (DNAT'd) destination: this verdict's failures by the backend their SYN
    /// went to; absent when no failure was translated.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub backends: BTreeMap<String, u64>,
    /// This verdict's failures that came shortly after a DNS query for the destination's name
    /// (its connects' `dst_name`) went unanswered; absent when none did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_dns_timeout: Option<AfterDnsTimeout>,
}

/// Failures that followed an unanswered DNS query for the name they connected to: a failed
/// connect counts when a query for its `dst_name` was sent at most `within_seconds` before it
/// failed and got no answer (a `dns_timeout` on `resolvers`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AfterDnsTimeout {
    pub failures: u64,
    pub within_seconds: u64,
    /// The names, most failures first (at most 5).
    pub names: Vec<NameFailures>,
    /// The resolvers that left those queries unanswered (at most 5).
    pub resolvers: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameFailures {
    pub name: String,
    pub failures: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefusedFigures {
    #[serde(flatten)]
    pub failures: FailureFigures,
    pub resets_received_in_syn_sent: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlackholeFigures {
    #[serde(flatten)]
    pub failures: FailureFigures,
    pub timeouts: u64,
    pub cancelled_after_syn_retransmit: u64,
    pub syn_retransmits: u64,
    pub syn_retransmit_segments: u64,
    pub established_after_syn_retransmit: u64,
    pub waited_p50_ms: Option<f64>,
    /// SYNs and SYN-ACKs of this destination the kernel dropped on this host (0: the SYNs die
    /// elsewhere, or without a reason).
    #[serde(default)]
    pub syn_drops_on_this_host: u64,
    /// This host's listener at the destination whose accept queue overflowed (both ends on
    /// this host), e.g. `10.0.0.2:8080`.
    #[serde(default)]
    pub overflowing_listener: Option<String>,
}

/// Packets of the destination's handshakes dropped on this host, and the unanswered connects
/// they explain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalDropFigures {
    pub attempts: u64,
    /// Connects whose SYNs got no answer: failed without one, or established after a retransmit.
    pub unanswered: u64,
    /// Of those, the connects with a SYN or SYN-ACK dropped on this host.
    pub explained: u64,
    /// SYNs and SYN-ACKs dropped on this host, and by the kernel's reason.
    pub syn_drops: u64,
    pub by_reason: BTreeMap<String, u64>,
    /// Every dropped handshake or DNS packet by its flags and way: `SYN sent`, `SYN|ACK
    /// received`, `RST|ACK sent`, `udp received`.
    pub by_packet: BTreeMap<String, u64>,
    /// For a service of this host: SYNs that arrived and were dropped before it, and the
    /// connections it accepted.
    pub syns_received_dropped: u64,
    pub connections_accepted: u64,
}

/// A listener of this host whose accept queue overflowed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListenOverflowFigures {
    /// SYNs (and handshakes' last ACKs) dropped because the queue was full.
    pub overflows: u64,
    /// Its backlog, where connprobe saw its `listen()`.
    pub backlog: Option<u32>,
    /// The most connections seen waiting in its queue.
    pub queued_max: u32,
    pub connections_accepted: u64,
    /// Last ACKs the kernel dropped with `TCP_LISTEN_OVERFLOW` (Linux 6.18 names them).
    pub dropped_acks: u64,
}

/// Failures at the destination while connection tracking failed on this host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConntrackFigures {
    pub attempts: u64,
    pub failures: u64,
    /// Failed (or unanswered) connects within seconds of conntrack failures.
    pub coinciding: u64,
    /// Conntrack's failures over those seconds, in every namespace read.
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossyFigures {
    pub connections_closed: u64,
    pub connections_with_retransmits: u64,
    pub segments_sent: u64,
    pub segments_retransmitted: u64,
    /// `None` while the connections are still open.
    pub retransmit_ratio: Option<f64>,
    pub established_retransmit_segments: u64,
    pub syn_retransmit_segments: u64,
    pub other_retransmit_segments: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResetMidstreamFigures {
    pub resets_received: u64,
    pub connections_closed: u64,
    pub reset_share: f64,
    pub by_state: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalResetsFigures {
    pub resets_sent: u64,
    pub answering_syn: u64,
    pub connections_accepted: u64,
    pub by_state: BTreeMap<String, u64>,
    /// By the kernel's reason (`NO_SOCKET`, ...); empty before Linux 6.10.
    pub by_reason: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlowHandshakeFigures {
    pub handshakes: u64,
    pub slow: u64,
    pub baseline_p50_ms: f64,
    pub earlier_p50_ms: f64,
    pub recent_p50_ms: f64,
    pub slow_p50_ms: f64,
    pub threshold_ms: f64,
    pub failures: u64,
    /// As for `blackhole`: this host's overflowing listener at the destination.
    #[serde(default)]
    pub overflowing_listener: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolFigures {
    pub port: u16,
    pub failing: Vec<PoolMember>,
    pub healthy: Vec<PoolMember>,
    pub members: u64,
    /// The virtual address the members are backends of (DNAT on this host); absent for a pool
    /// of destinations sharing a port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behind: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolMember {
    pub destination: String,
    pub attempts: u64,
    pub failures: u64,
    pub failure_ratio: f64,
}

/// A destination's figures when no problem verdict applies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub events: u64,
    pub attempts: u64,
    pub established: u64,
    pub failures: u64,
    pub failure_ratio: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub retransmit_ratio: Option<f64>,
    pub connections_closed: u64,
    pub errnos: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NotEnoughDataFigures {
    #[serde(flatten)]
    pub figures: Figures,
    pub min_events: u64,
}

impl Finding {
    /// Every verdict's evidence names its owners.
    pub fn owners(&self) -> &Owners {
        match self {
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
            Finding::DnsTimeout(e) | Finding::DnsServfail(e) | Finding::DnsRefused(e) => &e.owners,
            Finding::Healthy(e) => &e.owners,
            Finding::NotEnoughData(e) => &e.owners,
        }
    }
}

impl VerdictId {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The verdict in one short word, for the console's column: `refused`, `blackhole`,
    /// `unreachable`, `lossy`, `peer-resets`, `local-reset`, `slow`, `pool`, `healthy`, and
    /// `unclear` for not enough data (or failures no verdict explains).
    pub fn word(self) -> &'static str {
        match self {
            VerdictId::Refused => "refused",
            VerdictId::LocalDrop => "local-drop",
            VerdictId::ConntrackFull => "conntrack",
            VerdictId::ListenOverflow => "overflow",
            VerdictId::Blackhole => "blackhole",
            VerdictId::Unreachable => "unreachable",
            VerdictId::Lossy => "lossy",
            VerdictId::ResetMidstream => "peer-resets",
            VerdictId::LocalResets => "local-reset",
            VerdictId::SlowHandshakes => "slow",
            VerdictId::PoolPartialFailure => "pool",
            VerdictId::DnsTimeout => "dns-timeout",
            VerdictId::DnsServfail => "dns-servfail",
            VerdictId::DnsRefused => "dns-refused",
            VerdictId::Healthy => "healthy",
            VerdictId::NotEnoughData => "unclear",
        }
    }

    /// Whether the verdict names a problem (everything but `healthy` and `not_enough_data`).
    pub fn is_problem(self) -> bool {
        !matches!(self, VerdictId::Healthy | VerdictId::NotEnoughData)
    }
}

/// Whether the matching events came in bursts separated by quiet, or at a steady rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, IntoStaticStr, EnumString)]
#[strum(serialize_all = "snake_case")]
pub enum Pattern {
    Bursty,
    Steady,
}

impl Pattern {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

serde_by_name!(VerdictId, Pattern);

/// One episode of matching events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Burst {
    /// RFC 3339 UTC, milliseconds.
    pub start: String,
    pub duration_seconds: f64,
    /// Matching events (failed connects, resets, retransmits, slow handshakes) in the burst.
    pub failures: u64,
}

impl Report {
    /// The ranked verdict IDs of one destination, for tests and comparisons.
    pub fn verdict_ids(&self, destination: &str) -> Vec<VerdictId> {
        self.destinations
            .iter()
            .filter(|d| d.destination == destination)
            .flat_map(|d| d.verdicts.iter().map(Verdict::id))
            .collect()
    }

    /// The destinations' and groups' verdicts without the window, which differs between an
    /// agent (ends now) and a log (ends at its last event) judging the same events.
    pub fn verdicts_only(&self) -> (&[DestinationReport], &[GroupReport]) {
        (&self.destinations, &self.groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_serialise_as_the_fixed_names() {
        for id in [
            VerdictId::Refused,
            VerdictId::LocalDrop,
            VerdictId::ConntrackFull,
            VerdictId::ListenOverflow,
            VerdictId::Blackhole,
            VerdictId::Unreachable,
            VerdictId::Lossy,
            VerdictId::ResetMidstream,
            VerdictId::LocalResets,
            VerdictId::SlowHandshakes,
            VerdictId::PoolPartialFailure,
            VerdictId::Healthy,
            VerdictId::NotEnoughData,
        ] {
            let json = serde_json::to_string(&id).unwrap();
            assert_eq!(json, format!("\"{}\"", id.as_str()));
            assert_eq!(serde_json::from_str::<VerdictId>(&json).unwrap(), id);
        }
        assert_eq!(
            serde_json::to_string(&Pattern::Bursty).unwrap(),
            "\"bursty\""
        );
    }
}
