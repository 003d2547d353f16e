//! The real agent, the one harness the kernel tests and the bench share: `connprobe run` with a
//! JSON log and/or a metrics endpoint on a free loopback port, started and waited for until it
//! says it is tracing (and `/healthz` answers, with metrics), stopped with SIGINT, its exit
//! status checked and its tally read back; then, for the tests, its log. It may run under a
//! wrapper command (`setpriv`) that starts it as another user with chosen capabilities.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

use crate::http::{free_loopback_addr, http_get};

/// What the agent prints on stderr once its programs are attached.
pub const READY: &str = "connprobe is tracing";
const START_LIMIT: Duration = Duration::from_secs(30);
const HEALTHZ_LIMIT: Duration = Duration::from_secs(10);
const STOP_LIMIT: Duration = Duration::from_secs(15);

static NEXT_LOG: AtomicU32 = AtomicU32::new(0);

/// How to start the agent.
#[derive(Clone, Debug)]
pub struct Launch {
    pub binary: PathBuf,
    /// `--json-log PATH`.
    pub json_log: Option<PathBuf>,
    /// Serve metrics on a free loopback port (`--metrics-addr`) and wait for `/healthz`.
    pub metrics: bool,
    /// Further arguments of `connprobe run`.
    pub args: Vec<String>,
    /// How long the programs may take to attach.
    pub start_limit: Duration,
    /// Remove the JSON log when the agent is dropped.
    pub remove_log: bool,
    /// A command that ends by running the command line after it, e.g. `setpriv --reuid 65534
    /// ... --`; empty for none.
    pub wrapper: Vec<String>,
}

impl Launch {
    /// `$CONNPROBE_BIN run --json-log TEMP ARGS...`, as the kernel tests run it.
    pub fn from_env(args: &[&str]) -> anyhow::Result<Self> {
        let binary = std::env::var_os("CONNPROBE_BIN").ok_or_else(|| {
            anyhow!("CONNPROBE_BIN is not set: run the kernel tests through `cargo xtask test`, or set it to a built connprobe")
        })?;
        let log = std::env::temp_dir().join(format!(
            "connprobe-lab-{}-{}.ndjson",
            std::process::id(),
            NEXT_LOG.fetch_add(1, Ordering::Relaxed)
        ));
        Ok(Launch {
            binary: binary.into(),
            json_log: Some(log),
            metrics: false,
            args: args.iter().map(|a| a.to_string()).collect(),
            start_limit: START_LIMIT,
            remove_log: true,
            wrapper: Vec::new(),
        })
    }

    /// The command line, with the binary staged where every user can run it when there is a
    /// wrapper (another user may not reach a checkout under /root).
    fn command(
        &self,
        metrics_addr: Option<SocketAddr>,
    ) -> anyhow::Result<(Command, Option<StagedBinary>)> {
        let (mut command, staged) = match self.wrapper.split_first() {
            Some((program, args)) => {
                let staged = StagedBinary::new(&self.binary)?;
                let mut command = Command::new(program);
                command.args(args).arg(staged.path());
                (command, Some(staged))
            }
            None => (Command::new(&self.binary), None),
        };
        command.arg("run");
        if let Some(log) = &self.json_log {
            command.arg("--json-log").arg(log);
        }
        if let Some(addr) = metrics_addr {
            command.arg("--metrics-addr").arg(addr.to_string());
        }
        command.args(&self.args);
        Ok((command, staged))
    }
}

/// How a stopped agent ended.
#[derive(Clone, Debug, Default)]
pub struct Exit {
    /// The tally line's `key=value`s (connect, retransmit, reset, close, kernel (produced),
    /// ringbuf, map, queue, log, undecodable, kernel_read_errors, missed_runs, own_traffic).
    pub tally: Option<BTreeMap<String, u64>>,
    pub stderr: String,
}

pub struct Agent {
    child: Option<Child>,
    launch: Launch,
    metrics_addr: Option<SocketAddr>,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    _binary: Option<StagedBinary>,
}

