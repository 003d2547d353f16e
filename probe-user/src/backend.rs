//! The backends behind virtual addresses: the translations the cgroup_skb program reports (a
//! connect's SYN left for another address than the socket's, after DNAT) by the socket's ends,
//! so that the socket's connect, retransmit, reset and close events carry the backend.
//!
//! A translation is reported before the connect ends (the SYN leaves before any answer), and the
//! ring buffer keeps that order. The table is keyed by the socket's two ends: a later connection
//! with the same ends (the same local port again, to the same virtual address) reports its own
//! translation and replaces the entry. Bounded: past [`CAPACITY`] the oldest entry goes.
use std::collections::{HashMap, VecDeque};

use crate::event::{Endpoint, Event};

/// Sockets whose backend is remembered at once.
pub const CAPACITY: usize = 65_536;

pub struct Backends {
    by_socket: HashMap<(Endpoint, Endpoint), Endpoint>,
    /// Insertion order, for eviction; a key may appear more than once (replaced entries).
    order: VecDeque<(Endpoint, Endpoint)>,
    capacity: usize,
}

impl Default for Backends {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl Backends {
    pub fn with_capacity(capacity: usize) -> Self {
        Backends {
            by_socket: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// The socket `src` -> `original` sent its SYN to `backend`.
    pub fn translated(&mut self, src: Endpoint, original: Endpoint, backend: Endpoint) {
        let key = (src, original);
        if self.by_socket.insert(key, backend).is_none() {
            self.order.push_back(key);
            while self.by_socket.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.by_socket.remove(&old);
                }
            }
        }
    }

    /// Sets the event's backend if its socket was translated.
    pub fn annotate(&self, event: &mut Event) {
        if !self.by_socket.is_empty() {
            event.backend = self.by_socket.get(&(event.src, event.dst)).copied();
        }
    }

    pub fn len(&self) -> usize {
        self.by_socket.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_socket.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::testing::{self, at};

    #[test]
    fn events_of_a_translated_socket_carry_its_backend() {
        let mut backends = Backends::default();
        let vip = "10.96.0.10:80".parse().unwrap();
        let src = "10.200.0.1:40000".parse().unwrap();
        backends.translated(src, vip, "10.1.4.7:8080".parse().unwrap());
        let mut connect = testing::event(
            Some(crate::event::Side::Client),
            "10.200.0.1:40000",
            "10.96.0.10:80",
            at(0.0),
            testing::established(10),
        );
        backends.annotate(&mut connect);
        assert_eq!(connect.backend, Some("10.1.4.7:8080".parse().unwrap()));
        // Another socket to the same address was not translated (or not seen): no backend.
        let mut other = testing::client("10.96.0.10:80", at(0.0), testing::established(10));
        other.src = "10.200.0.1:40001".parse().unwrap();
        backends.annotate(&mut other);
        assert_eq!(other.backend, None);
        // The same ends again, translated elsewhere: the new backend.
        backends.translated(src, vip, "10.1.4.8:8080".parse().unwrap());
        backends.annotate(&mut connect);
        assert_eq!(connect.backend, Some("10.1.4.8:8080".parse().unwrap()));
        assert_eq!(backends.len(), 1);
    }

    #[test]
    fn the_table_is_bounded_oldest_first() {
        let mut backends = Backends::with_capacity(2);
        let vip: Endpoint = "10.96.0.10:80".parse().unwrap();
        let backend: Endpoint = "10.1.4.7:8080".parse().unwrap();
        for port in 1..=3u16 {
            backends.translated(Endpoint::new([10, 0, 0, 1].into(), port), vip, backend);
        }
        assert_eq!(backends.len(), 2);
        let mut first = testing::client("10.96.0.10:80", at(0.0), testing::established(1));
        first.src = Endpoint::new([10, 0, 0, 1].into(), 1);
        backends.annotate(&mut first);
        assert_eq!(first.backend, None);
        first.src = Endpoint::new([10, 0, 0, 1].into(), 3);
        backends.annotate(&mut first);
        assert_eq!(first.backend, Some(backend));
    }
}
