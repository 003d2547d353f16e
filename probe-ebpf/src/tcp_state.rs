//! The connect lifecycle from `inet_sock_set_state`: connects started and ended, connections
//! accepted and closed, listeners opened and closed.
use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use probe_common::{
    CloseEvent, ConnectEvent, Counter, EventKind, IPPROTO_TCP, SocketRecord, outcome, owner_flags,
    side, tcp_state,
};

use crate::{
    access::{Kernel, Raw, Typed},
    connects,
    emit::{connect_owner, emit, finish, header, now_ns, unknown_owner},
    listeners::{self, listener_owner},
    maps::{bump, offset},
    sock::{endpoints, local_port, payload_bytes_received, protocol},
};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tcp_state_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    finish(
        &ctx,
        "inet_sock_set_state",
        on_state_change(Typed, sk, old, new),
    )
}

#[tracepoint]
pub fn tcp_state_tp(ctx: TracePointContext) -> u32 {
    finish(&ctx, "inet_sock_set_state", try_tcp_state_tp(&ctx))
}

fn try_tcp_state_tp(ctx: &TracePointContext) -> Result<(), i32> {
    let sk: u64 = unsafe { ctx.read_at(offset!(tp_state_skaddr))? };
    let old: i32 = unsafe { ctx.read_at(offset!(tp_state_oldstate))? };
    let new: i32 = unsafe { ctx.read_at(offset!(tp_state_newstate))? };
    on_state_change(Raw, sk, old, new)
}

/// The transitions connprobe acts on. Each one's handler is a BPF function of its own
/// (`#[inline(never)]`): the verifier adds up the stack frames along a call chain (memset, which
/// the compiler calls to zero a struct, is a function too), and Linux 6.1's verifier rounds each
/// frame up to 32 bytes and refuses more than 512. With every handler inlined the program's one
/// frame held all their events and records at once (456 bytes; 544 by 6.1's count with its log
/// call). For the same reason the connects in flight are kept by `connects::started` and
/// `connects::ended`, called beside a connect's handler rather than from it: sibling frames do
/// not add up. From `end_connect`, their keys and endpoints made its chain 544 bytes again
/// (program 128 + end_connect 384 + memset 32); beside it no chain is deeper than 448 (program
/// 128 + end_connect 288 + memset 32). A call costs a few nanoseconds, reading the endpoints
/// twice a few loads.
enum Transition {
    Listen,
    Unlisten,
    ConnectStart,
    ConnectEstablished,
    ConnectFailed,
    AcceptStart,
    Accepted,
    Closed,
}

#[inline(always)]
fn on_state_change<K: Kernel>(k: K, sk: u64, old: i32, new: i32) -> Result<(), i32> {
    // Decide on the transition first: most hits (FIN_WAIT1, CLOSE_WAIT, ...) need nothing, and
    // then no kernel memory is read at all.
    let transition = match (old as u8, new as u8) {
        (tcp_state::CLOSE, tcp_state::LISTEN) => Transition::Listen,
        (tcp_state::LISTEN, tcp_state::CLOSE) => Transition::Unlisten,
        (tcp_state::CLOSE, tcp_state::SYN_SENT) => Transition::ConnectStart,
        (tcp_state::SYN_SENT, tcp_state::ESTABLISHED) => Transition::ConnectEstablished,
        (tcp_state::SYN_SENT, tcp_state::CLOSE) => Transition::ConnectFailed,
        (_, tcp_state::SYN_RECV) => Transition::AcceptStart,
        (tcp_state::SYN_RECV, tcp_state::ESTABLISHED) => Transition::Accepted,
        // A child socket that dies before ESTABLISHED was never a connection: the loser of two
        // CPUs handling the same handshake's last ACK at once (`inet_csk_complete_hashdance`;
        // the other child goes on), or a clone that failed. Logged as a close it was a second
        // close of the same four-tuple (seen on 6.1 in CI).
        (tcp_state::SYN_RECV, tcp_state::CLOSE) => return Ok(()),
        (tcp_state::CLOSE, tcp_state::CLOSE) => return Ok(()),
        (_, tcp_state::CLOSE) => Transition::Closed,
        _ => return Ok(()),
    };
    if sk == 0 || protocol(k, sk)? != IPPROTO_TCP {
        return Ok(());
    }
    match transition {
        Transition::Listen => listeners::listen(k, sk),
        Transition::Unlisten => listeners::unlisten(k, sk),
        // The connects in flight are kept by calls beside the handlers, not inside them.
        Transition::ConnectStart => {
            start_connect(k, sk);
            connects::started(k, sk)
        }
        Transition::ConnectEstablished => {
            let in_flight = connects::ended(k, sk, true);
            end_connect(k, sk, outcome::ESTABLISHED).and(in_flight)
        }
        Transition::ConnectFailed => {
            let in_flight = connects::ended(k, sk, false);
            end_connect(k, sk, outcome::FAILED).and(in_flight)
        }
        Transition::AcceptStart => start_accept(k, sk),
        Transition::Accepted => accepted(k, sk),
        Transition::Closed => closed(k, sk),
    }
}

/// CLOSE -> SYN_SENT runs in the connecting process's `connect()`: the one place the owner is
/// known for sure. The connect is in flight from here (`connects::started`, called beside).
#[inline(never)]
fn start_connect<K: Kernel>(k: K, sk: u64) {
    let rec = SocketRecord {
        start_ns: now_ns(),
        established_ns: 0,
        owner: connect_owner(),
        error: 0,
        _pad: 0,
    };
    k.follow(sk, &rec);
}

