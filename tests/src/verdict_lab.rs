//! Helpers for the verdict tests (`tests/tests/verdicts.rs`): extra server addresses for a pool,
//! a connect that the kernel gives up on, the `connprobe diagnose` and `connprobe analyze`
//! subcommands, and reading their reports down to the lab's own destinations.
use std::{
    collections::BTreeMap,
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

use crate::{Lab, netns};

/// The binary under test, as for [`crate::Agent`].
pub fn connprobe_bin() -> anyhow::Result<PathBuf> {
    std::env::var_os("CONNPROBE_BIN")
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("CONNPROBE_BIN is not set: run the kernel tests through `cargo xtask test`, or set it to a built connprobe"))
}

/// A loopback address for the agent's `--metrics-addr`, as text.
pub fn free_loopback_addr() -> anyhow::Result<String> {
    Ok(crate::http::free_loopback_addr()?.to_string())
}

/// Whether `ip` is in the lab's subnets (10.200.X.0/24, fd00:200:X::/64): the lab's two hosts
/// and any address added with [`add_server_address`].
pub fn in_lab(lab: &Lab, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[..3] == lab.server_v4().octets()[..3],
        IpAddr::V6(v6) => v6.segments()[..4] == lab.server_v6().segments()[..4],
    }
}

/// Adds `ip`/24 to the server namespace's veth (the one holding the server's own address), so
/// that one server host answers as several pool members.
pub fn add_server_address(lab: &Lab, ip: Ipv4Addr) -> anyhow::Result<()> {
    let ns = lab.server_ns().name();
    let listing = netns::run("ip", &["-n", ns, "-o", "-4", "addr", "show"])?;
    let own = format!("{}/", lab.server_v4());
    let dev = listing
        .lines()
        .find(|l| l.contains(&own))
        .and_then(|l| l.split_whitespace().nth(1))
        .with_context(|| format!("no interface holds {} in {ns}: {listing}", lab.server_v4()))?
        .to_owned();
    netns::run(
        "ip",
        &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", &dev],
    )
    .map(drop)
}

/// A blocking connect to `remote` with `TCP_SYNCNT` = `syn_retries`: against a black hole the
/// kernel itself gives up (ETIMEDOUT) after 1 + 2 + ... seconds, without changing the
/// namespace-wide `net.ipv4.tcp_syn_retries` that other connects of the lab share.
pub fn connect_with_syn_retries(remote: SocketAddrV4, syn_retries: i32) -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned right below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns; closed when `fd` drops.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: a valid socket and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&raw const syn_retries).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: remote.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*remote.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid sockaddr_in and its length.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `connprobe diagnose --addr ADDR --window WINDOW [--json]`: its stdout, failing on a non-zero
/// exit. The subcommand bounds itself (2 s to connect, 10 s to read).
pub fn diagnose(addr: &str, window: &str, json: bool) -> anyhow::Result<String> {
    let mut args = vec!["diagnose", "--addr", addr, "--window", window];
    if json {
        args.push("--json");
    }
    run_connprobe(&args)
}

/// `connprobe analyze LOG --json`, parsed.
pub fn analyze(log: &Path) -> anyhow::Result<Value> {
    let log = log.to_str().context("the log path is not UTF-8")?;
    let out = run_connprobe(&["analyze", log, "--json"])?;
    serde_json::from_str(&out).with_context(|| format!("analyze printed no JSON report:\n{out}"))
}

fn run_connprobe(args: &[&str]) -> anyhow::Result<String> {
    let bin = connprobe_bin()?;
    let output = Command::new(&bin)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !output.status.success() {
        bail!(
            "`connprobe {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// `GET path` on the agent's HTTP endpoint: the status and the body.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    crate::http::http_get(addr.parse()?, path)
}

/// The agent's `connprobe_events_lost_total` by stage, from its `/metrics`.
pub fn events_lost(addr: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let (status, body) = http_get(addr, "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}: {body}");
    }
    let mut lost = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("connprobe_events_lost_total{stage=\"") else {
            continue;
        };
        if let Some((stage, value)) = rest.split_once("\"} ") {
            let n = value.trim().parse::<f64>().unwrap_or(f64::NAN);
            lost.insert(stage.to_owned(), n as u64);
        }
    }
    if lost.is_empty() {
        bail!("no connprobe_events_lost_total in /metrics");
    }
    Ok(lost)
}

