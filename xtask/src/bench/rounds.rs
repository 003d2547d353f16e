//! The interleaved rounds: one session per configuration and round (storm, fixed rate, bpf
//! stats, scrapes), then medians and ranges per configuration, ratios against (a) and, for
//! the agent's own CPU, against the other connprobe configurations of the same round.
use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, atomic::AtomicBool, atomic::Ordering::Relaxed},
    time::Duration,
};

use serde_json::{Value, json};

use super::{
    Plan, load,
    stats::{self, Spread, json_of, quantile},
    sys,
    tools::{Binaries, Session, Stopped, Tool},
};

/// One tool in one round.
#[derive(Debug, Default)]
pub struct Sample {
    storm_rate: f64,
    storm_errors: u64,
    fixed_conns: u64,
    fixed_rate: f64,
    machine_cpu_s: f64,
    load_cpu_s: f64,
    tool_cpu_s: f64,
    bpf_ns_per_conn: Option<f64>,
    bpf_runs_per_conn: Option<f64>,
    /// Per program: (ns per hit, hits per connection).
    bpf_programs: BTreeMap<String, (f64, f64)>,
    rss_bytes: Option<u64>,
    scrape_ms: Vec<f64>,
    scrape_storm_rate: Option<f64>,
    stopped: Stopped,
}

/// One session of `tool`: storm, fixed rate (CPU, RSS, then bpf stats), scrape storm.
pub fn measure_tool(
    plan: &Plan,
    tool: Tool,
    bins: &Binaries,
    work: &Path,
    ports: &[u16],
    fixed_rate: f64,
) -> anyhow::Result<Sample> {
    let session = Session::start(tool, bins, work, &[])?;
    let mut sample = Sample::default();

    let storm = load::storm(ports, plan.phase, None);
    sample.storm_rate = storm.rate();
    sample.storm_errors = storm.errors;

    let machine = sys::machine_busy_seconds();
    let own = sys::own_cpu_seconds();
    let tool_cpu = session.pid().map(sys::process_cpu_seconds);
    let fixed = load::storm(ports, plan.phase, Some(fixed_rate));
    sample.machine_cpu_s = sys::machine_busy_seconds() - machine;
    sample.load_cpu_s = sys::own_cpu_seconds() - own;
    sample.tool_cpu_s = match (session.pid(), tool_cpu) {
        (Some(pid), Some(before)) => sys::process_cpu_seconds(pid) - before,
        _ => 0.0,
    };
    sample.fixed_conns = fixed.completed;
    sample.fixed_rate = fixed.rate();
    sample.rss_bytes = session.pid().and_then(sys::rss_bytes);

    if let Some(pid) = session.pid() {
        let stats_on = sys::BpfStatsOn::enable()?;
        let before = sys::prog_stats(pid);
        let measured = load::storm(ports, plan.phase / 2, Some(fixed_rate));
        let after = sys::prog_stats(pid);
        drop(stats_on);
        let conns = measured.completed.max(1) as f64;
        let runs = after.since(&before, &sys::program_names());
        let time: u64 = runs.values().map(|r| r.run_time_ns).sum();
        let count: u64 = runs.values().map(|r| r.run_cnt).sum();
        sample.bpf_ns_per_conn = Some(time as f64 / conns);
        sample.bpf_runs_per_conn = Some(count as f64 / conns);
        sample.bpf_programs = runs
            .into_iter()
            .filter(|(_, r)| r.run_cnt > 0)
            .map(|(name, r)| {
                let per_hit = r.run_time_ns as f64 / r.run_cnt as f64;
                (name, (per_hit, r.run_cnt as f64 / conns))
            })
            .collect();
    }

    if let Some(addr) = session.metrics_addr() {
        let stop = Arc::new(AtomicBool::new(false));
        let scraper = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || load::scrape_loop(addr, Duration::from_millis(100), &stop))
        };
        let storm = load::storm(ports, plan.phase, None);
        stop.store(true, Relaxed);
        let latencies = scraper.join().unwrap_or_default();
        sample.scrape_ms = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        sample.scrape_storm_rate = Some(storm.rate());
    }

    sample.stopped = session.stop()?;
    Ok(sample)
}

