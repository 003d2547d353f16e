//! The lab: a client and a server namespace joined by a veth pair, nftables faults in the
//! server namespace, kernel counters as ground truth, and cleanup of all of it on drop.
//!
//! Subnet `X` (one per scenario, so no two scenarios share addresses): client 10.200.X.1 and
//! fd00:200:X::1, server 10.200.X.2 and fd00:200:X::2.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    sync::{
        Mutex, MutexGuard, Once,
        atomic::{AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::{self, Netns};

/// Prefix of every namespace the lab makes: `cp-c-<pid>-<n>` and `cp-s-<pid>-<n>`.
const NS_PREFIX: &str = "cp-";
/// The veth's name inside both namespaces.
const VETH: &str = "lab0";
/// The nftables table holding the faults.
const NFT_TABLE: &str = "connprobe_lab";
/// Serializes labs across test processes (each test runs its own agent, which sees every lab).
const LOCK_PATH: &str = "/run/connprobe-lab.lock";

static IN_PROCESS: Mutex<()> = Mutex::new(());
static NEXT: AtomicU32 = AtomicU32::new(0);
static STALE_SWEPT: Once = Once::new();

/// TCP counters of one namespace (`/proc/net/snmp` and `netstat`, what `nstat` shows as
/// TcpRetransSegs, TcpOutRsts, TcpExtTCPRetransFail).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    pub retrans_segs: u64,
    pub out_rsts: u64,
    /// Resends whose transmit failed (`TCPRetransFail`). The kernel counts a segment in
    /// `RetransSegs` before it hands it to the IP layer, so a resend that fails there (no route,
    /// a local qdisc or netfilter refusing it) is in `RetransSegs` too, though nothing went out
    /// and the retransmit tracepoint reports the failure (6.13+) or nothing (older kernels).
    pub retrans_fail: u64,
}

impl TcpCounters {
    /// Segments resent since `before` that the kernel handed on: `RetransSegs` less the failed
    /// ones, what connprobe counts as retransmits.
    pub fn resent_since(&self, before: &TcpCounters) -> u64 {
        let segs = self.retrans_segs - before.retrans_segs;
        let failed = self.retrans_fail - before.retrans_fail;
        segs.saturating_sub(failed)
    }
}

pub struct Lab {
    subnet: u8,
    // Declared before the locks so they are gone before the next lab may start.
    client: Netns,
    server: Netns,
    nft_table: bool,
    /// The client namespace has the nftables table too (see [`Lab::client_output_rule`]).
    client_nft_table: bool,
    _file_lock: File,
    _guard: MutexGuard<'static, ()>,
}

impl Lab {
    /// Builds a lab on subnet `subnet` (1..=254, unique per scenario). Waits for any other lab
    /// (in this process or another) to be torn down first.
    pub fn new(subnet: u8) -> anyhow::Result<Self> {
        assert!((1..=254).contains(&subnet), "subnet {subnet} out of range");
        let guard = IN_PROCESS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let file_lock = lock_file()?;
        STALE_SWEPT.call_once(sweep_stale_namespaces);

        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let client = Netns::create(&format!("{NS_PREFIX}c-{pid}-{n}"))?;
        let server = Netns::create(&format!("{NS_PREFIX}s-{pid}-{n}"))?;
        let lab = Lab {
            subnet,
            client,
            server,
            nft_table: false,
            client_nft_table: false,
            _file_lock: file_lock,
            _guard: guard,
        };
        lab.wire().context("cannot build the lab's network")?;
        Ok(lab)
    }

