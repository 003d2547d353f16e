//! Counters of the network namespaces the agent knows a thread in: the agent's own, and every
//! namespace with a listener (the programs record the thread that called `listen()`; the
//! start-up scan a thread of each namespace). Read from that thread's `/proc/TID/net`, which any
//! user may read:
//!
//! - `netstat`'s `TcpExt: ListenOverflows`: SYNs, and handshakes' last ACKs, dropped because a
//!   listener's accept queue was full. The kernel drops such a SYN without a drop reason and
//!   without any tracepoint on the way, so this counter is where it shows. What it adds is
//!   charged to the namespace's listener whose accept queue is full (`/proc/TID/net/tcp{,6}`
//!   show a listener's queue; the programs saw its backlog at `listen()`), or, where none is full
//!   any more, the one with the longest queue: a `listen_overflow` event.
//! - `stat/nf_conntrack`'s `insert_failed`, `drop` and `early_drop`, summed over CPUs, where
//!   connection tracking is loaded: a `conntrack` event per namespace whose counts grew.
//!
//! A namespace's first read is its baseline: what happened before is not reported.
use std::{
    collections::{BTreeMap, btree_map::Entry},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::SystemTime,
};

use aya::maps::{HashMap, MapData};
use probe_common::{ListenerKey, ListenerRecord};

use crate::{
    decode,
    event::{Conntrack, Endpoint, Event, EventDetail, ListenOverflow, Side},
};

/// One namespace's counters when last read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    listen_overflows: Option<u64>,
    /// insert_failed, drop, early_drop.
    conntrack: Option<[u64; 3]>,
}

pub struct Namespaces {
    listeners: HashMap<MapData, ListenerKey, ListenerRecord>,
    proc: PathBuf,
    /// The agent's own namespace, read through `/proc/self/net`.
    own: Option<u32>,
    last: BTreeMap<u32, Counters>,
}

/// A listener of one namespace, as the programs (or the start-up scan) know it.
#[derive(Clone, Copy, Debug)]
struct KnownListener {
    port: u16,
    record: ListenerRecord,
}

impl Namespaces {
    pub fn new(listeners: HashMap<MapData, ListenerKey, ListenerRecord>, proc: &str) -> Self {
        let proc = PathBuf::from(proc);
        let own = std::fs::read_link(proc.join("self/ns/net"))
            .ok()
            .and_then(|link| namespace_inode(link.to_str()?));
        Namespaces {
            listeners,
            proc,
            own,
            last: BTreeMap::new(),
        }
    }

    pub fn sample(&mut self, now: SystemTime, out: &mut Vec<Event>) {
        let mut by_namespace: BTreeMap<u32, Vec<KnownListener>> = BTreeMap::new();
        for entry in self.listeners.iter() {
            let Ok((key, record)) = entry else {
                continue;
            };
            by_namespace
                .entry(key.netns)
                .or_default()
                .push(KnownListener {
                    port: key.port,
                    record,
                });
        }
        if let Some(own) = self.own {
            by_namespace.entry(own).or_default();
        }
        let mut seen = BTreeMap::new();
        for (netns, listeners) in by_namespace {
            let Some(dir) = self.net_dir(netns, &listeners) else {
                continue;
            };
            let now_counters = read_counters(&dir);
            let before = match self.last.entry(netns) {
                Entry::Occupied(e) => Some(*e.get()),
                Entry::Vacant(_) => None,
            };
            seen.insert(netns, now_counters);
            let Some(before) = before else {
                continue;
            };
            if let (Some(b), Some(n)) = (before.listen_overflows, now_counters.listen_overflows)
                && n > b
            {
                match overflowing(&dir, &listeners) {
                    Some(listener) => out.push(listener.event(now, n - b)),
                    None => tracing::debug!(
                        "{} listen overflows in network namespace {netns}, and no listener's \
                         accept queue holds anything now",
                        n - b
                    ),
                }
            }
            if let (Some(b), Some(n)) = (before.conntrack, now_counters.conntrack) {
                let delta = |i: usize| n[i].saturating_sub(b[i]);
                let sample = Conntrack {
                    netns,
                    insert_failed: delta(0),
                    drop: delta(1),
                    early_drop: delta(2),
                };
                if sample.total() > 0 {
                    out.push(Event::namespace_sample(now, EventDetail::Conntrack(sample)));
                }
            }
        }
        // Namespaces gone (their last listener closed) are forgotten: if they come back, they
        // start from a new baseline.
        self.last = seen;
    }

