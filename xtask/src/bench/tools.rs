//! The configurations compared: nothing, connprobe (defaults, and empty programs), and the peers
//! that work on this kernel. Each runs as a child process with its output in a file.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead as _, BufReader, Read as _},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::sys;
use crate::packages;

/// What the agent prints on standard error once its programs are attached.
const READY_LINE: &str = "connprobe is tracing";
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
    Floor,
    Tcpstates,
    Tcplife,
    Bpftrace,
}

impl Tool {
    /// Every configuration but the baseline, which needs `--baseline`.
    pub const DEFAULT: [Tool; 7] = [
        Tool::Untraced,
        Tool::Connprobe,
        Tool::ConnprobeSerde,
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
            Tool::Connprobe | Tool::ConnprobeSerde | Tool::ConnprobeBaseline
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
        ["connect", "retransmit", "reset", "close"]
            .iter()
            .map(|k| self.tally_value(k))
            .sum()
    }
}

/// A running tool.
pub struct Session {
    tool: Tool,
    child: Option<Child>,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    output: Option<PathBuf>,
    metrics: Option<SocketAddr>,
}

impl Session {
    /// Starts `tool` (nothing for Untraced), its output into `dir`, and waits until it is attached.
    /// `extra` is added to connprobe's arguments.
    pub fn start(tool: Tool, bins: &Binaries, dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let connprobe = bins.connprobe.as_path();
        let output = dir.join(format!("{}.out", tool.key()));
        let mut metrics = None;
        let mut command = match tool {
            Tool::Untraced => {
                return Ok(Self {
                    tool,
                    child: None,
                    stderr: Arc::default(),
                    reader: None,
                    output: None,
                    metrics: None,
                });
            }
            Tool::Connprobe | Tool::ConnprobeSerde | Tool::ConnprobeBaseline => {
                let addr = free_loopback_addr()?;
                metrics = Some(addr);
                let binary = match tool {
                    Tool::ConnprobeBaseline => bins
                        .baseline
                        .as_deref()
                        .context("the baseline configuration needs --baseline PATH")?,
                    _ => connprobe,
                };
                let mut c = Command::new(binary);
                c.arg("run")
                    .arg("--json-log")
                    .arg(&output)
                    .arg("--metrics-addr")
                    .arg(addr.to_string())
                    .args(extra);
                if tool == Tool::ConnprobeSerde {
                    c.args(["--log-encoder", "serde"]);
                }
                c
            }
            Tool::Floor => {
                let mut c = Command::new(connprobe);
                c.args(["run", "--hooks", "empty", "--no-metrics"])
                    .args(extra);
                c
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
                c
            }
        };
        if tool.is_connprobe() || tool == Tool::Bpftrace {
            command.stdout(Stdio::null());
        }
        command.stdin(Stdio::null()).stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", tool.label()))?;

        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr is piped");
        let lines = Arc::clone(&stderr);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.contains(READY_LINE) {
                    let _ = ready_tx.send(());
                }
                lines.lock().expect("stderr lock").push(line);
            }
        });
        let mut session = Self {
            tool,
            child: Some(child),
            stderr,
            reader: Some(reader),
            output: Some(output),
            metrics,
        };
        session.wait_attached(&ready_rx)?;
        Ok(session)
    }

    fn wait_attached(&mut self, ready: &mpsc::Receiver<()>) -> anyhow::Result<()> {
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
            let attached = match self.tool {
                t if t.is_connprobe() => ready.try_recv().is_ok(),
                _ => sys::prog_stats(pid).programs > 0,
            };
            if attached {
                if !self.tool.is_connprobe() {
                    std::thread::sleep(PEER_SETTLE);
                }
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
        self.child.as_ref().map(Child::id)
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    pub fn output_path(&self) -> Option<&Path> {
        self.output.as_deref()
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().expect("stderr lock").join("\n")
    }

    /// Sends a signal to the tool's process.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// SIGINT, wait for a clean exit, and read what the tool reported.
    pub fn stop(mut self) -> anyhow::Result<Stopped> {
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
        let stderr = self.stderr_text();
        let connprobe = self.tool.is_connprobe();
        if connprobe && !status.success() {
            bail!("{} exited with {status}: {stderr}", self.tool.label());
        }
        let output_lines = self.output.as_deref().map_or(0, count_lines);
        let tally = connprobe.then(|| parse_tally(&stderr)).flatten();
        if connprobe && tally.is_none() {
            bail!(
                "{} printed no tally line at exit: {stderr}",
                self.tool.label()
            );
        }
        let lost = if connprobe {
            tally.as_ref().map(|t| {
                ["ringbuf", "map", "queue", "log"]
                    .iter()
                    .map(|k| t.get(*k).copied().unwrap_or(0))
                    .sum()
            })
        } else {
            Some(peer_lost(&stderr))
        };
        Ok(Stopped {
            tally,
            lost,
            output_lines,
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

/// An unused loopback address for connprobe's /metrics (so it never clashes with another agent
/// on the default port).
fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?)
}

/// The last tally line: every `key=value` after `connprobe: events:`.
pub fn parse_tally(stderr: &str) -> Option<BTreeMap<String, u64>> {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.contains("events:") && l.contains("produced in kernel="))?;
    let values = line
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter_map(|token| {
            let (key, value) = token.split_once('=')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect();
    Some(values)
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
    fn tally_line_parses() {
        let line = "connprobe: events: connect=3 retransmit=45 reset=1 close=2; produced in kernel=51; lost: ringbuf=0 map=4 queue=0 log=0; undecodable=0 kernel_read_errors=0";
        let tally = parse_tally(&format!("noise\n{line}\n")).unwrap();
        assert_eq!(tally["connect"], 3);
        assert_eq!(tally["kernel"], 51);
        assert_eq!(tally["map"], 4);
        assert_eq!(tally["kernel_read_errors"], 0);
    }

    #[test]
    fn peer_losses_add_up() {
        let err = "lost 12 events on CPU #0\nsomething\nLost 30 events\n";
        assert_eq!(peer_lost(err), 42);
    }
}
