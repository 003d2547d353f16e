//! `connprobe watch` (issue 15, "Connectivity checks for CI pipelines"): a command whose connects
//! partly fail makes watch fail its rule, name the refusing destination and why, in the summary
//! and in the JUnit report; a command whose connects all succeed passes its own exit code
//! through. In both, another process of the same host connects to the same destinations at the
//! same time, and none of its connects count: ground truth is how many connects each made.
//!
//! DNS: the command's queries that a silent resolver leaves unanswered fail `dns_timeouts>0`,
//! and another process's silent queries at the same time do not count.
//!
//! The command runs in the lab's client namespace (`ip netns exec`), so COMMAND is a real
//! process tree: ip, then sh, then one curl per request.
use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::Path,
    process::{Command, Output},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    Lab,
    dns_lab::DnsLab,
    events::kernel_at_least,
    traffic::serve,
    verdict_lab::{TempDir, connprobe_bin},
};

const OK: u16 = 8080;
const REFUSED: u16 = 8081;
/// Connects the command makes to each port.
const COMMAND_REFUSED: usize = 4;
const COMMAND_OK: usize = 3;
/// Connects the other process makes to each port while the command runs.
const OTHER_REFUSED: usize = 5;
const OTHER_OK: usize = 2;
/// What `watch` exits with when a rule fails (README, `connprobe watch --help`).
const RULE_FAILED: i32 = 100;

/// Reads a request up to its blank line and answers `200 OK`: enough for curl.
fn http_ok(mut stream: TcpStream) -> io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
}

/// The shell script the command runs: says it started (`started`), makes its connects, then
/// waits (bounded) until the other process has made all of its own (`other-done`), so that
/// the two overlap.
fn script(server: Ipv4Addr, dir: &Path, refused: usize, ok: usize, exit: i32) -> String {
    let dir = dir.display();
    let curl = "curl -s -o /dev/null --max-time 5";
    format!(
        "touch {dir}/started; \
         i=0; while [ $i -lt {refused} ]; do {curl} http://{server}:{REFUSED}/; i=$((i+1)); sleep 0.1; done; \
         i=0; while [ $i -lt {ok} ]; do {curl} -f http://{server}:{OK}/ || exit 9; i=$((i+1)); sleep 0.1; done; \
         n=0; while [ ! -e {dir}/other-done ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n+1)); done; \
         exit {exit}"
    )
}

