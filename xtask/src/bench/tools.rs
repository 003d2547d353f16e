//! The configurations compared: nothing, connprobe (defaults, its serde-encoder variant, a
//! baseline binary, and empty programs), and the peers that work on this kernel. connprobe
//! runs through the kernel tests' agent harness (`tests::agent`); a peer as a child process
//! with its output in a file.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ::tests::agent::{Agent, Launch};
use anyhow::{Context as _, bail};

use super::sys;
use crate::packages;

/// How long a tool may take to attach.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// A peer has loaded its programs; this long after, it is attached and reading.
const PEER_SETTLE: Duration = Duration::from_millis(1500);
/// The bpftrace one-liner: one line per state transition.
const BPFTRACE_PROGRAM: &str = r#"tracepoint:sock:inet_sock_set_state { printf("%d %s %d %d %d %d\n", pid, comm, args->sport, args->dport, args->oldstate, args->newstate); }"#;

/// A configuration of the bench; `--tools` names them by key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
#[value(rename_all = "kebab-case")]
pub enum Tool {
    Untraced,
    Connprobe,
    /// connprobe writing its log through serde_json instead of its fast formatter.
    ConnprobeSerde,
    /// Another connprobe binary (`--baseline PATH`), e.g. a build of the previous commit.
    ConnprobeBaseline,
    /// connprobe without the drop program (`--no-drops`): what the `kfree_skb` hook costs.
    ConnprobeNoDrops,
    /// connprobe without the DNS programs (`--no-dns`): what the cgroup_skb hooks cost.
    ConnprobeNoDns,
    /// connprobe with the per-socket records in the LRU hash instead of socket storage
    /// (`--socket-records lru`): what each store costs on the BTF path.
    ConnprobeLru,
    /// connprobe with the per-socket records in an LRU hash with a list per CPU
    /// (`--socket-records lru-per-cpu`).
    ConnprobeLruPerCpu,
    Floor,
    Tcpstates,
    Tcplife,
    Bpftrace,
}

impl Tool {
    /// Every configuration but the baseline, which needs `--baseline`, and the record stores,
    /// which only `--tools` runs.
    pub const DEFAULT: [Tool; 9] = [
        Tool::Untraced,
        Tool::Connprobe,
        Tool::ConnprobeSerde,
        Tool::ConnprobeNoDrops,
        Tool::ConnprobeNoDns,
        Tool::Floor,
        Tool::Tcpstates,
        Tool::Tcplife,
        Tool::Bpftrace,
    ];

    /// The key in results.json.
    pub fn key(self) -> &'static str {
        match self {
            Tool::Untraced => "untraced",
            Tool::Connprobe => "connprobe",
            Tool::ConnprobeSerde => "connprobe_serde",
            Tool::ConnprobeBaseline => "connprobe_baseline",
            Tool::ConnprobeNoDrops => "connprobe_no_drops",
            Tool::ConnprobeNoDns => "connprobe_no_dns",
            Tool::ConnprobeLru => "connprobe_lru",
            Tool::ConnprobeLruPerCpu => "connprobe_lru_per_cpu",
            Tool::Floor => "floor",
            Tool::Tcpstates => "tcpstates",
            Tool::Tcplife => "tcplife",
            Tool::Bpftrace => "bpftrace",
        }
    }

    /// The row name in the table.
    pub fn label(self) -> &'static str {
        match self {
            Tool::Untraced => "(a) untraced",
            Tool::Connprobe => "(b) connprobe defaults",
            Tool::ConnprobeSerde => "(b') connprobe, log lines by serde_json",
            Tool::ConnprobeBaseline => "(b0) connprobe baseline (--baseline)",
            Tool::ConnprobeNoDrops => "(b-) connprobe --no-drops",
            Tool::ConnprobeNoDns => "(b=) connprobe --no-dns",
            Tool::ConnprobeLru => "(bL) connprobe, socket records in the LRU hash",
            Tool::ConnprobeLruPerCpu => "(bP) connprobe, socket records in a per-CPU LRU hash",
            Tool::Floor => "(c) floor: --hooks empty",
            Tool::Tcpstates => "(d) tcpstates",
            Tool::Tcplife => "(e) tcplife",
            Tool::Bpftrace => "(f) bpftrace one-liner",
        }
    }

    /// A connprobe agent with its defaults (log, metrics), whichever binary or encoder.
    pub fn is_agent(self) -> bool {
        matches!(
            self,
            Tool::Connprobe
                | Tool::ConnprobeSerde
                | Tool::ConnprobeBaseline
                | Tool::ConnprobeNoDrops
                | Tool::ConnprobeNoDns
                | Tool::ConnprobeLru
                | Tool::ConnprobeLruPerCpu
        )
    }

    /// Any connprobe process (the agents and the floor): ready when it says so, with a tally.
    pub fn is_connprobe(self) -> bool {
        self.is_agent() || self == Tool::Floor
    }
}

