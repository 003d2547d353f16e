//! What a bench run reports: the issue-5 targets, the table printed on stdout (the same
//! numbers as results.json), and the smoke run's check that every configuration measured.
use std::fs;

use anyhow::bail;
use serde_json::{Value, json};

use super::{
    stats::{Spread, show},
    sys,
    tools::Tool,
};

pub fn machine() -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")?
            .split_once(':')
            .map(|(_, m)| m.trim().to_owned())
    });
    json!({
        "kernel": sys::output("uname", &["-r"]).map(|s| s.trim().to_owned()).ok(),
        "cpu_model": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "memory_gib": fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            let kib: f64 = m.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some((kib / (1 << 20) as f64 * 10.0).round() / 10.0)
        }),
    })
}

fn median(results: &Value, pointer: &str) -> Option<f64> {
    results.pointer(pointer)?.get("median")?.as_f64()
}

/// Each issue-5 target with the figure measured here.
pub fn targets(r: &Value) -> Value {
    let ratio = median(r, "/tools/connprobe/storm/ratio_to_untraced");
    let floor = median(r, "/tools/floor/storm/ratio_to_untraced");
    let added = median(r, "/tools/connprobe/fixed_rate/machine_added_us_per_conn");
    let attributed = median(
        r,
        "/tools/connprobe/fixed_rate/load_plus_tool_added_us_per_conn",
    );
    let agent = median(
        r,
        "/tools/connprobe/fixed_rate/tool_process_cpu_us_per_conn",
    );
    let lost = r
        .pointer("/tools/connprobe/events_lost")
        .and_then(Value::as_u64);
    let overload_ok = r
        .pointer("/overload/produced_equals_delivered_plus_lost")
        .and_then(Value::as_bool);
    let points = r
        .pointer("/destination_spread/points")
        .and_then(Value::as_array);
    let last = points.and_then(|p| p.last());
    let rss = last.and_then(|p| p["rss_mib"].as_f64());
    let p99 = r
        .pointer("/tools/connprobe/scrape/p99_ms")
        .and_then(Value::as_f64);
    let met = |ok: Option<bool>| ok.map_or(Value::Null, Value::Bool);
    json!([
        {"target": "storm >= 0.95 of untraced", "measured": ratio, "met": met(ratio.map(|v| v >= 0.95))},
        {"target": "storm within 0.03 of the floor (c)", "measured": ratio.zip(floor).map(|(b, c)| c - b),
         "met": met(ratio.zip(floor).map(|(b, c)| c - b <= 0.03))},
        {"target": "<= 1.5 us added machine CPU per connection (/proc/stat)", "measured": added,
         "met": met(added.map(|v| v <= 1.5))},
        {"target": "<= 1.5 us added CPU per connection (load generator + agent processes)", "measured": attributed,
         "met": met(attributed.map(|v| v <= 1.5))},
        {"target": "<= 0.5 us per connection in the agent process", "measured": agent,
         "met": met(agent.map(|v| v <= 0.5))},
        {"target": "zero events lost at the maximum connect rate", "measured": lost, "met": met(lost.map(|v| v == 0))},
        {"target": "overload: produced == delivered + lost", "measured": overload_ok, "met": met(overload_ok)},
        {"target": "RSS <= 64 MiB after the distinct destinations", "measured": rss, "met": met(rss.map(|v| v <= 64.0))},
        {"target": "/metrics p99 <= 50 ms under the storm", "measured": p99, "met": met(p99.map(|v| v <= 50.0))},
    ])
}

