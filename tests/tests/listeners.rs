//! The server's process (probe-ebpf `listeners`, probe-user `listeners`): accepted connections
//! carry the process that owns the listening socket, whether it started listening after the
//! agent (seen in `listen()`) or before (found in /proc at start-up), for real server shapes: a
//! pre-forked server whose workers accept on the parent's socket (nginx, gunicorn, Apache
//! prefork), and independent processes sharing a port with SO_REUSEPORT.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tests::{
    Agent, Lab, Pattern, assert_exactly,
    events::{self, Flow, Opener},
    expect::lab_events_without_drops,
    socket,
};

const CLIENT: Opener<'static> = Opener::thread("lab-client");

/// A Python server in the server namespace. `prefork`: the parent binds and listens, then forks
/// two workers that accept on its socket. Otherwise it listens itself with SO_REUSEPORT. Each
/// accepted connection gets one read and a close. It says `listening` when it listens and stops
/// when its stdin closes (or after 60 s).
const SERVER: &str = r#"
import os, socket, sys, threading
addr, port, prefork = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "prefork"
family = socket.AF_INET6 if ":" in addr else socket.AF_INET
listener = socket.socket(family, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if not prefork:
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
listener.bind((addr, port))
listener.listen(16)

def serve():
    listener.settimeout(60)
    try:
        while True:
            conn, _ = listener.accept()
            conn.recv(16)
            conn.close()
    except OSError:
        pass
    os._exit(0)

workers = []
if prefork:
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            serve()
        workers.append(pid)
else:
    threading.Thread(target=serve, daemon=True).start()
print("listening", flush=True)
sys.stdin.read()
for pid in workers:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
"#;

/// A running lab server process; killed (with its workers) on drop.
struct PythonServer {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl PythonServer {
    fn start(lab: &Lab, addr: SocketAddr, shape: &str) -> anyhow::Result<Self> {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                lab.server_ns().name(),
                "python3",
                "-c",
                SERVER,
            ])
            .args([&addr.ip().to_string(), &addr.port().to_string(), shape])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot run python3 (Debian package python3)")?;
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout is piped")).read_line(&mut line)?;
        if line.trim() != "listening" {
            bail!("the python server said {line:?} instead of `listening`");
        }
        Ok(PythonServer { child, stdin })
    }

    /// The parent's pid (`ip netns exec` execs python3 in the same process).
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the python server exited with {status}");
        }
        Ok(())
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if self.child.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(200));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Makes `count` connects to `server`, each sending a byte and waiting for the close.
fn connect_and_send(
    lab: &Lab,
    client_ip: IpAddr,
    server: SocketAddr,
    count: usize,
) -> Vec<SocketAddr> {
    lab.client(CLIENT.comm, move || {
        (0..count)
            .map(|_| {
                let attempt = socket::connect(client_ip, server, None);
                let mut stream = attempt.result.expect("connect");
                tests::traffic::limit_io(&stream);
                stream.write_all(b"x").expect("send");
                let mut rest = Vec::new();
                let _ = std::io::Read::read_to_end(&mut stream, &mut rest);
                attempt.local
            })
            .collect()
    })
    .join()
    .expect("client thread")
}

/// The server side's events of one connection, owned by one of `pids` named `comm`.
fn server_events(flow: Flow, pids: &[u32], comm: &str, log: &[Value]) -> Vec<Value> {
    let mine = |e: &&Value| {
        e["side"] == "server"
            && e["src_port"] == flow.server.port()
            && e["dst_port"] == flow.client.port()
    };
    let events: Vec<Value> = log.iter().filter(mine).cloned().collect();
    for event in &events {
        let pid = event["pid"].as_u64().unwrap_or(0) as u32;
        assert!(
            pids.contains(&pid) && event["comm"] == comm,
            "server event not owned by {comm} {pids:?}: {event}"
        );
    }
    events
}

/// Every connection shows up as an established connect and a close on each side, the server's
/// owned by the listener's process.
fn expect_owned(
    lab: &Lab,
    log: &[Value],
    server: SocketAddr,
    clients: &[SocketAddr],
    pids: &[u32],
) {
    let lab_log = lab_events_without_drops(lab, log);
    let mut expected = Vec::new();
    for &client in clients {
        let flow = Flow { client, server };
        let server_side = server_events(flow, pids, "python3", &lab_log);
        assert_eq!(
            server_side.len(),
            2,
            "a connect and a close on the server side: {server_side:#?}"
        );
        expected.push(events::client_established(flow, CLIENT, 0));
        expected.push(events::client_close(flow, CLIENT));
        for kind in ["connect", "close"] {
            expected.push(Pattern::new(
                format!("server {kind}"),
                json!({"type": kind, "side": "server", "comm": "python3",
                       "src_port": server.port(), "dst_port": client.port()}),
            ));
        }
    }
    // Resets may or may not come (the server closes right after one read); they are not the point.
    let others: Vec<Value> = lab_log
        .into_iter()
        .filter(|e| e["type"] != "reset")
        .collect();
    assert_exactly(&others, &expected);
}

/// A pre-forked server that listened before the agent started: found in /proc, where the parent
/// and both workers hold the socket; the lowest pid, the parent, is named.
#[test]
fn prefork_server_older_than_the_agent() -> anyhow::Result<()> {
    let lab = Lab::new(41)?;
    let server = SocketAddr::new(lab.server_v4().into(), 8090);
    let python = PythonServer::start(&lab, server, "prefork")?;
    let agent = Agent::start()?;
    let clients = connect_and_send(&lab, lab.client_v4().into(), server, 4);
    lab.settle(Duration::from_secs(5))?;
    let log = agent.stop()?;
    let parent = python.pid();
    python.stop()?;
    expect_owned(&lab, &log, server, &clients, &[parent]);
    Ok(())
}

/// A pre-forked server that starts listening while the agent runs: `listen()` runs in the parent.
#[test]
fn prefork_server_started_under_the_agent() -> anyhow::Result<()> {
    let lab = Lab::new(42)?;
    let server = SocketAddr::new(lab.server_v6().into(), 8090);
    let agent = Agent::start()?;
    let python = PythonServer::start(&lab, server, "prefork")?;
    let clients = connect_and_send(&lab, lab.client_v6().into(), server, 4);
    lab.settle(Duration::from_secs(5))?;
    let log = agent.stop()?;
    let parent = python.pid();
    python.stop()?;
    expect_owned(&lab, &log, server, &clients, &[parent]);
    Ok(())
}

/// Two processes listening on one port with SO_REUSEPORT: the kernel spreads the connections
/// over both, and the agent names one of them for each.
#[test]
fn reuseport_servers() -> anyhow::Result<()> {
    let lab = Lab::new(43)?;
    let server = SocketAddr::new(lab.server_v4().into(), 8090);
    let agent = Agent::start()?;
    let first = PythonServer::start(&lab, server, "reuseport")?;
    let second = PythonServer::start(&lab, server, "reuseport")?;
    let clients = connect_and_send(&lab, lab.client_v4().into(), server, 6);
    lab.settle(Duration::from_secs(5))?;
    let log = agent.stop()?;
    let pids = [first.pid(), second.pid()];
    first.stop()?;
    second.stop()?;
    expect_owned(&lab, &log, server, &clients, &pids);
    Ok(())
}
