//! What the engine says: a report of ranked verdicts per destination and per pool of
//! destinations sharing a port. These types are the `--json` output and the body of
//! `GET /diagnose`, so `connprobe diagnose` renders its text from the deserialised report.
use serde::{Deserialize, Serialize};
use strum::{EnumString, IntoStaticStr};

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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DestinationReport {
    /// `ip:port` (`[v6]:port`): the remote end for clients, this host's end for servers.
    pub destination: String,
    /// `client`, `server`, or null when the kernel did not say.
    pub side: Option<String>,
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
    pub verdict: VerdictId,
    /// 0..1: grows with the amount and the consistency of the evidence.
    pub confidence: f64,
    pub pattern: Pattern,
    pub bursts: Vec<Burst>,
    /// Counts, ratios, errnos, latency figures: what the verdict rests on. Keys depend on the
    /// verdict; `render` knows them.
    pub evidence: serde_json::Map<String, serde_json::Value>,
    pub next_step: String,
}

/// The fixed verdict identifiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, IntoStaticStr, EnumString)]
#[strum(serialize_all = "snake_case")]
pub enum VerdictId {
    Refused,
    Blackhole,
    Unreachable,
    Lossy,
    ResetMidstream,
    LocalResets,
    SlowHandshakes,
    PoolPartialFailure,
    Healthy,
    NotEnoughData,
}

impl VerdictId {
    pub fn as_str(self) -> &'static str {
        self.into()
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
            .flat_map(|d| d.verdicts.iter().map(|v| v.verdict))
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
