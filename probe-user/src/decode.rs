//! Turns the kernel's records (probe-common layouts, straight from the ring buffer) into typed
//! events. Length-checked, in place, no allocation.
use std::{
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use probe_common::{
    AF_INET, AF_INET6, CloseEvent, ConnectEvent, DROP_REASON_WORDS, DropEvent, DropReasonFilter,
    Endpoints, EventHeader, EventKind, IPPROTO_TCP, IPPROTO_UDP, Owner, ResetEvent,
    RetransmitEvent, TranslationEvent, direction, outcome, owner_flags, side, tcp_state,
};

use crate::{
    btf::Btf,
    event::{
        Close, Comm, Connect, ConnectOutcome, Direction, Drop, DropReason, Endpoint, Event,
        EventDetail, Process, Protocol, Reset, ResetReason, Retransmit, Side, TcpFlags, TcpState,
    },
};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {needed}-byte layout")]
    Truncated { len: usize, needed: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("reset reason {0} is not in this kernel's enum sk_rst_reason")]
    ResetReason(u32),
    #[error("drop reason {0} is not in this kernel's enum skb_drop_reason")]
    DropReason(u32),
    #[error("unknown protocol {0} of a dropped packet")]
    Protocol(u8),
    #[error("unknown connect outcome {0}")]
    Outcome(u8),
    #[error("unknown reset direction {0}")]
    Direction(u8),
    #[error("unknown TCP state {0}")]
    State(u8),
    #[error("unknown side {0}")]
    Side(u8),
}

/// The names of one of the running kernel's enums by value, read from BTF (the values move
/// between kernels, so no table is compiled in).
#[derive(Clone, Debug, Default)]
struct EnumNames {
    by_value: Vec<Option<Arc<str>>>,
}

impl EnumNames {
    /// Values past this are not taken as names (the enums connprobe reads have at most a few
    /// hundred).
    const MAX_VALUE: u32 = 1024;

    /// From `(PREFIX_NAME, value)` pairs: the names with `prefix`, without it.
    fn from_variants(variants: Vec<(String, u32)>, prefix: &str) -> Self {
        let mut by_value = Vec::new();
        for (name, value) in variants {
            let Some(name) = name.strip_prefix(prefix) else {
                continue;
            };
            if value >= Self::MAX_VALUE || name == "MAX" {
                continue;
            }
            let at = value as usize;
            if by_value.len() <= at {
                by_value.resize(at + 1, None);
            }
            by_value[at] = Some(name.into());
        }
        EnumNames { by_value }
    }

    fn is_empty(&self) -> bool {
        self.by_value.is_empty()
    }

    fn name(&self, value: u32) -> Option<&Arc<str>> {
        self.by_value.get(value as usize)?.as_ref()
    }

    fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        self.by_value
            .iter()
            .enumerate()
            .filter_map(|(value, name)| Some((value as u32, name.as_deref()?)))
    }
}

/// The names of this kernel's `enum sk_rst_reason`, read from BTF. Empty on kernels without
/// reset reasons.
#[derive(Clone, Debug, Default)]
pub struct ResetReasons(EnumNames);

impl ResetReasons {
    pub fn from_btf(btf: &Btf) -> Self {
        Self::from_variants(btf.enum_variants("sk_rst_reason").unwrap_or_default())
    }

