//! Capabilities: the ones connprobe needs and what for, the one sentence it says when they are
//! missing, and giving up every one of them once the programs are attached.
//!
//! Measured on Linux 6.18 (`kernel.unprivileged_bpf_disabled=2`, `perf_event_paranoid=2`), as
//! uid 65534 with ambient capabilities and as root with a reduced set:
//!
//! | operation | capability |
//! | --- | --- |
//! | create maps, load BTF and programs (`bpf()`) | `CAP_BPF` |
//! | load tracing programs (`tp_btf`, raw and classic tracepoints), which read kernel memory | `CAP_PERFMON` |
//! | read other processes' `/proc/PID/fd/*` and `/proc/PID/task/TID/ns/net` links (listeners older than the agent) | `CAP_SYS_PTRACE` |
//! | list another user's `/proc/PID/fd`, read tracefs (mode 0700) for classic tracepoints, when not root | `CAP_DAC_READ_SEARCH` |
//! | mount tracefs when classic tracepoints need it and it is not mounted | `CAP_SYS_ADMIN` |
//! | attach the `cgroup_skb` programs to the cgroup v2 root: DNS (without it only DNS is missing) and the one that sees where a DNAT sent a connect (without it only `backend_ip` is missing) | `CAP_NET_ADMIN` |
//! | after attaching: read the ring buffers (mmap), look up map entries (`bpf()` on a map fd it holds), detach | none |
//!
//! Capabilities belong to threads, not processes. The thread that loads the programs keeps them
//! until [`drop_after_attach`]; every other thread gives them up when it starts
//! ([`drop_in_this_thread`]), so nothing that serves HTTP or writes the log ever holds any.
use std::{fs, path::Path};

use caps::{CapSet, Capability, CapsHashSet};

/// A capability connprobe uses, and what for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    pub capability: Capability,
    pub purpose: &'static str,
}

/// Without these nothing loads.
pub const REQUIRED: [Need; 2] = [
    Need {
        capability: Capability::CAP_BPF,
        purpose: "to create eBPF maps and load programs",
    },
    Need {
        capability: Capability::CAP_PERFMON,
        purpose: "to load tracing programs, which read kernel memory",
    },
];

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// One sentence naming every missing capability and what it is for.
    #[error("{0}")]
    Missing(String),
    #[error("cannot read this thread's capabilities: {0}")]
    Read(String),
    #[error("cannot drop capabilities after attaching: {0}")]
    Drop(String),
}

/// A thread's capability sets, as bit masks (bit N is capability N).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCapabilities {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
    pub no_new_privs: bool,
}

impl ThreadCapabilities {
    /// Parses the `Cap*:` and `NoNewPrivs:` lines of `/proc/PID/status` (or `.../task/TID/status`).
    pub fn from_status(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let mask = |name: &str| u64::from_str_radix(field(name)?, 16).ok();
        Some(ThreadCapabilities {
            inheritable: mask("CapInh")?,
            permitted: mask("CapPrm")?,
            effective: mask("CapEff")?,
            bounding: mask("CapBnd")?,
            ambient: mask("CapAmb")?,
            no_new_privs: field("NoNewPrivs") == Some("1"),
        })
    }

    /// Whether the thread holds any capability it could use or regain by itself.
    pub fn holds_any(&self) -> bool {
        self.permitted | self.effective | self.ambient | self.inheritable != 0
    }
}

/// The bit of `capability` in a mask.
pub fn bit(capability: Capability) -> u64 {
    capability.bitmask()
}

