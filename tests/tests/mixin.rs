//! deploy/mixin: the committed rules and dashboard are what the jsonnet renders; promtool accepts
//! the rules and passes the unit tests, in which every alert fires once and stays quiet once;
//! the dashboard is a well-formed Grafana model; and, against a real agent watching lab traffic
//! and a real Prometheus scraping it with the rules loaded, every metric the mixin names exists,
//! every dashboard query and template variable matches series, and every recording rule records
//! some.
//!
//! Metrics listed in the mixin's `pendingMetrics` (config.libsonnet: used by alerts written ahead
//! of the issue that adds them) are exempt from the lab check, which instead asserts that the
//! agent does not export them yet, so the list cannot go stale.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use tests::{
    Agent, Lab,
    dns_lab::DnsLab,
    prometheus::PrometheusServer,
    socket,
    traffic::{self, serve},
    verdict_lab::TempDir,
};

const SUBNET: u8 = 150;
const CLIENT_COMM: &str = "lab-mixin";
/// The command that renders the mixin, from the repository's root.
const RENDER: &str = "jsonnet -m deploy/mixin/rendered deploy/mixin/render.jsonnet";
/// Recording rules that need several hosts connecting to one destination, which one agent on
/// one kernel cannot produce: their arithmetic is covered by promtool's fleet tests.
const FLEET_ONLY: &[&str] = &["connprobe:instance_destinations_failing_alone:count"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

fn mixin() -> PathBuf {
    repo().join("deploy/mixin")
}

/// Runs `program` in `dir` and returns its stdout, or fails with its stderr.
fn run(program: &str, args: &[&str], dir: &Path) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("cannot run {program} (`cargo xtask setup` installs it)"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}):\n{stdout}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(stdout)
}

/// Evaluates a jsonnet expression in deploy/mixin.
fn jsonnet(code: &str) -> anyhow::Result<Value> {
    let out = run("jsonnet", &["-e", code], &mixin())?;
    Ok(serde_json::from_str(&out)?)
}

/// Every file under `dir`, by path relative to it, with its bytes.
fn files(dir: &Path) -> anyhow::Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.insert(path.strip_prefix(dir)?.to_path_buf(), std::fs::read(&path)?);
            }
        }
    }
    Ok(found)
}

#[test]
fn the_committed_files_are_what_the_jsonnet_renders() -> anyhow::Result<()> {
    let out = TempDir::new("mixin-render")?;
    std::fs::create_dir_all(out.path().join("dashboards"))?;
    let out_dir = out.path().to_string_lossy().into_owned();
    run("jsonnet", &["-m", &out_dir, "render.jsonnet"], &mixin())?;
    let fresh = files(out.path())?;
    let committed = files(&mixin().join("rendered"))?;
    let names = |m: &BTreeMap<PathBuf, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    ensure!(
        names(&fresh) == names(&committed),
        "deploy/mixin/rendered holds {:?} but the jsonnet renders {:?}: run `{RENDER}` (and remove stale files)",
        names(&committed),
        names(&fresh)
    );
    for (name, bytes) in &fresh {
        ensure!(
            committed[name] == *bytes,
            "deploy/mixin/rendered/{} differs from what the jsonnet renders: run `{RENDER}`",
            name.display()
        );
    }
    Ok(())
}

#[test]
fn the_jsonnet_is_formatted() -> anyhow::Result<()> {
    let sources: Vec<String> = files(&mixin())?
        .into_keys()
        .filter(|p| {
            !p.starts_with("rendered")
                && p.extension()
                    .is_some_and(|e| e == "jsonnet" || e == "libsonnet")
        })
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    ensure!(!sources.is_empty(), "no jsonnet in deploy/mixin");
    let mut args = vec!["--test"];
    args.extend(sources.iter().map(String::as_str));
    run("jsonnetfmt", &args, &mixin())
        .context("jsonnetfmt wants to reformat these: run `jsonnetfmt -i` on them")?;
    Ok(())
}