    /// From `(SK_RST_REASON_NAME, value)` pairs.
    pub fn from_variants(variants: Vec<(String, u32)>) -> Self {
        ResetReasons(EnumNames::from_variants(variants, "SK_RST_REASON_"))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn name(&self, value: u32) -> Result<ResetReason, DecodeError> {
        self.0
            .name(value)
            .map(|n| ResetReason::from_shared(n.clone()))
            .ok_or(DecodeError::ResetReason(value))
    }
}

/// The names of this kernel's `enum skb_drop_reason`, read from BTF; empty on kernels without
/// drop reasons (before 5.17).
#[derive(Clone, Debug, Default)]
pub struct DropReasons(EnumNames);

impl DropReasons {
    /// Reasons that do not mean a packet was lost on its way, so the programs skip them:
    /// `NOT_SPECIFIED` says nothing, and `QUEUE_PURGE` is what a socket still held (received
    /// and never read, or never sent) when it was destroyed, which every closing connection
    /// may have.
    pub const NOT_REPORTED: [&'static str; 2] = ["NOT_SPECIFIED", "QUEUE_PURGE"];

    pub fn from_btf(btf: &Btf) -> Self {
        Self::from_variants(btf.enum_variants("skb_drop_reason").unwrap_or_default())
    }

    /// From `(SKB_DROP_REASON_NAME, value)` pairs; `SKB_NOT_DROPPED_YET` and `SKB_CONSUMED`
    /// are not drops and have another prefix.
    pub fn from_variants(variants: Vec<(String, u32)>) -> Self {
        DropReasons(EnumNames::from_variants(variants, "SKB_DROP_REASON_"))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The reasons the programs report: every one this kernel names, but [`Self::NOT_REPORTED`].
    pub fn filter(&self) -> DropReasonFilter {
        let mut filter = DropReasonFilter::default();
        for (value, name) in self.0.iter() {
            let word = (value / 64) as usize;
            if word < DROP_REASON_WORDS && !Self::NOT_REPORTED.contains(&name) {
                filter.bits[word] |= 1 << (value % 64);
            }
        }
        filter
    }

    /// The value of `name`, e.g. to tell whether this kernel has it.
    pub fn value(&self, name: &str) -> Option<u32> {
        self.0.iter().find(|(_, n)| *n == name).map(|(v, _)| v)
    }

    pub(crate) fn name(&self, value: u32) -> Result<DropReason, DecodeError> {
        self.0
            .name(value)
            .map(|n| DropReason::from_shared(n.clone()))
            .ok_or(DecodeError::DropReason(value))
    }
}

/// What decoding needs besides the record: the clock and this kernel's enum names.
#[derive(Clone, Debug)]
pub struct Decoder {
    pub clock: Clock,
    pub reset_reasons: ResetReasons,
    pub drop_reasons: DropReasons,
}

/// Converts the kernel's CLOCK_MONOTONIC timestamps (`bpf_ktime_get_ns`) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Wall-clock time at monotonic zero.
    boot: SystemTime,
}

impl Clock {
    /// Reads both clocks now.
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec; CLOCK_MONOTONIC always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let mono = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        Clock {
            boot: SystemTime::now() - mono,
        }
    }

    /// For tests: monotonic zero at `boot`.
    pub fn at(boot: SystemTime) -> Self {
        Clock { boot }
    }

    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        self.boot + Duration::from_nanos(monotonic_ns)
    }
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() < size_of::<T>() {
        return Err(DecodeError::Truncated {
            len: bytes.len(),
            needed: size_of::<T>(),
        });
    }
    // SAFETY: the length is checked; T is a plain-data probe-common layout valid for any bytes;
    // read_unaligned because ring buffer records are only 8-byte aligned.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// One ring buffer record: a TCP event, or the translation of a connect's destination.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Event {
        event: Event,
        /// The owner's cgroup v2 id (0: unknown), for the reader to resolve to a workload.
        cgroup_id: u64,
    },
    /// A connect to `original` went to `backend` (DNAT on this host).
    Translation {
        src: Endpoint,
        original: Endpoint,
        backend: Endpoint,
    },
}

impl Decoder {
    /// Decodes one ring buffer record that is a TCP event.
    pub fn decode(&self, bytes: &[u8]) -> Result<Event, DecodeError> {
        match self.decode_record(bytes)? {
            Record::Event { event, .. } => Ok(event),
            Record::Translation { .. } => {
                Err(DecodeError::UnknownKind(EventKind::Translation as u32))
            }
        }
    }

    /// Decodes one ring buffer record.
    pub fn decode_record(&self, bytes: &[u8]) -> Result<Record, DecodeError> {
        decode(bytes, self)
    }
}

