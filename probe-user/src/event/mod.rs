//! Typed events: what the decoder makes of the kernel's records and what every consumer reads.
//!
//! Only real states are representable: a connect either was established or failed with a
//! reason (and the errno behind it, if the kernel gave one); a TCP state is one of the
//! kernel's; an endpoint is in canonical form. The names of the kinds, sides, reasons, states
//! and phases are derived from the enums (strum), never paired by hand; the JSON log's schema
//! (`schema`) and the metric labels use the same names.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use strum::{EnumCount, EnumDiscriminants, EnumString, FromRepr, IntoStaticStr, VariantArray};

/// One TCP event on this host.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// The agent's sequence number: the events it reported before this one (from 0, in the
    /// order the kernel's records were read; the agent's own traffic, left out, takes no
    /// number). A gap in a log is exactly the events lost after delivery (stages `queue` and
    /// `log`); a repeat would be a duplicate.
    pub seq: u64,
    /// Wall-clock time the kernel produced it.
    pub time: SystemTime,
    /// The process that owns the socket, where the agent knows it.
    pub process: Option<Process>,
    /// Which end of the connection this host is, where known.
    pub side: Option<Side>,
    /// This host's end.
    pub src: Endpoint,
    /// The remote end.
    pub dst: Endpoint,
    pub detail: EventDetail,
    /// The owner's cgroup, container and pod, where the owner and its cgroup are known.
    pub workload: Option<Arc<crate::workload::Workload>>,
    /// Where the connection really goes when a DNAT on this host translated `dst` (a virtual
    /// address: kube-proxy, an nft or iptables rule); `None` when nothing translated it.
    pub backend: Option<Endpoint>,
}

/// What happened; its kind ([`EventKind`], the log's `type`) is derived from it.
#[derive(Clone, Debug, PartialEq, EnumDiscriminants)]
#[strum_discriminants(
    name(EventKind),
    derive(
        Hash,
        PartialOrd,
        Ord,
        IntoStaticStr,
        EnumString,
        VariantArray,
        EnumCount
    ),
    strum(serialize_all = "snake_case")
)]
pub enum EventDetail {
    Connect(Connect),
    Retransmit(Retransmit),
    Reset(Reset),
    Close(Close),
    /// A packet (or, for data segments, a count of them) the kernel dropped with a reason.
    Drop(Drop),
    /// A listener's accept queue overflowed (from its namespace's counters, read by the agent).
    ListenOverflow(ListenOverflow),
    /// Connection tracking failed to track or dropped packets in a network namespace (read by
    /// the agent). Not about one connection: see [`Event::namespace_sample`].
    Conntrack(Conntrack),
}

impl Event {
    pub fn kind(&self) -> EventKind {
        EventKind::from(&self.detail)
    }

    /// An event about a network namespace rather than a connection (conntrack's counters): no
    /// process, no side, and the unspecified address for both ends.
    pub fn namespace_sample(time: SystemTime, detail: EventDetail) -> Self {
        let none = Endpoint::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
        Event {
            seq: 0,
            time,
            process: None,
            side: None,
            src: none,
            dst: none,
            detail,
            workload: None,
            backend: None,
        }
    }

    /// Whether the event is about a connection (or a listener), so that it counts at a
    /// destination; conntrack's samples are about a namespace.
    pub fn has_destination(&self) -> bool {
        !matches!(self.detail, EventDetail::Conntrack(_))
    }
}

impl EventKind {
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// Whether the kernel's programs produce events of this kind (through the ring buffer);
    /// the others the agent makes from counters it reads.
    pub fn from_kernel(self) -> bool {
        !matches!(self, EventKind::ListenOverflow | EventKind::Conntrack)
    }
}

