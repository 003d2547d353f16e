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

/// The process that opened a connection: this test process, on a thread named `comm`.
#[derive(Clone, Copy, Debug)]
pub struct Opener<'a> {
    pub comm: &'a str,
}

impl Opener<'_> {
    fn owner(self) -> Value {
        json!({"pid": std::process::id(), "comm": self.comm, "side": "client"})
    }
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

/// The server's events carry no owner: the agent saw no syscall of the server for them.
fn server_side(flow: Flow, fields: Value) -> Value {
    merge([
        ends(flow.server, flow.client),
        json!({"pid": null, "comm": null, "side": "server"}),
        fields,
    ])
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

pub fn server_established(flow: Flow) -> Pattern {
    Pattern::new(
        "server connect (accepted)",
        server_side(
            flow,
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

pub fn server_close(flow: Flow) -> Pattern {
    Pattern::new("server close", server_side(flow, json!({"type": "close"})))
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
            json!({"type": "reset", "direction": "received", "state": state}),
        ),
    )
}

/// A reset the server sent; `state` null for a socketless RST (no listener on the port).
pub fn server_reset_sent(flow: Flow, state: Option<&str>) -> Pattern {
    Pattern::new(
        "server reset sent",
        server_side(
            flow,
            json!({"type": "reset", "direction": "sent", "state": state}),
        ),
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
