//! Listening sockets that were open before the agent started, and the processes that own them,
//! found the way `ss -p` finds them: each network namespace's `/proc/PID/task/TID/net/tcp{,6}`
//! lists its listening sockets with their inode numbers, and `/proc/PID/fd` links name the socket
//! inodes each process holds. The programs learn later listeners themselves, at `listen()`.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::{Path, PathBuf},
};

use probe_common::{COMM_LEN, ListenerKey, ListenerRecord, Owner, owner_flags, side};

/// `st` of a listening socket in `/proc/net/tcp`.
const TCP_LISTEN: &str = "0A";

/// A listener found in /proc: its namespace and port, and the process that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundListener {
    pub netns: u32,
    pub port: u16,
    pub pid: u32,
    pub comm: String,
    /// A thread that lives in the listener's namespace (where its counters are read).
    pub tid: u32,
    /// The process's cgroup v2 id (0 if unknown), for its workload.
    pub cgroup_id: u64,
}

impl FoundListener {
    /// The entry the programs look accepted connections up by.
    pub fn map_entry(&self) -> (ListenerKey, ListenerRecord) {
        let mut comm = [0u8; COMM_LEN];
        let bytes = self.comm.as_bytes();
        let len = bytes.len().min(COMM_LEN - 1);
        comm[..len].copy_from_slice(&bytes[..len]);
        let key = ListenerKey {
            netns: self.netns,
            port: self.port,
            _pad: 0,
        };
        let record = ListenerRecord {
            sk: 0,
            owner: Owner {
                tgid: self.pid,
                side: side::SERVER,
                flags: owner_flags::PROCESS_KNOWN,
                _pad: [0; 2],
                comm,
                cgroup_id: self.cgroup_id,
            },
            backlog: 0,
            tid: self.tid,
        };
        (key, record)
    }
}

/// Every listening TCP socket of every network namespace that some thread in `proc` (normally
/// `/proc`) lives in (a thread may have entered another namespace than its process's). Several processes holding one socket (a pre-forked server's workers) name
/// the lowest pid, usually the parent; several sockets on one port (SO_REUSEPORT) name one.
/// Processes that vanish or cannot be read during the scan are skipped.
pub fn scan(proc: &Path) -> Vec<FoundListener> {
    // socket inode -> lowest pid holding it; netns -> one task (`PID/task/TID`) living in it.
    let mut holders: HashMap<u64, u32> = HashMap::new();
    let mut namespaces: BTreeMap<u32, PathBuf> = BTreeMap::new();
    let Ok(entries) = fs::read_dir(proc) else {
        return Vec::new();
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        for task in fs::read_dir(dir.join("task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let task = task.path();
            if let Some(netns) = fs::read_link(task.join("ns/net"))
                .ok()
                .and_then(|l| bracketed_number(l.to_str()?, "net:"))
            {
                namespaces.entry(netns as u32).or_insert(task);
            }
        }
        let Ok(fds) = fs::read_dir(dir.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Some(inode) = fs::read_link(fd.path())
                .ok()
                .and_then(|l| bracketed_number(l.to_str()?, "socket:"))
            {
                holders
                    .entry(inode)
                    .and_modify(|p| *p = (*p).min(pid))
                    .or_insert(pid);
            }
        }
    }
    let cgroup_root = fs::read_to_string(proc.join("self/mounts"))
        .ok()
        .and_then(|m| crate::workload::cgroup2_mount(&m));
    let mut found = Vec::new();
    for (&netns, task) in &namespaces {
        let tid = task
            .file_name()
            .and_then(|n| n.to_str()?.parse().ok())
            .unwrap_or(0);
        for table in ["tcp", "tcp6"] {
            let text = fs::read_to_string(task.join("net").join(table)).unwrap_or_default();
            for (port, inode) in listening_sockets(&text) {
                let Some(&owner) = holders.get(&inode) else {
                    continue;
                };
                let comm = fs::read_to_string(proc.join(owner.to_string()).join("comm"))
                    .map(|c| c.trim_end_matches('\n').to_owned())
                    .unwrap_or_default();
                let listener = FoundListener {
                    netns,
                    port,
                    pid: owner,
                    comm,
                    tid,
                    cgroup_id: cgroup_root.as_deref().map_or(0, |root| {
                        crate::workload::process_cgroup_id(root, proc, owner)
                    }),
                };
                if !found
                    .iter()
                    .any(|f: &FoundListener| f.netns == netns && f.port == port)
                {
                    found.push(listener);
                }
            }
        }
    }
    found
}

/// `(port, inode)` of each listening socket in a `/proc/net/tcp` or `tcp6` table.
fn listening_sockets(table: &str) -> impl Iterator<Item = (u16, u64)> + '_ {
    table.lines().skip(1).filter_map(|line| {
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
        if *state != TCP_LISTEN {
            return None;
        }
        let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
        let inode = inode.parse().ok().filter(|&i| i != 0)?;
        Some((port, inode))
    })
}

/// The number in `prefix[NUMBER]`, as in the links `net:[4026531840]` and `socket:[12345]`.
fn bracketed_number(link: &str, prefix: &str) -> Option<u64> {
    link.strip_prefix(prefix)?
        .strip_prefix('[')?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A1B2 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn only_listening_sockets_with_an_inode_count() {
        let found: Vec<_> = listening_sockets(TCP).collect();
        assert_eq!(found, vec![(8080, 31337)]);
    }

    #[test]
    fn links_parse() {
        assert_eq!(
            bracketed_number("net:[4026531840]", "net:"),
            Some(4026531840)
        );
        assert_eq!(bracketed_number("socket:[12345]", "socket:"), Some(12345));
        assert_eq!(bracketed_number("pipe:[12345]", "socket:"), None);
        assert_eq!(bracketed_number("/dev/null", "socket:"), None);
    }

    #[test]
    fn map_entries_carry_a_known_server_process() {
        let found = FoundListener {
            netns: 7,
            port: 8080,
            pid: 99,
            comm: "a-very-long-command-name".into(),
            tid: 100,
            cgroup_id: 12345,
        };
        let (key, record) = found.map_entry();
        assert_eq!((key.netns, key.port), (7, 8080));
        assert_eq!((record.sk, record.backlog, record.tid), (0, 0, 100));
        assert_eq!(record.owner.tgid, 99);
        assert_eq!(record.owner.side, side::SERVER);
        assert_eq!(record.owner.flags, owner_flags::PROCESS_KNOWN);
        assert_eq!(&record.owner.comm[..15], b"a-very-long-com");
        assert_eq!(record.owner.comm[15], 0);
        assert_eq!(record.owner.cgroup_id, 12345);
    }

    /// This process's own listener, found through the real /proc.
    #[test]
    fn finds_this_process_listening() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let netns = bracketed_number(
            fs::read_link("/proc/self/ns/net")
                .unwrap()
                .to_str()
                .unwrap(),
            "net:",
        )
        .unwrap() as u32;
        let found = scan(Path::new("/proc"));
        let mine = found
            .iter()
            .find(|f| f.netns == netns && f.port == port)
            .unwrap_or_else(|| panic!("port {port} not among {found:?}"));
        assert_eq!(mine.pid, std::process::id());
    }
}
