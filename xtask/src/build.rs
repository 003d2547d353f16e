//! `cargo xtask build [--release]`: set up, then build the agent. probe-user's build script
//! builds the eBPF object (aya-build, nightly, bpf-linker) and embeds it in the binary.
use std::path::PathBuf;

use crate::{
    cmd,
    packages::{Install, Task},
    setup,
};

/// Sets up, builds `connprobe` and returns the path of the binary.
pub fn run(release: bool, install: Install) -> anyhow::Result<PathBuf> {
    setup::run(Task::Build, install)?;
    connprobe(release)
}

/// Builds `connprobe` (without running setup) and returns the path of the binary.
pub fn connprobe(release: bool) -> anyhow::Result<PathBuf> {
    let mut command = cmd::cargo();
    command.args(["build", "--package", "probe-user"]);
    if release {
        command.arg("--release");
    }
    cmd::status(&mut command)?;
    let profile = if release { "release" } else { "debug" };
    let binary = cmd::target_dir()?.join(profile).join("connprobe");
    anyhow::ensure!(
        binary.is_file(),
        "the build left no binary at {}",
        binary.display()
    );
    eprintln!("build: {}", binary.display());
    Ok(binary)
}