/// Events the agent has delivered so far (`connprobe_events_total`, all types).
pub fn events_delivered(addr: &str) -> anyhow::Result<u64> {
    let (status, body) = http_get(addr, "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}: {body}");
    }
    let total = body
        .lines()
        .filter(|l| l.starts_with("connprobe_events_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum::<f64>();
    Ok(total as u64)
}

/// Waits until the agent has read what the kernel wrote: the kernel wakes the agent only once a
/// batch has built up, and otherwise the agent looks every 100 ms, so the last events of the
/// traffic can still be in the ring buffer. Done when the delivered count holds still over
/// 300 ms; at most `limit`.
pub fn wait_for_delivery(addr: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + limit;
    let mut last = events_delivered(addr)?;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = events_delivered(addr)?;
        if now == last || std::time::Instant::now() > deadline {
            return Ok(());
        }
        last = now;
    }
}

/// Writes events (as [`crate::Agent::stop`] returns them) back as a JSON log, one per line.
pub fn write_log(path: &Path, events: &[Value]) -> anyhow::Result<()> {
    let mut text = String::new();
    for event in events {
        text.push_str(&event.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A destination of a report: `ip:port` and its side (`client`, `server`, or none).
pub type DestinationSide = (String, Option<String>);

/// The ranked verdict IDs of every destination of a report (`/diagnose` or `analyze --json`)
/// whose address is one of the lab's.
pub fn lab_verdicts(lab: &Lab, report: &Value) -> BTreeMap<DestinationSide, Vec<String>> {
    let mut out = BTreeMap::new();
    for d in report["destinations"].as_array().into_iter().flatten() {
        let destination = d["destination"].as_str().unwrap_or_default().to_owned();
        let Ok(addr) = destination.parse::<std::net::SocketAddr>() else {
            continue;
        };
        if !in_lab(lab, addr.ip()) {
            continue;
        }
        let side = d["side"].as_str().map(str::to_owned);
        out.insert((destination, side), verdict_ids(&d["verdicts"]));
    }
    out
}

/// The `verdict` fields of a ranked list of verdicts.
pub fn verdict_ids(verdicts: &Value) -> Vec<String> {
    verdicts
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v["verdict"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The full verdict (with evidence) of `destination` on `side`, or `Null`.
pub fn find_verdict<'a>(
    report: &'a Value,
    destination: &str,
    side: &str,
    verdict: &str,
) -> &'a Value {
    report["destinations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["destination"] == destination && d["side"] == side)
        .flat_map(|d| d["verdicts"].as_array().into_iter().flatten())
        .find(|v| v["verdict"] == verdict)
        .unwrap_or(&Value::Null)
}

/// The report's groups on `port`.
pub fn groups_on_port(report: &Value, port: u16) -> Vec<Value> {
    report["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["port"] == port)
        .cloned()
        .collect()
}

/// A scratch directory, removed with everything in it on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("connprobe-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits (at most `limit`) for an evidence bundle in `dir` whose name ends with the file-safe
/// form of `destination` (`10.0.0.1:80` -> `..._10_0_0_1_80.json`), and returns it parsed.
pub fn wait_for_bundle(
    dir: &Path,
    destination: &str,
    limit: Duration,
) -> anyhow::Result<(PathBuf, Value)> {
    let safe: String = destination
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let suffix = format!("-{safe}.json");
    let deadline = Instant::now() + limit;
    loop {
        let found = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with("connprobe-evidence-") && n.ends_with(&suffix)
                })
            });
        if let Some(path) = found {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let bundle = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            return Ok((path, bundle));
        }
        if Instant::now() > deadline {
            let names: Vec<_> = std::fs::read_dir(dir)?
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect();
            bail!(
                "no evidence bundle for {destination} within {limit:?}; the directory holds {names:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
