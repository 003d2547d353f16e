//! A lossy path for the failure storm: a client and a server namespace joined by a veth pair,
//! nftables dropping 20% of the segments to the server's port, all removed on drop.
use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    thread::JoinHandle,
};

use anyhow::{Context as _, bail};

use super::sys;

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 253, 0, 1);
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 253, 0, 2);
pub const LOSSY_PORT: u16 = 8083;

pub struct LossyLab {
    client: String,
    server: String,
}

impl LossyLab {
    pub fn new() -> anyhow::Result<Self> {
        let pid = std::process::id();
        let lab = Self {
            client: format!("cpbench-c-{pid}"),
            server: format!("cpbench-s-{pid}"),
        };
        ip(&["netns", "add", &lab.client])?;
        if let Err(e) = ip(&["netns", "add", &lab.server]) {
            let _ = ip(&["netns", "del", &lab.client]);
            return Err(e);
        }
        lab.wire().context("cannot build the lossy lab")?;
        Ok(lab)
    }

    fn wire(&self) -> anyhow::Result<()> {
        let (c, s) = (self.client.as_str(), self.server.as_str());
        ip(&[
            "link", "add", "cpb0", "netns", c, "type", "veth", "peer", "name", "cpb0", "netns", s,
        ])?;
        for (ns, addr) in [(c, CLIENT_IP), (s, SERVER_IP)] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "cpb0",
            ])?;
            ip(&["-n", ns, "link", "set", "cpb0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let rules = format!(
            "table inet cpbench {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    tcp dport {LOSSY_PORT} numgen random mod 100 < 20 drop\n  }}\n}}\n"
        );
        let mut nft = Command::new("ip")
            .args(["netns", "exec", s, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft (Debian package nftables)")?;
        std::io::Write::write_all(&mut nft.stdin.take().expect("piped"), rules.as_bytes())?;
        let out = nft.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft refused the lossy rule: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The client namespace's `TcpRetransSegs` (what `nstat -az` shows).
    pub fn client_retrans_segs(&self) -> anyhow::Result<u64> {
        nstat(&self.client, "TcpRetransSegs")
    }

    pub fn server_retrans_segs(&self) -> anyhow::Result<u64> {
        nstat(&self.server, "TcpRetransSegs")
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<anyhow::Result<T>> {
        spawn_in(&self.client, f)
    }

    /// A listener on the lossy port inside the server namespace (a socket keeps the namespace
    /// it was made in, so any thread may serve it).
    pub fn listen(&self) -> anyhow::Result<TcpListener> {
        join(spawn_in(&self.server, || {
            TcpListener::bind(SocketAddr::from((SERVER_IP, LOSSY_PORT)))
        }))?
        .context("cannot listen in the lab's server namespace")
    }
}

/// The result of a thread made by `spawn_in`.
pub fn join<T>(handle: JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("a lab thread panicked"))?
}

impl Drop for LossyLab {
    fn drop(&mut self) {
        // Deleting the namespaces removes the veth pair and the nftables table with them.
        for ns in [&self.client, &self.server] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("bench: could not delete namespace {ns}: {e:#}");
            }
        }
    }
}

fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<anyhow::Result<T>> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        // SAFETY: a valid namespace fd; CLONE_NEWNET moves only the calling thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("cannot enter {path}: {}", std::io::Error::last_os_error());
        }
        Ok(f())
    })
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    sys::output("ip", args).map(|_| ())
}

fn nstat(ns: &str, counter: &str) -> anyhow::Result<u64> {
    let out = sys::output("ip", &["netns", "exec", ns, "nstat", "-az", counter])?;
    out.lines()
        .find_map(|l| {
            let mut fields = l.split_whitespace();
            (fields.next()? == counter).then(|| fields.next()?.parse().ok())?
        })
        .with_context(|| format!("nstat in {ns} printed no {counter}"))
}
