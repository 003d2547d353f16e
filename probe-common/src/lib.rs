//! Types shared across the kernel/user boundary of connprobe.
//!
//! Everything here is plain data: `#[repr(C)]`, `Copy`, no implicit padding, no `bool`. The eBPF
//! programs (`probe-ebpf`) write these into the ring buffer and maps; the agent (`probe-user`)
//! reads them back with a length-checked decoder. Sizes are pinned by const asserts so that a
//! change on one side that the other side would misread fails to compile.
#![cfg_attr(not(feature = "user"), no_std)]

/// Ring buffer carrying every event from the kernel to the agent.
pub const EVENTS_MAP: &str = "EVENTS";
/// LRU hash of sockets the programs follow, keyed by `struct sock *`.
pub const SOCKETS_MAP: &str = "SOCKETS";
/// The same with an LRU list per CPU (`BPF_F_NO_COMMON_LRU`), for `--socket-records
/// lru-per-cpu`; the agent sizes it to `--max-sockets` per possible CPU when it is used.
pub const SOCKETS_PER_CPU_MAP: &str = "SOCKETS_PER_CPU";
/// Per-CPU counters, indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "COUNTERS";
/// LRU hash of listening sockets and their owners, keyed by [`ListenerKey`]: written by the
/// programs at `listen()` and by the agent at start-up for listeners older than it.
pub const LISTENERS_MAP: &str = "LISTENERS";
/// The global holding [`KernelOffsets`], set before load.
pub const OFFSETS_GLOBAL: &str = "OFFSETS";
/// The global holding the unread byte count at which a submit wakes the agent (u64).
pub const WAKEUP_BYTES_GLOBAL: &str = "WAKEUP_BYTES";
/// The global holding the [`RecordStore`] of the per-socket records (u32), set before load.
pub const RECORD_STORE_GLOBAL: &str = "RECORD_STORE";
/// Socket storage (`BPF_MAP_TYPE_SK_STORAGE`) holding a [`SocketRecord`] per followed socket.
pub const SOCKET_STORAGE_MAP: &str = "SOCKET_STORAGE";
/// LRU hash of the connects in flight, keyed by [`ConnectKey`]: what a dropped packet without a
/// socket is matched to.
pub const CONNECTS_MAP: &str = "CONNECTS";
/// Per-CPU LRU hash counting dropped data segments by [`DropKey`] (handshake packets and DNS packets are
/// events of their own); the agent reads it every second.
pub const DROP_COUNTS_MAP: &str = "DROP_COUNTS";
/// The global holding [`DropReasonFilter`], set before load.
pub const DROP_FILTER_GLOBAL: &str = "DROP_FILTER";

/// Ring buffer carrying the DNS packets the cgroup_skb programs capture (see [`DnsPacket`]).
pub const DNS_EVENTS_MAP: &str = "DNS_EVENTS";
/// The global holding [`DnsPorts`], set before load.
pub const DNS_PORTS_GLOBAL: &str = "DNS_PORTS";
/// Size of the DNS ring buffer: 1 MiB holds ~1,700 packets.
pub const DNS_RING_BYTES: u32 = 1 << 20;
/// Bytes of a DNS packet's payload copied to the agent: the header and question of any query,
/// and the answers of all but large responses (the rest is cut; see [`DnsPacket::payload_len`]).
pub const DNS_PAYLOAD_BYTES: usize = 512;
/// Ports the DNS programs watch at most (53 and up to seven `--dns-port`s).
pub const MAX_DNS_PORTS: usize = 8;
pub const IPPROTO_UDP: u8 = 17;

/// Default ring buffer size: 4 MiB holds ~40,000 events, a few seconds of a connect storm.
pub const DEFAULT_RING_BYTES: u32 = 4 << 20;
/// Default number of sockets followed at once (LRU: the least recently used is evicted).
pub const DEFAULT_MAX_SOCKETS: u32 = 65_536;
/// Listening sockets remembered at once (LRU).
pub const MAX_LISTENERS: u32 = 8_192;
/// Connections (and reasons) whose dropped data segments are counted at once (LRU, per CPU).
pub const MAX_DROP_COUNTS: u32 = 4_096;

