//! What the bench reads from and sets in the kernel: CPU time (/proc/stat, /proc/PID),
//! RSS, eBPF program run time (fdinfo, with `kernel.bpf_stats_enabled`), tracefs.
use std::{collections::BTreeMap, fs, path::Path, process::Command};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::cmd;

/// Busy time of the whole machine (all CPUs) in seconds: /proc/stat's `cpu` line without idle
/// and iowait.
pub fn machine_busy_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    let busy: u64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// CPU time of process `pid`, all its threads, in seconds: the sum of each live thread's
/// `schedstat` run time (nanoseconds), or `utime + stime` of /proc/PID/stat where schedstat is
/// missing.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let mut total_ns = 0u64;
    let mut any = false;
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Some(ns) = fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            {
                total_ns += ns;
                any = true;
            }
        }
    }
    if any {
        return total_ns as f64 / 1e9;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / clock_ticks()
}

/// CPU time of this process (every thread, exited ones too), in seconds.
pub fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Resident memory of `pid` in bytes (VmRSS), if it still runs.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The kinds of mapping [`rss_parts_of`] sums by, in the order reports list them.
pub const RSS_PARTS: [&str; 4] = ["anonymous", "ring_buffers", "binary", "libraries"];

/// Where `pid`'s resident memory is, in bytes, from /proc/PID/smaps: see [`rss_parts_of`].
pub fn rss_parts(pid: u32) -> Option<BTreeMap<&'static str, u64>> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    Some(rss_parts_of(&smaps, &exe.to_string_lossy()))
}

/// Each mapping's `Rss` summed by what it holds: `anonymous` (the heap, malloc's mmapped blocks
/// such as the flight recorder's ring, thread stacks), `ring_buffers` (eBPF maps mapped in: the
/// ring buffers, whose data pages are mapped twice and so count twice), `binary` (the agent's
/// own code and data), `libraries` (other files).
pub fn rss_parts_of(smaps: &str, exe: &str) -> BTreeMap<&'static str, u64> {
    let mut parts = BTreeMap::new();
    let [anonymous, ring_buffers, binary, libraries] = RSS_PARTS;
    let mut part = anonymous;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // A mapping's header: range, perms, offset, dev, inode, then the path if any.
            let path = fields.nth(4).unwrap_or("");
            part = if path.is_empty() || path.starts_with('[') {
                anonymous
            } else if path.starts_with("anon_inode:bpf") {
                ring_buffers
            } else if path == exe {
                binary
            } else {
                libraries
            };
        } else if first == "Rss:"
            && let Some(kib) = fields.next().and_then(|v| v.parse::<u64>().ok())
        {
            *parts.entry(part).or_insert(0) += kib * 1024;
        }
    }
    parts
}

/// Run time and run count of each eBPF program process `pid` holds open (read from each program
/// fd's fdinfo: the same numbers `bpftool prog show` prints), by program id.
#[derive(Clone, Debug, Default)]
pub struct ProgStats {
    pub by_id: BTreeMap<u64, ProgRun>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ProgRun {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl ProgStats {
    pub fn programs(&self) -> usize {
        self.by_id.len()
    }

    /// What each program did between `before` and `self`, by the program's name.
    pub fn since(
        &self,
        before: &ProgStats,
        names: &BTreeMap<u64, String>,
    ) -> BTreeMap<String, ProgRun> {
        let mut runs = BTreeMap::new();
        for (id, after) in &self.by_id {
            let start = before.by_id.get(id).copied().unwrap_or_default();
            let name = names
                .get(id)
                .cloned()
                .unwrap_or_else(|| format!("prog {id}"));
            let run: &mut ProgRun = runs.entry(name).or_default();
            run.run_time_ns += after.run_time_ns.saturating_sub(start.run_time_ns);
            run.run_cnt += after.run_cnt.saturating_sub(start.run_cnt);
        }
        runs
    }
}

pub fn prog_stats(pid: u32) -> ProgStats {
    let mut stats = ProgStats::default();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return stats;
    };
    for fd in fds.flatten() {
        let Ok(info) = fs::read_to_string(fd.path()) else {
            continue;
        };
        // A program fd has `prog_type`; link fds name the program too, but without run times.
        if !info.lines().any(|l| l.starts_with("prog_type:")) {
            continue;
        }
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        let Some(id) = field("prog_id:") else {
            continue;
        };
        stats.by_id.insert(
            id,
            ProgRun {
                run_time_ns: field("run_time_ns:").unwrap_or(0),
                run_cnt: field("run_cnt:").unwrap_or(0),
            },
        );
    }
    stats
}

/// The names of loaded eBPF programs by id (`bpftool prog show`).
pub fn program_names() -> BTreeMap<u64, String> {
    let Ok(text) = output("bpftool", &["prog", "show", "--json"]) else {
        return BTreeMap::new();
    };
    let Ok(Value::Array(programs)) = serde_json::from_str::<Value>(&text) else {
        return BTreeMap::new();
    };
    programs
        .iter()
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_owned())))
        .collect()
}

