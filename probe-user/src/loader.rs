//! Loads the eBPF object with this kernel's offsets and attaches one program per hook family:
//! the BTF tracepoint where the kernel has it, the classic tracepoint otherwise.
use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, RawTracePoint, TracePoint,
    },
};
use probe_common::{
    CONNECTS_MAP, COUNTERS_MAP, DNS_EVENTS_MAP, DNS_PORTS_GLOBAL, DROP_COUNTS_MAP,
    DROP_FILTER_GLOBAL, DnsPorts, DropKey, EVENTS_MAP, KernelOffsets, LISTENERS_MAP, ListenerKey,
    ListenerRecord, OFFSETS_GLOBAL, RECORD_STORE_GLOBAL, RecordStore, SOCKETS_MAP,
    SOCKETS_PER_CPU_MAP, WAKEUP_BYTES_GLOBAL,
};

use crate::{
    btf::Btf,
    decode::{DropReasons, ResetReasons},
    listeners,
    offsets::{self, Hook, OffsetsError, Tracefs},
    privileges::{self, PrivilegeError},
};

/// The eBPF object built by build.rs (probe-ebpf for bpfel-unknown-none).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    #[error(
        "this kernel exposes no BTF at {0} (it needs CONFIG_DEBUG_INFO_BTF=y); connprobe reads \
         kernel struct layouts from it"
    )]
    NoBtf(String),
    #[error(transparent)]
    Offsets(#[from] OffsetsError),
    #[error("--ring-buffer-bytes must be a power of two of at least 4096, not {0}")]
    RingSize(u32),
    #[error("--max-sockets must be at least 1")]
    MaxSockets,
    #[error(
        "cannot count this machine's possible CPUs in {0} ({1}); --socket-records lru-per-cpu \
         sizes its map by them"
    )]
    PossibleCpus(&'static str, #[source] std::io::Error),
    #[error(
        "--max-sockets {max_sockets} on each of {cpus} possible CPUs is more than an LRU hash \
         holds (2^31 entries); lower --max-sockets"
    )]
    PerCpuSockets { max_sockets: u32, cpus: usize },
    #[error("the kernel refused connprobe's eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the kernel refused program {program} for tracepoint {tracepoint}: {source}")]
    Program {
        program: String,
        tracepoint: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("the eBPF object has no {0}; it does not match this connprobe")]
    Missing(String),
    #[error("cannot read the eBPF programs' log: {0}")]
    Logger(#[source] aya_log::Error),
    #[error("cannot open map {0}: {1}")]
    Map(&'static str, #[source] Box<aya::maps::MapError>),
}

/// Which kind of tracepoint to attach (`--hooks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HookMode {
    /// BTF tracepoints where the kernel has them, classic tracepoints otherwise.
    Auto,
    /// BTF tracepoints only (tp_btf): the cheapest, and no tracefs needed.
    Btf,
    /// Classic tracepoints only (needs tracefs; the agent mounts it if missing).
    Classic,
    /// Empty BTF programs on the same hooks, emitting nothing: the benchmark's floor.
    #[value(hide = true)]
    Empty,
    /// BTF tracepoints, with the programs written for older kernels' tracepoints where a hook
    /// has them (no `err` in tcp_retransmit_skb, no `reason` in tcp_send_reset): lets the tests
    /// check those programs on a newer kernel.
    #[value(hide = true)]
    BtfOlder,
}

/// Where the programs keep the per-socket records (`--socket-records`, hidden: a knob for the
/// benchmark to compare the stores' costs on the BTF path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketRecords {
    /// In the sockets themselves (socket storage) when every hook runs on a BTF tracepoint, in
    /// the LRU hash of --max-sockets otherwise.
    Auto,
    /// Always in the LRU hash of --max-sockets, as on classic tracepoints (`tcp_destroy_sock`
    /// attached to empty it).
    Lru,
    /// Always in an LRU hash with an LRU list per CPU (`BPF_F_NO_COMMON_LRU`), sized so that
    /// each possible CPU holds --max-sockets (`tcp_destroy_sock` attached to empty it).
    LruPerCpu,
}

