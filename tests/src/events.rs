//! The events a scenario expects, in the terms of the agent's JSON schema (see probe-user's
//! `export/json_log.rs`). `src` is always the reporting host's end: the client's events go from
//! the client's address, the server's from the server's.
use std::net::SocketAddr;

use serde_json::{Value, json};

use crate::{Check, Pattern};

/// One connection's two ends.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// The process that opened a connection: this test process on a thread named `comm`, or
/// another program (curl) with its own pid.
#[derive(Clone, Copy, Debug)]
pub struct Opener<'a> {
    pub comm: &'a str,
    /// `None`: this test process.
    pub pid: Option<u32>,
}

impl<'a> Opener<'a> {
    /// A thread of this test process named `comm`.
    pub const fn thread(comm: &'a str) -> Self {
        Opener { comm, pid: None }
    }

    fn owner(self) -> Value {
        let pid = self.pid.unwrap_or_else(std::process::id);
        json!({"pid": pid, "comm": self.comm, "side": "client"})
    }
}

/// The process that owns a server's listening socket, as the agent names it.
#[derive(Clone, Debug)]
pub struct Listener {
    pub pid: u32,
    pub comm: String,
}

impl Listener {
    /// A listener opened after the agent started, by a thread of this test process named `comm`:
    /// the agent sees the `listen()` call and takes the thread's name.
    pub fn thread(comm: &str) -> Self {
        Listener {
            pid: std::process::id(),
            comm: comm.to_owned(),
        }
    }

    /// A listener older than the agent: found in /proc at start-up, named like the process (its
    /// main thread's name, as `ss -p` shows it).
    pub fn process() -> Self {
        let comm = std::fs::read_to_string("/proc/self/comm").expect("read /proc/self/comm");
        Listener {
            pid: std::process::id(),
            comm: comm.trim_end().to_owned(),
        }
    }

    fn owner(&self) -> Value {
        json!({"pid": self.pid, "comm": self.comm, "side": "server"})
    }
}

/// The reset reason the agent reports for a reset this host sent: the kernel's name on kernels
/// that give one (Linux 6.10 and later), null before.
pub fn sent_reset_reason(name: &str) -> Value {
    if kernel_at_least(6, 10) {
        Value::from(name)
    } else {
        Value::Null
    }
}

/// Whether the kernel traces the resets it sends without a socket (a SYN to a port nobody listens
/// on): `tcp:tcp_send_reset` fires for them since Linux 6.10, together with its `reason`. Before,
/// the agent says so at start (see [`SOCKETLESS_RESETS_MISSING`]) and such resets are not logged.
pub fn socketless_resets_traced() -> bool {
    kernel_at_least(6, 10)
}

/// What the agent says at start on a kernel that neither traces socketless resets nor gives
/// reset reasons.
pub const SOCKETLESS_RESETS_MISSING: &str = "resets sent without a socket";

/// Whether the running kernel is at least `major.minor`.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let running = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    running >= (major, minor)
}

fn ends(from: SocketAddr, to: SocketAddr) -> Value {
    json!({
        "src_ip": from.ip().to_string(), "src_port": from.port(),
        "dst_ip": to.ip().to_string(), "dst_port": to.port(),
    })
}

fn client_side(flow: Flow, opener: Opener<'_>, fields: Value) -> Value {
    merge([ends(flow.client, flow.server), opener.owner(), fields])
}

/// The server's events carry the listener's owner.
fn server_side(flow: Flow, listener: &Listener, fields: Value) -> Value {
    merge([ends(flow.server, flow.client), listener.owner(), fields])
}

fn merge<const N: usize>(parts: [Value; N]) -> Value {
    let mut all = serde_json::Map::new();
    for part in parts {
        let Value::Object(map) = part else {
            unreachable!()
        };
        all.extend(map);
    }
    Value::Object(all)
}

pub fn client_established(flow: Flow, opener: Opener<'_>, syn_retransmits: u32) -> Pattern {
    Pattern::new(
        "client connect established",
        client_side(
            flow,
            opener,
            json!({"type": "connect", "outcome": "established", "reason": null, "errno": null,
                   "syn_retransmits": syn_retransmits}),
        ),
    )
    .check("latency_us", Check::Positive)
}

