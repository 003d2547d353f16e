//! Connect outcomes and connection lifetimes (probe-ebpf `tcp_state`, `sock_error`): established
//! connects and their server process, and every way a connect fails (refused by a RST or by an
//! ICMP port-unreachable, host-unreachable, administratively prohibited, kernel and application
//! timeouts), each made by every client style production uses (blocking, non-blocking with
//! `SO_ERROR`, curl), over IPv4 and IPv6, on both hook modes; and the established connects with
//! the per-socket records in the benchmark's LRU hashes instead of socket storage.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use tests::{
    Agent, Lab, Pattern, assert_exactly, assert_exactly_unless_missed,
    bpf::{self, BpfObjects},
    clients::{self, ClientRun, ClientStyle, Seen},
    events::{self, Flow, Listener, Opener},
    expect::lab_events_without_drops,
    socket::{self, Attempt},
    traffic::{self, SERVER_COMM, serve},
};

const CLIENT: Opener<'static> = Opener::thread("lab-client");

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

/// The agent with the default hooks (BTF tracepoints here), or with `--hooks classic`; or with
/// the default hooks and the per-socket records in an LRU hash (`--socket-records`).
#[derive(Clone, Copy)]
enum Hooks {
    Default,
    Classic,
    LruRecords,
    PerCpuLruRecords,
}

fn start_agent(hooks: Hooks) -> anyhow::Result<Agent> {
    match hooks {
        Hooks::Default => Agent::start(),
        Hooks::Classic => Agent::start_with_args(&["--no-metrics", "--hooks", "classic"]),
        Hooks::LruRecords => {
            let agent = Agent::start_with_args(&["--no-metrics", "--socket-records", "lru"])?;
            ensure_forgets_at_destroy(&agent)?;
            Ok(agent)
        }
        Hooks::PerCpuLruRecords => {
            const MAX_SOCKETS: u32 = 1_024;
            let agent = Agent::start_with_args(&[
                "--no-metrics",
                "--socket-records",
                "lru-per-cpu",
                "--max-sockets",
                &MAX_SOCKETS.to_string(),
            ])?;
            ensure_forgets_at_destroy(&agent)?;
            // The kernel splits it evenly over the possible CPUs, each evicting only its own.
            let objects = BpfObjects::of(agent.pid().context("runs")?)?;
            let map = objects
                .map_named("SOCKETS_PER_CPU")?
                .with_context(|| format!("the agent holds no SOCKETS_PER_CPU map: {objects:?}"))?;
            let entries = MAX_SOCKETS * possible_cpus()?;
            ensure!(
                map.map_type == bpf::LRU_HASH && map.max_entries == entries,
                "SOCKETS_PER_CPU is not an LRU hash of {MAX_SOCKETS} entries per possible CPU \
                 ({entries}): {map:?}"
            );
            Ok(agent)
        }
    }
}

/// With the records in an LRU hash, the agent attaches `tcp_destroy_sock` to empty it (socket
/// storage goes with the socket by itself): its start-up line names the hooks it attached.
fn ensure_forgets_at_destroy(agent: &Agent) -> anyhow::Result<()> {
    let stderr = agent.stderr_text();
    ensure!(
        stderr.contains("tcp_destroy_sock=btf"),
        "the agent did not attach tcp_destroy_sock: {stderr}"
    );
    Ok(())
}

/// The kernel's count of possible CPUs (`/sys/devices/system/cpu/possible`, e.g. `0-3,8`).
fn possible_cpus() -> anyhow::Result<u32> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut cpus = 0;
    for range in text.trim().split(',') {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        cpus += last.parse::<u32>()? - first.parse::<u32>()? + 1;
    }
    Ok(cpus)
}

/// When the server starts listening: before the agent (found in /proc at start-up, named like the
/// process) or after it (seen in `listen()`, named like the thread).
#[derive(Clone, Copy)]
enum ListenerStarts {
    BeforeAgent,
    AfterAgent,
}

