//! `connprobe`: parses the command line, sets up logging, and hands over to the pipeline.
use std::process::ExitCode;

use clap::Parser;
use probe_user::{
    cli::{Cli, Command, RunArgs},
    diagnose, logging, pipeline, probe, top, watch,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbose = match &cli.command {
        Some(Command::Run(args)) => args.verbose,
        None => cli.run.verbose,
        // watch's standard error is COMMAND's too: only warnings unless asked.
        Some(Command::Watch(args)) => args.verbose,
        _ => 0,
    };
    match &cli.command {
        Some(Command::Watch(_)) if verbose == 0 => logging::init_with("warn"),
        _ => logging::init(verbose),
    }

    let result = match cli.command {
        None => run(cli.run),
        Some(Command::Run(args)) => run(*args),
        Some(Command::Analyze(args)) => diagnose::run_analyze(&args.files, args.window, args.json),
        Some(Command::Diagnose(args)) => diagnose::run_diagnose(args.addr, args.window, args.json),
        Some(Command::Top(args)) => top::run(&args),
        // Its own exit statuses: 1 for failed connects, 2 when it cannot run.
        Some(Command::Probe(args)) => return probe::main(args),
        Some(Command::Watch(args)) => {
            limit_malloc_arenas();
            return match watch::run(args) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("connprobe: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("connprobe: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    limit_malloc_arenas();
    pipeline::runtime()?.block_on(pipeline::run(args))
}

/// glibc gives threads that allocate at once arenas of their own (up to 8 per core), and each
/// keeps its own high-water mark: the aggregator's slots and the event batches, made on the
/// reader thread and freed on the log writer's, held a second arena of 13 MiB after 100,000
/// destinations, beside a main heap of 12 MiB (62 MiB resident in all; with one arena, 45).
/// The agent's few threads take turns far more than they contend for the allocator.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
