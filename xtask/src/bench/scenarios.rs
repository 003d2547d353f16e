//! The scenarios with connprobe alone: a failure storm against ground truth, many distinct
//! destinations, an overload with the reader stopped.
use std::{
    collections::BTreeMap,
    fs,
    io::BufRead as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{
    Plan, lab, load, sys,
    tools::{Binaries, Session, Tool},
};

/// Refused connects and a lossy path, with connprobe running: its JSON log against the truth.
pub fn failure_storm(plan: &Plan, bins: &Binaries, work: &Path) -> anyhow::Result<Value> {
    eprintln!("bench: failure storm");
    let lab = lab::LossyLab::new()?;
    let listener = lab.listen()?;
    let client_before = lab.client_retrans_segs()?;
    let server_before = lab.server_retrans_segs()?;
    // Found before the agent starts: the probe connect must not count.
    let port = load::refused_port()?;
    let session = Session::start(Tool::Connprobe, bins, work, &[])?;
    let log = session
        .output_path()
        .context("connprobe has a log")?
        .to_owned();

    let refused = load::refused_connects(vec![
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        plan.refused_connects as usize
    ]);

    let connections = plan.lossy_connections;
    let server = std::thread::spawn(move || load::sink_server(listener, connections));
    let bytes = plan.lossy_bytes;
    let per_thread = connections.div_ceil(2);
    let clients: Vec<_> = (0..2)
        .map(|_| {
            lab.in_client(move || {
                load::bulk_sends(
                    SocketAddr::from((lab::SERVER_IP, lab::LOSSY_PORT)),
                    per_thread.min(connections),
                    bytes,
                )
            })
        })
        .collect();
    let mut lossy = load::Outcome::default();
    for client in clients {
        let outcome = lab::join(client)?;
        lossy.completed += outcome.completed;
        lossy.errors += outcome.errors;
        lossy.elapsed = lossy.elapsed.max(outcome.elapsed);
    }
    let _ = server.join();
    // The server's FIN can still be resent (the client's last ACK may be dropped): let the
    // retransmit timers settle before reading the counters.
    std::thread::sleep(Duration::from_secs(2));
    let client_retrans = lab.client_retrans_segs()? - client_before;
    let server_retrans = lab.server_retrans_segs()? - server_before;
    let stopped = session.stop()?;
    drop(lab);

    let counted = count_log(&log, port)?;
    let _ = fs::remove_file(&log);
    Ok(json!({
        "refused": {
            "connects_made": plan.refused_connects,
            "refused_seen_by_client": refused.completed,
            "connprobe_failed_connects_reason_refused": counted.refused,
            "match": counted.refused == refused.completed,
            "logged_twice_for_one_client_port": counted.refused_repeats,
        },
        "lossy": {
            "path": "veth between two namespaces, nftables drops 20% of segments to the server port",
            "connections": lossy.completed + lossy.errors,
            "connections_completed": lossy.completed,
            "bytes_per_connection": bytes,
            "client_tcp_retrans_segs_nstat": client_retrans,
            "connprobe_client_retransmit_segments": counted.client_segments,
            "client_match": counted.client_segments == client_retrans,
            "server_tcp_retrans_segs_nstat": server_retrans,
            "connprobe_server_retransmit_segments": counted.server_segments,
            "server_match": counted.server_segments == server_retrans,
        },
        "connprobe_events_lost": stopped.lost,
    }))
}

#[derive(Default)]
struct LogCounts {
    refused: u64,
    /// Refused connects logged more than once for the same client port, as logged.
    refused_repeats: Vec<Value>,
    client_segments: u64,
    server_segments: u64,
}

/// Failed connects to 127.0.0.1:`port` with reason refused, and retransmitted segments sent
/// from the lab's client and server addresses.
fn count_log(log: &Path, port: u16) -> anyhow::Result<LogCounts> {
    let file = fs::File::open(log).with_context(|| format!("cannot read {}", log.display()))?;
    let mut counts = LogCounts::default();
    let (client, server) = (lab::CLIENT_IP.to_string(), lab::SERVER_IP.to_string());
    let mut refused_ports: BTreeMap<u64, Value> = BTreeMap::new();
    for line in std::io::BufReader::new(file).lines() {
        let Ok(event) = serde_json::from_str::<Value>(&line?) else {
            continue;
        };
        match event["type"].as_str() {
            Some("connect")
                if event["side"] == "client"
                    && event["outcome"] == "failed"
                    && event["reason"] == "refused"
                    && event["dst_ip"] == "127.0.0.1"
                    && event["dst_port"] == port =>
            {
                counts.refused += 1;
                let src_port = event["src_port"].as_u64().unwrap_or(0);
                if let Some(first) = refused_ports.insert(src_port, event.clone())
                    && counts.refused_repeats.len() < 6
                {
                    counts.refused_repeats.push(first);
                    counts.refused_repeats.push(event);
                }
            }
            Some("retransmit") => {
                let segments = event["segments"].as_u64().unwrap_or(0);
                if event["src_ip"] == client.as_str() {
                    counts.client_segments += segments;
                } else if event["src_ip"] == server.as_str() {
                    counts.server_segments += segments;
                }
            }
            _ => {}
        }
    }
    Ok(counts)
}

/// Refused connects to many distinct destinations: RSS and /metrics series before, halfway, after.
pub fn destination_spread(plan: &Plan, bins: &Binaries, work: &Path) -> anyhow::Result<Value> {
    eprintln!("bench: {} distinct destinations", plan.destinations);
    let port = load::refused_port()?;
    let session = Session::start(Tool::Connprobe, bins, work, &[])?;
    let pid = session.pid().context("connprobe runs")?;
    let destinations = load::spread_destinations(plan.destinations, port);
    let observe = || {
        std::thread::sleep(Duration::from_millis(500));
        let series = session
            .metrics_addr()
            .and_then(|addr| load::get_metrics(addr).ok())
            .map(|body| load::series_count(&body));
        (sys::rss_bytes(pid), series, sys::rss_parts(pid))
    };
    let mut points = vec![(0u32, observe())];
    let half = destinations.len() / 2;
    let mut made = 0u64;
    for part in [&destinations[..half], &destinations[half..]] {
        made += load::refused_connects(part.to_vec()).completed;
        points.push((
            points.last().map_or(0, |p| p.0) + part.len() as u32,
            observe(),
        ));
    }
    let stopped = session.stop()?;
    let metrics_there = points.iter().all(|(_, (_, series, _))| series.is_some());
    let mib = |b: Option<u64>| b.map(|b| b as f64 / (1 << 20) as f64);
    Ok(json!({
        "destinations": plan.destinations,
        "refused_connects_made": made,
        "points": points.iter().map(|(n, (rss, series, parts))| json!({
            "after_destinations": n,
            "rss_mib": mib(*rss),
            "rss_parts_mib": parts.as_ref().map(|parts| parts
                .iter()
                .map(|(part, bytes)| (part.to_string(), json!(mib(Some(*bytes)))))
                .collect::<serde_json::Map<_, _>>()),
            "metrics_series": series,
        })).collect::<Vec<_>>(),
        "metrics_available": metrics_there,
        "connprobe_events_lost": stopped.lost,
    }))
}

/// A storm with a 64 KiB ring buffer while the agent is stopped (SIGSTOP) for a while:
/// every event the kernel produced must be delivered or counted as lost.
pub fn overload(plan: &Plan, bins: &Binaries, work: &Path) -> anyhow::Result<Value> {
    eprintln!(
        "bench: overload (SIGSTOP for {} s)",
        plan.overload_stop.as_secs()
    );
    let servers = load::Servers::start(load::SERVER_PORTS)?;
    let ports = servers.ports().to_vec();
    let session = Session::start(
        Tool::Connprobe,
        bins,
        work,
        &["--ring-buffer-bytes", "65536"],
    )?;
    let margin = Duration::from_secs(1);
    let total = margin + plan.overload_stop + margin;
    let storm = std::thread::spawn(move || load::storm(&ports, total, None));
    std::thread::sleep(margin);
    session.signal(libc::SIGSTOP);
    std::thread::sleep(plan.overload_stop);
    session.signal(libc::SIGCONT);
    let outcome = storm
        .join()
        .map_err(|_| anyhow::anyhow!("the storm panicked"))?;
    std::thread::sleep(Duration::from_millis(500));
    let stopped = session.stop()?;
    drop(servers);
    let produced = stopped.tally_value("kernel");
    let delivered = stopped.delivered();
    let ringbuf = stopped.tally_value("ringbuf");
    let undecodable = stopped.tally_value("undecodable");
    Ok(json!({
        "ring_buffer_bytes": 65536,
        "reader_stopped_seconds": plan.overload_stop.as_secs_f64(),
        "connections": outcome.completed,
        "produced_in_kernel": produced,
        "delivered": delivered,
        "lost_ringbuf": ringbuf,
        "lost_map": stopped.tally_value("map"),
        "lost_queue": stopped.tally_value("queue"),
        "lost_log": stopped.tally_value("log"),
        "undecodable": undecodable,
        "produced_equals_delivered_plus_lost": produced == delivered + ringbuf + undecodable,
        "tally": stopped.tally,
    }))
}