/// A client connect that got established after any number of SYN retransmits.
pub fn client_established_any_retries(flow: Flow, opener: Opener<'_>) -> Pattern {
    Pattern::new(
        "client connect established",
        client_side(
            flow,
            opener,
            json!({"type": "connect", "outcome": "established", "reason": null, "errno": null}),
        ),
    )
    .check("latency_us", Check::Positive)
    .check("syn_retransmits", Check::AtLeast(0))
}

pub fn server_established(flow: Flow, listener: &Listener) -> Pattern {
    Pattern::new(
        "server connect (accepted)",
        server_side(
            flow,
            listener,
            json!({"type": "connect", "outcome": "established", "reason": null, "errno": null,
                   "latency_us": null}),
        ),
    )
    .check("syn_retransmits", Check::Any)
}

pub fn client_failed(
    flow: Flow,
    opener: Opener<'_>,
    reason: &str,
    errno: Option<&str>,
    syn_retransmits: u32,
) -> Pattern {
    Pattern::new(
        format!("client connect failed ({reason})"),
        client_side(
            flow,
            opener,
            json!({"type": "connect", "outcome": "failed", "reason": reason, "errno": errno,
                   "syn_retransmits": syn_retransmits}),
        ),
    )
    .check("latency_us", Check::Any)
}

pub fn client_close(flow: Flow, opener: Opener<'_>) -> Pattern {
    Pattern::new(
        "client close",
        client_side(flow, opener, json!({"type": "close"})),
    )
    .check("duration_ms", Check::Any)
    .check("bytes_sent", Check::Any)
    .check("bytes_received", Check::Any)
    .check("segments_sent", Check::Any)
    .check("segments_retransmitted", Check::Any)
}

pub fn server_close(flow: Flow, listener: &Listener) -> Pattern {
    Pattern::new(
        "server close",
        server_side(flow, listener, json!({"type": "close"})),
    )
    .check("duration_ms", Check::Any)
    .check("bytes_sent", Check::Any)
    .check("bytes_received", Check::Any)
    .check("segments_sent", Check::Any)
    .check("segments_retransmitted", Check::Any)
}

pub fn client_reset_received(flow: Flow, opener: Opener<'_>, state: &str) -> Pattern {
    Pattern::new(
        format!("client reset received in {state}"),
        client_side(
            flow,
            opener,
            json!({"type": "reset", "direction": "received", "state": state,
                   "reset_reason": null}),
        ),
    )
}

/// A reset an open server socket sent, with the kernel's reason (see [`sent_reset_reason`]).
pub fn server_reset_sent(flow: Flow, listener: &Listener, state: &str, reason: &str) -> Pattern {
    Pattern::new(
        format!("server reset sent in {state}"),
        server_side(
            flow,
            listener,
            json!({"type": "reset", "direction": "sent", "state": state,
                   "reset_reason": sent_reset_reason(reason)}),
        ),
    )
}

/// A reset the server's kernel sent for a SYN to a port nobody listens on: no socket, so no
/// state and no owner. `reason`: what the agent reports, e.g. `sent_reset_reason("NO_SOCKET")`.
pub fn server_reset_sent_socketless(flow: Flow, reason: Value) -> Pattern {
    Pattern::new(
        "server reset sent without a socket",
        merge([
            ends(flow.server, flow.client),
            json!({"pid": null, "comm": null, "side": "server", "type": "reset",
                   "direction": "sent", "state": null, "reset_reason": reason}),
        ]),
    )
}

/// A SYN the client resent (phase `syn`, state SYN_SENT, one segment).
pub fn client_syn_retransmit(flow: Flow, opener: Opener<'_>) -> Pattern {
    Pattern::new(
        "client SYN retransmit",
        client_side(
            flow,
            opener,
            json!({"type": "retransmit", "phase": "syn", "state": "SYN_SENT", "segments": 1}),
        ),
    )
}
