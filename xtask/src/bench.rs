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
//!
//! Last, a DNS query storm (issue 12, `dns_storm`): UDP queries to the lab's DNS server on
//! loopback, in its own interleaved rounds of (a), (b) and (b=) --no-dns: queries/s, the DNS
//! programs' in-kernel ns per query, the agent's CPU per query.
//!
//! `--scenarios` runs only some of these parts.
mod dns_storm;
mod lab;
mod load;
mod report;
mod rounds;
mod scenarios;
mod stats;
mod sys;
mod tools;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::ValueEnum as _;
use serde_json::json;

use crate::{
    build, cmd,
    packages::{Install, Task},
    setup,
};
use rounds::Sample;
use stats::Spread;
use tools::{Binaries, Tool};

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
    /// Also run this connprobe binary as configuration (b0), interleaved with the others, and
    /// compare the agent's CPU per connection round by round (e.g. a release build of the
    /// previous commit).
    #[arg(long, value_name = "PATH")]
    baseline: Option<PathBuf>,
    /// Run only these configurations (comma-separated keys; `untraced` is always run, as the
    /// reference of every ratio).
    #[arg(long, value_delimiter = ',', value_name = "KEYS")]
    tools: Option<Vec<Tool>>,
    /// Run only these parts of the bench (comma-separated; default all).
    #[arg(long, value_delimiter = ',', value_name = "PARTS")]
    scenarios: Option<Vec<Scenario>>,
}

/// A part of the bench; `--scenarios` picks some.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
#[value(rename_all = "kebab-case")]
pub enum Scenario {
    /// The interleaved rounds of every configuration: connect storm, fixed rate, scrapes.
    Connect,
    /// Refused connects and a lossy path against ground truth.
    Failures,
    /// Many distinct destinations: RSS and series.
    Spread,
    /// The reader stopped under a storm: produced == delivered + lost.
    Overload,
    /// The DNS query storm: (a), (b), (b=) --no-dns.
    Dns,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::Connect,
        Scenario::Failures,
        Scenario::Spread,
        Scenario::Overload,
        Scenario::Dns,
    ];
}

impl Options {
    /// The smoke run `cargo xtask test` includes.
    pub fn quick() -> Self {
        Options {
            quick: true,
            rounds: None,
            seconds: None,
            json: None,
            baseline: None,
            tools: None,
            scenarios: None,
        }
    }
}

