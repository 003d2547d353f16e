//! Containers and pods (probe-ebpf `Owner::cgroup_id`, probe-user `workload`): real cgroups made
//! under the cgroup v2 mount in the shapes Docker and a containerd pod give them, a real server
//! process and real curl clients moved into them before they listen or connect; the JSON log's
//! `cgroup`, `container_id`, `pod_uid` and the `--by container` label checked against the paths
//! the test made. The cgroups go at the end.
use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use tests::{Agent, Lab, expect::lab_events, http::http_get, socket};

const SUBNET: u8 = 131;
const DOCKER_ID: &str = "3f4e1a2b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
const POD_CONTAINER_ID: &str = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b";
const POD_UID: &str = "5a1c3e7b-2f4d-4b8a-9c6e-1d2f3a4b5c6d";

/// A cgroup tree under the v2 mount, removed (deepest first) on drop.
struct Cgroups {
    mount: PathBuf,
    made: Vec<PathBuf>,
}

impl Cgroups {
    fn new() -> anyhow::Result<Self> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")?;
        let mount = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
            })
            .context("no cgroup v2 mount in /proc/self/mounts")?;
        Ok(Cgroups {
            mount,
            made: Vec::new(),
        })
    }

    /// Makes the cgroup `path` (as `/proc/PID/cgroup` writes it) and its parents.
    fn make(&mut self, path: &str) -> anyhow::Result<PathBuf> {
        let mut dir = self.mount.clone();
        for component in path.split('/').filter(|c| !c.is_empty()) {
            dir.push(component);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .with_context(|| format!("cannot make cgroup {}", dir.display()))?;
                self.made.push(dir.clone());
            }
        }
        Ok(dir)
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.made.iter().rev() {
            if let Err(e) = std::fs::remove_dir(dir) {
                eprintln!("workload: could not remove cgroup {}: {e}", dir.display());
            }
        }
    }
}

/// `sh` moves itself into `cgroup`, then becomes `ip netns exec NS PROGRAM ARGS...`: the
/// program runs in the cgroup from its first instruction, with the shell's pid.
fn in_cgroup(cgroup: &Path, netns: &str, program: &[&str]) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && shift && exec ip netns exec "$@""#)
        .arg(cgroup)
        .arg("placeholder")
        .arg(netns)
        .args(program);
    command
}

/// A Python HTTP/1.0 server that answers `count` requests with 200 and exits; it says
/// `listening` once it listens.
const SERVER: &str = r#"
import socket, sys
addr, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((addr, port))
listener.listen(16)
listener.settimeout(60)
print("listening", flush=True)
for _ in range(count):
    conn, _ = listener.accept()
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    conn.close()
"#;

fn wait_listening(server: &mut Child) -> anyhow::Result<()> {
    let stdout = server.stdout.take().context("server stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "listening" {
        bail!("the server did not start: {line:?}");
    }
    Ok(())
}

/// curl from `cgroup` in the client namespace; returns its pid and exit code.
fn curl(lab: &Lab, cgroup: &Path, url: &str) -> anyhow::Result<(u32, Option<i32>)> {
    let client = lab.client_v4().to_string();
    let mut child = in_cgroup(
        cgroup,
        lab.client_ns().name(),
        &[
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--interface",
            &client,
            url,
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .context("cannot run curl (Debian package curl)")?;
    let pid = child.id();
    Ok((pid, child.wait()?.code()))
}

fn field<'a>(event: &'a Value, name: &str) -> &'a Value {
    event.get(name).unwrap_or(&Value::Null)
}

/// The `cgroup`, `container_id` and `pod_uid` of an event, as text (`null` for none).
fn workload(event: &Value) -> (String, String, String) {
    let text = |v: &Value| v.as_str().unwrap_or("null").to_string();
    (
        text(field(event, "cgroup")),
        text(field(event, "container_id")),
        text(field(event, "pod_uid")),
    )
}

