//! The command line. `connprobe [run] FLAGS` runs the agent; `analyze` and `diagnose` judge
//! events after the fact or ask a running agent.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

pub use crate::loader::{HookMode, SocketRecords};
use crate::{
    export::{json_log::Encoder, view::ViewWindow},
    units::{parse_duration, parse_size},
};

/// Default address of the metrics, health and diagnose endpoints: loopback only.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9977";

#[derive(Debug, Parser)]
#[command(
    name = "connprobe",
    version,
    about = "Traces TCP connections in the kernel with eBPF and says why they fail",
    long_about = "Traces TCP connections in the kernel with eBPF tracepoints: every connect and \
                  how it ended, retransmits, resets and connection lifetimes. Writes a JSON event \
                  log, serves Prometheus metrics, and judges the root cause of failures per \
                  destination.\n\nWith no subcommand, `connprobe FLAGS` is `connprobe run FLAGS`.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace until stopped, the default subcommand (needs root, or CAP_BPF and CAP_PERFMON)
    Run(Box<RunArgs>),
    /// Judge a JSON event log after the fact (no root needed)
    Analyze(AnalyzeArgs),
    /// Ask a running agent for its verdicts on the last window
    Diagnose(DiagnoseArgs),
    /// Watch a running agent live: destinations worst first, keys to sort, filter and drill down
    Top(TopArgs),
    /// Connect to HOST:PORT targets and report, with the kernel's view, how each connect went
    Probe(crate::probe::ProbeArgs),
    /// Run a command and judge the connections it made, for CI (needs what `run` needs)
    #[command(after_long_help = WATCH_HELP)]
    Watch(WatchArgs),
}

const WATCH_HELP: &str = "\
What counts: connections whose owner is COMMAND or a process it started (COMMAND runs in a \
cgroup made for the run; where none can be made, its process tree is followed instead, and \
connprobe says so), connects it made and connections accepted by its listeners, and its DNS \
queries. Connections of other processes, at the same time and to the same places, do not.

Rules (--fail-on, repeatable): METRIC>THRESHOLD with METRIC one of
  failures       failed connects, all destinations together (failures>0)
  retransmits    retransmitted segments, SYNs included (retransmits>10)
  resets         resets on its connections, refused connects aside (resets>0)
  dns_timeouts   DNS queries unanswered (dns_timeouts>0)
  p50, p99       handshake latency of each destination (p99>200ms)

Exit status: COMMAND's own when every rule holds (128+N when signal N ended it); 100 when a \
rule fails (the report gives COMMAND's code); 127 when COMMAND cannot be started; 2 for a bad \
command line; 1 when connprobe cannot trace (COMMAND then does not run).

Examples:
  connprobe watch -- ./integration-tests.sh
  connprobe watch --fail-on 'failures>0' --fail-on 'p99>200ms' --junit connectivity.xml -- \
      curl -fsS https://staging.example.com/healthz
  connprobe watch --json --fail-on 'dns_timeouts>0' -- make smoke-test";