/// The sizes of one bench run.
struct Plan {
    quick: bool,
    /// The configurations of the rounds, in order.
    tools: Vec<Tool>,
    /// The parts to run.
    scenarios: Vec<Scenario>,
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
        let mut tools = options
            .tools
            .clone()
            .unwrap_or_else(|| Tool::DEFAULT.to_vec());
        if options.baseline.is_some() {
            tools.push(Tool::ConnprobeBaseline);
        }
        tools.push(Tool::Untraced);
        tools.sort();
        tools.dedup();
        anyhow::ensure!(
            options.baseline.is_some() || !tools.contains(&Tool::ConnprobeBaseline),
            "the connprobe-baseline configuration needs --baseline PATH"
        );
        let mut scenarios = options
            .scenarios
            .clone()
            .unwrap_or_else(|| Scenario::ALL.to_vec());
        scenarios.sort();
        scenarios.dedup();
        Ok(Self {
            quick,
            tools,
            scenarios,
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

    fn runs(&self, scenario: Scenario) -> bool {
        self.scenarios.contains(&scenario)
    }
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
    if let Some(baseline) = &options.baseline {
        anyhow::ensure!(
            baseline.is_file(),
            "--baseline {} is not a file: build the other connprobe first (`cargo build --release -p probe-user` in its tree)",
            baseline.display()
        );
    }
    let bins = Binaries {
        connprobe,
        baseline: options.baseline.clone(),
    };
    refuse_foreign_programs()?;
    let _tracefs = sys::Tracefs::ensure()?;
    let json_path = match &options.json {
        Some(path) => path.clone(),
        None if plan.quick => cmd::target_dir()?.join("bench/results-quick.json"),
        None => cmd::workspace_root().join("bench/results.json"),
    };
    let work = std::env::temp_dir().join(format!("connprobe-bench-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let result = bench(&plan, &bins, &work, &json_path);
    let _ = fs::remove_dir_all(&work);
    result
}

/// The tracepoints connprobe's programs attach to (and the peers' too).
const MEASURED_HOOKS: [&str; 7] = [
    "inet_sock_set_state",
    "inet_sk_error_report",
    "tcp_retransmit_skb",
    "tcp_retransmit_synack",
    "tcp_send_reset",
    "tcp_receive_reset",
    "tcp_destroy_sock",
];

/// Refuses to measure while other programs sit on the hooks being measured: a forgotten bpftrace
/// or agent slows every configuration, the untraced one too, and the ratios then lie.
fn refuse_foreign_programs() -> anyhow::Result<()> {
    let attached = sys::attached_to(&MEASURED_HOOKS)?;
    if attached.is_empty() {
        return Ok(());
    }
    let named: Vec<String> = attached
        .iter()
        .map(|a| {
            format!(
                "{} (program {}, held by {} pid {})",
                a.tracepoint, a.prog_id, a.comm, a.pid
            )
        })
        .collect();
    bail!(
        "other eBPF programs are attached to the hooks the bench measures: {}; stop them \
         (`bpftool perf show` lists them) and run the bench again",
        named.join(", ")
    )
}

fn bench(plan: &Plan, bins: &Binaries, work: &Path, json_path: &Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    let connect = if plan.runs(Scenario::Connect) {
        connect_rounds(plan, bins, work, &mut failures)?
    } else {
        ConnectRounds::default()
    };
    let mut part =
        |scenario: Scenario, name: &str, f: &dyn Fn() -> anyhow::Result<serde_json::Value>| {
            if !plan.runs(scenario) {
                return serde_json::Value::Null;
            }
            f().unwrap_or_else(|e| {
                failures.push(format!("{name}: {e:#}"));
                json!({ "error": format!("{e:#}") })
            })
        };
    let failure_storm = part(Scenario::Failures, "failure storm", &|| {
        scenarios::failure_storm(plan, bins, work)
    });
    let spread = part(Scenario::Spread, "destination spread", &|| {
        scenarios::destination_spread(plan, bins, work)
    });
    let overload = part(Scenario::Overload, "overload", &|| {
        scenarios::overload(plan, bins, work)
    });
    let dns = part(Scenario::Dns, "DNS query storm", &|| {
        dns_storm::dns_storm(plan, bins, work)
    });

    let mut results = json!({
        "date": sys::output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])?.trim(),
        "machine": report::machine(),
        "mode": if plan.quick { "quick" } else { "full" },
        "rounds": plan.rounds,
        "phase_seconds": plan.phase.as_secs_f64(),
        "client_threads": load::CLIENT_THREADS,
        "server_ports": load::SERVER_PORTS,
        "scenarios": plan.scenarios.iter().filter_map(|s| Some(s.to_possible_value()?.get_name().to_owned())).collect::<Vec<_>>(),
        "calibration_untraced_conn_per_s": connect.calibration.map(Spread::to_json),
        "fixed_rate_conn_per_s": connect.fixed_rate,
        "configurations": plan.tools.iter().map(|t| t.key()).collect::<Vec<_>>(),
        "baseline": bins.baseline.as_ref().map(|p| p.display().to_string()),
        "tools": connect.summary,
        "comparisons": connect.comparisons,
        "failure_storm": failure_storm,
        "destination_spread": spread,
        "overload": overload,
        "dns_storm": dns,
        "failures": failures,
        "took_seconds": started.elapsed().as_secs(),
    });
    results["targets"] = report::targets(&results);
    println!("{}", report::table(&plan.tools, &results));
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
        report::check_every_tool_measured(&plan.tools, &plan.scenarios, &results)?;
    }
    Ok(())
}

/// What the interleaved connect rounds gave.
#[derive(Default)]
struct ConnectRounds {
    calibration: Option<Spread>,
    fixed_rate: Option<f64>,
    summary: serde_json::Value,
    comparisons: Vec<serde_json::Value>,
}

/// Calibration, then the interleaved rounds of every configuration (a failed round is
/// recorded in `failures`).
fn connect_rounds(
    plan: &Plan,
    bins: &Binaries,
    work: &Path,
    failures: &mut Vec<String>,
) -> anyhow::Result<ConnectRounds> {
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
    for round in 0..plan.rounds {
        for i in 0..plan.tools.len() {
            let tool = plan.tools[(round + i) % plan.tools.len()];
            eprintln!(
                "bench: round {}/{}: {}",
                round + 1,
                plan.rounds,
                tool.label()
            );
            match rounds::measure_tool(plan, tool, bins, work, &ports, fixed_rate) {
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

    let comparisons = [
        (Tool::Connprobe, Tool::ConnprobeBaseline),
        (Tool::ConnprobeSerde, Tool::Connprobe),
        (Tool::Connprobe, Tool::ConnprobeNoDrops),
        (Tool::Connprobe, Tool::ConnprobeNoDns),
        (Tool::ConnprobeLru, Tool::Connprobe),
        (Tool::ConnprobeLruPerCpu, Tool::Connprobe),
    ]
    .map(|(tool, against)| rounds::agent_cpu_ratio(&samples, tool, against))
    .to_vec();
    Ok(ConnectRounds {
        calibration: Some(untraced_rate),
        fixed_rate: Some(fixed_rate),
        summary: rounds::summarize_rounds(&plan.tools, &samples),
        comparisons,
    })
}
