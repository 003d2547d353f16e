//! Least privilege (probe-user `privileges`): the real agent started by `setpriv` as an
//! unprivileged user (65534) with only the capabilities it needs as ambient capabilities traces
//! real lab connections correctly, names a server older than itself, and holds no capability
//! once it says it is tracing, in any of its threads; started as root it gives up every one,
//! bounding set included. A missing capability stops the start with one sentence that names it
//! and what it is for. The systemd unit in deploy/ passes `systemd-analyze verify`.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use tests::{
    Agent, Lab, assert_exactly,
    events::{self, Flow, Listener, Opener},
    expect::lab_events_without_drops,
    socket::{self, Attempt},
    traffic::{self, SERVER_COMM, serve},
};

const CLIENT: Opener<'static> = Opener::thread("lab-client");
/// The user the agent runs as: nobody.
const UNPRIVILEGED: u32 = 65534;
/// What connprobe needs as a user other than root (README, "Least privilege"): loading and
/// attaching, naming listeners older than itself, and watching DNS (cgroup_skb).
const MINIMAL: &[&str] = &[
    "bpf",
    "perfmon",
    "sys_ptrace",
    "dac_read_search",
    "net_admin",
];

/// Capability numbers (linux/capability.h).
fn mask(names: &[&str]) -> u64 {
    names
        .iter()
        .map(|name| match *name {
            "dac_read_search" => 1u64 << 2,
            "net_admin" => 1 << 12,
            "sys_ptrace" => 1 << 19,
            "sys_admin" => 1 << 21,
            "perfmon" => 1 << 38,
            "bpf" => 1 << 39,
            other => panic!("no capability {other} in this test"),
        })
        .sum()
}

/// `setpriv` arguments that run a command as `UNPRIVILEGED` with exactly `caps` as ambient
/// capabilities and in the bounding set, as systemd's `AmbientCapabilities=` and
/// `CapabilityBoundingSet=` do.
fn setpriv(caps: &[&str]) -> Vec<String> {
    let list: String = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "setpriv".into(),
        format!("--reuid={UNPRIVILEGED}"),
        format!("--regid={UNPRIVILEGED}"),
        "--clear-groups".into(),
        format!("--inh-caps={list}"),
        format!("--ambient-caps={list}"),
        format!("--bounding-set={list}"),
        "--".into(),
    ]
}

/// `wrapper` after a private view of the mounts (host mounts still propagate in, nothing
/// propagates out) in which `prepare` (shell) ran first.
fn in_own_mounts(prepare: &str, wrapper: Vec<String>) -> Vec<String> {
    let mut all: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "slave",
        "sh",
        "-c",
        &format!("{prepare}; exec \"$@\""),
        "sh",
    ]
    .map(String::from)
    .to_vec();
    all.extend(wrapper);
    all
}

/// Makes the tracefs state of a private mount namespace: none at all, or mounted (root's, 0700).
const NO_TRACEFS: &str =
    "umount /sys/kernel/debug 2>/dev/null; umount /sys/kernel/tracing 2>/dev/null; true";
const TRACEFS: &str = "umount /sys/kernel/debug 2>/dev/null; umount /sys/kernel/tracing \
                       2>/dev/null; mount -t tracefs tracefs /sys/kernel/tracing";

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The capability sets of every thread of `pid`, and its real uid.
fn thread_status(pid: u32) -> anyhow::Result<Vec<(String, ThreadCaps)>> {
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    let mut all = Vec::new();
    for task in std::fs::read_dir(&tasks).with_context(|| format!("{}", tasks.display()))? {
        let task = task?;
        let status = std::fs::read_to_string(task.path().join("status"))?;
        let comm = std::fs::read_to_string(task.path().join("comm"))?;
        let caps = ThreadCaps::parse(&status)
            .with_context(|| format!("no capability lines in {status}"))?;
        all.push((
            format!("{} ({})", task.file_name().to_string_lossy(), comm.trim()),
            caps,
        ));
    }
    ensure!(!all.is_empty(), "{} lists no thread", tasks.display());
    Ok(all)
}

