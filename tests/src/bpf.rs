//! What an agent holds in the kernel, read from its file descriptors (`/proc/PID/fdinfo`: every
//! BPF program, link and map fd names its id), and what the kernel still has of it, asked of
//! `bpftool` by those ids. Ids are never reused while the kernel runs, so this sees only this
//! agent's objects, whatever other agents run beside it.
use std::{collections::BTreeSet, process::Command};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// One map the agent holds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MapFd {
    pub id: u32,
    /// The kernel's `enum bpf_map_type` (9 is an LRU hash).
    pub map_type: u32,
    pub max_entries: u32,
}

/// `BPF_MAP_TYPE_LRU_HASH`.
pub const LRU_HASH: u32 = 9;

/// The BPF objects one process holds descriptors of.
#[derive(Clone, Debug, Default)]
pub struct BpfObjects {
    pub programs: BTreeSet<u32>,
    pub links: BTreeSet<u32>,
    pub maps: BTreeSet<MapFd>,
}

impl BpfObjects {
    /// Reads every fdinfo of `pid`.
    pub fn of(pid: u32) -> anyhow::Result<Self> {
        let mut objects = BpfObjects::default();
        let dir = format!("/proc/{pid}/fdinfo");
        for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
            let Ok(text) = std::fs::read_to_string(entry?.path()) else {
                continue;
            };
            let field = |name: &str| -> Option<u32> {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .and_then(|v| v.trim().parse().ok())
            };
            if let Some(link) = field("link_id") {
                objects.links.insert(link);
            } else if let Some(program) = field("prog_id") {
                objects.programs.insert(program);
            } else if let (Some(id), Some(map_type), Some(max_entries)) =
                (field("map_id"), field("map_type"), field("max_entries"))
            {
                objects.maps.insert(MapFd {
                    id,
                    map_type,
                    max_entries,
                });
            }
        }
        Ok(objects)
    }

    /// What the kernel still has of these objects: programs, links and perf events (of `pid`
    /// or of these programs), each described in a line; empty when all are gone.
    pub fn still_in_kernel(&self, pid: u32) -> anyhow::Result<Vec<String>> {
        let mut left = Vec::new();
        for prog in bpftool(&["prog", "show"])?.as_array().into_iter().flatten() {
            if id_in(prog, "id", &self.programs) {
                left.push(format!("program {prog}"));
            }
        }
        for link in bpftool(&["link", "show"])?.as_array().into_iter().flatten() {
            if id_in(link, "id", &self.links) || id_in(link, "prog_id", &self.programs) {
                left.push(format!("link {link}"));
            }
        }
        for perf in bpftool(&["perf", "show"])?.as_array().into_iter().flatten() {
            if perf["pid"].as_u64() == Some(u64::from(pid))
                || id_in(perf, "prog_id", &self.programs)
            {
                left.push(format!("perf event {perf}"));
            }
        }
        Ok(left)
    }

    /// The agent's map named `name` (as the kernel keeps it, at most 15 bytes), by asking
    /// bpftool for the name of each map the agent holds.
    pub fn map_named(&self, name: &str) -> anyhow::Result<Option<MapFd>> {
        for map in &self.maps {
            let shown = bpftool(&["map", "show", "id", &map.id.to_string()])?;
            if shown["name"].as_str() == Some(name) {
                return Ok(Some(map.clone()));
            }
        }
        Ok(None)
    }
}

fn id_in(object: &Value, key: &str, ids: &BTreeSet<u32>) -> bool {
    object[key]
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .is_some_and(|id| ids.contains(&id))
}

/// Entries in the map `id` now (`bpftool map dump`).
pub fn map_entries(id: u32) -> anyhow::Result<usize> {
    let dump = bpftool(&["map", "dump", "id", &id.to_string()])?;
    Ok(dump.as_array().map_or(0, Vec::len))
}

/// `bpftool -j ARGS`, parsed; an empty answer is an empty list.
pub fn bpftool(args: &[&str]) -> anyhow::Result<Value> {
    let output = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("cannot run bpftool (Debian package bpftool)")?;
    if !output.status.success() {
        bail!(
            "`bpftool -j {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    if text.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&text).with_context(|| format!("bpftool printed no JSON: {text}"))
}
