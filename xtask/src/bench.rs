//! `cargo xtask bench`: what connprobe costs and how much it holds, side by side with the peers
//! that work on this kernel (issue 5).
//!
//! Every measurement runs in interleaved rounds (a b c d e f, then again, each round starting
//! one tool later), and reports medians with min-max; ratios compare tools within one round.
//! Per round and tool, one session of the tool runs these phases:
//! 1. connect storm (closed loop): connections/s, relative to (a) in the same round;
//! 2. fixed rate (half of (a)'s calibrated rate): machine CPU (/proc/stat), the tool's own CPU,
//!    RSS; then a shorter fixed-rate phase with `kernel.bpf_stats_enabled=1` for the in-kernel
//!    time of the tool's programs (on only then: the stats themselves cost two clock reads per
//!    hit);
//! 3. for connprobe, a storm while /metrics is scraped every 100 ms (latency p50/p99).
//!
//! Then, with connprobe alone: a failure storm (refused connects, a lossy namespace path) checked
//! against ground truth, 100,000 distinct destinations (RSS, series count), and an overload
//! (SIGSTOP of the reader with a 64 KiB ring buffer) checking `produced == delivered + lost`.
mod lab;
mod load;
mod stats;
mod sys;
mod tools;

use std::{
    collections::BTreeMap,
    fs,
    io::BufRead as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool, atomic::Ordering::Relaxed},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{
    build, cmd,
    packages::{Install, Task},
    setup,
};
use stats::{Spread, json_of, quantile, show};
use tools::{Session, Stopped, Tool};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Smoke run (about a minute): one short round of everything; fails only if a tool did not
    /// start or produced no number, never on ratios.
    #[arg(long)]
    quick: bool,
    /// Interleaved rounds (default 7; 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per storm and fixed-rate phase (default 5; 1 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Where the results go (default bench/results.json; with --quick,
    /// target/bench/results-quick.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

impl Options {
    /// The smoke run `cargo xtask test` includes.
    pub fn quick() -> Self {
        Options {
            quick: true,
            rounds: None,
            seconds: None,
            json: None,
        }
    }
}

/// The sizes of one bench run.
struct Plan {
    quick: bool,
    rounds: usize,
    phase: Duration,
    calibration_rounds: usize,
    refused_connects: u32,
    lossy_connections: u32,
    lossy_bytes: usize,
    destinations: u32,
    overload_stop: Duration,
}

impl Plan {
    fn new(options: &Options) -> anyhow::Result<Self> {
        let quick = options.quick;
        let rounds = options.rounds.unwrap_or(if quick { 1 } else { 7 });
        let seconds = options.seconds.unwrap_or(if quick { 1.0 } else { 5.0 });
        anyhow::ensure!(rounds >= 1, "--rounds must be at least 1");
        anyhow::ensure!(
            (0.2..=600.0).contains(&seconds),
            "--seconds must be between 0.2 and 600"
        );
        Ok(Self {
            quick,
            rounds,
            phase: Duration::from_secs_f64(seconds),
            calibration_rounds: if quick { 1 } else { 3 },
            refused_connects: if quick { 500 } else { 20_000 },
            lossy_connections: if quick { 2 } else { 8 },
            lossy_bytes: if quick { 128 << 10 } else { 1 << 20 },
            destinations: if quick { 2_000 } else { 100_000 },
            overload_stop: Duration::from_secs(if quick { 1 } else { 5 }),
        })
    }
}

/// One tool in one round.
#[derive(Debug, Default)]
struct Sample {
    storm_rate: f64,
    storm_errors: u64,
    fixed_conns: u64,
    fixed_rate: f64,
    machine_cpu_s: f64,
    load_cpu_s: f64,
    tool_cpu_s: f64,
    bpf_ns_per_conn: Option<f64>,
    bpf_runs_per_conn: Option<f64>,
    rss_bytes: Option<u64>,
    scrape_ms: Vec<f64>,
    scrape_storm_rate: Option<f64>,
    stopped: Stopped,
}

pub fn run(options: &Options, install: Install) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!(
            "the bench loads eBPF programs, creates network namespaces and sets sysctls, so `cargo xtask bench` must run as root (e.g. `sudo -E cargo xtask bench`)"
        );
    }
    setup::run(Task::Bench, install)?;
    measure(options)
}