/// How one hook is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    Btf,
    /// The BTF program for a kernel whose tracepoint has fewer arguments (no `err` in
    /// `tcp_retransmit_skb` before 6.13, no `reason` in `tcp_send_reset` before 6.10).
    BtfOlder,
    Classic,
    /// Empty BTF programs (benchmark floor).
    Empty,
}

impl Attachment {
    pub fn as_str(self) -> &'static str {
        match self {
            Attachment::Btf => "btf",
            Attachment::BtfOlder => "btf-older",
            Attachment::Classic => "classic",
            Attachment::Empty => "empty",
        }
    }
}

pub struct LoaderConfig {
    pub hooks: HookMode,
    pub ring_buffer_bytes: u32,
    pub max_sockets: u32,
    /// Where the per-socket records live (`--socket-records`).
    pub socket_records: SocketRecords,
    /// Trace packet drops (`kfree_skb`); off with `--no-drops`.
    pub drops: bool,
    /// The DNS ports to watch; `None` attaches no DNS programs (`--no-dns`).
    pub dns_ports: Option<DnsPorts>,
}

/// The maps the agent reads, taken out of the object before the programs are attached.
pub struct KernelMaps {
    pub events: RingBuf<MapData>,
    pub counters: PerCpuArray<MapData, u64>,
    /// The programs' own log (kernel read failures). Keep it alive and drained: dropping it
    /// closes the map the programs write their logs to.
    pub logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    /// Names of this kernel's reset reasons, for the decoder (empty where the kernel has none).
    pub reset_reasons: ResetReasons,
    /// Names of this kernel's drop reasons, for the decoder (empty where the kernel has none).
    pub drop_reasons: DropReasons,
    /// Dropped data segments counted per connection and reason (see `samplers::drop_counts`).
    pub drop_counts: PerCpuHashMap<MapData, DropKey, u64>,
    /// The listening sockets the programs and the start-up scan know (see `samplers::netns`).
    pub listeners: HashMap<MapData, ListenerKey, ListenerRecord>,
    /// The DNS packets' ring buffer (nothing arrives in it when the DNS programs are not
    /// attached).
    pub dns_events: RingBuf<MapData>,
}

/// Loaded and attached programs. Dropping this detaches every program.
pub struct Probes {
    _ebpf: Ebpf,
    pub plan: Vec<(Hook, Attachment)>,
    /// Features this kernel lacks, one sentence each, to report once at start.
    pub missing: Vec<String>,
    /// How the DNS programs are attached, if they are (e.g. `cgroup_skb on /sys/fs/cgroup`).
    pub dns: Option<String>,
}

/// Checks privileges and kernel support, loads the object and attaches every hook.
/// `before_attach` runs once the maps exist but before any program fires (start consumers there).
/// Privileged: run it on the thread that holds the capabilities (see `privileges`).
pub fn load_and_attach(
    config: &LoaderConfig,
    mut before_attach: impl FnMut(KernelMaps),
) -> Result<Probes, LoadError> {
    privileges::check_at_start()?;
    if !config.ring_buffer_bytes.is_power_of_two() || config.ring_buffer_bytes < 4096 {
        return Err(LoadError::RingSize(config.ring_buffer_bytes));
    }
    if config.max_sockets == 0 {
        return Err(LoadError::MaxSockets);
    }
    if !Path::new(Btf::VMLINUX).exists() {
        return Err(LoadError::NoBtf(Btf::VMLINUX.into()));
    }
    raise_memlock();
    let btf = Btf::from_file(Btf::VMLINUX).map_err(OffsetsError::from)?;
    let struct_offsets = offsets::struct_offsets(&btf)?;
    let aya_btf = aya::Btf::from_sys_fs().map_err(|_| LoadError::NoBtf(Btf::VMLINUX.into()))?;

    let reset_reasons = ResetReasons::from_btf(&btf);
    let drop_reasons = DropReasons::from_btf(&btf);
    let drops = config.drops && !drop_reasons.is_empty();
    let plan = plan_hooks(&btf, config.hooks, drops);
    let mut maps_handed_over = false;
    let mut attempt = |plan: Vec<(Hook, Attachment)>| {
        try_load(
            config,
            &aya_btf,
            struct_offsets,
            plan,
            (reset_reasons.clone(), drop_reasons.clone()),
            &mut |maps| {
                maps_handed_over = true;
                before_attach(maps)
            },
        )
    };
    let result = match attempt(plan.clone()) {
        Ok(probes) => Ok(probes),
        Err(e @ LoadError::Program { .. })
            if config.hooks == HookMode::Auto
                && plan
                    .iter()
                    .any(|(_, a)| matches!(a, Attachment::Btf | Attachment::BtfOlder)) =>
        {
            tracing::warn!("{e}; falling back to classic tracepoints");
            let classic = Hook::ALL
                .into_iter()
                .filter(|h| drops || *h != Hook::Drop)
                .map(|h| (h, Attachment::Classic))
                .collect();
            attempt(classic)
        }
        Err(e) => Err(e),
    };
    result.map(|mut probes| {
        if config.drops && drop_reasons.is_empty() {
            probes.missing.push(format!(
                "this kernel ({}) gives no reasons for the packets it drops (that needs Linux \
                 5.17): drops are not traced",
                kernel_release()
            ));
        }
        probes
    })
}