    fn wire(&self) -> anyhow::Result<()> {
        let (c, s) = (self.client.name(), self.server.name());
        netns::run(
            "ip",
            &[
                "-n", c, "link", "add", VETH, "type", "veth", "peer", "name", VETH, "netns", s,
            ],
        )?;
        for (ns, v4, v6) in [
            (c, self.client_v4(), self.client_v6()),
            (s, self.server_v4(), self.server_v6()),
        ] {
            netns::run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", VETH],
            )?;
            netns::run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    VETH,
                    "nodad",
                ],
            )?;
            netns::run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            netns::run("ip", &["-n", ns, "link", "set", VETH, "up"])?;
        }
        Ok(())
    }

    pub fn client_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.subnet, 1)
    }
    pub fn server_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.subnet, 2)
    }
    pub fn client_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x200, self.subnet.into(), 0, 0, 0, 0, 1)
    }
    pub fn server_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x200, self.subnet.into(), 0, 0, 0, 0, 2)
    }

    /// Whether `ip` is one of the lab's addresses.
    pub fn owns(&self, ip: IpAddr) -> bool {
        ip == IpAddr::V4(self.client_v4())
            || ip == IpAddr::V4(self.server_v4())
            || ip == IpAddr::V6(self.client_v6())
            || ip == IpAddr::V6(self.server_v6())
    }

    pub fn client_ns(&self) -> &Netns {
        &self.client
    }
    pub fn server_ns(&self) -> &Netns {
        &self.server
    }

    /// Runs `f` on a thread named `name` in the client namespace.
    pub fn client<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        self.client.spawn(name, f)
    }

    /// Runs `f` on a thread named `name` in the server namespace.
    pub fn server<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        self.server.spawn(name, f)
    }

    /// Adds an nftables rule to the server namespace's input, e.g.
    /// `tcp dport 8081 reject with tcp reset`.
    pub fn server_rule(&mut self, rule: &str) -> anyhow::Result<()> {
        let script = format!(
            "add table inet {NFT_TABLE}\n\
             add chain inet {NFT_TABLE} input {{ type filter hook input priority 0; policy accept; }}\n\
             add rule inet {NFT_TABLE} input {rule}\n"
        );
        self.nft_table = true;
        netns::run_with_input(
            "ip",
            &["netns", "exec", self.server.name(), "nft", "-f", "-"],
            &script,
        )
    }

    /// Adds an nftables rule to the client namespace's output, e.g. `tcp dport 8082 counter
    /// drop`: a firewall on the client's own host.
    pub fn client_output_rule(&mut self, rule: &str) -> anyhow::Result<()> {
        let script = format!(
            "add table inet {NFT_TABLE}\n\
             add chain inet {NFT_TABLE} output {{ type filter hook output priority 0; policy accept; }}\n\
             add rule inet {NFT_TABLE} output {rule}\n"
        );
        self.client_nft_table = true;
        netns::run_with_input(
            "ip",
            &["netns", "exec", self.client.name(), "nft", "-f", "-"],
            &script,
        )
    }

    /// Packets counted by the `counter`s of the client's output rules.
    pub fn client_output_counted(&self) -> anyhow::Result<u64> {
        counted(&self.client, "output")
    }

    /// Packets counted by the `counter`s of the server's input rules.
    pub fn server_input_counted(&self) -> anyhow::Result<u64> {
        counted(&self.server, "input")
    }

    /// Sets a sysctl inside the client namespace, e.g. `net.ipv4.tcp_syn_retries=1`.
    pub fn client_sysctl(&self, setting: &str) -> anyhow::Result<()> {
        self.client.exec("sysctl", &["-q", "-w", setting]).map(drop)
    }

    /// Makes the client namespace's kernel give up a connect after `retries` SYN retransmits
    /// with exponential backoff (1 s, then 2 s, ...). Linux 6.7 added `tcp_syn_linear_timeouts`
    /// (default 4), which resends the first SYNs at a fixed 1 s on top; it is turned off where
    /// the kernel has it, so that the count is `retries` on every kernel.
    pub fn client_syn_retries(&self, retries: u32) -> anyhow::Result<()> {
        self.client_sysctl(&format!("net.ipv4.tcp_syn_retries={retries}"))?;
        if crate::events::kernel_at_least(6, 7) {
            self.client_sysctl("net.ipv4.tcp_syn_linear_timeouts=0")?;
        }
        Ok(())
    }

    pub fn client_counters(&self) -> TcpCounters {
        self.client.run_in(read_tcp_counters)
    }
    pub fn server_counters(&self) -> TcpCounters {
        self.server.run_in(read_tcp_counters)
    }

    /// Waits (at most `limit`) until no TCP socket in either namespace is between states, i.e.
    /// every socket is listening, in TIME_WAIT or gone, so every close has happened.
    pub fn settle(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let busy: Vec<String> = [&self.client, &self.server]
                .into_iter()
                .flat_map(|ns| ns.run_in(sockets_in_flight))
                .collect();
            if busy.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("sockets still open after {limit:?}: {busy:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.nft_table
            && let Err(e) = self
                .server
                .exec("nft", &["delete", "table", "inet", NFT_TABLE])
        {
            eprintln!("lab: could not delete the nftables table: {e:#}");
        }
        if self.client_nft_table
            && let Err(e) = self
                .client
                .exec("nft", &["delete", "table", "inet", NFT_TABLE])
        {
            eprintln!("lab: could not delete the client's nftables table: {e:#}");
        }
        if let Err(e) = netns::run("ip", &["-n", self.client.name(), "link", "del", VETH]) {
            eprintln!("lab: could not delete the veth pair: {e:#}");
        }
        // The namespaces themselves are deleted when `client` and `server` drop.
    }
}