#[test]
fn promtool_accepts_the_rules() -> anyhow::Result<()> {
    let out = run(
        "promtool",
        &[
            "check",
            "rules",
            "prometheus_rules.json",
            "prometheus_alerts.json",
        ],
        &mixin().join("rendered"),
    )?;
    ensure!(out.contains("SUCCESS"), "promtool said: {out}");
    Ok(())
}

#[test]
fn every_alert_fires_and_stays_quiet_in_promtool_tests() -> anyhow::Result<()> {
    let alerts: BTreeSet<String> =
        jsonnet("(import 'mixin.libsonnet').prometheusAlerts")?["groups"]
            .as_array()
            .context("alert groups")?
            .iter()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .filter_map(|r| r["alert"].as_str().map(str::to_owned))
            .collect();
    ensure!(alerts.len() >= 9, "only {alerts:?}");
    let tests = jsonnet("import 'tests/alerts.jsonnet'")?;
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for case in tests["tests"].as_array().context("tests")? {
        for t in case["alert_rule_test"].as_array().into_iter().flatten() {
            let name = t["alertname"].as_str().context("alertname")?.to_owned();
            ensure!(
                alerts.contains(&name),
                "a test names {name}, which is no alert"
            );
            let expected = t["exp_alerts"].as_array().context("exp_alerts")?;
            if expected.is_empty() {
                quiet.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }
    let never_fires: Vec<_> = alerts.difference(&fires).collect();
    let never_quiet: Vec<_> = alerts.difference(&quiet).collect();
    ensure!(
        never_fires.is_empty() && never_quiet.is_empty(),
        "deploy/mixin/tests/alerts.jsonnet has no case where {never_fires:?} fire(s) and none where {never_quiet:?} stay(s) quiet"
    );
    let out = run(
        "promtool",
        &["test", "rules", "alerts_test.json"],
        &mixin().join("rendered"),
    )?;
    ensure!(out.contains("SUCCESS"), "promtool said: {out}");
    Ok(())
}

/// The dashboard, as committed.
fn dashboard() -> anyhow::Result<Value> {
    let path = mixin().join("rendered/dashboards/connprobe.json");
    Ok(serde_json::from_slice(&std::fs::read(&path)?)?)
}

/// What Grafana needs to load the model, and what makes it usable: unique ids, a grid of 24
/// columns without overlaps, every query with a refId and an expression on the chosen data
/// source, and every `$variable` defined.
fn dashboard_problems(d: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for field in ["uid", "title"] {
        if d[field].as_str().is_none_or(str::is_empty) {
            problems.push(format!("no {field}"));
        }
    }
    if d["schemaVersion"].as_u64().is_none_or(|v| v < 36) {
        problems.push("schemaVersion missing or older than 36".into());
    }
    let variables: BTreeSet<&str> = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .collect();
    let panels = d["panels"].as_array().cloned().unwrap_or_default();
    if panels.is_empty() {
        problems.push("no panels".into());
    }
    let mut ids = BTreeSet::new();
    let mut cells = BTreeMap::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        if !p["id"].as_u64().is_some_and(|id| ids.insert(id)) {
            problems.push(format!("panel {title:?}: id missing or repeated"));
        }
        let grid = |k: &str| p["gridPos"][k].as_u64();
        match (grid("x"), grid("y"), grid("w"), grid("h")) {
            (Some(x), Some(y), Some(w), Some(h)) if w > 0 && h > 0 && x + w <= 24 => {
                for cx in x..x + w {
                    for cy in y..y + h {
                        if let Some(other) = cells.insert((cx, cy), title.to_owned()) {
                            problems.push(format!("panel {title:?} overlaps {other:?}"));
                        }
                    }
                }
            }
            _ => problems.push(format!("panel {title:?}: bad gridPos {}", p["gridPos"])),
        }
        if p["type"] == "row" {
            continue;
        }
        if p["datasource"]["uid"] != "${datasource}" {
            problems.push(format!(
                "panel {title:?} does not use the chosen data source"
            ));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("panel {title:?} has no query"));
        }
        let mut ref_ids = BTreeSet::new();
        for t in &targets {
            if !t["refId"]
                .as_str()
                .is_some_and(|r| ref_ids.insert(r.to_owned()))
            {
                problems.push(format!("panel {title:?}: refId missing or repeated"));
            }
            let expr = t["expr"].as_str().unwrap_or_default();
            if expr.is_empty() {
                problems.push(format!("panel {title:?}: empty expression"));
            }
            for var in variables_in(expr) {
                if !var.starts_with("__") && !variables.contains(var.as_str()) {
                    problems.push(format!("panel {title:?} uses undefined ${var}"));
                }
            }
        }
    }
    problems
}