/// Builds connprobe (release) and runs the bench, once setup has run (`cargo xtask test` runs
/// setup itself before its smoke run).
pub fn measure(options: &Options) -> anyhow::Result<()> {
    let plan = Plan::new(options)?;
    let connprobe = build::connprobe(true)?;
    let _tracefs = sys::Tracefs::ensure()?;
    let json_path = match &options.json {
        Some(path) => path.clone(),
        None if plan.quick => cmd::target_dir()?.join("bench/results-quick.json"),
        None => cmd::workspace_root().join("bench/results.json"),
    };
    let work = std::env::temp_dir().join(format!("connprobe-bench-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let result = bench(&plan, &connprobe, &work, &json_path);
    let _ = fs::remove_dir_all(&work);
    result
}

fn bench(plan: &Plan, connprobe: &Path, work: &Path, json_path: &Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let servers = load::Servers::start(load::SERVER_PORTS)?;
    let ports = servers.ports().to_vec();

    // Calibration: the untraced closed-loop rate, to pace the fixed-rate phases at half of it.
    let calibration: Vec<f64> = (0..plan.calibration_rounds)
        .map(|_| load::storm(&ports, plan.phase, None).rate())
        .collect();
    let untraced_rate = Spread::of(&calibration).context("no calibration round ran")?;
    let fixed_rate = untraced_rate.median / 2.0;
    eprintln!(
        "bench: untraced storm {:.0} conn/s (calibration); fixed-rate phases at {fixed_rate:.0} conn/s",
        untraced_rate.median
    );

    let mut samples: BTreeMap<Tool, Vec<Sample>> = BTreeMap::new();
    let mut failures = Vec::new();
    for round in 0..plan.rounds {
        for i in 0..Tool::ALL.len() {
            let tool = Tool::ALL[(round + i) % Tool::ALL.len()];
            eprintln!(
                "bench: round {}/{}: {}",
                round + 1,
                plan.rounds,
                tool.label()
            );
            match measure_tool(plan, tool, connprobe, work, &ports, fixed_rate) {
                Ok(sample) => samples.entry(tool).or_default().push(sample),
                Err(e) => {
                    eprintln!("bench: {} FAILED: {e:#}", tool.label());
                    failures.push(format!("{} (round {}): {e:#}", tool.label(), round + 1));
                }
            }
            let _ = fs::remove_file(work.join(format!("{}.out", tool.key())));
        }
    }
    drop(servers);

    let rounds = summarize_rounds(&samples);
    let failure_storm = failure_storm(plan, connprobe, work).unwrap_or_else(|e| {
        failures.push(format!("failure storm: {e:#}"));
        json!({ "error": format!("{e:#}") })
    });
    let spread = destination_spread(plan, connprobe, work).unwrap_or_else(|e| {
        failures.push(format!("destination spread: {e:#}"));
        json!({ "error": format!("{e:#}") })
    });
    let overload = overload(plan, connprobe, work).unwrap_or_else(|e| {
        failures.push(format!("overload: {e:#}"));
        json!({ "error": format!("{e:#}") })
    });

    let mut results = json!({
        "date": sys::output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])?.trim(),
        "machine": machine(),
        "mode": if plan.quick { "quick" } else { "full" },
        "rounds": plan.rounds,
        "phase_seconds": plan.phase.as_secs_f64(),
        "client_threads": load::CLIENT_THREADS,
        "server_ports": load::SERVER_PORTS,
        "calibration_untraced_conn_per_s": untraced_rate.to_json(),
        "fixed_rate_conn_per_s": fixed_rate,
        "tools": rounds,
        "failure_storm": failure_storm,
        "destination_spread": spread,
        "overload": overload,
        "failures": failures,
        "took_seconds": started.elapsed().as_secs(),
    });
    results["targets"] = targets(&results);
    println!("{}", table(&results));
    if let Some(dir) = json_path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(json_path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!("bench: results in {}", json_path.display());

    if !failures.is_empty() {
        bail!(
            "{} part(s) failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    if plan.quick {
        check_every_tool_measured(&results)?;
    }
    Ok(())
}

/// One session of `tool`: storm, fixed rate (CPU, RSS, then bpf stats), scrape storm.
fn measure_tool(
    plan: &Plan,
    tool: Tool,
    connprobe: &Path,
    work: &Path,
    ports: &[u16],
    fixed_rate: f64,
) -> anyhow::Result<Sample> {
    let session = Session::start(tool, connprobe, work, &[])?;
    let mut sample = Sample::default();

    let storm = load::storm(ports, plan.phase, None);
    sample.storm_rate = storm.rate();
    sample.storm_errors = storm.errors;

    let machine = sys::machine_busy_seconds();
    let own = sys::own_cpu_seconds();
    let tool_cpu = session.pid().map(sys::process_cpu_seconds);
    let fixed = load::storm(ports, plan.phase, Some(fixed_rate));
    sample.machine_cpu_s = sys::machine_busy_seconds() - machine;
    sample.load_cpu_s = sys::own_cpu_seconds() - own;
    sample.tool_cpu_s = match (session.pid(), tool_cpu) {
        (Some(pid), Some(before)) => sys::process_cpu_seconds(pid) - before,
        _ => 0.0,
    };
    sample.fixed_conns = fixed.completed;
    sample.fixed_rate = fixed.rate();
    sample.rss_bytes = session.pid().and_then(sys::rss_bytes);

    if let Some(pid) = session.pid() {
        let stats_on = sys::BpfStatsOn::enable()?;
        let before = sys::prog_stats(pid);
        let measured = load::storm(ports, plan.phase / 2, Some(fixed_rate));
        let after = sys::prog_stats(pid);
        drop(stats_on);
        let conns = measured.completed.max(1) as f64;
        sample.bpf_ns_per_conn =
            Some(after.run_time_ns.saturating_sub(before.run_time_ns) as f64 / conns);
        sample.bpf_runs_per_conn =
            Some(after.run_cnt.saturating_sub(before.run_cnt) as f64 / conns);
    }

    if let Some(addr) = session.metrics_addr() {
        let stop = Arc::new(AtomicBool::new(false));
        let scraper = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || load::scrape_loop(addr, Duration::from_millis(100), &stop))
        };
        let storm = load::storm(ports, plan.phase, None);
        stop.store(true, Relaxed);
        let latencies = scraper.join().unwrap_or_default();
        sample.scrape_ms = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        sample.scrape_storm_rate = Some(storm.rate());
    }

    sample.stopped = session.stop()?;
    Ok(sample)
}