/// Another process's connects (this test's, from the client namespace), made while the
/// command runs: after its `started`, before it may end.
fn other_process(lab: &Lab, dir: &Path, refused: usize, ok: usize) -> JoinHandle<(usize, usize)> {
    let server = lab.server_v4();
    let dir = dir.to_owned();
    lab.client("other-client", move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !dir.join("started").exists() {
            assert!(Instant::now() < deadline, "the command never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (mut refused_seen, mut ok_seen) = (0, 0);
        for i in 0..refused.max(ok) {
            if i < refused {
                let to = SocketAddr::V4(SocketAddrV4::new(server, REFUSED));
                match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => refused_seen += 1,
                    other => panic!("connect to {to}: {other:?}"),
                }
            }
            if i < ok {
                let to = SocketAddr::V4(SocketAddrV4::new(server, OK));
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connect to {to}: {e}"));
                s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
                let mut answer = String::new();
                s.read_to_string(&mut answer).unwrap();
                assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
                ok_seen += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        fs::write(dir.join("other-done"), b"").unwrap();
        (refused_seen, ok_seen)
    })
}

/// `connprobe watch ARGS -- ip netns exec CLIENT sh -c SCRIPT`.
fn watch(lab: &Lab, args: &[&str], script: &str) -> anyhow::Result<Output> {
    let bin = connprobe_bin()?;
    let mut command = Command::new(bin);
    command.arg("watch").args(args).arg("--");
    command.args([
        "ip",
        "netns",
        "exec",
        lab.client_ns().name(),
        "sh",
        "-c",
        script,
    ]);
    Ok(command.output()?)
}

/// Panics if a cgroup of watch's is still there.
fn assert_no_cgroup_left_behind() {
    let left = cgroup_left_behind();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}

fn cgroup_left_behind() -> Vec<String> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    let root = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_owned())
        })
        .expect("a cgroup v2 mount");
    fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("connprobe-watch-"))
        .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn refused_connects_fail_the_rule_and_name_the_destination() -> anyhow::Result<()> {
    let mut lab = Lab::new(171)?;
    lab.server_rule(&format!("tcp dport {REFUSED} reject with tcp reset"))?;
    let server = lab.server_v4();
    let ok_server = serve(
        &lab,
        SocketAddr::V4(SocketAddrV4::new(server, OK)),
        COMMAND_OK + OTHER_OK,
        http_ok,
    );
    let dir = TempDir::new("watch-refused")?;
    let junit = dir.path().join("connectivity.xml");
    let other = other_process(&lab, dir.path(), OTHER_REFUSED, OTHER_OK);
    let out = watch(
        &lab,
        &[
            "--fail-on",
            "failures>0",
            "--fail-on",
            "p99>5s",
            "--junit",
            junit.to_str().unwrap(),
        ],
        &script(server, dir.path(), COMMAND_REFUSED, COMMAND_OK, 0),
    )?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(other.join().unwrap(), (OTHER_REFUSED, OTHER_OK));
    ok_server.join().unwrap();
    assert_eq!(out.status.code(), Some(RULE_FAILED), "{stdout}\n{stderr}");

    // Only the command's connects: 4 refused, not 4 + 5.
    let refusing = format!("{server}:{REFUSED}");
    let rule = format!(
        "rule failures>0 FAILED: {COMMAND_REFUSED} failed connects (limit 0): \
         {refusing}: {COMMAND_REFUSED} refused"
    );
    assert!(stdout.contains(&rule), "{stdout}\n{stderr}");
    assert!(stdout.contains("rule p99>5s passed"), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with(&refusing))
        .unwrap_or_else(|| panic!("no row for {refusing}:\n{stdout}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        (cells[1], cells[2], cells[3]),
        (
            "client",
            &*COMMAND_REFUSED.to_string(),
            &*COMMAND_REFUSED.to_string()
        ),
        "side, connects, failed: {row}"
    );
    assert!(
        row.ends_with(&format!("refused {COMMAND_REFUSED}")),
        "{row}"
    );
    let ok_row = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{server}:{OK}")))
        .unwrap_or_else(|| panic!("no row for port {OK}:\n{stdout}"));
    let cells: Vec<&str> = ok_row.split_whitespace().collect();
    assert_eq!(
        (cells[2], cells[3]),
        ("3", "0"),
        "connects, failed: {ok_row}"
    );
    // The verdict names the destination and the cause.
    assert!(
        stdout.contains(&format!("{refusing} (client)")) && stdout.contains("refused"),
        "{stdout}"
    );

    let xml = fs::read_to_string(&junit)?;
    assert_eq!(xml.matches("<testcase ").count(), 3, "{xml}");
    assert_eq!(xml.matches("<failure ").count(), 1, "{xml}");
    assert!(
        xml.contains(&format!(
            "<failure message=\"failures&gt;0: {COMMAND_REFUSED} failed connects (limit 0): \
             {refusing}: {COMMAND_REFUSED} refused\""
        )),
        "{xml}"
    );
    assert!(xml.contains("name=\"p99&gt;5s\""), "{xml}");
    assert_no_cgroup_left_behind();
    // The README's example run (`--nocapture` shows it).
    println!("{stdout}\n{xml}");
    Ok(())
}

#[test]
fn a_clean_run_passes_the_commands_exit_code_through() -> anyhow::Result<()> {
    let lab = Lab::new(172)?;
    let server = lab.server_v4();
    let ok_server = serve(
        &lab,
        SocketAddr::V4(SocketAddrV4::new(server, OK)),
        COMMAND_OK + OTHER_OK,
        http_ok,
    );
    let dir = TempDir::new("watch-clean")?;
    let other = other_process(&lab, dir.path(), 0, OTHER_OK);
    let out = watch(
        &lab,
        &[
            "--json",
            "--fail-on",
            "failures>0",
            "--fail-on",
            "resets>0",
            "--fail-on",
            "p99>5s",
        ],
        &script(server, dir.path(), 0, COMMAND_OK, 3),
    )?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(other.join().unwrap(), (0, OTHER_OK));
    ok_server.join().unwrap();
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(&stdout)?;
    assert_eq!(report["command_exit_code"], 3, "{report:#}");
    assert_eq!(report["exit_code"], 3);
    assert!(
        report["scope"]
            .as_str()
            .unwrap()
            .starts_with("cgroup /connprobe-watch-"),
        "{report:#}"
    );
    let destinations = report["destinations"].as_array().unwrap();
    let ok = destinations
        .iter()
        .find(|d| d["destination"] == format!("{server}:{OK}"))
        .unwrap_or_else(|| panic!("no {server}:{OK} in {report:#}"));
    // The command's 3, not 3 + the other process's 2.
    assert_eq!(ok["connects"], COMMAND_OK as u64, "{ok:#}");
    assert_eq!(ok["established"], COMMAND_OK as u64, "{ok:#}");
    assert!(ok["handshake_p99_ms"].as_f64().is_some(), "{ok:#}");
    // The server's side is another process too: nothing of it counts.
    assert!(
        destinations.iter().all(|d| d["side"] != "server"),
        "{report:#}"
    );
    let rules = report["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 3);
    assert!(rules.iter().all(|r| r["passed"] == true), "{rules:#?}");
    assert_no_cgroup_left_behind();
    Ok(())
}

#[test]
fn a_bad_rule_is_one_sentence_and_exit_2() -> anyhow::Result<()> {
    let out = Command::new(connprobe_bin()?)
        .args(["watch", "--fail-on", "latency>1s", "--", "true"])
        .output()?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("error: invalid value 'latency>1s' for '--fail-on <RULE>'")
            && first.contains("is no metric"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}

/// DNS: the command's queries to a resolver that stays silent are `dns_timeouts`, named by the
/// resolver; another process's silent queries to the same resolver at the same time are not
/// counted. Ground truth is the lab DNS server's log of what it received.
#[test]
fn silent_dns_fails_dns_timeouts_and_only_the_commands_count() -> anyhow::Result<()> {
    let dns = DnsLab::new(173)?;
    dns.use_resolver(false)?;
    let dir = TempDir::new("watch-dns")?;
    let other = {
        let dir = dir.path().to_owned();
        let ns = dns.lab.client_ns().name().to_owned();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !dir.join("started").exists() {
                assert!(Instant::now() < deadline, "the command never started");
                std::thread::sleep(Duration::from_millis(10));
            }
            // A process of its own, outside the command's tree, asking the same resolver.
            let status = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "getent",
                    "ahostsv4",
                    "silent-other.lab.test",
                ])
                .status()
                .expect("getent runs");
            fs::write(dir.join("other-done"), b"").unwrap();
            status
        })
    };
    let d = dir.path().display();
    let script = format!(
        "touch {d}/started; getent ahostsv4 silent-cmd.lab.test; \
         n=0; while [ ! -e {d}/other-done ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n+1)); done; \
         exit 0"
    );
    let out = watch(
        &dns.lab,
        &["--json", "--fail-on", "dns_timeouts>0"],
        &script,
    )?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        !other.join().unwrap().success(),
        "a silent name does not resolve"
    );
    let logged = dns.logged()?;
    assert_eq!(
        out.status.code(),
        Some(RULE_FAILED),
        "{stdout}\n{stderr}\nthe lab's DNS server logged: {logged:?}"
    );

    let silent = |prefix: &str| {
        logged
            .iter()
            .filter(|q| q.action == "silent" && q.name.starts_with(prefix))
            .count() as u64
    };
    let (ours, theirs) = (silent("silent-cmd."), silent("silent-other."));
    assert!(ours > 0 && theirs > 0, "{logged:?}");
    let report: Value = serde_json::from_str(&stdout)?;
    if !kernel_at_least(6, 10) {
        // No query names its process: the rule cannot tell the command's apart, and fails
        // saying so rather than passing on what it did not see.
        let rule = &report["rules"][0];
        assert_eq!(rule["passed"], false, "{report:#}");
        let message = rule["message"].as_str().unwrap();
        assert!(
            message.starts_with("cannot be judged: ") && message.contains("before Linux 6.10"),
            "{report:#}"
        );
        assert_no_cgroup_left_behind();
        return Ok(());
    }
    let resolver = format!("{}:53", dns.lab.server_v4());
    let resolvers = report["resolvers"].as_array().unwrap();
    assert_eq!(resolvers.len(), 1, "{report:#}");
    assert_eq!(resolvers[0]["resolver"], resolver, "{report:#}");
    // The command's silent queries, not the other process's too.
    assert_eq!(resolvers[0]["timeouts"], ours, "{report:#}\n{logged:?}");
    let rule = &report["rules"][0];
    assert_eq!(rule["passed"], false);
    assert_eq!(
        rule["message"],
        format!(
            "{ours} DNS timeout{} (limit 0): {resolver}: {ours} of {} queries unanswered",
            if ours == 1 { "" } else { "s" },
            resolvers[0]["queries"]
        ),
        "{report:#}"
    );
    // The verdict on the resolver.
    let verdicts = report["report"]["destinations"].as_array().unwrap();
    assert!(
        verdicts
            .iter()
            .any(|d| d["destination"] == resolver && d["verdicts"][0]["verdict"] == "dns_timeout"),
        "{report:#}"
    );
    assert_no_cgroup_left_behind();
    Ok(())
}

