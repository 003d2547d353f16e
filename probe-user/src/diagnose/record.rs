//! The flight recorder's compact form of an event: 80 bytes of fixed-size fields instead of an
//! [`Event`]'s 184, with what many events share (owner, workload, a name) kept once in an
//! interning table. 100,000 events take 7.6 MiB instead of 17.6.
//!
//! An event comes back out unchanged: [`Contexts::event`] of [`Contexts::record`] equals it.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::{
    event::{
        Close, Comm, Connect, ConnectOutcome, Conntrack, Direction, Drop, DropReason, Endpoint,
        Errno, Event, EventDetail, FailureReason, ListenOverflow, Process, Protocol, Reset,
        ResetReason, Retransmit, Side, TcpFlags, TcpState,
    },
    workload::Workload,
};

/// One event, fixed size. Times and durations are nanoseconds; the detail's numbers are in
/// `words` (which word holds what depends on `shape`).
pub struct Record {
    pub seq: u64,
    /// Since the Unix epoch.
    pub time: u64,
    words: [u64; 4],
    addresses: Addresses,
    /// Source, destination and backend ports.
    ports: [u16; 3],
    /// The interned owner, workload and name ([`Contexts`]).
    context: u32,
    side: Option<Side>,
    shape: Shape,
}

/// The three addresses: inline when all are IPv4 (the common case), else boxed.
enum Addresses {
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
        backend: Option<[u8; 4]>,
    },
    Any(Box<(IpAddr, IpAddr, Option<IpAddr>)>),
}

/// The detail's kind and its small fields; its numbers are in `Record::words`.
#[derive(Clone, Copy)]
enum Shape {
    /// Words: latency (or [`NONE`]), errno (or [`NONE`]), SYN retransmits.
    Connect { failed: Option<FailureReason> },
    /// Word: segments.
    Retransmit { state: TcpState },
    Reset {
        direction: Direction,
        state: Option<TcpState>,
    },
    /// Words: duration (or [`NONE`]), bytes sent, bytes received, segments sent and
    /// retransmitted (high and low halves).
    Close,
    /// Word: packets.
    Drop {
        protocol: Protocol,
        tcp_flags: Option<TcpFlags>,
        direction: Direction,
    },
    /// Words: overflows, backlog (or [`NONE`]), queued.
    ListenOverflow,
    /// Words: insert failures, drops, early drops, netns.
    Conntrack,
}

/// An absent optional number. No duration reaches it (584 years), no errno or backlog does.
const NONE: u64 = u64::MAX;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).map_or(NONE - 1, |n| n.min(NONE - 1))
}

fn optional_nanos(d: Option<Duration>) -> u64 {
    d.map_or(NONE, nanos)
}

fn duration(word: u64) -> Option<Duration> {
    (word != NONE).then(|| Duration::from_nanos(word))
}

/// What events share and the recorder keeps once: the owner, its workload, and the one name
/// an event may carry (a connect's `dst_name`, a reset's or a drop's reason).
struct Context {
    process: Option<Process>,
    workload: Option<Arc<Workload>>,
    text: Option<Arc<str>>,
}

/// A context's identity: the owner by value, the shared parts by address (two copies of one
/// name are two contexts, which costs a slot, never a wrong answer).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    pid: Option<u32>,
    comm: Option<Comm>,
    workload: usize,
    text: (usize, usize),
}

impl Key {
    fn of(
        process: &Option<Process>,
        workload: &Option<Arc<Workload>>,
        text: Option<&Arc<str>>,
    ) -> Self {
        Key {
            pid: process.as_ref().map(|p| p.pid),
            comm: process.as_ref().map(|p| p.comm),
            workload: workload.as_ref().map_or(0, |w| Arc::as_ptr(w) as usize),
            text: text.map_or((0, 0), |t| (t.as_ptr() as usize, t.len())),
        }
    }
}

struct Slot {
    context: Context,
    key: Key,
    /// Records that refer to it; at zero the slot is free.
    refs: u32,
}

/// The interning table of contexts, with reference counts: it holds at most as many contexts
/// as the recorder holds records, and usually a handful.
#[derive(Default)]
pub struct Contexts {
    slots: Vec<Slot>,
    free: Vec<u32>,
    ids: HashMap<Key, u32, foldhash::fast::RandomState>,
    /// The last context interned: consecutive events usually share it.
    last: Option<(Key, u32)>,
}

