//! `connprobe probe TARGET...`: active connectivity checks with the kernel's view, like
//! blackbox_exporter's TCP module. Each target is connected to `--count` times (or for
//! `--duration`), at most `--concurrency` at once and `--rate` a second, each connect
//! non-blocking with `--timeout`; the agent's programs, attached in this process, report what
//! the kernel saw of exactly these sockets (`tracer`), and `report` folds both into outcome
//! counts, the kernel's reasons, SYN retransmits, handshake percentiles and the verdict
//! engine's judgement. Connects go only to the targets given.
//!
//! Exit status: 0 when every connect was established, 1 when any failed, 2 when the probe could
//! not run (a bad target or flag, a name that does not resolve, no privilege to trace).
mod progress;
pub mod report;
pub mod target;
mod tracer;

use std::{
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use tokio::{net::TcpSocket, sync::Semaphore};

use self::{
    progress::{Counts, Progress},
    report::{AttemptResult, TargetReport},
    target::Target,
    tracer::{OwnSockets, Tracer},
};
use crate::{event::Errno, units::parse_duration};

/// Every connect established.
pub const EXIT_OK: u8 = 0;
/// Some connect failed.
pub const EXIT_FAILED: u8 = 1;
/// The probe could not run.
pub const EXIT_BAD_INPUT: u8 = 2;

const EXAMPLES: &str = "\
Examples:
  connprobe probe db.internal:5432 10.0.0.7:443
      10 connects to each, 4 at a time; a verdict per target
  connprobe probe --count 100 --rate 20 --timeout 2s api.example.com:443
      100 connects at 20 a second, each given up after 2 s
  connprobe probe --duration 30s --concurrency 50 [fd00::10]:8080
      a load test of connection setup: 50 connects in flight for 30 s
  connprobe probe --json cache:6379 | jq '.targets[].verdicts[0].verdict'

Exit status: 0 when every connect was established, 1 when any connect failed, 2 when the probe
could not run (a bad target or flag, a name that does not resolve, no privilege to trace).
Needs root, or CAP_BPF and CAP_PERFMON, like `connprobe run`.";

#[derive(Debug, Clone, Args)]
#[command(after_long_help = EXAMPLES)]
pub struct ProbeArgs {
    /// Where to connect: HOST:PORT (`example.com:443`, `10.0.0.1:80`, `[fd00::1]:22`). A name
    /// is resolved once with the system resolver and its first address is used.
    #[arg(value_name = "TARGET", required = true, num_args = 1..)]
    pub targets: Vec<String>,

    /// Connects per target (default 10; with --duration, no limit but the time).
    #[arg(long, short = 'n', value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Connects in flight at once per target.
    #[arg(long, short = 'c', value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,

    /// Connects started per second per target at most (e.g. `20`, `0.5`); no limit by default.
    #[arg(long, value_name = "PER_SECOND", value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Keep connecting for this long (e.g. `30s`), a load test of connection setup.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Give a connect up (close its socket) after this long.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 1e6 => Ok(r),
        _ => Err(format!(
            "{text:?} is not a rate: give connects per second, e.g. 20 or 0.5"
        )),
    }
}

impl ProbeArgs {
    fn count(&self) -> u64 {
        match (self.count, self.duration) {
            (Some(n), _) => n,
            (None, Some(_)) => u64::MAX,
            (None, None) => 10,
        }
    }
}

/// `connprobe probe`: the exit status as documented above.
pub fn main(args: ProbeArgs) -> ExitCode {
    let bad = |e: &dyn std::fmt::Display| {
        eprintln!("connprobe: {e}");
        ExitCode::from(EXIT_BAD_INPUT)
    };
    if args.timeout.is_zero() {
        return bad(&"--timeout must be longer than 0");
    }
    let targets = match args
        .targets
        .iter()
        .map(|t| target::resolve(t))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(t) => t,
        Err(e) => return bad(&e),
    };
    let runtime = match crate::pipeline::runtime() {
        Ok(r) => r,
        Err(e) => return bad(&format!("cannot start the runtime: {e}")),
    };
    let reports = match runtime.block_on(run(&args, &targets)) {
        Ok(reports) => reports,
        Err(e) => return bad(&format!("{e:#}")),
    };
    let mut out = std::io::stdout().lock();
    let written = match args.json {
        true => {
            let all_ok = reports.iter().all(|r| r.failed == 0);
            let body = serde_json::json!({ "ok": all_ok, "targets": reports });
            writeln!(out, "{body:#}")
        }
        false => reports.iter().try_for_each(|r| write!(out, "{}", r.text())),
    };
    if let Err(e) = written.and_then(|()| out.flush()) {
        return bad(&format!("cannot write the report: {e}"));
    }
    match reports.iter().all(|r| r.failed == 0) {
        true => ExitCode::from(EXIT_OK),
        false => ExitCode::from(EXIT_FAILED),
    }
}

