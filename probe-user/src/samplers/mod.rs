//! Counts the agent reads about once a second and turns into events, beside the events the
//! kernel's ring buffer delivers: the dropped data segments the programs counted per connection
//! (`drop_counts`), and each known network namespace's listen overflows and connection-tracking
//! failures (`netns`). They go to the same consumers (aggregator, flight recorder, log) as the
//! kernel's events; the tally, which accounts for the ring buffer, does not count them.
use std::time::SystemTime;

use aya::maps::{HashMap, MapData, PerCpuHashMap};
use probe_common::{DropKey, ListenerKey, ListenerRecord};

use crate::{decode::DropReasons, event::Event};

pub mod drop_counts;
pub mod netns;

pub use drop_counts::DropCounts;
pub use netns::Namespaces;

/// Both samplers.
pub struct Samplers {
    drops: DropCounts,
    namespaces: Namespaces,
}

impl Samplers {
    pub fn new(
        drop_counts: PerCpuHashMap<MapData, DropKey, u64>,
        listeners: HashMap<MapData, ListenerKey, ListenerRecord>,
        drop_reasons: DropReasons,
    ) -> Self {
        Samplers {
            drops: DropCounts::new(drop_counts, drop_reasons),
            namespaces: Namespaces::new(listeners, "/proc"),
        }
    }

    /// What changed since the last call, as events at `now`. The first call of a namespace only
    /// takes its counters as the baseline.
    pub fn sample(&mut self, now: SystemTime) -> Vec<Event> {
        let mut events = Vec::new();
        self.drops.sample(now, &mut events);
        self.namespaces.sample(now, &mut events);
        events
    }
}