/// A connect ended (client: SYN_SENT -> ESTABLISHED or CLOSE; server: SYN_RECV -> ESTABLISHED).
#[derive(Clone, Debug, PartialEq)]
pub struct Connect {
    pub outcome: ConnectOutcome,
    /// From the connect's start to its end (the handshake time when established, the wait when
    /// failed), on the side that started it and where its start was seen.
    pub latency: Option<Duration>,
    pub syn_retransmits: u32,
    /// The name a recent DNS answer gave for the destination's address (client side, where
    /// DNS is watched): the join of a connect with the name the application asked for.
    pub dst_name: Option<Arc<str>>,
}

/// How a connect ended; the log's `outcome` ([`Outcome`]) is derived from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumDiscriminants)]
#[strum_discriminants(
    name(Outcome),
    derive(IntoStaticStr, EnumString),
    strum(serialize_all = "lowercase")
)]
pub enum ConnectOutcome {
    Established,
    Failed {
        reason: FailureReason,
        /// The socket error behind the failure; `None` when there was none (`Cancelled`).
        errno: Option<Errno>,
    },
}

impl ConnectOutcome {
    /// The failure the kernel's `sk_err` (0 for none) at the SYN_SENT -> CLOSE transition means.
    pub fn failed(sk_err: u32) -> Self {
        ConnectOutcome::Failed {
            reason: FailureReason::from_sk_err(sk_err),
            errno: (sk_err != 0).then_some(Errno(sk_err)),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Retransmit {
    pub state: TcpState,
    /// Segments resent by this call; they add up to the kernel's TcpRetransSegs less
    /// TCPRetransFail.
    pub segments: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Reset {
    pub direction: Direction,
    /// The socket's state; `None` for a reset the kernel sent without a socket.
    pub state: Option<TcpState>,
    /// Why this host sent it, in the kernel's words; `None` for received resets and on kernels
    /// before 6.10.
    pub reason: Option<ResetReason>,
}

impl Reset {
    /// A reset sent without a socket answers a segment (usually a SYN) for which no socket
    /// exists: this host is the server.
    pub fn is_socketless(&self) -> bool {
        self.direction == Direction::Sent && self.state.is_none()
    }
}

/// The kernel's reason for a reset it sent: an `enum sk_rst_reason` name without its
/// `SK_RST_REASON_` prefix (`NO_SOCKET`, `TCP_ABORT_ON_CLOSE`, ...), as the running kernel names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResetReason(Arc<str>);

impl ResetReason {
    pub fn new(name: &str) -> Self {
        ResetReason(name.into())
    }

    /// The name as the shared text it is (kept by the flight recorder without copying).
    pub fn from_shared(name: Arc<str>) -> Self {
        ResetReason(name)
    }

    pub fn shared(&self) -> &Arc<str> {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A dropped packet: why, which packet, which way.
#[derive(Clone, Debug, PartialEq)]
pub struct Drop {
    pub reason: DropReason,
    pub protocol: Protocol,
    /// The dropped segment's flags; `None` for a UDP packet and for a count of data segments.
    pub tcp_flags: Option<TcpFlags>,
    /// `Sent`: the packet was leaving this host's end; `Received`: it was coming to it.
    pub direction: Direction,
    /// 1 for a handshake segment or a DNS packet (one event each); for data segments, how many
    /// of the connection's were dropped for this reason since the last count (about a second).
    pub packets: u64,
}

impl Drop {
    /// A SYN, SYN-ACK or RST: a packet the handshake needs.
    pub fn is_handshake(&self) -> bool {
        self.tcp_flags
            .is_some_and(|f| f.contains(TcpFlags::SYN) || f.contains(TcpFlags::RST))
    }

    /// A SYN or SYN-ACK (not a reset): a packet whose loss leaves a connect unanswered.
    pub fn is_syn(&self) -> bool {
        self.tcp_flags.is_some_and(|f| f.contains(TcpFlags::SYN))
    }

    /// Data segments counted, not one event each.
    pub fn is_counted(&self) -> bool {
        self.protocol == Protocol::Tcp && self.tcp_flags.is_none()
    }
}

/// The kernel's reason for a drop: an `enum skb_drop_reason` name without its
/// `SKB_DROP_REASON_` prefix (`NETFILTER_DROP`, `NO_SOCKET`, `IP_RPFILTER`, ...), as the running
/// kernel names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropReason(Arc<str>);

impl DropReason {
    pub fn new(name: &str) -> Self {
        DropReason(name.into())
    }

    /// The name as the shared text it is (kept by the flight recorder without copying).
    pub fn from_shared(name: Arc<str>) -> Self {
        DropReason(name)
    }

    pub fn shared(&self) -> &Arc<str> {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The transport protocol of a dropped packet.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, IntoStaticStr, EnumString, VariantArray, EnumCount,
)]
#[strum(serialize_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// The flags of a TCP header, written as the set flags' names joined by `|` in the header's
/// bit order: `SYN`, `SYN|ACK`, `RST|ACK`, `FIN|PSH|ACK`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
    /// Names by bit, lowest first (RFC 9293, RFC 3168).
    const NAMES: [&'static str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];

    pub fn contains(self, flag: u8) -> bool {
        self.0 & flag == flag
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (bit, name) in Self::NAMES.iter().enumerate() {
            if self.0 >> bit & 1 == 1 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("NONE")?;
        }
        Ok(())
    }
}

impl FromStr for TcpFlags {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        if s == "NONE" {
            return Ok(TcpFlags(0));
        }
        let mut bits = 0u8;
        for name in s.split('|') {
            let bit = Self::NAMES.iter().position(|n| *n == name).ok_or(())?;
            bits |= 1 << bit;
        }
        Ok(TcpFlags(bits))
    }
}

/// A listener's accept queue overflowed: SYNs (or handshakes' last ACKs) were dropped because
/// the application did not accept fast enough.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenOverflow {
    /// Overflows since the last count (about a second): the namespace's `ListenOverflows`.
    pub overflows: u64,
    /// The listener's backlog (`listen()`'s, capped by `somaxconn`), where the agent saw its
    /// `listen()`.
    pub backlog: Option<u32>,
    /// Connections waiting in its accept queue when counted.
    pub queued: u32,
}

/// Connection tracking's failures in one network namespace since the last count (about a
/// second), from its `/proc/net/stat/nf_conntrack`.
#[derive(Clone, Debug, PartialEq)]
pub struct Conntrack {
    /// The network namespace's inode number.
    pub netns: u32,
    /// A new connection could not be added to the table (a clash, or the table full).
    pub insert_failed: u64,
    /// Packets dropped because the table was full and nothing could be evicted.
    pub drop: u64,
    /// Entries evicted early to make room for new ones.
    pub early_drop: u64,
}

impl Conntrack {
    pub fn total(&self) -> u64 {
        self.insert_failed + self.drop + self.early_drop
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Close {
    /// From ESTABLISHED to CLOSE, where the establishment was seen.
    pub duration: Option<Duration>,
    /// Payload bytes sent, retransmissions included.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Data segments sent, retransmissions included.
    pub segments_sent: u32,
    pub segments_retransmitted: u32,
}

/// One end of a connection in canonical form: an IPv4-mapped IPv6 address is the IPv4 address
/// it stands for. Made canonical once, where it is built, so every consumer compares and prints
/// the same thing.
///
/// Kept as address and port (20 bytes) rather than a `SocketAddr` (32, with IPv6 flow and
/// scope fields the kernel's events never carry): every event holds two, and the flight
/// recorder keeps 100,000 events. Ordered as `SocketAddr` orders: IPv4 first, address, port.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    ip: IpAddr,
    port: u16,
}

impl Endpoint {
    pub fn new(ip: IpAddr, port: u16) -> Self {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        Endpoint { ip, port }
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Endpoint::new(addr.ip(), addr.port())
    }
}

impl FromStr for Endpoint {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<SocketAddr>().map(Endpoint::from)
    }
}

/// `ip:port`, IPv6 in brackets.
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.socket_addr(), f)
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self, f)
    }
}

