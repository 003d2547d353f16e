//! `connprobe watch [--fail-on RULE]... -- COMMAND ARGS...`: runs COMMAND under the agent,
//! keeps only the connections of COMMAND's processes, and at the end says what they did and
//! whether the rules hold. For CI pipelines: an integration suite, a smoke test after a deploy.
//!
//! How, top to bottom: a cgroup v2 directory is made for the run (`scope`); the agent pipeline
//! runs in this process writing its JSON log to a temporary file; once its programs are
//! attached, COMMAND starts, moving itself into the cgroup before `exec`; when COMMAND ends the
//! agent detaches and drains. The log's events whose owner's cgroup is the run's (connects,
//! and connections accepted by COMMAND's listeners) are judged by the verdict engine that
//! `analyze` uses, and DNS exchanges by the pids seen in the cgroup. The rules (`rule`) are
//! judged on the per-destination figures, and `report` writes text, JSON and JUnit.
//!
//! Exit codes: COMMAND's own when every rule holds (128 + N when signal N ended it);
//! [`RULE_FAILED`] when a rule fails; 2 for a bad command line; 1 when connprobe itself
//! failed (it could not trace; COMMAND then does not run); 127 when COMMAND cannot be started.
use std::{
    collections::HashSet,
    fs,
    io::Write as _,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use clap::Parser as _;

pub mod report;
pub mod rule;
pub mod scope;

use report::{ResolverSummary, WatchReport};
use rule::Figures;
use scope::RunCgroup;

use crate::{
    cli::{RunArgs, WatchArgs},
    diagnose::{Judge, Window, analyze},
    dns::exchange::DnsExchange,
    event::Side,
    pipeline::{self, Embedded, Embedding},
    privileges,
};

/// What `connprobe watch` exits with when a `--fail-on` rule fails, whatever COMMAND's code.
pub const RULE_FAILED: u8 = 100;
/// What it exits with when COMMAND cannot be started (as shells do).
pub const NOT_STARTED: u8 = 127;

/// How often the launcher looks at COMMAND (ended? told to stop?) and lists its processes (for
/// the DNS exchanges, which name a pid but no cgroup, and for the pid-tree fallback).
const POLL: Duration = Duration::from_millis(20);

/// What the launcher thread leaves: how COMMAND ended (`None`: it never started, the agent
/// failed first), the pids seen in its scope, and how the cgroup's removal went.
struct Launched {
    status: Option<std::io::Result<ExitStatus>>,
    pid: Option<u32>,
    /// From COMMAND's start to its end.
    ran_for: Duration,
    pids: HashSet<u32>,
    cleanup: Option<Result<usize, String>>,
}

/// `connprobe watch`: the exit code (see the module's doc).
pub fn run(args: WatchArgs) -> anyhow::Result<u8> {
    let start = SystemTime::now();
    let work = TempDir::new()?;
    let log_path = work.0.join("events.jsonl");

    let cgroup = match RunCgroup::create() {
        Ok(c) => Some(c),
        Err(why) => {
            tracing::warn!(
                "{why}; telling COMMAND's connections apart by its process tree instead \
                 (a process that lives less than {} ms may be missed)",
                POLL.as_millis()
            );
            None
        }
    };
    let cgroup_path = cgroup.as_ref().map(|c| c.path.clone());

    // The launcher is a thread of its own, started before the agent gives up its
    // capabilities: COMMAND runs with the privileges connprobe was given, as without watch.
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
    let (clean_tx, clean_rx) = mpsc::channel::<()>();
    let terminate = Arc::new(AtomicBool::new(false));
    let launcher = {
        let command = args.command.clone();
        let terminate = terminate.clone();
        std::thread::Builder::new()
            .name("watch-launcher".into())
            .spawn(move || {
                privileges::keep_in_this_thread();
                launch(&command, cgroup, go_rx, ended_tx, &terminate, clean_rx)
            })
            .context("cannot start the thread that runs COMMAND")?
    };

    let run_args = run_args(&args, &log_path)?;
    let runtime = pipeline::runtime()?;
    let agent = runtime.block_on(pipeline::run_embedded(
        run_args,
        Some(Embedding {
            attached: Box::new(move || {
                let _ = go_tx.send(());
            }),
            stop: Box::pin(async move {
                let _ = ended_rx.await;
            }),
        }),
    ));
    drop(runtime);
    // Stopped by a signal (or a failure) while COMMAND runs: COMMAND gets SIGTERM.
    terminate.store(true, Ordering::Relaxed);
    let _ = clean_tx.send(());
    let launched = launcher
        .join()
        .map_err(|_| anyhow::anyhow!("the thread that ran COMMAND panicked"))?;
    match &launched.cleanup {
        Some(Ok(0)) | None => {}
        Some(Ok(n)) => tracing::warn!(
            "COMMAND left {n} processes running; they were moved out of the watch cgroup and \
             go on, untraced"
        ),
        Some(Err(why)) => tracing::warn!("{why}"),
    }
    let embedded = agent?;
    let Some(status) = launched.status else {
        anyhow::bail!("the agent stopped before COMMAND could start");
    };
    let command_exit_code = match &status {
        Ok(s) => Some(s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))),
        Err(e) => {
            eprintln!("connprobe: cannot start {}: {e}", args.command[0]);
            None
        }
    };

    let mut pids = launched.pids;
    pids.extend(launched.pid);
    // The verdicts' window is the run's, with a second each side for the clocks' rounding.
    let window = Window {
        start: start.checked_sub(Duration::from_secs(1)).unwrap_or(start),
        end: SystemTime::now() + Duration::from_secs(1),
    };
    let (judge, scope) = judge_log(&log_path, window, cgroup_path.as_deref(), &mut pids)?;
    let (exchanges, dns_unattributed) = dns_exchanges(&embedded, start, &pids);
    let destinations = judge.summaries();
    let mut report = judge.finish();
    let mut resolvers_verdicts = crate::dns::verdicts::dns_destinations(&exchanges);
    resolvers_verdicts.append(&mut report.destinations);
    report.destinations = resolvers_verdicts;
    let resolvers = ResolverSummary::of(&exchanges);
    let figures = Figures {
        destinations: &destinations,
        resolvers: &resolvers,
        dns_unattributed,
    };
    let rules: Vec<_> = args.fail_on.iter().map(|r| r.judge(&figures)).collect();
    let exit_code = match (rules.iter().any(|r| !r.passed), command_exit_code) {
        (true, _) => i32::from(RULE_FAILED),
        (false, Some(code)) => code,
        (false, None) => i32::from(NOT_STARTED),
    };
    let watch = WatchReport {
        command: args.command.clone(),
        command_exit_code,
        exit_code,
        scope,
        seconds: crate::diagnose::round(launched.ran_for.as_secs_f64(), 3),
        events_lost: embedded
            .tally
            .lost_by_stage()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect(),
        destinations,
        resolvers,
        rules,
        report,
    };
    if let Some(path) = &args.junit {
        fs::write(path, watch.junit())
            .with_context(|| format!("cannot write the JUnit report {}", path.display()))?;
    }
    let text = match args.json {
        true => serde_json::to_string_pretty(&watch).context("cannot format the report")? + "\n",
        false => watch.text(),
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("cannot write the report")?;
    Ok(u8::try_from(exit_code & 0xff).unwrap_or(1))
}