/// The connprobe binaries the configurations run.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub connprobe: PathBuf,
    pub baseline: Option<PathBuf>,
}

/// Everything a tool's tally or warnings said at exit.
#[derive(Clone, Debug, Default)]
pub struct Stopped {
    /// connprobe's tally line, `key=value` (keys: connect, retransmit, reset, close, kernel
    /// (produced), ringbuf, map, queue, log, undecodable, kernel_read_errors).
    pub tally: Option<BTreeMap<String, u64>>,
    /// Events lost as the tool itself reported them; `None` when it has no way to tell.
    pub lost: Option<u64>,
    /// Lines the tool wrote to its output file.
    pub output_lines: u64,
    /// connprobe's DNS line at exit, `key=value` (packets, kernel (produced), exchanges,
    /// pending, ringbuf, queue, malformed, evicted, unmatched_answers); `None` without DNS.
    pub dns: Option<BTreeMap<String, u64>>,
}

impl Stopped {
    pub fn tally_value(&self, key: &str) -> u64 {
        self.tally
            .as_ref()
            .and_then(|t| t.get(key).copied())
            .unwrap_or(0)
    }

    /// Events connprobe delivered to its consumers.
    pub fn delivered(&self) -> u64 {
        ["connect", "retransmit", "reset", "close", "drop"]
            .iter()
            .map(|k| self.tally_value(k))
            .sum()
    }
}

/// A running tool: a connprobe agent through the kernel tests' harness, or a peer's process.
pub struct Session {
    tool: Tool,
    agent: Option<Agent>,
    child: Option<Child>,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    output: Option<PathBuf>,
}