/// The owning process: its tgid (what users call the pid) and its command name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub comm: Comm,
}

/// A task's command name: up to 15 bytes, as the kernel keeps it, with no allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Comm {
    bytes: [u8; 16],
    len: u8,
}

impl Comm {
    /// From the kernel's NUL-padded buffer.
    pub fn from_kernel(raw: &[u8; 16]) -> Self {
        let len = raw.iter().position(|&b| b == 0).unwrap_or(16);
        let mut bytes = [0u8; 16];
        bytes[..len].copy_from_slice(&raw[..len]);
        Comm {
            bytes,
            len: len as u8,
        }
    }

    /// From text (the JSON log); longer names are cut at 16 bytes on a character boundary.
    pub fn from_str_lossy(s: &str) -> Self {
        let mut end = s.len().min(16);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; 16];
        bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        Comm {
            bytes,
            len: end as u8,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The name as text; bytes that are not UTF-8 become U+FFFD.
    pub fn to_string_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.as_bytes())
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string_lossy())
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string_lossy())
    }
}

/// Which end of the connection this host is.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    IntoStaticStr,
    EnumString,
    VariantArray,
    EnumCount,
)]
#[strum(serialize_all = "lowercase")]
pub enum Side {
    /// This host opened the connection.
    Client,
    /// This host accepted it, or answered a SYN.
    Server,
}