/// A server the command starts counts too: the connections its listener accepts are the
/// command's (the server side, named by its own address), while the clients, another process,
/// are not.
#[test]
fn connections_accepted_by_the_commands_listener_count() -> anyhow::Result<()> {
    const PORT: u16 = 9000;
    const CLIENTS: usize = 3;
    let lab = Lab::new(174)?;
    let server = lab.server_v4();
    let dir = TempDir::new("watch-listener")?;
    let other = {
        let dir = dir.path().to_owned();
        lab.client("other-client", move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !dir.join("started").exists() {
                assert!(Instant::now() < deadline, "the command never listened");
                std::thread::sleep(Duration::from_millis(10));
            }
            let to = SocketAddr::V4(SocketAddrV4::new(server, PORT));
            for _ in 0..CLIENTS {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connect to {to}: {e}"));
                let mut answer = Vec::new();
                s.read_to_end(&mut answer).unwrap();
                assert_eq!(answer, b"hi");
            }
        })
    };
    let program = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{server}', {PORT}))\n\
         s.listen(8)\n\
         open('{}/started', 'w').close()\n\
         for _ in range({CLIENTS}):\n    \
             c, _ = s.accept()\n    \
             c.sendall(b'hi')\n    \
             c.close()\n",
        dir.path().display()
    );
    let bin = connprobe_bin()?;
    let out = Command::new(bin)
        .args(["watch", "--json", "--fail-on", "failures>0", "--"])
        .args([
            "ip",
            "netns",
            "exec",
            lab.server_ns().name(),
            "python3",
            "-c",
            &program,
        ])
        .output()?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    other.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(&stdout)?;
    let destinations = report["destinations"].as_array().unwrap();
    assert_eq!(destinations.len(), 1, "{report:#}");
    let served = &destinations[0];
    assert_eq!(
        served["destination"],
        format!("{server}:{PORT}"),
        "{report:#}"
    );
    assert_eq!(served["side"], "server", "{report:#}");
    assert_eq!(served["connects"], CLIENTS as u64, "{report:#}");
    assert_eq!(served["established"], CLIENTS as u64, "{report:#}");
    assert_no_cgroup_left_behind();
    Ok(())
}