/// BTF tracepoints where the kernel's BTF has them with the arguments the programs read; the
/// drop hook only with `drops`.
fn plan_hooks(btf: &Btf, mode: HookMode, drops: bool) -> Vec<(Hook, Attachment)> {
    Hook::ALL
        .iter()
        .filter(|&&hook| drops || hook != Hook::Drop)
        .map(|&hook| {
            let args = btf.tracepoint_args(hook.tracepoint().1).unwrap_or(0);
            let btf_program = if args >= hook.btf_args_needed() {
                Some(Attachment::Btf)
            } else {
                hook.btf_older_args()
                    .filter(|&older| args >= older)
                    .map(|_| Attachment::BtfOlder)
            };
            let how = match (mode, btf_program) {
                (HookMode::Classic, _) => Attachment::Classic,
                (HookMode::Empty, _) => Attachment::Empty,
                (HookMode::BtfOlder, _) if hook.btf_older_args().is_some() => Attachment::BtfOlder,
                (HookMode::BtfOlder, _) => Attachment::Btf,
                (HookMode::Btf | HookMode::Auto, Some(program)) => program,
                (HookMode::Btf, None) => Attachment::Btf,
                (HookMode::Auto, None) => Attachment::Classic,
            };
            (hook, how)
        })
        .collect()
}