impl Session {
    /// Starts `tool` (nothing for Untraced), its output into `dir`, and waits until it is attached.
    /// `extra` is added to connprobe's arguments.
    pub fn start(tool: Tool, bins: &Binaries, dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let output = dir.join(format!("{}.out", tool.key()));
        let mut session = Self {
            tool,
            agent: None,
            child: None,
            stderr: Arc::default(),
            reader: None,
            output: None,
        };
        let mut command = match tool {
            Tool::Untraced => return Ok(session),
            Tool::Connprobe
            | Tool::ConnprobeSerde
            | Tool::ConnprobeBaseline
            | Tool::ConnprobeNoDrops
            | Tool::ConnprobeNoDns
            | Tool::ConnprobeLru
            | Tool::ConnprobeLruPerCpu
            | Tool::Floor => {
                let binary = match tool {
                    Tool::ConnprobeBaseline => bins
                        .baseline
                        .clone()
                        .context("the baseline configuration needs --baseline PATH")?,
                    _ => bins.connprobe.clone(),
                };
                let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
                match tool {
                    Tool::ConnprobeSerde => args.extend(["--log-encoder".into(), "serde".into()]),
                    Tool::ConnprobeNoDrops => args.push("--no-drops".into()),
                    Tool::ConnprobeNoDns => args.push("--no-dns".into()),
                    Tool::ConnprobeLru => args.extend(["--socket-records".into(), "lru".into()]),
                    Tool::ConnprobeLruPerCpu => {
                        args.extend(["--socket-records".into(), "lru-per-cpu".into()])
                    }
                    Tool::Floor => {
                        args.extend(["--hooks", "empty", "--no-metrics"].map(String::from))
                    }
                    _ => {}
                }
                let agent = Agent::launch(Launch {
                    binary,
                    json_log: tool.is_agent().then(|| output.clone()),
                    metrics: tool.is_agent(),
                    args,
                    start_limit: START_TIMEOUT,
                    remove_log: false,
                    wrapper: Vec::new(),
                })
                .with_context(|| format!("{} did not start", tool.label()))?;
                session.output = tool.is_agent().then_some(output);
                session.agent = Some(agent);
                return Ok(session);
            }
            Tool::Tcpstates | Tool::Tcplife => {
                let name = tool.key();
                let program = packages::find_program(name).with_context(|| {
                    format!("{name} is not installed (Debian package libbpf-tools)")
                })?;
                let mut c = Command::new(program);
                c.stdout(File::create(&output)?);
                c
            }
            Tool::Bpftrace => {
                let mut c = Command::new(
                    packages::find_program("bpftrace")
                        .context("bpftrace is not installed (Debian package bpftrace)")?,
                );
                c.arg("-o").arg(&output).args(["-e", BPFTRACE_PROGRAM]);
                c.stdout(Stdio::null());
                c
            }
        };
        command.stdin(Stdio::null()).stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", tool.label()))?;

        let pipe = child.stderr.take().expect("stderr is piped");
        let lines = Arc::clone(&session.stderr);
        session.reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().expect("stderr lock").push(line);
            }
        }));
        session.child = Some(child);
        session.output = Some(output);
        session.wait_attached()?;
        Ok(session)
    }

    /// A peer is attached once its process holds eBPF programs (and a moment later, reading).
    fn wait_attached(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid = self.pid().expect("a started tool has a pid");
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                std::thread::sleep(Duration::from_millis(100));
                bail!(
                    "{} exited ({status}) before it was attached: {}",
                    self.tool.label(),
                    self.stderr_text()
                );
            }
            if sys::prog_stats(pid).programs() > 0 {
                std::thread::sleep(PEER_SETTLE);
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not attach within {} s: {}",
                    self.tool.label(),
                    START_TIMEOUT.as_secs(),
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match &self.agent {
            Some(agent) => agent.pid(),
            None => self.child.as_ref().map(Child::id),
        }
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.agent.as_ref().and_then(Agent::metrics_addr)
    }

    pub fn output_path(&self) -> Option<&Path> {
        self.output.as_deref()
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().expect("stderr lock").join("\n")
    }

    /// Sends a signal to the tool's process.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(agent) = &self.agent {
            return agent.signal(signal);
        }
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// SIGINT, wait for a clean exit, and read what the tool reported.
    pub fn stop(mut self) -> anyhow::Result<Stopped> {
        let output_lines = self.output.as_deref().map_or(0, count_lines);
        if let Some(agent) = &mut self.agent {
            let exit = agent.shutdown()?;
            let output_lines = self.output.as_deref().map_or(0, count_lines);
            let Some(tally) = exit.tally else {
                bail!(
                    "{} printed no tally line at exit: {}",
                    self.tool.label(),
                    exit.stderr
                );
            };
            let lost = ["ringbuf", "map", "queue", "log"]
                .iter()
                .map(|k| tally.get(*k).copied().unwrap_or(0))
                .sum();
            return Ok(Stopped {
                tally: Some(tally),
                lost: Some(lost),
                output_lines,
                dns: parse_dns_summary(&exit.stderr),
            });
        }
        let _ = output_lines;
        let Some(mut child) = self.child.take() else {
            return Ok(Stopped::default());
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not exit within 30 s of SIGINT", self.tool.label());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let _ = status;
        let stderr = self.stderr_text();
        Ok(Stopped {
            tally: None,
            lost: Some(peer_lost(&stderr)),
            output_lines: self.output.as_deref().map_or(0, count_lines),
            dns: None,
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Events a peer reported lost: libbpf-tools warn "lost N events on CPU #C" per perf-buffer
/// loss, bpftrace "Lost N events".
pub fn peer_lost(stderr: &str) -> u64 {
    stderr
        .lines()
        .filter_map(|line| {
            let lower = line.to_ascii_lowercase();
            let rest = &lower[lower.find("lost ")? + 5..];
            let (number, tail) = rest.split_once(' ')?;
            tail.starts_with("event")
                .then(|| number.parse::<u64>().ok())?
        })
        .sum()
}

/// connprobe's last `connprobe: dns: packets=N (produced in kernel=N) ...` line as `key=value`s.
pub fn parse_dns_summary(stderr: &str) -> Option<BTreeMap<String, u64>> {
    let line = stderr
        .lines()
        .rev()
        .find_map(|l| l.split_once("connprobe: dns: "))?
        .1;
    let values = line
        .split(|c: char| c.is_whitespace() || matches!(c, ';' | '(' | ')'))
        .filter_map(|token| {
            let (key, value) = token.split_once('=')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect();
    Some(values)
}

fn count_lines(path: &Path) -> u64 {
    let Ok(mut file) = File::open(path) else {
        return 0;
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut lines = 0u64;
    while let Ok(n) = file.read(&mut buf) {
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_stores_run_only_when_named() {
        use clap::ValueEnum as _;
        for (name, tool) in [
            ("connprobe-lru", Tool::ConnprobeLru),
            ("connprobe-lru-per-cpu", Tool::ConnprobeLruPerCpu),
        ] {
            assert_eq!(Tool::from_str(name, false), Ok(tool));
            assert!(!Tool::DEFAULT.contains(&tool));
            assert!(tool.is_agent());
        }
    }

    #[test]
    fn peer_losses_add_up() {
        let err = "lost 12 events on CPU #0\nsomething\nLost 30 events\n";
        assert_eq!(peer_lost(err), 42);
    }

    #[test]
    fn dns_summary_parses() {
        let err = "connprobe: events: connect=1\nconnprobe: dns: packets=40 (produced in kernel=42) exchanges=20 pending=1; lost: ringbuf=2 queue=0; malformed=0 evicted=3 unmatched_answers=0\n";
        let dns = parse_dns_summary(err).unwrap();
        assert_eq!(dns["packets"], 40);
        assert_eq!(dns["kernel"], 42);
        assert_eq!(dns["pending"], 1);
        assert_eq!(dns["ringbuf"], 2);
        assert_eq!(dns["evicted"], 3);
        assert_eq!(parse_dns_summary("connprobe: events: connect=1\n"), None);
    }
}