impl Contexts {
    /// The compact form of `event`, holding a reference to its context until [`Self::release`].
    pub fn record(&mut self, event: &Event) -> Record {
        let (words, shape, text) = detail(&event.detail);
        let context = self.intern(&event.process, &event.workload, text);
        let (src, dst, backend) = (event.src, event.dst, event.backend);
        let addresses = match (src.ip(), dst.ip(), backend.map(|b| b.ip())) {
            (IpAddr::V4(s), IpAddr::V4(d), None) => Addresses::V4 {
                src: s.octets(),
                dst: d.octets(),
                backend: None,
            },
            (IpAddr::V4(s), IpAddr::V4(d), Some(IpAddr::V4(b))) => Addresses::V4 {
                src: s.octets(),
                dst: d.octets(),
                backend: Some(b.octets()),
            },
            (s, d, b) => Addresses::Any(Box::new((s, d, b))),
        };
        Record {
            seq: event.seq,
            time: event
                .time
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, nanos),
            words,
            addresses,
            ports: [src.port(), dst.port(), backend.map_or(0, |b| b.port())],
            context,
            side: event.side,
            shape,
        }
    }

    /// The event `record` stands for.
    pub fn event(&self, record: &Record) -> Event {
        let context = &self.slots[record.context as usize].context;
        let [src_port, dst_port, backend_port] = record.ports;
        let (src, dst, backend) = match &record.addresses {
            Addresses::V4 { src, dst, backend } => (
                IpAddr::V4(Ipv4Addr::from(*src)),
                IpAddr::V4(Ipv4Addr::from(*dst)),
                backend.map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            ),
            Addresses::Any(all) => **all,
        };
        let [w0, w1, w2, w3] = record.words;
        let text = || context.text.clone();
        let detail = match record.shape {
            Shape::Connect { failed } => EventDetail::Connect(Connect {
                outcome: match failed {
                    None => ConnectOutcome::Established,
                    Some(reason) => ConnectOutcome::Failed {
                        reason,
                        errno: (w1 != NONE).then_some(Errno(w1 as u32)),
                    },
                },
                latency: duration(w0),
                syn_retransmits: w2 as u32,
                dst_name: text(),
            }),
            Shape::Retransmit { state } => EventDetail::Retransmit(Retransmit {
                state,
                segments: w0 as u32,
            }),
            Shape::Reset { direction, state } => EventDetail::Reset(Reset {
                direction,
                state,
                reason: text().map(ResetReason::from_shared),
            }),
            Shape::Close => EventDetail::Close(Close {
                duration: duration(w0),
                bytes_sent: w1,
                bytes_received: w2,
                segments_sent: (w3 >> 32) as u32,
                segments_retransmitted: w3 as u32,
            }),
            Shape::Drop {
                protocol,
                tcp_flags,
                direction,
            } => EventDetail::Drop(Drop {
                reason: DropReason::from_shared(text().unwrap_or_else(|| "".into())),
                protocol,
                tcp_flags,
                direction,
                packets: w0,
            }),
            Shape::ListenOverflow => EventDetail::ListenOverflow(ListenOverflow {
                overflows: w0,
                backlog: (w1 != NONE).then_some(w1 as u32),
                queued: w2 as u32,
            }),
            Shape::Conntrack => EventDetail::Conntrack(Conntrack {
                netns: w3 as u32,
                insert_failed: w0,
                drop: w1,
                early_drop: w2,
            }),
        };
        Event {
            seq: record.seq,
            time: SystemTime::UNIX_EPOCH + Duration::from_nanos(record.time),
            process: context.process.clone(),
            side: record.side,
            src: Endpoint::new(src, src_port),
            dst: Endpoint::new(dst, dst_port),
            detail,
            workload: context.workload.clone(),
            backend: backend.map(|ip| Endpoint::new(ip, backend_port)),
        }
    }

    /// Lets go of a record's context (the record is being forgotten).
    pub fn release(&mut self, record: &Record) {
        let id = record.context;
        let slot = &mut self.slots[id as usize];
        slot.refs -= 1;
        if slot.refs == 0 {
            self.ids.remove(&slot.key);
            // Drop the shared parts now; the slot is reused by the next new context.
            slot.context = Context {
                process: None,
                workload: None,
                text: None,
            };
            if self.last.is_some_and(|(_, last)| last == id) {
                self.last = None;
            }
            self.free.push(id);
        }
    }

    /// Contexts in use.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn intern(
        &mut self,
        process: &Option<Process>,
        workload: &Option<Arc<Workload>>,
        text: Option<&Arc<str>>,
    ) -> u32 {
        let key = Key::of(process, workload, text);
        let id = match self.last {
            Some((last, id)) if last == key => id,
            _ => match self.ids.get(&key) {
                Some(&id) => id,
                None => {
                    let slot = Slot {
                        context: Context {
                            process: process.clone(),
                            workload: workload.clone(),
                            text: text.cloned(),
                        },
                        key,
                        refs: 0,
                    };
                    let id = match self.free.pop() {
                        Some(id) => {
                            self.slots[id as usize] = slot;
                            id
                        }
                        None => {
                            self.slots.push(slot);
                            (self.slots.len() - 1) as u32
                        }
                    };
                    self.ids.insert(key, id);
                    id
                }
            },
        };
        self.last = Some((key, id));
        self.slots[id as usize].refs += 1;
        id
    }
}

