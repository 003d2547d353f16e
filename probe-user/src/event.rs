//! Typed events: what the decoder makes of the kernel's records, what the JSON log holds, and
//! what the aggregator and the verdict engine consume.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

/// One TCP event on this host.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Wall-clock time the kernel produced it.
    pub time: SystemTime,
    /// The process that owns the socket, where the agent knows it.
    pub process: Option<Process>,
    /// Which end of the connection this host is, where known.
    pub side: Option<Side>,
    /// This host's end.
    pub src: SocketAddr,
    /// The remote end.
    pub dst: SocketAddr,
    pub detail: EventDetail,
}

#[derive(Clone, Debug, PartialEq)]
pub enum EventDetail {
    Connect(Connect),
    Retransmit(Retransmit),
    Reset(Reset),
    Close(Close),
}

/// A connect ended (client: SYN_SENT -> ESTABLISHED or CLOSE; server: SYN_RECV -> ESTABLISHED).
#[derive(Clone, Debug, PartialEq)]
pub struct Connect {
    pub outcome: Outcome,
    /// Why it failed; `None` when established.
    pub reason: Option<FailureReason>,
    /// `sk->sk_err` at the failure, when there was one.
    pub errno: Option<Errno>,
    /// Handshake time, on the side that started it and where its start was seen.
    pub latency: Option<Duration>,
    pub syn_retransmits: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Retransmit {
    pub state: TcpState,
    /// Segments resent by this call; they add up to the kernel's TcpRetransSegs.
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

/// The kernel's reason for a reset it sent: an `enum sk_rst_reason` name without its
/// `SK_RST_REASON_` prefix (`NO_SOCKET`, `TCP_ABORT_ON_CLOSE`, ...), as the running kernel names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResetReason(Arc<str>);

impl ResetReason {
    pub fn new(name: &str) -> Self {
        ResetReason(name.into())
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

impl Event {
    pub fn kind(&self) -> EventType {
        match self.detail {
            EventDetail::Connect(_) => EventType::Connect,
            EventDetail::Retransmit(_) => EventType::Retransmit,
            EventDetail::Reset(_) => EventType::Reset,
            EventDetail::Close(_) => EventType::Close,
        }
    }
}

/// The `type` of an event in the JSON log and the `type` label of `connprobe_events_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    Connect,
    Retransmit,
    Reset,
    Close,
}

impl EventType {
    pub const ALL: [EventType; 4] = [
        EventType::Connect,
        EventType::Retransmit,
        EventType::Reset,
        EventType::Close,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Connect => "connect",
            EventType::Retransmit => "retransmit",
            EventType::Reset => "reset",
            EventType::Close => "close",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
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
        Comm {
            bytes: *raw,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// This host opened the connection.
    Client,
    /// This host accepted it, or answered a SYN.
    Server,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "client" => Some(Side::Client),
            "server" => Some(Side::Server),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Established,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Established => "established",
            Outcome::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "established" => Some(Outcome::Established),
            "failed" => Some(Outcome::Failed),
            _ => None,
        }
    }
}

/// Why a connect failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    pub const ALL: [FailureReason; 5] = [
        FailureReason::Refused,
        FailureReason::Timeout,
        FailureReason::Unreachable,
        FailureReason::Cancelled,
        FailureReason::Other,
    ];

    /// Classifies `sk->sk_err` read at the SYN_SENT -> CLOSE transition.
    pub fn from_sk_err(errno: u32) -> Self {
        match errno {
            0 => FailureReason::Cancelled,
            Errno::ECONNREFUSED => FailureReason::Refused,
            Errno::ETIMEDOUT => FailureReason::Timeout,
            Errno::EHOSTUNREACH | Errno::ENETUNREACH => FailureReason::Unreachable,
            _ => FailureReason::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Refused => "refused",
            FailureReason::Timeout => "timeout",
            FailureReason::Unreachable => "unreachable",
            FailureReason::Cancelled => "cancelled",
            FailureReason::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A kernel error number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub u32);

impl Errno {
    pub const EPIPE: u32 = 32;
    pub const EPROTO: u32 = 71;
    pub const ENETUNREACH: u32 = 101;
    pub const ECONNABORTED: u32 = 103;
    pub const ECONNRESET: u32 = 104;
    pub const ETIMEDOUT: u32 = 110;
    pub const ECONNREFUSED: u32 = 111;
    pub const EHOSTDOWN: u32 = 112;
    pub const EHOSTUNREACH: u32 = 113;

    const NAMES: [(u32, &'static str); 9] = [
        (Self::EPIPE, "EPIPE"),
        (Self::EPROTO, "EPROTO"),
        (Self::ENETUNREACH, "ENETUNREACH"),
        (Self::ECONNABORTED, "ECONNABORTED"),
        (Self::ECONNRESET, "ECONNRESET"),
        (Self::ETIMEDOUT, "ETIMEDOUT"),
        (Self::ECONNREFUSED, "ECONNREFUSED"),
        (Self::EHOSTDOWN, "EHOSTDOWN"),
        (Self::EHOSTUNREACH, "EHOSTUNREACH"),
    ];

    /// `ECONNREFUSED` style, or `E<number>` for errors without a name here.
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match Self::NAMES.iter().find(|(n, _)| *n == self.0) {
            Some((_, name)) => (*name).into(),
            None => format!("E{}", self.0).into(),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        if let Some((n, _)) = Self::NAMES.iter().find(|(_, name)| *name == s) {
            return Some(Errno(*n));
        }
        s.strip_prefix('E')?.parse().ok().map(Errno)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Sent,
    Received,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Sent => "sent",
            Direction::Received => "received",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sent" => Some(Direction::Sent),
            "received" => Some(Direction::Received),
            _ => None,
        }
    }
}

/// A TCP state as the kernel numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpState(pub u8);

impl TcpState {
    pub const ESTABLISHED: TcpState = TcpState(1);
    pub const SYN_SENT: TcpState = TcpState(2);
    pub const SYN_RECV: TcpState = TcpState(3);

    const NAMES: [&'static str; 14] = [
        "UNKNOWN",
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
        "NEW_SYN_RECV",
        "BOUND_INACTIVE",
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES
            .get(self.0 as usize)
            .copied()
            .unwrap_or("UNKNOWN")
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .position(|n| *n == s)
            .map(|i| TcpState(i as u8))
    }

    /// Where in a connection's life a retransmit happened: `syn` during the handshake,
    /// `established` in the data phase, else the state's name in lower case.
    pub fn phase(self) -> Phase {
        match self {
            TcpState::SYN_SENT | TcpState::SYN_RECV | TcpState(12) => Phase::Syn,
            TcpState::ESTABLISHED => Phase::Established,
            other => Phase::Other(other),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    Syn,
    Established,
    Other(TcpState),
}

impl Phase {
    pub fn as_str(self) -> std::borrow::Cow<'static, str> {
        match self {
            Phase::Syn => "syn".into(),
            Phase::Established => "established".into(),
            Phase::Other(state) => state.name().to_ascii_lowercase().into(),
        }
    }
}

/// Shows IPv4-mapped IPv6 addresses as IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

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
            assert_eq!(Errno::parse(&name), Some(Errno(n)), "{name}");
        }
        assert_eq!(Errno(5).name(), "E5");
    }

    #[test]
    fn phases() {
        assert_eq!(TcpState::SYN_SENT.phase().as_str(), "syn");
        assert_eq!(TcpState::SYN_RECV.phase().as_str(), "syn");
        assert_eq!(TcpState::ESTABLISHED.phase().as_str(), "established");
        assert_eq!(TcpState(8).phase().as_str(), "close_wait");
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
    }

    #[test]
    fn mapped_addresses_show_as_ipv4() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(canonical_ip(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(canonical_ip(v6), v6);
    }
}