impl Side {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// Why a connect failed.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    IntoStaticStr,
    EnumString,
    VariantArray,
    EnumCount,
)]
#[strum(serialize_all = "lowercase")]
pub enum FailureReason {
    /// The SYN was answered with a reset (ECONNREFUSED).
    Refused,
    /// The kernel gave up after its SYN retries (ETIMEDOUT).
    Timeout,
    /// An ICMP unreachable came back (EHOSTUNREACH, ENETUNREACH).
    Unreachable,
    /// The application closed the socket before the handshake finished (no error).
    Cancelled,
    /// Any other error.
    Other,
}

impl FailureReason {
    /// Classifies `sk->sk_err` read at the SYN_SENT -> CLOSE transition.
    pub fn from_sk_err(errno: u32) -> Self {
        const REFUSED: u32 = libc::ECONNREFUSED as u32;
        const TIMED_OUT: u32 = libc::ETIMEDOUT as u32;
        const HOST_UNREACHABLE: u32 = libc::EHOSTUNREACH as u32;
        const NET_UNREACHABLE: u32 = libc::ENETUNREACH as u32;
        match errno {
            0 => FailureReason::Cancelled,
            REFUSED => FailureReason::Refused,
            TIMED_OUT => FailureReason::Timeout,
            HOST_UNREACHABLE | NET_UNREACHABLE => FailureReason::Unreachable,
            _ => FailureReason::Other,
        }
    }

    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// A kernel error number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub u32);

/// The names of the errors a TCP socket reports: libc's constants, named by themselves.
macro_rules! errno_names {
    ($($name:ident),* $(,)?) => {
        const ERRNO_NAMES: &[(i32, &str)] = &[$((libc::$name, stringify!($name))),*];
    };
}

errno_names!(
    EPERM,
    EACCES,
    ENOMEM,
    ENOBUFS,
    EPIPE,
    EPROTO,
    EMSGSIZE,
    ENETDOWN,
    ENETUNREACH,
    ENETRESET,
    ECONNABORTED,
    ECONNRESET,
    ESHUTDOWN,
    ETIMEDOUT,
    ECONNREFUSED,
    EHOSTDOWN,
    EHOSTUNREACH,
    EADDRNOTAVAIL,
);

impl Errno {
    pub fn of(errno: i32) -> Self {
        Errno(errno as u32)
    }

    /// `ECONNREFUSED` style, or `E<number>` for errors without a name here.
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match ERRNO_NAMES.iter().find(|(n, _)| *n as u32 == self.0) {
            Some((_, name)) => (*name).into(),
            None => format!("E{}", self.0).into(),
        }
    }
}

