//! Resets sent and received (probe-ebpf `tcp_reset`), with the kernel's reason for each reset
//! this host sent: a port with no listener (for every client style), a server that aborts an
//! established connection, and one that closes with data it never read.
use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::Value;
use tests::{
    Agent, Lab, assert_exactly,
    clients::{self, ClientStyle, Seen},
    events::{self, Flow, Listener, Opener},
    expect::lab_events_without_drops,
    socket,
    traffic::{self, serve},
};

const CLIENT: Opener<'static> = Opener::thread("lab-client");

/// A SYN to a port nobody listens on, from every client style: the server's kernel answers with
/// a RST that belongs to no socket (state null, no owner, reason NO_SOCKET); each connect is
/// refused. Kernels before 6.10 send that RST without firing `tcp_send_reset`: there the agent
/// says so at start and logs only the client's side.
fn no_listener(
    lab: &Lab,
    client_ip: IpAddr,
    server_ip: IpAddr,
    agent_args: &[&str],
    reason: Value,
) -> anyhow::Result<()> {
    let server = SocketAddr::new(server_ip, 8086);
    let before = lab.server_counters();
    let agent = Agent::start_with_args(agent_args)?;
    let mut runs = Vec::new();
    for style in ClientStyle::ALL {
        runs.push(clients::connect(lab, style, client_ip, server, None)?);
    }
    lab.settle(Duration::from_secs(5))?;
    let said = agent.stderr_text();
    let log = agent.stop()?;
    let traced = events::socketless_resets_traced();
    assert_eq!(
        said.contains(events::SOCKETLESS_RESETS_MISSING),
        !traced,
        "whether the agent reports at start that this kernel does not trace socketless resets; \
         its stderr:\n{said}"
    );
    for run in &runs {
        assert_eq!(run.seen, Seen::Failed(libc::ECONNREFUSED), "{run:?}");
    }
    let rsts = lab.server_counters().out_rsts - before.out_rsts;
    assert_eq!(
        rsts,
        runs.len() as u64,
        "the server namespace's TcpOutRsts delta"
    );

    let mut expected = Vec::new();
    for run in &runs {
        let flow = Flow {
            client: run.local,
            server,
        };
        let opener = run.opener();
        expected.extend([
            events::client_failed(flow, opener, "refused", Some("ECONNREFUSED"), 0),
            events::client_reset_received(flow, opener, "SYN_SENT"),
        ]);
        if traced {
            expected.push(events::server_reset_sent_socketless(flow, reason.clone()));
        }
    }
    assert_exactly(&lab_events_without_drops(lab, &log), &expected);
    Ok(())
}

const DEFAULT_HOOKS: &[&str] = &["--no-metrics"];

#[test]
fn no_listener_ipv4() -> anyhow::Result<()> {
    let lab = Lab::new(21)?;
    let reason = events::sent_reset_reason("NO_SOCKET");
    no_listener(
        &lab,
        lab.client_v4().into(),
        lab.server_v4().into(),
        DEFAULT_HOOKS,
        reason,
    )
}

#[test]
fn no_listener_ipv6() -> anyhow::Result<()> {
    let lab = Lab::new(22)?;
    let reason = events::sent_reset_reason("NO_SOCKET");
    no_listener(
        &lab,
        lab.client_v6().into(),
        lab.server_v6().into(),
        DEFAULT_HOOKS,
        reason,
    )
}

/// The BTF programs written for older kernels' tracepoints (`tcp_send_reset` without `reason`,
/// before 6.10), forced on whatever kernel runs the tests: the same events, with no reason.
#[test]
fn no_listener_older_btf_programs() -> anyhow::Result<()> {
    let lab = Lab::new(34)?;
    no_listener(
        &lab,
        lab.client_v4().into(),
        lab.server_v4().into(),
        &["--no-metrics", "--hooks", "btf-older"],
        Value::Null,
    )
}

/// Reads the client's greeting, then closes with `SO_LINGER {1, 0}`: a RST instead of a FIN.
fn abort(mut stream: TcpStream) -> io::Result<()> {
    let mut greeting = [0u8; 5];
    stream.read_exact(&mut greeting)?;
    socket::set_linger_zero(&stream);
    Ok(())
}

/// Closes without reading the greeting the client sent: the kernel resets the connection
/// instead of closing it, and says why (TCP_ABORT_ON_CLOSE).
fn close_unread(stream: TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 1];
    // Wait until the greeting is there, without taking it.
    stream.peek(&mut buf)?;
    Ok(())
}

/// A server that resets an established connection: the client receives the reset in
/// ESTABLISHED, the server sends it with the kernel's `reason` and names its owner.
fn server_resets(
    lab: &Lab,
    port: u16,
    handle: fn(TcpStream) -> io::Result<()>,
    sent_in: &str,
    reason: &str,
) -> anyhow::Result<()> {
    let (client_ip, server) = (
        IpAddr::from(lab.client_v4()),
        SocketAddr::new(lab.server_v4().into(), port),
    );
    let listener = serve(lab, server, 1, handle);
    let owner = Listener::process();
    let agent = Agent::start()?;
    let (local, read) = lab
        .client(CLIENT.comm, move || {
            let attempt = socket::connect(client_ip, server, None);
            let mut stream = attempt.result.expect("connect");
            traffic::limit_io(&stream);
            stream.write_all(b"hello").expect("greeting");
            let mut buf = [0u8; 16];
            (attempt.local, stream.read(&mut buf).map_err(|e| e.kind()))
        })
        .join()
        .expect("client thread");
    listener.join().expect("server thread");
    assert_eq!(
        read,
        Err(io::ErrorKind::ConnectionReset),
        "the client's read after the abort"
    );
    lab.settle(Duration::from_secs(5))?;
    let log = agent.stop()?;

    let flow = Flow {
        client: local,
        server,
    };
    assert_exactly(
        &lab_events_without_drops(lab, &log),
        &[
            events::client_established(flow, CLIENT, 0),
            events::server_established(flow, &owner),
            events::client_reset_received(flow, CLIENT, "ESTABLISHED"),
            events::server_reset_sent(flow, &owner, sent_in, reason),
            events::client_close(flow, CLIENT),
            events::server_close(flow, &owner),
        ],
    );
    Ok(())
}

/// `close()` with a zero linger moves the socket to CLOSE before it sends the RST
/// (tcp_disconnect), so the tracepoint sees CLOSE; the kernel calls the reason TCP_STATE.
#[test]
fn server_resets_mid_stream() -> anyhow::Result<()> {
    let lab = Lab::new(23)?;
    server_resets(&lab, 8087, abort, "CLOSE", "TCP_STATE")
}

/// Unread data at `close()`: the kernel resets the connection (RFC 2525) and calls it
/// TCP_ABORT_ON_CLOSE, which the `local_resets` verdict then reports as a fact.
#[test]
fn server_closes_with_unread_data() -> anyhow::Result<()> {
    let lab = Lab::new(33)?;
    server_resets(&lab, 8088, close_unread, "CLOSE", "TCP_ABORT_ON_CLOSE")
}