fn established(
    lab: &Lab,
    client_ip: IpAddr,
    server_ip: IpAddr,
    count: usize,
    hooks: Hooks,
    starts: ListenerStarts,
) -> anyhow::Result<()> {
    let server = SocketAddr::new(server_ip, 8080);
    let (agent, listener, owner) = match starts {
        ListenerStarts::BeforeAgent => {
            let listener = serve(lab, server, count, traffic::echo);
            (start_agent(hooks)?, listener, Listener::process())
        }
        ListenerStarts::AfterAgent => {
            let agent = start_agent(hooks)?;
            let listener = serve(lab, server, count, traffic::echo);
            (agent, listener, Listener::thread(SERVER_COMM))
        }
    };
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
        expected.push(events::server_established(flow, &owner));
        expected.push(events::client_close(flow, CLIENT));
        expected.push(events::server_close(flow, &owner));
    }
    assert_exactly(&lab_events_without_drops(lab, &log), &expected);
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
        ListenerStarts::BeforeAgent,
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
        ListenerStarts::AfterAgent,
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
        ListenerStarts::AfterAgent,
    )
}

/// With the records in the LRU hash of the classic hooks (`--socket-records lru`) on BTF
/// tracepoints, the benchmark's comparison with socket storage: exactly the same events, latency
/// and owners included.
#[test]
fn established_connects_records_in_lru_hash() -> anyhow::Result<()> {
    let lab = Lab::new(36)?;
    established(
        &lab,
        lab.client_v4().into(),
        lab.server_v4().into(),
        3,
        Hooks::LruRecords,
        ListenerStarts::AfterAgent,
    )
}

/// The same with an LRU list per CPU (`--socket-records lru-per-cpu`), over IPv6.
#[test]
fn established_connects_records_in_per_cpu_lru_hash() -> anyhow::Result<()> {
    let lab = Lab::new(37)?;
    established(
        &lab,
        lab.client_v6().into(),
        lab.server_v6().into(),
        3,
        Hooks::PerCpuLruRecords,
        ListenerStarts::AfterAgent,
    )
}

/// What a failure scenario expects from every client style.
struct Failure<'a> {
    /// What the client must see (its errno, or that it gave up).
    seen: Seen,
    /// The connect event's `reason` and `errno`.
    reason: &'a str,
    errno: Option<&'a str>,
    /// Events besides the failed connect and its SYN retransmits (e.g. the RST received).
    also: fn(Flow, Opener<'static>) -> Vec<Pattern>,
}

fn nothing_else(_: Flow, _: Opener<'static>) -> Vec<Pattern> {
    Vec::new()
}

fn reset_received(flow: Flow, opener: Opener<'static>) -> Vec<Pattern> {
    vec![events::client_reset_received(flow, opener, "SYN_SENT")]
}

/// Connects once in each of `styles`, one after another, to `server`, under whatever fault the
/// lab holds; each client must see `failure.seen`, and the agent must log for each exactly a
/// failed connect with `failure.reason` and `failure.errno` whose `syn_retransmits` is the client
/// namespace's TcpRetransSegs delta of that attempt, a SYN retransmit event for each resend
/// handed on (that delta less TCPRetransFail) and `failure.also`.
fn fails_alike(
    lab: &Lab,
    styles: &[ClientStyle],
    client_ip: IpAddr,
    server: SocketAddr,
    hooks: Hooks,
    give_up: Option<Duration>,
    failure: &Failure<'_>,
) -> anyhow::Result<()> {
    let agent = start_agent(hooks)?;
    let mut runs: Vec<(ClientRun, u64, u64)> = Vec::new();
    for &style in styles {
        let before = lab.client_counters();
        let run = clients::connect(lab, style, client_ip, server, give_up)?;
        lab.settle(Duration::from_secs(5))?;
        let after = lab.client_counters();
        runs.push((
            run,
            after.retrans_segs - before.retrans_segs,
            after.resent_since(&before),
        ));
    }
    let (log, missed_runs) = agent.stop_with_tally()?;
    let seen: Vec<_> = runs.iter().map(|(r, _, _)| (r.style, r.seen)).collect();
    let want: Vec<_> = styles.iter().map(|&s| (s, failure.seen)).collect();
    assert_eq!(seen, want, "what each client saw");

    let mut expected = Vec::new();
    for (run, tried, resent) in &runs {
        let flow = Flow {
            client: run.local,
            server,
        };
        let opener = run.opener();
        expected.push(events::client_failed(
            flow,
            opener,
            failure.reason,
            failure.errno,
            *tried as u32,
        ));
        expected.extend((0..*resent).map(|_| events::client_syn_retransmit(flow, opener)));
        expected.extend((failure.also)(flow, opener));
    }
    assert_exactly_unless_missed(&lab_events_without_drops(lab, &log), &expected, missed_runs);
    Ok(())
}