fn decode(bytes: &[u8], decoder: &Decoder) -> Result<Record, DecodeError> {
    let (clock, reasons) = (&decoder.clock, &decoder.reset_reasons);
    let header: EventHeader = read(bytes)?;
    let kind = EventKind::from_u32(header.kind).ok_or(DecodeError::UnknownKind(header.kind))?;
    let (endpoints, owner, detail) = match kind {
        EventKind::Translation => {
            let raw: TranslationEvent = read(bytes)?;
            let (src, original) = addresses(&raw.endpoints)?;
            let backend = Endpoints {
                remote_addr: raw.backend_addr,
                remote_port: raw.backend_port,
                ..raw.endpoints
            };
            let (_, backend) = addresses(&backend)?;
            return Ok(Record::Translation {
                src,
                original,
                backend,
            });
        }
        EventKind::Connect => {
            let raw: ConnectEvent = read(bytes)?;
            let start_known = raw.owner.flags & owner_flags::START_KNOWN != 0;
            let detail = EventDetail::Connect(Connect {
                outcome: match raw.outcome {
                    outcome::ESTABLISHED => ConnectOutcome::Established,
                    outcome::FAILED => ConnectOutcome::failed(raw.sk_err),
                    other => return Err(DecodeError::Outcome(other)),
                },
                latency: start_known.then(|| Duration::from_nanos(raw.latency_ns)),
                syn_retransmits: raw.syn_retransmits,
                dst_name: None,
            });
            (raw.endpoints, raw.owner, detail)
        }
        EventKind::Retransmit => {
            let raw: RetransmitEvent = read(bytes)?;
            let detail = EventDetail::Retransmit(Retransmit {
                state: state(raw.state)?,
                segments: raw.segments,
            });
            (raw.endpoints, raw.owner, detail)
        }
        EventKind::Reset => {
            let raw: ResetEvent = read(bytes)?;
            let detail = EventDetail::Reset(Reset {
                direction: direction_of(raw.direction)?,
                state: match raw.state {
                    tcp_state::NONE => None,
                    n => Some(state(n)?),
                },
                reason: match raw.has_reason {
                    0 => None,
                    _ => Some(reasons.name(raw.reason)?),
                },
            });
            (raw.endpoints, raw.owner, detail)
        }
        EventKind::Close => {
            let raw: CloseEvent = read(bytes)?;
            let start_known = raw.owner.flags & owner_flags::START_KNOWN != 0;
            let detail = EventDetail::Close(Close {
                duration: start_known.then(|| Duration::from_nanos(raw.duration_ns)),
                bytes_sent: raw.bytes_sent,
                bytes_received: raw.bytes_received,
                segments_sent: raw.segments_sent,
                segments_retransmitted: raw.segments_retransmitted,
            });
            (raw.endpoints, raw.owner, detail)
        }
        EventKind::Drop => {
            let raw: DropEvent = read(bytes)?;
            let protocol = match raw.protocol {
                p if u16::from(p) == IPPROTO_TCP => Protocol::Tcp,
                IPPROTO_UDP => Protocol::Udp,
                _ => return Err(DecodeError::Protocol(raw.protocol)),
            };
            let detail = EventDetail::Drop(Drop {
                reason: decoder.drop_reasons.name(raw.reason)?,
                protocol,
                tcp_flags: (protocol == Protocol::Tcp).then_some(TcpFlags(raw.tcp_flags)),
                direction: direction_of(raw.direction)?,
                packets: 1,
            });
            (raw.endpoints, raw.owner, detail)
        }
    };
    let (src, dst) = addresses(&endpoints)?;
    let event = Event {
        // Numbered by the pipeline, after the agent's own traffic is taken out.
        seq: 0,
        time: clock.wall(header.timestamp_ns),
        process: process(&owner),
        side: side_of(owner.side)?,
        src,
        dst,
        detail,
        workload: None,
        backend: None,
    };
    let cgroup_id = match owner.flags & owner_flags::PROCESS_KNOWN {
        0 => 0,
        _ => owner.cgroup_id,
    };
    Ok(Record::Event { event, cgroup_id })
}

