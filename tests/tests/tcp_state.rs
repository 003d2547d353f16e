//! Connect outcomes and connection lifetimes (probe-ebpf `tcp_state`): established connects,
//! refused, unreachable, kernel and application timeouts, over IPv4 and IPv6.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tests::{
    Agent, Lab, assert_exactly,
    events::{self, Flow, Opener},
    expect::lab_events,
    socket::{self, Attempt},
    traffic::{self, serve},
};

const CLIENT: Opener<'static> = Opener { comm: "lab-client" };

/// Makes `count` connects from the client namespace to `server` (one after another) and exchanges
/// a message on each; returns every connect's local address.
fn connect_and_echo(
    lab: &Lab,
    client_ip: IpAddr,
    server: SocketAddr,
    count: usize,
) -> Vec<SocketAddr> {
    lab.client(CLIENT.comm, move || {
        (0..count)
            .map(|i| {
                let Attempt { local, result } = socket::connect(client_ip, server, None);
                let stream = result.unwrap_or_else(|e| panic!("connect {local} -> {server}: {e}"));
                let message = format!("hello {i}");
                let reply = traffic::exchange(stream, message.as_bytes()).expect("echo");
                assert_eq!(reply, message.as_bytes());
                local
            })
            .collect()
    })
    .join()
    .expect("client thread")
}

/// One connect from the client namespace, made on a thread named [`CLIENT`].
fn connect_once(
    lab: &Lab,
    client_ip: IpAddr,
    server: SocketAddr,
    timeout: Option<Duration>,
) -> Attempt {
    lab.client(CLIENT.comm, move || {
        socket::connect(client_ip, server, timeout)
    })
    .join()
    .expect("client thread")
}

/// The agent with the default hooks (BTF tracepoints here), or with `--hooks classic`.
#[derive(Clone, Copy)]
enum Hooks {
    Default,
    Classic,
}

fn start_agent(hooks: Hooks) -> anyhow::Result<Agent> {
    match hooks {
        Hooks::Default => Agent::start(),
        Hooks::Classic => Agent::start_with_args(&["--no-metrics", "--hooks", "classic"]),
    }
}

fn established(
    lab: &Lab,
    client_ip: IpAddr,
    server_ip: IpAddr,
    count: usize,
    hooks: Hooks,
) -> anyhow::Result<()> {
    let server = SocketAddr::new(server_ip, 8080);
    let listener = serve(lab, server, count, traffic::echo);
    let agent = start_agent(hooks)?;
    let clients = connect_and_echo(lab, client_ip, server, count);
    let peers = listener.join().expect("server thread");
    assert_eq!(
        peers, clients,
        "the server saw other peers than the client made"
    );
    lab.settle(Duration::from_secs(10))?;
    let log = agent.stop()?;

    let mut expected = Vec::new();
    for &client in &clients {
        let flow = Flow { client, server };
        expected.push(events::client_established(flow, CLIENT, 0));
        expected.push(events::server_established(flow));
        expected.push(events::client_close(flow, CLIENT));
        expected.push(events::server_close(flow));
    }
    assert_exactly(&lab_events(lab, &log), &expected);
    Ok(())
}

#[test]
fn established_connects_ipv4() -> anyhow::Result<()> {
    let lab = Lab::new(11)?;
    established(
        &lab,
        lab.client_v4().into(),
        lab.server_v4().into(),
        5,
        Hooks::Default,
    )
}

#[test]
fn established_connects_ipv6() -> anyhow::Result<()> {
    let lab = Lab::new(12)?;
    established(
        &lab,
        lab.client_v6().into(),
        lab.server_v6().into(),
        3,
        Hooks::Default,
    )
}

/// The classic tracepoint fallback (tracefs format offsets instead of BTF arguments) reports
/// exactly the same events.
#[test]
fn established_connects_classic_tracepoints() -> anyhow::Result<()> {
    let lab = Lab::new(18)?;
    established(
        &lab,
        lab.client_v4().into(),
        lab.server_v4().into(),
        3,
        Hooks::Classic,
    )
}

/// A SYN answered by a RST (nftables `reject with tcp reset`): refused on the client, and the
/// RST logged as received in SYN_SENT. The RST comes from netfilter, not from a TCP socket, so
/// the server side logs nothing.
fn refused_by_rst(
    lab: &mut Lab,
    client_ip: IpAddr,
    server_ip: IpAddr,
    hooks: Hooks,
) -> anyhow::Result<()> {
    let server = SocketAddr::new(server_ip, 8081);
    lab.server_rule("tcp dport 8081 reject with tcp reset")?;
    let agent = start_agent(hooks)?;
    let attempt = connect_once(lab, client_ip, server, None);
    assert_eq!(attempt.errno(), Some(libc::ECONNREFUSED), "{attempt:?}");
    lab.settle(Duration::from_secs(5))?;
    let log = agent.stop()?;

    let flow = Flow {
        client: attempt.local,
        server,
    };
    assert_exactly(
        &lab_events(lab, &log),
        &[
            events::client_failed(flow, CLIENT, "refused", Some("ECONNREFUSED"), 0),
            events::client_reset_received(flow, CLIENT, "SYN_SENT"),
        ],
    );
    Ok(())
}

