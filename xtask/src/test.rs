//! `cargo xtask test`: everything CI checks, in order, each step reported, then one summary line.
//!
//! Setup, `cargo fmt --check`, clippy with warnings denied, the unit tests of the host crates,
//! then the kernel tests of `tests/` (namespace lab + the real agent), which need root: on the
//! host's kernel, then in a guest per kernel of the matrix (see `matrix`), then the bench's smoke
//! run. `--kernel SERIES` runs only the guests named.
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::{
    bench, build, cmd,
    matrix::{self, Series},
    packages::{Install, Task},
    pypi, setup, soak,
};

/// The environment variable that tells tests/tests/deploy.rs where kubernetes-validate is.
const KUBERNETES_VALIDATE_ENV: &str = "CONNPROBE_KUBERNETES_VALIDATE";

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Run only the kernel tests in a guest booting this Debian kernel series (repeatable), after
    /// building what they need: no fmt, clippy, unit tests, host kernel tests or bench smoke.
    #[arg(long = "kernel", value_name = "SERIES")]
    pub kernels: Vec<Series>,
}

struct Step {
    name: String,
    took: Duration,
    passed: bool,
}

/// Runs one step, reports it, and records how it went; the step's value if it passed.
fn step<T>(
    steps: &mut Vec<Step>,
    name: impl Into<String>,
    task: impl FnOnce() -> anyhow::Result<T>,
) -> Option<T> {
    let name = name.into();
    eprintln!("test: {name}");
    let begun = Instant::now();
    let result = task();
    if let Err(err) = &result {
        eprintln!("test: {name} FAILED: {err:#}");
    }
    steps.push(Step {
        name,
        took: begun.elapsed(),
        passed: result.is_ok(),
    });
    result.ok()
}

pub fn run(options: &Options, install: Install) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!(
            "the kernel tests load eBPF programs and create network namespaces, so `cargo xtask test` must run as root (e.g. `sudo -E cargo xtask test`)"
        );
    }
    let started = Instant::now();
    // Every command the steps below run, the bench smoke's peers included, is checked here once:
    // a missing program stops the run before any test, not a dozen tests later.
    setup::run(Task::Test, install)?;
    let only_guests = !options.kernels.is_empty();
    let mut series = if only_guests {
        options.kernels.clone()
    } else {
        Series::ALL.to_vec()
    };
    series.sort_unstable();
    series.dedup();
    // virtme-ng and the guest kernels, fetched where missing before any step, like the packages.
    let guests = matrix::prepare(&series)?;

    let mut steps = Vec::new();
    if !only_guests {
        // The manifests' validator (PyPI, pinned), like virtme-ng: fetched before any step.
        let validator = pypi::KUBERNETES_VALIDATE.ensure(&matrix::cache_dir())?;
        host_steps(&mut steps, &validator);
    }
    let built = step(
        &mut steps,
        "build for the guests (release agent, test binaries)",
        || {
            let agent = build::connprobe(true)?;
            let binaries = matrix::build_test_binaries()?;
            matrix::check_guest_tests(&binaries)?;
            Ok((agent, binaries))
        },
    );
    for kernel in &guests.kernels {
        step(
            &mut steps,
            format!("kernel tests, {} guest ({})", kernel.series, kernel.release),
            || match &built {
                Some((agent, binaries)) => {
                    matrix::run_guest(&guests.virtme, kernel, agent, binaries)
                }
                None => bail!("not run: the agent or the tests did not build"),
            },
        );
    }
    if !only_guests {
        // The long fault runs, on the release agent built for the guests.
        step(
            &mut steps,
            "soak (200,000 half-open connects, release agent)",
            || match &built {
                Some((agent, _)) => soak::soak_tests(agent),
                None => bail!("not run: the agent did not build"),
            },
        );
        // The benchmark's smoke run: every configuration starts and yields numbers (no ratios
        // are asserted: this machine is shared and noisy).
        step(
            &mut steps,
            "bench smoke (cargo xtask bench --quick)",
            || bench::measure(&bench::Options::quick()),
        );
    }

    let failed: Vec<&str> = steps
        .iter()
        .filter(|s| !s.passed)
        .map(|s| s.name.as_str())
        .collect();
    for s in &steps {
        let verdict = if s.passed { "ok" } else { "FAILED" };
        eprintln!(
            "test: {:<52} {verdict:<6} {:>6.1} s",
            s.name,
            s.took.as_secs_f64()
        );
    }
    let total = started.elapsed().as_secs_f64();
    if failed.is_empty() {
        eprintln!(
            "xtask test: all {} steps passed in {total:.0} s",
            steps.len()
        );
        Ok(())
    } else {
        bail!(
            "{} of {} steps failed in {total:.0} s: {}",
            failed.len(),
            steps.len(),
            failed.join(", ")
        )
    }
}

/// fmt, clippy, unit tests, and the kernel tests on the host's own kernel (which include the
/// checks of deploy/: the mixin and the manifests, with `validator`).
fn host_steps(steps: &mut Vec<Step>, validator: &std::path::Path) {
    step(steps, "fmt", || {
        cmd::status(cmd::cargo().args(["fmt", "--all", "--", "--check"]))
    });
    step(steps, "clippy", || {
        cmd::status(
            cmd::cargo()
                .args([
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "probe-ebpf",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ])
                // Lint against an empty placeholder object (see probe-user/build.rs): clippy would
                // otherwise build the eBPF object once more under its own fingerprint, for minutes.
                .env("AYA_BUILD_SKIP", "1"),
        )
    });
    step(steps, "unit tests", || {
        cmd::status(cmd::cargo().args([
            "test",
            "--no-fail-fast",
            "--workspace",
            "--exclude",
            "probe-ebpf",
            "--exclude",
            "tests",
        ]))
    });
    let binary = step(steps, "build connprobe", || build::connprobe(false));
    step(
        steps,
        format!("kernel tests, host kernel {}", host_release()),
        || match &binary {
            Some(binary) => cmd::status(
                cmd::cargo()
                    .args([
                        "test",
                        "--no-fail-fast",
                        "--package",
                        "tests",
                        "--",
                        "--test-threads=1",
                    ])
                    .env("CONNPROBE_BIN", binary)
                    .env(KUBERNETES_VALIDATE_ENV, validator),
            ),
            None => bail!("not run: connprobe did not build"),
        },
    );
}

/// `uname -r`.
fn host_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
