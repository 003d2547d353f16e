//! Network namespaces: made with `ip netns`, entered per thread with `setns(2)`.
use std::{
    fs::File,
    io,
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    thread::JoinHandle,
};

use anyhow::{Context as _, bail};

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        run("ip", &["netns", "add", name])?;
        Ok(Self {
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `program args` inside this namespace (`ip netns exec`), failing on a non-zero exit.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `f` on a new thread named `thread_name` inside this namespace. Only that thread
    /// changes namespace; the name (at most 15 bytes) is the comm the kernel reports.
    pub fn spawn<T, F>(&self, thread_name: &str, f: F) -> JoinHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::Builder::new()
            .name(thread_name.to_owned())
            .spawn(move || {
                enter(&path).unwrap_or_else(|e| panic!("cannot enter {path}: {e}"));
                f()
            })
            .expect("cannot spawn a thread")
    }

    /// Runs `f` inside this namespace and waits for its result.
    pub fn run_in<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.spawn("lab-helper", f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("lab: could not delete namespace {}: {e:#}", self.name);
        }
    }
}

/// Moves the calling thread (only it) into the network namespace at `path`.
fn enter(path: &str) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET changes only the calling thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The error for a program that does not start.
fn not_installed(program: &str) -> String {
    format!(
        "cannot run {program}: is it installed? (`cargo xtask test` installs every program the \
         tests run; xtask/src/packages.rs names the package of each)"
    )
}

/// Runs a command, returning its stdout; the error holds its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| not_installed(program))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs a command with `input` on its stdin (e.g. `nft -f -`).
pub fn run_with_input(program: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| not_installed(program))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}) on:\n{input}\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
