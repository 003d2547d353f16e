//! The shape of a problem in time: bursts separated by quiet (what operators call
//! "intermittent"), or a steady rate.
//!
//! One rule decides the label, and the bursts listed are its evidence, so the two cannot
//! disagree: a verdict is `bursty` when most of its matching events fall into bursts and the
//! bursts leave most of the time the destination was active without them; then the bursts are
//! listed. Otherwise it is `steady` and lists none: the problem was there for as long as the
//! destination was watched, whether that was five minutes of scattered failures or twelve
//! refusals within one millisecond with nothing around them. A failed connect is the span
//! from its SYN to its failure (a connect that waited through SYN retransmits was failing all
//! that time), so three connects that give up together after two seconds of retransmits are
//! one two-second episode, not an instant in two quiet seconds.
use std::time::{Duration, SystemTime};

use super::verdict::{Burst, Pattern};

/// Two matching events further apart than this belong to different episodes: retry loops and
/// connection pools retry within a few seconds, so a longer silence means the fault went away.
pub const BURST_GAP: Duration = Duration::from_secs(5);

/// An episode needs this many matching events to be called a burst; one or two events close
/// together are as likely to be chance as an episode.
pub const BURST_MIN_EVENTS: usize = 3;

/// Failures are "bursty" when at least this share of them falls inside bursts...
pub const BURSTY_MIN_SHARE: f64 = 0.8;

/// ...and the bursts cover at most this share of the time the destination was active: the
/// rest of the time the same traffic went through, which is what makes a fault intermittent.
pub const BURSTY_MAX_COVERAGE: f64 = 0.5;

/// When one matching event was in progress: an instant for most, from the SYN to the failure
/// for a failed connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Episode {
    pub start: SystemTime,
    pub end: SystemTime,
}

impl Episode {
    pub fn at(time: SystemTime) -> Self {
        Episode {
            start: time,
            end: time,
        }
    }
}

/// Splits the matching events into bursts and says whether they came in bursts or at a steady
/// rate; the bursts come back only with `bursty`. `active` is the first and last moment seen
/// for the destination (any kind of event; connects from their SYN): the span against which
/// quiet is measured. It depends only on the events, never on the window's bounds, so a log and
/// an agent judging the same events agree.
pub fn shape(episodes: &[Episode], active: (SystemTime, SystemTime)) -> (Pattern, Vec<Burst>) {
    let mut sorted = episodes.to_vec();
    sorted.sort_unstable();
    let mut active = active;
    for e in &sorted {
        active = (active.0.min(e.start), active.1.max(e.end));
    }
    let mut bursts = Vec::new();
    let mut in_bursts = 0usize;
    let mut covered = Duration::ZERO;
    let mut i = 0;
    while i < sorted.len() {
        let (start, mut end) = (sorted[i].start, sorted[i].end);
        let mut j = i + 1;
        while j < sorted.len() && gap(end, sorted[j].start.max(end)) <= BURST_GAP {
            end = end.max(sorted[j].end);
            j += 1;
        }
        let count = j - i;
        if count >= BURST_MIN_EVENTS {
            let duration = gap(start, end);
            covered += duration;
            in_bursts += count;
            bursts.push(Burst {
                start: super::format_time(start),
                duration_seconds: super::round(duration.as_secs_f64(), 3),
                failures: count as u64,
            });
        }
        i = j;
    }
    let span = gap(active.0, active.1);
    let bursty = !bursts.is_empty()
        && in_bursts as f64 >= BURSTY_MIN_SHARE * sorted.len() as f64
        && !span.is_zero()
        && covered.as_secs_f64() <= BURSTY_MAX_COVERAGE * span.as_secs_f64();
    if bursty {
        (Pattern::Bursty, bursts)
    } else {
        (Pattern::Steady, Vec::new())
    }
}

fn gap(a: SystemTime, b: SystemTime) -> Duration {
    b.duration_since(a)
        .or_else(|_| a.duration_since(b))
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000) + Duration::from_secs_f64(secs)
    }

    fn instants(times: &[SystemTime]) -> Vec<Episode> {
        times.iter().copied().map(Episode::at).collect()
    }

    #[test]
    fn two_episodes_in_a_quiet_window_are_bursty() {
        let mut times: Vec<_> = (0..10).map(|i| t(30.0 + i as f64 * 0.2)).collect();
        times.extend((0..6).map(|i| t(200.0 + i as f64)));
        let (pattern, bursts) = shape(&instants(&times), (t(0.0), t(300.0)));
        assert_eq!(pattern, Pattern::Bursty);
        assert_eq!(bursts.len(), 2);
        assert_eq!(bursts[0].failures, 10);
        assert_eq!(bursts[0].start, "2026-11-18T11:07:10.000Z");
        assert!((bursts[0].duration_seconds - 1.8).abs() < 1e-9);
        assert_eq!(bursts[1].failures, 6);
        assert!((bursts[1].duration_seconds - 5.0).abs() < 1e-9);
    }

    #[test]
    fn a_failure_every_few_seconds_all_along_is_steady() {
        let times: Vec<_> = (0..100).map(|i| t(i as f64 * 3.0)).collect();
        let (pattern, bursts) = shape(&instants(&times), (t(0.0), t(300.0)));
        assert_eq!(pattern, Pattern::Steady);
        // One long episode covering everything is no burst: a steady label lists none.
        assert!(bursts.is_empty());
    }

    #[test]
    fn sparse_failures_are_steady_without_bursts() {
        let times: Vec<_> = (0..10).map(|i| t(i as f64 * 30.0)).collect();
        let (pattern, bursts) = shape(&instants(&times), (t(0.0), t(300.0)));
        assert_eq!(pattern, Pattern::Steady);
        assert!(bursts.is_empty());
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let mut times: Vec<_> = (0..5).map(|i| t(10.0 + i as f64)).collect();
        let forward = shape(&instants(&times), (t(0.0), t(100.0)));
        times.reverse();
        assert_eq!(shape(&instants(&times), (t(0.0), t(100.0))), forward);
        assert_eq!(forward.0, Pattern::Bursty);
    }
}