/// Attaches, probes every target at once, detaches, and folds results and events per target.
async fn run(args: &ProbeArgs, targets: &[Target]) -> anyhow::Result<Vec<TargetReport>> {
    let own = OwnSockets::default();
    // On the runtime's calling thread, the one that kept its capabilities.
    let tracer = Tracer::start(own.clone())?;
    let counts = Arc::new(Counts::default());
    let progress = std::io::stderr()
        .is_terminal()
        .then(|| Progress::start(counts.clone(), args.count(), targets.len(), args.duration));
    let mut tasks = Vec::new();
    for target in targets {
        let (args, own, counts) = (args.clone(), own.clone(), counts.clone());
        let addr = target.addr;
        tasks.push(tokio::spawn(async move {
            probe_target(&args, addr, own, counts).await
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await?);
    }
    if let Some(progress) = progress {
        progress.stop().await;
    }
    let events = tracer.finish().await?;
    Ok(targets
        .iter()
        .zip(&results)
        .map(|(target, results)| TargetReport::new(target, results, &events))
        .collect())
}

/// Connects to `addr` as the flags say; one result per attempt, in the order they started.
async fn probe_target(
    args: &ProbeArgs,
    addr: SocketAddr,
    own: OwnSockets,
    counts: Arc<Counts>,
) -> Vec<AttemptResult> {
    let started = Instant::now();
    let slots = Arc::new(Semaphore::new(args.concurrency as usize));
    let mut pace = args.rate.map(|rate| {
        let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        pace
    });
    let mut attempts = Vec::new();
    for _ in 0..args.count() {
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        if let Some(pace) = &mut pace {
            pace.tick().await;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        let (own, counts, timeout) = (own.clone(), counts.clone(), args.timeout);
        attempts.push(tokio::spawn(async move {
            let result = attempt(addr, timeout, &own).await;
            counts.record(&result);
            drop(slot);
            result
        }));
    }
    let mut results = Vec::with_capacity(attempts.len());
    for attempt in attempts {
        results.push(
            attempt
                .await
                .unwrap_or_else(|e| AttemptResult::Failed(format!("panicked: {e}"))),
        );
    }
    results
}

/// One non-blocking connect. The socket is bound first (an ephemeral port) so that its local
/// port is registered before the kernel's first event about it.
async fn attempt(addr: SocketAddr, timeout: Duration, own: &OwnSockets) -> AttemptResult {
    let local =
        |e: std::io::Error, what: &str| AttemptResult::Failed(format!("{what}: {}", errno(&e)));
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    let socket = match socket {
        Ok(s) => s,
        Err(e) => return local(e, "socket"),
    };
    let any: SocketAddr = match addr {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    if let Err(e) = socket.bind(any) {
        return local(e, "bind");
    }
    match socket.local_addr() {
        Ok(bound) => own.add(bound.port(), addr),
        Err(e) => return local(e, "getsockname"),
    }
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(_stream)) => AttemptResult::Established,
        Ok(Err(e)) => AttemptResult::Failed(errno(&e)),
        Err(_) => AttemptResult::Failed("timeout".into()),
    }
}

/// `ECONNREFUSED` for an OS error, the error's text otherwise.
fn errno(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => Errno::of(n).name().into_owned(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Cli, Command};

    fn probe(args: &[&str]) -> Result<super::ProbeArgs, clap::Error> {
        let mut line = vec!["connprobe", "probe"];
        line.extend_from_slice(args);
        match Cli::try_parse_from(line)?.command {
            Some(Command::Probe(args)) => Ok(args),
            other => panic!("not probe: {other:?}"),
        }
    }

    #[test]
    fn flags_and_defaults() {
        let args = probe(&["a:1", "b:2"]).unwrap();
        assert_eq!(args.targets, ["a:1", "b:2"]);
        assert_eq!((args.count(), args.concurrency, args.rate), (10, 4, None));
        let args = probe(&["--duration", "30s", "--rate", "0.5", "a:1"]).unwrap();
        assert_eq!((args.count(), args.rate), (u64::MAX, Some(0.5)));
        let args = probe(&["--duration", "30s", "-n", "7", "a:1"]).unwrap();
        assert_eq!(args.count(), 7);
        assert!(probe(&[]).is_err());
        assert!(probe(&["--rate", "0", "a:1"]).is_err());
        assert!(probe(&["--count", "0", "a:1"]).is_err());
        assert!(probe(&["--concurrency", "0", "a:1"]).is_err());
    }
}
