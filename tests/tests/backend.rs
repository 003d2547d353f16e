//! The backend behind a virtual address (probe-ebpf `backend`, probe-user `backend`): an nft DNAT
//! in the client namespace spreads connects to a virtual IP over three backends round robin
//! (`numgen inc`), one of which refuses (nothing listens there). Clients connect in production
//! styles; the servers' accepted peers and the clients' own errors say which backend each
//! connect reached, and the JSON log's `backend_ip`/`backend_port` and the backend metrics must
//! say the same.
use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use tests::{
    Agent, Lab,
    clients::{self, ClientStyle, Seen},
    expect::lab_events_without_drops,
    http::http_get,
    netns,
    traffic::serve,
    verdict_lab,
};

const SUBNET: u8 = 132;
const NFT_TABLE: &str = "connprobe_lab_nat";
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;

fn vip() -> Ipv4Addr {
    Ipv4Addr::new(10, 96, SUBNET, 10)
}

fn backend(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, SUBNET, 11 + n)
}

/// Reads a request (up to its blank line, or EOF), answers 200 and closes. A client that only
/// connected and closed gets its answer dropped.
fn http_ok(mut stream: TcpStream) -> io::Result<()> {
    let mut data = Vec::new();
    let mut buf = [0u8; 1024];
    while !data.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
    let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
    Ok(())
}

/// The NAT rule and the backends' addresses, removed on drop (before the lab goes).
struct Nat<'a> {
    lab: &'a Lab,
}

impl<'a> Nat<'a> {
    fn new(lab: &'a Lab) -> anyhow::Result<Self> {
        let nat = Nat { lab };
        for n in 0..3 {
            netns::run(
                "ip",
                &[
                    "-n",
                    lab.server_ns().name(),
                    "addr",
                    "add",
                    &format!("{}/24", backend(n)),
                    "dev",
                    "lab0",
                ],
            )?;
        }
        netns::run(
            "ip",
            &[
                "-n",
                lab.client_ns().name(),
                "route",
                "add",
                &format!("{}/32", vip()),
                "dev",
                "lab0",
            ],
        )?;
        let script = format!(
            "add table ip {NFT_TABLE}\n\
             add chain ip {NFT_TABLE} out {{ type nat hook output priority -100; policy accept; }}\n\
             add rule ip {NFT_TABLE} out ip daddr {vip} tcp dport {VIP_PORT} dnat to numgen inc mod 3 \
             map {{ 0 : {b0}, 1 : {b1}, 2 : {b2} }} : {BACKEND_PORT}\n",
            vip = vip(),
            b0 = backend(0),
            b1 = backend(1),
            b2 = backend(2),
        );
        netns::run_with_input(
            "ip",
            &["netns", "exec", lab.client_ns().name(), "nft", "-f", "-"],
            &script,
        )?;
        Ok(nat)
    }
}

impl Drop for Nat<'_> {
    fn drop(&mut self) {
        if let Err(e) = self
            .lab
            .client_ns()
            .exec("nft", &["delete", "table", "ip", NFT_TABLE])
        {
            eprintln!("backend: could not delete the nftables table: {e:#}");
        }
    }
}