const REFUSED_BY_RST: Failure<'static> = Failure {
    seen: Seen::Failed(libc::ECONNREFUSED),
    reason: "refused",
    errno: Some("ECONNREFUSED"),
    also: reset_received,
};

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
    fails_alike(
        lab,
        &ClientStyle::ALL,
        client_ip,
        server,
        hooks,
        None,
        &REFUSED_BY_RST,
    )
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

/// An ICMP error answers the SYN (nftables `reject with icmpx type KIND`). A blocking connect
/// and a non-blocking one end on different kernel paths: the first ICMP comes back while
/// `connect()` still holds the socket, so the kernel keeps it as a soft error. The non-blocking
/// client's `poll()` wakes at once and `SO_ERROR` hands it the error, which it then no longer
/// holds when it closes; the blocking one waits for the ICMP answering the SYN resent after 1 s,
/// which ends the connect with `sk_err` set. The agent must report both alike.
fn icmp_rejected(
    lab: &mut Lab,
    client_ip: IpAddr,
    server_ip: IpAddr,
    hooks: Hooks,
    kind: &str,
    failure: &Failure<'_>,
) -> anyhow::Result<()> {
    let server = SocketAddr::new(server_ip, 8085);
    lab.server_rule(&format!("tcp dport 8085 reject with icmpx type {kind}"))?;
    fails_alike(
        lab,
        &ClientStyle::ALL,
        client_ip,
        server,
        hooks,
        None,
        failure,
    )
}

const HOST_UNREACHABLE: Failure<'static> = Failure {
    seen: Seen::Failed(libc::EHOSTUNREACH),
    reason: "unreachable",
    errno: Some("EHOSTUNREACH"),
    also: nothing_else,
};

/// ICMP port-unreachable means nothing listens: ECONNREFUSED, as a RST would, but no RST.
const PORT_UNREACHABLE: Failure<'static> = Failure {
    seen: Seen::Failed(libc::ECONNREFUSED),
    reason: "refused",
    errno: Some("ECONNREFUSED"),
    also: nothing_else,
};

#[test]
fn unreachable() -> anyhow::Result<()> {
    let mut lab = Lab::new(15)?;
    let (c, s) = (lab.client_v4().into(), lab.server_v4().into());
    icmp_rejected(
        &mut lab,
        c,
        s,
        Hooks::Default,
        "host-unreachable",
        &HOST_UNREACHABLE,
    )
}

#[test]
fn unreachable_ipv6() -> anyhow::Result<()> {
    let mut lab = Lab::new(24)?;
    let (c, s) = (lab.client_v6().into(), lab.server_v6().into());
    icmp_rejected(
        &mut lab,
        c,
        s,
        Hooks::Default,
        "host-unreachable",
        &HOST_UNREACHABLE,
    )
}

#[test]
fn unreachable_classic_tracepoints() -> anyhow::Result<()> {
    let mut lab = Lab::new(25)?;
    let (c, s) = (lab.client_v4().into(), lab.server_v4().into());
    icmp_rejected(
        &mut lab,
        c,
        s,
        Hooks::Classic,
        "host-unreachable",
        &HOST_UNREACHABLE,
    )
}

#[test]
fn port_unreachable() -> anyhow::Result<()> {
    let mut lab = Lab::new(26)?;
    let (c, s) = (lab.client_v4().into(), lab.server_v4().into());
    icmp_rejected(
        &mut lab,
        c,
        s,
        Hooks::Default,
        "port-unreachable",
        &PORT_UNREACHABLE,
    )
}

