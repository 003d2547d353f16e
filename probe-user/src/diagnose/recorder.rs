//! The flight recorder: the most recent raw events, bounded by count, for `/diagnose` and for
//! evidence bundles (their per-destination figures come from the aggregator). `push` is on the
//! pipeline's hot path: one compact record into a ring (see [`record`](super::record)), no
//! growth past the bound, no other work.
use std::{
    collections::VecDeque,
    time::{Duration, SystemTime},
};

use super::record::{Contexts, Record};
use crate::event::Event;

/// Events from several CPUs reach the agent slightly out of time order; scans from the newest
/// end stop only this far past the point they look for.
pub const REORDER_SLACK: Duration = Duration::from_secs(2);

/// What a growing recorder allocates up front; it grows to its bound only if traffic needs it.
const INITIAL_ALLOCATION: usize = 4096;

pub struct FlightRecorder {
    records: VecDeque<Record>,
    contexts: Contexts,
    capacity: usize,
    dropped: u64,
    /// Time of the newest event pushed out so far (ns since the epoch): windows starting
    /// before it are incomplete.
    newest_dropped: Option<u64>,
}

/// Nanoseconds since the epoch, as records keep time.
fn epoch_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl FlightRecorder {
    /// The default bound (`--recorder-events`): at 80 bytes an event, some 8 MB.
    pub const DEFAULT_CAPACITY: usize = 100_000;

    /// Keeps at most `capacity` events (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        FlightRecorder {
            records: VecDeque::with_capacity(capacity.min(INITIAL_ALLOCATION)),
            contexts: Contexts::default(),
            capacity,
            dropped: 0,
            newest_dropped: None,
        }
    }

    /// Records one event, forgetting the oldest when full.
    pub fn push(&mut self, event: &Event) {
        if self.records.len() == self.capacity
            && let Some(old) = self.records.pop_front()
        {
            self.dropped += 1;
            self.newest_dropped = Some(self.newest_dropped.map_or(old.time, |t| t.max(old.time)));
            self.contexts.release(&old);
        } else if self.records.len() == self.records.capacity() {
            // Grow by doubling, but never past the bound: a VecDeque left to itself would
            // double 65,536 events into 131,072 slots for a bound of 100,000 (2.6 MB unused).
            let more = self.records.len().min(self.capacity - self.records.len());
            self.records.reserve_exact(more);
        }
        let record = self.contexts.record(event);
        self.records.push_back(record);
    }

    /// Records a batch (e.g. one ring-buffer drain) under a single lock.
    pub fn extend<'a>(&mut self, events: impl IntoIterator<Item = &'a Event>) {
        for event in events {
            self.push(event);
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Events forgotten because the recorder was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Whether every event from `since` on is still here.
    pub fn covers(&self, since: SystemTime) -> bool {
        self.newest_dropped.is_none_or(|t| t < epoch_nanos(since))
    }

    /// The events at or after `since`, oldest first as they arrived.
    fn iter_since(&self, since: SystemTime) -> impl Iterator<Item = Event> + '_ {
        let since = epoch_nanos(since);
        let stop = since.saturating_sub(REORDER_SLACK.as_nanos() as u64);
        // Index of the first record of the tail that may hold events at or after `since`.
        let from = self.records.len()
            - self
                .records
                .iter()
                .rev()
                .take_while(|r| r.time >= stop)
                .count();
        self.records
            .range(from..)
            .filter(move |r| r.time >= since)
            .map(|r| self.contexts.event(r))
    }

    /// The newest `n` events for which `wanted` holds, oldest first.
    pub fn last_where(&self, n: usize, wanted: impl Fn(&Event) -> bool) -> Vec<Event> {
        let mut last: Vec<Event> = self
            .records
            .iter()
            .rev()
            .map(|r| self.contexts.event(r))
            .filter(|e| wanted(e))
            .take(n)
            .collect();
        last.reverse();
        last
    }

    /// A copy of the events at or after `since`, for `/diagnose` and bundles.
    pub fn events_since(&self, since: SystemTime) -> Vec<Event> {
        self.iter_since(since).collect()
    }
}

impl Default for FlightRecorder {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::testing::{at, connect_ok};

    #[test]
    fn keeps_at_most_its_capacity_and_counts_what_it_forgets() {
        let mut recorder = FlightRecorder::new(100);
        for i in 0..1000 {
            recorder.push(&connect_ok("10.0.0.1:80", at(i as f64), 100));
        }
        assert_eq!(recorder.len(), 100);
        assert_eq!(recorder.dropped(), 900);
        let kept = recorder.events_since(at(0.0));
        assert_eq!(kept.len(), 100);
        assert_eq!(kept[0].time, at(900.0), "the oldest go first");
        assert!(recorder.covers(at(900.0)));
        assert!(!recorder.covers(at(899.0)));
        assert!(
            recorder.records.capacity() < 1000,
            "never grew past its bound"
        );
    }

    #[test]
    fn grows_to_its_bound_and_not_past_it() {
        let mut recorder = FlightRecorder::new(10_000);
        for i in 0..12_000 {
            recorder.push(&connect_ok("10.0.0.1:80", at(i as f64), 100));
        }
        assert_eq!(recorder.len(), 10_000);
        assert_eq!(recorder.records.capacity(), 10_000, "not doubled to 16,384");
    }

    #[test]
    fn events_since_tolerates_slightly_unordered_arrival() {
        let mut recorder = FlightRecorder::new(10);
        for t in [10.0, 11.0, 13.0, 12.5, 12.0, 14.0] {
            recorder.push(&connect_ok("10.0.0.1:80", at(t), 100));
        }
        let times: Vec<_> = recorder
            .events_since(at(12.0))
            .iter()
            .map(|e| e.time)
            .collect();
        assert_eq!(times, vec![at(13.0), at(12.5), at(12.0), at(14.0)]);
    }
}
