//! connprobe's developer tasks, run as `cargo xtask TASK`: one module per task.
//!
//! `setup` installs what a task needs where it is missing (system packages, see `packages`, and
//! the eBPF toolchain), `build` builds the agent (its build script builds and embeds the eBPF
//! object), `run` runs it, `test` runs every check CI runs, `bench` measures it, `soak` runs
//! only the long fault tests (which `test` runs too).
mod bench;
mod build;
mod cmd;
mod matrix;
mod packages;
mod pypi;
mod run;
mod setup;
mod soak;
mod test;

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "connprobe's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
    /// Install no system package: if a command the task needs is missing, name it and its
    /// package, and stop. Setting CONNPROBE_NO_INSTALL=1 does the same.
    #[arg(long, global = true)]
    no_install: bool,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what every task needs where it is missing: the system packages of build, run,
    /// test and bench (as root: apt-get on Debian and Ubuntu, dnf on Fedora), then nightly with
    /// rust-src, bpf-linker built against nightly's LLVM, and the kernel matrix's virtme-ng (a
    /// venv in ~/.cache/connprobe) and guest kernels.
    ///
    /// `run`, `build`, `test` and `bench` do this first, for their own commands only (the table
    /// below). With --no-install (or CONNPROBE_NO_INSTALL=1), as non-root, or on another system,
    /// a missing command stops the task with one sentence naming it and its package.
    #[command(after_long_help = packages::table())]
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
    /// Set up, then run what CI runs: fmt, clippy, unit tests, the kernel tests on this kernel and
    /// in a QEMU guest per kernel of the matrix (Debian's 6.1 and 6.12), the soak, and the bench's
    /// smoke run (needs root).
    #[command(after_long_help = matrix::help())]
    Test(test::Options),
    /// Set up, build (release), then measure connprobe's cost side by side with the peers
    /// (needs root; several minutes, `--quick` for a smoke run).
    Bench(bench::Options),
    /// Set up, build (release), then run only the long fault tests (200,000 half-open connects:
    /// the kernel's socket map bound, the agent's memory), which `test` runs too; needs root.
    Soak,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let install = packages::Install::from_flag_and_env(
        cli.no_install,
        std::env::var_os(packages::NO_INSTALL_ENV).as_deref(),
    );
    let result = match cli.task {
        Task::Setup => setup::run(packages::Task::Setup, install),
        Task::Build { release } => build::run(release, install).map(|_| ()),
        Task::Run { args } => run::run(&args, install),
        Task::Test(options) => test::run(&options, install),
        Task::Bench(options) => bench::run(&options, install),
        Task::Soak => soak::run(install),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
