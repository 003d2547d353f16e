//! The DNS query storm (issue 12): what the DNS programs cost per query. The lab's own DNS
//! server (`tests::dns_lab::DnsServer`, dns_server.py) answers on a loopback address, port 53;
//! a bounded number of UDP client sockets ask it as fast as it answers (closed loop, one query
//! in flight per socket), in interleaved rounds of (a) untraced, (b) connprobe defaults and
//! (b=) connprobe --no-dns. Per round and configuration: queries/s (stats off), then a shorter
//! phase with `kernel.bpf_stats_enabled=1` for the programs' in-kernel time per query; the
//! agent's CPU per query from its threads' schedstat. With DNS on, every query sent must be a
//! client-side `dns` line of the agent's log, or be counted (pending at exit, lost, evicted).
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, ErrorKind},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use ::tests::dns_lab::DnsServer;
use anyhow::Context as _;
use serde_json::{Value, json};

use super::{
    Plan,
    stats::{self, Spread, json_of},
    sys,
    tools::{Binaries, Session, Tool},
};

/// Where the storm's server listens (port 53): any 127/8 address is this host's loopback.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 53);
/// Client sockets, each with one query in flight.
pub const CLIENT_SOCKETS: usize = 4;
/// A name the server answers with NOERROR and one A record (its `ok-` prefix).
pub const QUERY_NAME: &str = "ok-storm.bench.test";
/// How long a socket waits for its answer before it counts the query unanswered.
const ANSWER_WAIT: Duration = Duration::from_millis(200);
/// The configurations of the storm, in this order within a round.
pub const CONFIGURATIONS: [Tool; 3] = [Tool::Untraced, Tool::Connprobe, Tool::ConnprobeNoDns];

/// What the clients of one storm did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QueryOutcome {
    pub sent: u64,
    /// Answers with the query's id, NOERROR and one answer record.
    pub answered: u64,
    /// Answers with the query's id but another rcode or record count.
    pub wrong: u64,
    /// No answer within [`ANSWER_WAIT`] (or a send error).
    pub unanswered: u64,
    pub elapsed: Duration,
}

impl QueryOutcome {
    pub fn rate(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64()
    }
}

/// A DNS query for `name`, type A, class IN, recursion desired.
pub fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(12 + name.len() + 6);
    q.extend_from_slice(&id.to_be_bytes());
    // Flags (RD), one question, no answer, authority or additional records.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    // The root label, QTYPE A, QCLASS IN.
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// How an answer read from the socket relates to query `id`.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// The answer to `id`: a response, NOERROR, one answer record.
    Answered,
    /// The answer to `id`, but not that one.
    Wrong,
    /// Not the answer to `id` (a late answer to an earlier query, or not a response).
    Other,
}

/// Looks only at the header: the id, QR, RCODE and ANCOUNT.
pub fn classify(reply: &[u8], id: u16) -> Reply {
    if reply.len() < 12 || u16::from_be_bytes([reply[0], reply[1]]) != id || reply[2] & 0x80 == 0 {
        return Reply::Other;
    }
    let rcode = reply[3] & 0x0f;
    let answers = u16::from_be_bytes([reply[6], reply[7]]);
    if rcode == 0 && answers == 1 {
        Reply::Answered
    } else {
        Reply::Wrong
    }
}

/// [`CLIENT_SOCKETS`] sockets asking `server` for [`QUERY_NAME`] in a closed loop for `duration`.
pub fn query_storm(server: SocketAddr, duration: Duration) -> anyhow::Result<QueryOutcome> {
    let start = Instant::now();
    let deadline = start + duration;
    let totals: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let mut threads = Vec::new();
    for t in 0..CLIENT_SOCKETS {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .context("cannot open a UDP socket for the DNS storm")?;
        socket.connect(server)?;
        socket.set_read_timeout(Some(ANSWER_WAIT))?;
        let totals = Arc::clone(&totals);
        threads.push(
            std::thread::Builder::new()
                .name("bench-dns-client".into())
                .spawn(move || {
                    let mut counts = [0u64; 4];
                    let mut buf = [0u8; 512];
                    let mut id = (t as u16).wrapping_mul(16_384);
                    while Instant::now() < deadline {
                        id = id.wrapping_add(1);
                        counts[0] += 1;
                        if socket.send(&query(id, QUERY_NAME)).is_err() {
                            counts[3] += 1;
                            continue;
                        }
                        counts[loop {
                            match socket.recv(&mut buf) {
                                Ok(n) => match classify(&buf[..n], id) {
                                    Reply::Answered => break 1,
                                    Reply::Wrong => break 2,
                                    Reply::Other => continue,
                                },
                                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                                Err(_) => break 3,
                            }
                        }] += 1;
                    }
                    for (total, n) in totals.iter().zip(counts) {
                        total.fetch_add(n, Relaxed);
                    }
                })?,
        );
    }
    for thread in threads {
        let _ = thread.join();
    }
    let [sent, answered, wrong, unanswered] = [0, 1, 2, 3].map(|i| totals[i].load(Relaxed));
    Ok(QueryOutcome {
        sent,
        answered,
        wrong,
        unanswered,
        elapsed: start.elapsed(),
    })
}