/// A program attached to a tracepoint (`bpftool perf show`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub tracepoint: String,
    pub prog_id: u64,
    pub pid: u64,
    pub comm: String,
}

/// Programs attached to any of `tracepoints`, by any process: before a measurement, a forgotten
/// bpftrace or agent on the hooks being measured slows every configuration, the untraced one too.
pub fn attached_to(tracepoints: &[&str]) -> anyhow::Result<Vec<Attached>> {
    let text = output("bpftool", &["perf", "show", "--json"])?;
    let attached = parse_perf_show(&text)?
        .into_iter()
        .filter(|a| tracepoints.contains(&a.tracepoint.as_str()))
        .map(|mut a| {
            a.comm = fs::read_to_string(format!("/proc/{}/comm", a.pid))
                .map(|c| c.trim().to_owned())
                .unwrap_or_else(|_| "?".into());
            a
        })
        .collect();
    Ok(attached)
}

fn parse_perf_show(text: &str) -> anyhow::Result<Vec<Attached>> {
    let Value::Array(entries) = serde_json::from_str::<Value>(text)
        .context("`bpftool perf show --json` printed no JSON")?
    else {
        bail!("`bpftool perf show --json` printed no list");
    };
    Ok(entries
        .iter()
        .filter_map(|e| {
            Some(Attached {
                tracepoint: e["tracepoint"].as_str()?.to_owned(),
                prog_id: e["prog_id"].as_u64()?,
                pid: e["pid"].as_u64()?,
                comm: String::new(),
            })
        })
        .collect())
}

/// A program attached to the cgroup v2 root (`bpftool cgroup show ROOT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupProgram {
    pub id: u64,
    pub attach_type: String,
    pub name: String,
}

/// The programs attached to the cgroup v2 root, by anyone: cgroup_skb programs there see every
/// packet of every namespace, the DNS storm's too.
pub fn cgroup_root_programs() -> anyhow::Result<Vec<CgroupProgram>> {
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    let root = mounts
        .lines()
        .find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| fields[1].to_owned())
        })
        .context("no cgroup v2 mount in /proc/mounts")?;
    parse_cgroup_show(&output("bpftool", &["cgroup", "show", &root, "--json"])?)
}

