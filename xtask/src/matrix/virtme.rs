//! virtme-ng boots a guest kernel in QEMU over a read-only view of the host's root filesystem, so
//! the lab's tools (ip, nft, curl, python3) and the built binaries are there without an image.
//!
//! It comes from PyPI, pinned, into a venv of its own in the cache rather than `pip install` into
//! a system or user site: Debian's Python refuses system-wide pip installs (PEP 668), a `--user`
//! install would put `vng` and its dependencies (requests, ...) into root's site-packages beside
//! whatever else lives there, and a venv is removed with one `rm -r`.
//!
//! The guest runs under QEMU's TCG emulation with `-accel tcg` forced: here `/dev/kvm` exists but
//! cannot run a guest, and tools that try KVM first pick it.
use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use super::kernels::GuestKernel;
use crate::cmd;

/// The virtme-ng release the matrix was built and measured with.
pub const VIRTME_NG_VERSION: &str = "1.42";
/// Guest memory: the agent, the tests and the lab's tools run from the host's disk over 9p.
const GUEST_MEMORY: &str = "2G";

/// The venv holding virtme-ng.
pub struct VirtmeNg {
    venv: PathBuf,
}

impl VirtmeNg {
    /// virtme-ng in `<cache>/virtme-ng-<version>`, installed there if missing or broken.
    pub fn ensure(cache: &Path) -> anyhow::Result<Self> {
        let virtme = VirtmeNg {
            venv: cache.join(format!("virtme-ng-{VIRTME_NG_VERSION}")),
        };
        if virtme.works() {
            eprintln!(
                "setup: virtme-ng {VIRTME_NG_VERSION}: found in {}",
                virtme.venv.display()
            );
            return Ok(virtme);
        }
        eprintln!(
            "setup: virtme-ng {VIRTME_NG_VERSION}: missing, installing it from PyPI into a venv at {}",
            virtme.venv.display()
        );
        if virtme.venv.exists() {
            std::fs::remove_dir_all(&virtme.venv)
                .with_context(|| format!("cannot remove {}", virtme.venv.display()))?;
        }
        cmd::status(
            Command::new("python3")
                .args(["-m", "venv"])
                .arg(&virtme.venv),
        )
        .context(
            "cannot make a Python venv for virtme-ng (on Debian, `apt-get install python3-venv`)",
        )?;
        cmd::status(
            Command::new(virtme.venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
        )
        .context("cannot install virtme-ng from PyPI")?;
        if !virtme.works() {
            bail!(
                "virtme-ng was installed into {} but `vng --version` does not say {VIRTME_NG_VERSION}",
                virtme.venv.display()
            );
        }
        eprintln!("setup: virtme-ng {VIRTME_NG_VERSION}: installed");
        Ok(virtme)
    }

    fn vng(&self) -> PathBuf {
        self.venv.join("bin/vng")
    }

    fn works(&self) -> bool {
        cmd::output_of(&self.vng().to_string_lossy(), &["--version"])
            .is_some_and(|v| v.trim() == format!("virtme-ng {VIRTME_NG_VERSION}"))
    }

    /// `vng` booting `kernel` with `script` as the guest's only program.
    pub fn command(&self, kernel: &GuestKernel, script: &Path) -> Command {
        let mut command = Command::new(self.vng());
        command.args(guest_args(kernel, script));
        // vng runs virtme-run, from the same venv, through PATH.
        let mut path = OsString::from(self.venv.join("bin"));
        if let Some(rest) = std::env::var_os("PATH") {
            path.push(":");
            path.push(rest);
        }
        command.env("PATH", path);
        command
    }
}

/// vng's arguments: `kernel` under TCG with two CPUs, the host's root over 9p, and `script` run
/// as root (the user running xtask); the guest's exit status is the script's.
pub fn guest_args(kernel: &GuestKernel, script: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--run".into(), kernel.image.clone().into_os_string()];
    args.extend(
        [
            // /dev/kvm exists here but cannot run a guest: emulate, always.
            "--disable-kvm",
            "--qemu-opts=-accel tcg",
            // QEMU 7.2's virtiofsd fails here after a 5 s wait; 9p works at once.
            "--force-9p",
            "--cpus",
            "2",
            "--memory",
            GUEST_MEMORY,
            "--name",
        ]
        .map(OsString::from),
    );
    args.push(format!("connprobe-{}", kernel.series).into());
    args.push("--exec".into());
    let mut exec = OsString::from("sh ");
    exec.push(shell_quote(&script.to_string_lossy()));
    args.push(exec);
    args
}

/// `text` as one shell word.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A running guest. Its output is copied to stderr line by line, after `prefix` and the minutes
/// and seconds since the guest started; dropping it before it ends kills vng, virtme-run and
/// QEMU.
pub struct RunningGuest {
    child: Option<Child>,
    copiers: Vec<std::thread::JoinHandle<()>>,
}

impl RunningGuest {
    pub fn start(mut command: Command, prefix: &str) -> anyhow::Result<Self> {
        let line = cmd::display(&command);
        eprintln!("+ {line}");
        // QEMU reopens /proc/self/fd/1 and 2 for the guest's output: a pipe keeps that from
        // truncating a log file that xtask's output is redirected to.
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not start `{line}`"))?;
        let started = Instant::now();
        let mut copiers = Vec::new();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        for (name, pipe) in [
            ("stdout", Box::new(stdout) as Box<dyn std::io::Read + Send>),
            ("stderr", Box::new(stderr)),
        ] {
            let prefix = prefix.to_owned();
            copiers.push(
                std::thread::Builder::new()
                    .name(format!("guest-{name}"))
                    .spawn(move || {
                        for line in BufReader::new(pipe).split(b'\n') {
                            let Ok(line) = line else { break };
                            let text = String::from_utf8_lossy(&line);
                            let at = started.elapsed().as_secs();
                            eprintln!(
                                "[{prefix} {}:{:02}] {}",
                                at / 60,
                                at % 60,
                                text.trim_end_matches('\r')
                            );
                        }
                    })?,
            );
        }
        Ok(RunningGuest {
            child: Some(child),
            copiers,
        })
    }

