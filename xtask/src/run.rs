//! `cargo xtask run -- ARGS`: set up, build (release), then run `connprobe ARGS` as root.
use std::{ffi::OsString, os::unix::process::CommandExt as _, process::Command};

use anyhow::bail;

use crate::{
    build, cmd,
    packages::{Install, Task},
    setup,
};

pub fn run(args: &[OsString], install: Install) -> anyhow::Result<()> {
    setup::run(Task::Run, install)?;
    let binary = build::connprobe(true)?;
    let mut command = if cmd::is_root() {
        Command::new(&binary)
    } else if cmd::on_path("sudo") {
        eprintln!("run: connprobe needs root, running it through sudo");
        let mut sudo = Command::new("sudo");
        sudo.arg("-E").arg(&binary);
        sudo
    } else {
        bail!(
            "connprobe needs root (to load eBPF programs) and sudo is not installed: run `cargo xtask run` as root"
        );
    };
    command.args(args);
    eprintln!("+ {}", cmd::display(&command));
    // exec only returns on failure.
    let err = command.exec();
    bail!("could not run {}: {err}", binary.display())
}