#[test]
fn refused_ipv4() -> anyhow::Result<()> {
    let mut lab = Lab::new(13)?;
    let (c, s) = (lab.client_v4().into(), lab.server_v4().into());
    refused_by_rst(&mut lab, c, s, Hooks::Default)
}

#[test]
fn refused_classic_tracepoints() -> anyhow::Result<()> {
    let mut lab = Lab::new(19)?;
    let (c, s) = (lab.client_v4().into(), lab.server_v4().into());
    refused_by_rst(&mut lab, c, s, Hooks::Classic)
}

#[test]
fn refused_ipv6() -> anyhow::Result<()> {
    let mut lab = Lab::new(14)?;
    let (c, s) = (lab.client_v6().into(), lab.server_v6().into());
    refused_by_rst(&mut lab, c, s, Hooks::Default)
}

/// An ICMP host-unreachable answer: the connect fails with EHOSTUNREACH. Over a veth the first
/// ICMP comes back while `connect()` still holds the socket lock, so the kernel only notes it as a
/// soft error; the ICMP answering the SYN resent after 1 s ends the connect (measured: 1.03 s,
/// one SYN retransmit). The client namespace's TcpRetransSegs says how many there were.
#[test]
fn unreachable() -> anyhow::Result<()> {
    let mut lab = Lab::new(15)?;
    let server = SocketAddr::new(lab.server_v4().into(), 8085);
    lab.server_rule("tcp dport 8085 reject with icmpx type host-unreachable")?;
    let before = lab.client_counters();
    let agent = Agent::start()?;
    let attempt = connect_once(&lab, lab.client_v4().into(), server, None);
    assert_eq!(attempt.errno(), Some(libc::EHOSTUNREACH), "{attempt:?}");
    lab.settle(Duration::from_secs(5))?;
    let log = agent.stop()?;
    let resent = lab.client_counters().retrans_segs - before.retrans_segs;
    assert!(
        resent <= 6,
        "{resent} SYN retransmits for an unreachable host"
    );

    let flow = Flow {
        client: attempt.local,
        server,
    };
    let mut expected = vec![events::client_failed(
        flow,
        CLIENT,
        "unreachable",
        Some("EHOSTUNREACH"),
        resent as u32,
    )];
    expected.extend((0..resent).map(|_| events::client_syn_retransmit(flow, CLIENT)));
    assert_exactly(&lab_events(&lab, &log), &expected);
    Ok(())
}

/// SYNs dropped and `tcp_syn_retries=1`: the kernel resends the SYN once (after 1 s) and gives
/// up (after 3 s) with ETIMEDOUT. Since Linux 6.7 `tcp_syn_linear_timeouts` (default 4) adds
/// SYN retransmits at a fixed 1 s interval on top (two here, at 1 s and 2 s); it is turned off so
/// that the count equals the setting.
#[test]
fn kernel_timeout() -> anyhow::Result<()> {
    let mut lab = Lab::new(16)?;
    let server = SocketAddr::new(lab.server_v4().into(), 8082);
    lab.server_rule("tcp dport 8082 drop")?;
    lab.client_sysctl("net.ipv4.tcp_syn_retries=1")?;
    lab.client_sysctl("net.ipv4.tcp_syn_linear_timeouts=0")?;
    let before = lab.client_counters();
    let agent = Agent::start()?;
    let attempt = connect_once(&lab, lab.client_v4().into(), server, None);
    assert_eq!(attempt.errno(), Some(libc::ETIMEDOUT), "{attempt:?}");
    lab.settle(Duration::from_secs(5))?;
    let log = agent.stop()?;
    let resent = lab.client_counters().retrans_segs - before.retrans_segs;
    assert_eq!(resent, 1, "the client namespace's TcpRetransSegs delta");

    let flow = Flow {
        client: attempt.local,
        server,
    };
    assert_exactly(
        &lab_events(&lab, &log),
        &[
            events::client_failed(flow, CLIENT, "timeout", Some("ETIMEDOUT"), 1),
            events::client_syn_retransmit(flow, CLIENT),
        ],
    );
    Ok(())
}

/// The application gives up first: a non-blocking connect polled for 1.5 s, then closed. The
/// kernel had resent the SYN once (at 1 s; the next would be at 3 s); the socket had no error.
#[test]
fn application_timeout() -> anyhow::Result<()> {
    let mut lab = Lab::new(17)?;
    let server = SocketAddr::new(lab.server_v4().into(), 8082);
    lab.server_rule("tcp dport 8082 drop")?;
    let agent = Agent::start()?;
    let attempt = connect_once(
        &lab,
        lab.client_v4().into(),
        server,
        Some(Duration::from_millis(1500)),
    );
    let err = attempt
        .result
        .as_ref()
        .expect_err("the connect must not succeed");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{attempt:?}");
    lab.settle(Duration::from_secs(5))?;
    let log = agent.stop()?;
    assert_eq!(
        lab.client_counters().retrans_segs,
        1,
        "SYN retransmits in the client namespace"
    );

    let flow = Flow {
        client: attempt.local,
        server,
    };
    assert_exactly(
        &lab_events(&lab, &log),
        &[
            events::client_failed(flow, CLIENT, "cancelled", None, 1),
            events::client_syn_retransmit(flow, CLIENT),
        ],
    );
    Ok(())
}
