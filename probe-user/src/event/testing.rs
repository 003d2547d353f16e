//! Builders of events for the unit tests of every consumer: one vocabulary, so a test reads as
//! the scenario it sets up.
use std::time::{Duration, SystemTime};

use super::*;

/// Seconds after a fixed epoch (2026-11-18T11:06:40Z), at millisecond precision (what a
/// log keeps exactly).
pub(crate) fn at(secs: f64) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::from_secs(1_795_000_000)
        + Duration::from_millis((secs * 1000.0).round() as u64)
}

/// This host's end of its client connections.
pub(crate) const LOCAL: &str = "10.9.9.9:40000";
/// The remote end of connections to this host's services.
pub(crate) const PEER: &str = "10.7.7.7:51000";

/// An event owned by pid 42 (`app`).
pub(crate) fn event(
    side: Option<Side>,
    src: &str,
    dst: &str,
    time: SystemTime,
    detail: EventDetail,
) -> Event {
    Event {
        seq: 0,
        time,
        process: Some(Process {
            pid: 42,
            comm: Comm::from_str_lossy("app"),
        }),
        side,
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        detail,
        workload: None,
        backend: None,
    }
}

/// An event of a connection this host opened to `dest`.
pub(crate) fn client(dest: &str, time: SystemTime, detail: EventDetail) -> Event {
    event(Some(Side::Client), LOCAL, dest, time, detail)
}

pub(crate) fn established(latency_us: u64) -> EventDetail {
    EventDetail::Connect(Connect {
        outcome: ConnectOutcome::Established,
        latency: Some(Duration::from_micros(latency_us)),
        syn_retransmits: 0,
        dst_name: None,
    })
}

/// A failed connect with the errno its reason goes with, after waiting a second per SYN
/// retransmit.
pub(crate) fn failed(reason: FailureReason, syn_retransmits: u32) -> EventDetail {
    let errno = match reason {
        FailureReason::Refused => Some(libc::ECONNREFUSED),
        FailureReason::Timeout => Some(libc::ETIMEDOUT),
        FailureReason::Unreachable => Some(libc::EHOSTUNREACH),
        FailureReason::Cancelled => None,
        FailureReason::Other => Some(libc::EPROTO),
    };
    EventDetail::Connect(Connect {
        outcome: ConnectOutcome::Failed {
            reason,
            errno: errno.map(Errno::of),
        },
        latency: Some(Duration::from_millis(1000 * u64::from(syn_retransmits) + 1)),
        syn_retransmits,
        dst_name: None,
    })
}

pub(crate) fn retransmitted(state: TcpState, segments: u32) -> EventDetail {
    EventDetail::Retransmit(Retransmit { state, segments })
}

pub(crate) fn reset(
    direction: Direction,
    state: Option<TcpState>,
    reason: Option<&str>,
) -> EventDetail {
    EventDetail::Reset(Reset {
        direction,
        state,
        reason: reason.map(ResetReason::new),
    })
}

pub(crate) fn closed(sent: u32, retransmitted: u32) -> EventDetail {
    EventDetail::Close(Close {
        duration: Some(Duration::from_millis(200)),
        bytes_sent: u64::from(sent) * 1000,
        bytes_received: 1000,
        segments_sent: sent,
        segments_retransmitted: retransmitted,
    })
}

pub(crate) fn connect_ok(dest: &str, time: SystemTime, latency_us: u64) -> Event {
    client(dest, time, established(latency_us))
}

pub(crate) fn connect_failed(
    dest: &str,
    time: SystemTime,
    reason: FailureReason,
    syn_retransmits: u32,
) -> Event {
    client(dest, time, failed(reason, syn_retransmits))
}

pub(crate) fn close(dest: &str, time: SystemTime, sent: u32, retransmitted: u32) -> Event {
    client(dest, time, closed(sent, retransmitted))
}

pub(crate) fn retransmit(dest: &str, time: SystemTime, state: TcpState, segments: u32) -> Event {
    client(dest, time, retransmitted(state, segments))
}

