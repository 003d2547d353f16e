//! Sliding windows over event time: a ring of 10-second buckets, each with its counts and a
//! small log-linear latency histogram, from which the last 1 and 5 minutes are summed.
use std::time::{Duration, SystemTime};

use strum::EnumCount;

use crate::{event::FailureReason, quantile};

/// Width of one bucket.
pub const BUCKET: Duration = Duration::from_secs(BUCKET_SECS);
const BUCKET_SECS: u64 = 10;
/// Buckets kept: five minutes' worth.
pub const RING: usize = 30;

/// What happened at one destination, over its lifetime or over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Connects this host opened (side client, or unknown).
    pub attempts: u64,
    pub established: u64,
    /// Failed connects, indexed by [`FailureReason`].
    pub failures: [u64; FailureReason::COUNT],
    /// Connections this host accepted (side server); not attempts.
    pub accepted: u64,
    /// Segments resent, from retransmit events, as they happen.
    pub retransmitted_segments: u64,
    /// Of those, SYNs and SYN-ACKs (the handshake phase).
    pub syn_retransmitted_segments: u64,
    /// Segments sent by connections that closed, retransmissions included.
    pub close_segments_sent: u64,
    /// Segments retransmitted by connections that closed.
    pub close_segments_retransmitted: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    /// Packets the kernel dropped with a reason (handshake segments, DNS packets, counted data
    /// segments).
    pub drops: u64,
    /// Times the destination's listener overflowed its accept queue.
    pub listen_overflows: u64,
}

impl Counts {
    pub fn failures_total(&self) -> u64 {
        self.failures.iter().sum()
    }

    pub fn failure(&self, reason: FailureReason) -> u64 {
        self.failures[reason as usize]
    }

    /// Failed / attempted connects; `None` without attempts.
    pub fn failure_ratio(&self) -> Option<f64> {
        (self.attempts > 0).then(|| self.failures_total() as f64 / self.attempts as f64)
    }

    /// Retransmitted / sent segments of the connections that closed (both from the close
    /// events, so the ratio is exact); `None` when none closed having sent anything.
    pub fn retransmit_ratio(&self) -> Option<f64> {
        (self.close_segments_sent > 0)
            .then(|| self.close_segments_retransmitted as f64 / self.close_segments_sent as f64)
    }

    fn add(&mut self, other: &Counts) {
        self.attempts += other.attempts;
        self.established += other.established;
        for (a, b) in self.failures.iter_mut().zip(other.failures) {
            *a += b;
        }
        self.accepted += other.accepted;
        self.retransmitted_segments += other.retransmitted_segments;
        self.syn_retransmitted_segments += other.syn_retransmitted_segments;
        self.close_segments_sent += other.close_segments_sent;
        self.close_segments_retransmitted += other.close_segments_retransmitted;
        self.resets_sent += other.resets_sent;
        self.resets_received += other.resets_received;
        self.drops += other.drops;
        self.listen_overflows += other.listen_overflows;
    }
}

/// Handshake latencies in microseconds, log-linear: values below 4 us exactly, then four
/// equal sub-buckets per power of two, up to 2^25 us (33 s; longer ones count in the last
/// bucket). A percentile is reported as its bucket's midpoint: within 12.5 % of the truth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: [u32; LATENCY_BUCKETS],
}

const LATENCY_BUCKETS: usize = 96;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: [0; LATENCY_BUCKETS],
        }
    }
}

impl LatencyHistogram {
    fn index(micros: u64) -> usize {
        if micros < 4 {
            return micros as usize;
        }
        let octave = 63 - micros.leading_zeros() as usize; // >= 2
        let sub = ((micros >> (octave - 2)) & 3) as usize;
        (4 * (octave - 1) + sub).min(LATENCY_BUCKETS - 1)
    }

