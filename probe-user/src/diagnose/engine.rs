//! The verdict engine: one pure function of an event sequence. Events are folded into compact
//! per-destination evidence (`Judge::add`, `destination`), each destination is judged against
//! every verdict rule and destinations sharing a port are compared as a pool (`rules`), and the
//! destinations are ranked worst first (`Judge::finish`). DNS exchanges (`Judge::add_dns`) give
//! the resolvers' verdicts, ahead of the destinations, and the unanswered queries that a
//! destination's failures followed (`after_dns`).
//!
//! Nothing here depends on the order of the events or on the window's bounds beyond selecting
//! the events, so `analyze` on a log and `diagnose` on an agent agree on the same events. One
//! exception, to keep memory bounded: a destination names the first eight processes it sees
//! (`processes`), so past eight, which ones it names follows the order.
use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use super::{
    after_dns::DnsTimeouts,
    backends::Pools,
    fold::DestinationEvidence,
    format_time, round,
    rules::{self, Context},
    summary::DestinationSummary,
    verdict::{DestinationReport, Report, VerdictId, WindowSummary},
};
use crate::{
    destination::Destination,
    dns::{exchange::DnsExchange, verdicts::dns_destinations},
    event::{Event, EventDetail, Side},
};

/// The events a report judges: from `start` to `end`, both included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: SystemTime,
    pub end: SystemTime,
}

impl Window {
    /// The `length` up to `end`.
    pub fn ending_at(end: SystemTime, length: Duration) -> Self {
        Window {
            // Never before the epoch: a window longer than the clock's age (`100y`) starts
            // there, like one too long to subtract at all.
            start: end
                .checked_sub(length)
                .filter(|start| *start >= SystemTime::UNIX_EPOCH)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            end,
        }
    }

    pub fn contains(&self, time: SystemTime) -> bool {
        self.start <= time && time <= self.end
    }
}

/// Judges the events that fall inside `window`.
pub fn judge(events: &[Event], window: Window) -> Report {
    judge_with_dns(events, &[], window)
}

/// Judges the events and the DNS exchanges that fall inside `window`.
pub fn judge_with_dns(events: &[Event], exchanges: &[DnsExchange], window: Window) -> Report {
    let mut judge = Judge::new(Some(window));
    for event in events {
        judge.add(event);
    }
    for exchange in exchanges {
        judge.add_dns(exchange);
    }
    judge.finish()
}

/// Folds events into per-destination evidence, then judges. `judge()` is the usual entry;
/// this is for streaming a log without holding its events.
pub struct Judge {
    window: Option<Window>,
    seen: Option<(SystemTime, SystemTime)>,
    events: u64,
    destinations: HashMap<Destination, DestinationEvidence>,
    /// Conntrack's failures (about namespaces, not destinations).
    conntrack: Vec<(SystemTime, [u64; 3])>,
    /// Connects to translated addresses by backend.
    pools: Pools,
    /// Client-side DNS exchanges (the resolvers' verdicts) and their unanswered queries by
    /// name (joined with the destinations' failures).
    dns: Vec<DnsExchange>,
    dns_timeouts: DnsTimeouts,
}

impl Judge {
    /// `window: None` judges every event added, and the report's window is the span they cover.
    pub fn new(window: Option<Window>) -> Self {
        Judge {
            window,
            seen: None,
            events: 0,
            destinations: HashMap::new(),
            conntrack: Vec::new(),
            pools: Pools::default(),
            dns: Vec::new(),
            dns_timeouts: DnsTimeouts::default(),
        }
    }

    /// A DNS exchange (the DNS path's, or a log's `dns` line): client-side ones make the
    /// resolvers' verdicts, and their timeouts join the failures of the names' destinations.
    /// Not counted in the window's events, which are the connection events.
    pub fn add_dns(&mut self, exchange: &DnsExchange) {
        if exchange.side != Side::Client || self.window.is_some_and(|w| !w.contains(exchange.time))
        {
            return;
        }
        self.dns_timeouts.add(exchange);
        self.dns.push(exchange.clone());
    }