/// The `$name` references in a query.
fn variables_in(expr: &str) -> Vec<String> {
    expr.split('$')
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn the_dashboard_is_a_well_formed_grafana_model() -> anyhow::Result<()> {
    let problems = dashboard_problems(&dashboard()?);
    ensure!(
        problems.is_empty(),
        "the dashboard: {}",
        problems.join("; ")
    );
    // The check itself finds what it is for.
    let mut broken = dashboard()?;
    broken["panels"][2]["gridPos"] = broken["panels"][1]["gridPos"].clone();
    broken["panels"][3]["targets"][0]["expr"] = "rate(x{a=\"$nowhere\"}[5m])".into();
    let found = dashboard_problems(&broken);
    ensure!(
        found.iter().any(|p| p.contains("overlaps"))
            && found.iter().any(|p| p.contains("$nowhere")),
        "the check missed planted defects: {found:?}"
    );
    Ok(())
}

/// The metric names a PromQL expression reads: connprobe's (`connprobe_*`), recorded ones
/// (`connprobe:*`) and `up`, outside quoted strings.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in expr.chars().chain([' ']) {
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if word.starts_with("connprobe_") || word.starts_with("connprobe:") || word == "up" {
            names.insert(word.clone());
        }
        word.clear();
    }
    names
}

/// A dashboard query as Grafana sends it with every variable at "All".
fn as_sent(expr: &str, variables: &BTreeSet<String>) -> String {
    let mut q = expr.replace("$__rate_interval", "1m");
    for v in variables {
        q = q.replace(&format!("${v}"), ".+");
    }
    q
}

/// Rounds of lab traffic, a few scrapes apart: a counter's first sample is its start, so
/// `rate()` sees only what a later round adds.
const ROUNDS: usize = 2;

/// Lab traffic that exercises every series the mixin reads: established connects (handshake
/// histogram), refused ones (failures, resets), SYNs into a blackhole given up by the
/// application (SYN retransmits, `cancelled`) and a transfer across a lossy path (data
/// retransmits and segments sent); [`ROUNDS`] times, 2.5 s apart.
fn lab_traffic(lab: &mut Lab) -> anyhow::Result<()> {
    let server_ip = IpAddr::from(lab.server_v4());
    let ok = SocketAddr::new(server_ip, 8080);
    let refused = SocketAddr::new(server_ip, 8081);
    let blackhole = SocketAddr::new(server_ip, 8082);
    let lossy = SocketAddr::new(server_ip, 8083);
    lab.server_rule("tcp dport 8081 reject with tcp reset")?;
    lab.server_rule("tcp dport 8082 drop")?;
    lab.server_rule("tcp dport 8083 numgen random mod 100 < 20 drop")?;
    let echo = serve(lab, ok, 5 * ROUNDS, traffic::echo);
    let sink = serve(lab, lossy, ROUNDS, traffic::sink);
    let client_ip = IpAddr::from(lab.client_v4());
    let failures = lab
        .client(CLIENT_COMM, move || {
            let (mut refused_count, mut cancelled_count) = (0, 0);
            for round in 0..ROUNDS {
                if round > 0 {
                    std::thread::sleep(Duration::from_millis(2500));
                }
                for _ in 0..5 {
                    let stream = socket::connect(client_ip, ok, None)
                        .result
                        .expect("connect");
                    traffic::exchange(stream, b"hello").expect("echo");
                }
                refused_count += (0..5)
                    .filter(|_| socket::connect(client_ip, refused, None).result.is_err())
                    .count();
                cancelled_count += usize::from(
                    socket::connect(client_ip, blackhole, Some(Duration::from_millis(1500)))
                        .result
                        .is_err(),
                );
                let mut stream = socket::connect(client_ip, lossy, None)
                    .result
                    .expect("connect through the lossy path");
                traffic::limit_io(&stream);
                stream.write_all(&vec![0x5au8; 256 * 1024]).expect("send");
                stream
                    .shutdown(std::net::Shutdown::Write)
                    .expect("shutdown");
                let mut count = [0u8; 8];
                stream.read_exact(&mut count).expect("the byte count");
            }
            (refused_count, cancelled_count)
        })
        .join()
        .expect("client thread");
    echo.join().expect("server thread");
    sink.join().expect("server thread");
    ensure!(
        failures == (5 * ROUNDS, ROUNDS),
        "the lab's faults did not all fail: (refused, cancelled) = {failures:?}"
    );
    Ok(())
}