pub fn direction_of(raw: u8) -> Result<Direction, DecodeError> {
    match raw {
        direction::SENT => Ok(Direction::Sent),
        direction::RECEIVED => Ok(Direction::Received),
        other => Err(DecodeError::Direction(other)),
    }
}

/// The side the kernel named, if any.
pub fn side_of(raw: u8) -> Result<Option<Side>, DecodeError> {
    match raw {
        side::CLIENT => Ok(Some(Side::Client)),
        side::SERVER => Ok(Some(Side::Server)),
        side::UNKNOWN => Ok(None),
        other => Err(DecodeError::Side(other)),
    }
}

fn state(n: u8) -> Result<TcpState, DecodeError> {
    TcpState::from_repr(n).ok_or(DecodeError::State(n))
}

pub fn process(owner: &Owner) -> Option<Process> {
    (owner.flags & owner_flags::PROCESS_KNOWN != 0).then(|| Process {
        pid: owner.tgid,
        comm: Comm::from_kernel(&owner.comm),
    })
}

pub fn addresses(ep: &Endpoints) -> Result<(Endpoint, Endpoint), DecodeError> {
    let ip = |raw: &[u8; 16]| -> Result<IpAddr, DecodeError> {
        match ep.family {
            AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
            AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*raw))),
            other => Err(DecodeError::Family(other)),
        }
    };
    Ok((
        Endpoint::new(ip(&ep.local_addr)?, ep.local_port),
        Endpoint::new(ip(&ep.remote_addr)?, ep.remote_port),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Errno, FailureReason};
    use probe_common::COMM_LEN;

    fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
        // SAFETY: T is a plain-data layout without padding.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn header(kind: EventKind) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            cpu: 1,
            timestamp_ns: 5_000_000_123,
        }
    }

    fn v4_endpoints() -> Endpoints {
        let mut ep = Endpoints {
            family: AF_INET,
            local_port: 40000,
            remote_port: 8081,
            _pad: 0,
            local_addr: [0; 16],
            remote_addr: [0; 16],
        };
        ep.local_addr[..4].copy_from_slice(&[10, 200, 0, 1]);
        ep.remote_addr[..4].copy_from_slice(&[10, 200, 0, 2]);
        ep
    }

    fn client_owner() -> Owner {
        let mut comm = [0u8; COMM_LEN];
        comm[..4].copy_from_slice(b"curl");
        Owner {
            tgid: 4242,
            side: side::CLIENT,
            flags: owner_flags::PROCESS_KNOWN | owner_flags::START_KNOWN,
            _pad: [0; 2],
            comm,
            cgroup_id: 4026,
        }
    }

    fn clock() -> Clock {
        Clock::at(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
    }

    fn decoder() -> Decoder {
        Decoder {
            clock: clock(),
            reset_reasons: ResetReasons::from_variants(vec![
                ("SK_RST_REASON_NOT_SPECIFIED".into(), 0),
                ("SK_RST_REASON_NO_SOCKET".into(), 1),
                ("SK_RST_REASON_TCP_ABORT_ON_CLOSE".into(), 11),
            ]),
            drop_reasons: drop_reasons(),
        }
    }

    /// As Linux 6.12 numbers them (6.1's differ: no SKB_CONSUMED, NETFILTER_DROP is 7).
    fn drop_reasons() -> DropReasons {
        DropReasons::from_variants(vec![
            ("SKB_NOT_DROPPED_YET".into(), 0),
            ("SKB_CONSUMED".into(), 1),
            ("SKB_DROP_REASON_NOT_SPECIFIED".into(), 2),
            ("SKB_DROP_REASON_NO_SOCKET".into(), 3),
            ("SKB_DROP_REASON_NETFILTER_DROP".into(), 11),
            ("SKB_DROP_REASON_QUEUE_PURGE".into(), 91),
            ("SKB_DROP_REASON_MAX".into(), 104),
            ("SKB_DROP_REASON_SUBSYS_MASK".into(), 0xffff_0000),
        ])
    }

    fn drop_event(reason: u32, protocol: u8, tcp_flags: u8) -> DropEvent {
        DropEvent {
            header: header(EventKind::Drop),
            endpoints: v4_endpoints(),
            owner: client_owner(),
            reason,
            protocol,
            tcp_flags,
            direction: direction::SENT,
            _pad: 0,
        }
    }

    #[test]
    fn drops_decode_with_the_kernels_names() {
        let event = decoder()
            .decode(&bytes_of(&drop_event(11, 6, 0x02)))
            .unwrap();
        assert_eq!(event.dst, "10.200.0.2:8081".parse().unwrap());
        assert_eq!(event.side, Some(Side::Client));
        assert_eq!(
            event.detail,
            EventDetail::Drop(Drop {
                reason: DropReason::new("NETFILTER_DROP"),
                protocol: Protocol::Tcp,
                tcp_flags: Some(TcpFlags(0x02)),
                direction: Direction::Sent,
                packets: 1,
            })
        );
        // A DNS packet over UDP has no flags.
        let EventDetail::Drop(dns) = decoder()
            .decode(&bytes_of(&drop_event(3, 17, 0)))
            .unwrap()
            .detail
        else {
            panic!("not a drop")
        };
        assert_eq!((dns.protocol, dns.tcp_flags), (Protocol::Udp, None));
        // Values the kernel's enum does not name, and protocols the programs do not report.
        assert_eq!(
            decoder().decode(&bytes_of(&drop_event(12, 6, 2))),
            Err(DecodeError::DropReason(12))
        );
        assert_eq!(
            decoder().decode(&bytes_of(&drop_event(104, 6, 2))),
            Err(DecodeError::DropReason(104))
        );
        assert_eq!(
            decoder().decode(&bytes_of(&drop_event(11, 1, 0))),
            Err(DecodeError::Protocol(1))
        );
    }

    #[test]
    fn the_filter_reports_every_named_reason_but_the_silent_ones() {
        let filter = drop_reasons().filter();
        let reported = |v: u32| filter.bits[(v / 64) as usize] >> (v % 64) & 1 == 1;
        assert!(reported(3) && reported(11));
        // Not drops, no reason, a socket's queue at its end, the enum's bound and mask.
        for v in [0, 1, 2, 91, 104] {
            assert!(!reported(v), "{v}");
        }
        assert_eq!(drop_reasons().value("NETFILTER_DROP"), Some(11));
        assert_eq!(drop_reasons().value("TCP_LISTEN_OVERFLOW"), None);
        assert!(DropReasons::default().filter() == DropReasonFilter::default());
    }

    #[test]
    fn refused_connect_decodes() {
        let raw = ConnectEvent {
            header: header(EventKind::Connect),
            endpoints: v4_endpoints(),
            owner: client_owner(),
            latency_ns: 153_000,
            sk_err: 111,
            syn_retransmits: 0,
            outcome: outcome::FAILED,
            _pad: [0; 7],
        };
        let event = decoder().decode(&bytes_of(&raw)).unwrap();
        assert_eq!(
            event.time,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_005) + Duration::from_nanos(123)
        );
        assert_eq!(event.src, "10.200.0.1:40000".parse().unwrap());
        assert_eq!(event.dst, "10.200.0.2:8081".parse().unwrap());
        assert_eq!(event.side, Some(Side::Client));
        let p = event.process.unwrap();
        assert_eq!((p.pid, p.comm.to_string()), (4242, "curl".to_string()));
        let EventDetail::Connect(c) = event.detail else {
            panic!("not a connect")
        };
        assert_eq!(
            c.outcome,
            ConnectOutcome::Failed {
                reason: FailureReason::Refused,
                errno: Some(Errno(111))
            }
        );
        assert_eq!(c.latency, Some(Duration::from_micros(153)));
    }

    #[test]
    fn the_owners_cgroup_id_comes_with_a_known_owner_only() {
        let mut raw = ConnectEvent {
            header: header(EventKind::Connect),
            endpoints: v4_endpoints(),
            owner: client_owner(),
            latency_ns: 1,
            sk_err: 0,
            syn_retransmits: 0,
            outcome: outcome::ESTABLISHED,
            _pad: [0; 7],
        };
        let Record::Event { cgroup_id, .. } = decoder().decode_record(&bytes_of(&raw)).unwrap()
        else {
            panic!("not an event")
        };
        assert_eq!(cgroup_id, 4026);
        raw.owner.flags = 0;
        let Record::Event { cgroup_id, .. } = decoder().decode_record(&bytes_of(&raw)).unwrap()
        else {
            panic!("not an event")
        };
        assert_eq!(cgroup_id, 0);
    }

    #[test]
    fn translations_decode_as_the_socket_and_its_backend() {
        let mut raw = TranslationEvent {
            header: header(EventKind::Translation),
            endpoints: v4_endpoints(),
            backend_addr: [0; 16],
            backend_port: 8080,
            _pad: [0; 6],
        };
        raw.backend_addr[..4].copy_from_slice(&[10, 1, 4, 7]);
        assert_eq!(
            decoder().decode_record(&bytes_of(&raw)).unwrap(),
            Record::Translation {
                src: "10.200.0.1:40000".parse().unwrap(),
                original: "10.200.0.2:8081".parse().unwrap(),
                backend: "10.1.4.7:8080".parse().unwrap(),
            }
        );
        // A translation is no TCP event of its own.
        assert!(decoder().decode(&bytes_of(&raw)).is_err());
        assert!(matches!(
            decoder().decode_record(&bytes_of(&raw)[..70]),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn cancelled_connect_has_no_errno_and_unknown_start_has_no_latency() {
        let mut owner = client_owner();
        owner.flags = 0;
        let raw = ConnectEvent {
            header: header(EventKind::Connect),
            endpoints: v4_endpoints(),
            owner,
            latency_ns: 0,
            sk_err: 0,
            syn_retransmits: 2,
            outcome: outcome::FAILED,
            _pad: [0; 7],
        };
        let event = decoder().decode(&bytes_of(&raw)).unwrap();
        assert_eq!(event.process, None);
        let EventDetail::Connect(c) = event.detail else {
            panic!("not a connect")
        };
        assert_eq!(
            c.outcome,
            ConnectOutcome::Failed {
                reason: FailureReason::Cancelled,
                errno: None
            }
        );
        assert_eq!((c.latency, c.syn_retransmits), (None, 2));
    }

    #[test]
    fn socketless_reset_and_ipv6_mapped_decode() {
        let mut ep = v4_endpoints();
        ep.family = AF_INET6;
        ep.local_addr = "::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        ep.remote_addr = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
        let raw = ResetEvent {
            header: header(EventKind::Reset),
            endpoints: ep,
            owner: Owner {
                tgid: 0,
                side: side::SERVER,
                flags: 0,
                _pad: [0; 2],
                comm: [0; COMM_LEN],
                cgroup_id: 0,
            },
            direction: direction::SENT,
            state: tcp_state::NONE,
            has_reason: 1,
            _pad: 0,
            reason: 1,
        };
        let event = decoder().decode(&bytes_of(&raw)).unwrap();
        assert_eq!(event.src, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(event.dst, "[fd00::2]:8081".parse().unwrap());
        assert_eq!(event.side, Some(Side::Server));
        assert_eq!(
            event.detail,
            EventDetail::Reset(Reset {
                direction: Direction::Sent,
                state: None,
                reason: Some(ResetReason::new("NO_SOCKET")),
            })
        );
    }

    #[test]
    fn reset_reasons_come_from_the_kernels_enum() {
        let mut raw = ResetEvent {
            header: header(EventKind::Reset),
            endpoints: v4_endpoints(),
            owner: client_owner(),
            direction: direction::SENT,
            state: tcp_state::ESTABLISHED,
            has_reason: 1,
            _pad: 0,
            reason: 11,
        };
        let EventDetail::Reset(reset) = decoder().decode(&bytes_of(&raw)).unwrap().detail else {
            panic!("not a reset")
        };
        assert_eq!(reset.reason, Some(ResetReason::new("TCP_ABORT_ON_CLOSE")));
        // A value the kernel's enum does not have is a mismatch, not a guess.
        raw.reason = 5;
        assert_eq!(
            decoder().decode(&bytes_of(&raw)),
            Err(DecodeError::ResetReason(5))
        );
        // No reason (a received reset, or a kernel before 6.10): none, whatever the value.
        raw.has_reason = 0;
        let EventDetail::Reset(reset) = decoder().decode(&bytes_of(&raw)).unwrap().detail else {
            panic!("not a reset")
        };
        assert_eq!(reset.reason, None);
    }

    #[test]
    fn retransmit_and_close_decode() {
        let raw = RetransmitEvent {
            header: header(EventKind::Retransmit),
            endpoints: v4_endpoints(),
            owner: client_owner(),
            segments: 5,
            state: tcp_state::ESTABLISHED,
            _pad: [0; 3],
        };
        let event = decoder().decode(&bytes_of(&raw)).unwrap();
        assert_eq!(
            event.detail,
            EventDetail::Retransmit(Retransmit {
                state: TcpState::Established,
                segments: 5
            })
        );
        let raw = CloseEvent {
            header: header(EventKind::Close),
            endpoints: v4_endpoints(),
            owner: client_owner(),
            duration_ns: 2_500_000_000,
            bytes_sent: 10,
            bytes_received: 20,
            segments_sent: 3,
            segments_retransmitted: 1,
        };
        let event = decoder().decode(&bytes_of(&raw)).unwrap();
        assert_eq!(
            event.detail,
            EventDetail::Close(Close {
                duration: Some(Duration::from_millis(2500)),
                bytes_sent: 10,
                bytes_received: 20,
                segments_sent: 3,
                segments_retransmitted: 1
            })
        );
    }

    #[test]
    fn short_or_unknown_records_are_errors() {
        let raw = CloseEvent {
            header: header(EventKind::Close),
            endpoints: v4_endpoints(),
            owner: client_owner(),
            duration_ns: 0,
            bytes_sent: 0,
            bytes_received: 0,
            segments_sent: 0,
            segments_retransmitted: 0,
        };
        let bytes = bytes_of(&raw);
        for len in [0, 15, 16, bytes.len() - 1] {
            assert!(matches!(
                decoder().decode(&bytes[..len]),
                Err(DecodeError::Truncated { .. })
            ));
        }
        let mut unknown = bytes.clone();
        unknown[0] = 99;
        assert_eq!(
            decoder().decode(&unknown),
            Err(DecodeError::UnknownKind(99))
        );
        let mut bad_family = bytes;
        bad_family[16] = 7;
        assert_eq!(decoder().decode(&bad_family), Err(DecodeError::Family(7)));
    }

    #[test]
    fn values_the_agent_does_not_know_are_errors_not_guesses() {
        let connect = |outcome: u8| ConnectEvent {
            header: header(EventKind::Connect),
            endpoints: v4_endpoints(),
            owner: client_owner(),
            latency_ns: 0,
            sk_err: 0,
            syn_retransmits: 0,
            outcome,
            _pad: [0; 7],
        };
        assert_eq!(
            decoder().decode(&bytes_of(&connect(9))),
            Err(DecodeError::Outcome(9))
        );
        let mut raw = RetransmitEvent {
            header: header(EventKind::Retransmit),
            endpoints: v4_endpoints(),
            owner: client_owner(),
            segments: 1,
            state: 14,
            _pad: [0; 3],
        };
        assert_eq!(
            decoder().decode(&bytes_of(&raw)),
            Err(DecodeError::State(14))
        );
        raw.state = tcp_state::ESTABLISHED;
        raw.owner.side = 3;
        assert_eq!(decoder().decode(&bytes_of(&raw)), Err(DecodeError::Side(3)));
        let reset = ResetEvent {
            header: header(EventKind::Reset),
            endpoints: v4_endpoints(),
            owner: client_owner(),
            direction: 0,
            state: tcp_state::ESTABLISHED,
            has_reason: 0,
            _pad: 0,
            reason: 0,
        };
        assert_eq!(
            decoder().decode(&bytes_of(&reset)),
            Err(DecodeError::Direction(0))
        );
    }
}