/// The launcher thread: waits for the agent to trace, runs COMMAND (inside the run's cgroup),
/// lists its processes while it runs, and once told (`clean`) removes the cgroup.
fn launch(
    command: &[String],
    cgroup: Option<RunCgroup>,
    go: mpsc::Receiver<()>,
    ended: tokio::sync::oneshot::Sender<()>,
    terminate: &AtomicBool,
    clean: mpsc::Receiver<()>,
) -> Launched {
    let mut launched = Launched {
        status: None,
        pid: None,
        ran_for: Duration::ZERO,
        pids: HashSet::new(),
        cleanup: None,
    };
    if go.recv().is_ok() {
        let mut child = Command::new(&command[0]);
        child.args(&command[1..]);
        if let Some(cgroup) = &cgroup {
            cgroup.enter_before_exec(&mut child);
        }
        let started = Instant::now();
        launched.status = Some(match child.spawn() {
            Ok(mut child) => {
                launched.pid = Some(child.id());
                let mut signalled = false;
                loop {
                    scope::add_pids(cgroup.as_ref(), child.id(), &mut launched.pids);
                    match child.try_wait() {
                        Ok(Some(status)) => break Ok(status),
                        Ok(None) => {}
                        Err(e) => break Err(e),
                    }
                    if !signalled && terminate.load(Ordering::Relaxed) {
                        // Not reaped yet (try_wait said so): the pid is still COMMAND's.
                        // SAFETY: kill(2) with a pid this thread started and has not reaped.
                        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                        signalled = true;
                    }
                    std::thread::sleep(POLL);
                }
            }
            Err(e) => Err(e),
        });
        launched.ran_for = started.elapsed();
        let _ = ended.send(());
        // The agent reads its last events (and resolves their cgroup) first.
        let _ = clean.recv();
    }
    launched.cleanup = cgroup.map(RunCgroup::remove);
    launched
}

