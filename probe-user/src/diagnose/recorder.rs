//! The flight recorder: the most recent raw events, bounded by count, for `/diagnose` and for
//! evidence bundles (their per-destination figures come from the aggregator). `push` is on the pipeline's hot path: one clone into a ring, no growth past
//! the bound, no other work.
use std::{
    collections::VecDeque,
    time::{Duration, SystemTime},
};

use crate::event::Event;

/// Events from several CPUs reach the agent slightly out of time order; scans from the newest
/// end stop only this far past the point they look for.
pub const REORDER_SLACK: Duration = Duration::from_secs(2);

/// What a growing recorder allocates up front; it grows to its bound only if traffic needs it.
const INITIAL_ALLOCATION: usize = 4096;

pub struct FlightRecorder {
    events: VecDeque<Event>,
    capacity: usize,
    dropped: u64,
    /// Time of the newest event pushed out so far: windows starting before it are incomplete.
    newest_dropped: Option<SystemTime>,
}

impl FlightRecorder {
    /// The default bound (`--recorder-events`): at about 200 bytes an event, some 20 MB.
    pub const DEFAULT_CAPACITY: usize = 100_000;

    /// Keeps at most `capacity` events (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        FlightRecorder {
            events: VecDeque::with_capacity(capacity.min(INITIAL_ALLOCATION)),
            capacity,
            dropped: 0,
            newest_dropped: None,
        }
    }

    /// Records one event, forgetting the oldest when full.
    pub fn push(&mut self, event: &Event) {
        self.push_owned(event.clone());
    }

    /// Records a batch (e.g. one ring-buffer drain) under a single lock.
    pub fn extend<'a>(&mut self, events: impl IntoIterator<Item = &'a Event>) {
        for event in events {
            self.push(event);
        }
    }

    pub fn push_owned(&mut self, event: Event) {
        if self.events.len() == self.capacity
            && let Some(old) = self.events.pop_front()
        {
            self.dropped += 1;
            self.newest_dropped = Some(match self.newest_dropped {
                Some(t) => t.max(old.time),
                None => old.time,
            });
        } else if self.events.len() == self.events.capacity() {
            // Grow by doubling, but never past the bound: a VecDeque left to itself would
            // double 65,536 events into 131,072 slots for a bound of 100,000 (6 MB unused).
            let more = self.events.len().min(self.capacity - self.events.len());
            self.events.reserve_exact(more);
        }
        self.events.push_back(event);
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
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
        self.newest_dropped.is_none_or(|t| t < since)
    }

    /// The events at or after `since`, oldest first as they arrived.
    pub fn iter_since(&self, since: SystemTime) -> impl Iterator<Item = &Event> {
        let stop = since.checked_sub(REORDER_SLACK).unwrap_or(since);
        // Index of the first event of the tail that may hold events at or after `since`.
        let from = self.events.len()
            - self
                .events
                .iter()
                .rev()
                .take_while(|e| e.time >= stop)
                .count();
        self.events.range(from..).filter(move |e| e.time >= since)
    }

    /// The newest `n` events for which `wanted` holds, oldest first.
    pub fn last_where(&self, n: usize, wanted: impl Fn(&Event) -> bool) -> Vec<Event> {
        let mut last: Vec<Event> = self
            .events
            .iter()
            .rev()
            .filter(|e| wanted(e))
            .take(n)
            .cloned()
            .collect();
        last.reverse();
        last
    }

    /// A copy of the events at or after `since`, for `/diagnose` and bundles.
    pub fn events_since(&self, since: SystemTime) -> Vec<Event> {
        self.iter_since(since).cloned().collect()
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
            recorder.events.capacity() < 1000,
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
        assert_eq!(recorder.events.capacity(), 10_000, "not doubled to 16,384");
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
