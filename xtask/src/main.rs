//! connprobe's developer tasks, run as `cargo xtask TASK`: one module per task.
//!
//! `setup` installs the eBPF toolchain where it is missing, `build` builds the agent (its build
//! script builds and embeds the eBPF object), `run` runs it, `test` runs every check CI runs.
mod bench;
mod build;
mod cmd;
mod run;
mod setup;
mod test;

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "connprobe's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what the eBPF build needs where it is missing: nightly with rust-src, and
    /// bpf-linker built against nightly's LLVM.
    Setup,
    /// Set up, then build the agent (`target/{debug,release}/connprobe`).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Set up, build (release), then run `connprobe ARGS` as root (through `sudo -E` if needed).
    Run {
        /// Arguments passed to connprobe verbatim, e.g. `-- --json-log - --duration 10`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Set up, then run what CI runs: fmt, clippy, unit tests, and the kernel tests (needs root).
    Test,
    /// Set up, build (release), then measure connprobe's cost side by side with the peers
    /// (needs root; several minutes, `--quick` for a smoke run).
    Bench(bench::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Build { release } => build::run(release).map(|_| ()),
        Task::Run { args } => run::run(&args),
        Task::Test => test::run(),
        Task::Bench(options) => bench::run(&options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
