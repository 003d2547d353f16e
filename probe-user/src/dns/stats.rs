//! Per-resolver counts of the client side's exchanges: what `/metrics` exports and what the DNS
//! verdicts read. Resolvers are bounded like destinations: past `capacity` distinct resolvers,
//! the rest count under `other`. Names are never labels; the most frequent failing names per
//! resolver and outcome are kept (bounded) as evidence.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use super::{
    exchange::{DnsExchange, DnsOutcome},
    message::Rcode,
};
use crate::event::{Endpoint, Side};

/// Upper bounds (seconds) of the `connprobe_dns_duration_seconds` buckets.
pub const DURATION_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Names kept per resolver and kind of failure; past it, new names are not listed (their
/// queries still count).
const NAMES_KEPT: usize = 64;

/// What went wrong with a query, for evidence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    Timeout,
    Servfail,
    Refused,
    Nxdomain,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Servfail => "SERVFAIL",
            Failure::Refused => "REFUSED",
            Failure::Nxdomain => "NXDOMAIN",
        }
    }

    fn of(outcome: &DnsOutcome) -> Option<Self> {
        match outcome {
            DnsOutcome::Timeout => Some(Failure::Timeout),
            DnsOutcome::Answered { rcode, .. } => match *rcode {
                Rcode::SERVFAIL => Some(Failure::Servfail),
                Rcode::REFUSED => Some(Failure::Refused),
                Rcode::NXDOMAIN => Some(Failure::Nxdomain),
                _ => None,
            },
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResolverStats {
    pub queries: u64,
    pub responses: BTreeMap<Rcode, u64>,
    pub timeouts: u64,
    /// Cumulative counts per bucket of [`DURATION_BUCKETS`], then the sum and count.
    pub duration_buckets: [u64; DURATION_BUCKETS.len()],
    pub duration_sum: f64,
    pub duration_count: u64,
    /// Queries per name, by failure.
    pub failing_names: BTreeMap<Failure, HashMap<Arc<str>, u64>>,
}

impl ResolverStats {
    fn record(&mut self, x: &DnsExchange) {
        self.queries += 1;
        match &x.outcome {
            DnsOutcome::Timeout => self.timeouts += 1,
            DnsOutcome::Answered { rcode, latency, .. } => {
                *self.responses.entry(*rcode).or_default() += 1;
                let secs = latency.as_secs_f64();
                for (bucket, le) in self.duration_buckets.iter_mut().zip(DURATION_BUCKETS) {
                    if secs <= le {
                        *bucket += 1;
                    }
                }
                self.duration_sum += secs;
                self.duration_count += 1;
            }
        }
        if let Some(failure) = Failure::of(&x.outcome) {
            let names = self.failing_names.entry(failure).or_default();
            if let Some(n) = names.get_mut(&x.name) {
                *n += 1;
            } else if names.len() < NAMES_KEPT {
                names.insert(x.name.clone(), 1);
            }
        }
    }

    /// Answers with this rcode.
    pub fn responses(&self, rcode: Rcode) -> u64 {
        self.responses.get(&rcode).copied().unwrap_or(0)
    }

    /// The `n` names with the most queries that ended in `failure`, most first.
    pub fn top_names(&self, failure: Failure, n: usize) -> Vec<(Arc<str>, u64)> {
        let mut names: Vec<(Arc<str>, u64)> = self
            .failing_names
            .get(&failure)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        names.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        names.truncate(n);
        names
    }
}

/// The label of a resolver: its `ip:port`, or `other` past the cap.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResolverLabel {
    Resolver(Endpoint),
    Other,
}

impl ResolverLabel {
    pub fn text(&self) -> String {
        match self {
            ResolverLabel::Resolver(e) => e.to_string(),
            ResolverLabel::Other => "other".to_string(),
        }
    }
}

pub struct DnsStats {
    capacity: usize,
    pub by_resolver: BTreeMap<ResolverLabel, ResolverStats>,
}

impl DnsStats {
    pub fn new(capacity: usize) -> Self {
        DnsStats {
            capacity: capacity.max(1),
            by_resolver: BTreeMap::new(),
        }
    }

    /// Counts a client-side exchange. Server-side ones (a resolver on this host answering) are
    /// in the log only: the same exchange seen at both ends must count once.
    pub fn record(&mut self, x: &DnsExchange) {
        if x.side != Side::Client {
            return;
        }
        let label = ResolverLabel::Resolver(x.resolver);
        let label =
            if self.by_resolver.contains_key(&label) || self.by_resolver.len() < self.capacity {
                label
            } else {
                ResolverLabel::Other
            };
        self.by_resolver.entry(label).or_default().record(x);
    }
}