    /// Waits for the guest to end, at most `limit`; past that it is killed and this fails.
    pub fn wait(mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("running");
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                kill_tree(child.id());
                let _ = child.wait();
                self.child = None;
                bail!("the guest did not finish within {limit:?}, so it was killed");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        self.child = None;
        for copier in self.copiers.drain(..) {
            copier
                .join()
                .map_err(|_| anyhow!("the guest output copier panicked"))?;
        }
        Ok(status)
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_tree(child.id());
            let _ = child.wait();
        }
    }
}

/// SIGKILLs `pid` and every process below it (vng runs virtme-run through a shell, and that runs
/// QEMU): killing vng alone would leave QEMU running.
fn kill_tree(pid: u32) {
    let mut parents = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.filter_map(|e| e.ok()) {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(parent) = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|stat| parent_of(&stat))
            {
                parents.push((child, parent));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    for pid in tree {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: sending a signal; a pid that is already gone just fails.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The parent pid in a `/proc/PID/stat` line (`pid (comm) state ppid ...`; comm may hold spaces
/// and parentheses, so read after the last `)`).
fn parent_of(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::Series;

    fn kernel() -> GuestKernel {
        GuestKernel {
            series: Series::V6_1,
            package: "linux-image-6.1.0-57-amd64".into(),
            release: "6.1.0-57-amd64".into(),
            image: "/cache/kernels/linux-image-6.1.0-57-amd64/boot/vmlinuz-6.1.0-57-amd64".into(),
        }
    }

    #[test]
    fn the_guest_is_emulated_and_runs_the_script() {
        let args = guest_args(
            &kernel(),
            Path::new("/work/target/kernel-matrix/6.1 it's.sh"),
        );
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "--run",
                "/cache/kernels/linux-image-6.1.0-57-amd64/boot/vmlinuz-6.1.0-57-amd64",
                "--disable-kvm",
                "--qemu-opts=-accel tcg",
                "--force-9p",
                "--cpus",
                "2",
                "--memory",
                "2G",
                "--name",
                "connprobe-6.1",
                "--exec",
                r"sh '/work/target/kernel-matrix/6.1 it'\''s.sh'",
            ]
        );
    }

    #[test]
    fn the_parent_is_read_after_the_command_name() {
        assert_eq!(
            parent_of("4242 (qemu-system-x86) S 4200 4242 1 0"),
            Some(4200)
        );
        assert_eq!(parent_of("7 (a) b) (c) R 1 7 7 0"), Some(1));
        assert_eq!(parent_of("garbage"), None);
    }
}
