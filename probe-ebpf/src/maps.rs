//! Maps and load-time globals shared by every program.
use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use probe_common::{
    COUNTER_SLOTS, ConnectInFlight, ConnectKey, Counter, DEFAULT_MAX_SOCKETS, DEFAULT_RING_BYTES,
    DROP_REASON_WORDS, DropKey, DropReasonFilter, KernelOffsets, ListenerKey, ListenerRecord,
    MAX_DROP_COUNTS, MAX_LISTENERS, RecordStore, SocketRecord,
};

/// `BPF_F_NO_COMMON_LRU`: an LRU hash with an LRU list per CPU instead of one shared list.
const NO_COMMON_LRU: u32 = 2;

/// Events to the agent. Its size is set by the agent before load (`--ring-buffer-bytes`).
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Sockets followed from connect (or accept) to close, kept in the sockets themselves: used when
/// every hook runs on a BTF tracepoint (see `access`).
#[btf_map]
pub static SOCKET_STORAGE: SkStorage<SocketRecord> = SkStorage::new();

/// Sockets followed from connect (or accept) until the kernel destroys them, keyed by
/// `struct sock *`: used when any hook runs on a classic tracepoint, or with `--socket-records
/// lru`.
#[map(name = "SOCKETS")]
pub static SOCKETS: LruHashMap<u64, SocketRecord> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// [`SOCKETS`] with an LRU list per CPU, used only with `--socket-records lru-per-cpu`. The
/// kernel gives each possible CPU an equal share of the entries, and an insert evicts from its
/// own CPU's share only: the agent sizes it to `--max-sockets` per possible CPU when it is used,
/// and to the least otherwise.
#[map(name = "SOCKETS_PER_CPU")]
pub static SOCKETS_PER_CPU: LruHashMap<u64, SocketRecord> =
    LruHashMap::with_max_entries(1, NO_COMMON_LRU);

/// Listening sockets and the process that called `listen()`, by network namespace and port:
/// an accepted connection's owner is its listener's.
#[map(name = "LISTENERS")]
pub static LISTENERS: LruHashMap<ListenerKey, ListenerRecord> =
    LruHashMap::with_max_entries(MAX_LISTENERS, 0);

/// Connects in flight, from `connect()` until established (failed ones stay until evicted, so
/// that a late reply is still theirs): what a dropped packet without a socket is matched to.
#[map(name = "CONNECTS")]
pub static CONNECTS: LruHashMap<ConnectKey, ConnectInFlight> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// Dropped data segments by connection and reason, per CPU; the agent reads and reports the
/// counts.
#[map(name = "DROP_COUNTS")]
pub static DROP_COUNTS: LruPerCpuHashMap<DropKey, u64> =
    LruPerCpuHashMap::with_max_entries(MAX_DROP_COUNTS, 0);

/// Produced and lost counters, see [`Counter`].
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Offsets of kernel struct and tracepoint fields, set by the agent before load.
#[unsafe(no_mangle)]
pub static OFFSETS: KernelOffsets = KernelOffsets {
    skc_family: 0,
    skc_state: 0,
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    inet_sport: 0,
    sk_protocol: 0,
    sk_err: 0,
    sk_err_soft: 0,
    sk_error_queue_prev: 0,
    sk_error_queue_qlen: 0,
    skb_cb_ee: 0,
    sk_flags: 0,
    sock_done_bit: 0,
    skc_net: 0,
    net_ns_inum: 0,
    tcp_bytes_sent: 0,
    tcp_bytes_received: 0,
    tcp_data_segs_out: 0,
    tcp_total_retrans: 0,
    skb_head: 0,
    skb_network_header: 0,
    skb_transport_header: 0,
    skb_cb_gso_segs: 0,
    skb_sk: 0,
    skb_protocol: 0,
    skb_dev: 0,
    dev_nd_net: 0,
    sk_max_ack_backlog: 0,
    tp_state_skaddr: 0,
    tp_state_oldstate: 0,
    tp_state_newstate: 0,
    tp_retransmit_skaddr: 0,
    tp_retransmit_skbaddr: 0,
    tp_retransmit_err: 0,
    tp_synack_skaddr: 0,
    tp_synack_req: 0,
    tp_send_reset_skaddr: 0,
    tp_send_reset_skbaddr: 0,
    tp_send_reset_reason: 0,
    tp_receive_reset_skaddr: 0,
    tp_destroy_skaddr: 0,
    tp_drop_skbaddr: 0,
    tp_drop_protocol: 0,
    tp_drop_reason: 0,
    tp_drop_rx_sk: 0,
    has_drop_rx_sk: 0,
    has_retransmit_err: 0,
    has_reset_reason: 0,
};

/// The drop reasons to report, set by the agent before load (see `drops`).
#[unsafe(no_mangle)]
pub static DROP_FILTER: DropReasonFilter = DropReasonFilter {
    bits: [0; DROP_REASON_WORDS],
};

/// Where the records live, a [`RecordStore`] (see `access`). Set by the agent before load.
#[unsafe(no_mangle)]
pub static RECORD_STORE: u32 = RecordStore::LruHash as u32;

/// Unread bytes in [`EVENTS`] at which a submit wakes the agent; below it the agent's
/// periodic poll picks the events up. Set by the agent before load.
#[unsafe(no_mangle)]
pub static WAKEUP_BYTES: u64 = 0;

/// Reads one offset. The volatile read keeps the compiler from folding the placeholder zeros.
macro_rules! offset {
    ($field:ident) => {{
        #[allow(unused_unsafe)]
        let value = unsafe { core::ptr::read_volatile(&raw const $crate::maps::OFFSETS.$field) };
        value as usize
    }};
}
pub(crate) use offset;

#[inline(always)]
pub fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}
