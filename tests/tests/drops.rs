//! Packets the kernel drops with a reason (probe-ebpf `drops`), and listen-queue overflows
//! (probe-user `samplers`), from the live kernel, in both hook modes:
//!
//! - a firewall on the client's own output path (`tcp dport 8082 counter drop` in the client
//!   namespace): one `drop` event per packet the nft counter counted, each the connecting
//!   process's SYN with `NETFILTER_DROP`; `local_drop` ranked first for the destination;
//! - a firewall on the server's input path (`tcp dport 8084 counter drop` in the server
//!   namespace): the SYNs have no socket there and are matched to the connects in flight by
//!   their headers; again one event per counted packet;
//! - a listener with `listen(fd, 1)` that never accepts, filled by clients: the namespace's
//!   `ListenOverflows` (nstat) as ground truth for the `listen_overflow` events, and
//!   `listen_overflow` on the listener's server side.
//!
//! Clients connect in the production styles (blocking, non-blocking giving up, curl).
use std::{
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::mpsc,
    time::Duration,
};

use serde_json::{Value, json};
use tests::{
    Agent, Lab, Pattern,
    clients::{self, ClientStyle, Seen},
    expect::lab_events,
    netns::Netns,
    socket,
    verdict_lab::{self, find_verdict, lab_verdicts},
};

const OUTPUT_DROP: u16 = 8082;
const INPUT_DROP: u16 = 8084;
const OVERFLOWING: u16 = 8088;
/// Clients that fill the accept queue of `listen(fd, 1)` (it holds two), then clients whose
/// SYNs find it full.
const QUEUED: usize = 2;
const OVERFLOWED: usize = 3;
/// Past the first SYN retransmit (initial RTO 1 s), before the kernel gives up (3 s).
const GIVE_UP: Duration = Duration::from_millis(1600);
/// How long the agent is given to take its first reading of a namespace's counters (it reads
/// them about once a second; the first reading is the baseline).
const BASELINE: Duration = Duration::from_millis(2500);
const WINDOW: &str = "2m";
/// Set to a path to keep the text of `connprobe diagnose` from the run, and one event line of
/// each new type beside it (`PATH.events`), for the README.
const SAVE_TEXT_ENV: &str = "CONNPROBE_DROPS_DIAGNOSE_TEXT";

#[test]
fn drops_and_overflows_btf() -> anyhow::Result<()> {
    scenario(71, "btf")
}

#[test]
fn drops_and_overflows_classic() -> anyhow::Result<()> {
    scenario(72, "classic")
}

