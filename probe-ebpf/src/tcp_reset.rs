//! Resets sent (`tcp_send_reset`) and received (`tcp_receive_reset`).
use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use probe_common::{EventKind, ResetEvent, direction, side, tcp_state};

use crate::{
    access::{Kernel, Raw, Typed},
    emit::{emit, finish, header, now_ns, owner_of, unknown_owner},
    maps::offset,
    sock::{endpoints, packet_endpoints, state},
};

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset_btf(ctx: BtfTracePointContext) -> u32 {
    // The agent picks this program only on kernels whose tracepoint has the `reason` argument
    // (Linux 6.10 and later); `tcp_send_reset_btf_older` is for the others.
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    let reason: u32 = ctx.arg(2);
    finish(
        &ctx,
        "tcp_send_reset",
        on_send_reset(Typed, sk, skb, Some(reason)),
    )
}

/// Kernels before 6.10: no `reason` argument.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset_btf_older(ctx: BtfTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    finish(&ctx, "tcp_send_reset", on_send_reset(Typed, sk, skb, None))
}

#[tracepoint]
pub fn tcp_send_reset_tp(ctx: TracePointContext) -> u32 {
    finish(&ctx, "tcp_send_reset", try_tcp_send_reset_tp(&ctx))
}

fn try_tcp_send_reset_tp(ctx: &TracePointContext) -> Result<(), i32> {
    let sk: u64 = unsafe { ctx.read_at(offset!(tp_send_reset_skaddr))? };
    let skb: u64 = unsafe { ctx.read_at(offset!(tp_send_reset_skbaddr))? };
    let reason = if offset!(has_reset_reason) != 0 {
        Some(unsafe { ctx.read_at::<u32>(offset!(tp_send_reset_reason))? })
    } else {
        None
    };
    on_send_reset(Raw, sk, skb, reason)
}

/// `skb`, when present, is the received packet the reset answers; without it (an active reset,
/// e.g. `close()` with SO_LINGER 0) the socket gives the ends. `reason` is the kernel's
/// `enum sk_rst_reason`, where the kernel has one.
#[inline(always)]
fn on_send_reset<K: Kernel>(k: K, sk: u64, skb: u64, reason: Option<u32>) -> Result<(), i32> {
    let (endpoints, answers_syn) = if skb != 0 {
        packet_endpoints(k, skb)?
    } else if sk != 0 {
        (endpoints(k, sk)?, false)
    } else {
        return Ok(());
    };
    let (mut owner, state) = if sk != 0 {
        (owner_of(k, sk), state(k, sk)?)
    } else {
        (unknown_owner(side::UNKNOWN), tcp_state::NONE)
    };
    if owner.side == side::UNKNOWN && answers_syn {
        owner.side = side::SERVER;
    }
    let event = ResetEvent {
        header: header(EventKind::Reset, now_ns()),
        endpoints,
        owner,
        direction: direction::SENT,
        state,
        has_reason: reason.is_some() as u8,
        _pad: 0,
        reason: reason.unwrap_or(0),
    };
    emit(EventKind::Reset, event);
    Ok(())
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    finish(&ctx, "tcp_receive_reset", on_receive_reset(Typed, sk))
}

#[tracepoint]
pub fn tcp_receive_reset_tp(ctx: TracePointContext) -> u32 {
    finish(&ctx, "tcp_receive_reset", try_tcp_receive_reset_tp(&ctx))
}

fn try_tcp_receive_reset_tp(ctx: &TracePointContext) -> Result<(), i32> {
    let sk: u64 = unsafe { ctx.read_at(offset!(tp_receive_reset_skaddr))? };
    on_receive_reset(Raw, sk)
}

#[inline(always)]
fn on_receive_reset<K: Kernel>(k: K, sk: u64) -> Result<(), i32> {
    if sk == 0 {
        return Ok(());
    }
    let event = ResetEvent {
        header: header(EventKind::Reset, now_ns()),
        endpoints: endpoints(k, sk)?,
        owner: owner_of(k, sk),
        direction: direction::RECEIVED,
        state: state(k, sk)?,
        has_reason: 0,
        _pad: 0,
        reason: 0,
    };
    emit(EventKind::Reset, event);
    Ok(())
}