pub const COMM_LEN: usize = 16;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;
/// The DNS port: dropped packets to or from it are reported, TCP or UDP.
pub const DNS_PORT: u16 = 53;

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
    pub const BOUND_INACTIVE: u8 = 13;
    /// Not a kernel state: the event had no socket to read a state from (a socketless RST).
    pub const NONE: u8 = 0;
}

/// The kind of an event; the first field of every event's header.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Connect = 1,
    Retransmit = 2,
    Reset = 3,
    Close = 4,
    /// Not a TCP event of its own: a connect's first SYN left with another destination than
    /// the socket's (DNAT on this host); the agent pairs it with the socket's events.
    Translation = 5,
    Drop = 6,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::Connect,
        EventKind::Retransmit,
        EventKind::Reset,
        EventKind::Close,
        EventKind::Translation,
        EventKind::Drop,
    ];

    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(EventKind::Connect),
            2 => Some(EventKind::Retransmit),
            3 => Some(EventKind::Reset),
            4 => Some(EventKind::Close),
            5 => Some(EventKind::Translation),
            6 => Some(EventKind::Drop),
            _ => None,
        }
    }

    /// Index of this kind's "produced" counter in [`COUNTERS_MAP`].
    pub const fn produced_counter(self) -> Counter {
        match self {
            EventKind::Connect => Counter::ProducedConnect,
            EventKind::Retransmit => Counter::ProducedRetransmit,
            EventKind::Reset => Counter::ProducedReset,
            EventKind::Close => Counter::ProducedClose,
            EventKind::Translation => Counter::ProducedTranslation,
            EventKind::Drop => Counter::ProducedDrop,
        }
    }
}

/// Where the programs keep the per-socket records ([`SocketRecord`]): the value of
/// [`RECORD_STORE_GLOBAL`]. Every program uses the same store.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordStore {
    /// [`SOCKETS_MAP`], an LRU hash with one LRU list, emptied at `tcp_destroy_sock`: the only
    /// store classic tracepoints reach.
    LruHash = 0,
    /// [`SOCKET_STORAGE_MAP`], in the sockets themselves and freed with them: when every hook
    /// runs on a BTF tracepoint.
    SocketStorage = 1,
    /// [`SOCKETS_PER_CPU_MAP`], an LRU hash with an LRU list per CPU, emptied at
    /// `tcp_destroy_sock`.
    PerCpuLruHash = 2,
}

/// Per-CPU counters the programs keep; index into [`COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Events the programs tried to emit, by kind (delivered + lost in the ring buffer).
    ProducedConnect = 0,
    ProducedRetransmit = 1,
    ProducedReset = 2,
    ProducedClose = 3,
    /// `bpf_ringbuf_reserve` failed: the agent fell behind and the event was dropped.
    LostRingbuf = 4,
    /// A connect ended whose start record was gone from its [`RecordStore`] (LRU eviction, or
    /// the connect began before the agent): it is still reported, without latency or owner.
    LostMap = 5,
    /// A kernel read (`bpf_probe_read_kernel`) failed; the event was dropped.
    ReadError = 6,
    /// [`TranslationEvent`]s the backend program tried to emit (delivered + lost).
    ProducedTranslation = 7,
    /// DNS packets the cgroup_skb programs tried to hand over (delivered + lost).
    ProducedDns = 8,
    /// DNS packets lost because the DNS ring buffer was full.
    LostDnsRingbuf = 9,
    ProducedDrop = 10,
    /// Dropped data segments counted in [`DROP_COUNTS_MAP`] (not events of their own).
    CountedDrops = 11,
}

pub const COUNTER_SLOTS: u32 = 16;