fn try_load(
    config: &LoaderConfig,
    aya_btf: &aya::Btf,
    mut offsets: KernelOffsets,
    plan: Vec<(Hook, Attachment)>,
    (mut reset_reasons, drop_reasons): (ResetReasons, DropReasons),
    before_attach: &mut dyn FnMut(KernelMaps),
) -> Result<Probes, LoadError> {
    let needs_tracefs = plan
        .iter()
        .any(|(hook, how)| *how == Attachment::Classic && !hook.fallback_is_raw());
    let tracefs = if needs_tracefs {
        let tracefs = Tracefs::find_or_mount()?;
        for (hook, how) in &plan {
            if *how == Attachment::Classic {
                offsets::add_classic_fields(&tracefs, *hook, &mut offsets)?;
            }
        }
        Some(tracefs)
    } else {
        None
    };
    let sent_reset_reasons = plan.iter().any(|(hook, how)| {
        *hook == Hook::TcpSendReset
            && (*how == Attachment::Btf
                || (*how == Attachment::Classic && offsets.has_reset_reason != 0))
    });
    let mut missing = Vec::new();
    if reset_reasons.is_empty() {
        // The same rework of `tcp_send_reset` (Linux 6.10) added its reason and made it fire for
        // resets the kernel sends without a socket; the reason enum's presence stands for both.
        missing.push(format!(
            "this kernel ({}) gives no reason for the resets it sends and does not trace the \
             resets sent without a socket, e.g. to a SYN for a port nobody listens on (both need \
             Linux 6.10): reset_reason stays null and such resets are not logged",
            kernel_release()
        ));
    } else if !sent_reset_reasons {
        missing.push(
            "the tcp_send_reset program attached does not read the kernel's reset reasons: \
             reset_reason stays null"
                .to_owned(),
        );
        reset_reasons = ResetReasons::default();
    }
    let drop_program = plan
        .iter()
        .find(|(hook, _)| *hook == Hook::Drop)
        .map(|(_, how)| *how);
    let receiving_socket = match drop_program {
        Some(Attachment::Btf) => true,
        Some(Attachment::Classic) => offsets.has_drop_rx_sk != 0,
        _ => false,
    };
    if matches!(
        drop_program,
        Some(Attachment::Btf | Attachment::BtfOlder | Attachment::Classic)
    ) && !receiving_socket
    {
        missing.push(format!(
            "this kernel ({}) does not say which socket received a dropped packet (rx_sk needs \
             Linux 6.11): drops on the input path are matched to connections by their addresses",
            kernel_release()
        ));
    }

    // Wake the agent once an eighth of the ring is waiting; the reader also polls every
    // POLL_INTERVAL, so a quiet host still sees its events promptly.
    let wakeup_bytes = u64::from(config.ring_buffer_bytes / 8);
    // Socket storage holds the per-socket records when every program can reach it (BTF
    // tracepoints) and no LRU hash was asked for; then nothing needs to forget a socket at
    // tcp_destroy_sock.
    let store = record_store(&plan, config.socket_records);
    tracing::debug!("per-socket records in {store:?}");
    // Only the store in use gets its size; the others get one entry (an LRU hash preallocates
    // every entry: 65,536 unused ones would be 8 MiB of kernel memory charged to the agent).
    let (shared_entries, per_cpu_entries) = match store {
        RecordStore::PerCpuLruHash => (1, per_cpu_lru_entries(config.max_sockets)?),
        RecordStore::LruHash => (config.max_sockets, 1),
        RecordStore::SocketStorage => (1, 1),
    };
    let mut ebpf = EbpfLoader::new()
        .override_global(OFFSETS_GLOBAL, &offsets, true)
        .override_global(WAKEUP_BYTES_GLOBAL, &wakeup_bytes, true)
        .override_global(RECORD_STORE_GLOBAL, &(store as u32), true)
        .override_global(DROP_FILTER_GLOBAL, &drop_reasons.filter(), true)
        .override_global(
            DNS_PORTS_GLOBAL,
            &config.dns_ports.unwrap_or_default(),
            true,
        )
        .map_max_entries(EVENTS_MAP, config.ring_buffer_bytes)
        .map_max_entries(SOCKETS_MAP, shared_entries)
        .map_max_entries(SOCKETS_PER_CPU_MAP, per_cpu_entries)
        .map_max_entries(CONNECTS_MAP, config.max_sockets)
        .load(OBJECT)
        .map_err(|e| LoadError::Load(Box::new(e)))?;

    let events = ebpf
        .take_map(EVENTS_MAP)
        .ok_or_else(|| LoadError::Missing(EVENTS_MAP.into()))?;
    let events = RingBuf::try_from(events).map_err(|e| LoadError::Map(EVENTS_MAP, Box::new(e)))?;
    let counters = ebpf
        .take_map(COUNTERS_MAP)
        .ok_or_else(|| LoadError::Missing(COUNTERS_MAP.into()))?;
    let counters =
        PerCpuArray::try_from(counters).map_err(|e| LoadError::Map(COUNTERS_MAP, Box::new(e)))?;
    let drop_counts = ebpf
        .take_map(DROP_COUNTS_MAP)
        .ok_or_else(|| LoadError::Missing(DROP_COUNTS_MAP.into()))?;
    let drop_counts = PerCpuHashMap::try_from(drop_counts)
        .map_err(|e| LoadError::Map(DROP_COUNTS_MAP, Box::new(e)))?;
    let dns_events = ebpf
        .take_map(DNS_EVENTS_MAP)
        .ok_or_else(|| LoadError::Missing(DNS_EVENTS_MAP.into()))?;
    let dns_events =
        RingBuf::try_from(dns_events).map_err(|e| LoadError::Map(DNS_EVENTS_MAP, Box::new(e)))?;
    let logger = aya_log::EbpfLogger::init(&mut ebpf).map_err(LoadError::Logger)?;
    add_existing_listeners(&mut ebpf)?;
    let listeners = ebpf
        .take_map(LISTENERS_MAP)
        .ok_or_else(|| LoadError::Missing(LISTENERS_MAP.into()))?;
    let listeners =
        HashMap::try_from(listeners).map_err(|e| LoadError::Map(LISTENERS_MAP, Box::new(e)))?;
    before_attach(KernelMaps {
        events,
        counters,
        logger,
        reset_reasons,
        drop_reasons,
        drop_counts,
        listeners,
        dns_events,
    });

    let plan: Vec<(Hook, Attachment)> = plan
        .into_iter()
        .filter(|(hook, _)| !(store == RecordStore::SocketStorage && *hook == Hook::TcpDestroy))
        .collect();
    for (hook, how) in &plan {
        let (category, name) = hook.tracepoint();
        let suffix = match how {
            Attachment::Btf => "btf",
            Attachment::BtfOlder => "btf_older",
            Attachment::Classic => "tp",
            Attachment::Empty => "empty",
        };
        let program = format!("{}_{suffix}", hook.program_stem());
        let fail = |source| LoadError::Program {
            program: program.clone(),
            tracepoint: format!("{category}/{name}"),
            source: Box::new(source),
        };
        let prog = ebpf
            .program_mut(&program)
            .ok_or_else(|| LoadError::Missing(program.clone()))?;
        match how {
            Attachment::Btf | Attachment::BtfOlder | Attachment::Empty => {
                let prog: &mut BtfTracePoint = prog.try_into().map_err(fail)?;
                prog.load(name, aya_btf).map_err(fail)?;
                prog.attach().map_err(fail)?;
            }
            Attachment::Classic if hook.fallback_is_raw() => {
                let prog: &mut RawTracePoint = prog.try_into().map_err(fail)?;
                prog.load().map_err(fail)?;
                prog.attach(name).map_err(fail)?;
            }
            Attachment::Classic => {
                let prog: &mut TracePoint = prog.try_into().map_err(fail)?;
                prog.load().map_err(fail)?;
                prog.attach(category, name).map_err(fail)?;
            }
        }
    }
    if !plan.iter().any(|(_, how)| *how == Attachment::Empty) {
        match attach_backend(&mut ebpf) {
            Ok(()) => tracing::debug!("backend program attached to the cgroup v2 root"),
            Err(why) => missing.push(why),
        }
    }
    // Attached programs do not depend on the mount: a tracefs mounted here goes now, while the
    // agent still holds the capability to unmount it.
    drop(tracefs);
    let dns = match config.dns_ports {
        Some(_) if config.hooks != HookMode::Empty => match attach_dns(&mut ebpf) {
            Ok(how) => {
                if how.contains("dns_egress_anonymous") {
                    missing.push(
                        "DNS queries sent over UDP name no process: cgroup_skb programs may ask \
                         for the current task from Linux 6.10 on (their pid and comm stay null)"
                            .into(),
                    );
                } else if how.contains("dns_egress_pid") {
                    missing.push(
                        "DNS queries sent over UDP name their process's pid, not its command \
                         name: this kernel lets cgroup_skb programs ask for the first only; the \
                         name is read from /proc and stays empty for a process gone by then"
                            .into(),
                    );
                }
                Some(how)
            }
            Err(why) => {
                missing.push(format!("DNS is not watched: {why}"));
                None
            }
        },
        _ => None,
    };
    Ok(Probes {
        _ebpf: ebpf,
        plan,
        missing,
        dns,
    })
}