/// Per tool: medians and ranges over the rounds, ratios taken against (a) of the same round.
fn summarize_rounds(samples: &BTreeMap<Tool, Vec<Sample>>) -> Value {
    let untraced = samples.get(&Tool::Untraced);
    let per_conn = |s: &Sample, seconds: f64| seconds / s.fixed_conns.max(1) as f64 * 1e6;
    let mut tools = serde_json::Map::new();
    for tool in Tool::ALL {
        let Some(list) = samples.get(&tool) else {
            tools.insert(
                tool.key().into(),
                json!({ "label": tool.label(), "error": "no round ran" }),
            );
            continue;
        };
        // Pair each sample with (a) of the same round (by index: a failed round shifts nothing
        // as long as (a) never fails, and (a) runs no tool).
        let paired: Vec<(&Sample, Option<&Sample>)> = list
            .iter()
            .enumerate()
            .map(|(i, s)| (s, untraced.and_then(|u| u.get(i))))
            .collect();
        let values = |f: &dyn Fn(&Sample, Option<&Sample>) -> Option<f64>| {
            Spread::of(
                &paired
                    .iter()
                    .filter_map(|(s, u)| f(s, *u))
                    .collect::<Vec<_>>(),
            )
        };
        let storm = values(&|s, _| Some(s.storm_rate));
        let ratio = values(&|s, u| Some(s.storm_rate / u?.storm_rate));
        let machine = values(&|s, _| Some(per_conn(s, s.machine_cpu_s)));
        let machine_added =
            values(&|s, u| Some(per_conn(s, s.machine_cpu_s) - per_conn(u?, u?.machine_cpu_s)));
        let attributed_added = values(&|s, u| {
            Some(per_conn(s, s.load_cpu_s + s.tool_cpu_s) - per_conn(u?, u?.load_cpu_s))
        });
        let tool_cpu = values(&|s, _| (tool != Tool::Untraced).then(|| per_conn(s, s.tool_cpu_s)));
        let bpf = values(&|s, _| s.bpf_ns_per_conn);
        let bpf_runs = values(&|s, _| s.bpf_runs_per_conn);
        let rss = values(&|s, _| s.rss_bytes.map(|b| b as f64 / (1 << 20) as f64));
        let achieved = values(&|s, _| Some(s.fixed_rate));
        let scrape: Vec<f64> = list
            .iter()
            .flat_map(|s| s.scrape_ms.iter().copied())
            .collect();
        let scrape_storm = values(&|s, u| Some(s.scrape_storm_rate? / u?.storm_rate));
        let lost: Option<u64> = if tool == Tool::Untraced {
            None
        } else {
            list.iter().map(|s| s.stopped.lost).sum()
        };
        let tallies: Vec<Value> = list
            .iter()
            .filter_map(|s| s.stopped.tally.as_ref().map(|t| json!(t)))
            .collect();
        let mut entry = json!({
            "label": tool.label(),
            "storm": {
                "conn_per_s": json_of(storm),
                "ratio_to_untraced": json_of(ratio),
                "connect_errors": list.iter().map(|s| s.storm_errors).sum::<u64>(),
            },
            "fixed_rate": {
                "achieved_conn_per_s": json_of(achieved),
                "machine_cpu_us_per_conn": json_of(machine),
                "machine_added_us_per_conn": json_of(machine_added),
                "load_plus_tool_added_us_per_conn": json_of(attributed_added),
                "tool_process_cpu_us_per_conn": json_of(tool_cpu),
                "bpf_prog_ns_per_conn": json_of(bpf),
                "bpf_prog_runs_per_conn": json_of(bpf_runs),
                "rss_mib": json_of(rss),
            },
            "events_lost": lost,
            "events_lost_source": match tool {
                Tool::Untraced => "-",
                Tool::Connprobe | Tool::Floor => "connprobe's tally at exit (ringbuf+map+queue+log), all phases",
                Tool::Bpftrace => "bpftrace's 'Lost N events' warnings on stderr, all phases",
                _ => "the tool's 'lost N events on CPU' perf-buffer warnings on stderr, all phases",
            },
            "output_lines": list.iter().map(|s| s.stopped.output_lines).sum::<u64>(),
            "tallies": tallies,
        });
        if !scrape.is_empty() {
            entry["scrape"] = json!({
                "samples": scrape.len(),
                "p50_ms": quantile(&scrape, 0.5),
                "p99_ms": quantile(&scrape, 0.99),
                "max_ms": quantile(&scrape, 1.0),
                "storm_ratio_to_untraced_while_scraping": json_of(scrape_storm),
            });
        }
        tools.insert(tool.key().into(), entry);
    }
    Value::Object(tools)
}

