//! Which processes are the watched command's: a cgroup v2 directory made for the run (the
//! command moves into it before `exec`, and everything it starts stays there), or, where no
//! cgroup can be made, its process tree as seen by polling `/proc`.
use std::{
    collections::{BTreeSet, HashSet},
    fs::{self, File, OpenOptions},
    io,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::workload;

/// Rounds of moving leftover processes out before the cgroup is given up on.
const EMPTY_TRIES: usize = 50;

/// The cgroup made for one run.
pub struct RunCgroup {
    /// Its directory under the cgroup v2 mount.
    dir: PathBuf,
    /// Its path as `/proc/PID/cgroup` and the JSON log's `cgroup` write it.
    pub path: String,
    /// `cgroup.procs`, opened before the fork: the child writes `0` to it to move itself.
    procs: File,
}

impl RunCgroup {
    /// Makes `connprobe-watch-<pid>` at the top of the cgroup v2 hierarchy (the top takes
    /// processes whatever controllers are enabled; a cgroup below one with processes might not).
    pub fn create() -> Result<Self, String> {
        let mounts = fs::read_to_string("/proc/mounts")
            .map_err(|e| format!("cannot read /proc/mounts: {e}"))?;
        let root = workload::cgroup2_mount(&mounts).ok_or("no cgroup v2 hierarchy is mounted")?;
        let name = format!("connprobe-watch-{}", std::process::id());
        let dir = root.join(&name);
        fs::create_dir(&dir)
            .map_err(|e| format!("cannot make the cgroup {}: {e}", dir.display()))?;
        let procs = match OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
        {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                return Err(format!("cannot open {}/cgroup.procs: {e}", dir.display()));
            }
        };
        Ok(RunCgroup {
            dir,
            path: format!("/{name}"),
            procs,
        })
    }

    /// Has `command` move into this cgroup between fork and exec, so that its first
    /// instruction, and every process it starts, runs inside.
    pub fn enter_before_exec(&self, command: &mut Command) {
        let fd = self.procs.as_raw_fd();
        // SAFETY: only write(2) on an fd opened before the fork: async-signal-safe, no
        // allocation, no lock.
        unsafe {
            command.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// The processes in it now.
    pub fn pids(&self) -> io::Result<Vec<u32>> {
        Ok(fs::read_to_string(self.dir.join("cgroup.procs"))?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// Moves any process the command left running to connprobe's own cgroup (it goes on
    /// running, untraced), then removes the directory. Returns how many were moved.
    pub fn remove(self) -> Result<usize, String> {
        let own = fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| workload::unified_path(&text).map(str::to_owned))
            .unwrap_or_else(|| "/".into());
        let parent = self
            .dir
            .parent()
            .map(|root| root.join(own.trim_start_matches('/')))
            .unwrap_or_default();
        let mut moved = BTreeSet::new();
        for _ in 0..EMPTY_TRIES {
            let pids = self
                .pids()
                .map_err(|e| format!("cannot list {}: {e}", self.dir.display()))?;
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                if fs::write(parent.join("cgroup.procs"), pid.to_string()).is_ok() {
                    moved.insert(pid);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(self.procs);
        fs::remove_dir(&self.dir)
            .map_err(|e| format!("cannot remove the cgroup {}: {e}", self.dir.display()))?;
        Ok(moved.len())
    }
}

/// Adds the command's processes now to `seen`: those in its cgroup, or else the descendants of
/// `root` (the command's pid).
pub fn add_pids(cgroup: Option<&RunCgroup>, root: u32, seen: &mut HashSet<u32>) {
    seen.insert(root);
    match cgroup {
        Some(cgroup) => seen.extend(cgroup.pids().unwrap_or_default()),
        None => add_descendants(Path::new("/proc"), seen),
    }
}

/// Adds to `tree` every process under `proc` whose parent is in it, until nothing changes.
fn add_descendants(proc: &Path, tree: &mut HashSet<u32>) {
    let Ok(entries) = fs::read_dir(proc) else {
        return;
    };
    let parents: Vec<(u32, u32)> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
            Some((pid, parent_of(&stat)?))
        })
        .collect();
    loop {
        let before = tree.len();
        for (pid, ppid) in &parents {
            if tree.contains(ppid) {
                tree.insert(*pid);
            }
        }
        if tree.len() == before {
            return;
        }
    }
}

/// The parent pid in a `/proc/PID/stat` line (the field after the `(comm)`, which may hold
/// spaces and parentheses, and the state).
fn parent_of(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_from_a_stat_line_whose_name_has_spaces_and_parens() {
        assert_eq!(parent_of("42 (a b) c) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parent_of("42 (sh) R 1 42"), Some(1));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn descendants_of_this_process_include_its_child() {
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let mut tree = HashSet::from([std::process::id()]);
        add_descendants(Path::new("/proc"), &mut tree);
        let found = tree.contains(&child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found, "{tree:?}");
    }
}
