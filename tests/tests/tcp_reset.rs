//! Resets sent and received (probe-ebpf `tcp_reset`): a port with no listener, and a server that
//! aborts an established connection.
use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use tests::{
    Agent, Lab, assert_exactly,
    events::{self, Flow, Opener},
    expect::lab_events,
    socket,
    traffic::{self, serve},
};

const CLIENT: Opener<'static> = Opener { comm: "lab-client" };

/// A SYN to a port nobody listens on: the server's kernel answers with a RST that belongs to no
/// socket (state null, no owner); the client's connect is refused.
fn no_listener(lab: &Lab, client_ip: IpAddr, server_ip: IpAddr) -> anyhow::Result<()> {
    let server = SocketAddr::new(server_ip, 8086);
    let before = lab.server_counters();
    let agent = Agent::start()?;
    let attempt = lab
        .client(CLIENT.comm, move || {
            socket::connect(client_ip, server, None)
        })
        .join()
        .expect("client thread");
    assert_eq!(attempt.errno(), Some(libc::ECONNREFUSED), "{attempt:?}");
    lab.settle(Duration::from_secs(5))?;
    let log = agent.stop()?;
    let rsts = lab.server_counters().out_rsts - before.out_rsts;
    assert_eq!(rsts, 1, "the server namespace's TcpOutRsts delta");

    let flow = Flow {
        client: attempt.local,
        server,
    };
    assert_exactly(
        &lab_events(lab, &log),
        &[
            events::client_failed(flow, CLIENT, "refused", Some("ECONNREFUSED"), 0),
            events::client_reset_received(flow, CLIENT, "SYN_SENT"),
            events::server_reset_sent(flow, None),
        ],
    );
    Ok(())
}

#[test]
fn no_listener_ipv4() -> anyhow::Result<()> {
    let lab = Lab::new(21)?;
    no_listener(&lab, lab.client_v4().into(), lab.server_v4().into())
}

#[test]
fn no_listener_ipv6() -> anyhow::Result<()> {
    let lab = Lab::new(22)?;
    no_listener(&lab, lab.client_v6().into(), lab.server_v6().into())
}

/// Reads the client's greeting, then closes with `SO_LINGER {1, 0}`: a RST instead of a FIN.
fn abort(mut stream: TcpStream) -> io::Result<()> {
    let mut greeting = [0u8; 5];
    stream.read_exact(&mut greeting)?;
    socket::set_linger_zero(&stream);
    Ok(())
}

#[test]
fn server_resets_mid_stream() -> anyhow::Result<()> {
    let lab = Lab::new(23)?;
    let (client_ip, server) = (
        IpAddr::from(lab.client_v4()),
        SocketAddr::new(lab.server_v4().into(), 8087),
    );
    let listener = serve(&lab, server, 1, abort);
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
        &lab_events(&lab, &log),
        &[
            events::client_established(flow, CLIENT, 0),
            events::server_established(flow),
            events::client_reset_received(flow, CLIENT, "ESTABLISHED"),
            // `close()` with a zero linger moves the socket to CLOSE before it sends the RST
            // (tcp_disconnect), so the tracepoint sees CLOSE.
            events::server_reset_sent(flow, Some("CLOSE")),
            events::client_close(flow, CLIENT),
            events::server_close(flow),
        ],
    );
    Ok(())
}