    /// `/proc/self/net` for the agent's namespace, else `/proc/TID/net` of a thread known to
    /// live in it (one that called `listen()` there, or that the start-up scan found).
    fn net_dir(&self, netns: u32, listeners: &[KnownListener]) -> Option<PathBuf> {
        if Some(netns) == self.own {
            return Some(self.proc.join("self/net"));
        }
        listeners
            .iter()
            .filter(|l| l.record.tid != 0)
            .map(|l| self.proc.join(l.record.tid.to_string()).join("net"))
            .find(|dir| dir.join("netstat").exists())
    }
}

fn read_counters(dir: &Path) -> Counters {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    Counters {
        listen_overflows: read("netstat")
            .and_then(|t| netstat_value(&t, "TcpExt:", "ListenOverflows")),
        conntrack: read("stat/nf_conntrack").and_then(|t| conntrack_totals(&t)),
    }
}

/// The value of `field` in `netstat`'s or `snmp`'s `prefix` lines (a header line, then values).
fn netstat_value(text: &str, prefix: &str, field: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let Some(value) = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == field)
            .and_then(|(_, v)| v.parse().ok())
        {
            return Some(value);
        }
    }
    None
}

/// `insert_failed`, `drop` and `early_drop` of `stat/nf_conntrack`, summed over its rows (one
/// per CPU, in hexadecimal).
fn conntrack_totals(text: &str) -> Option<[u64; 3]> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let columns = [
        column("insert_failed")?,
        column("drop")?,
        column("early_drop")?,
    ];
    let mut totals = [0u64; 3];
    for line in lines {
        let values: Vec<&str> = line.split_whitespace().collect();
        for (total, &at) in totals.iter_mut().zip(&columns) {
            *total += values
                .get(at)
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .unwrap_or(0);
        }
    }
    Some(totals)
}

/// A listening socket as `/proc/net/tcp{,6}` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ListenRow {
    addr: IpAddr,
    port: u16,
    /// Connections waiting to be accepted (`sk_ack_backlog`).
    queued: u32,
}

/// The listener the namespace's new overflows are charged to, with what the programs know of it.
struct Overflowing {
    row: ListenRow,
    known: Option<KnownListener>,
}

impl Overflowing {
    fn event(&self, time: SystemTime, overflows: u64) -> Event {
        let unspecified = match self.row.addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let record = self.known.map(|k| k.record);
        Event {
            seq: 0,
            time,
            process: record.as_ref().and_then(|r| decode::process(&r.owner)),
            side: Some(Side::Server),
            src: Endpoint::new(self.row.addr, self.row.port),
            dst: Endpoint::new(unspecified, 0),
            detail: EventDetail::ListenOverflow(ListenOverflow {
                overflows,
                backlog: record.map(|r| r.backlog).filter(|b| *b > 0),
                queued: self.row.queued,
            }),
            workload: None,
            backend: None,
        }
    }
}

/// The listener whose accept queue is full: more queued than its backlog (where the programs saw
/// it), else the longest queue of the namespace; `None` when every queue is empty.
fn overflowing(dir: &Path, listeners: &[KnownListener]) -> Option<Overflowing> {
    let mut rows = Vec::new();
    for table in ["tcp", "tcp6"] {
        if let Ok(text) = std::fs::read_to_string(dir.join(table)) {
            rows.extend(listen_rows(&text));
        }
    }
    choose(&rows, listeners)
}

fn choose(rows: &[ListenRow], listeners: &[KnownListener]) -> Option<Overflowing> {
    let known = |row: &ListenRow| listeners.iter().find(|l| l.port == row.port).copied();
    let full = |row: &ListenRow| {
        known(row).is_some_and(|l| l.record.backlog > 0 && row.queued > l.record.backlog)
    };
    let pick = rows
        .iter()
        .filter(|r| full(r))
        .max_by_key(|r| r.queued)
        .or_else(|| {
            rows.iter()
                .filter(|r| r.queued > 0)
                .max_by_key(|r| r.queued)
        })?;
    Some(Overflowing {
        row: *pick,
        known: known(pick),
    })
}