/// The cgroup v2 hierarchy's mount point, from a `/proc/mounts` text.
pub fn cgroup2_mount(mounts: &str) -> Option<&str> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then_some(dir)
    })
}

/// Attaches the DNS programs to the root of the cgroup v2 hierarchy, where they see the packets
/// of every socket on the host, in every network namespace. Egress names the sending process
/// where the kernel lets cgroup_skb programs ask (its pid from Linux 6.10 on, its name on later
/// kernels, 6.18 here), and goes without it elsewhere. Any failure is one sentence: DNS alone goes missing.
fn attach_dns(ebpf: &mut Ebpf) -> Result<String, String> {
    if let Some(note) = privileges::dns_attach_note() {
        return Err(note);
    }
    let mounts = std::fs::read_to_string("/proc/mounts")
        .map_err(|e| format!("cannot read /proc/mounts ({e})"))?;
    let root = cgroup2_mount(&mounts)
        .ok_or("no cgroup v2 hierarchy is mounted (cgroup_skb programs attach to one)")?
        .to_owned();
    let cgroup = std::fs::File::open(&root).map_err(|e| format!("cannot open {root} ({e})"))?;
    let attach = |ebpf: &mut Ebpf, name: &str, kind: CgroupSkbAttachType| {
        let prog: &mut CgroupSkb = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("the eBPF object has no {name}"))?
            .try_into()
            .map_err(|e| format!("{name}: {e}"))?;
        prog.load().map_err(|e| {
            let full = e.to_string();
            tracing::debug!("loading {name}: {full}");
            // The verifier's log goes to the debug log; the sentence keeps its first line.
            let short = full.split(". Verifier output").next().unwrap_or(&full);
            format!("the kernel refused {name} ({short})")
        })?;
        // A bpf_link (Linux 5.7+, what aya uses there) takes no attach flags and always shares
        // the cgroup with other programs: `Single` passes none. (Multiple would be EINVAL.)
        prog.attach(&cgroup, kind, CgroupAttachMode::Single)
            .map_err(|e| {
                let cause = std::error::Error::source(&e).map(|s| format!(": {s}"));
                format!(
                    "cannot attach {name} to {root} ({e}{})",
                    cause.unwrap_or_default()
                )
            })?;
        Ok::<_, String>(())
    };
    attach(ebpf, "dns_ingress", CgroupSkbAttachType::Ingress)?;
    let egress = match attach(ebpf, "dns_egress", CgroupSkbAttachType::Egress) {
        Ok(()) => "dns_egress",
        Err(e) => {
            tracing::debug!("{e}; trying the egress program with the sending process's pid only");
            match attach(ebpf, "dns_egress_pid", CgroupSkbAttachType::Egress) {
                Ok(()) => "dns_egress_pid",
                Err(e) => {
                    tracing::debug!("{e}; trying the egress program without the sending process");
                    attach(ebpf, "dns_egress_anonymous", CgroupSkbAttachType::Egress)?;
                    "dns_egress_anonymous"
                }
            }
        }
    };
    Ok(format!("cgroup_skb dns_ingress+{egress} on {root}"))
}

