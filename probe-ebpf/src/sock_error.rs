//! Socket errors as the kernel reports them (`inet_sk_error_report`), kept in the socket's record
//! for the connect's end.
//!
//! A non-blocking connect (curl, Go, Java NIO, nginx) gets its ICMP error while `connect()` still
//! holds the socket: the kernel stores it in `sk_err_soft`, not `sk_err`, and the application's
//! `getsockopt(SO_ERROR)` takes it away before `close()` moves the socket to CLOSE with no error
//! left on it. Only the report sees it, and it comes a moment too early to find it in
//! `sk_err_soft`: `tcp_v4_err` first queues the ICMP error on the socket's error queue (Linux 5.8
//! and later, whatever IP_RECVERR says), which reports it, and only then sets `sk_err_soft`. So
//! the errno is read from the queued error (`sock_extended_err` of the queue's last skb).
use crate::{
    access::{Kernel, Raw, Typed},
    emit::finish,
    maps::offset,
};
use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};

#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn sock_error_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    finish(&ctx, "inet_sk_error_report", on_error_report(Typed, sk))
}

/// The fallback where BTF tracepoints are refused. Not the classic tracepoint: its record holds
/// the ports and addresses but no socket and only `sk_err`, which is 0 for a soft error. The raw
/// tracepoint has the socket and needs no tracefs.
#[raw_tracepoint(tracepoint = "inet_sk_error_report")]
pub fn sock_error_tp(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    finish(&ctx, "inet_sk_error_report", on_error_report(Raw, sk)) as i32
}

#[inline(always)]
fn on_error_report<K: Kernel>(k: K, sk: u64) -> Result<(), i32> {
    if sk == 0 {
        return Ok(());
    }
    // Only followed sockets (TCP sockets whose connect or accept was seen): reports on any other
    // socket cost one hash lookup.
    let Some(rec) = k.record(sk) else {
        return Ok(());
    };
    let error = match k.read::<i32>(sk, offset!(sk_err))? {
        0 => match queued_icmp_error(k, sk)? {
            0 => k.read::<i32>(sk, offset!(sk_err_soft))? as u32,
            err => err,
        },
        err => err as u32,
    };
    if error != 0 && error < 4096 {
        // SAFETY: a valid map value pointer for the duration of the program.
        unsafe { (*rec).error = error };
    }
    Ok(())
}

/// `SO_EE_ORIGIN_ICMP` and `SO_EE_ORIGIN_ICMP6` (include/uapi/linux/errqueue.h): the origins of
/// errors that ICMP messages put on the error queue. Timestamps and zero-copy notices use the
/// same queue with other origins.
const ORIGIN_ICMP: u8 = 2;
const ORIGIN_ICMP6: u8 = 3;

/// The errno of the ICMP error last queued on the socket's error queue, or 0.
#[inline(always)]
fn queued_icmp_error<K: Kernel>(k: K, sk: u64) -> Result<u32, i32> {
    if k.read::<u32>(sk, offset!(sk_error_queue_qlen))? == 0 {
        return Ok(0);
    }
    let last = k.read::<u64>(sk, offset!(sk_error_queue_prev))?;
    if last == 0 {
        return Ok(0);
    }
    // struct sock_extended_err { __u32 ee_errno; __u8 ee_origin; ... }
    let errno = k.read::<u32>(last, offset!(skb_cb_ee))?;
    let origin = k.read::<u8>(last, offset!(skb_cb_ee) + 4)?;
    Ok(if origin == ORIGIN_ICMP || origin == ORIGIN_ICMP6 {
        errno
    } else {
        0
    })
}
