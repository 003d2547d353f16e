//! What a bench run reports: the targets of issues 5 and 10, the table printed on stdout (the same
//! numbers as results.json), and the smoke run's check that every configuration measured.
use std::fs;

use anyhow::bail;
use serde_json::{Value, json};

use super::{
    Scenario, dns_storm,
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

/// Each target of issues 5 and 10 with the figure measured here.
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
    let kernel = median(r, "/tools/connprobe/fixed_rate/bpf_prog_ns_per_conn");
    let kernel_floor = median(r, "/tools/floor/fixed_rate/bpf_prog_ns_per_conn");
    let kernel_times = kernel
        .zip(kernel_floor)
        .filter(|(_, f)| *f > 0.0)
        .map(|(k, f)| k / f);
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
        {"target": "in-kernel ns per connection <= 2x the floor's (c) (issue 10)", "measured": kernel_times,
         "met": met(kernel_times.map(|v| v <= 2.0))},
        {"target": "RSS <= 48 MiB after the distinct destinations (issue 10; issue 5: 64)", "measured": rss, "met": met(rss.map(|v| v <= 48.0))},
        {"target": "/metrics p99 <= 50 ms under the storm", "measured": p99, "met": met(p99.map(|v| v <= 50.0))},
    ])
}

/// " (anonymous 31.2, ring buffers 10.0, binary 6.7, libraries 2.1)": where an RSS figure's
/// memory is, or nothing where the run did not say.
fn rss_parts(parts: &Value) -> String {
    let Some(parts) = parts.as_object() else {
        return String::new();
    };
    let named: Vec<String> = sys::RSS_PARTS
        .iter()
        .filter_map(|k| {
            let mib = parts.get(*k)?.as_f64()?;
            Some(format!("{} {mib:.1}", k.replace('_', " ")))
        })
        .collect();
    format!(" ({})", named.join(", "))
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
    // The connect rounds' tables, when they ran (`--scenarios`).
    let connect_ran = r["tools"].as_object().is_some_and(|t| !t.is_empty());
    if connect_ran {
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
    }
    if let Some(fixed) = r["fixed_rate_conn_per_s"].as_f64() {
        let _ = writeln!(
            out,
            "\nfixed rate: {fixed:.0} conn/s (half the calibrated untraced rate)"
        );
    }
    let scrape = &r["tools"]["connprobe"]["scrape"];
    let connprobe_ran = r["tools"]["connprobe"].is_object();
    if connprobe_ran && scrape.is_null() {
        let _ = writeln!(
            out,
            "/metrics under the storm: not measured (/metrics never answered)"
        );
    } else if connprobe_ran {
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
    if f.is_object() {
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
    }
    let points: Vec<String> = r["destination_spread"]["points"]
        .as_array()
        .map(|p| {
            p.iter()
                .map(|p| {
                    format!(
                        "{}: {} MiB{}, {} series",
                        p["after_destinations"],
                        p["rss_mib"]
                            .as_f64()
                            .map_or("?".into(), |v| format!("{v:.1}")),
                        rss_parts(&p["rss_parts_mib"]),
                        p["metrics_series"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if !points.is_empty() {
        let _ = writeln!(
            out,
            "destination spread (after N destinations): {}",
            points.join("; ")
        );
    }
    let o = &r["overload"];
    if o.is_object() {
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
    }
    dns_table(&mut out, &r["dns_storm"]);
    let measured: Vec<&Value> = r["targets"]
        .as_array()
        .into_iter()
        .flatten()
        // Without the connect rounds (`--scenarios`), only what the parts that ran measured.
        .filter(|t| connect_ran || !t["measured"].is_null())
        .collect();
    if !measured.is_empty() {
        let _ = writeln!(out, "\ntargets (issues 5 and 10):");
    }
    for t in measured {
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

/// The DNS query storm's table: queries/s, ratio to (a), in-kernel and agent cost per query.
fn dns_table(out: &mut String, d: &Value) {
    use std::fmt::Write as _;
    if !d.is_object() {
        return;
    }
    if let Some(error) = d["error"].as_str() {
        let _ = writeln!(out, "\nDNS query storm: FAILED: {error}");
        return;
    }
    let _ = writeln!(
        out,
        "\nDNS query storm: {} client sockets -> {}, {} rounds of {} s (+ {} s with bpf_stats), medians (min-max)\n",
        d["client_sockets"],
        d["server"].as_str().unwrap_or("?"),
        d["rounds"],
        d["storm_seconds"],
        d["bpf_stats_seconds"],
    );
    let _ = writeln!(
        out,
        "| configuration | queries/s | vs (a) | unanswered | DNS programs ns/query | all programs ns/query | agent CPU us/query | client dns events / queries sent |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for key in d["configurations"].as_array().into_iter().flatten() {
        let t = &d["tools"][key.as_str().unwrap_or("")];
        let events = match &t["client_dns_events"] {
            Value::Null => "-".to_owned(),
            v => format!("{v} / {}", t["queries_sent"]),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {events} |",
            t["label"].as_str().unwrap_or("?"),
            spread_of(&t["queries_per_s"], 0),
            spread_of(&t["ratio_to_untraced"], 3),
            t["storm_unanswered"],
            spread_of(&t["dns_prog_ns_per_query"], 0),
            spread_of(&t["all_prog_ns_per_query"], 0),
            spread_of(&t["agent_cpu_us_per_query"], 2),
        );
    }
    for key in d["configurations"].as_array().into_iter().flatten() {
        let t = &d["tools"][key.as_str().unwrap_or("")];
        for (name, p) in t["bpf_programs"].as_object().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {}: {name} {} ns/hit, {} hits/query",
                t["label"].as_str().unwrap_or("?"),
                spread_of(&p["ns_per_hit"], 0),
                spread_of(&p["hits_per_query"], 2),
            );
        }
    }
    let _ = writeln!(
        out,
        "queries sent {}, logged by the server {}; connprobe logged or counted every query: {}",
        d["queries_sent"],
        d["queries_logged_by_server"],
        d["tools"]["connprobe"]["every_query_logged_or_counted"],
    );
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
/// scenario its figures; the stalled reader lost nothing it did not count; the DNS storm
/// measured every configuration, and connprobe logged or counted every query.
pub fn check_every_tool_measured(
    tools: &[Tool],
    scenarios: &[Scenario],
    r: &Value,
) -> anyhow::Result<()> {
    let runs = |s: Scenario| scenarios.contains(&s);
    let mut missing = Vec::new();
    let mut need = |pointer: &str| {
        if r.pointer(pointer).and_then(Value::as_f64).is_none() {
            missing.push(pointer.to_owned());
        }
    };
    if runs(Scenario::Connect) {
        for &tool in tools {
            let k = tool.key();
            need(&format!("/tools/{k}/storm/conn_per_s/median"));
            need(&format!(
                "/tools/{k}/fixed_rate/machine_cpu_us_per_conn/median"
            ));
            if tool != Tool::Untraced {
                need(&format!(
                    "/tools/{k}/fixed_rate/tool_process_cpu_us_per_conn/median"
                ));
                need(&format!(
                    "/tools/{k}/fixed_rate/bpf_prog_ns_per_conn/median"
                ));
                need(&format!("/tools/{k}/fixed_rate/rss_mib/median"));
                need(&format!("/tools/{k}/events_lost"));
            }
        }
    }
    let metrics = r.pointer("/tools/connprobe/scrape/p99_ms").is_some()
        || r["destination_spread"]["metrics_available"] == true;
    if metrics {
        if runs(Scenario::Connect) {
            need("/tools/connprobe/scrape/p99_ms");
        }
        if runs(Scenario::Spread) {
            need("/destination_spread/points/2/metrics_series");
        }
    } else if runs(Scenario::Connect) || runs(Scenario::Spread) {
        println!(
            "bench --quick: note: connprobe's /metrics never answered, so scrape latency and series were not checked"
        );
    }
    for (scenario, pointer) in [
        (
            Scenario::Failures,
            "/failure_storm/refused/connprobe_failed_connects_reason_refused",
        ),
        (
            Scenario::Failures,
            "/failure_storm/lossy/client_tcp_retrans_segs_nstat",
        ),
        (Scenario::Spread, "/destination_spread/points/2/rss_mib"),
        (Scenario::Overload, "/overload/produced_in_kernel"),
    ] {
        if runs(scenario) {
            need(pointer);
        }
    }
    let dns_tools: Vec<Tool> = dns_storm::CONFIGURATIONS
        .into_iter()
        .filter(|t| tools.contains(t))
        .collect();
    if runs(Scenario::Dns) {
        for tool in &dns_tools {
            let k = tool.key();
            need(&format!("/dns_storm/tools/{k}/queries_per_s/median"));
            if *tool != Tool::Untraced {
                need(&format!(
                    "/dns_storm/tools/{k}/agent_cpu_us_per_query/median"
                ));
            }
        }
        if dns_tools.contains(&Tool::Connprobe) {
            need("/dns_storm/tools/connprobe/dns_prog_ns_per_query/median");
            need("/dns_storm/tools/connprobe/client_dns_events");
        }
    }
    let mut wrong = Vec::new();
    if runs(Scenario::Connect) {
        for &tool in tools {
            if !matches!(tool, Tool::Untraced | Tool::Floor)
                && r["tools"][tool.key()]["output_lines"].as_u64() == Some(0)
            {
                wrong.push(format!("{}: wrote no output", tool.label()));
            }
        }
    }
    if !missing.is_empty() {
        wrong.push(format!("no number for: {}", missing.join(", ")));
    }
    if runs(Scenario::Overload)
        && r.pointer("/overload/produced_equals_delivered_plus_lost") != Some(&Value::Bool(true))
    {
        wrong.push(format!(
            "overload: events produced in the kernel are neither delivered nor counted lost: {}",
            r["overload"]
        ));
    }
    if runs(Scenario::Dns) && dns_tools.contains(&Tool::Connprobe) {
        let c = &r["dns_storm"]["tools"]["connprobe"];
        if c["every_query_logged_or_counted"] != true {
            wrong.push(format!(
                "DNS storm: connprobe neither logged nor counted some queries: {} client dns events for {} queries, unaccounted per round {}, its DNS counts {}",
                c["client_dns_events"], c["queries_sent"], c["unaccounted_queries_per_round"], c["dns_counts_at_exit"]
            ));
        }
        if c["client_dns_events"].as_u64() == Some(0) {
            wrong.push("DNS storm: connprobe logged no dns event".to_owned());
        }
    }
    if !wrong.is_empty() {
        bail!("the smoke bench: {}", wrong.join("; "));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of the DNS storm alone (`--scenarios dns`) prints its table and no connect table.
    #[test]
    fn dns_storm_alone_prints_only_its_table() {
        let spread = |v: f64| json!({ "median": v, "min": v, "max": v, "rounds": 1 });
        let mut r = json!({
            "date": "2026-12-03T16:39:26Z", "mode": "full", "machine": {}, "rounds": 1,
            "phase_seconds": 5.0, "tools": null, "comparisons": [],
            "failure_storm": null, "destination_spread": null, "overload": null,
            "dns_storm": {
                "server": "127.77.0.53:53", "client_sockets": 4, "rounds": 1,
                "storm_seconds": 5.0, "bpf_stats_seconds": 2.5,
                "configurations": ["untraced", "connprobe"],
                "queries_sent": 30, "queries_logged_by_server": 30,
                "tools": {
                    "untraced": { "label": "(a) untraced", "queries_per_s": spread(5000.0),
                                  "ratio_to_untraced": spread(1.0), "storm_unanswered": 0 },
                    "connprobe": { "label": "(b) connprobe defaults", "queries_per_s": spread(4500.0),
                                   "ratio_to_untraced": spread(0.9), "storm_unanswered": 0,
                                   "dns_prog_ns_per_query": spread(24000.0),
                                   "client_dns_events": 20, "queries_sent": 20,
                                   "every_query_logged_or_counted": true },
                },
            },
        });
        r["targets"] = targets(&r);
        let text = table(&Tool::DEFAULT, &r);
        assert!(text.contains("| (b) connprobe defaults | 4500 (4500-4500) | 0.900 (0.900-0.900) | 0 | 24000 (24000-24000) |"), "{text}");
        assert!(text.contains("20 / 20"), "{text}");
        assert!(
            text.contains("connprobe logged or counted every query: true"),
            "{text}"
        );
        assert!(!text.contains("storm conn/s"), "{text}");
        assert!(!text.contains("targets (issues 5 and 10)"), "{text}");
    }
}