/// The program that reports where a DNAT sent each connect's SYN (probe-ebpf `backend`), on
/// egress of the cgroup v2 root: every socket of every network namespace is below it. Optional:
/// the reason it is not attached is one sentence for the start-up report.
fn attach_backend(ebpf: &mut Ebpf) -> Result<(), String> {
    if let Some(note) = privileges::backend_note() {
        return Err(note);
    }
    let unattached = |why: String| {
        format!(
            "the backend program is not attached ({why}): backend_ip and backend_port stay null"
        )
    };
    let workloads = crate::workload::Workloads::for_this_host().map_err(unattached)?;
    let root = std::fs::File::open(workloads.root())
        .map_err(|e| unattached(format!("cannot open {}: {e}", workloads.root().display())))?;
    let prog: &mut CgroupSkb = ebpf
        .program_mut(BACKEND_PROGRAM)
        .ok_or_else(|| unattached(format!("the eBPF object has no {BACKEND_PROGRAM}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| unattached(e.to_string()))?;
    prog.load()
        .map_err(|e| unattached(format!("the kernel refused it: {e}")))?;
    // A bpf_link (Linux 5.7 and later) always shares the hook with other programs (another
    // agent's, or systemd's); the kernel refuses the legacy ALLOW_MULTI flag on a link.
    prog.attach(root, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
        .map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|c| format!(": {c}"))
                .unwrap_or_default();
            unattached(format!("cannot attach it: {e}{cause}"))
        })?;
    Ok(())
}

/// The cgroup_skb program in probe-ebpf `backend`.
const BACKEND_PROGRAM: &str = "backend_egress";

/// Where the per-socket records live. Socket storage only where asked (`auto`) and where every
/// program can reach it: only BTF programs can, and every program must use the same store. The
/// benchmark's empty programs count as BTF, so that the floor attaches the same hooks as the
/// default set (no `tcp_destroy_sock`); with an LRU hash asked for, it attaches
/// `tcp_destroy_sock` too, as that configuration does.
fn record_store(plan: &[(Hook, Attachment)], wanted: SocketRecords) -> RecordStore {
    let all_btf = plan.iter().all(|(_, how)| {
        matches!(
            how,
            Attachment::Btf | Attachment::BtfOlder | Attachment::Empty
        )
    });
    match wanted {
        SocketRecords::Auto if all_btf => RecordStore::SocketStorage,
        SocketRecords::Auto | SocketRecords::Lru => RecordStore::LruHash,
        SocketRecords::LruPerCpu => RecordStore::PerCpuLruHash,
    }
}

/// The size of the per-CPU LRU hash: the kernel splits an LRU hash with a list per CPU evenly
/// over the possible CPUs and an insert evicts from its own CPU's share only
/// (`bpf_percpu_lru_populate`, `bpf_percpu_lru_pop_free`), so each possible CPU gets
/// `max_sockets`.
fn per_cpu_lru_entries(max_sockets: u32) -> Result<u32, LoadError> {
    let cpus = aya::util::nr_cpus().map_err(|(path, e)| LoadError::PossibleCpus(path, e))?;
    u32::try_from(cpus)
        .ok()
        .and_then(|n| max_sockets.checked_mul(n))
        .filter(|&entries| entries <= 1 << 31)
        .ok_or(LoadError::PerCpuSockets { max_sockets, cpus })
}

/// Listeners opened before the agent: their owners go into the map the programs look accepted
/// connections up in, before any program runs.
fn add_existing_listeners(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    let map = ebpf
        .map_mut(LISTENERS_MAP)
        .ok_or_else(|| LoadError::Missing(LISTENERS_MAP.into()))?;
    let mut map: HashMap<_, ListenerKey, ListenerRecord> =
        HashMap::try_from(map).map_err(|e| LoadError::Map(LISTENERS_MAP, Box::new(e)))?;
    let found = listeners::scan(Path::new("/proc"));
    for listener in &found {
        let (key, record) = listener.map_entry();
        map.insert(key, record, 0)
            .map_err(|e| LoadError::Map(LISTENERS_MAP, Box::new(e)))?;
    }
    tracing::debug!("{} listening sockets found in /proc", found.len());
    Ok(())
}

/// `uname -r` (from the syscall: /proc/sys may be hidden, e.g. by systemd's ProcSubset=pid).
fn kernel_release() -> String {
    // SAFETY: uname fills a zeroed utsname; its fields are NUL-terminated.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut name) } != 0 {
        return "unknown".into();
    }
    // SAFETY: the kernel NUL-terminates release within the array.
    unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones to the cgroup. Raise the
/// limit where allowed and carry on where not: it is never fatal.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); fine on kernels that charge BPF memory to the \
             cgroup (5.11 and later)",
            std::io::Error::last_os_error()
        );
    }
}