    /// The midpoint of bucket `i`, in microseconds.
    fn midpoint(i: usize) -> u64 {
        if i < 4 {
            return i as u64;
        }
        let octave = i / 4 + 1;
        let sub = (i % 4) as u64;
        let width = 1u64 << (octave - 2);
        (4 + sub) * width + width / 2
    }

    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let c = &mut self.counts[Self::index(micros)];
        *c = c.saturating_add(1);
    }

    pub fn samples(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }

    /// The `q` quantile (0 < q <= 1) by the nearest-rank rule ([`quantile::nearest_rank`]):
    /// the smallest bucket holding at least that many samples below or in it; `None` when
    /// empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let n = self.samples();
        if n == 0 {
            return None;
        }
        let rank = quantile::nearest_rank(q, n);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return Some(Duration::from_micros(Self::midpoint(i)));
            }
        }
        None
    }

    pub fn percentiles(&self) -> Option<LatencyPercentiles> {
        Some(LatencyPercentiles {
            p50: self.quantile(0.50)?,
            p90: self.quantile(0.90)?,
            p99: self.quantile(0.99)?,
            samples: self.samples(),
        })
    }

    fn add(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a = a.saturating_add(b);
        }
    }

    /// The buckets that hold samples, fastest first: `(from, to, count)`, from included and to
    /// excluded, in microseconds (the last bucket also holds everything slower).
    pub fn buckets(&self) -> Vec<(u64, u64, u64)> {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| {
                let (from, to) = Self::bounds(i);
                (from, to, u64::from(*c))
            })
            .collect()
    }

    /// The microseconds bucket `i` holds, `[from, to)`.
    fn bounds(i: usize) -> (u64, u64) {
        if i < 4 {
            return (i as u64, i as u64 + 1);
        }
        let octave = i / 4 + 1;
        let width = 1u64 << (octave - 2);
        let from = (4 + (i % 4) as u64) * width;
        (from, from + width)
    }
}

/// Handshake latency percentiles over a window (bucket midpoints, see [`LatencyHistogram`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencyPercentiles {
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    /// Established connects with a known latency in the window.
    pub samples: u64,
}

/// One destination's counts over the last `length` of event time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowStats {
    pub length: Duration,
    pub counts: Counts,
    pub latency: Option<LatencyPercentiles>,
}

impl WindowStats {
    pub fn failure_ratio(&self) -> Option<f64> {
        self.counts.failure_ratio()
    }

    pub fn retransmit_ratio(&self) -> Option<f64> {
        self.counts.retransmit_ratio()
    }
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// Which 10 seconds since the epoch this bucket holds; 0 for a bucket never written.
    epoch: u64,
    counts: Counts,
    latency: LatencyHistogram,
}

/// The last five minutes of one destination, in 10-second buckets keyed by event time.
pub struct Ring {
    buckets: Box<[Bucket; RING]>,
}

impl Default for Ring {
    fn default() -> Self {
        Ring {
            buckets: Box::new([Bucket::default(); RING]),
        }
    }
}

fn epoch_of(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() / BUCKET_SECS)
        .unwrap_or(0)
}

impl Ring {
    /// Forgets everything (the slot goes to another destination).
    pub fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
    }

    /// The bucket for an event at `time`, emptied first if it held older data; `None` when the
    /// event is older than anything the ring still covers at that position.
    fn bucket(&mut self, time: SystemTime) -> Option<(&mut Counts, &mut LatencyHistogram)> {
        let epoch = epoch_of(time);
        let b = &mut self.buckets[(epoch % RING as u64) as usize];
        if b.epoch != epoch {
            if b.epoch > epoch {
                return None;
            }
            *b = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        Some((&mut b.counts, &mut b.latency))
    }

    /// Applies `f` to the counts (and latency histogram) of the bucket holding `time`.
    pub fn update(&mut self, time: SystemTime, f: impl FnOnce(&mut Counts, &mut LatencyHistogram)) {
        if let Some((counts, latency)) = self.bucket(time) {
            f(counts, latency);
        }
    }

    /// The window of `buckets` buckets ending with the one that holds `now`: the bucket in
    /// progress and the `buckets - 1` before it (so "the last minute" covers 50 to 60 s).
    pub fn window(&self, now: SystemTime, buckets: usize) -> WindowStats {
        let (counts, latency) = self.sum(now, buckets);
        WindowStats {
            length: BUCKET * buckets as u32,
            counts,
            latency: latency.percentiles(),
        }
    }

    /// The handshake latencies of the window [`Ring::window`] covers.
    pub fn latency(&self, now: SystemTime, buckets: usize) -> LatencyHistogram {
        self.sum(now, buckets).1
    }

    fn sum(&self, now: SystemTime, buckets: usize) -> (Counts, LatencyHistogram) {
        let end = epoch_of(now);
        let start = end.saturating_sub(buckets.min(RING) as u64 - 1);
        let mut counts = Counts::default();
        let mut latency = LatencyHistogram::default();
        for b in self.buckets.iter() {
            if b.epoch != 0 && b.epoch >= start && b.epoch <= end {
                counts.add(&b.counts);
                latency.add(&b.latency);
            }
        }
        (counts, latency)
    }
}