/// Queries to the lab's resolver, answered and unanswered, in two rounds (as [`lab_traffic`]:
/// a rate needs the counters to move between scrapes).
fn dns_traffic(dns: &DnsLab) -> anyhow::Result<()> {
    for round in 0..ROUNDS {
        if round > 0 {
            std::thread::sleep(Duration::from_millis(2500));
        }
        ensure!(
            dns.getent("ok-mixin.lab.test")?.success(),
            "an answered name"
        );
        ensure!(
            !dns.getent("silent-mixin.lab.test")?.success(),
            "a name the resolver ignores"
        );
    }
    // The last silence becomes a timeout after --dns-timeout.
    std::thread::sleep(Duration::from_millis(1500));
    Ok(())
}

/// The mixin's rules: what they record, and every expression (records' and alerts').
struct Rules {
    records: BTreeSet<String>,
    exprs: Vec<String>,
}

impl Rules {
    fn of_mixin() -> anyhow::Result<Self> {
        let mut rules = Rules {
            records: BTreeSet::new(),
            exprs: Vec::new(),
        };
        for field in ["prometheusRules", "prometheusAlerts"] {
            let groups = jsonnet(&format!("(import 'mixin.libsonnet').{field}"))?;
            for rule in groups["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            {
                if let Some(record) = rule["record"].as_str() {
                    rules.records.insert(record.to_owned());
                }
                rules
                    .exprs
                    .push(rule["expr"].as_str().unwrap_or_default().to_owned());
            }
        }
        Ok(rules)
    }
}

/// What the lab check found wrong, empty when every query matches.
fn lab_problems(
    prometheus: &PrometheusServer,
    queries: &[(String, String)],
    variables: &[(String, String)],
    rules: &Rules,
    pending: &BTreeSet<String>,
) -> anyhow::Result<Vec<String>> {
    let records = &rules.records;
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for expr in queries.iter().map(|(_, e)| e).chain(&rules.exprs) {
        names.extend(metric_names(expr));
    }
    for name in &names {
        if name.starts_with("connprobe:") {
            if !records.contains(name) {
                problems.push(format!("{name} is read but no rule records it"));
            }
            continue;
        }
        let found = prometheus.series_count(&format!("{{__name__=\"{name}\"}}"))?;
        match (pending.contains(name), found) {
            (false, 0) => problems.push(format!("the agent exports no {name}")),
            (true, n) if n > 0 => problems.push(format!(
                "{name} is in pendingMetrics but the agent exports it now: remove it from deploy/mixin/config.libsonnet"
            )),
            _ => {}
        }
    }
    for (what, expr) in queries {
        if metric_names(expr).iter().any(|n| pending.contains(n)) {
            continue;
        }
        if prometheus.series_count(expr)? == 0 {
            problems.push(format!("{what} matches no series: {expr}"));
        }
    }
    for (name, selector_and_label) in variables {
        let Some((selector, label)) = selector_and_label
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .and_then(|s| s.rsplit_once(','))
        else {
            problems.push(format!(
                "variable {name}: not label_values(SELECTOR, LABEL)"
            ));
            continue;
        };
        let query = format!("count by ({}) ({selector})", label.trim());
        if prometheus.series_count(&query)? == 0 {
            problems.push(format!("variable {name} offers no value: {query}"));
        }
    }
    for record in records {
        if FLEET_ONLY.contains(&record.as_str()) {
            continue;
        }
        if prometheus.series_count(record)? == 0 {
            problems.push(format!("the recording rule {record} records nothing"));
        }
    }
    for (rule, health, error) in prometheus.rule_health()? {
        if health == "err" {
            problems.push(format!("rule {rule} fails: {error}"));
        }
    }
    Ok(problems)
}