/// One configuration in one round.
#[derive(Debug, Default)]
struct DnsSample {
    storm: QueryOutcome,
    /// Queries sent in all phases of the session (storm and bpf stats).
    sent: u64,
    agent_cpu_us_per_query: Option<f64>,
    /// In-kernel ns per query, the DNS programs (`dns_*`) and all of the agent's programs.
    dns_prog_ns_per_query: Option<f64>,
    all_prog_ns_per_query: Option<f64>,
    /// Per program: (ns per hit, hits per query).
    programs: BTreeMap<String, (f64, f64)>,
    /// Client-side `dns` lines of the agent's log for the storm's server.
    client_events: Option<u64>,
    /// The agent's DNS counters at exit (pending, ringbuf, queue, evicted, ...).
    dns_counts: Option<BTreeMap<String, u64>>,
}

impl DnsSample {
    /// Queries the agent (DNS on) neither logged as a client-side `dns` line nor counted at exit
    /// (pending, lost in the ring or the queue, evicted). Those counts cover both sides and
    /// both directions, so they bound the shortfall from above; never below zero.
    fn unaccounted(&self) -> Option<u64> {
        let events = self.client_events?;
        let counts = self.dns_counts.as_ref()?;
        let counted: u64 = ["pending", "ringbuf", "queue", "evicted"]
            .iter()
            .map(|k| counts.get(*k).copied().unwrap_or(0))
            .sum();
        Some(self.sent.saturating_sub(events + counted))
    }

    /// Every query logged once or counted: none missing, none logged twice.
    fn accounted(&self) -> bool {
        self.unaccounted() == Some(0) && self.client_events.is_some_and(|e| e <= self.sent)
    }
}

/// The storm in interleaved rounds; its results for results.json.
pub fn dns_storm(plan: &Plan, bins: &Binaries, work: &Path) -> anyhow::Result<Value> {
    let configurations: Vec<Tool> = CONFIGURATIONS
        .into_iter()
        .filter(|t| plan.tools.contains(t))
        .collect();
    eprintln!(
        "bench: DNS query storm, {} rounds of {} x {:.1} s",
        plan.rounds,
        configurations.len(),
        plan.phase.as_secs_f64() * 1.5
    );
    refuse_foreign_cgroup_programs()?;
    let dir = work.join("dns");
    fs::create_dir_all(&dir)?;
    let server = DnsServer::start(None, IpAddr::V4(SERVER_IP), SERVER_IP, &dir)?;
    let addr = SocketAddr::from((SERVER_IP, 53));
    let probe = query_storm(addr, Duration::from_millis(100))?;
    anyhow::ensure!(
        probe.answered > 0,
        "the DNS server on {addr} answered none of {} queries",
        probe.sent
    );

    let mut samples: BTreeMap<Tool, Vec<DnsSample>> = BTreeMap::new();
    let mut failures = Vec::new();
    for round in 0..plan.rounds {
        for i in 0..configurations.len() {
            let tool = configurations[(round + i) % configurations.len()];
            eprintln!(
                "bench: DNS round {}/{}: {}",
                round + 1,
                plan.rounds,
                tool.label()
            );
            match measure(plan, tool, bins, work, addr) {
                Ok(sample) => samples.entry(tool).or_default().push(sample),
                Err(e) => {
                    eprintln!("bench: DNS storm, {} FAILED: {e:#}", tool.label());
                    failures.push(format!("{} (round {}): {e:#}", tool.label(), round + 1));
                }
            }
        }
    }
    let sent: u64 = samples.values().flatten().map(|s| s.sent).sum();
    let logged_by_server = server.logged_count();
    drop(server);
    anyhow::ensure!(
        failures.is_empty(),
        "{} DNS round(s) failed: {}",
        failures.len(),
        failures.join("; ")
    );
    Ok(json!({
        "server": format!("{addr} (tests/src/dns_server.py, python3, a thread per query)"),
        "client_sockets": CLIENT_SOCKETS,
        "query": format!("{QUERY_NAME} A, UDP, one in flight per socket, {} ms answer wait", ANSWER_WAIT.as_millis()),
        "rounds": plan.rounds,
        "storm_seconds": plan.phase.as_secs_f64(),
        "bpf_stats_seconds": plan.phase.as_secs_f64() / 2.0,
        "configurations": configurations.iter().map(|t| t.key()).collect::<Vec<_>>(),
        "queries_sent": sent + probe.sent,
        "queries_logged_by_server": logged_by_server,
        "tools": summarize(&configurations, &samples),
    }))
}