/// The table printed on stdout: the same numbers as the JSON.
pub fn table(tools: &[Tool], r: &Value) -> String {
    use std::fmt::Write as _;
    let spread = |pointer: &str, decimals: usize| -> String {
        let s = r.pointer(pointer).and_then(|v| {
            Some(Spread {
                median: v.get("median")?.as_f64()?,
                min: v.get("min")?.as_f64()?,
                max: v.get("max")?.as_f64()?,
                n: 0,
            })
        });
        show(s, decimals)
    };
    let mut out = String::new();
    let m = &r["machine"];
    let _ = writeln!(
        out,
        "\nconnprobe bench, {} ({} mode), kernel {}, {} x {}, {} rounds of {} s, medians (min-max)\n",
        r["date"].as_str().unwrap_or("?"),
        r["mode"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["cores"],
        m["cpu_model"].as_str().unwrap_or("?"),
        r["rounds"],
        r["phase_seconds"],
    );
    let _ = writeln!(
        out,
        "| configuration | storm conn/s | vs (a) | events lost | added machine CPU us/conn | added load+tool CPU us/conn | tool process CPU us/conn | in-kernel ns/conn | RSS MiB |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for &tool in tools {
        let k = tool.key();
        let lost = match &r["tools"][k]["events_lost"] {
            Value::Null if tool == Tool::Untraced => "-".to_owned(),
            Value::Null => "not reported".to_owned(),
            v => v.to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {lost} | {} | {} | {} | {} | {} |",
            tool.label(),
            spread(&format!("/tools/{k}/storm/conn_per_s"), 0),
            spread(&format!("/tools/{k}/storm/ratio_to_untraced"), 3),
            spread(
                &format!("/tools/{k}/fixed_rate/machine_added_us_per_conn"),
                2
            ),
            spread(
                &format!("/tools/{k}/fixed_rate/load_plus_tool_added_us_per_conn"),
                2
            ),
            spread(
                &format!("/tools/{k}/fixed_rate/tool_process_cpu_us_per_conn"),
                2
            ),
            spread(&format!("/tools/{k}/fixed_rate/bpf_prog_ns_per_conn"), 0),
            spread(&format!("/tools/{k}/fixed_rate/rss_mib"), 1),
        );
    }
    let _ = writeln!(
        out,
        "\nin-kernel time per program (fixed rate, bpf_stats): ns per hit, hits per connection\n"
    );
    let _ = writeln!(out, "| configuration | program | ns/hit | hits/conn |");
    let _ = writeln!(out, "| --- | --- | --- | --- |");
    for &tool in tools {
        let k = tool.key();
        let programs = r["tools"][k]["fixed_rate"]["bpf_programs"].as_object();
        for name in programs.into_iter().flat_map(|p| p.keys()) {
            let at = format!("/tools/{k}/fixed_rate/bpf_programs/{name}");
            let _ = writeln!(
                out,
                "| {} | {name} | {} | {} |",
                tool.label(),
                spread(&format!("{at}/ns_per_hit"), 0),
                spread(&format!("{at}/hits_per_conn"), 2),
            );
        }
    }
    let _ = writeln!(out);
    for c in r["comparisons"].as_array().into_iter().flatten() {
        if c.is_null() {
            continue;
        }
        let _ = writeln!(
            out,
            "agent CPU per connection, {} / {}: {} (median of {} per-round ratios; medians {} vs {} us)",
            c["configuration"].as_str().unwrap_or("?"),
            c["against"].as_str().unwrap_or("?"),
            spread_of(&c["ratio"], 3),
            c["rounds"],
            spread_of(&c["agent_cpu_us_per_conn"], 2),
            spread_of(&c["against_agent_cpu_us_per_conn"], 2),
        );
    }
    let _ = writeln!(
        out,
        "\nfixed rate: {:.0} conn/s (half the calibrated untraced rate)",
        r["fixed_rate_conn_per_s"].as_f64().unwrap_or(0.0)
    );
    let scrape = &r["tools"]["connprobe"]["scrape"];
    if scrape.is_null() {
        let _ = writeln!(
            out,
            "/metrics under the storm: not measured (/metrics never answered)"
        );
    } else {
        let _ = writeln!(
            out,
            "/metrics under the storm: p50 {} ms, p99 {} ms, max {} ms over {} scrapes",
            fmt_ms(&scrape["p50_ms"]),
            fmt_ms(&scrape["p99_ms"]),
            fmt_ms(&scrape["max_ms"]),
            scrape["samples"]
        );
    }
    let f = &r["failure_storm"];
    let _ = writeln!(
        out,
        "failure storm: refused {} made, {} refused at the client, {} counted by connprobe; lossy path: TcpRetransSegs client {} vs connprobe {}, server {} vs connprobe {}",
        f["refused"]["connects_made"],
        f["refused"]["refused_seen_by_client"],
        f["refused"]["connprobe_failed_connects_reason_refused"],
        f["lossy"]["client_tcp_retrans_segs_nstat"],
        f["lossy"]["connprobe_client_retransmit_segments"],
        f["lossy"]["server_tcp_retrans_segs_nstat"],
        f["lossy"]["connprobe_server_retransmit_segments"],
    );
    let points: Vec<String> = r["destination_spread"]["points"]
        .as_array()
        .map(|p| {
            p.iter()
                .map(|p| {
                    format!(
                        "{}: {} MiB, {} series",
                        p["after_destinations"],
                        p["rss_mib"]
                            .as_f64()
                            .map_or("?".into(), |v| format!("{v:.1}")),
                        p["metrics_series"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "destination spread (after N destinations): {}",
        points.join("; ")
    );
    let o = &r["overload"];
    let _ = writeln!(
        out,
        "overload (64 KiB ring, reader stopped {} s): produced {} = delivered {} + lost ringbuf {} (+ undecodable {}): {}",
        o["reader_stopped_seconds"],
        o["produced_in_kernel"],
        o["delivered"],
        o["lost_ringbuf"],
        o["undecodable"],
        o["produced_equals_delivered_plus_lost"]
    );
    let _ = writeln!(out, "\ntargets (issue 5):");
    for t in r["targets"].as_array().into_iter().flatten() {
        let verdict = match t["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        let _ = writeln!(
            out,
            "  {:<70} {:>12}  {verdict}",
            t["target"].as_str().unwrap_or(""),
            fmt_value(&t["measured"])
        );
    }
    out
}

fn fmt_ms(v: &Value) -> String {
    v.as_f64().map_or("?".into(), |v| format!("{v:.1}"))
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_f64() => format!("{:.3}", n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    }
}

/// The smoke check: every tool produced its storm rate, CPU numbers and, for connprobe, every
/// scenario its figures; and the stalled reader lost nothing it did not count.
pub fn check_every_tool_measured(tools: &[Tool], r: &Value) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for &tool in tools {
        let k = tool.key();
        let mut need = vec![
            format!("/tools/{k}/storm/conn_per_s/median"),
            format!("/tools/{k}/fixed_rate/machine_cpu_us_per_conn/median"),
        ];
        if tool != Tool::Untraced {
            need.push(format!(
                "/tools/{k}/fixed_rate/tool_process_cpu_us_per_conn/median"
            ));
            need.push(format!("/tools/{k}/fixed_rate/bpf_prog_ns_per_conn/median"));
            need.push(format!("/tools/{k}/fixed_rate/rss_mib/median"));
            need.push(format!("/tools/{k}/events_lost"));
        }
        if !matches!(tool, Tool::Untraced | Tool::Floor)
            && r["tools"][k]["output_lines"].as_u64() == Some(0)
        {
            missing.push(format!("{}: wrote no output", tool.label()));
        }
        for pointer in need {
            if r.pointer(&pointer).and_then(Value::as_f64).is_none() {
                missing.push(pointer);
            }
        }
    }
    let metrics = r.pointer("/tools/connprobe/scrape/p99_ms").is_some()
        || r["destination_spread"]["metrics_available"] == true;
    if metrics {
        for pointer in [
            "/tools/connprobe/scrape/p99_ms",
            "/destination_spread/points/2/metrics_series",
        ] {
            if r.pointer(pointer).and_then(Value::as_f64).is_none() {
                missing.push(pointer.to_owned());
            }
        }
    } else {
        println!(
            "bench --quick: note: connprobe's /metrics never answered, so scrape latency and series were not checked"
        );
    }
    for pointer in [
        "/failure_storm/refused/connprobe_failed_connects_reason_refused",
        "/failure_storm/lossy/client_tcp_retrans_segs_nstat",
        "/destination_spread/points/2/rss_mib",
        "/overload/produced_in_kernel",
    ] {
        if r.pointer(pointer).and_then(Value::as_f64).is_none() {
            missing.push(pointer.to_owned());
        }
    }
    if !missing.is_empty() {
        bail!(
            "the smoke bench produced no number for: {}",
            missing.join(", ")
        );
    }
    if r.pointer("/overload/produced_equals_delivered_plus_lost") != Some(&Value::Bool(true)) {
        bail!(
            "overload: events produced in the kernel are neither delivered nor counted lost: {}",
            r["overload"]
        );
    }
    println!("bench --quick: every tool ran and produced its numbers");
    Ok(())
}

/// A `{median, min, max}` object as `median (min-max)`.
fn spread_of(v: &Value, decimals: usize) -> String {
    let s = (|| {
        Some(Spread {
            median: v.get("median")?.as_f64()?,
            min: v.get("min")?.as_f64()?,
            max: v.get("max")?.as_f64()?,
            n: 0,
        })
    })();
    show(s, decimals)
}
