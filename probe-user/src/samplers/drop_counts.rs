//! Dropped data segments: the programs count them per connection, reason, side and direction in
//! a per-CPU LRU map (`DROP_COUNTS`) instead of sending an event each; here the counts become
//! one `drop` event per connection and reason for what was added since the last read.
use std::{collections::HashMap, time::SystemTime};

use aya::maps::{MapData, PerCpuHashMap};
use probe_common::{DropKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    decode::{self, DecodeError, DropReasons},
    event::{Drop, Event, EventDetail, Protocol},
};

pub struct DropCounts {
    map: PerCpuHashMap<MapData, DropKey, u64>,
    reasons: DropReasons,
    /// Each key's total when last read: what is already reported.
    reported: HashMap<DropKey, u64>,
    /// Whether an entry that could not be made an event was already logged.
    warned: bool,
}

impl DropCounts {
    pub fn new(map: PerCpuHashMap<MapData, DropKey, u64>, reasons: DropReasons) -> Self {
        DropCounts {
            map,
            reasons,
            reported: HashMap::new(),
            warned: false,
        }
    }

    /// Appends an event for every connection and reason whose count grew.
    pub fn sample(&mut self, now: SystemTime, out: &mut Vec<Event>) {
        let mut totals = HashMap::with_capacity(self.reported.len());
        for entry in self.map.iter() {
            let Ok((key, per_cpu)) = entry else {
                continue;
            };
            totals.insert(key, per_cpu.iter().sum::<u64>());
        }
        for (key, total) in &totals {
            let delta = new_since(self.reported.get(key).copied(), *total);
            if delta == 0 {
                continue;
            }
            match event(key, delta, now, &self.reasons) {
                Ok(event) => out.push(event),
                Err(e) if !self.warned => {
                    self.warned = true;
                    tracing::warn!("a count of dropped segments cannot be reported: {e}");
                }
                Err(_) => {}
            }
        }
        // Keys the map evicted are forgotten too: the map bounds this one.
        self.reported = totals;
    }
}

/// What a key's `total` adds to the `before` already reported. A total below it means the map
/// evicted the key and counted it afresh since.
fn new_since(before: Option<u64>, total: u64) -> u64 {
    match before {
        Some(before) if total >= before => total - before,
        _ => total,
    }
}

/// The `drop` event for `packets` of the key's connection.
pub fn event(
    key: &DropKey,
    packets: u64,
    time: SystemTime,
    reasons: &DropReasons,
) -> Result<Event, DecodeError> {
    let (src, dst) = decode::addresses(&key.endpoints)?;
    let protocol = match key.protocol {
        p if u16::from(p) == IPPROTO_TCP => Protocol::Tcp,
        IPPROTO_UDP => Protocol::Udp,
        _ => return Err(DecodeError::Protocol(key.protocol)),
    };
    Ok(Event {
        seq: 0,
        time,
        process: None,
        side: decode::side_of(key.side)?,
        src,
        dst,
        detail: EventDetail::Drop(Drop {
            reason: reasons.name(key.reason)?,
            protocol,
            tcp_flags: None,
            direction: decode::direction_of(key.direction)?,
            packets,
        }),
        workload: None,
        backend: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Direction;
    use probe_common::{AF_INET, Endpoints, side};

    #[test]
    fn counts_become_the_packets_added_since_the_last_read() {
        assert_eq!(new_since(None, 5), 5);
        assert_eq!(new_since(Some(5), 5), 0);
        assert_eq!(new_since(Some(5), 12), 7);
        // Evicted and counted afresh.
        assert_eq!(new_since(Some(12), 3), 3);
    }

    #[test]
    fn a_key_is_a_connections_count() {
        let mut endpoints = Endpoints {
            family: AF_INET,
            local_port: 8083,
            remote_port: 40000,
            _pad: 0,
            local_addr: [0; 16],
            remote_addr: [0; 16],
        };
        endpoints.local_addr[..4].copy_from_slice(&[10, 200, 0, 2]);
        endpoints.remote_addr[..4].copy_from_slice(&[10, 200, 0, 1]);
        let key = DropKey {
            endpoints,
            reason: 11,
            side: side::SERVER,
            direction: probe_common::direction::RECEIVED,
            protocol: 6,
            _pad: 0,
        };
        let reasons =
            DropReasons::from_variants(vec![("SKB_DROP_REASON_NETFILTER_DROP".into(), 11)]);
        let e = event(&key, 17, SystemTime::UNIX_EPOCH, &reasons).unwrap();
        assert_eq!(e.src, "10.200.0.2:8083".parse().unwrap());
        assert_eq!(e.side, Some(crate::event::Side::Server));
        let EventDetail::Drop(d) = e.detail else {
            panic!("not a drop")
        };
        assert_eq!(
            (d.packets, d.tcp_flags, d.direction),
            (17, None, Direction::Received)
        );
        assert!(d.is_counted());
        assert!(
            event(
                &DropKey { reason: 12, ..key },
                1,
                SystemTime::UNIX_EPOCH,
                &reasons
            )
            .is_err()
        );
    }
}
