//! `connprobe probe` (issue 15, "Connectivity checks for CI pipelines") against the lab: a port
//! refused by a reset, a port whose SYNs are dropped, a healthy port (IPv4 and IPv6), and bad
//! input. The probe runs inside the lab's client namespace (`nsenter --net`, which leaves the
//! mounts alone), so its connects reach the server namespace and nothing else. Ground truth is
//! what the lab set up, `COUNT`, and the client namespace's own TCP counters.
use std::{
    net::{IpAddr, SocketAddr},
    process::{Command, Output},
    time::Duration,
};

use serde_json::Value;
use tests::{Lab, traffic::serve, verdict_lab::connprobe_bin};

const SUBNET: u8 = 157;
const HEALTHY: u16 = 8080;
const REFUSED: u16 = 8081;
const BLACKHOLE: u16 = 8082;
/// Connects per target: above the verdict engine's minimum evidence (3) and below
/// `SLOW_MIN_HANDSHAKES` (8), so a busy host's scheduling cannot make the healthy port "slow".
const COUNT: u64 = 6;

/// Runs `connprobe probe ARGS` in the lab's client namespace.
fn probe(lab: &Lab, args: &[&str]) -> Output {
    let bin = connprobe_bin().expect("CONNPROBE_BIN");
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.client_ns().name()))
        .arg(bin)
        .arg("probe")
        .args(args)
        .output()
        .expect("cannot run nsenter (util-linux)")
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn target<'a>(report: &'a Value, addr: &str) -> &'a Value {
    report["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .find(|t| t["address"] == addr)
        .unwrap_or_else(|| panic!("no target {addr} in {report:#}"))
}

fn top_verdict(target: &Value) -> &str {
    target["verdicts"][0]["verdict"].as_str().unwrap_or("none")
}

/// The verdicts on a port whose SYNs the lab's server namespace drops: unanswered SYNs
/// (`blackhole`), and first, where the kernel names its drops (`kfree_skb` with reasons), the
/// drop itself: the lab's namespaces are on this host, so nftables' drop is this host's own
/// (`local_drop`, by reason `NETFILTER_DROP`).
fn assert_dropped_syns(target: &Value) {
    let ids: Vec<&str> = target["verdicts"]
        .as_array()
        .expect("verdicts")
        .iter()
        .filter_map(|v| v["verdict"].as_str())
        .collect();
    assert!(ids.contains(&"blackhole"), "{target:#}");
    match ids[0] {
        "local_drop" => assert!(
            target["verdicts"][0]["evidence"]["by_reason"]["NETFILTER_DROP"].as_u64() > Some(0),
            "{target:#}"
        ),
        top => assert_eq!(top, "blackhole", "{target:#}"),
    }
}

fn addr(ip: impl Into<IpAddr>, port: u16) -> String {
    SocketAddr::new(ip.into(), port).to_string()
}