fn lock_file() -> anyhow::Result<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_PATH)
        .with_context(|| format!("cannot open {LOCK_PATH} (the lab needs root)"))?;
    // SAFETY: a valid fd; a non-blocking try first, to say why we wait.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(file);
    }
    eprintln!("lab: another test process holds {LOCK_PATH}; waiting for its lab to go");
    // SAFETY: a valid fd; flock blocks until the other lab is gone.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!(
            "cannot lock {LOCK_PATH}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(file)
}

/// Deletes lab namespaces (`cp-c-<pid>-<n>`, `cp-s-<pid>-<n>`) left by a test process that died
/// without cleaning up. Other names are never touched.
fn sweep_stale_namespaces() {
    let Ok(list) = netns::run("ip", &["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(owner) = lab_namespace_owner(name) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{owner}")).exists() {
            eprintln!("lab: deleting stale namespace {name}");
            if let Err(e) = netns::run("ip", &["netns", "del", name]) {
                eprintln!("lab: {e:#}");
            }
        }
    }
}

/// The pid in a lab namespace's name, `None` for any other name.
fn lab_namespace_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NS_PREFIX)?;
    let mut parts = rest.split('-');
    let (role, pid, n) = (parts.next()?, parts.next()?, parts.next()?);
    let well_formed =
        matches!(role, "c" | "s") && parts.next().is_none() && n.parse::<u32>().is_ok();
    well_formed.then(|| pid.parse().ok()).flatten()
}

/// The packets that the `counter`s of `chain` (in the lab's table of `ns`) counted: the sum of
/// every `counter packets N bytes M` that `nft list chain` prints.
fn counted(ns: &Netns, chain: &str) -> anyhow::Result<u64> {
    let text = ns.exec("nft", &["list", "chain", "inet", NFT_TABLE, chain])?;
    let mut total = 0;
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word == "counter" && words.next() == Some("packets") {
            let n = words.next().context("a counter without its packets")?;
            total += n
                .parse::<u64>()
                .with_context(|| format!("packets {n:?} of a counter"))?;
        }
    }
    Ok(total)
}

/// Reads `Tcp: RetransSegs`, `OutRsts` and `TcpExt: TCPRetransFail` of the calling thread's
/// namespace.
fn read_tcp_counters() -> TcpCounters {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("read net/snmp");
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().expect("Tcp header"),
        tcp.next().expect("Tcp values"),
    );
    let field = |wanted: &str| -> u64 {
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == wanted)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no Tcp {wanted} in net/snmp"))
    };
    let netstat =
        std::fs::read_to_string("/proc/thread-self/net/netstat").expect("read net/netstat");
    let mut ext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (ext_names, ext_values) = (
        ext.next().expect("TcpExt header"),
        ext.next().expect("TcpExt values"),
    );
    let retrans_fail = ext_names
        .split_whitespace()
        .zip(ext_values.split_whitespace())
        .find(|(name, _)| *name == "TCPRetransFail")
        .and_then(|(_, v)| v.parse().ok())
        .expect("no TcpExt TCPRetransFail in net/netstat");
    TcpCounters {
        retrans_segs: field("RetransSegs"),
        out_rsts: field("OutRsts"),
        retrans_fail,
    }
}

/// TCP sockets of the calling thread's namespace that are neither listening nor in TIME_WAIT
/// (or CLOSE), as `local remote state` lines of `/proc/net/tcp{,6}`.
fn sockets_in_flight() -> Vec<String> {
    const TIME_WAIT: &str = "06";
    const CLOSE: &str = "07";
    const LISTEN: &str = "0A";
    let mut busy = Vec::new();
    for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let [_, local, remote, state, ..] = fields[..]
                && ![TIME_WAIT, CLOSE, LISTEN].contains(&state)
            {
                busy.push(format!("{local} {remote} {state}"));
            }
        }
    }
    busy
}

#[cfg(test)]
mod tests {
    use super::lab_namespace_owner;

    #[test]
    fn only_lab_namespaces_are_swept() {
        assert_eq!(lab_namespace_owner("cp-c-4242-0"), Some(4242));
        assert_eq!(lab_namespace_owner("cp-s-7-12"), Some(7));
        assert_eq!(lab_namespace_owner("cpbench-c-4242"), None);
        assert_eq!(lab_namespace_owner("cp-client"), None);
        assert_eq!(lab_namespace_owner("cp-c-4242-0-x"), None);
    }
}