/// The names in a mask, lowest first: `CAP_BPF, CAP_PERFMON`, or `none`.
pub fn names(mask: u64) -> String {
    let mut all: Vec<Capability> = caps::all()
        .into_iter()
        .filter(|c| mask & c.bitmask() != 0)
        .collect();
    all.sort_by_key(|c| c.index());
    if all.is_empty() {
        return "none".into();
    }
    all.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The required capabilities missing from `effective`. CAP_SYS_ADMIN stands in for both
/// (the kernel accepts it for either), and is all there is on kernels that predate them (5.8).
pub fn missing_required(effective: u64, kernel_has_cap_bpf: bool) -> Vec<Need> {
    let admin = effective & bit(Capability::CAP_SYS_ADMIN) != 0;
    if !kernel_has_cap_bpf {
        return match admin {
            true => Vec::new(),
            false => vec![Need {
                capability: Capability::CAP_SYS_ADMIN,
                purpose: "to create eBPF maps and load tracing programs (this kernel predates \
                          CAP_BPF and CAP_PERFMON)",
            }],
        };
    }
    REQUIRED
        .into_iter()
        .filter(|need| !admin && effective & bit(need.capability) == 0)
        .collect()
}

/// The sentence for missing required capabilities.
pub fn missing_sentence(missing: &[Need]) -> String {
    let named: Vec<String> = missing
        .iter()
        .map(|n| format!("{} ({})", n.capability, n.purpose))
        .collect();
    let (list, them) = match named.as_slice() {
        [one] => (one.clone(), "it"),
        [init @ .., last] => (format!("{} and {last}", init.join(", ")), "them"),
        [] => (String::new(), "them"),
    };
    format!(
        "this process lacks {list}; run connprobe as root, or grant {them} as ambient \
         capabilities (README: Least privilege)"
    )
}

/// The one-time note when listeners older than the agent cannot be named: their owners are found
/// through other processes' `/proc/PID/fd` and `ns/net` links, which take CAP_SYS_PTRACE to read,
/// and for a non-root agent CAP_DAC_READ_SEARCH to list.
pub fn listener_scan_note(effective: u64, root: bool) -> Option<String> {
    let mut lacking = Vec::new();
    if effective & bit(Capability::CAP_SYS_PTRACE) == 0 {
        lacking.push(Capability::CAP_SYS_PTRACE);
    }
    if !root && effective & bit(Capability::CAP_DAC_READ_SEARCH) == 0 {
        lacking.push(Capability::CAP_DAC_READ_SEARCH);
    }
    if lacking.is_empty() {
        return None;
    }
    let names: Vec<String> = lacking.iter().map(ToString::to_string).collect();
    Some(format!(
        "listeners older than the agent stay unnamed: reading other processes' sockets in /proc \
         needs {}",
        names.join(" and ")
    ))
}

/// Why the DNS programs cannot be attached, if this thread lacks what attaching `cgroup_skb`
/// programs takes: CAP_NET_ADMIN (or CAP_SYS_ADMIN, which the kernel also accepts). Measured:
/// without it `bpf_link_create` fails with EPERM; loading them needs nothing more.
pub fn dns_attach_note() -> Option<String> {
    let effective = effective().ok()?;
    let allowed = bit(Capability::CAP_NET_ADMIN) | bit(Capability::CAP_SYS_ADMIN);
    (effective & allowed == 0).then(|| {
        "attaching cgroup_skb programs takes CAP_NET_ADMIN, which this process lacks".into()
    })
}

/// The sentence to report once when the backend program cannot be loaded for want of
/// CAP_NET_ADMIN (the kernel asks for it to load any cgroup_skb program); `None` when held.
pub fn backend_note() -> Option<String> {
    let held = effective().is_ok_and(|e| e & bit(Capability::CAP_NET_ADMIN) != 0);
    (!held).then(|| {
        "this process lacks CAP_NET_ADMIN (to load the cgroup_skb program that sees where a \
         DNAT on this host sent a connect): backend_ip and backend_port stay null and the \
         backend metrics stay empty"
            .to_owned()
    })
}

/// This thread's effective set.
fn effective() -> Result<u64, PrivilegeError> {
    let set =
        caps::read(None, CapSet::Effective).map_err(|e| PrivilegeError::Read(e.to_string()))?;
    Ok(mask(&set))
}

fn mask(set: &CapsHashSet) -> u64 {
    set.iter().fold(0, |m, c| m | c.bitmask())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with one sentence when this thread lacks a capability that loading needs; says once
/// what degrades when an optional one is missing.
pub fn check_at_start() -> Result<(), PrivilegeError> {
    let effective = effective()?;
    let kernel_has_cap_bpf = caps::runtime::thread_all_supported().contains(&Capability::CAP_BPF);
    let missing = missing_required(effective, kernel_has_cap_bpf);
    if !missing.is_empty() {
        return Err(PrivilegeError::Missing(missing_sentence(&missing)));
    }
    if let Some(note) = listener_scan_note(effective, is_root()) {
        tracing::warn!("{note}");
    }
    Ok(())
}

/// Gives up every capability of the calling thread, for good: ambient, inheritable, permitted
/// and effective, the bounding set too where the thread may change it (CAP_SETPCAP, i.e. root),
/// and sets no_new_privs so that no execve can grant any back. For threads that never need
/// one (the async runtime's, the log writer); errors are ignored, as a thread has nothing better
/// to do than run without the drop it could not make.
pub fn drop_in_this_thread() {
    let _ = renounce(0);
}

/// Drops everything but `keep` (a mask) from the calling thread's sets; see [`drop_in_this_thread`].
fn renounce(keep: u64) -> Result<(), PrivilegeError> {
    let fail = |e: caps::errors::CapsError| PrivilegeError::Drop(e.to_string());
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        caps::clear(None, CapSet::Bounding).map_err(fail)?;
    }
    caps::clear(None, CapSet::Ambient).map_err(fail)?;
    caps::clear(None, CapSet::Inheritable).map_err(fail)?;
    let kept: CapsHashSet = caps::all()
        .into_iter()
        .filter(|c| keep & c.bitmask() != 0)
        .collect();
    caps::clear(None, CapSet::Effective).map_err(fail)?;
    let permitted = caps::read(None, CapSet::Permitted).map_err(fail)?;
    let kept: CapsHashSet = kept.intersection(&permitted).copied().collect();
    caps::set(None, CapSet::Permitted, &kept).map_err(fail)?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(PrivilegeError::Drop(format!(
            "PR_SET_NO_NEW_PRIVS: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Once every program is attached, the loading thread gives up its capabilities too. It keeps
/// only what `bpf()` map lookups need on a kernel that refuses them without it (6.18 does not;
/// kernels before 6.5 refused every `bpf()` command without CAP_BPF while
/// `kernel.unprivileged_bpf_disabled` was set): `map_lookup_works` is tried with an empty
/// effective set to find out. Returns what was kept (a mask).
pub fn drop_after_attach(map_lookup_works: impl Fn() -> bool) -> Result<u64, PrivilegeError> {
    let bpf_cap = match caps::runtime::thread_all_supported().contains(&Capability::CAP_BPF) {
        true => Capability::CAP_BPF,
        false => Capability::CAP_SYS_ADMIN,
    };
    renounce(bit(bpf_cap))?;
    let mut kept = 0;
    if caps::has_cap(None, CapSet::Permitted, bpf_cap).unwrap_or(false) {
        if map_lookup_works() {
            caps::clear(None, CapSet::Permitted)
                .map_err(|e| PrivilegeError::Drop(e.to_string()))?;
        } else {
            caps::raise(None, CapSet::Effective, bpf_cap)
                .map_err(|e| PrivilegeError::Drop(e.to_string()))?;
            kept = bit(bpf_cap);
        }
    }
    match kept {
        0 => tracing::info!("dropped every capability: the attached programs need none"),
        _ => tracing::info!(
            "dropped every capability but {bpf_cap}: this kernel refuses bpf() map reads without it"
        ),
    }
    let others = threads_holding_capabilities(Path::new("/proc/self/task"));
    if !others.is_empty() {
        tracing::warn!(
            "threads still holding capabilities after the drop: {}",
            others.join(", ")
        );
    }
    Ok(kept)
}

/// Threads that keep their capabilities on purpose (by thread id): `connprobe watch`'s
/// launcher, which starts the watched command with the privileges connprobe was given.
static KEEPERS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Marks the calling thread as one that keeps its capabilities (it never loads, reads or
/// serves anything); the check after the drop leaves it out.
pub fn keep_in_this_thread() {
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() }.to_string();
    KEEPERS.lock().unwrap_or_else(|e| e.into_inner()).push(me);
}

/// Threads other than the calling one (and the keepers) that hold a capability: `TID (comm):
/// CapPrm=...`.
fn threads_holding_capabilities(tasks: &Path) -> Vec<String> {
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() }.to_string();
    let Ok(entries) = fs::read_dir(tasks) else {
        return Vec::new();
    };
    let keepers = KEEPERS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    entries
        .flatten()
        .filter(|task| task.file_name().to_str() != Some(me.as_str()))
        .filter(|task| {
            let tid = task.file_name();
            !keepers.iter().any(|k| Some(k.as_str()) == tid.to_str())
        })
        .filter_map(|task| {
            let status = fs::read_to_string(task.path().join("status")).ok()?;
            let caps = ThreadCapabilities::from_status(&status)?;
            let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            caps.holds_any().then(|| {
                format!(
                    "{} ({}): {}",
                    task.file_name().to_string_lossy(),
                    comm.trim_end(),
                    names(caps.permitted | caps.ambient)
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Excerpt of a real /proc/PID/status of an agent started with
    /// `setpriv --reuid 65534 --ambient-caps +bpf,+perfmon ...`, before its drop.
    const STATUS: &str = "Name:\tconnprobe
Umask:\t0022
State:\tS (sleeping)
Uid:\t65534\t65534\t65534\t65534
CapInh:\t000000c000000000
CapPrm:\t000000c000000000
CapEff:\t000000c000000000
CapBnd:\t000001fffeffffff
CapAmb:\t000000c000000000
NoNewPrivs:\t0
Seccomp:\t0
";

    #[test]
    fn status_lines_parse() {
        let caps = ThreadCapabilities::from_status(STATUS).unwrap();
        let bpf_perfmon = bit(Capability::CAP_BPF) | bit(Capability::CAP_PERFMON);
        assert_eq!(caps.effective, bpf_perfmon);
        assert_eq!(caps.permitted, bpf_perfmon);
        assert_eq!(caps.ambient, bpf_perfmon);
        assert_eq!(caps.inheritable, bpf_perfmon);
        assert_eq!(caps.bounding, 0x1fffeffffff);
        assert!(!caps.no_new_privs);
        assert!(caps.holds_any());
        assert_eq!(names(caps.effective), "CAP_PERFMON, CAP_BPF");
        assert_eq!(names(0), "none");

        let dropped = STATUS
            .replace("000000c000000000", "0000000000000000")
            .replace("NoNewPrivs:\t0", "NoNewPrivs:\t1");
        let caps = ThreadCapabilities::from_status(&dropped).unwrap();
        assert!(!caps.holds_any());
        assert!(caps.no_new_privs);
        assert_eq!(
            ThreadCapabilities::from_status("Name:\tx\nCapEff:\tzz\n"),
            None
        );
    }

    #[test]
    fn required_capabilities() {
        let bpf = bit(Capability::CAP_BPF);
        let perfmon = bit(Capability::CAP_PERFMON);
        let admin = bit(Capability::CAP_SYS_ADMIN);
        assert!(missing_required(bpf | perfmon, true).is_empty());
        assert_eq!(missing_required(perfmon, true), vec![REQUIRED[0]]);
        assert_eq!(missing_required(0, true), REQUIRED.to_vec());
        // The kernel accepts CAP_SYS_ADMIN for either, and before 5.8 it is the only way.
        assert!(missing_required(admin, true).is_empty());
        assert!(missing_required(admin, false).is_empty());
        assert_eq!(
            missing_required(bpf | perfmon, false)[0].capability,
            Capability::CAP_SYS_ADMIN
        );
    }

    #[test]
    fn one_sentence_names_each_missing_capability_and_its_purpose() {
        assert_eq!(
            missing_sentence(&REQUIRED),
            "this process lacks CAP_BPF (to create eBPF maps and load programs) and CAP_PERFMON \
             (to load tracing programs, which read kernel memory); run connprobe as root, or \
             grant them as ambient capabilities (README: Least privilege)"
        );
        assert_eq!(
            missing_sentence(&REQUIRED[1..]),
            "this process lacks CAP_PERFMON (to load tracing programs, which read kernel \
             memory); run connprobe as root, or grant it as ambient capabilities (README: Least \
             privilege)"
        );
    }

    #[test]
    fn listener_scan_note_names_what_is_missing() {
        let ptrace = bit(Capability::CAP_SYS_PTRACE);
        let dac = bit(Capability::CAP_DAC_READ_SEARCH);
        assert_eq!(listener_scan_note(ptrace, true), None);
        assert_eq!(listener_scan_note(ptrace | dac, false), None);
        assert_eq!(
            listener_scan_note(0, true).unwrap(),
            "listeners older than the agent stay unnamed: reading other processes' sockets in \
             /proc needs CAP_SYS_PTRACE"
        );
        assert_eq!(
            listener_scan_note(0, false).unwrap(),
            "listeners older than the agent stay unnamed: reading other processes' sockets in \
             /proc needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH"
        );
        assert!(
            listener_scan_note(ptrace, false)
                .unwrap()
                .ends_with("needs CAP_DAC_READ_SEARCH")
        );
    }

    /// A thread that renounces holds nothing afterwards, and the others keep theirs.
    #[test]
    fn a_thread_drops_only_its_own_capabilities() {
        let before = ThreadCapabilities::from_status(
            &fs::read_to_string("/proc/thread-self/status").unwrap(),
        )
        .unwrap();
        let after = std::thread::spawn(|| {
            drop_in_this_thread();
            ThreadCapabilities::from_status(
                &fs::read_to_string("/proc/thread-self/status").unwrap(),
            )
            .unwrap()
        })
        .join()
        .unwrap();
        assert!(!after.holds_any(), "{after:?}");
        assert!(after.no_new_privs);
        let still = ThreadCapabilities::from_status(
            &fs::read_to_string("/proc/thread-self/status").unwrap(),
        )
        .unwrap();
        assert_eq!(still, before);
    }
}