fn scrape(agent: &Agent) -> anyhow::Result<String> {
    let (status, body) = http_get(agent.metrics_addr().context("metrics")?, "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(body)
}

fn series(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[test]
fn docker_and_pod_cgroups_name_their_container_and_pod() -> anyhow::Result<()> {
    let lab = Lab::new(SUBNET)?;
    let mut cgroups = Cgroups::new()?;
    let base = format!("/connprobe-lab-{}", std::process::id());
    let docker_path = format!("{base}/system.slice/docker-{DOCKER_ID}.scope");
    let uid = POD_UID.replace('-', "_");
    let pod_path = format!(
        "{base}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/\
         cri-containerd-{POD_CONTAINER_ID}.scope"
    );
    let docker = cgroups.make(&docker_path)?;
    let pod = cgroups.make(&pod_path)?;
    let own_path = std::fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .context("no cgroup v2 line in /proc/self/cgroup")?;
    assert!(
        !own_path.contains("docker") && !own_path.contains("kubepods"),
        "the test itself runs in a container-shaped cgroup ({own_path}); its host client would \
         not be a host process"
    );

    let agent = Agent::start_with_metrics(&["--by", "container", "--by", "comm"])?;
    let server_addr = SocketAddr::new(IpAddr::V4(lab.server_v4()), 8080);
    // The server starts in the Docker-shaped cgroup: its listen() is seen there.
    let mut server = in_cgroup(
        &docker,
        lab.server_ns().name(),
        &[
            "python3",
            "-c",
            SERVER,
            &lab.server_v4().to_string(),
            "8080",
            "2",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .context("cannot run python3")?;
    let server_pid = server.id();
    wait_listening(&mut server)?;

    // Two established and one refused connect from the pod, one connect from the host.
    let mut pod_pids = Vec::new();
    for _ in 0..2 {
        let (pid, code) = curl(&lab, &pod, &format!("http://{server_addr}/"))?;
        assert_eq!(code, Some(0), "curl from the pod to the server");
        pod_pids.push(pid);
    }
    let refused_addr = SocketAddr::new(IpAddr::V4(lab.server_v4()), 8081);
    let (refused_pid, code) = curl(&lab, &pod, &format!("http://{refused_addr}/"))?;
    assert_eq!(
        code,
        Some(7),
        "curl to a port nobody listens on is refused (exit 7)"
    );
    let host = lab
        .client("lab-host", move || {
            socket::connect(
                IpAddr::V4([10, 200, SUBNET, 1].into()),
                refused_addr,
                Some(Duration::from_secs(5)),
            )
        })
        .join()
        .expect("host client");
    assert_eq!(host.errno(), Some(libc::ECONNREFUSED));
    assert!(
        server.wait()?.success(),
        "the server answered both requests"
    );

    let pod_short = &POD_CONTAINER_ID[..12];
    let destination = |addr: SocketAddr, container: &str, comm: &str| {
        format!(
            "connprobe_connect_attempts_total{{comm=\"{comm}\",container=\"{container}\",destination=\"{addr}\"}}"
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = scrape(&agent)?;
        let host_seen = series(&metrics, &destination(refused_addr, "host", "lab-host")).is_some();
        if (series(&metrics, &destination(refused_addr, pod_short, "curl")).is_some() && host_seen)
            || Instant::now() > deadline
        {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let events = lab_events(&lab, &agent.stop()?);

    // Metrics: the pod's connects under its short id, the host's under `host`.
    assert_eq!(
        series(&metrics, &destination(server_addr, pod_short, "curl")),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        series(&metrics, &destination(refused_addr, pod_short, "curl")),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        series(&metrics, &destination(refused_addr, "host", "lab-host")),
        Some(1.0),
        "{metrics}"
    );
    // The server's side of the connections is labelled with its own container.
    let server_series = format!(
        "connprobe_segments_sent_total{{comm=\"python3\",container=\"{}\",destination=\"{server_addr}\",side=\"server\"}}",
        &DOCKER_ID[..12]
    );
    assert!(
        series(&metrics, &server_series).is_some(),
        "{server_series}\n{metrics}"
    );

    // For the README: the lab's lines as the agent wrote them.
    for event in events.iter().filter(|e| field(e, "type") == "connect") {
        eprintln!("{event}");
    }
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("connprobe_connect_attempts_total{"))
    {
        eprintln!("{line}");
    }
    let pod_workload = (
        pod_path.clone(),
        POD_CONTAINER_ID.to_string(),
        POD_UID.to_string(),
    );
    let docker_workload = (
        docker_path.clone(),
        DOCKER_ID.to_string(),
        "null".to_string(),
    );
    let mut checked = [0usize; 4];
    for event in &events {
        let pid = field(event, "pid").as_u64().map(|p| p as u32);
        let side = field(event, "side").as_str();
        let kind = field(event, "type").as_str().unwrap_or("?");
        if pid.is_some_and(|p| pod_pids.contains(&p) || p == refused_pid) {
            assert_eq!(workload(event), pod_workload, "{event}");
            checked[0] += 1;
        } else if side == Some("server") && pid == Some(server_pid) {
            assert_eq!(workload(event), docker_workload, "{event}");
            checked[1] += 1;
        } else if field(event, "comm").as_str() == Some("lab-host") {
            assert_eq!(
                workload(event),
                (own_path.clone(), "null".to_string(), "null".to_string()),
                "{event}"
            );
            checked[2] += 1;
        } else if kind == "reset" || pid.is_none() {
            // Resets a socketless port sends have no owner, hence no workload.
            assert_eq!(
                workload(event),
                ("null".into(), "null".into(), "null".into()),
                "{event}"
            );
            checked[3] += 1;
        } else {
            panic!("an event of the lab nobody made: {event}");
        }
    }
    // The pod: 3 connects, 2 closes, the refused connect's received reset; the server: 2
    // accepted connects and their 2 closes; the host: 1 connect and its received reset.
    let pod_connects = events
        .iter()
        .filter(|e| field(e, "type") == "connect" && workload(e) == pod_workload)
        .count();
    let server_connects = events
        .iter()
        .filter(|e| field(e, "type") == "connect" && workload(e) == docker_workload)
        .count();
    assert_eq!((pod_connects, server_connects), (3, 2), "{events:#?}");
    assert!(
        checked[0] >= 5 && checked[1] >= 4 && checked[2] >= 1,
        "{checked:?} {events:#?}"
    );
    drop(cgroups);
    drop(lab);
    Ok(())
}