    pub fn add(&mut self, event: &Event) {
        if let Some(w) = &self.window
            && !w.contains(event.time)
        {
            return;
        }
        self.events += 1;
        self.seen = Some(match self.seen {
            None => (event.time, event.time),
            Some((a, b)) => (a.min(event.time), b.max(event.time)),
        });
        if let EventDetail::Conntrack(c) = &event.detail {
            self.conntrack
                .push((event.time, [c.insert_failed, c.drop, c.early_drop]));
            return;
        }
        self.pools.add(event);
        let key = Destination::of(event);
        self.destinations
            .entry(key)
            .or_insert_with(|| DestinationEvidence::new(event.time))
            .add(&key, event);
    }

    /// Each destination's figures so far, most connects first.
    pub fn summaries(&self) -> Vec<DestinationSummary> {
        let mut all: Vec<(&Destination, DestinationSummary)> = self
            .destinations
            .iter()
            .map(|(key, ev)| (key, DestinationSummary::of(key, ev)))
            .collect();
        all.sort_by(|(ka, a), (kb, b)| b.connects.cmp(&a.connects).then_with(|| ka.cmp(kb)));
        all.into_iter().map(|(_, s)| s).collect()
    }

    pub fn finish(self) -> Report {
        let (start, end) = match (self.window, self.seen) {
            (Some(w), _) => (w.start, w.end),
            (None, Some(seen)) => seen,
            (None, None) => (SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH),
        };
        let context = Context {
            overflowing: self
                .destinations
                .iter()
                .filter(|(key, ev)| {
                    key.is_server() && (ev.listen_overflows > 0 || ev.listen_overflow_drops > 0)
                })
                .map(|(key, _)| key.addr)
                .collect(),
            conntrack: self.conntrack.clone(),
            dns_timeouts: self.dns_timeouts,
        };
        let mut destinations: Vec<(Destination, DestinationReport)> = self
            .destinations
            .iter()
            .map(|(key, ev)| (*key, judge_destination(key, ev, &context)))
            .collect();
        destinations.sort_by(|(ka, a), (kb, b)| {
            rank_key(b)
                .partial_cmp(&rank_key(a))
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| ka.cmp(kb))
        });
        // The resolvers first: a resolver that fails is a cause of what follows.
        let mut reports = dns_destinations(&self.dns);
        reports.extend(destinations.into_iter().map(|(_, d)| d));
        Report {
            window: WindowSummary {
                start: format_time(start),
                end: format_time(end),
                seconds: round(
                    end.duration_since(start).unwrap_or_default().as_secs_f64(),
                    3,
                ),
                events: self.events,
                truncated: false,
                events_lost: None,
                observed_seconds: None,
            },
            destinations: reports,
            groups: {
                let mut groups = rules::pool_verdicts(&self.destinations);
                groups.extend(self.pools.verdicts());
                groups
            },
        }
    }
}

/// Sort key, larger is worse: problems (by their best confidence) before healthy before
/// not-enough-data.
fn rank_key(d: &DestinationReport) -> (u8, f64) {
    match d.verdicts.first() {
        Some(v) if v.id().is_problem() => (2, v.confidence),
        Some(v) if v.id() == VerdictId::Healthy => (1, 0.0),
        _ => (0, 0.0),
    }
}

fn judge_destination(
    key: &Destination,
    ev: &DestinationEvidence,
    context: &Context,
) -> DestinationReport {
    DestinationReport {
        verdicts: rules::destination_verdicts(key, ev, context),
        destination: key.addr.to_string(),
        side: key.side_name().map(str::to_string),
        name: ev.name.as_deref().map(str::to_owned),
    }
}

#[cfg(test)]
pub(crate) mod tests;
