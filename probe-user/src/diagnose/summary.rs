//! The figures of one destination as a person reads them first (`connprobe watch`): connects,
//! failures by reason, handshake percentiles, retransmitted segments and resets. Read from the
//! same evidence the verdicts rest on (`fold`), so the figures and the verdicts agree.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{fold::DestinationEvidence, round};
use crate::{destination::Destination, quantile};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DestinationSummary {
    /// `ip:port`, as in the report: the remote end for clients, this host's for servers.
    pub destination: String,
    /// `client`, `server`, or null when the kernel did not say.
    pub side: Option<String>,
    /// The name a DNS answer gave for the address, where one is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Connects that ended (established or failed).
    pub connects: u64,
    pub established: u64,
    /// Failed connects by reason (`refused`, `timeout`, `unreachable`, `cancelled`, `other`).
    pub failures: BTreeMap<String, u64>,
    /// Handshake latency of the established connects, nearest rank; null without any.
    pub handshake_p50_ms: Option<f64>,
    pub handshake_p99_ms: Option<f64>,
    /// Segments retransmitted, SYNs included.
    pub retransmits: u64,
    /// Resets received or sent on its connections, besides those that refused a connect
    /// (counted as `refused` failures).
    pub resets: u64,
}

impl DestinationSummary {
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    pub(super) fn of(key: &Destination, ev: &DestinationEvidence) -> Self {
        let mut failures = BTreeMap::new();
        for f in &ev.failed {
            *failures.entry(f.reason.name().to_string()).or_default() += 1;
        }
        let mut latencies = ev.latencies_us.clone();
        latencies.sort_unstable();
        let ms = |q: f64| quantile::of_sorted(&latencies, q).map(|us| round(us as f64 / 1e3, 3));
        let received: u64 = ev.resets_received_by_state.values().sum();
        let sent: u64 = ev.resets_sent_by_state.values().sum();
        DestinationSummary {
            destination: key.addr.to_string(),
            side: key.side_name().map(str::to_string),
            name: ev.name.as_deref().map(str::to_owned),
            connects: ev.attempts,
            established: ev.established,
            failures,
            handshake_p50_ms: ms(0.5),
            handshake_p99_ms: ms(0.99),
            retransmits: ev.syn_retransmit_segments
                + ev.established_retransmit_segments
                + ev.other_retransmit_segments,
            resets: received.saturating_sub(ev.resets_received_in_syn_sent) + sent,
        }
    }
}
