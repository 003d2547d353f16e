//! The join: which name an address was recently an answer for. Fed by the client side's
//! answers; an entry lives for its record's TTL (plus a short grace, since applications connect
//! just after the answer and a TTL of 0 is common) and the table holds at most `capacity`
//! addresses, the oldest dropped first. The most recent answer for an address wins.
use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

/// Added to every TTL: a connect follows its answer by milliseconds, and TTL 0 answers exist.
pub const GRACE: Duration = Duration::from_secs(5);

pub struct NameCache {
    capacity: usize,
    by_addr: HashMap<IpAddr, (Arc<str>, Instant, u64)>,
    /// Addresses by insertion, with the serial of the entry they were queued for.
    order: VecDeque<(IpAddr, u64)>,
    serial: u64,
}

impl NameCache {
    pub fn new(capacity: usize) -> Self {
        NameCache {
            capacity: capacity.max(1),
            by_addr: HashMap::new(),
            order: VecDeque::new(),
            serial: 0,
        }
    }

    pub fn insert(&mut self, addr: IpAddr, name: Arc<str>, ttl: u32, now: Instant) {
        let expires = now + Duration::from_secs(u64::from(ttl)) + GRACE;
        self.serial += 1;
        self.by_addr.insert(addr, (name, expires, self.serial));
        self.order.push_back((addr, self.serial));
        while self.by_addr.len() > self.capacity || self.order.len() > 2 * self.capacity {
            let Some((old, serial)) = self.order.pop_front() else {
                break;
            };
            if self.by_addr.get(&old).is_some_and(|e| e.2 == serial) {
                self.by_addr.remove(&old);
            }
        }
    }

    /// The name `addr` was last an answer for, while that answer is still valid.
    pub fn name_of(&self, addr: IpAddr, now: Instant) -> Option<Arc<str>> {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        self.by_addr
            .get(&addr)
            .filter(|(_, expires, _)| *expires > now)
            .map(|(name, _, _)| name.clone())
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_answer_wins_until_its_ttl_and_the_table_is_capped() {
        let now = Instant::now();
        let mut names = NameCache::new(2);
        let a: IpAddr = "10.0.3.7".parse().unwrap();
        names.insert(a, "old.test".into(), 300, now);
        names.insert(a, "api.test".into(), 10, now);
        assert_eq!(names.name_of(a, now).as_deref(), Some("api.test"));
        assert_eq!(
            names.name_of(a, now + Duration::from_secs(14)).as_deref(),
            Some("api.test")
        );
        assert_eq!(names.name_of(a, now + Duration::from_secs(16)), None);
        for i in 0..5u8 {
            names.insert(IpAddr::from([10, 0, 0, i]), "x.test".into(), 60, now);
        }
        assert_eq!(names.len(), 2);
        assert_eq!(names.name_of(a, now), None);
        let mapped: IpAddr = "::ffff:10.0.0.4".parse().unwrap();
        assert_eq!(names.name_of(mapped, now).as_deref(), Some("x.test"));
    }
}
