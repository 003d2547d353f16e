//! A DNS server in the lab's server namespace (`dns_server.py`: answers, NXDOMAINs, SERVFAILs,
//! REFUSEs or ignores each query by its name's first label, over UDP and TCP, and logs every
//! query it received and what it did: the ground truth), and the client namespace's glibc
//! resolver pointed at it through `/etc/netns/<client>/resolv.conf`, which `ip netns exec`
//! mounts over `/etc/resolv.conf`. Everything is removed on drop.
use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::Lab;

const SERVER_SCRIPT: &str = include_str!("dns_server.py");
static NEXT: AtomicU32 = AtomicU32::new(0);

/// One query as the server logged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedQuery {
    pub id: u64,
    pub name: String,
    /// `A`, `AAAA`, or `TYPE<n>`.
    pub qtype: String,
    pub transport: String,
    /// ok, nx, fail, refuse or silent.
    pub action: String,
}

pub struct DnsLab {
    // Fields drop in order: the server goes before the lab's namespaces.
    server: DnsServer,
    pub lab: Lab,
    dir: PathBuf,
    netns_etc: PathBuf,
}

impl DnsLab {
    /// A lab on `subnet` with the DNS server listening on the server's address, port 53, its
    /// answers pointing at the server's address.
    pub fn new(subnet: u8) -> anyhow::Result<Self> {
        let lab = Lab::new(subnet)?;
        let dir = std::env::temp_dir().join(format!(
            "connprobe-dns-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let server_ip = IpAddr::V4(lab.server_v4());
        let server = DnsServer::start(
            Some(lab.server_ns().name()),
            server_ip,
            lab.server_v4(),
            &dir,
        )?;
        let netns_etc = PathBuf::from("/etc/netns").join(lab.client_ns().name());
        Ok(DnsLab {
            lab,
            server,
            dir,
            netns_etc,
        })
    }

    /// Points the client namespace's resolver at the server: one try, one second, over TCP when
    /// `tcp` (`options use-vc`).
    pub fn use_resolver(&self, tcp: bool) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.netns_etc)?;
        let vc = if tcp { " use-vc" } else { "" };
        std::fs::write(
            self.netns_etc.join("resolv.conf"),
            format!(
                "nameserver {}\nsearch lab.test\noptions timeout:1 attempts:1 ndots:1{vc}\n",
                self.lab.server_v4()
            ),
        )?;
        Ok(())
    }

    /// `getent ahostsv4 NAME` in the client namespace: glibc's getaddrinfo, as applications
    /// resolve. Its exit status (non-zero when the name does not resolve). It is stopped after
    /// 3 s, as an application gives up: glibc waits for a TCP answer without a limit.
    pub fn getent(&self, name: &str) -> anyhow::Result<ExitStatus> {
        let ns = self.lab.client_ns().name();
        let status = Command::new("ip")
            .args([
                "netns", "exec", ns, "timeout", "3", "getent", "ahostsv4", name,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run getent")?;
        Ok(status)
    }

    /// `curl` in the client namespace (resolving through the lab's server), with a 3 s limit.
    pub fn curl(&self, url: &str) -> anyhow::Result<ExitStatus> {
        self.curl_within(url, 3)
    }

    /// `curl` with a limit of `seconds`.
    pub fn curl_within(&self, url: &str, seconds: u32) -> anyhow::Result<ExitStatus> {
        let status = Command::new("ip")
            .args([
                "netns",
                "exec",
                self.lab.client_ns().name(),
                "curl",
                "-s",
                "-o",
                "/dev/null",
            ])
            .args(["--max-time", &seconds.to_string(), url])
            .stdin(Stdio::null())
            .status()
            .context("cannot run curl")?;
        Ok(status)
    }

    /// Every query the server logged so far.
    pub fn logged(&self) -> anyhow::Result<Vec<LoggedQuery>> {
        self.server.logged()
    }

    /// Waits `limit` for quiet: DNS timeouts are decided by the agent after its --dns-timeout.
    pub fn wait(&self, limit: Duration) {
        std::thread::sleep(limit);
    }
}

impl Drop for DnsLab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.netns_etc);
        // Only when empty: another lab may have its own there.
        let _ = std::fs::remove_dir("/etc/netns");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `dns_server.py` running in a namespace (or this one), on `addr` port 53, logging into a
/// directory; killed on drop. The DNS lab's server, and the bench's DNS query storm's.
pub struct DnsServer {
    child: Child,
    log: PathBuf,
}

impl DnsServer {
    /// Starts the server in network namespace `netns` (`None`: this one) on `addr`:53, its A
    /// answers pointing at `answer`, its script and log in `dir`; returns once it listens.
    pub fn start(
        netns: Option<&str>,
        addr: IpAddr,
        answer: Ipv4Addr,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let script = dir.join("dns_server.py");
        std::fs::write(&script, SERVER_SCRIPT)?;
        let log = dir.join("queries.jsonl");
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "python3"]);
                c
            }
            None => Command::new("python3"),
        };
        let mut child = command
            .arg(&script)
            .args([addr.to_string(), "53".into(), answer.to_string()])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the lab's DNS server (python3)")?;
        let mut ready = String::new();
        BufReader::new(child.stdout.take().expect("stdout is piped")).read_line(&mut ready)?;
        // From here on, Drop kills and reaps the child, whatever happens.
        let server = DnsServer { child, log };
        if ready.trim() != "ready" {
            bail!("the lab's DNS server did not start on {addr} port 53");
        }
        Ok(server)
    }

    /// How many queries the server logged so far (one line each).
    pub fn logged_count(&self) -> u64 {
        std::fs::read(&self.log)
            .map(|b| b.iter().filter(|c| **c == b'\n').count() as u64)
            .unwrap_or(0)
    }

    /// Every query the server logged so far.
    pub fn logged(&self) -> anyhow::Result<Vec<LoggedQuery>> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .map(|line| {
                let v: Value = serde_json::from_str(line)?;
                let qtype = match v["qtype"].as_u64() {
                    Some(1) => "A".to_string(),
                    Some(28) => "AAAA".to_string(),
                    Some(n) => format!("TYPE{n}"),
                    None => bail!("query without qtype: {line}"),
                };
                Ok(LoggedQuery {
                    id: v["id"].as_u64().context("id")?,
                    name: v["name"].as_str().context("name")?.to_owned(),
                    qtype,
                    transport: v["transport"].as_str().context("transport")?.to_owned(),
                    action: v["action"].as_str().context("action")?.to_owned(),
                })
            })
            .collect()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