/// Flags in [`Owner::flags`].
pub mod owner_flags {
    /// `tgid` and `comm` were taken in the owning process's syscall context.
    pub const PROCESS_KNOWN: u8 = 1;
    /// `start_ns` is known (the connect's or the accept's start was seen).
    pub const START_KNOWN: u8 = 2;
}

/// Which end of the connection this host is.
pub mod side {
    pub const UNKNOWN: u8 = 0;
    /// This host opened the connection (it sent the SYN).
    pub const CLIENT: u8 = 1;
    /// This host accepted the connection or answered a SYN.
    pub const SERVER: u8 = 2;
}

/// Common header of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// An [`EventKind`] as u32.
    pub kind: u32,
    /// CPU the event was produced on.
    pub cpu: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
}

/// The two ends of a connection, seen from this host.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoints {
    /// `AF_INET` or `AF_INET6`. For `AF_INET` only the first 4 bytes of each address are used.
    pub family: u16,
    /// This host's port, host byte order.
    pub local_port: u16,
    /// The remote port, host byte order.
    pub remote_port: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

/// The process that owns the socket, as far as the kernel side knows it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Owner {
    pub tgid: u32,
    /// A [`side`] constant.
    pub side: u8,
    /// [`owner_flags`].
    pub flags: u8,
    pub _pad: [u8; 2],
    pub comm: [u8; COMM_LEN],
    /// The cgroup v2 id of the owning process (`bpf_get_current_cgroup_id()` in its syscall
    /// context: the inode number of its cgroup directory); 0 when not known.
    pub cgroup_id: u64,
}

/// How a connect ended.
pub mod outcome {
    pub const ESTABLISHED: u8 = 1;
    pub const FAILED: u8 = 2;
}

/// A connect ended: SYN_SENT -> ESTABLISHED or SYN_SENT -> CLOSE on the client, SYN_RECV ->
/// ESTABLISHED on the server.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectEvent {
    pub header: EventHeader,
    pub endpoints: Endpoints,
    pub owner: Owner,
    /// From the connect's start to its end; 0 when the start is not known.
    pub latency_ns: u64,
    /// `sk->sk_err` at the CLOSE transition (0: the application closed the socket itself).
    pub sk_err: u32,
    /// SYN retransmits the connect needed (`tcp_sock.total_retrans` at its end).
    pub syn_retransmits: u32,
    /// An [`outcome`] constant.
    pub outcome: u8,
    pub _pad: [u8; 7],
}

/// Where in the connection's life a retransmit happened.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RetransmitEvent {
    pub header: EventHeader,
    pub endpoints: Endpoints,
    pub owner: Owner,
    /// Segments resent by this call (`tcp_gso_segs`; 1 for a SYN-ACK).
    pub segments: u32,
    /// The TCP state when it was resent (a [`tcp_state`] constant).
    pub state: u8,
    pub _pad: [u8; 3],
}

pub mod direction {
    pub const SENT: u8 = 1;
    pub const RECEIVED: u8 = 2;
}

/// A TCP reset sent or received.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ResetEvent {
    pub header: EventHeader,
    pub endpoints: Endpoints,
    pub owner: Owner,
    /// A [`direction`] constant.
    pub direction: u8,
    /// The socket's TCP state, or [`tcp_state::NONE`] for a reset sent without a socket.
    pub state: u8,
    /// 1 when `reason` holds the kernel's reason for a sent reset (Linux 6.10 and later).
    pub has_reason: u8,
    pub _pad: u8,
    /// An `enum sk_rst_reason` value of the running kernel; its names are read from BTF.
    pub reason: u32,
}

/// An established connection reached CLOSE.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CloseEvent {
    pub header: EventHeader,
    pub endpoints: Endpoints,
    pub owner: Owner,
    /// From ESTABLISHED to CLOSE; 0 when the start is not known (see `owner.flags`).
    pub duration_ns: u64,
    /// `tcp_sock.bytes_sent` (payload bytes, retransmissions included).
    pub bytes_sent: u64,
    /// `tcp_sock.bytes_received`, less the one the peer's FIN counts for.
    pub bytes_received: u64,
    /// `tcp_sock.data_segs_out`: data segments sent, retransmissions included.
    pub segments_sent: u32,
    /// `tcp_sock.total_retrans`.
    pub segments_retransmitted: u32,
}