/// Refused connects and a lossy path, with connprobe running: its JSON log against the truth.
fn failure_storm(plan: &Plan, connprobe: &Path, work: &Path) -> anyhow::Result<Value> {
    eprintln!("bench: failure storm");
    let lab = lab::LossyLab::new()?;
    let listener = lab.listen()?;
    let client_before = lab.client_retrans_segs()?;
    let server_before = lab.server_retrans_segs()?;
    // Found before the agent starts: the probe connect must not count.
    let port = load::refused_port()?;
    let session = Session::start(Tool::Connprobe, connprobe, work, &[])?;
    let log = session
        .output_path()
        .context("connprobe has a log")?
        .to_owned();

    let refused = load::refused_connects(vec![
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        plan.refused_connects as usize
    ]);

    let connections = plan.lossy_connections;
    let server = std::thread::spawn(move || load::sink_server(listener, connections));
    let bytes = plan.lossy_bytes;
    let per_thread = connections.div_ceil(2);
    let clients: Vec<_> = (0..2)
        .map(|_| {
            lab.in_client(move || {
                load::bulk_sends(
                    SocketAddr::from((lab::SERVER_IP, lab::LOSSY_PORT)),
                    per_thread.min(connections),
                    bytes,
                )
            })
        })
        .collect();
    let mut lossy = load::Outcome::default();
    for client in clients {
        let outcome = lab::join(client)?;
        lossy.completed += outcome.completed;
        lossy.errors += outcome.errors;
        lossy.elapsed = lossy.elapsed.max(outcome.elapsed);
    }
    let _ = server.join();
    // The server's FIN can still be resent (the client's last ACK may be dropped): let the
    // retransmit timers settle before reading the counters.
    std::thread::sleep(Duration::from_secs(2));
    let client_retrans = lab.client_retrans_segs()? - client_before;
    let server_retrans = lab.server_retrans_segs()? - server_before;
    let stopped = session.stop()?;
    drop(lab);

    let counted = count_log(&log, port)?;
    let _ = fs::remove_file(&log);
    Ok(json!({
        "refused": {
            "connects_made": plan.refused_connects,
            "refused_seen_by_client": refused.completed,
            "connprobe_failed_connects_reason_refused": counted.refused,
            "match": counted.refused == refused.completed,
            "logged_twice_for_one_client_port": counted.refused_repeats,
        },
        "lossy": {
            "path": "veth between two namespaces, nftables drops 20% of segments to the server port",
            "connections": lossy.completed + lossy.errors,
            "connections_completed": lossy.completed,
            "bytes_per_connection": bytes,
            "client_tcp_retrans_segs_nstat": client_retrans,
            "connprobe_client_retransmit_segments": counted.client_segments,
            "client_match": counted.client_segments == client_retrans,
            "server_tcp_retrans_segs_nstat": server_retrans,
            "connprobe_server_retransmit_segments": counted.server_segments,
            "server_match": counted.server_segments == server_retrans,
        },
        "connprobe_events_lost": stopped.lost,
    }))
}