fn scrape(agent: &Agent) -> anyhow::Result<String> {
    let (status, body) = http_get(agent.metrics_addr().context("metrics")?, "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(body)
}

fn series(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[test]
fn connects_to_a_virtual_address_carry_the_backend_they_reached() -> anyhow::Result<()> {
    let lab = Lab::new(SUBNET)?;
    let nat = Nat::new(&lab)?;
    let agent = Agent::start_with_metrics(&[])?;
    let stderr = agent.stderr_text();
    assert!(
        !stderr.contains("backend program is not attached") && !stderr.contains("CAP_NET_ADMIN"),
        "the backend program must attach here:\n{stderr}"
    );
    // Backends 0 and 1 serve; backend 2 has nobody listening and refuses.
    let styles = ClientStyle::ALL;
    let per_style = 3;
    let live: Vec<_> = (0..2)
        .map(|n| {
            serve(
                &lab,
                SocketAddr::new(backend(n).into(), BACKEND_PORT),
                styles.len() * per_style / 3,
                http_ok,
            )
        })
        .collect();
    let target = SocketAddr::new(vip().into(), VIP_PORT);
    let client_ip = IpAddr::V4(lab.client_v4());
    let mut runs = Vec::new();
    for style in styles {
        for _ in 0..per_style {
            let give_up = (style != ClientStyle::Blocking).then_some(Duration::from_secs(10));
            // Round robin: connect k goes to backend k mod 3, so each style meets every one.
            runs.push(clients::connect(&lab, style, client_ip, target, give_up)?);
        }
    }
    // Ground truth: which backend accepted each client port, or refused it.
    let mut truth: BTreeMap<u16, SocketAddr> = BTreeMap::new();
    for (n, server) in live.into_iter().enumerate() {
        for peer in server.join().expect("backend server") {
            truth.insert(
                peer.port(),
                SocketAddr::new(backend(n as u8).into(), BACKEND_PORT),
            );
        }
    }
    let dead = SocketAddr::new(backend(2).into(), BACKEND_PORT);
    for run in &runs {
        match run.seen {
            Seen::Connected => assert!(truth.contains_key(&run.local.port()), "{run:?}"),
            Seen::Failed(libc::ECONNREFUSED) => {
                truth.insert(run.local.port(), dead);
            }
            other => bail!("{:?} saw {other:?}", run.style),
        }
    }
    let refused = runs.iter().filter(|r| r.seen != Seen::Connected).count();
    assert_eq!(
        refused,
        runs.len() / 3,
        "one connect in three is refused: {runs:?}"
    );

    let destination = target.to_string();
    let attempts = |b: SocketAddr| {
        format!(
            "connprobe_backend_connect_attempts_total{{backend=\"{b}\",destination=\"{destination}\"}}"
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = scrape(&agent)?;
        let total: f64 = (0..3)
            .map(|n| {
                series(
                    &metrics,
                    &attempts(SocketAddr::new(backend(n).into(), BACKEND_PORT)),
                )
                .unwrap_or(0.0)
            })
            .sum();
        if total >= runs.len() as f64 || Instant::now() > deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let metrics_addr = agent.metrics_addr().context("metrics")?.to_string();
    let diagnose: Value = serde_json::from_str(&verdict_lab::diagnose(&metrics_addr, "5m", true)?)?;
    let diagnose_text = verdict_lab::diagnose(&metrics_addr, "5m", false)?;
    lab.settle(Duration::from_secs(10))?;
    let events = lab_events_without_drops(&lab, &agent.stop()?);
    drop(nat);

    for n in 0..3u8 {
        let b = SocketAddr::new(backend(n).into(), BACKEND_PORT);
        let expected = truth.values().filter(|&&v| v == b).count() as f64;
        assert_eq!(
            series(&metrics, &attempts(b)),
            Some(expected),
            "{b}\n{metrics}"
        );
    }
    assert_eq!(
        series(
            &metrics,
            &format!(
                "connprobe_backend_connect_failures_total{{backend=\"{dead}\",destination=\"{destination}\",reason=\"refused\"}}"
            )
        ),
        Some(refused as f64),
        "{metrics}"
    );

    // The pool verdict behind the VIP names the refusing backend and only it.
    let pool = diagnose["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["verdicts"].as_array().into_iter().flatten())
        .find(|v| v["evidence"]["behind"] == destination.as_str())
        .with_context(|| format!("no pool verdict behind {destination}:\n{diagnose:#}"))?;
    assert_eq!(pool["verdict"], "pool_partial_failure", "{pool:#}");
    let failing: Vec<_> = pool["evidence"]["failing"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m["destination"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(failing, [dead.to_string()], "{pool:#}");
    assert_eq!(
        pool["evidence"]["healthy"].as_array().map(Vec::len),
        Some(2),
        "{pool:#}"
    );
    // The virtual address's own `refused` verdict names the backend that refused.
    let refused_verdict = diagnose["destinations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["destination"] == destination.as_str())
        .flat_map(|d| d["verdicts"].as_array().into_iter().flatten())
        .find(|v| v["verdict"] == "refused")
        .with_context(|| format!("no refused verdict for {destination}:\n{diagnose:#}"))?;
    assert_eq!(
        refused_verdict["evidence"]["backends"],
        serde_json::json!({ dead.to_string(): refused }),
        "{refused_verdict:#}"
    );
    let said = format!("Behind {destination}, backend {dead} refuses");
    assert!(
        diagnose_text.contains(&said),
        "{said:?} not in:\n{diagnose_text}"
    );
    // For the README: the lab's lines as the agent wrote them.
    eprintln!("{diagnose_text}");
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("connprobe_backend_"))
    {
        eprintln!("{line}");
    }
    for event in events.iter().filter(|e| e["dst_ip"] == vip().to_string()) {
        eprintln!("{event}");
    }
    assert!(
        !metrics.lines().any(
            |l| l.starts_with("connprobe_backend_connect_failures_total")
                && !l.contains(&dead.to_string())
        ),
        "only the dead backend fails\n{metrics}"
    );

    // Every event of a socket connected to the VIP carries the backend it reached, and no
    // other event has one.
    let mut annotated = BTreeMap::<&str, usize>::new();
    for event in &events {
        let to_vip = event["dst_ip"] == vip().to_string() && event["dst_port"] == VIP_PORT;
        if !to_vip {
            assert!(
                event["backend_ip"].is_null(),
                "no translation here: {event}"
            );
            continue;
        }
        let port = event["src_port"].as_u64().context("src_port")? as u16;
        let expected = truth
            .get(&port)
            .with_context(|| format!("a connect nobody made: {event}"))?;
        let got: Value = serde_json::json!([event["backend_ip"], event["backend_port"]]);
        assert_eq!(
            got,
            serde_json::json!([expected.ip().to_string(), expected.port()]),
            "{event}"
        );
        let kind = match (event["type"].as_str(), event["direction"].as_str()) {
            // A client that closes before the server's answer arrives sends resets of its own
            // (from FIN_WAIT2, or later from TIME_WAIT).
            (Some("reset"), Some("sent")) => "reset sent",
            (Some(kind), _) => kind,
            (None, _) => "?",
        };
        *annotated.entry(kind).or_default() += 1;
    }
    assert_eq!(annotated.get("connect"), Some(&runs.len()), "{annotated:?}");
    assert_eq!(
        annotated.get("close"),
        Some(&(runs.len() - refused)),
        "{annotated:?}"
    );
    assert_eq!(
        annotated.get("reset"),
        Some(&refused),
        "received resets: {annotated:?}"
    );
    drop(lab);
    Ok(())
}

/// The same over IPv6: a virtual address DNAT'd to the server's IPv6 address.
#[test]
fn ipv6_connects_carry_their_backend_too() -> anyhow::Result<()> {
    let lab = Lab::new(133)?;
    let vip: std::net::Ipv6Addr = "fd00:96:133::10".parse()?;
    let backend = SocketAddr::new(lab.server_v6().into(), BACKEND_PORT);
    netns::run(
        "ip",
        &[
            "-n",
            lab.client_ns().name(),
            "route",
            "add",
            &format!("{vip}/128"),
            "dev",
            "lab0",
        ],
    )?;
    let table = "connprobe_lab_nat6";
    netns::run_with_input(
        "ip",
        &["netns", "exec", lab.client_ns().name(), "nft", "-f", "-"],
        &format!(
            "add table ip6 {table}\n\
             add chain ip6 {table} out {{ type nat hook output priority -100; policy accept; }}\n\
             add rule ip6 {table} out ip6 daddr {vip} tcp dport {VIP_PORT} dnat to {backend}\n"
        ),
    )?;
    let result = (|| -> anyhow::Result<()> {
        let agent = Agent::start()?;
        let server = serve(&lab, backend, 1, http_ok);
        let run = clients::connect(
            &lab,
            ClientStyle::NonBlocking,
            IpAddr::V6(lab.client_v6()),
            SocketAddr::new(vip.into(), VIP_PORT),
            Some(Duration::from_secs(10)),
        )?;
        assert_eq!(run.seen, Seen::Connected, "{run:?}");
        server.join().expect("backend server");
        lab.settle(Duration::from_secs(10))?;
        let events = lab_events_without_drops(&lab, &agent.stop()?);
        let connect = events
            .iter()
            .find(|e| e["type"] == "connect" && e["src_port"] == run.local.port())
            .with_context(|| format!("no connect from {}: {events:#?}", run.local))?;
        assert_eq!(connect["dst_ip"], vip.to_string(), "{connect}");
        assert_eq!(
            connect["backend_ip"],
            lab.server_v6().to_string(),
            "{connect}"
        );
        assert_eq!(connect["backend_port"], BACKEND_PORT, "{connect}");
        Ok(())
    })();
    lab.client_ns()
        .exec("nft", &["delete", "table", "ip6", table])?;
    result
}