/// Where no cgroup can be made (here: the cgroup v2 mount is unmounted in a private mount
/// namespace of watch's own), watch says so once and follows the command's process tree; the
/// other process's connects still do not count. The command is one long-lived process (the
/// tree is polled, so a process living less than the poll may be missed, as the warning says).
#[test]
fn without_a_cgroup_the_process_tree_is_followed() -> anyhow::Result<()> {
    let mut lab = Lab::new(175)?;
    lab.server_rule(&format!("tcp dport {REFUSED} reject with tcp reset"))?;
    let server = lab.server_v4();
    let dir = TempDir::new("watch-tree")?;
    let other = other_process(&lab, dir.path(), OTHER_REFUSED, 0);
    let program = format!(
        "import os, socket, time\n\
         open('{d}/started', 'w').close()\n\
         for _ in range({COMMAND_REFUSED}):\n    \
             try:\n        \
                 socket.create_connection(('{server}', {REFUSED}), timeout=5)\n        \
                 raise SystemExit('connected to a refusing port')\n    \
             except ConnectionRefusedError:\n        \
                 time.sleep(0.1)\n\
         for _ in range(200):\n    \
             if os.path.exists('{d}/other-done'):\n        \
                 break\n    \
             time.sleep(0.05)\n",
        d = dir.path().display()
    );
    let mounts = fs::read_to_string("/proc/mounts")?;
    let cgroup2 = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_owned())
        })
        .expect("a cgroup v2 mount");
    let bin = connprobe_bin()?;
    let shell = format!(
        "umount {cgroup2} && exec \"$0\" watch --fail-on 'failures>0' -- \
         ip netns exec {} python3 -c \"$1\"",
        lab.client_ns().name()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &shell])
        .arg(bin)
        .arg(&program)
        .output()?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(other.join().unwrap(), (OTHER_REFUSED, 0));
    assert_eq!(out.status.code(), Some(RULE_FAILED), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("connections told apart by pid tree"),
        "{stdout}"
    );
    assert_eq!(
        stderr
            .matches("telling COMMAND's connections apart by its process tree")
            .count(),
        1,
        "{stderr}"
    );
    let rule = format!(
        "rule failures>0 FAILED: {COMMAND_REFUSED} failed connects (limit 0): \
         {server}:{REFUSED}: {COMMAND_REFUSED} refused"
    );
    assert!(stdout.contains(&rule), "{stdout}\n{stderr}");
    // The host's cgroup v2 mount is untouched.
    assert!(fs::read_to_string("/proc/mounts")?.contains(&format!(" {cgroup2} cgroup2 ")));
    Ok(())
}
