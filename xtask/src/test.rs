//! `cargo xtask test`: everything CI checks, in order, each step reported, then one summary line.
//!
//! Setup, `cargo fmt --check`, clippy with warnings denied, the unit tests of the host crates,
//! then the kernel tests of `tests/` (namespace lab + the real agent), which need root.
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::{
    bench, build, cmd,
    packages::{Install, Task},
    setup,
};

struct Step {
    name: &'static str,
    took: Duration,
    passed: bool,
}

/// Runs one step, reports it, and records how it went; the step's value if it passed.
fn step<T>(
    steps: &mut Vec<Step>,
    name: &'static str,
    task: impl FnOnce() -> anyhow::Result<T>,
) -> Option<T> {
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

pub fn run(install: Install) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!(
            "the kernel tests load eBPF programs and create network namespaces, so `cargo xtask test` must run as root (e.g. `sudo -E cargo xtask test`)"
        );
    }
    let started = Instant::now();
    // Every command the steps below run, the bench smoke's peers included, is checked here once:
    // a missing program stops the run before any test, not a dozen tests later.
    setup::run(Task::Test, install)?;

    let mut steps = Vec::new();
    step(&mut steps, "fmt", || {
        cmd::status(cmd::cargo().args(["fmt", "--all", "--", "--check"]))
    });
    step(&mut steps, "clippy", || {
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
    step(&mut steps, "unit tests", || {
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
    let binary = step(&mut steps, "build connprobe", || build::connprobe(false));
    step(&mut steps, "kernel tests", || match &binary {
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
                .env("CONNPROBE_BIN", binary),
        ),
        None => bail!("not run: connprobe did not build"),
    });

    // The benchmark's smoke run: every configuration starts and yields numbers (no ratios are
    // asserted: this machine is shared and noisy).
    step(
        &mut steps,
        "bench smoke (cargo xtask bench --quick)",
        || bench::measure(&bench::Options::quick()),
    );

    let failed: Vec<&str> = steps.iter().filter(|s| !s.passed).map(|s| s.name).collect();
    for s in &steps {
        let verdict = if s.passed { "ok" } else { "FAILED" };
        eprintln!(
            "test: {:<36} {verdict:<6} {:>6.1} s",
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