/// The log's events that are COMMAND's, judged; and how they were told apart. The pids of the
/// kept events join `pids` (for the DNS exchanges).
fn judge_log(
    log: &Path,
    window: Window,
    cgroup: Option<&str>,
    pids: &mut HashSet<u32>,
) -> anyhow::Result<(Judge, String)> {
    let file = fs::File::open(log).with_context(|| format!("cannot open {}", log.display()))?;
    let mut judge = Judge::new(Some(window));
    let mut found = Vec::new();
    analyze::read_events(file, &log.display().to_string(), |event| {
        let pid = event.process.as_ref().map(|p| p.pid);
        let ours = match cgroup {
            Some(path) => event.workload.as_ref().is_some_and(|w| w.cgroup == path),
            None => pid.is_some_and(|pid| pids.contains(&pid)),
        };
        if ours {
            found.extend(pid);
            judge.add(&event);
        }
    })?;
    pids.extend(found);
    let scope = match cgroup {
        Some(path) => format!("cgroup {path}"),
        None => "pid tree".to_string(),
    };
    Ok((judge, scope))
}

/// COMMAND's DNS queries (client side, by pid): each with its answer, or a timeout, also for
/// those still unanswered when COMMAND ended; and how many queries named no process (so may
/// have been COMMAND's).
fn dns_exchanges(
    embedded: &Embedded,
    start: SystemTime,
    pids: &HashSet<u32>,
) -> (Vec<DnsExchange>, u64) {
    let Some(dns) = &embedded.dns else {
        return (Vec::new(), 0);
    };
    let mut dns = dns.lock().unwrap_or_else(|e| e.into_inner());
    let mut unanswered = Vec::new();
    dns.expire(u64::MAX, Instant::now(), &mut unanswered);
    let (named, unnamed): (Vec<_>, Vec<_>) = dns
        .recent_since(start)
        .into_iter()
        .filter(|x| x.side == Side::Client)
        .partition(|x| x.process.is_some());
    let ours = named
        .into_iter()
        .filter(|x| x.process.as_ref().is_some_and(|p| pids.contains(&p.pid)))
        .collect();
    (ours, unnamed.len() as u64)
}

/// The agent's flags for a watch: its JSON log to `log`, no metrics endpoint, and the flags
/// watch passes on.
fn run_args(args: &WatchArgs, log: &std::path::Path) -> anyhow::Result<RunArgs> {
    #[derive(clap::Parser)]
    struct Agent {
        #[command(flatten)]
        run: RunArgs,
    }
    let mut agent = Agent::try_parse_from([
        "connprobe".as_ref(),
        "--no-metrics".as_ref(),
        "--json-log".as_ref(),
        log.as_os_str(),
    ])
    .context("cannot set up the agent")?;
    agent.run.verbose = args.verbose;
    agent.run.hooks = args.hooks;
    agent.run.dns_timeout = args.dns_timeout;
    agent.run.no_dns = args.no_dns;
    Ok(agent.run)
}

/// A directory of its own under the temporary directory, removed with what it holds.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let base = std::env::temp_dir();
        for n in 0..100u32 {
            let dir = base.join(format!("connprobe-watch-{}-{n}", std::process::id()));
            match fs::create_dir(&dir) {
                Ok(()) => return Ok(TempDir(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot make {}", dir.display()));
                }
            }
        }
        anyhow::bail!(
            "cannot make a directory for the event log in {}",
            base.display()
        )
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