#[test]
fn port_unreachable_classic_tracepoints() -> anyhow::Result<()> {
    let mut lab = Lab::new(27)?;
    let (c, s) = (lab.client_v4().into(), lab.server_v4().into());
    icmp_rejected(
        &mut lab,
        c,
        s,
        Hooks::Classic,
        "port-unreachable",
        &PORT_UNREACHABLE,
    )
}

/// Administratively prohibited (a firewall's reject): EHOSTUNREACH, like host-unreachable.
#[test]
fn admin_prohibited() -> anyhow::Result<()> {
    let mut lab = Lab::new(28)?;
    let (c, s) = (lab.client_v4().into(), lab.server_v4().into());
    icmp_rejected(
        &mut lab,
        c,
        s,
        Hooks::Default,
        "admin-prohibited",
        &HOST_UNREACHABLE,
    )
}

#[test]
fn admin_prohibited_classic_tracepoints() -> anyhow::Result<()> {
    let mut lab = Lab::new(29)?;
    let (c, s) = (lab.client_v4().into(), lab.server_v4().into());
    icmp_rejected(
        &mut lab,
        c,
        s,
        Hooks::Classic,
        "admin-prohibited",
        &HOST_UNREACHABLE,
    )
}

/// SYNs dropped and `tcp_syn_retries=1`: the kernel resends the SYN once (after 1 s) and gives
/// up (after 3 s) with ETIMEDOUT. Since Linux 6.7 `tcp_syn_linear_timeouts` (default 4) adds
/// SYN retransmits at a fixed 1 s interval on top (two here, at 1 s and 2 s); it is turned off
/// where it exists so that the count equals the setting (see `Lab::client_syn_retries`). Every
/// client waits for the kernel.
fn kernel_timeout(lab: &mut Lab, hooks: Hooks) -> anyhow::Result<()> {
    let server = SocketAddr::new(lab.server_v4().into(), 8082);
    lab.server_rule("tcp dport 8082 drop")?;
    lab.client_syn_retries(1)?;
    let failure = Failure {
        seen: Seen::Failed(libc::ETIMEDOUT),
        reason: "timeout",
        errno: Some("ETIMEDOUT"),
        also: nothing_else,
    };
    let client = lab.client_v4().into();
    fails_alike(
        lab,
        &ClientStyle::ALL,
        client,
        server,
        hooks,
        None,
        &failure,
    )
}

#[test]
fn kernel_timeout_btf() -> anyhow::Result<()> {
    let mut lab = Lab::new(16)?;
    kernel_timeout(&mut lab, Hooks::Default)
}

#[test]
fn kernel_timeout_classic_tracepoints() -> anyhow::Result<()> {
    let mut lab = Lab::new(30)?;
    kernel_timeout(&mut lab, Hooks::Classic)
}

/// The application gives up first: after 1.5 s a non-blocking client polling its connect, and
/// curl with `--connect-timeout 1.5`, close the socket. The kernel had resent the SYN once (at
/// 1 s; the next would be at 3 s); no error was ever reported for the socket: `cancelled`.
fn application_timeout(lab: &mut Lab, hooks: Hooks) -> anyhow::Result<()> {
    let server = SocketAddr::new(lab.server_v4().into(), 8082);
    lab.server_rule("tcp dport 8082 drop")?;
    let failure = Failure {
        seen: Seen::GaveUp,
        reason: "cancelled",
        errno: None,
        also: nothing_else,
    };
    let client = lab.client_v4().into();
    let give_up = Some(Duration::from_millis(1500));
    fails_alike(
        lab,
        &ClientStyle::GIVING_UP,
        client,
        server,
        hooks,
        give_up,
        &failure,
    )
}

#[test]
fn application_timeout_btf() -> anyhow::Result<()> {
    let mut lab = Lab::new(17)?;
    application_timeout(&mut lab, Hooks::Default)
}

#[test]
fn application_timeout_classic_tracepoints() -> anyhow::Result<()> {
    let mut lab = Lab::new(32)?;
    application_timeout(&mut lab, Hooks::Classic)
}