impl Agent {
    /// Starts the agent with a JSON log and no metrics, and waits until it says it is tracing.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with_args(&["--no-metrics"])
    }

    /// Starts `connprobe run --json-log FILE EXTRA...` (e.g. `--metrics-addr`,
    /// `--evidence-dir`) and waits until it says it is tracing.
    pub fn start_with_args(extra: &[&str]) -> anyhow::Result<Self> {
        Self::launch(Launch::from_env(extra)?)
    }

    /// Like [`Agent::start_with_args`], under `wrapper` (see [`Launch::wrapper`]). The JSON log
    /// sits in the temporary directory, where every user may write.
    pub fn start_under(wrapper: &[&str], extra: &[&str]) -> anyhow::Result<Self> {
        Self::launch(Launch {
            wrapper: wrapper.iter().map(|a| a.to_string()).collect(),
            ..Launch::from_env(extra)?
        })
    }

    /// Runs `connprobe run --json-log FILE EXTRA...` under `wrapper` for a start that must
    /// fail: waits until it exits by itself and returns its exit status and stderr. An agent
    /// that starts tracing instead is stopped, and that is an error.
    pub fn run_until_exit(
        wrapper: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<(ExitStatus, String)> {
        let launch = Launch {
            wrapper: wrapper.iter().map(|a| a.to_string()).collect(),
            ..Launch::from_env(extra)?
        };
        let (mut command, _binary) = launch.command(None)?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let pipe = child.stderr.take().expect("stderr is piped");
        let reader = std::thread::spawn(move || {
            let mut stderr = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(pipe), &mut stderr);
            stderr
        });
        let remove_log = || {
            if let Some(log) = &launch.json_log {
                let _ = std::fs::remove_file(log);
            }
        };
        let deadline = Instant::now() + START_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                remove_log();
                bail!("connprobe did not exit within {START_LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = reader.join().expect("stderr reader");
        remove_log();
        if stderr.contains(READY) {
            bail!("connprobe started tracing where it had to fail; its stderr:\n{stderr}");
        }
        Ok((status, stderr))
    }

    /// Starts `connprobe run --json-log FILE --metrics-addr ADDR EXTRA...` on a free loopback
    /// port and waits until `/healthz` answers 200.
    pub fn start_with_metrics(extra: &[&str]) -> anyhow::Result<Self> {
        Self::launch(Launch {
            metrics: true,
            ..Launch::from_env(extra)?
        })
    }

    pub fn launch(launch: Launch) -> anyhow::Result<Self> {
        if let Some(log) = &launch.json_log {
            let _ = std::fs::remove_file(log);
        }
        let metrics_addr = launch.metrics.then(free_loopback_addr).transpose()?;
        let (mut command, binary) = launch.command(metrics_addr)?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", launch.binary.display()))?;

        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr is piped");
        let lines = Arc::clone(&stderr);
        let reader = std::thread::Builder::new()
            .name("agent-stderr".into())
            .spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let ready = line.contains(READY);
                    // Kept before the signal: a caller may read the ready line at once.
                    lines.lock().unwrap().push(line);
                    if ready {
                        let _ = ready_tx.send(());
                    }
                }
            })?;

        let start_limit = launch.start_limit;
        let mut agent = Agent {
            child: Some(child),
            launch,
            metrics_addr,
            stderr,
            reader: Some(reader),
            _binary: binary,
        };
        match ready_rx.recv_timeout(start_limit) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = agent.child.as_mut().and_then(|c| c.wait().ok());
                bail!(
                    "connprobe exited ({status:?}) before it said {READY:?}; its stderr:\n{}",
                    agent.stderr_text()
                )
            }
            Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                "connprobe did not say {READY:?} within {start_limit:?}; its stderr:\n{}",
                agent.stderr_text()
            ),
        }
        if let Some(addr) = metrics_addr {
            let deadline = Instant::now() + HEALTHZ_LIMIT;
            while !matches!(http_get(addr, "/healthz"), Ok((200, _))) {
                if Instant::now() > deadline {
                    bail!("/healthz did not answer 200 within {HEALTHZ_LIMIT:?} of {READY:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(agent)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where `/metrics`, `/healthz` and `/diagnose` answer, when started with metrics.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The JSON log, when started with one.
    pub fn log_path(&self) -> Option<&Path> {
        self.launch.json_log.as_deref()
    }

    /// Sends `signal` to the agent (e.g. SIGSTOP, SIGCONT).
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// Stops the agent with SIGINT and checks that it exits 0; its stderr and tally.
    pub fn shutdown(&mut self) -> anyhow::Result<Exit> {
        self.shutdown_with(libc::SIGINT)
    }

    /// Stops the agent with `signal` (SIGINT, SIGTERM) and checks that it exits 0; its stderr
    /// and tally.
    pub fn shutdown_with(&mut self, signal: libc::c_int) -> anyhow::Result<Exit> {
        let name = signal_name(signal);
        let status = self.end_with(signal)?;
        let stderr = self.stderr_text();
        if !status.success() {
            bail!(
                "connprobe exited with {status} after {name} (expected 0); its stderr:\n{stderr}"
            );
        }
        Ok(Exit {
            tally: parse_tally(&stderr),
            stderr,
        })
    }

    /// Sends `signal` and waits (at most the stop limit) for the agent to end, whatever its
    /// exit status: e.g. SIGKILL, which leaves it no say.
    pub fn end_with(&mut self, signal: libc::c_int) -> anyhow::Result<ExitStatus> {
        let name = signal_name(signal);
        // On every early return the child stays in `self`, and Drop kills and reaps it.
        let child = self
            .child
            .as_mut()
            .context("the agent was stopped already")?;
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + STOP_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!(
                    "connprobe did not exit within {STOP_LIMIT:?} of {name}; its stderr:\n{}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.child = None;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        Ok(status)
    }

    /// Stops the agent with SIGINT, checks that it exits 0, and returns every event it logged.
    pub fn stop(self) -> anyhow::Result<Vec<Value>> {
        Ok(self.stop_with_tally()?.0)
    }

    /// Like [`Agent::stop`], with the program runs the kernel skipped (the tally's
    /// `missed_runs`): what the log can lack without the agent being at fault.
    pub fn stop_with_tally(mut self) -> anyhow::Result<(Vec<Value>, u64)> {
        let exit = self.shutdown()?;
        let missed_runs = exit
            .tally
            .as_ref()
            .and_then(|t| t.get("missed_runs").copied())
            .context("the agent's tally line has no missed_runs")?;
        // The agent's tally (events by kind, lost by stage, kernel read errors) goes into the
        // test's output, where a failure can be read against it.
        if let Some(tally) = self
            .stderr
            .lock()
            .unwrap()
            .iter()
            .rfind(|l| l.contains("events: "))
        {
            eprintln!("agent: {tally}");
        }
        let log = self.log_path().context("the agent wrote no JSON log")?;
        let text = std::fs::read_to_string(log)
            .with_context(|| format!("cannot read the JSON log {}", log.display()))?;
        let events = text
            .lines()
            .map(|line| {
                let value: Value = serde_json::from_str(line)
                    .with_context(|| format!("a log line is not JSON: {line:?}"))?;
                if !value.is_object() {
                    bail!("a log line is not a JSON object: {line}");
                }
                Ok(value)
            })
            .collect::<anyhow::Result<_>>()?;
        Ok((events, missed_runs))
    }

    /// Everything the agent printed on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(log) = self
            .launch
            .json_log
            .as_ref()
            .filter(|_| self.launch.remove_log)
        {
            let _ = std::fs::remove_file(log);
        }
    }
}

/// A world-readable directory in the temporary directory holding the agent's binary (a hard
/// link where the binary is world-executable and on the same file system, else a copy);
/// removed on drop.
struct StagedBinary {
    dir: PathBuf,
}

impl StagedBinary {
    fn new(binary: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!(
            "connprobe-lab-bin-{}-{}",
            std::process::id(),
            NEXT_LOG.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir)?;
        let staged = StagedBinary { dir };
        std::fs::set_permissions(&staged.dir, std::fs::Permissions::from_mode(0o755))?;
        let path = staged.path();
        let world_executable = std::fs::metadata(binary)?.permissions().mode() & 0o005 == 0o005;
        if !world_executable || std::fs::hard_link(binary, &path).is_err() {
            std::fs::copy(binary, &path).with_context(|| {
                format!("cannot copy {} to {}", binary.display(), path.display())
            })?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(staged)
    }

    fn path(&self) -> PathBuf {
        self.dir.join("connprobe")
    }
}

impl Drop for StagedBinary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn signal_name(signal: libc::c_int) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGHUP => "SIGHUP".into(),
        other => format!("signal {other}"),
    }
}

/// The last tally line of the agent's stderr: every `key=value` after `connprobe: events:`.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_line_parses() {
        let line = "connprobe: events: connect=3 retransmit=45 reset=1 close=2; produced in kernel=51; lost: ringbuf=0 map=4 queue=0 log=0; undecodable=0 kernel_read_errors=0 missed_runs=2; own_traffic=7";
        let tally = parse_tally(&format!("noise\n{line}\n")).unwrap();
        assert_eq!(tally["connect"], 3);
        assert_eq!(tally["kernel"], 51);
        assert_eq!(tally["map"], 4);
        assert_eq!(tally["kernel_read_errors"], 0);
        assert_eq!(tally["missed_runs"], 2);
        assert_eq!(tally["own_traffic"], 7);
    }
}