#[derive(Default)]
struct LogCounts {
    refused: u64,
    /// Refused connects logged more than once for the same client port, as logged.
    refused_repeats: Vec<Value>,
    client_segments: u64,
    server_segments: u64,
}

/// Failed connects to 127.0.0.1:`port` with reason refused, and retransmitted segments sent
/// from the lab's client and server addresses.
fn count_log(log: &Path, port: u16) -> anyhow::Result<LogCounts> {
    let file = fs::File::open(log).with_context(|| format!("cannot read {}", log.display()))?;
    let mut counts = LogCounts::default();
    let (client, server) = (lab::CLIENT_IP.to_string(), lab::SERVER_IP.to_string());
    let mut refused_ports: BTreeMap<u64, Value> = BTreeMap::new();
    for line in std::io::BufReader::new(file).lines() {
        let Ok(event) = serde_json::from_str::<Value>(&line?) else {
            continue;
        };
        match event["type"].as_str() {
            Some("connect")
                if event["side"] == "client"
                    && event["outcome"] == "failed"
                    && event["reason"] == "refused"
                    && event["dst_ip"] == "127.0.0.1"
                    && event["dst_port"] == port =>
            {
                counts.refused += 1;
                let src_port = event["src_port"].as_u64().unwrap_or(0);
                if let Some(first) = refused_ports.insert(src_port, event.clone())
                    && counts.refused_repeats.len() < 6
                {
                    counts.refused_repeats.push(first);
                    counts.refused_repeats.push(event);
                }
            }
            Some("retransmit") => {
                let segments = event["segments"].as_u64().unwrap_or(0);
                if event["src_ip"] == client.as_str() {
                    counts.client_segments += segments;
                } else if event["src_ip"] == server.as_str() {
                    counts.server_segments += segments;
                }
            }
            _ => {}
        }
    }
    Ok(counts)
}

/// Refused connects to many distinct destinations: RSS and /metrics series before, halfway, after.
fn destination_spread(plan: &Plan, connprobe: &Path, work: &Path) -> anyhow::Result<Value> {
    eprintln!("bench: {} distinct destinations", plan.destinations);
    let port = load::refused_port()?;
    let session = Session::start(Tool::Connprobe, connprobe, work, &[])?;
    let pid = session.pid().context("connprobe runs")?;
    let destinations = load::spread_destinations(plan.destinations, port);
    let observe = || {
        std::thread::sleep(Duration::from_millis(500));
        let series = session
            .metrics_addr()
            .and_then(|addr| load::get_metrics(addr).ok())
            .map(|body| load::series_count(&body));
        (sys::rss_bytes(pid), series)
    };
    let mut points = vec![(0u32, observe())];
    let half = destinations.len() / 2;
    let mut made = 0u64;
    for part in [&destinations[..half], &destinations[half..]] {
        made += load::refused_connects(part.to_vec()).completed;
        points.push((
            points.last().map_or(0, |p| p.0) + part.len() as u32,
            observe(),
        ));
    }
    let stopped = session.stop()?;
    let metrics_there = points.iter().all(|(_, (_, series))| series.is_some());
    let mib = |b: Option<u64>| b.map(|b| b as f64 / (1 << 20) as f64);
    Ok(json!({
        "destinations": plan.destinations,
        "refused_connects_made": made,
        "points": points.iter().map(|(n, (rss, series))| json!({
            "after_destinations": n,
            "rss_mib": mib(*rss),
            "metrics_series": series,
        })).collect::<Vec<_>>(),
        "metrics_available": metrics_there,
        "connprobe_events_lost": stopped.lost,
    }))
}