/// An owner label of the per-destination metrics (`--by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    /// The owning process's name.
    Comm,
    /// The owner's container: the first 12 characters of its id, or `host`.
    Container,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Write one JSON object per event to PATH (`-` for standard output).
    #[arg(long, value_name = "PATH")]
    pub json_log: Option<PathBuf>,

    /// Rotate the JSON log file before a line would take it past this size (`1048576`, `512K`,
    /// `100M`, `1G`): PATH becomes PATH.1, PATH.1 becomes PATH.2, and so on.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "json_log")]
    pub json_log_max_size: Option<u64>,

    /// Rotated JSON log files kept beside PATH (PATH.1, newest, to PATH.N) with
    /// --json-log-max-size; older ones are deleted.
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub json_log_max_files: u32,

    /// Stop cleanly after this long (e.g. `10`, `30s`, `5m`; a bare number is seconds).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Serve /metrics, /healthz and /diagnose on this address.
    #[arg(long, value_name = "IP:PORT", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,

    /// Do not serve metrics at all.
    #[arg(long, conflicts_with = "metrics_addr")]
    pub no_metrics: bool,

    /// TLS and basic authentication for the metrics endpoint, in the web configuration format
    /// of Prometheus exporters (exporter-toolkit): `tls_server_config` (cert_file, key_file,
    /// client_auth_type, client_ca_file) and `basic_auth_users` (bcrypt hashes). Read again on
    /// SIGHUP.
    #[arg(long, value_name = "FILE", conflicts_with = "no_metrics")]
    pub web_config_file: Option<PathBuf>,

    /// Destinations that get their own label; the rest fold into destination="other".
    #[arg(long, value_name = "N", default_value_t = 500)]
    pub max_destinations: usize,

    /// A destination with no event for this long frees its label slot.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub destination_idle: Duration,

    /// Split per-destination metrics by the owner: `comm` adds a `comm` label (the process
    /// name), `container` a `container` label (the short container id, or `host`). Repeatable.
    #[arg(long, value_enum, value_name = "LABEL")]
    pub by: Vec<GroupBy>,

    /// Deprecated: use `--by comm`.
    #[arg(long, hide = true)]
    pub by_comm: bool,

    /// Keep the agent's own traffic (connections to or from its --metrics-addr: scrapes,
    /// `diagnose`, `top`) in the log, metrics and verdicts; by default it is left out and only
    /// counted (connprobe_own_traffic_events_total).
    #[arg(long)]
    pub include_own_traffic: bool,

    /// Which kind of tracepoint to attach.
    #[arg(long, value_enum, default_value_t = HookMode::Auto)]
    pub hooks: HookMode,

    /// Do not trace the packets the kernel drops (the `kfree_skb` hook).
    #[arg(long)]
    pub no_drops: bool,

    /// Size of the kernel-to-agent ring buffer (a power of two, at least one page).
    #[arg(long, value_name = "BYTES", default_value_t = probe_common::DEFAULT_RING_BYTES)]
    pub ring_buffer_bytes: u32,

    /// Sockets followed at once in the kernel (LRU; evictions are counted as lost, stage map).
    #[arg(long, value_name = "N", default_value_t = probe_common::DEFAULT_MAX_SOCKETS)]
    pub max_sockets: u32,

    /// Where the programs keep each followed socket's record: `auto` (in the socket itself when
    /// every hook is a BTF tracepoint, else the LRU hash of --max-sockets), `lru` (always that
    /// LRU hash) or `lru-per-cpu` (an LRU hash with a list per CPU, --max-sockets per CPU), for
    /// the benchmark to compare what each costs.
    #[arg(long, value_enum, value_name = "STORE", default_value_t = SocketRecords::Auto,
          hide = true)]
    pub socket_records: SocketRecords,

    /// Write evidence bundles here when a destination crosses a trigger threshold.
    #[arg(long, value_name = "DIR")]
    pub evidence_dir: Option<PathBuf>,

    /// Most recent raw events kept in memory for evidence bundles and /diagnose.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub recorder_events: usize,

    /// Trigger an evidence bundle when a destination's failure ratio over the last minute
    /// reaches this (with at least --trigger-min-attempts attempts).
    #[arg(long, value_name = "RATIO", default_value_t = 0.2)]
    pub trigger_failure_ratio: f64,

    /// Trigger an evidence bundle when a destination's p99 handshake latency over the last
    /// minute reaches this.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub trigger_latency: Duration,

    /// Attempts a destination needs in the last minute before a trigger can fire.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub trigger_min_attempts: u64,

    /// More detail on standard error; also prints the event tally every --stats-interval.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// How often the tally (with -v) is printed and the screen on a terminal redrawn.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub stats_interval: Duration,

    /// Also watch DNS on this port (besides 53), UDP and TCP; repeat for more (up to 7).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub dns_port: Vec<u16>,

    /// A DNS query with no answer after this long is a timeout.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub dns_timeout: Duration,

    /// DNS queries waiting for an answer at once; past it the oldest is dropped and counted
    /// (connprobe_dns_pending_evicted_total).
    #[arg(long, value_name = "N", default_value_t = 16_384)]
    pub dns_max_pending: usize,

    /// Addresses remembered from DNS answers, to name the destinations of later connects.
    #[arg(long, value_name = "N", default_value_t = 16_384)]
    pub dns_max_names: usize,

    /// Resolvers that get their own `resolver` label; the rest count under "other".
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub dns_max_resolvers: usize,

    /// Do not watch DNS at all (no cgroup_skb programs).
    #[arg(long)]
    pub no_dns: bool,

    /// How JSON log lines are made: `fast` (the default) or `serde`, the same bytes through
    /// serde_json, for the benchmark to measure what the fast formatter buys.
    #[arg(long, value_enum, default_value_t = Encoder::Fast, hide = true)]
    pub log_encoder: Encoder,
}

#[derive(Debug, Clone, Args)]
pub struct AnalyzeArgs {
    /// JSON event logs (`.gz` is read compressed; `-` is standard input). Several files are
    /// several hosts, named by file name, or by the `host` field a log shipper added to each
    /// line; they are judged per host and compared ("refused from 11 of 12 hosts").
    #[arg(value_name = "EVENTS.jsonl", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,