pub(crate) fn reset_received(dest: &str, time: SystemTime, state: TcpState) -> Event {
    client(dest, time, reset(Direction::Received, Some(state), None))
}

/// A reset this host's service at `local` sends to a client.
pub(crate) fn reset_sent_by_service(
    local: &str,
    time: SystemTime,
    side: Option<Side>,
    state: Option<TcpState>,
) -> Event {
    event(side, local, PEER, time, reset(Direction::Sent, state, None))
}

/// A reset this host's service at `local` sends with the kernel's `reason` (Linux 6.10 and
/// later).
pub(crate) fn reset_sent_for_reason(
    local: &str,
    time: SystemTime,
    state: Option<TcpState>,
    reason: &str,
) -> Event {
    let detail = reset(Direction::Sent, state, Some(reason));
    event(Some(Side::Server), local, PEER, time, detail)
}

/// A connection this host's service at `local` accepted.
pub(crate) fn accepted(local: &str, time: SystemTime) -> Event {
    let detail = EventDetail::Connect(Connect {
        outcome: ConnectOutcome::Established,
        latency: None,
        syn_retransmits: 0,
        dst_name: None,
    });
    event(Some(Side::Server), local, PEER, time, detail)
}

/// `event` owned by process `pid` named `comm`, or by no known process (`pid` 0).
pub(crate) fn owned_by(mut event: Event, pid: u32, comm: &str) -> Event {
    event.process = (pid != 0).then(|| Process {
        pid,
        comm: Comm::from_str_lossy(comm),
    });
    event
}

/// A `flags` segment of a connection this host opened to `dest`, dropped for `reason` as it left
/// (`Sent`) or arrived (`Received`); `local_port` is the connect's.
pub(crate) fn dropped(
    dest: &str,
    local_port: u16,
    time: SystemTime,
    reason: &str,
    flags: u8,
    direction: Direction,
) -> Event {
    let mut local: Endpoint = LOCAL.parse().unwrap();
    local = Endpoint::new(local.ip(), local_port);
    let mut e = client(
        dest,
        time,
        EventDetail::Drop(Drop {
            reason: DropReason::new(reason),
            protocol: Protocol::Tcp,
            tcp_flags: Some(TcpFlags(flags)),
            direction,
            packets: 1,
        }),
    );
    e.src = local;
    e
}

/// A connect from `local_port` to `dest` that failed for `reason`.
pub(crate) fn connect_failed_from(
    dest: &str,
    local_port: u16,
    time: SystemTime,
    reason: FailureReason,
    syn_retransmits: u32,
) -> Event {
    let mut e = connect_failed(dest, time, reason, syn_retransmits);
    e.src = Endpoint::new(e.src.ip(), local_port);
    e
}

/// `packets` data segments of a connection to `dest` dropped for `reason`, counted.
pub(crate) fn data_dropped(dest: &str, time: SystemTime, reason: &str, packets: u64) -> Event {
    client(
        dest,
        time,
        EventDetail::Drop(Drop {
            reason: DropReason::new(reason),
            protocol: Protocol::Tcp,
            tcp_flags: None,
            direction: Direction::Sent,
            packets,
        }),
    )
}

/// The listener at `local` overflowed `overflows` times.
pub(crate) fn overflowed(
    local: &str,
    time: SystemTime,
    overflows: u64,
    backlog: Option<u32>,
) -> Event {
    event(
        Some(Side::Server),
        local,
        "0.0.0.0:0",
        time,
        EventDetail::ListenOverflow(ListenOverflow {
            overflows,
            backlog,
            queued: backlog.map_or(1, |b| b + 1),
        }),
    )
}

/// Conntrack of namespace 1 dropped `drop` packets and failed `insert_failed` inserts.
pub(crate) fn conntrack(time: SystemTime, insert_failed: u64, drop: u64) -> Event {
    Event::namespace_sample(
        time,
        EventDetail::Conntrack(Conntrack {
            netns: 1,
            insert_failed,
            drop,
            early_drop: 0,
        }),
    )
}