fn scenario(subnet: u8, hooks: &str) -> anyhow::Result<()> {
    let mut lab = Lab::new(subnet)?;
    let client_ip = IpAddr::from(lab.client_v4());
    let server_v4 = lab.server_v4();
    let at = move |port: u16| SocketAddr::new(server_v4.into(), port);
    lab.client_syn_retries(1)?;
    lab.client_output_rule(&format!("tcp dport {OUTPUT_DROP} counter drop"))?;
    lab.server_rule(&format!("tcp dport {INPUT_DROP} counter drop"))?;

    let metrics = verdict_lab::free_loopback_addr()?;
    let agent = Agent::start_with_args(&["--metrics-addr", &metrics, "--hooks", hooks])?;
    // The listener comes after the agent, so that the agent sees its listen() and backlog.
    let listener = never_accepting(&lab, at(OVERFLOWING))?;
    let overflows_before = listen_overflows(lab.server_ns())?;
    std::thread::sleep(BASELINE);

    // The accept queue fills, then every SYN finds it full.
    let queued: Vec<_> = (0..QUEUED)
        .map(|_| {
            lab.client("lab-queued", move || {
                socket::connect(client_ip, at(OVERFLOWING), None).result
            })
            .join()
            .expect("client thread")
            .expect("a connect the queue has room for")
        })
        .collect();
    let overflowed: Vec<_> = (0..OVERFLOWED)
        .map(|_| {
            lab.client("lab-overflowed", move || {
                socket::connect(client_ip, at(OVERFLOWING), None)
            })
        })
        .collect();
    // The firewalled destinations, each in every style, all at once.
    let runs = std::thread::scope(|scope| -> anyhow::Result<Vec<(u16, clients::ClientRun)>> {
        let lab = &lab;
        let mut firewalled = Vec::new();
        for port in [OUTPUT_DROP, INPUT_DROP] {
            for style in ClientStyle::ALL {
                let give_up = (style != ClientStyle::Blocking).then_some(GIVE_UP);
                firewalled.push(scope.spawn(move || {
                    clients::connect(lab, style, client_ip, at(port), give_up)
                        .map(|run| (port, run))
                }));
            }
        }
        let mut runs = Vec::new();
        for handle in firewalled {
            let (port, run) = handle.join().expect("client thread")?;
            let expected = match run.style {
                ClientStyle::Blocking => Seen::Failed(libc::ETIMEDOUT),
                _ => Seen::GaveUp,
            };
            assert_eq!(run.seen, expected, "{:?} connect to port {port}", run.style);
            runs.push((port, run));
        }
        Ok(runs)
    })?;
    for handle in overflowed {
        let attempt = handle.join().expect("client thread");
        assert_eq!(
            attempt.errno(),
            Some(libc::ETIMEDOUT),
            "a connect to the full queue"
        );
    }
    // The queued connections stay half-closed (the listener never accepts them) until the
    // listener closes at the end: no `settle` here.
    drop(queued);
    let overflows = listen_overflows(lab.server_ns())? - overflows_before;
    let output_counted = lab.client_output_counted()?;
    let input_counted = lab.server_input_counted()?;
    eprintln!(
        "ground truth: {output_counted} packets dropped on the client's output, \
         {input_counted} on the server's input, {overflows} listen overflows"
    );
    assert!(output_counted >= 3 && input_counted >= 3 && overflows >= 3);

    // At least one reading of the counters after the last overflow.
    std::thread::sleep(BASELINE);
    verdict_lab::wait_for_delivery(&metrics, Duration::from_secs(10))?;
    let diagnose = verdict_lab::diagnose(&metrics, WINDOW, true)?;
    let diagnose: Value = serde_json::from_str(&diagnose)?;
    let text = verdict_lab::diagnose(&metrics, WINDOW, false)?;
    if let Some(path) = std::env::var_os(SAVE_TEXT_ENV) {
        std::fs::write(path, &text)?;
    }
    let (_, body) = verdict_lab::http_get(&metrics, "/metrics")?;
    let log = agent.stop()?;
    drop(listener);
    let log = lab_events(&lab, &log);
    if let Some(path) = std::env::var_os(SAVE_TEXT_ENV) {
        // Beside the text, one line of each new type, for the README.
        let mut lines = String::new();
        for kind in ["drop", "listen_overflow"] {
            if let Some(e) = log.iter().find(|e| e["type"] == kind) {
                lines.push_str(&format!("{e}\n"));
            }
        }
        let mut path = std::path::PathBuf::from(path);
        path.set_extension("events");
        std::fs::write(path, lines)?;
    }

    // One event per dropped packet, each the connecting process's SYN.
    for (port, counted) in [(OUTPUT_DROP, output_counted), (INPUT_DROP, input_counted)] {
        let drops: Vec<&Value> = log
            .iter()
            .filter(|e| e["type"] == "drop" && e["dst_port"] == port)
            .collect();
        assert_eq!(
            drops.len() as u64,
            counted,
            "drop events to port {port} vs the nft counter: {drops:#?}"
        );
        for (_, run) in runs.iter().filter(|(p, _)| *p == port) {
            let opener = run.opener();
            let pid = opener.pid.unwrap_or_else(std::process::id);
            let syn = Pattern::new(
                "a dropped SYN",
                json!({"type": "drop", "side": "client", "pid": pid, "comm": opener.comm,
                       "src_ip": run.local.ip().to_string(), "src_port": run.local.port(),
                       "dst_ip": server_v4.to_string(), "dst_port": port,
                       "reason": "NETFILTER_DROP", "protocol": "tcp", "tcp_flags": "SYN",
                       "direction": "sent", "packets": 1}),
            );
            let n = drops.iter().filter(|e| syn.matches(e)).count();
            // Every SYN: the first and its retransmits (one at least before anyone gives up).
            assert!(
                n >= 2,
                "{n} dropped SYNs of the {:?} connect from {} to port {port}: {drops:#?}",
                run.style,
                run.local
            );
        }
        let metric = metric_sum(
            &body,
            "connprobe_drops_total",
            &[
                ("destination", &at(port).to_string()),
                ("reason", "NETFILTER_DROP"),
            ],
        );
        assert_eq!(metric, counted, "connprobe_drops_total of port {port}");
    }

    // The overflows, charged to the listener, and its verdict.
    let charged: u64 = log
        .iter()
        .filter(|e| e["type"] == "listen_overflow")
        .inspect(|e| {
            assert_eq!(e["src_port"], OVERFLOWING, "{e}");
            assert_eq!(e["side"], "server", "{e}");
            assert_eq!(e["backlog"], 1, "{e}");
        })
        .map(|e| e["overflows"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        charged, overflows,
        "listen_overflow events vs ListenOverflows"
    );
    let metric = metric_sum(
        &body,
        "connprobe_listen_overflows_total",
        &[("destination", &at(OVERFLOWING).to_string())],
    );
    assert_eq!(metric, overflows, "connprobe_listen_overflows_total");
    for kind in ["insert_failed", "drop", "early_drop"] {
        let line = format!("connprobe_conntrack_drops_total{{kind=\"{kind}\"}}");
        assert!(body.contains(&line), "{line} missing in /metrics");
    }

    let verdicts = lab_verdicts(&lab, &diagnose);
    eprintln!("verdicts: {verdicts:#?}");
    for port in [OUTPUT_DROP, INPUT_DROP] {
        let dest = at(port).to_string();
        let ids = &verdicts[&(dest.clone(), Some("client".to_owned()))];
        assert_eq!(
            ids.first().map(String::as_str),
            Some("local_drop"),
            "{dest}"
        );
        let local = find_verdict(&diagnose, &dest, "client", "local_drop");
        assert_eq!(
            local["evidence"]["by_reason"]["NETFILTER_DROP"].as_u64(),
            Some(if port == OUTPUT_DROP {
                output_counted
            } else {
                input_counted
            }),
            "{local:#}"
        );
    }
    let listener_dest = at(OVERFLOWING).to_string();
    let ids = &verdicts[&(listener_dest.clone(), Some("server".to_owned()))];
    assert_eq!(
        ids.first().map(String::as_str),
        Some("listen_overflow"),
        "{listener_dest}"
    );
    let verdict = find_verdict(&diagnose, &listener_dest, "server", "listen_overflow");
    assert_eq!(verdict["evidence"]["overflows"], overflows, "{verdict:#}");
    assert_eq!(verdict["evidence"]["backlog"], 1, "{verdict:#}");
    // Both ends on this host: the clients' blackhole points to the overflowing listener.
    let blackhole = find_verdict(&diagnose, &listener_dest, "client", "blackhole");
    assert_eq!(
        blackhole["evidence"]["overflowing_listener"], listener_dest,
        "{blackhole:#}"
    );
    assert!(
        text.contains("local_drop") && text.contains("listen_overflow"),
        "{text}"
    );
    Ok(())
}

/// A listener on `addr` in the server namespace with `listen(fd, 1)` that never accepts; it
/// stays (with its thread, whose /proc entry the agent reads) until the returned sender drops.
fn never_accepting(lab: &Lab, addr: SocketAddr) -> anyhow::Result<mpsc::Sender<()>> {
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel();
    lab.server("lab-backlog1", move || {
        match listen_backlog_one(addr) {
            Ok(listener) => {
                ready_tx.send(Ok(())).expect("the test waits");
                // Open until the test drops its sender.
                let _ = stop_rx.recv_timeout(Duration::from_secs(120));
                drop(listener);
            }
            Err(e) => ready_tx.send(Err(e)).expect("the test waits"),
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow::anyhow!("the listener thread did not start"))??;
    Ok(stop_tx)
}

/// socket, bind, `listen(fd, 1)`: std's `TcpListener` always asks for a backlog of 128.
fn listen_backlog_one(addr: SocketAddr) -> io::Result<OwnedFd> {
    let SocketAddr::V4(v4) = addr else {
        return Err(io::Error::other("an IPv4 address"));
    };
    // SAFETY: plain socket(2); the fd is owned right below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid sockaddr_in of its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a bound TCP socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// `TcpExtListenOverflows` of the namespace, from `nstat -az` run there.
fn listen_overflows(ns: &Netns) -> anyhow::Result<u64> {
    let out = ns.exec("nstat", &["-az", "TcpExtListenOverflows"])?;
    out.lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("TcpExtListenOverflows"))
                .then(|| words.next()?.parse().ok())
                .flatten()
        })
        .ok_or_else(|| anyhow::anyhow!("nstat printed no TcpExtListenOverflows:\n{out}"))
}

/// The sum of `family`'s samples whose labels include `labels`, from a `/metrics` text.
fn metric_sum(body: &str, family: &str, labels: &[(&str, &str)]) -> u64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum::<f64>() as u64
}