/// Refuses to measure while programs sit on the cgroup v2 root: another agent's cgroup_skb
/// programs would see (and slow) every query of every configuration, the untraced one too.
fn refuse_foreign_cgroup_programs() -> anyhow::Result<()> {
    let attached = sys::cgroup_root_programs()?;
    anyhow::ensure!(
        attached.is_empty(),
        "other eBPF programs are attached to the cgroup v2 root: {}; stop them (`bpftool cgroup \
         show` on the cgroup v2 mount lists them) and run the bench again",
        attached
            .iter()
            .map(|p| format!("{} (program {}, {})", p.name, p.id, p.attach_type))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// One session of `tool`: the storm, then (with an agent) the bpf stats phase.
fn measure(
    plan: &Plan,
    tool: Tool,
    bins: &Binaries,
    work: &Path,
    addr: SocketAddr,
) -> anyhow::Result<DnsSample> {
    let session = Session::start(tool, bins, work, &[])?;
    let log = session.output_path().map(Path::to_owned);
    let mut sample = DnsSample::default();
    let cpu_before = session.pid().map(sys::process_cpu_seconds);
    sample.storm = query_storm(addr, plan.phase)?;
    sample.sent = sample.storm.sent;
    if let (Some(pid), Some(before)) = (session.pid(), cpu_before) {
        let seconds = sys::process_cpu_seconds(pid) - before;
        sample.agent_cpu_us_per_query = Some(seconds / sample.storm.sent.max(1) as f64 * 1e6);
    }
    if let Some(pid) = session.pid() {
        let stats_on = sys::BpfStatsOn::enable()?;
        let before = sys::prog_stats(pid);
        let measured = query_storm(addr, plan.phase / 2)?;
        let after = sys::prog_stats(pid);
        drop(stats_on);
        sample.sent += measured.sent;
        let queries = measured.sent.max(1) as f64;
        let runs = after.since(&before, &sys::program_names());
        let ns = |dns_only: bool| {
            let time: u64 = runs
                .iter()
                .filter(|(name, _)| !dns_only || name.starts_with("dns_"))
                .map(|(_, r)| r.run_time_ns)
                .sum();
            time as f64 / queries
        };
        sample.dns_prog_ns_per_query = Some(ns(true));
        sample.all_prog_ns_per_query = Some(ns(false));
        sample.programs = runs
            .iter()
            .filter(|(_, r)| r.run_cnt > 0)
            .map(|(name, r)| {
                let per_hit = r.run_time_ns as f64 / r.run_cnt as f64;
                (name.clone(), (per_hit, r.run_cnt as f64 / queries))
            })
            .collect();
    }
    let stopped = session.stop()?;
    if let Some(log) = log {
        sample.client_events = Some(count_client_events(&log, addr)?);
        let _ = fs::remove_file(&log);
    }
    sample.dns_counts = stopped.dns;
    Ok(sample)
}

/// Client-side `dns` lines of the agent's log whose resolver is `server`.
fn count_client_events(log: &Path, server: SocketAddr) -> anyhow::Result<u64> {
    let file = fs::File::open(log).with_context(|| format!("cannot read {}", log.display()))?;
    let ip = server.ip().to_string();
    let mut count = 0;
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        // Only parse the lines that can be DNS events: the log holds other types too.
        if !line.contains("\"dns\"") {
            continue;
        }
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if event["type"] == "dns"
            && event["side"] == "client"
            && event["dst_ip"] == ip.as_str()
            && event["dst_port"] == server.port()
        {
            count += 1;
        }
    }
    Ok(count)
}

/// Per configuration: medians and ranges over the rounds, ratios against (a) of the same round.
fn summarize(configurations: &[Tool], samples: &BTreeMap<Tool, Vec<DnsSample>>) -> Value {
    let untraced = samples.get(&Tool::Untraced);
    let mut tools = serde_json::Map::new();
    for &tool in configurations {
        let Some(list) = samples.get(&tool) else {
            tools.insert(
                tool.key().into(),
                json!({ "label": tool.label(), "error": "no round ran" }),
            );
            continue;
        };
        let values = |f: &dyn Fn(usize, &DnsSample) -> Option<f64>| {
            Spread::of(
                &list
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| f(i, s))
                    .collect::<Vec<_>>(),
            )
        };
        let ratio = values(&|i, s| Some(s.storm.rate() / untraced?.get(i)?.storm.rate()));
        let programs = stats::programs_json(list.iter().map(|s| &s.programs), "hits_per_query");
        let sum = |f: &dyn Fn(&DnsSample) -> u64| list.iter().map(f).sum::<u64>();
        let mut entry = json!({
            "label": tool.label(),
            "queries_per_s": json_of(values(&|_, s| Some(s.storm.rate()))),
            "ratio_to_untraced": json_of(ratio),
            "queries_sent": sum(&|s| s.sent),
            "storm_answered": sum(&|s| s.storm.answered),
            "storm_unanswered": sum(&|s| s.storm.unanswered),
            "storm_wrong_answers": sum(&|s| s.storm.wrong),
        });
        if tool != Tool::Untraced {
            entry["agent_cpu_us_per_query"] = json_of(values(&|_, s| s.agent_cpu_us_per_query));
            entry["dns_prog_ns_per_query"] = json_of(values(&|_, s| s.dns_prog_ns_per_query));
            entry["all_prog_ns_per_query"] = json_of(values(&|_, s| s.all_prog_ns_per_query));
            entry["bpf_programs"] = Value::Object(programs);
            entry["client_dns_events"] =
                json!(list.iter().map(|s| s.client_events).sum::<Option<u64>>());
            entry["dns_counts_at_exit"] =
                json!(list.iter().map(|s| &s.dns_counts).collect::<Vec<_>>());
        }
        if tool == Tool::Connprobe {
            let unaccounted: Vec<Option<u64>> = list.iter().map(DnsSample::unaccounted).collect();
            entry["unaccounted_queries_per_round"] = json!(unaccounted);
            entry["every_query_logged_or_counted"] = json!(list.iter().all(DnsSample::accounted));
        }
        tools.insert(tool.key().into(), entry);
    }
    Value::Object(tools)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_one_question_for_the_name() {
        let q = query(0x1234, "ok-a.b");
        assert_eq!(&q[..6], &[0x12, 0x34, 0x01, 0x00, 0, 1]);
        assert_eq!(&q[12..], b"\x04ok-a\x01b\x00\x00\x01\x00\x01");
    }

    #[test]
    fn replies_are_classified_by_id_rcode_and_answers() {
        let mut reply = query(7, "ok-x.test");
        reply[2] |= 0x80;
        reply[7] = 1;
        assert_eq!(classify(&reply, 7), Reply::Answered);
        assert_eq!(classify(&reply, 8), Reply::Other);
        reply[3] = 0x83;
        assert_eq!(classify(&reply, 7), Reply::Wrong);
        // A query (QR clear) is not an answer.
        assert_eq!(classify(&query(7, "ok-x.test"), 7), Reply::Other);
        assert_eq!(classify(&reply[..5], 7), Reply::Other);
    }

    #[test]
    fn unaccounted_queries_take_the_agents_counts_off() {
        let sample = DnsSample {
            sent: 100,
            client_events: Some(90),
            dns_counts: Some(BTreeMap::from([
                ("pending".to_string(), 4),
                ("ringbuf".to_string(), 5),
                ("queue".to_string(), 1),
            ])),
            ..DnsSample::default()
        };
        assert_eq!(sample.unaccounted(), Some(0));
        assert!(sample.accounted());
        let twice = DnsSample {
            sent: 100,
            client_events: Some(101),
            dns_counts: sample.dns_counts.clone(),
            ..DnsSample::default()
        };
        assert!(!twice.accounted());
        let short = DnsSample {
            client_events: Some(80),
            ..sample
        };
        assert_eq!(short.unaccounted(), Some(10));
        assert!(!short.accounted());
    }
}
