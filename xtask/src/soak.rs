//! `cargo xtask soak`: the long fault runs (README "Reliability"), the kernel tests of
//! `tests/tests/soak.rs` that `cargo test` leaves out (200,000 half-open connects on the classic
//! hooks, where the socket map must stay at `--max-sockets`, and on the default hooks, where the
//! agent's memory must stay flat), against a release build, each printing its figures. Needs
//! root, like the kernel tests, and the same system commands. `cargo xtask test` runs them too,
//! as a step of its own, with the release agent it builds for the guests.
use std::path::Path;

use anyhow::bail;

use crate::{
    build, cmd,
    packages::{Install, Task},
    setup,
};

pub fn run(install: Install) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!(
            "the soak loads eBPF programs and creates network namespaces, so `cargo xtask soak` must run as root (e.g. `sudo -E cargo xtask soak`)"
        );
    }
    setup::run(Task::Test, install)?;
    let binary = build::connprobe(true)?;
    soak_tests(&binary)
}

/// The soak tests against the release agent `binary`.
pub fn soak_tests(binary: &Path) -> anyhow::Result<()> {
    cmd::status(
        cmd::cargo()
            .args([
                "test",
                "--package",
                "tests",
                "--test",
                "soak",
                "--",
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .env("CONNPROBE_BIN", binary),
    )
}