#[test]
fn every_query_matches_the_lab_agents_series() -> anyhow::Result<()> {
    let rendered = mixin().join("rendered");
    let mut dns = DnsLab::new(SUBNET)?;
    dns.use_resolver(false)?;
    let agent = Agent::start_with_metrics(&["--dns-timeout", "1s"])?;
    let prometheus = PrometheusServer::start_with_rules(
        agent.metrics_addr().context("the agent serves metrics")?,
        &[
            &rendered.join("prometheus_rules.json"),
            &rendered.join("prometheus_alerts.json"),
        ],
    )?;
    // Rates need samples from before the traffic: once Prometheus started late (a loaded CI
    // machine) and first scraped after the last round, every rate was 0 and the failure
    // ratios recorded nothing. Wait for its first scrape of the agent.
    let scraped_by = Instant::now() + Duration::from_secs(30);
    while prometheus.series_count("connprobe_build_info")? == 0 {
        ensure!(
            Instant::now() < scraped_by,
            "Prometheus did not scrape the agent within 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    lab_traffic(&mut dns.lab)?;
    dns_traffic(&dns)?;

    let pending: BTreeSet<String> = serde_json::from_value(jsonnet(
        "(import 'mixin.libsonnet')._config.pendingMetrics",
    )?)?;
    let d = dashboard()?;
    let variable_names: BTreeSet<String> = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    let variables: Vec<(String, String)> = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().unwrap_or_default().to_owned();
            let query = v["query"]["query"].as_str().unwrap_or_default();
            (name, as_sent(query, &variable_names))
        })
        .collect();
    let mut queries: Vec<(String, String)> = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            queries.push((
                format!("panel {:?} query {}", p["title"], t["refId"]),
                as_sent(expr, &variable_names),
            ));
        }
    }
    let rules = Rules::of_mixin()?;

    // Prometheus scrapes every second and evaluates the rules every second; rates over a minute
    // need two scrapes after the traffic.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let problems = lab_problems(&prometheus, &queries, &variables, &rules, &pending)?;
        if problems.is_empty() {
            eprintln!(
                "{} dashboard queries, {} variables and {} recording rules match the lab's series; pending, skipped: {pending:?}",
                queries.len(),
                variables.len(),
                rules.records.len()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            let addr = agent.metrics_addr().context("metrics")?;
            let (_, metrics) = tests::http::http_get(addr, "/metrics")?;
            let lab_series: Vec<&str> = metrics
                .lines()
                .filter(|l| l.contains(&format!("10.200.{SUBNET}.")))
                .collect();
            let mut recorded = String::new();
            for record in &rules.records {
                let n = prometheus.series_count(record)?;
                recorded.push_str(&format!("  {record}: {n} series\n"));
            }
            bail!(
                "after 45 s of the lab agent's series in Prometheus:\n  {}\nrecorded:\n{recorded}the agent's lab series:\n{}",
                problems.join("\n  "),
                lab_series.join("\n")
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn metric_names_skip_labels_and_strings() {
    assert_eq!(
        metric_names(
            r#"sum by (destination) (rate(connprobe_retransmits_total{job="connprobe", phase="syn"}[1m])) / connprobe:x_y:rate5m and up{job="connprobe_not"}"#
        ),
        ["connprobe:x_y:rate5m", "connprobe_retransmits_total", "up"]
            .into_iter()
            .map(String::from)
            .collect()
    );
}