#[derive(Debug, PartialEq, Eq)]
struct ThreadCaps {
    uid: u32,
    inheritable: u64,
    permitted: u64,
    effective: u64,
    bounding: u64,
    ambient: u64,
    no_new_privs: bool,
}

impl ThreadCaps {
    fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let hex = |name: &str| u64::from_str_radix(field(name)?, 16).ok();
        Some(ThreadCaps {
            uid: field("Uid")?.split_whitespace().next()?.parse().ok()?,
            inheritable: hex("CapInh")?,
            permitted: hex("CapPrm")?,
            effective: hex("CapEff")?,
            bounding: hex("CapBnd")?,
            ambient: hex("CapAmb")?,
            no_new_privs: field("NoNewPrivs")? == "1",
        })
    }
}

/// After "connprobe is tracing": every thread runs as `uid`, holds no capability (effective,
/// permitted, inheritable, ambient) and has no_new_privs set, and its bounding set is `bounding`.
fn assert_dropped(agent: &Agent, uid: u32, bounding: u64) -> anyhow::Result<()> {
    let expected = ThreadCaps {
        uid,
        inheritable: 0,
        permitted: 0,
        effective: 0,
        bounding,
        ambient: 0,
        no_new_privs: true,
    };
    for (thread, caps) in thread_status(agent.pid().context("the agent runs")?)? {
        ensure!(
            caps == expected,
            "thread {thread} of the agent has {caps:x?}, expected {expected:x?}; agent's stderr:\n{}",
            agent.stderr_text()
        );
    }
    ensure!(
        agent
            .stderr_text()
            .contains("dropped every capability: the attached programs need none"),
        "the agent did not say it dropped its capabilities:\n{}",
        agent.stderr_text()
    );
    Ok(())
}

/// `count` connects from the client namespace to `server`, a message echoed on each; returns
/// every connect's local address.
fn connect_and_echo(
    lab: &Lab,
    client_ip: IpAddr,
    server: SocketAddr,
    count: usize,
) -> Vec<SocketAddr> {
    lab.client(CLIENT.comm, move || {
        (0..count)
            .map(|i| {
                let Attempt { local, result } = socket::connect(client_ip, server, None);
                let stream = result.unwrap_or_else(|e| panic!("connect {local} -> {server}: {e}"));
                let message = format!("hello {i}");
                let reply = traffic::exchange(stream, message.as_bytes()).expect("echo");
                assert_eq!(reply, message.as_bytes());
                local
            })
            .collect()
    })
    .join()
    .expect("client thread")
}

/// Connects to a lab server `count` times, runs `before_stop`, stops the agent and expects
/// exactly each connection's four events, the server's named by `owner`.
fn traced_exactly(
    lab: &Lab,
    agent: Agent,
    listener: std::thread::JoinHandle<Vec<SocketAddr>>,
    owner: &Listener,
    count: usize,
    before_stop: impl FnOnce(&Agent) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let server = SocketAddr::new(lab.server_v4().into(), 8080);
    let clients = connect_and_echo(lab, lab.client_v4().into(), server, count);
    let peers = listener.join().expect("server thread");
    assert_eq!(
        peers, clients,
        "the server saw other peers than the client made"
    );
    lab.settle(Duration::from_secs(10))?;
    before_stop(&agent)?;
    let log = agent.stop()?;
    let mut expected = Vec::new();
    for &client in &clients {
        let flow = Flow { client, server };
        expected.push(events::client_established(flow, CLIENT, 0));
        expected.push(events::server_established(flow, owner));
        expected.push(events::client_close(flow, CLIENT));
        expected.push(events::server_close(flow, owner));
    }
    assert_exactly(&lab_events_without_drops(lab, &log), &expected);
    Ok(())
}