/// Whether a `bpf()` lookup in the counters map works (see `privileges::drop_after_attach`).
pub fn counters_readable(counters: &PerCpuArray<MapData, u64>) -> bool {
    counters
        .get(&(probe_common::Counter::ProducedConnect as u32), 0)
        .is_ok()
}

/// Sums a per-CPU counter.
pub fn read_counter(counters: &PerCpuArray<MapData, u64>, counter: probe_common::Counter) -> u64 {
    counters
        .get(&(counter as u32), 0)
        .map(|per_cpu| per_cpu.iter().sum())
        .unwrap_or(0)
}

/// The agent's own programs, by the `/proc/self/fdinfo` entries of their file descriptors, for
/// the kernel's count of their skipped runs. A tracing program does not run while a BPF program
/// is already running on its CPU: on a BTF tracepoint only while the same program is (a hook hit
/// again from an interrupt), on a classic tracepoint while any kprobe or tracepoint program or a
/// map syscall's critical section is. The kernel counts each skip as a `recursion_misses` of the
/// program (Linux 5.12 and later); an event those runs would have made is lost unseen otherwise.
#[derive(Debug, Default)]
pub struct ProgramRuns {
    fdinfo: Vec<std::path::PathBuf>,
}

impl ProgramRuns {
    /// Finds the program file descriptors this process holds (once, after attaching: reading
    /// every descriptor's fdinfo each second would cost more than it tells).
    pub fn find() -> Self {
        let mut seen = std::collections::BTreeSet::new();
        let mut fdinfo = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc/self/fdinfo") else {
            return Self::default();
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            // Links name their program too but carry no run counts: only `prog_type` entries.
            if !text.lines().any(|l| l.starts_with("prog_type:")) {
                continue;
            }
            if let Some(id) = fdinfo_field(&text, "prog_id:")
                && seen.insert(id)
            {
                fdinfo.push(path);
            }
        }
        Self { fdinfo }
    }

    /// How many programs were found.
    pub fn programs(&self) -> usize {
        self.fdinfo.len()
    }

    /// Runs the kernel skipped, summed over the programs (0 where it does not count them).
    pub fn missed(&self) -> u64 {
        self.fdinfo
            .iter()
            .filter_map(|path| std::fs::read_to_string(path).ok())
            .filter(|text| text.lines().any(|l| l.starts_with("prog_type:")))
            .filter_map(|text| fdinfo_field(&text, "recursion_misses:"))
            .sum()
    }
}