fn parse_cgroup_show(text: &str) -> anyhow::Result<Vec<CgroupProgram>> {
    // bpftool prints nothing at all for a cgroup without programs.
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let Value::Array(entries) = serde_json::from_str::<Value>(text)
        .context("`bpftool cgroup show --json` printed no JSON")?
    else {
        bail!("`bpftool cgroup show --json` printed no list");
    };
    Ok(entries
        .iter()
        .filter_map(|e| {
            Some(CgroupProgram {
                id: e["id"].as_u64()?,
                attach_type: e["attach_type"].as_str()?.to_owned(),
                name: e["name"].as_str().unwrap_or("").to_owned(),
            })
        })
        .collect())
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled=1` while alive; the previous value is put back on drop.
pub struct BpfStatsOn {
    previous: String,
}

impl BpfStatsOn {
    pub fn enable() -> anyhow::Result<Self> {
        let previous = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("cannot read {BPF_STATS}"))?
            .trim()
            .to_owned();
        fs::write(BPF_STATS, "1").with_context(|| format!("cannot enable {BPF_STATS}"))?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStatsOn {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, &self.previous);
    }
}

const TRACEFS: &str = "/sys/kernel/tracing";

/// tracefs mounted for the peers (classic tracepoints need it); unmounted on drop only if the
/// bench mounted it.
pub struct Tracefs {
    mounted_here: bool,
}

impl Tracefs {
    pub fn ensure() -> anyhow::Result<Self> {
        if Path::new(TRACEFS).join("events").is_dir() {
            return Ok(Self {
                mounted_here: false,
            });
        }
        cmd::status(Command::new("mount").args(["-t", "tracefs", "tracefs", TRACEFS])).context(
            "tracefs is not mounted and mounting it failed; the peers' classic tracepoints need it",
        )?;
        Ok(Self { mounted_here: true })
    }
}

impl Drop for Tracefs {
    fn drop(&mut self) {
        if self.mounted_here {
            let _ = Command::new("umount").arg(TRACEFS).status();
        }
    }
}

/// A command's stdout, or an error naming it.
pub fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn rss_parts_sum_each_kind_of_mapping() {
        let smaps = "\
55940e719000-55940ee47000 r-xp 00309000 fd:01 123 /usr/bin/connprobe
Size:               7352 kB
Rss:                5044 kB
559438e10000-559439b96000 rw-p 00000000 00:00 0 [heap]
Rss:               13236 kB
7f6ca7262000-7f6ca83ef000 rw-p 00000000 00:00 0
Rss:               17972 kB
7f6ca65f4000-7f6ca6df5000 r--s 00000000 00:0f 1058 anon_inode:bpf-map
Rss:                8196 kB
7f6ca9122000-7f6ca9278000 r-xp 00028000 fd:01 77 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                 952 kB
";
        let parts = rss_parts_of(smaps, "/usr/bin/connprobe");
        assert_eq!(parts["binary"], 5044 * 1024);
        assert_eq!(parts["anonymous"], (13236 + 17972) * 1024);
        assert_eq!(parts["ring_buffers"], 8196 * 1024);
        assert_eq!(parts["libraries"], 952 * 1024);
    }

    #[test]
    fn perf_show_lists_tracepoint_attachments() {
        let text = r#"[{"pid":29821,"fd":21,"prog_id":5558,"fd_type":"raw_tracepoint","tracepoint":"inet_sock_set_state"},{"pid":7,"fd":3,"prog_id":9,"fd_type":"kprobe","func":"tcp_connect","offset":0}]"#;
        let attached = parse_perf_show(text).unwrap();
        assert_eq!(
            attached,
            vec![Attached {
                tracepoint: "inet_sock_set_state".into(),
                prog_id: 5558,
                pid: 29821,
                comm: String::new(),
            }]
        );
    }

    #[test]
    fn cgroup_show_lists_attached_programs() {
        let text = r#"[{"id":876,"attach_type":"cgroup_inet_ingress","attach_flags":"multi","name":"dns_ingress","attach_btf_name":"","attach_btf_obj_id":0,"attach_btf_id":0}]"#;
        assert_eq!(
            parse_cgroup_show(text).unwrap(),
            vec![CgroupProgram {
                id: 876,
                attach_type: "cgroup_inet_ingress".into(),
                name: "dns_ingress".into(),
            }]
        );
        assert_eq!(parse_cgroup_show("\n").unwrap(), Vec::new());
    }

    #[test]
    fn program_runs_are_differences_by_name() {
        let run = |t, c| ProgRun {
            run_time_ns: t,
            run_cnt: c,
        };
        let before = ProgStats {
            by_id: BTreeMap::from([(1, run(100, 10)), (2, run(5, 1))]),
        };
        let after = ProgStats {
            by_id: BTreeMap::from([(1, run(400, 20)), (2, run(5, 1)), (3, run(50, 5))]),
        };
        let names = BTreeMap::from([(1, "tcp_state_btf".to_string())]);
        let runs = after.since(&before, &names);
        assert_eq!(runs["tcp_state_btf"].run_time_ns, 300);
        assert_eq!(runs["tcp_state_btf"].run_cnt, 10);
        assert_eq!(runs["prog 2"].run_cnt, 0);
        assert_eq!(runs["prog 3"].run_time_ns, 50);
    }
}