    /// Judge only this long a window, ending at the log's last event (e.g. `5m`).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub window: Option<Duration>,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Fail (exit 100) when the command's connections break this rule: `failures>0`,
    /// `p99>200ms`, `retransmits>N`, `resets>N`, `dns_timeouts>N` (see below). Repeatable.
    #[arg(long, value_name = "RULE")]
    pub fail_on: Vec<crate::watch::rule::Rule>,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,

    /// Also write a JUnit XML report to FILE: one testcase per rule (and one for the
    /// command's exit), with a failure element where it failed.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,

    /// Which kind of tracepoint to attach.
    #[arg(long, value_enum, default_value_t = HookMode::Auto)]
    pub hooks: HookMode,

    /// A DNS query with no answer after this long is a timeout (so is one still unanswered
    /// when the command ends).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub dns_timeout: Duration,

    /// Do not watch DNS at all.
    #[arg(long)]
    pub no_dns: bool,

    /// More detail on standard error (the agent's log lines).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// The command to run, and its arguments, after `--`.
    #[arg(value_name = "COMMAND", required = true, num_args = 1.., last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct DiagnoseArgs {
    /// Address of the running agent.
    #[arg(long, value_name = "IP:PORT", default_value = DEFAULT_METRICS_ADDR)]
    pub addr: SocketAddr,

    /// How far back to look (e.g. `5m`).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub window: Duration,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// Address of the running agent (its --metrics-addr).
    #[arg(long, value_name = "IP:PORT", default_value = DEFAULT_METRICS_ADDR)]
    pub addr: SocketAddr,

    /// How often the screen is refreshed from the agent.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,

    /// The window the figures and verdicts cover: `1m` or `5m` (the `w` key switches).
    #[arg(long, value_name = "WINDOW", default_value = "1m", value_parser = parse_view_window)]
    pub window: ViewWindow,
}

impl RunArgs {
    /// Whether `--by comm` (or the deprecated `--by-comm`) was given.
    pub fn by_comm(&self) -> bool {
        self.by_comm || self.by.contains(&GroupBy::Comm)
    }

    pub fn by_container(&self) -> bool {
        self.by.contains(&GroupBy::Container)
    }
}

fn parse_view_window(text: &str) -> Result<ViewWindow, String> {
    text.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_is_repeatable_and_by_comm_still_works() {
        let cli = Cli::try_parse_from(["connprobe", "--by", "container", "--by", "comm"]).unwrap();
        assert!(cli.run.by_comm() && cli.run.by_container());
        let old = Cli::try_parse_from(["connprobe", "--by-comm"]).unwrap();
        assert!(old.run.by_comm() && !old.run.by_container());
        assert!(Cli::try_parse_from(["connprobe", "--by", "pod"]).is_err());
    }

    #[test]
    fn bare_flags_mean_run() {
        assert!(parse_duration("5m").is_ok());
        let cli =
            Cli::try_parse_from(["connprobe", "--json-log", "-", "--duration", "10"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.duration, Some(Duration::from_secs(10)));
        let cli = Cli::try_parse_from(["connprobe", "run", "--json-log", "x.jsonl"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Run(_))));
    }

    /// Every subcommand's summary is one whole sentence in `--help`: clap shows the first
    /// sentence of a doc comment and drops its period, so a second sentence ("The default.")
    /// came out as a cut one ("... (needs root). The default").
    #[test]
    fn help_summaries_are_whole_sentences() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(
            help.contains(
                "  run       Trace until stopped, the default subcommand (needs root, or CAP_BPF \
                 and CAP_PERFMON)\n"
            ),
            "{help}"
        );
        for sub in Cli::command().get_subcommands() {
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            assert!(!about.is_empty(), "{} has no summary", sub.get_name());
            assert!(
                !about.contains(". "),
                "{}'s summary is more than one sentence: {about:?}",
                sub.get_name()
            );
            let mut sub = sub.clone();
            let long = sub.render_help().to_string();
            assert!(long.starts_with(&about), "{long}");
        }
    }

    /// `--socket-records` is the benchmark's knob: accepted, but not offered in `--help`.
    #[test]
    fn socket_records_is_hidden_and_defaults_to_auto() {
        use clap::CommandFactory;
        let cli = Cli::try_parse_from(["connprobe"]).unwrap();
        assert_eq!(cli.run.socket_records, SocketRecords::Auto);
        let cli = Cli::try_parse_from(["connprobe", "--socket-records", "lru-per-cpu"]).unwrap();
        assert_eq!(cli.run.socket_records, SocketRecords::LruPerCpu);
        assert!(Cli::try_parse_from(["connprobe", "--socket-records", "storage"]).is_err());
        let help = Cli::command().render_long_help().to_string();
        assert!(!help.contains("socket-records"), "{help}");
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