/// A numeric `name:\tvalue` line of an fdinfo file.
fn fdinfo_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod program_runs_tests {
    use super::*;

    #[test]
    fn fdinfo_fields_are_read_by_name() {
        let text = "pos:\t0\nflags:\t02000002\nprog_type:\t26\nprog_id:\t41\n\
                    run_time_ns:\t0\nrun_cnt:\t0\nrecursion_misses:\t3\nverified_insns:\t120\n";
        assert_eq!(fdinfo_field(text, "prog_id:"), Some(41));
        assert_eq!(fdinfo_field(text, "recursion_misses:"), Some(3));
        assert_eq!(fdinfo_field(text, "link_id:"), None);
    }

    #[test]
    fn a_process_without_programs_misses_nothing() {
        let runs = ProgramRuns::find();
        assert_eq!(runs.programs(), 0);
        assert_eq!(runs.missed(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_stay_in_socket_storage_only_where_asked_and_every_program_reaches_it() {
        use Attachment::{Btf, Classic, Empty};
        let btf = [(Hook::TcpState, Btf), (Hook::TcpDestroy, Btf)];
        let mixed = [(Hook::TcpState, Btf), (Hook::TcpDestroy, Classic)];
        let floor = [(Hook::TcpState, Empty), (Hook::TcpDestroy, Empty)];
        assert_eq!(
            record_store(&btf, SocketRecords::Auto),
            RecordStore::SocketStorage
        );
        assert_eq!(
            record_store(&floor, SocketRecords::Auto),
            RecordStore::SocketStorage
        );
        assert_eq!(
            record_store(&mixed, SocketRecords::Auto),
            RecordStore::LruHash
        );
        for plan in [&btf, &mixed, &floor] {
            assert_eq!(record_store(plan, SocketRecords::Lru), RecordStore::LruHash);
            assert_eq!(
                record_store(plan, SocketRecords::LruPerCpu),
                RecordStore::PerCpuLruHash
            );
        }
    }

    #[test]
    fn the_per_cpu_lru_hash_holds_max_sockets_on_each_possible_cpu() {
        let cpus = aya::util::nr_cpus().unwrap() as u32;
        assert_eq!(per_cpu_lru_entries(1_000).unwrap(), 1_000 * cpus);
        assert!(matches!(
            per_cpu_lru_entries(u32::MAX),
            Err(LoadError::PerCpuSockets { .. })
        ));
    }

    #[test]
    fn the_cgroup_v2_mount_is_found_in_a_hybrid_layout() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs ro,nosuid 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n";
        assert_eq!(cgroup2_mount(mounts), Some("/sys/fs/cgroup/unified"));
        assert_eq!(
            cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }
}