/// Per tool: medians and ranges over the rounds, ratios taken against (a) of the same round.
pub fn summarize_rounds(configurations: &[Tool], samples: &BTreeMap<Tool, Vec<Sample>>) -> Value {
    let untraced = samples.get(&Tool::Untraced);
    let per_conn = |s: &Sample, seconds: f64| seconds / s.fixed_conns.max(1) as f64 * 1e6;
    let mut tools = serde_json::Map::new();
    for &tool in configurations {
        let Some(list) = samples.get(&tool) else {
            tools.insert(
                tool.key().into(),
                json!({ "label": tool.label(), "error": "no round ran" }),
            );
            continue;
        };
        // Pair each sample with (a) of the same round (by index: a failed round shifts nothing
        // as long as (a) never fails, and (a) runs no tool).
        let paired: Vec<(&Sample, Option<&Sample>)> = list
            .iter()
            .enumerate()
            .map(|(i, s)| (s, untraced.and_then(|u| u.get(i))))
            .collect();
        let values = |f: &dyn Fn(&Sample, Option<&Sample>) -> Option<f64>| {
            Spread::of(
                &paired
                    .iter()
                    .filter_map(|(s, u)| f(s, *u))
                    .collect::<Vec<_>>(),
            )
        };
        let storm = values(&|s, _| Some(s.storm_rate));
        let ratio = values(&|s, u| Some(s.storm_rate / u?.storm_rate));
        let machine = values(&|s, _| Some(per_conn(s, s.machine_cpu_s)));
        let machine_added =
            values(&|s, u| Some(per_conn(s, s.machine_cpu_s) - per_conn(u?, u?.machine_cpu_s)));
        let attributed_added = values(&|s, u| {
            Some(per_conn(s, s.load_cpu_s + s.tool_cpu_s) - per_conn(u?, u?.load_cpu_s))
        });
        let tool_cpu = values(&|s, _| (tool != Tool::Untraced).then(|| per_conn(s, s.tool_cpu_s)));
        let bpf = values(&|s, _| s.bpf_ns_per_conn);
        let bpf_runs = values(&|s, _| s.bpf_runs_per_conn);
        let programs = stats::programs_json(list.iter().map(|s| &s.bpf_programs), "hits_per_conn");
        let rss = values(&|s, _| s.rss_bytes.map(|b| b as f64 / (1 << 20) as f64));
        let achieved = values(&|s, _| Some(s.fixed_rate));
        let scrape: Vec<f64> = list
            .iter()
            .flat_map(|s| s.scrape_ms.iter().copied())
            .collect();
        let scrape_storm = values(&|s, u| Some(s.scrape_storm_rate? / u?.storm_rate));
        let lost: Option<u64> = if tool == Tool::Untraced {
            None
        } else {
            list.iter().map(|s| s.stopped.lost).sum()
        };
        let tallies: Vec<Value> = list
            .iter()
            .filter_map(|s| s.stopped.tally.as_ref().map(|t| json!(t)))
            .collect();
        let mut entry = json!({
            "label": tool.label(),
            "storm": {
                "conn_per_s": json_of(storm),
                "ratio_to_untraced": json_of(ratio),
                "connect_errors": list.iter().map(|s| s.storm_errors).sum::<u64>(),
            },
            "fixed_rate": {
                "achieved_conn_per_s": json_of(achieved),
                "machine_cpu_us_per_conn": json_of(machine),
                "machine_added_us_per_conn": json_of(machine_added),
                "load_plus_tool_added_us_per_conn": json_of(attributed_added),
                "tool_process_cpu_us_per_conn": json_of(tool_cpu),
                "bpf_prog_ns_per_conn": json_of(bpf),
                "bpf_prog_runs_per_conn": json_of(bpf_runs),
                "bpf_programs": programs,
                "rss_mib": json_of(rss),
            },
            "events_lost": lost,
            "events_lost_source": match tool {
                Tool::Untraced => "-",
                t if t.is_connprobe() => "connprobe's tally at exit (ringbuf+map+queue+log), all phases",
                Tool::Bpftrace => "bpftrace's 'Lost N events' warnings on stderr, all phases",
                _ => "the tool's 'lost N events on CPU' perf-buffer warnings on stderr, all phases",
            },
            "output_lines": list.iter().map(|s| s.stopped.output_lines).sum::<u64>(),
            "tallies": tallies,
        });
        if !scrape.is_empty() {
            entry["scrape"] = json!({
                "samples": scrape.len(),
                "p50_ms": quantile(&scrape, 0.5),
                "p99_ms": quantile(&scrape, 0.99),
                "max_ms": quantile(&scrape, 1.0),
                "storm_ratio_to_untraced_while_scraping": json_of(scrape_storm),
            });
        }
        tools.insert(tool.key().into(), entry);
    }
    Value::Object(tools)
}

/// The agent process's CPU per connection of one connprobe configuration against another's,
/// round by round (both ran in every round, interleaved): the median of the per-round ratios,
/// with both configurations' medians beside it.
pub fn agent_cpu_ratio(samples: &BTreeMap<Tool, Vec<Sample>>, tool: Tool, against: Tool) -> Value {
    let (Some(a), Some(b)) = (samples.get(&tool), samples.get(&against)) else {
        return Value::Null;
    };
    let per_conn = |s: &Sample| s.tool_cpu_s / s.fixed_conns.max(1) as f64 * 1e6;
    let ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| per_conn(x) / per_conn(y))
        .collect();
    let of = |list: &[Sample]| Spread::of(&list.iter().map(per_conn).collect::<Vec<_>>());
    json!({
        "configuration": tool.key(),
        "against": against.key(),
        "rounds": ratios.len(),
        "agent_cpu_us_per_conn": json_of(of(a)),
        "against_agent_cpu_us_per_conn": json_of(of(b)),
        "ratio": json_of(Spread::of(&ratios)),
        "per_round_ratios": ratios,
    })
}