/// Waits until the agent's tally (`-v`) says the kernel produced at least `events` events: the
/// tally reads the kernel's counters with bpf() map lookups.
fn kernel_counted(agent: &Agent, events: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let produced = agent
            .stderr_text()
            .lines()
            .filter_map(|l| l.split("produced in kernel=").nth(1))
            .filter_map(|rest| rest.split(';').next()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        if produced >= events {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the kernel counters read {produced} events produced, expected at least \
                 {events}:\n{}",
                agent.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The deployment shape: nobody with CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE,
/// CAP_DAC_READ_SEARCH and CAP_NET_ADMIN. A server that listened before the agent is still named (the /proc scan
/// worked as nobody), and once tracing no thread holds any capability.
#[test]
fn minimal_capabilities_as_an_unprivileged_user() -> anyhow::Result<()> {
    let lab = Lab::new(51)?;
    let count = 4;
    let server = SocketAddr::new(lab.server_v4().into(), 8080);
    let listener = serve(&lab, server, count, traffic::echo);
    let agent = Agent::start_under(&strs(&setpriv(MINIMAL)), &["--no-metrics"])?;
    assert_dropped(&agent, UNPRIVILEGED, mask(MINIMAL))?;
    // "watching DNS" comes on the line after "tracing", which is what the start waited for.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.stderr_text().contains("watching DNS") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stderr = agent.stderr_text();
    ensure!(
        !stderr.contains("stay unnamed") && !stderr.contains("WARN"),
        "the agent warned with every capability it needs:\n{stderr}"
    );
    ensure!(
        stderr.contains("watching DNS"),
        "DNS is watched with the minimal set:\n{stderr}"
    );
    traced_exactly(&lab, agent, listener, &Listener::process(), count, |_| {
        Ok(())
    })
}

/// As root the agent drops everything, the bounding set too; it still reads its kernel
/// counters (bpf() lookups on the maps it holds need no capability on this kernel).
#[test]
fn root_gives_up_every_capability_after_attaching() -> anyhow::Result<()> {
    let lab = Lab::new(52)?;
    let count = 3;
    let agent = Agent::start_with_args(&["--no-metrics", "-v", "--stats-interval", "200ms"])?;
    assert_dropped(&agent, 0, 0)?;
    let server = SocketAddr::new(lab.server_v4().into(), 8080);
    let listener = serve(&lab, server, count, traffic::echo);
    let owner = Listener::thread(SERVER_COMM);
    traced_exactly(&lab, agent, listener, &owner, count, |agent| {
        kernel_counted(agent, 4 * count as u64)
    })
}

/// Classic tracepoints where tracefs is not mounted: the agent mounts it (CAP_SYS_ADMIN), reads
/// it as nobody (CAP_DAC_READ_SEARCH), and unmounts it as soon as the programs are attached;
/// they keep working. Without CAP_SYS_PTRACE it says once that old listeners stay unnamed.
#[test]
fn classic_tracepoints_mount_tracefs_only_while_attaching() -> anyhow::Result<()> {
    let lab = Lab::new(53)?;
    let caps = ["bpf", "perfmon", "dac_read_search", "sys_admin"];
    let wrapper = in_own_mounts(NO_TRACEFS, setpriv(&caps));
    let agent = Agent::start_under(&strs(&wrapper), &["--no-metrics", "--hooks", "classic"])?;
    assert_dropped(&agent, UNPRIVILEGED, mask(&caps))?;
    let stderr = agent.stderr_text();
    ensure!(
        stderr.contains("mounted tracefs at /sys/kernel/tracing"),
        "the agent did not mount tracefs:\n{stderr}"
    );
    let mounts = std::fs::read_to_string(format!(
        "/proc/{}/mountinfo",
        agent.pid().context("the agent runs")?
    ))?;
    ensure!(
        !mounts.contains(" - tracefs "),
        "tracefs is still mounted in the agent's namespace after attaching:\n{mounts}"
    );
    ensure!(
        stderr
            .matches(
                "listeners older than the agent stay unnamed: reading other processes' sockets \
                 in /proc needs CAP_SYS_PTRACE"
            )
            .count()
            == 1,
        "the agent did not say once that old listeners stay unnamed:\n{stderr}"
    );
    let server = SocketAddr::new(lab.server_v4().into(), 8080);
    let count = 3;
    let listener = serve(&lab, server, count, traffic::echo);
    let owner = Listener::thread(SERVER_COMM);
    traced_exactly(&lab, agent, listener, &owner, count, |_| Ok(()))
}

/// Each missing capability stops the start with exit 1 and one sentence (one line) that names
/// it and what it is for. Nothing gets loaded, so these need no lab.
#[test]
fn a_missing_capability_stops_the_start_with_one_sentence() -> anyhow::Result<()> {
    let cases: [(Vec<String>, &[&str], &str); 4] = [
        (
            setpriv(&["perfmon", "sys_ptrace", "dac_read_search"]),
            &[],
            "connprobe: this process lacks CAP_BPF (to create eBPF maps and load programs); run \
             connprobe as root, or grant it as ambient capabilities (README: Least privilege)",
        ),
        (
            setpriv(&[]),
            &[],
            "connprobe: this process lacks CAP_BPF (to create eBPF maps and load programs) and \
             CAP_PERFMON (to load tracing programs, which read kernel memory); run connprobe as \
             root, or grant them as ambient capabilities (README: Least privilege)",
        ),
        (
            in_own_mounts(TRACEFS, setpriv(&["bpf", "perfmon", "sys_ptrace"])),
            &["--hooks", "classic"],
            "connprobe: tracefs at /sys/kernel/tracing cannot be read by this user (Permission \
             denied (os error 13)); classic tracepoints need CAP_DAC_READ_SEARCH to read it when \
             connprobe does not run as root, or use `--hooks btf`",
        ),
        (
            in_own_mounts(NO_TRACEFS, setpriv(MINIMAL)),
            &["--hooks", "classic"],
            "connprobe: tracefs is not mounted and mounting it at /sys/kernel/tracing failed \
             (Operation not permitted (os error 1); mounting needs CAP_SYS_ADMIN); mount it with \
             `mount -t tracefs tracefs /sys/kernel/tracing` or use `--hooks btf`",
        ),
    ];
    for (wrapper, flags, sentence) in cases {
        let mut extra = vec!["--no-metrics", "--duration", "5"];
        extra.extend(flags);
        let (status, stderr) = Agent::run_until_exit(&strs(&wrapper), &extra)?;
        ensure!(
            status.code() == Some(1),
            "{wrapper:?}: exit {status}, expected 1; stderr:\n{stderr}"
        );
        let last = stderr.lines().last().unwrap_or_default();
        ensure!(
            last == sentence,
            "{wrapper:?}: the last line of stderr is\n  {last}\nexpected\n  {sentence}\nstderr:\n{stderr}"
        );
        ensure!(
            !stderr.contains("ERROR") && !stderr.contains("panicked"),
            "{wrapper:?}: more than one sentence:\n{stderr}"
        );
    }
    Ok(())
}

/// `deploy/systemd/connprobe.service` passes `systemd-analyze verify` without a word, and
/// `systemd-analyze security` rates it at most at the exposure README reports. `verify` checks
/// that ExecStart's binary exists, so it runs on a copy that starts the binary under test.
#[test]
fn the_systemd_unit_verifies_cleanly() -> anyhow::Result<()> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/connprobe.service");
    let text = std::fs::read_to_string(&unit).with_context(|| format!("{}", unit.display()))?;
    let binary = std::env::var("CONNPROBE_BIN").context("CONNPROBE_BIN is not set")?;
    ensure!(
        text.contains("ExecStart=/usr/local/bin/connprobe "),
        "the unit no longer starts /usr/local/bin/connprobe"
    );
    let dir = std::env::temp_dir().join(format!("connprobe-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join("connprobe.service");
    std::fs::write(
        &copy,
        text.replace(
            "ExecStart=/usr/local/bin/connprobe ",
            &format!("ExecStart={binary} "),
        ),
    )?;
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output();
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let verify = verify.context(
        "systemd-analyze is needed by this test: install the Debian package `systemd`; `cargo \
         xtask test` installs it",
    )?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    ensure!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        verify.status
    );

    let security = security?;
    let report = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for connprobe.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no overall exposure in:\n{report}"))?;
    ensure!(
        exposure <= 2.1,
        "systemd-analyze security rates the unit {exposure}, worse than the 2.1 README reports:\n{report}"
    );
    Ok(())
}
