//! The real agent: `$CONNPROBE_BIN run --json-log FILE --no-metrics`, started before a scenario's
//! traffic and stopped with SIGINT after it, then its log read back.
use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
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
}

impl Agent {
    /// Starts the agent and waits until it says it is tracing.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with_args(&["--no-metrics"])
    }

    /// Starts `connprobe run --json-log FILE EXTRA...` (e.g. `--metrics-addr`,
    /// `--evidence-dir`) and waits until it says it is tracing.
    pub fn start_with_args(extra: &[&str]) -> anyhow::Result<Self> {
        let binary = std::env::var_os("CONNPROBE_BIN").ok_or_else(|| {
            anyhow!("CONNPROBE_BIN is not set: run the kernel tests through `cargo xtask test`, or set it to a built connprobe")
        })?;
        let log = std::env::temp_dir().join(format!(
            "connprobe-lab-{}-{}.ndjson",
            std::process::id(),
            NEXT_LOG.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&log);
        let mut child = Command::new(&binary)
            .arg("run")
            .arg("--json-log")
            .arg(&log)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.to_string_lossy()))?;

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