impl FromStr for Errno {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        if let Some((n, _)) = ERRNO_NAMES.iter().find(|(_, name)| *name == s) {
            return Ok(Errno(*n as u32));
        }
        s.strip_prefix('E')
            .and_then(|n| n.parse().ok())
            .map(Errno)
            .ok_or(())
    }
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, IntoStaticStr, EnumString, VariantArray, EnumCount,
)]
#[strum(serialize_all = "lowercase")]
pub enum Direction {
    Sent,
    Received,
}

impl Direction {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// A TCP state, numbered as the kernel numbers them (`include/net/tcp_states.h`), named as the
/// kernel names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, IntoStaticStr, EnumString, FromRepr)]
#[strum(serialize_all = "SCREAMING_SNAKE_CASE")]
#[repr(u8)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
    BoundInactive = 13,
}

impl TcpState {
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// Where in a connection's life a retransmit happened.
    pub fn phase(self) -> Phase {
        match self {
            TcpState::SynSent | TcpState::SynRecv | TcpState::NewSynRecv => Phase::Syn,
            TcpState::Established => Phase::Established,
            TcpState::FinWait1 => Phase::FinWait1,
            TcpState::FinWait2 => Phase::FinWait2,
            TcpState::TimeWait => Phase::TimeWait,
            TcpState::Close => Phase::Close,
            TcpState::CloseWait => Phase::CloseWait,
            TcpState::LastAck => Phase::LastAck,
            TcpState::Listen => Phase::Listen,
            TcpState::Closing => Phase::Closing,
            TcpState::BoundInactive => Phase::BoundInactive,
        }
    }

    /// Established or on the way to closing: a reset received there ends a working connection.
    pub fn is_midstream(self) -> bool {
        matches!(
            self,
            TcpState::Established
                | TcpState::FinWait1
                | TcpState::FinWait2
                | TcpState::CloseWait
                | TcpState::LastAck
                | TcpState::Closing
        )
    }
}

/// Where in a connection's life a retransmit happened: `syn` during the handshake,
/// `established` in the data phase, else the state's name in lower case.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, IntoStaticStr, EnumString, VariantArray, EnumCount,
)]
#[strum(serialize_all = "snake_case")]
pub enum Phase {
    Syn,
    Established,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    BoundInactive,
}

impl Phase {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// Serde for enums whose names strum derives: the name is the JSON string, so the log, the
/// reports and the metric labels cannot disagree.
macro_rules! serde_by_name {
    ($($t:ty),* $(,)?) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(<&'static str>::from(*self))
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let name = <String as serde::Deserialize>::deserialize(d)?;
                name.parse().map_err(|_| {
                    serde::de::Error::custom(format_args!(
                        "unknown {} {name:?}",
                        stringify!($t)
                    ))
                })
            }
        }
    )*};
}
pub(crate) use serde_by_name;

serde_by_name!(
    EventKind,
    Outcome,
    Side,
    FailureReason,
    Direction,
    TcpState,
    Phase,
    Protocol
);

impl serde::Serialize for TcpFlags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TcpFlags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        text.parse()
            .map_err(|()| serde::de::Error::custom(format_args!("unknown TCP flags {text:?}")))
    }
}

impl serde::Serialize for Errno {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Errno {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = <String as serde::Deserialize>::deserialize(d)?;
        name.parse()
            .map_err(|()| serde::de::Error::custom(format_args!("unknown errno {name:?}")))
    }
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_reasons_follow_sk_err() {
        assert_eq!(FailureReason::from_sk_err(0), FailureReason::Cancelled);
        assert_eq!(FailureReason::from_sk_err(111), FailureReason::Refused);
        assert_eq!(FailureReason::from_sk_err(110), FailureReason::Timeout);
        assert_eq!(FailureReason::from_sk_err(113), FailureReason::Unreachable);
        assert_eq!(FailureReason::from_sk_err(101), FailureReason::Unreachable);
        assert_eq!(FailureReason::from_sk_err(104), FailureReason::Other);
    }