/// Listening sockets of a `/proc/net/tcp` or `tcp6` table.
fn listen_rows(table: &str) -> impl Iterator<Item = ListenRow> + '_ {
    table.lines().skip(1).filter_map(|line| {
        // sl local_address rem_address st tx_queue:rx_queue ...
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state, queues) = (fields.get(1)?, fields.get(3)?, fields.get(4)?);
        if *state != "0A" {
            return None;
        }
        let (addr, port) = local.rsplit_once(':')?;
        let queued = u32::from_str_radix(queues.split_once(':')?.1, 16).ok()?;
        Some(ListenRow {
            addr: proc_address(addr)?,
            port: u16::from_str_radix(port, 16).ok()?,
            queued,
        })
    })
}

/// An address as `/proc/net/tcp{,6}` prints it: 32-bit words in hexadecimal, each in the host's
/// byte order.
fn proc_address(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// The inode in a `net:[4026531840]` link.
fn namespace_inode(link: &str) -> Option<u32> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_common::{COMM_LEN, Owner, owner_flags, side};

    const NETSTAT: &str = "TcpExt: SyncookiesSent ListenOverflows ListenDrops
TcpExt: 0 18 18
IpExt: InNoRoutes
IpExt: 3
";

    const CONNTRACK: &str = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000010  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000002 0000000a 00000001 00000000  00000000 00000000 00000000 00000000
00000010  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000001 00000000 00000000 00000000  00000000 00000000 00000000 00000000
";

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 02C8C80A:1F98 00000000:0000 0A 00000000:00000002 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   2: 0100007F:A1B2 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn counters_parse() {
        assert_eq!(
            netstat_value(NETSTAT, "TcpExt:", "ListenOverflows"),
            Some(18)
        );
        assert_eq!(netstat_value(NETSTAT, "IpExt:", "InNoRoutes"), Some(3));
        assert_eq!(netstat_value(NETSTAT, "TcpExt:", "Nope"), None);
        assert_eq!(conntrack_totals(CONNTRACK), Some([3, 10, 1]));
        assert_eq!(conntrack_totals("entries\n"), None);
        assert_eq!(namespace_inode("net:[4026531840]"), Some(4026531840));
    }

    #[test]
    fn listen_rows_and_their_addresses() {
        let rows: Vec<_> = listen_rows(TCP).collect();
        assert_eq!(
            rows,
            vec![
                ListenRow {
                    addr: "10.200.200.2".parse().unwrap(),
                    port: 8088,
                    queued: 2
                },
                ListenRow {
                    addr: "0.0.0.0".parse().unwrap(),
                    port: 22,
                    queued: 0
                },
            ]
        );
        assert_eq!(
            proc_address("0000000000000000FFFF00000100007F"),
            Some("::ffff:127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            proc_address("000080FE00000000FF000000FE000000"),
            Some("fe80::ff:0:fe".parse::<IpAddr>().unwrap())
        );
    }

    fn known(port: u16, backlog: u32) -> KnownListener {
        let mut comm = [0u8; COMM_LEN];
        comm[..6].copy_from_slice(b"server");
        KnownListener {
            port,
            record: ListenerRecord {
                sk: 1,
                owner: Owner {
                    tgid: 77,
                    side: side::SERVER,
                    flags: owner_flags::PROCESS_KNOWN,
                    _pad: [0; 2],
                    comm,
                    cgroup_id: 0,
                },
                backlog,
                tid: 78,
            },
        }
    }

    #[test]
    fn overflows_go_to_the_full_listener() {
        let row = |port, queued| ListenRow {
            addr: "10.0.0.1".parse().unwrap(),
            port,
            queued,
        };
        // 8080 holds more than its backlog of 1; 9090 holds more, but its backlog is 128.
        let rows = [row(8080, 2), row(9090, 5)];
        let listeners = [known(8080, 1), known(9090, 128)];
        let pick = choose(&rows, &listeners).unwrap();
        assert_eq!(pick.row.port, 8080);
        let event = pick.event(SystemTime::UNIX_EPOCH, 6);
        assert_eq!(event.src, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(event.process.as_ref().map(|p| p.pid), Some(77));
        assert_eq!(
            event.detail,
            EventDetail::ListenOverflow(ListenOverflow {
                overflows: 6,
                backlog: Some(1),
                queued: 2
            })
        );
        // None full by what is known: the longest queue.
        assert_eq!(choose(&rows, &[]).unwrap().row.port, 9090);
        // Every queue empty: nobody to charge.
        assert!(choose(&[row(8080, 0)], &listeners).is_none());
    }
}