/// A packet of a TCP connection (or a DNS packet) that the kernel dropped with a reason: a
/// handshake segment (SYN, SYN-ACK, RST) or a DNS packet, one event each. Data segments are
/// counted in [`DROP_COUNTS_MAP`] instead.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DropEvent {
    pub header: EventHeader,
    /// The connection's ends seen from this host's socket (for a packet without a socket, from
    /// the connect it was matched to, or as it arrived).
    pub endpoints: Endpoints,
    pub owner: Owner,
    /// An `enum skb_drop_reason` value of the running kernel; its names are read from BTF.
    pub reason: u32,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u8,
    /// The TCP header's flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, ...);
    /// 0 for UDP.
    pub tcp_flags: u8,
    /// A [`direction`] constant: `SENT` for a packet leaving this host's end, `RECEIVED` for one
    /// coming to it.
    pub direction: u8,
    pub _pad: u8,
}

/// Key of [`DROP_COUNTS_MAP`]: one connection's dropped data segments, by reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub endpoints: Endpoints,
    pub reason: u32,
    /// A [`side`] constant.
    pub side: u8,
    /// A [`direction`] constant.
    pub direction: u8,
    pub protocol: u8,
    pub _pad: u8,
}

/// Key of [`CONNECTS_MAP`]: a connect this host started. An unbound socket only gets its local
/// port after its `connect()` was traced: its key has `local_port` 0 until the connect ends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectKey {
    /// `AF_INET` or `AF_INET6`; IPv4 addresses (IPv4-mapped ones too) in the first 4 bytes.
    pub family: u16,
    /// This host's port, host byte order; 0 when not known yet.
    pub local_port: u16,
    /// The remote port, host byte order.
    pub remote_port: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

/// A connect in flight: its socket and owner, so that a dropped packet of it can be named.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectInFlight {
    /// The connecting `struct sock *` (compared, and read with `bpf_probe_read_kernel`).
    pub sk: u64,
    pub owner: Owner,
}

/// The `enum skb_drop_reason` values to report, one bit each, set by the agent from the
/// running kernel's BTF: every reason but `NOT_SPECIFIED` and those that do not mean a packet
/// was lost on its way (see the agent's `drops` module).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropReasonFilter {
    pub bits: [u64; DROP_REASON_WORDS],
}

/// Reasons up to `64 * DROP_REASON_WORDS - 1` can be reported (6.18 has 129).
pub const DROP_REASON_WORDS: usize = 8;

/// A connect's SYN left this host for `backend` rather than for the socket's own remote end
/// (`endpoints`, the address the application connected to): a DNAT on this host (kube-proxy,
/// an nft or iptables rule, a local load balancer) translated it. Written by the cgroup_skb
/// egress program, which runs after the netfilter nat hooks.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TranslationEvent {
    pub header: EventHeader,
    /// The socket's ends, as its other events carry them.
    pub endpoints: Endpoints,
    /// Where the SYN actually went (same family as `endpoints`; for `AF_INET` the first 4 bytes).
    pub backend_addr: [u8; 16],
    /// Host byte order.
    pub backend_port: u16,
    pub _pad: [u8; 6],
}

/// Per-socket state kept in the [`RecordStore`] from the start of a connect (or an accept) until
/// the kernel destroys the socket. Not at CLOSE: an abortive close (SO_LINGER 0, unread data)
/// moves the socket to CLOSE first and sends its reset after, and that reset needs the owner.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SocketRecord {
    /// When the connect started (CLOSE -> SYN_SENT) or the accepted child appeared (SYN_RECV).
    pub start_ns: u64,
    /// When it became ESTABLISHED; 0 until then.
    pub established_ns: u64,
    pub owner: Owner,
    /// The last socket error the kernel reported for it (`inet_sk_error_report`: `sk_err`, or
    /// `sk_err_soft` when the error came while the application held the socket); 0 if none.
    /// A non-blocking connect's ICMP error only ever shows here: the application's
    /// `getsockopt(SO_ERROR)` clears it before the socket reaches CLOSE.
    pub error: u32,
    pub _pad: u32,
}

