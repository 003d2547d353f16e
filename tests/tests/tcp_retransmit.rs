//! Retransmits (probe-ebpf `tcp_retransmit`): bulk transfers through a path that drops 20% of the
//! client's packets. The kernel's own counters are the ground truth: the client's retransmit
//! events must add up to the client namespace's TcpRetransSegs less its TCPRetransFail (resends
//! whose transmit failed, counted before they were tried), and its close events'
//! `segments_retransmitted` to TcpRetransSegs; the same holds for the server.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde_json::json;
use tests::{
    Agent, Check, Lab, Pattern, assert_exactly,
    events::{self, Flow, Listener, Opener},
    expect::{assert_resent, lab_events_without_drops, sum},
    socket,
    traffic::{self, serve},
};

const CLIENT: Opener<'static> = Opener::thread("lab-client");
const CONNECTIONS: usize = 3;
const BYTES_EACH: usize = 2 << 20;

#[test]
fn lossy_path() -> anyhow::Result<()> {
    lossy(31, &["--no-metrics"])
}

/// The BTF program written for older kernels' `tcp_retransmit_skb` (no `err`, before 6.13),
/// forced on whatever kernel runs the tests: the same sums.
#[test]
fn lossy_path_older_btf_programs() -> anyhow::Result<()> {
    lossy(35, &["--no-metrics", "--hooks", "btf-older"])
}