/// The event time a window of `buckets` buckets ending at `now` covers: the whole buckets
/// before the one in progress, and that one up to `now`.
pub fn covered(now: SystemTime, buckets: usize) -> Duration {
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let in_bucket = Duration::from_nanos((since_epoch.as_nanos() % BUCKET.as_nanos()) as u64);
    BUCKET * (buckets.clamp(1, RING) as u32 - 1) + in_bucket
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000 + secs)
    }

    #[test]
    fn histogram_buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for micros in 0..100_000u64 {
            let i = LatencyHistogram::index(micros);
            assert!(i >= last, "{micros}");
            last = i;
            let mid = LatencyHistogram::midpoint(i) as f64;
            if micros > 0 {
                let err = (mid - micros as f64).abs() / micros as f64;
                assert!(err <= 0.125, "{micros} -> {mid}");
            }
        }
        assert_eq!(LatencyHistogram::index(u64::MAX), LATENCY_BUCKETS - 1);
        assert_eq!(LatencyHistogram::index(10_000_000), 4 * 22);
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.percentiles(), None);
        // 90 fast (100 us), 9 medium (10 ms), 1 slow (1 s).
        for _ in 0..90 {
            h.record(Duration::from_micros(100));
        }
        for _ in 0..9 {
            h.record(Duration::from_millis(10));
        }
        h.record(Duration::from_secs(1));
        let p = h.percentiles().unwrap();
        assert_eq!(p.samples, 100);
        assert_eq!(p.p50, Duration::from_micros(104)); // [96, 112)
        assert_eq!(p.p90, Duration::from_micros(104));
        assert_eq!(p.p99, Duration::from_micros(9_216)); // [8192, 10240)
        assert_eq!(h.quantile(1.0), Some(Duration::from_micros(983_040)));
    }

    #[test]
    fn buckets_tile_the_microseconds() {
        let mut next = 0;
        for i in 0..LATENCY_BUCKETS {
            let (from, to) = LatencyHistogram::bounds(i);
            assert_eq!(from, next, "bucket {i}");
            assert!(to > from);
            assert_eq!(LatencyHistogram::index(from), i);
            assert_eq!(LatencyHistogram::index(to - 1), i);
            let mid = LatencyHistogram::midpoint(i);
            assert!(from <= mid && mid < to.max(from + 1), "bucket {i}: {mid}");
            next = to;
        }
        let mut h = LatencyHistogram::default();
        h.record(Duration::from_micros(100));
        h.record(Duration::from_micros(101));
        h.record(Duration::from_millis(10));
        assert_eq!(h.buckets(), vec![(96, 112, 2), (8192, 10240, 1)]);
    }

    #[test]
    fn a_window_covers_its_whole_buckets_and_the_current_one_so_far() {
        assert_eq!(covered(at(0), 6), Duration::from_secs(50));
        assert_eq!(covered(at(7), 6), Duration::from_secs(57));
        assert_eq!(covered(at(9), 30), Duration::from_secs(299));
    }

    #[test]
    fn windows_follow_event_time() {
        let mut ring = Ring::default();
        // One attempt every 10 s for 10 minutes.
        for s in (0..600).step_by(10) {
            ring.update(at(s), |c, _| c.attempts += 1);
        }
        let now = at(599);
        assert_eq!(ring.window(now, 6).counts.attempts, 6);
        assert_eq!(ring.window(now, 30).counts.attempts, 30);
        // Much later, nothing is left in either window.
        assert_eq!(ring.window(at(2000), 30).counts.attempts, 0);
        // An event older than the ring covers is dropped, not mixed into a newer bucket.
        ring.update(at(200), |c, _| c.attempts += 100);
        assert_eq!(ring.window(now, 30).counts.attempts, 30);
        ring.clear();
        assert_eq!(ring.window(now, 30).counts.attempts, 0);
    }
}