/// Key of [`LISTENERS_MAP`]: a listening port in one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// The network namespace's inode number (`net.ns.inum`, the inode of `/proc/PID/ns/net`).
    pub netns: u32,
    /// The listening port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// A listening socket and the process that called `listen()` on it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ListenerRecord {
    /// The listener's `struct sock *`; 0 when the agent found it at start-up in /proc.
    pub sk: u64,
    pub owner: Owner,
    /// Its accept queue's length (`sk_max_ack_backlog`, the `listen()` backlog capped by
    /// `somaxconn`); 0 when the agent found it at start-up.
    pub backlog: u32,
    /// The thread that called `listen()` (or one the agent found in the listener's namespace):
    /// where the agent reads that namespace's counters (`/proc/TGID/task/TID/net`).
    pub tid: u32,
}

/// Byte offsets the programs need, read from the running kernel at start-up (BTF for struct
/// fields, tracepoint `format` files for classic tracepoint fields) and set as a global before
/// load. Offsets of classic tracepoint fields stay 0 when the BTF-typed hooks are used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    // struct sock_common (at offset 0 of struct sock, request_sock and inet_timewait_sock)
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    // struct inet_sock: the local port, kept after CLOSE clears `skc_num`
    pub inet_sport: u32,
    // struct sock
    pub sk_protocol: u32,
    pub sk_err: u32,
    pub sk_err_soft: u32,
    // the socket's error queue: `sock.sk_error_queue.{prev,qlen}`, and where an ICMP error's
    // `sock_extended_err` sits in a queued skb (`sk_buff.cb` + `sock_exterr_skb.ee`)
    pub sk_error_queue_prev: u32,
    pub sk_error_queue_qlen: u32,
    pub skb_cb_ee: u32,
    pub sk_flags: u32,
    /// Bit of `SOCK_DONE` (a FIN was received) in `sk_flags`, from `enum sock_flags`.
    pub sock_done_bit: u32,
    // the network namespace: sock_common.skc_net (a `struct net *`), then net.ns.inum
    pub skc_net: u32,
    pub net_ns_inum: u32,
    // struct tcp_sock
    pub tcp_bytes_sent: u32,
    pub tcp_bytes_received: u32,
    pub tcp_data_segs_out: u32,
    pub tcp_total_retrans: u32,
    // struct sk_buff, and tcp_skb_cb inside its `cb`
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_cb_gso_segs: u32,
    // dropped packets: sk_buff.{sk,protocol,dev}, net_device.nd_net.net
    pub skb_sk: u32,
    pub skb_protocol: u32,
    pub skb_dev: u32,
    pub dev_nd_net: u32,
    // struct sock: the listen backlog
    pub sk_max_ack_backlog: u32,
    // classic tracepoint fields (offsets into the tracepoint record)
    pub tp_state_skaddr: u32,
    pub tp_state_oldstate: u32,
    pub tp_state_newstate: u32,
    pub tp_retransmit_skaddr: u32,
    pub tp_retransmit_skbaddr: u32,
    pub tp_retransmit_err: u32,
    pub tp_synack_skaddr: u32,
    pub tp_synack_req: u32,
    pub tp_send_reset_skaddr: u32,
    pub tp_send_reset_skbaddr: u32,
    pub tp_send_reset_reason: u32,
    pub tp_receive_reset_skaddr: u32,
    pub tp_destroy_skaddr: u32,
    pub tp_drop_skbaddr: u32,
    pub tp_drop_protocol: u32,
    pub tp_drop_reason: u32,
    pub tp_drop_rx_sk: u32,
    /// 1 when `kfree_skb` names the receiving socket (`rx_sk`, Linux 6.11 and later).
    pub has_drop_rx_sk: u32,
    /// 1 when `tcp_retransmit_skb` has an `err` argument (Linux 6.13 and later).
    pub has_retransmit_err: u32,
    /// 1 when the classic `tcp_send_reset` has a `reason` field (Linux 6.10 and later).
    pub has_reset_reason: u32,
}