#[test]
fn probe_reports_the_injected_causes() {
    let mut lab = Lab::new(SUBNET).expect("lab");
    lab.server_rule(&format!("tcp dport {REFUSED} reject with tcp reset"))
        .expect("refused rule");
    lab.server_rule(&format!("tcp dport {BLACKHOLE} drop"))
        .expect("blackhole rule");
    // The kernel gives a blackholed connect up after one SYN retransmit (about 3 s).
    lab.client_syn_retries(1).expect("syn retries");
    let server = serve(
        &lab,
        SocketAddr::new(lab.server_v4().into(), HEALTHY),
        COUNT as usize,
        |_| Ok(()),
    );
    let (healthy, refused, blackhole) = (
        addr(lab.server_v4(), HEALTHY),
        addr(lab.server_v4(), REFUSED),
        addr(lab.server_v4(), BLACKHOLE),
    );
    let before = lab.client_counters();
    let count = COUNT.to_string();
    let output = probe(
        &lab,
        &[
            "--json",
            "--count",
            &count,
            "--concurrency",
            &count,
            "--timeout",
            "10s",
            &healthy,
            &refused,
            &blackhole,
        ],
    );
    let resent = lab.client_counters().resent_since(&before);
    assert_eq!(
        output.status.code(),
        Some(1),
        "some connects failed: {output:?}"
    );
    let report = json_of(&output);
    assert_eq!(report["ok"], false);
    server.join().expect("the server");

    let t = target(&report, &healthy);
    assert_eq!(
        (
            t["attempts"].as_u64(),
            t["established"].as_u64(),
            t["failed"].as_u64()
        ),
        (Some(COUNT), Some(COUNT), Some(0)),
        "{t:#}"
    );
    assert_eq!(t["unseen"], 0, "{t:#}");
    assert_eq!(t["syn_retransmits"], 0, "{t:#}");
    let p = &t["handshake_ms"];
    let (p50, p90, p99) = (
        p["p50"].as_f64().unwrap(),
        p["p90"].as_f64().unwrap(),
        p["p99"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 < 1000.0, "{p}");
    assert_eq!(top_verdict(t), "healthy", "{t:#}");

    let t = target(&report, &refused);
    assert_all_failed(t, "refused", "ECONNREFUSED");
    assert_eq!(t["syn_retransmits"], 0, "{t:#}");
    assert_eq!(t["handshake_ms"], Value::Null, "{t:#}");
    assert_eq!(top_verdict(t), "refused", "{t:#}");

    let t = target(&report, &blackhole);
    assert_all_failed(t, "timeout", "ETIMEDOUT");
    // One SYN retransmit per connect (tcp_syn_retries=1), and nothing else resent in the
    // client namespace: the kernel's own count agrees.
    assert_eq!(t["syn_retransmits"].as_u64(), Some(COUNT), "{t:#}");
    assert_eq!(resent, COUNT, "the client namespace's RetransSegs");
    assert_dropped_syns(t);
}

#[test]
fn probe_gives_up_on_its_own_timeout_and_passes_on_healthy_ipv6() {
    let mut lab = Lab::new(SUBNET).expect("lab");
    lab.server_rule(&format!("tcp dport {BLACKHOLE} drop"))
        .expect("blackhole rule");
    let blackhole = addr(lab.server_v4(), BLACKHOLE);
    // Past the first SYN retransmit (initial RTO 1 s), well before the kernel gives up.
    let output = probe(
        &lab,
        &[
            "--json",
            "--count",
            "4",
            "--concurrency",
            "4",
            "--timeout",
            "1500ms",
            &blackhole,
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let report = json_of(&output);
    let t = target(&report, &blackhole);
    assert_eq!(t["failed"], 4, "{t:#}");
    assert_eq!(t["errors"], serde_json::json!({ "timeout": 4 }), "{t:#}");
    // The probe closed each socket in SYN_SENT: the kernel calls that cancelled.
    assert_eq!(t["reasons"], serde_json::json!({ "cancelled": 4 }), "{t:#}");
    assert!(t["syn_retransmits"].as_u64().unwrap() >= 4, "{t:#}");
    assert_dropped_syns(t);

    let healthy = addr(lab.server_v6(), HEALTHY);
    let server = serve(
        &lab,
        SocketAddr::new(lab.server_v6().into(), HEALTHY),
        COUNT as usize,
        |_| Ok(()),
    );
    let count = COUNT.to_string();
    let output = probe(&lab, &["--count", &count, "--rate", "50", &healthy]);
    server.join().expect("the server");
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(
        text.starts_with(&format!(
            "{healthy}: {COUNT} attempts, {COUNT} established, 0 failed\n"
        )),
        "{text}"
    );
    assert!(text.contains("handshake: p50 "), "{text}");
    assert!(text.contains("verdict: healthy"), "{text}");
    lab.settle(Duration::from_secs(5)).expect("settled");
}

/// `--duration` with `--rate`: a load test of connection setup, paced. The listener never
/// accepts; the kernel completes each handshake into its accept queue (backlog 128, far more
/// than the connects made here).
#[test]
fn probe_keeps_connecting_for_its_duration_at_its_rate() {
    const RATE: u64 = 20;
    let lab = Lab::new(SUBNET).expect("lab");
    let healthy = SocketAddr::new(lab.server_v4().into(), HEALTHY);
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let (listening, ready) = std::sync::mpsc::channel();
    let server = lab.server("lab-server", move || {
        let listener = std::net::TcpListener::bind(healthy).expect("bind");
        listening.send(()).expect("the test waits");
        let _ = stopped.recv_timeout(Duration::from_secs(60));
        drop(listener);
    });
    ready
        .recv_timeout(Duration::from_secs(10))
        .expect("listening");
    let rate = RATE.to_string();
    let output = probe(
        &lab,
        &[
            "--json",
            "--duration",
            "1s",
            "--rate",
            &rate,
            "--concurrency",
            "8",
            &healthy.to_string(),
        ],
    );
    let _ = stop.send(());
    server.join().expect("the server");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let report = json_of(&output);
    assert_eq!(report["ok"], true);
    let t = target(&report, &healthy.to_string());
    // One connect at once, then one every 1/RATE s until 1 s has passed: RATE or RATE + 1,
    // fewer when a busy host delays the pacing, never more.
    let attempts = t["attempts"].as_u64().expect("attempts");
    assert!((RATE / 2..=RATE + 1).contains(&attempts), "{t:#}");
    assert_eq!(t["established"].as_u64(), Some(attempts), "{t:#}");
    assert_eq!(t["unseen"], 0, "{t:#}");
    assert!(t["handshake_ms"]["p99"].as_f64().is_some(), "{t:#}");
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let bin = connprobe_bin().expect("CONNPROBE_BIN");
    for args in [
        &["probe", "nonsense"][..],
        &["probe", "localhost:0"],
        &["probe", "[::1]:22", "x:"],
    ] {
        let output = Command::new(&bin)
            .args(args)
            .output()
            .expect("run connprobe");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("connprobe: "), "{stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}

/// Every one of the target's COUNT connects failed, for the kernel with `reason` and for
/// `connect()` with `errno`.
fn assert_all_failed(t: &Value, reason: &str, errno: &str) {
    assert_eq!(
        (t["established"].as_u64(), t["failed"].as_u64()),
        (Some(0), Some(COUNT)),
        "{t:#}"
    );
    assert_eq!(t["reasons"], serde_json::json!({ reason: COUNT }), "{t:#}");
    assert_eq!(t["errors"], serde_json::json!({ errno: COUNT }), "{t:#}");
}