/// SYN_SENT -> ESTABLISHED or CLOSE, in softirq or timer context: identity comes from the record.
#[inline(never)]
fn end_connect<K: Kernel>(k: K, sk: u64, result: u8) -> Result<(), i32> {
    let now = now_ns();
    let (owner, latency_ns, reported_error) = match k.record(sk) {
        Some(rec) => {
            // SAFETY: a valid map value pointer for the duration of the program.
            let rec = unsafe { &mut *rec };
            if result == outcome::ESTABLISHED {
                rec.established_ns = now;
            }
            (rec.owner, now.saturating_sub(rec.start_ns), rec.error)
        }
        None => {
            bump(Counter::LostMap);
            let owner = unknown_owner(side::CLIENT);
            if result == outcome::ESTABLISHED {
                let rec = SocketRecord {
                    start_ns: 0,
                    established_ns: now,
                    owner,
                    error: 0,
                    _pad: 0,
                };
                k.follow(sk, &rec);
            }
            (owner, 0, 0)
        }
    };
    // A connect that fails has `sk_err` set, unless its error came while the application held
    // the socket (a non-blocking connect's ICMP error): then only the error report saw it.
    let sk_err = if result == outcome::FAILED {
        match k.read::<i32>(sk, offset!(sk_err))? as u32 {
            0 => reported_error,
            err => err,
        }
    } else {
        0
    };
    let tcp = k.tcp(sk)?;
    let event = ConnectEvent {
        header: header(EventKind::Connect, now),
        endpoints: endpoints(k, sk)?,
        owner,
        latency_ns,
        sk_err,
        syn_retransmits: k.read::<u32>(tcp, offset!(tcp_total_retrans))?,
        outcome: result,
        _pad: [0; 7],
    };
    emit(EventKind::Connect, event);
    Ok(())
}

/// A child socket of a listener appears in SYN_RECV when the handshake's last ACK arrives, in
/// softirq context: its owner is the process that listens on its port.
#[inline(never)]
fn start_accept<K: Kernel>(k: K, sk: u64) -> Result<(), i32> {
    let rec = SocketRecord {
        start_ns: now_ns(),
        established_ns: 0,
        owner: listener_owner(k, sk, local_port(k, sk)?)?,
        error: 0,
        _pad: 0,
    };
    k.follow(sk, &rec);
    Ok(())
}

/// SYN_RECV -> ESTABLISHED: an accepted connection. The handshake is timed on the side that
/// starts it, so the server's connect carries no latency.
#[inline(never)]
fn accepted<K: Kernel>(k: K, sk: u64) -> Result<(), i32> {
    let now = now_ns();
    let owner = match k.record(sk) {
        Some(rec) => {
            // SAFETY: as in end_connect.
            let rec = unsafe { &mut *rec };
            rec.established_ns = now;
            rec.owner
        }
        None => {
            let owner = listener_owner(k, sk, local_port(k, sk)?)?;
            let rec = SocketRecord {
                start_ns: 0,
                established_ns: now,
                owner,
                error: 0,
                _pad: 0,
            };
            k.follow(sk, &rec);
            owner
        }
    };
    let event = ConnectEvent {
        header: header(EventKind::Connect, now),
        endpoints: endpoints(k, sk)?,
        owner,
        latency_ns: 0,
        sk_err: 0,
        syn_retransmits: 0,
        outcome: outcome::ESTABLISHED,
        _pad: [0; 7],
    };
    emit(EventKind::Connect, event);
    Ok(())
}

/// A connection that got past the handshake reaches CLOSE: its lifetime and counters.
#[inline(never)]
fn closed<K: Kernel>(k: K, sk: u64) -> Result<(), i32> {
    let now = now_ns();
    let (mut owner, established_ns) = match k.record(sk) {
        // SAFETY: as in end_connect; copied out at once.
        Some(rec) => unsafe { ((*rec).owner, (*rec).established_ns) },
        None => (unknown_owner(side::UNKNOWN), 0),
    };
    let duration_ns = if established_ns != 0 {
        owner.flags |= owner_flags::START_KNOWN;
        now.saturating_sub(established_ns)
    } else {
        owner.flags &= !owner_flags::START_KNOWN;
        0
    };
    let tcp = k.tcp(sk)?;
    let event = CloseEvent {
        header: header(EventKind::Close, now),
        endpoints: endpoints(k, sk)?,
        owner,
        duration_ns,
        bytes_sent: k.read::<u64>(tcp, offset!(tcp_bytes_sent))?,
        bytes_received: payload_bytes_received(k, sk)?,
        segments_sent: k.read::<u32>(tcp, offset!(tcp_data_segs_out))?,
        segments_retransmitted: k.read::<u32>(tcp, offset!(tcp_total_retrans))?,
    };
    emit(EventKind::Close, event);
    Ok(())
}

#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn tcp_destroy_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    Typed.forget(sk);
    0
}

#[tracepoint]
pub fn tcp_destroy_tp(ctx: TracePointContext) -> u32 {
    finish(&ctx, "tcp_destroy_sock", try_tcp_destroy_tp(&ctx))
}

/// The socket is gone: its record goes too. Records live until here rather than until CLOSE
/// because an abortive close sends its reset after the socket reached CLOSE. Only needed for
/// the LRU hash: socket storage goes with the socket.
fn try_tcp_destroy_tp(ctx: &TracePointContext) -> Result<(), i32> {
    let sk: u64 = unsafe { ctx.read_at(offset!(tp_destroy_skaddr))? };
    Raw.forget(sk);
    Ok(())
}