fn lossy(subnet: u8, agent_args: &[&str]) -> anyhow::Result<()> {
    let mut lab = Lab::new(subnet)?;
    let client_ip = IpAddr::from(lab.client_v4());
    let server = SocketAddr::new(lab.server_v4().into(), 8083);
    lab.server_rule("tcp dport 8083 numgen random mod 100 < 20 drop")?;
    let listener = serve(&lab, server, CONNECTIONS, traffic::sink);
    let owner = Listener::process();
    let (client_before, server_before) = (lab.client_counters(), lab.server_counters());
    let agent = Agent::start_with_args(agent_args)?;
    let clients: Vec<SocketAddr> = lab
        .client(CLIENT.comm, move || {
            let payload = vec![0x5au8; BYTES_EACH];
            (0..CONNECTIONS)
                .map(|_| {
                    let attempt = socket::connect(client_ip, server, None);
                    let mut stream = attempt.result.expect("connect through the lossy path");
                    traffic::limit_io(&stream);
                    stream.write_all(&payload).expect("send");
                    stream
                        .shutdown(std::net::Shutdown::Write)
                        .expect("shutdown");
                    let mut count = [0u8; 8];
                    stream
                        .read_exact(&mut count)
                        .expect("the server's byte count");
                    assert_eq!(u64::from_be_bytes(count), BYTES_EACH as u64);
                    attempt.local
                })
                .collect()
        })
        .join()
        .expect("client thread");
    listener.join().expect("server thread");
    lab.settle(Duration::from_secs(30))?;
    let log = agent.stop()?;
    let (client_after, server_after) = (lab.client_counters(), lab.server_counters());
    // Retransmit events are resends handed on (TcpRetransSegs less TCPRetransFail); a close's
    // `segments_retransmitted` is the socket's `total_retrans`, which counts failed ones too.
    let client_resent = client_after.resent_since(&client_before);
    let server_resent = server_after.resent_since(&server_before);
    let client_tried = client_after.retrans_segs - client_before.retrans_segs;
    let server_tried = server_after.retrans_segs - server_before.retrans_segs;
    eprintln!(
        "TcpRetransSegs deltas: client {client_tried}, server {server_tried}; less \
         TCPRetransFail: client {client_resent}, server {server_resent}"
    );
    assert!(
        client_resent > 0,
        "20% loss made the client retransmit nothing"
    );

    let lab_log = lab_events_without_drops(&lab, &log);
    let client_retransmit = Pattern::new(
        "client retransmit",
        json!({"type": "retransmit", "side": "client", "src_ip": client_ip.to_string()}),
    );
    let server_retransmit = Pattern::new(
        "server retransmit",
        json!({"type": "retransmit", "src_ip": server.ip().to_string()}),
    );
    let client_close = Pattern::new(
        "client close",
        json!({"type": "close", "src_ip": client_ip.to_string()}),
    );
    let server_close = Pattern::new(
        "server close",
        json!({"type": "close", "src_ip": server.ip().to_string()}),
    );
    let stray: Vec<_> = lab_log
        .iter()
        .filter(|e| e["type"] == "retransmit")
        .filter(|e| !client_retransmit.matches(e) && !server_retransmit.matches(e))
        .collect();
    eprintln!("retransmit events that are neither the client's nor the server's: {stray:#?}");
    // Per client socket: its close's segments_retransmitted against its retransmit events.
    for close in lab_log.iter().filter(|e| client_close.matches(e)) {
        let port = &close["src_port"];
        let events: Vec<_> = lab_log
            .iter()
            .filter(|e| client_retransmit.matches(e) && e["src_port"] == *port)
            .collect();
        let segments: u64 = events.iter().filter_map(|e| e["segments"].as_u64()).sum();
        let by_state = events
            .iter()
            .fold(std::collections::BTreeMap::new(), |mut m, e| {
                *m.entry(e["state"].to_string()).or_insert(0u64) +=
                    e["segments"].as_u64().unwrap_or(0);
                m
            });
        eprintln!(
            "client port {port}: close says {} resent, {} events with {segments} segments {by_state:?}",
            close["segments_retransmitted"],
            events.len()
        );
    }
    let client_segments = sum(&lab_log, &client_retransmit, "segments");
    let client_closed = sum(&lab_log, &client_close, "segments_retransmitted");
    let server_segments = sum(&lab_log, &server_retransmit, "segments");
    let server_closed = sum(&lab_log, &server_close, "segments_retransmitted");
    eprintln!(
        "retransmit events' segments: client {client_segments}, server {server_segments}; \
         close events' segments_retransmitted: client {client_closed}, server {server_closed}"
    );
    assert_resent(
        client_segments,
        client_resent,
        "client retransmit segments vs TcpRetransSegs less TCPRetransFail",
    );
    assert_eq!(
        client_closed, client_tried,
        "client close segments_retransmitted vs TcpRetransSegs"
    );
    assert_resent(
        server_segments,
        server_resent,
        "server retransmit segments vs TcpRetransSegs less TCPRetransFail",
    );
    assert_eq!(
        server_closed, server_tried,
        "server close segments_retransmitted vs TcpRetransSegs"
    );

    // Besides the retransmits, exactly one connect and one close per side and connection.
    let mut expected = Vec::new();
    for &client in &clients {
        let flow = Flow { client, server };
        expected.push(events::client_established_any_retries(flow, CLIENT));
        expected.push(events::server_established(flow, &owner));
        expected.push(
            events::client_close(flow, CLIENT)
                .check("bytes_sent", Check::AtLeast(BYTES_EACH as u64)),
        );
        expected.push(
            events::server_close(flow, &owner)
                .check("bytes_received", Check::AtLeast(BYTES_EACH as u64)),
        );
    }
    let others: Vec<_> = lab_log
        .iter()
        .filter(|e| e["type"] != "retransmit")
        .cloned()
        .collect();
    assert_exactly(&others, &expected);
    // Every retransmit belongs to one of the connections, on its own side.
    let stray: Vec<_> = lab_log
        .iter()
        .filter(|e| e["type"] == "retransmit")
        .filter(|e| {
            !clients.iter().any(|&client| {
                let flow = Flow { client, server };
                retransmit_of(flow, &owner).iter().any(|p| p.matches(e))
            })
        })
        .collect();
    assert!(
        stray.is_empty(),
        "retransmits of no lab connection: {stray:#?}"
    );
    Ok(())
}

/// A retransmit on either side of `flow`, each with its owner.
fn retransmit_of(flow: Flow, owner: &Listener) -> [Pattern; 2] {
    [
        Pattern::new(
            "client retransmit",
            json!({"type": "retransmit", "side": "client", "pid": std::process::id(), "comm": CLIENT.comm,
                   "src_ip": flow.client.ip().to_string(), "src_port": flow.client.port(),
                   "dst_ip": flow.server.ip().to_string(), "dst_port": flow.server.port()}),
        )
        .check("segments", Check::Positive),
        Pattern::new(
            "server retransmit",
            json!({"type": "retransmit", "side": "server", "pid": owner.pid, "comm": owner.comm,
                   "src_ip": flow.server.ip().to_string(), "src_port": flow.server.port(),
                   "dst_ip": flow.client.ip().to_string(), "dst_port": flow.client.port()}),
        )
        .check("segments", Check::Positive),
    ]
}
