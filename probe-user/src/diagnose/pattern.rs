//! The shape of a problem in time: bursts separated by quiet (what operators call
//! "intermittent"), or a steady rate.
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

/// Splits the matching events' times into bursts and says whether they came in bursts or at a
/// steady rate. `active` is the first and last event seen for the destination (any kind): the
/// span against which quiet is measured. It depends only on the events, never on the window's
/// bounds, so a log and an agent judging the same events agree.
pub fn shape(times: &[SystemTime], active: (SystemTime, SystemTime)) -> (Pattern, Vec<Burst>) {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    let mut bursts = Vec::new();
    let mut in_bursts = 0usize;
    let mut covered = Duration::ZERO;
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i + 1;
        while j < sorted.len() && gap(sorted[j - 1], sorted[j]) <= BURST_GAP {
            j += 1;
        }
        let count = j - i;
        if count >= BURST_MIN_EVENTS {
            let duration = gap(sorted[i], sorted[j - 1]);
            covered += duration;
            in_bursts += count;
            bursts.push(Burst {
                start: super::format_time(sorted[i]),
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
    let pattern = if bursty {
        Pattern::Bursty
    } else {
        Pattern::Steady
    };
    (pattern, bursts)
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

    #[test]
    fn two_episodes_in_a_quiet_window_are_bursty() {
        let mut times: Vec<_> = (0..10).map(|i| t(30.0 + i as f64 * 0.2)).collect();
        times.extend((0..6).map(|i| t(200.0 + i as f64)));
        let (pattern, bursts) = shape(&times, (t(0.0), t(300.0)));
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
        let (pattern, bursts) = shape(&times, (t(0.0), t(300.0)));
        assert_eq!(pattern, Pattern::Steady);
        assert_eq!(bursts.len(), 1, "one long episode covering everything");
    }

    #[test]
    fn sparse_failures_are_steady_without_bursts() {
        let times: Vec<_> = (0..10).map(|i| t(i as f64 * 30.0)).collect();
        let (pattern, bursts) = shape(&times, (t(0.0), t(300.0)));
        assert_eq!(pattern, Pattern::Steady);
        assert!(bursts.is_empty());
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let mut times: Vec<_> = (0..5).map(|i| t(10.0 + i as f64)).collect();
        let forward = shape(&times, (t(0.0), t(100.0)));
        times.reverse();
        assert_eq!(shape(&times, (t(0.0), t(100.0))), forward);
        assert_eq!(forward.0, Pattern::Bursty);
    }
}