/// The detail's numbers, shape and name.
fn detail(detail: &EventDetail) -> ([u64; 4], Shape, Option<&Arc<str>>) {
    match detail {
        EventDetail::Connect(c) => {
            let (failed, errno) = match c.outcome {
                ConnectOutcome::Established => (None, NONE),
                ConnectOutcome::Failed { reason, errno } => {
                    (Some(reason), errno.map_or(NONE, |e| u64::from(e.0)))
                }
            };
            (
                [
                    optional_nanos(c.latency),
                    errno,
                    u64::from(c.syn_retransmits),
                    0,
                ],
                Shape::Connect { failed },
                c.dst_name.as_ref(),
            )
        }
        EventDetail::Retransmit(r) => (
            [u64::from(r.segments), 0, 0, 0],
            Shape::Retransmit { state: r.state },
            None,
        ),
        EventDetail::Reset(r) => (
            [0; 4],
            Shape::Reset {
                direction: r.direction,
                state: r.state,
            },
            r.reason.as_ref().map(ResetReason::shared),
        ),
        EventDetail::Close(c) => (
            [
                optional_nanos(c.duration),
                c.bytes_sent,
                c.bytes_received,
                u64::from(c.segments_sent) << 32 | u64::from(c.segments_retransmitted),
            ],
            Shape::Close,
            None,
        ),
        EventDetail::Drop(d) => (
            [d.packets, 0, 0, 0],
            Shape::Drop {
                protocol: d.protocol,
                tcp_flags: d.tcp_flags,
                direction: d.direction,
            },
            Some(d.reason.shared()),
        ),
        EventDetail::ListenOverflow(l) => (
            [
                l.overflows,
                l.backlog.map_or(NONE, u64::from),
                u64::from(l.queued),
                0,
            ],
            Shape::ListenOverflow,
            None,
        ),
        EventDetail::Conntrack(c) => (
            [c.insert_failed, c.drop, c.early_drop, u64::from(c.netns)],
            Shape::Conntrack,
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::testing::{at, connect_ok},
        schema::tests::every_shape,
    };

    #[test]
    fn a_record_is_80_bytes() {
        assert_eq!(size_of::<Record>(), 80);
    }

    #[test]
    fn every_shape_comes_back_unchanged() {
        let mut events = every_shape();
        // Mixed families and an IPv6 backend take the boxed form.
        let mut mixed = connect_ok("[2001:db8::1]:443", at(1.0), 5);
        mixed.backend = Some("10.1.2.3:8443".parse().unwrap());
        events.push(mixed);
        let mut v6 = connect_ok("[2001:db8::1]:443", at(1.0), 5);
        v6.src = "[2001:db8::2]:40000".parse().unwrap();
        v6.backend = Some("[2001:db8::3]:8443".parse().unwrap());
        events.push(v6);
        let mut contexts = Contexts::default();
        let records: Vec<Record> = events.iter().map(|e| contexts.record(e)).collect();
        for (event, record) in events.iter().zip(&records) {
            assert_eq!(&contexts.event(record), event);
        }
        for record in &records {
            contexts.release(record);
        }
        assert_eq!(contexts.len(), 0, "every context let go");
        assert!(
            contexts
                .slots
                .iter()
                .all(|s| s.refs == 0 && s.context.text.is_none())
        );
    }

    #[test]
    fn events_that_share_an_owner_share_one_context() {
        let mut contexts = Contexts::default();
        let records: Vec<Record> = (0..1000)
            .map(|i| {
                contexts.record(&connect_ok(
                    &format!("10.0.{}.{}:80", i / 256, i % 256),
                    at(i as f64),
                    1,
                ))
            })
            .collect();
        assert_eq!(contexts.len(), 1);
        assert_eq!(contexts.slots[0].refs, 1000);
        for record in &records[..999] {
            contexts.release(record);
        }
        assert_eq!(contexts.len(), 1, "still held by the last record");
        assert_eq!(
            contexts.event(&records[999]).dst.to_string(),
            "10.0.3.231:80"
        );
    }
}
