//! Building event headers and owners, and handing events to the ring buffer.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_smp_processor_id, bpf_ktime_get_ns,
    },
};
use aya_log_ebpf::warn;
use probe_common::{COMM_LEN, Counter, EventHeader, EventKind, Owner, owner_flags};

use crate::{
    access::Kernel,
    maps::{EVENTS, WAKEUP_BYTES, bump},
};

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn header(kind: EventKind, timestamp_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        cpu: unsafe { bpf_get_smp_processor_id() },
        timestamp_ns,
    }
}

/// An owner nobody knows yet: only the side, if that.
#[inline(always)]
pub fn unknown_owner(side: u8) -> Owner {
    Owner {
        tgid: 0,
        side,
        flags: 0,
        _pad: [0; 2],
        comm: [0; COMM_LEN],
        cgroup_id: 0,
    }
}

/// The current task as the owner. Call only from a syscall path (a connect), never from
/// softirq, where the current task is whatever happened to run on the CPU.
#[inline(always)]
pub fn current_owner(side: u8) -> Owner {
    Owner {
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        side,
        flags: owner_flags::PROCESS_KNOWN,
        _pad: [0; 2],
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
        // The cgroup v2 id: the agent maps it to the cgroup's path, container and pod.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    }
}

/// The current task as the owner of the connect it is making: the client, from the connect's
/// start. Call only from `connect()`'s CLOSE -> SYN_SENT transition.
#[inline(always)]
pub fn connect_owner() -> Owner {
    let mut owner = current_owner(probe_common::side::CLIENT);
    owner.flags |= owner_flags::START_KNOWN;
    owner
}

/// The socket's owner as recorded at its start, or unknown.
#[inline(always)]
pub fn owner_of<K: Kernel>(k: K, sk: u64) -> Owner {
    match k.record(sk) {
        // SAFETY: a valid map value pointer while the program runs; copied out at once (a
        // concurrent update can at worst tear a record, which only affects reporting).
        Some(rec) => unsafe { (*rec).owner },
        None => unknown_owner(probe_common::side::UNKNOWN),
    }
}

/// Counts the event as produced and writes it to the ring buffer, or counts it lost there.
///
/// Submits wake the agent only when this event's record carries the unread data across the
/// threshold (an eighth of the ring): a wakeup per event would cost more than the event, and so
/// would one per event while the agent is behind, as it is in a storm (the agent drains
/// everything once woken; its periodic poll covers a wakeup that two producers both missed).
#[inline(always)]
pub fn emit<T: 'static>(kind: EventKind, event: T) {
    bump(kind.produced_counter());
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(event);
            // SAFETY: a plain read of a load-time constant.
            let threshold = unsafe { core::ptr::read_volatile(&raw const WAKEUP_BYTES) };
            let unread = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
            // The record as the ring holds it: its 8-byte header, rounded up to 8 bytes.
            let record = (core::mem::size_of::<T>() as u64 + 8 + 7) & !7;
            let crossed = unread >= threshold && unread < threshold + record;
            // Far behind (half the ring): every event wakes it, as a safety net for a crossing
            // that concurrent producers both missed.
            let far_behind = unread >= 4 * threshold;
            let flags = if crossed || far_behind {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            entry.submit(flags as u64);
        }
        None => bump(Counter::LostRingbuf),
    }
}

/// Common tail of every program: a failed kernel read is counted and logged, never fatal.
#[inline(always)]
pub fn finish<C: EbpfContext>(ctx: &C, hook: &'static str, result: Result<(), i32>) -> u32 {
    if let Err(err) = result {
        bump(Counter::ReadError);
        warn!(
            ctx,
            "{}: reading kernel memory failed (error {})", hook, err
        );
    }
    0
}
