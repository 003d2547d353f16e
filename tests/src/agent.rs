//! The real agent: `$CONNPROBE_BIN run --json-log FILE --no-metrics`, started before a scenario's
//! traffic and stopped with SIGINT after it, then its log read back; optionally under a wrapper
//! command (`setpriv`) that starts it as another user with chosen capabilities.
use std::{
    io::{BufRead as _, BufReader},
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

/// What the agent prints on stderr once its programs are attached.
const READY: &str = "connprobe is tracing";
const START_LIMIT: Duration = Duration::from_secs(30);
const STOP_LIMIT: Duration = Duration::from_secs(15);

static NEXT_LOG: AtomicU32 = AtomicU32::new(0);

pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
    stderr: Arc<Mutex<Vec<String>>>,
    _binary: Option<StagedBinary>,
}

impl Agent {
    /// Starts the agent and waits until it says it is tracing.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with_args(&["--no-metrics"])
    }

    /// Starts `connprobe run --json-log FILE EXTRA...` (e.g. `--metrics-addr`,
    /// `--evidence-dir`) and waits until it says it is tracing.
    pub fn start_with_args(extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_under(&[], extra)
    }

    /// Like [`Agent::start_with_args`], under `wrapper`: a command that ends by running the
    /// command line after it, e.g. `setpriv --reuid 65534 ... --` to start the agent as another
    /// user with chosen capabilities. Another user may not reach `$CONNPROBE_BIN` (a checkout
    /// under /root), so the wrapper runs a copy in the temporary directory; the JSON log is
    /// there too, where every user may write.
    pub fn start_under(wrapper: &[&str], extra: &[&str]) -> anyhow::Result<Self> {
        let log = new_log_path();
        let (mut command, binary) = command(wrapper, &log, extra)?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {wrapper:?} connprobe"))?;

        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr is piped");
        let lines = Arc::clone(&stderr);
        std::thread::Builder::new()
            .name("agent-stderr".into())
            .spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if line.contains(READY) {
                        let _ = ready_tx.send(());
                    }
                    lines.lock().unwrap().push(line);
                }
            })?;

        let mut agent = Agent {
            child: Some(child),
            log,
            stderr,
            _binary: binary,
        };
        match ready_rx.recv_timeout(START_LIMIT) {
            Ok(()) => Ok(agent),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = agent.child.as_mut().and_then(|c| c.wait().ok());
                bail!(
                    "connprobe exited ({status:?}) before it said {READY:?}; its stderr:\n{}",
                    agent.stderr_text()
                )
            }
            Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                "connprobe did not say {READY:?} within {START_LIMIT:?}; its stderr:\n{}",
                agent.stderr_text()
            ),
        }
    }

    /// Stops the agent with SIGINT, checks that it exits 0, and returns every event it logged.
    pub fn stop(mut self) -> anyhow::Result<Vec<Value>> {
        // On every early return the child stays in `self`, and Drop kills and reaps it.
        let child = self.child.as_mut().expect("the agent runs");
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let deadline = Instant::now() + STOP_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!(
                    "connprobe did not exit within {STOP_LIMIT:?} of SIGINT; its stderr:\n{}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.child = None;
        // Give the stderr reader a moment to collect the last lines.
        std::thread::sleep(Duration::from_millis(50));
        if !status.success() {
            bail!(
                "connprobe exited with {status} after SIGINT (expected 0); its stderr:\n{}",
                self.stderr_text()
            );
        }
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
        let text = std::fs::read_to_string(&self.log)
            .with_context(|| format!("cannot read the JSON log {}", self.log.display()))?;
        text.lines()
            .map(|line| {
                let value: Value = serde_json::from_str(line)
                    .with_context(|| format!("a log line is not JSON: {line:?}"))?;
                if !value.is_object() {
                    bail!("a log line is not a JSON object: {line}");
                }
                Ok(value)
            })
            .collect()
    }

    /// Everything the agent printed on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// The agent's process id (a wrapper such as `setpriv` execs it, keeping the id).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent runs").id()
    }

    /// Runs `connprobe run --json-log FILE EXTRA...` under `wrapper` (see
    /// [`Agent::start_under`]) for a start that must fail: waits until it exits by itself and
    /// returns its exit status and stderr. An agent that starts tracing instead is stopped, and
    /// that is an error.
    pub fn run_until_exit(
        wrapper: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<(ExitStatus, String)> {
        let log = new_log_path();
        let (mut command, _binary) = command(wrapper, &log, extra)?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stderr = String::new();
        let pipe = child.stderr.take().expect("stderr is piped");
        let reader = std::thread::spawn(move || {
            let _ = std::io::Read::read_to_string(&mut BufReader::new(pipe), &mut stderr);
            stderr
        });
        let deadline = Instant::now() + START_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(&log);
                bail!("connprobe did not exit within {START_LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = reader.join().expect("stderr reader");
        let _ = std::fs::remove_file(&log);
        if stderr.contains(READY) {
            bail!("connprobe started tracing where it had to fail; its stderr:\n{stderr}");
        }
        Ok((status, stderr))
    }
}

/// A fresh JSON log path in the temporary directory (which every user may write).
fn new_log_path() -> PathBuf {
    let log = std::env::temp_dir().join(format!(
        "connprobe-lab-{}-{}.ndjson",
        std::process::id(),
        NEXT_LOG.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&log);
    log
}

/// `WRAPPER... $CONNPROBE_BIN run --json-log LOG EXTRA...`, with the binary staged where every
/// user can run it when there is a wrapper.
fn command(
    wrapper: &[&str],
    log: &Path,
    extra: &[&str],
) -> anyhow::Result<(Command, Option<StagedBinary>)> {
    let binary = std::env::var_os("CONNPROBE_BIN").ok_or_else(|| {
        anyhow!("CONNPROBE_BIN is not set: run the kernel tests through `cargo xtask test`, or set it to a built connprobe")
    })?;
    let (mut command, staged) = match wrapper.split_first() {
        Some((program, args)) => {
            let staged = StagedBinary::new(Path::new(&binary))?;
            let mut command = Command::new(program);
            command.args(args).arg(staged.path());
            (command, Some(staged))
        }
        None => (Command::new(&binary), None),
    };
    command.arg("run").arg("--json-log").arg(log).args(extra);
    Ok((command, staged))
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

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
