//! The destinations currently folded into `destination="other"`, remembered by a 64-bit
//! fingerprint in a set of bounded size, so that each is counted once while it stays folded.
use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    time::{Duration, SystemTime},
};

/// Folded destinations remembered at once (16 bytes each, about 1.5 MiB at most).
pub const CAPACITY: usize = 65_536;

/// Fingerprints are already hashes: use them as they are.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Fingerprint -> last time the destination was seen folded.
pub struct FoldedSet {
    seen: HashMap<u64, SystemTime, BuildHasherDefault<Identity>>,
    capacity: usize,
}

impl FoldedSet {
    pub fn new(capacity: usize) -> Self {
        FoldedSet {
            seen: HashMap::with_capacity_and_hasher(capacity.min(1024), Default::default()),
            capacity,
        }
    }

    /// Notes a folded event of `fingerprint` at `time`; true when the destination was not
    /// folded already, i.e. when it must be counted. With the set full, a destination not in
    /// it is counted every time it is seen (an overcount, never a growing map).
    pub fn note(&mut self, fingerprint: u64, time: SystemTime) -> bool {
        if let Some(last) = self.seen.get_mut(&fingerprint) {
            if time > *last {
                *last = time;
            }
            return false;
        }
        if self.seen.len() < self.capacity {
            self.seen.insert(fingerprint, time);
        }
        true
    }

    /// The destination got a slot of its own: it is no longer folded.
    pub fn forget(&mut self, fingerprint: u64) {
        self.seen.remove(&fingerprint);
    }

    /// Forgets destinations not seen for `idle`: if they return folded, they count again.
    pub fn expire(&mut self, now: SystemTime, idle: Duration) {
        self.seen
            .retain(|_, last| now.duration_since(*last).unwrap_or_default() < idle);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_once_while_folded_and_stays_bounded() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut set = FoldedSet::new(3);
        assert!(set.note(1, t0));
        assert!(!set.note(1, t0 + Duration::from_secs(5)));
        assert!(set.note(2, t0));
        assert!(set.note(3, t0));
        // Full: a fourth is counted each time, and not stored.
        assert!(set.note(4, t0));
        assert!(set.note(4, t0));
        assert_eq!(set.len(), 3);
        // 1 was seen at t0+5 s; 2 and 3 at t0.
        set.expire(t0 + Duration::from_secs(10), Duration::from_secs(8));
        assert_eq!(set.len(), 1);
        assert!(!set.note(1, t0 + Duration::from_secs(11)));
        set.forget(1);
        assert!(set.is_empty());
    }
}
