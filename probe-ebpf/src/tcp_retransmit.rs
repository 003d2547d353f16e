//! Retransmits from `tcp_retransmit_skb` (data and SYNs) and `tcp_retransmit_synack`.
use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use probe_common::{EventKind, RetransmitEvent, side, tcp_state};

use crate::{
    access::{Kernel, Raw, Typed},
    emit::{emit, finish, header, now_ns, owner_of, unknown_owner},
    listeners::listener_owner,
    maps::offset,
    sock::{endpoints, request_endpoints, state},
};

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_btf(ctx: BtfTracePointContext) -> u32 {
    // The agent picks this program only on kernels whose tracepoint has the `err` argument
    // (6.13 and later); `tcp_retransmit_btf_older` is for the others.
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    let err: i32 = ctx.arg(2);
    finish(
        &ctx,
        "tcp_retransmit_skb",
        on_retransmit(Typed, sk, skb, err),
    )
}

/// Kernels before 6.13: no `err` argument, and the tracepoint fires only for resends that
/// succeeded.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_btf_older(ctx: BtfTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    finish(&ctx, "tcp_retransmit_skb", on_retransmit(Typed, sk, skb, 0))
}

#[tracepoint]
pub fn tcp_retransmit_tp(ctx: TracePointContext) -> u32 {
    finish(&ctx, "tcp_retransmit_skb", try_tcp_retransmit_tp(&ctx))
}

fn try_tcp_retransmit_tp(ctx: &TracePointContext) -> Result<(), i32> {
    let sk: u64 = unsafe { ctx.read_at(offset!(tp_retransmit_skaddr))? };
    let skb: u64 = unsafe { ctx.read_at(offset!(tp_retransmit_skbaddr))? };
    let err: i32 = if offset!(has_retransmit_err) != 0 {
        unsafe { ctx.read_at(offset!(tp_retransmit_err))? }
    } else {
        0
    };
    on_retransmit(Raw, sk, skb, err)
}

/// Only calls that resent (`err == 0`) count, each for all the segments of its skb, so the sum
/// equals the kernel's TcpRetransSegs less TCPRetransFail (the kernel counts a segment in
/// TcpRetransSegs before the IP layer may refuse it).
#[inline(always)]
fn on_retransmit<K: Kernel>(k: K, sk: u64, skb: u64, err: i32) -> Result<(), i32> {
    if err != 0 || sk == 0 || skb == 0 {
        return Ok(());
    }
    let segments = k.read::<u16>(skb, offset!(skb_cb_gso_segs))?.max(1) as u32;
    let event = RetransmitEvent {
        header: header(EventKind::Retransmit, now_ns()),
        endpoints: endpoints(k, sk)?,
        owner: owner_of(k, sk),
        segments,
        state: state(k, sk)?,
        _pad: [0; 3],
    };
    emit(EventKind::Retransmit, event);
    Ok(())
}

#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack_btf(ctx: BtfTracePointContext) -> u32 {
    let listener: u64 = ctx.arg(0);
    let req: u64 = ctx.arg(1);
    finish(
        &ctx,
        "tcp_retransmit_synack",
        on_retransmit_synack(Typed, listener, req),
    )
}

#[tracepoint]
pub fn tcp_retransmit_synack_tp(ctx: TracePointContext) -> u32 {
    finish(
        &ctx,
        "tcp_retransmit_synack",
        try_tcp_retransmit_synack_tp(&ctx),
    )
}

fn try_tcp_retransmit_synack_tp(ctx: &TracePointContext) -> Result<(), i32> {
    let listener: u64 = unsafe { ctx.read_at(offset!(tp_synack_skaddr))? };
    let req: u64 = unsafe { ctx.read_at(offset!(tp_synack_req))? };
    on_retransmit_synack(Raw, listener, req)
}

/// A SYN-ACK resent for a pending request: the request socket holds both ends, the listener's
/// owner is the server process.
#[inline(always)]
fn on_retransmit_synack<K: Kernel>(k: K, listener: u64, req: u64) -> Result<(), i32> {
    if req == 0 {
        return Ok(());
    }
    let endpoints = request_endpoints(k, req)?;
    let owner = if listener != 0 {
        listener_owner(k, listener, endpoints.local_port)?
    } else {
        unknown_owner(side::SERVER)
    };
    let event = RetransmitEvent {
        header: header(EventKind::Retransmit, now_ns()),
        endpoints,
        owner,
        segments: 1,
        state: tcp_state::SYN_RECV,
        _pad: [0; 3],
    };
    emit(EventKind::Retransmit, event);
    Ok(())
}