/// The ports the DNS programs watch, set as a global before load: a packet to or from one of
/// the first `count` of `ports` is copied to the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsPorts {
    pub ports: [u16; MAX_DNS_PORTS],
    pub count: u32,
}

/// Flags in [`DnsPacket::flags`].
pub mod dns_flags {
    /// `tgid` is the process that sent the packet (egress, in its syscall).
    pub const PROCESS_KNOWN: u8 = 1;
    /// TCP: the segment carried FIN or RST (the connection is closing).
    pub const TCP_CLOSING: u8 = 2;
    /// `comm` is that process's name too (not on kernels whose cgroup_skb programs may ask for
    /// the pid but not the name).
    pub const COMM_KNOWN: u8 = 4;
}

/// One UDP datagram or TCP segment to or from a DNS port, as a socket on this host sent
/// ([`direction::SENT`], cgroup egress) or received it ([`direction::RECEIVED`], cgroup
/// ingress). Addresses are the packet's own: `src` sent it, `dst` receives it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DnsPacket {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    /// `bpf_get_socket_cookie()` of the socket that sent or receives it (0 when none).
    pub socket_cookie: u64,
    pub tgid: u32,
    /// Bytes of DNS payload (after the UDP or TCP header) the packet carried; only the first
    /// [`DNS_PAYLOAD_BYTES`] of them are in `payload`.
    pub payload_len: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub src_port: u16,
    pub dst_port: u16,
    /// A [`direction`] constant.
    pub direction: u8,
    /// [`IPPROTO_UDP`] or [`IPPROTO_TCP`] (as u8).
    pub transport: u8,
    /// [`dns_flags`].
    pub flags: u8,
    pub _pad: [u8; 7],
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub comm: [u8; COMM_LEN],
    pub payload: [u8; DNS_PAYLOAD_BYTES],
}

const _: () = {
    assert!(core::mem::size_of::<DnsPorts>() == 20);
    assert!(core::mem::size_of::<DnsPacket>() == 88 + DNS_PAYLOAD_BYTES);
    assert!(core::mem::size_of::<EventHeader>() == 16);
    assert!(core::mem::size_of::<Endpoints>() == 40);
    assert!(core::mem::size_of::<Owner>() == 32);
    assert!(core::mem::size_of::<ConnectEvent>() == 112);
    assert!(core::mem::size_of::<RetransmitEvent>() == 96);
    assert!(core::mem::size_of::<ResetEvent>() == 96);
    assert!(core::mem::size_of::<CloseEvent>() == 120);
    assert!(core::mem::size_of::<SocketRecord>() == 56);
    assert!(core::mem::size_of::<TranslationEvent>() == 80);
    assert!(core::mem::size_of::<ListenerKey>() == 8);
    assert!(core::mem::size_of::<ListenerRecord>() == 48);
    assert!(core::mem::size_of::<DropEvent>() == 96);
    assert!(core::mem::size_of::<DropKey>() == 48);
    assert!(core::mem::size_of::<ConnectKey>() == 40);
    assert!(core::mem::size_of::<ConnectInFlight>() == 40);
    assert!(core::mem::size_of::<DropReasonFilter>() == 8 * DROP_REASON_WORDS);
    assert!(core::mem::size_of::<KernelOffsets>() == 52 * 4);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, made only of integers, with no implicit padding
    // (checked by the size asserts above).
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for SocketRecord {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for ListenerRecord {}
    unsafe impl aya::Pod for DropKey {}
    unsafe impl aya::Pod for DropReasonFilter {}
    unsafe impl aya::Pod for DnsPorts {}
}