    #[test]
    fn errno_names_round_trip() {
        for n in [32, 71, 101, 103, 104, 110, 111, 112, 113, 5] {
            let name = Errno(n).name();
            assert_eq!(name.parse::<Errno>(), Ok(Errno(n)), "{name}");
        }
        assert_eq!(Errno(5).name(), "E5");
        assert_eq!(Errno(111).name(), "ECONNREFUSED");
    }

    #[test]
    fn phases() {
        assert_eq!(TcpState::SynSent.phase().name(), "syn");
        assert_eq!(TcpState::SynRecv.phase().name(), "syn");
        assert_eq!(TcpState::Established.phase().name(), "established");
        assert_eq!(TcpState::CloseWait.phase().name(), "close_wait");
        assert_eq!(TcpState::FinWait1.phase().name(), "fin_wait1");
        assert_eq!(TcpState::FinWait1.name(), "FIN_WAIT1");
        assert_eq!(TcpState::NewSynRecv.name(), "NEW_SYN_RECV");
        assert_eq!("TIME_WAIT".parse(), Ok(TcpState::TimeWait));
        assert_eq!(TcpState::from_repr(8), Some(TcpState::CloseWait));
        assert_eq!(TcpState::from_repr(0), None);
    }

    #[test]
    fn tcp_flags_are_named_in_header_order() {
        for (bits, text) in [
            (0x02, "SYN"),
            (0x12, "SYN|ACK"),
            (0x14, "RST|ACK"),
            (0x19, "FIN|PSH|ACK"),
            (0xff, "FIN|SYN|RST|PSH|ACK|URG|ECE|CWR"),
            (0, "NONE"),
        ] {
            assert_eq!(TcpFlags(bits).to_string(), text);
            assert_eq!(text.parse(), Ok(TcpFlags(bits)));
        }
        assert!("SYN|NOPE".parse::<TcpFlags>().is_err());
        assert!(TcpFlags(0x12).contains(TcpFlags::SYN));
        assert!(!TcpFlags(0x10).contains(TcpFlags::SYN));
    }

    #[test]
    fn names_are_derived() {
        assert_eq!(EventKind::ListenOverflow.name(), "listen_overflow");
        assert_eq!(EventKind::Drop.name(), "drop");
        assert_eq!(EventKind::Retransmit.name(), "retransmit");
        assert_eq!(Side::Server.name(), "server");
        assert_eq!(FailureReason::Unreachable.name(), "unreachable");
        assert_eq!(<&str>::from(Outcome::Established), "established");
        assert_eq!(Direction::Received.name(), "received");
        assert_eq!(
            serde_json::to_string(&TcpState::LastAck).unwrap(),
            "\"LAST_ACK\""
        );
        assert!(serde_json::from_str::<Side>("\"sideways\"").is_err());
    }

    #[test]
    fn comm_keeps_raw_bytes_and_is_lossy_as_text() {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(b"a\xffb\n");
        let comm = Comm::from_kernel(&raw);
        assert_eq!(comm.as_bytes(), b"a\xffb\n");
        assert_eq!(comm.to_string_lossy(), "a\u{fffd}b\n");
        let full = Comm::from_kernel(&[b'x'; 16]);
        assert_eq!(full.as_bytes().len(), 16);
        assert_eq!(Comm::from_str_lossy("ééééééééé").as_bytes().len(), 16);
        // Bytes left over after the NUL are not part of the name.
        let mut stale = raw;
        stale[4] = 0;
        stale[8] = b'x';
        assert_eq!(Comm::from_kernel(&stale), comm);
    }

    #[test]
    fn mapped_addresses_show_as_ipv4() {
        let mapped: Endpoint = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(mapped, "10.1.2.3:80".parse().unwrap());
        assert_eq!(mapped.to_string(), "10.1.2.3:80");
        let v6: Endpoint = "[fd00::1]:443".parse().unwrap();
        assert_eq!(v6.to_string(), "[fd00::1]:443");
    }
}