/// A storm with a 64 KiB ring buffer while the agent is stopped (SIGSTOP) for a while:
/// every event the kernel produced must be delivered or counted as lost.
fn overload(plan: &Plan, connprobe: &Path, work: &Path) -> anyhow::Result<Value> {
    eprintln!(
        "bench: overload (SIGSTOP for {} s)",
        plan.overload_stop.as_secs()
    );
    let servers = load::Servers::start(load::SERVER_PORTS)?;
    let ports = servers.ports().to_vec();
    let session = Session::start(
        Tool::Connprobe,
        connprobe,
        work,
        &["--ring-buffer-bytes", "65536"],
    )?;
    let margin = Duration::from_secs(1);
    let total = margin + plan.overload_stop + margin;
    let storm = std::thread::spawn(move || load::storm(&ports, total, None));
    std::thread::sleep(margin);
    session.signal(libc::SIGSTOP);
    std::thread::sleep(plan.overload_stop);
    session.signal(libc::SIGCONT);
    let outcome = storm
        .join()
        .map_err(|_| anyhow::anyhow!("the storm panicked"))?;
    std::thread::sleep(Duration::from_millis(500));
    let stopped = session.stop()?;
    drop(servers);
    let produced = stopped.tally_value("kernel");
    let delivered = stopped.delivered();
    let ringbuf = stopped.tally_value("ringbuf");
    let undecodable = stopped.tally_value("undecodable");
    Ok(json!({
        "ring_buffer_bytes": 65536,
        "reader_stopped_seconds": plan.overload_stop.as_secs_f64(),
        "connections": outcome.completed,
        "produced_in_kernel": produced,
        "delivered": delivered,
        "lost_ringbuf": ringbuf,
        "lost_map": stopped.tally_value("map"),
        "lost_queue": stopped.tally_value("queue"),
        "lost_log": stopped.tally_value("log"),
        "undecodable": undecodable,
        "produced_equals_delivered_plus_lost": produced == delivered + ringbuf + undecodable,
        "tally": stopped.tally,
    }))
}

fn machine() -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")?
            .split_once(':')
            .map(|(_, m)| m.trim().to_owned())
    });
    json!({
        "kernel": sys::output("uname", &["-r"]).map(|s| s.trim().to_owned()).ok(),
        "cpu_model": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "memory_gib": fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            let kib: f64 = m.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some((kib / (1 << 20) as f64 * 10.0).round() / 10.0)
        }),
    })
}

fn median(results: &Value, pointer: &str) -> Option<f64> {
    results.pointer(pointer)?.get("median")?.as_f64()
}

/// Each issue-5 target with the figure measured here.
fn targets(r: &Value) -> Value {
    let ratio = median(r, "/tools/connprobe/storm/ratio_to_untraced");
    let floor = median(r, "/tools/floor/storm/ratio_to_untraced");
    let added = median(r, "/tools/connprobe/fixed_rate/machine_added_us_per_conn");
    let attributed = median(
        r,
        "/tools/connprobe/fixed_rate/load_plus_tool_added_us_per_conn",
    );
    let agent = median(
        r,
        "/tools/connprobe/fixed_rate/tool_process_cpu_us_per_conn",
    );
    let lost = r
        .pointer("/tools/connprobe/events_lost")
        .and_then(Value::as_u64);
    let overload_ok = r
        .pointer("/overload/produced_equals_delivered_plus_lost")
        .and_then(Value::as_bool);
    let points = r
        .pointer("/destination_spread/points")
        .and_then(Value::as_array);
    let last = points.and_then(|p| p.last());
    let rss = last.and_then(|p| p["rss_mib"].as_f64());
    let p99 = r
        .pointer("/tools/connprobe/scrape/p99_ms")
        .and_then(Value::as_f64);
    let met = |ok: Option<bool>| ok.map_or(Value::Null, Value::Bool);
    json!([
        {"target": "storm >= 0.95 of untraced", "measured": ratio, "met": met(ratio.map(|v| v >= 0.95))},
        {"target": "storm within 0.03 of the floor (c)", "measured": ratio.zip(floor).map(|(b, c)| c - b),
         "met": met(ratio.zip(floor).map(|(b, c)| c - b <= 0.03))},
        {"target": "<= 1.5 us added machine CPU per connection (/proc/stat)", "measured": added,
         "met": met(added.map(|v| v <= 1.5))},
        {"target": "<= 1.5 us added CPU per connection (load generator + agent processes)", "measured": attributed,
         "met": met(attributed.map(|v| v <= 1.5))},
        {"target": "<= 0.5 us per connection in the agent process", "measured": agent,
         "met": met(agent.map(|v| v <= 0.5))},
        {"target": "zero events lost at the maximum connect rate", "measured": lost, "met": met(lost.map(|v| v == 0))},
        {"target": "overload: produced == delivered + lost", "measured": overload_ok, "met": met(overload_ok)},
        {"target": "RSS <= 64 MiB after the distinct destinations", "measured": rss, "met": met(rss.map(|v| v <= 64.0))},
        {"target": "/metrics p99 <= 50 ms under the storm", "measured": p99, "met": met(p99.map(|v| v <= 50.0))},
    ])
}

/// The table printed on stdout: the same numbers as the JSON.
fn table(r: &Value) -> String {
    use std::fmt::Write as _;
    let spread = |pointer: &str, decimals: usize| -> String {
        let s = r.pointer(pointer).and_then(|v| {
            Some(Spread {
                median: v.get("median")?.as_f64()?,
                min: v.get("min")?.as_f64()?,
                max: v.get("max")?.as_f64()?,
                n: 0,
            })
        });
        show(s, decimals)
    };
    let mut out = String::new();
    let m = &r["machine"];
    let _ = writeln!(
        out,
        "\nconnprobe bench, {} ({} mode), kernel {}, {} x {}, {} rounds of {} s, medians (min-max)\n",
        r["date"].as_str().unwrap_or("?"),
        r["mode"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["cores"],
        m["cpu_model"].as_str().unwrap_or("?"),
        r["rounds"],
        r["phase_seconds"],
    );
    let _ = writeln!(
        out,
        "| configuration | storm conn/s | vs (a) | events lost | added machine CPU us/conn | added load+tool CPU us/conn | tool process CPU us/conn | in-kernel ns/conn | RSS MiB |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for tool in Tool::ALL {
        let k = tool.key();
        let lost = match &r["tools"][k]["events_lost"] {
            Value::Null if tool == Tool::Untraced => "-".to_owned(),
            Value::Null => "not reported".to_owned(),
            v => v.to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {lost} | {} | {} | {} | {} | {} |",
            tool.label(),
            spread(&format!("/tools/{k}/storm/conn_per_s"), 0),
            spread(&format!("/tools/{k}/storm/ratio_to_untraced"), 3),
            spread(
                &format!("/tools/{k}/fixed_rate/machine_added_us_per_conn"),
                2
            ),
            spread(
                &format!("/tools/{k}/fixed_rate/load_plus_tool_added_us_per_conn"),
                2
            ),
            spread(
                &format!("/tools/{k}/fixed_rate/tool_process_cpu_us_per_conn"),
                2
            ),
            spread(&format!("/tools/{k}/fixed_rate/bpf_prog_ns_per_conn"), 0),
            spread(&format!("/tools/{k}/fixed_rate/rss_mib"), 1),
        );
    }
    let _ = writeln!(
        out,
        "\nfixed rate: {:.0} conn/s (half the calibrated untraced rate)",
        r["fixed_rate_conn_per_s"].as_f64().unwrap_or(0.0)
    );
    let scrape = &r["tools"]["connprobe"]["scrape"];
    if scrape.is_null() {
        let _ = writeln!(
            out,
            "/metrics under the storm: not measured (/metrics never answered)"
        );
    } else {
        let _ = writeln!(
            out,
            "/metrics under the storm: p50 {} ms, p99 {} ms, max {} ms over {} scrapes",
            fmt_ms(&scrape["p50_ms"]),
            fmt_ms(&scrape["p99_ms"]),
            fmt_ms(&scrape["max_ms"]),
            scrape["samples"]
        );
    }
    let f = &r["failure_storm"];
    let _ = writeln!(
        out,
        "failure storm: refused {} made, {} refused at the client, {} counted by connprobe; lossy path: TcpRetransSegs client {} vs connprobe {}, server {} vs connprobe {}",
        f["refused"]["connects_made"],
        f["refused"]["refused_seen_by_client"],
        f["refused"]["connprobe_failed_connects_reason_refused"],
        f["lossy"]["client_tcp_retrans_segs_nstat"],
        f["lossy"]["connprobe_client_retransmit_segments"],
        f["lossy"]["server_tcp_retrans_segs_nstat"],
        f["lossy"]["connprobe_server_retransmit_segments"],
    );
    let points: Vec<String> = r["destination_spread"]["points"]
        .as_array()
        .map(|p| {
            p.iter()
                .map(|p| {
                    format!(
                        "{}: {} MiB, {} series",
                        p["after_destinations"],
                        p["rss_mib"]
                            .as_f64()
                            .map_or("?".into(), |v| format!("{v:.1}")),
                        p["metrics_series"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "destination spread (after N destinations): {}",
        points.join("; ")
    );
    let o = &r["overload"];
    let _ = writeln!(
        out,
        "overload (64 KiB ring, reader stopped {} s): produced {} = delivered {} + lost ringbuf {} (+ undecodable {}): {}",
        o["reader_stopped_seconds"],
        o["produced_in_kernel"],
        o["delivered"],
        o["lost_ringbuf"],
        o["undecodable"],
        o["produced_equals_delivered_plus_lost"]
    );
    let _ = writeln!(out, "\ntargets (issue 5):");
    for t in r["targets"].as_array().into_iter().flatten() {
        let verdict = match t["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        let _ = writeln!(
            out,
            "  {:<70} {:>12}  {verdict}",
            t["target"].as_str().unwrap_or(""),
            fmt_value(&t["measured"])
        );
    }
    out
}

fn fmt_ms(v: &Value) -> String {
    v.as_f64().map_or("?".into(), |v| format!("{v:.1}"))
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_f64() => format!("{:.3}", n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    }
}

/// The smoke check: every tool produced its storm rate, CPU numbers and, for connprobe, every
/// scenario its figures.
fn check_every_tool_measured(r: &Value) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for tool in Tool::ALL {
        let k = tool.key();
        let mut need = vec![
            format!("/tools/{k}/storm/conn_per_s/median"),
            format!("/tools/{k}/fixed_rate/machine_cpu_us_per_conn/median"),
        ];
        if tool != Tool::Untraced {
            need.push(format!(
                "/tools/{k}/fixed_rate/tool_process_cpu_us_per_conn/median"
            ));
            need.push(format!("/tools/{k}/fixed_rate/bpf_prog_ns_per_conn/median"));
            need.push(format!("/tools/{k}/fixed_rate/rss_mib/median"));
            need.push(format!("/tools/{k}/events_lost"));
        }
        if !matches!(tool, Tool::Untraced | Tool::Floor)
            && r["tools"][k]["output_lines"].as_u64() == Some(0)
        {
            missing.push(format!("{}: wrote no output", tool.label()));
        }
        for pointer in need {
            if r.pointer(&pointer).and_then(Value::as_f64).is_none() {
                missing.push(pointer);
            }
        }
    }
    let metrics = r.pointer("/tools/connprobe/scrape/p99_ms").is_some()
        || r["destination_spread"]["metrics_available"] == true;
    if metrics {
        for pointer in [
            "/tools/connprobe/scrape/p99_ms",
            "/destination_spread/points/2/metrics_series",
        ] {
            if r.pointer(pointer).and_then(Value::as_f64).is_none() {
                missing.push(pointer.to_owned());
            }
        }
    } else {
        println!(
            "bench --quick: note: connprobe's /metrics never answered, so scrape latency and series were not checked"
        );
    }
    for pointer in [
        "/failure_storm/refused/connprobe_failed_connects_reason_refused",
        "/failure_storm/lossy/client_tcp_retrans_segs_nstat",
        "/destination_spread/points/2/rss_mib",
        "/overload/produced_in_kernel",
    ] {
        if r.pointer(pointer).and_then(Value::as_f64).is_none() {
            missing.push(pointer.to_owned());
        }
    }
    if !missing.is_empty() {
        bail!(
            "the smoke bench produced no number for: {}",
            missing.join(", ")
        );
    }
    println!("bench --quick: every tool ran and produced its numbers");
    Ok(())
}
