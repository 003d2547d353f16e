//! Offsets the eBPF programs need, read from the running kernel: struct fields from BTF,
//! classic tracepoint fields from tracefs `format` files. Nothing here is a hard-coded layout.
use std::{
    collections::HashMap,
    ffi::CString,
    path::{Path, PathBuf},
};

use probe_common::KernelOffsets;

use crate::btf::{Btf, BtfError};

#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(
        "the kernel's {what} is {actual} bytes where connprobe reads {expected}; this kernel's \
         layout is not supported"
    )]
    Size {
        what: String,
        actual: u32,
        expected: u32,
    },
    #[error("the kernel has no tracepoint {0} (looked in {1}); connprobe needs it to trace TCP")]
    NoTracepoint(String, String),
    #[error("tracepoint {0} has no field {1}; this kernel's tracepoint is not supported")]
    NoField(String, String),
    #[error(
        "tracefs is not mounted and mounting it at {path} failed ({cause}; mounting needs \
         CAP_SYS_ADMIN); mount it with `mount -t tracefs tracefs {path}` or use `--hooks btf`"
    )]
    Mount { path: String, cause: std::io::Error },
    #[error(
        "tracefs at {path} cannot be read by this user ({cause}); classic tracepoints need \
         CAP_DAC_READ_SEARCH to read it when connprobe does not run as root, or use `--hooks btf`"
    )]
    Unreadable { path: String, cause: std::io::Error },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// Struct-field offsets from BTF; the classic tracepoint fields are filled in by
/// [`add_classic_fields`] for the hooks that use them.
pub fn struct_offsets(btf: &Btf) -> Result<KernelOffsets, OffsetsError> {
    // sock_common must open sock, request_sock and inet_timewait_sock: the programs read all
    // three through the same offsets.
    for (outer, first) in [
        ("sock", "__sk_common"),
        ("request_sock", "__req_common"),
        ("inet_timewait_sock", "__tw_common"),
    ] {
        let at = btf.member(outer, &[first])?.offset;
        if at != 0 {
            return Err(OffsetsError::Size {
                what: format!("offset of {outer}.{first}"),
                actual: at,
                expected: 0,
            });
        }
    }
    let field = |outer: &str, path: &[&str], size: u32| -> Result<u32, OffsetsError> {
        let m = btf.member(outer, path)?;
        if m.size != size {
            return Err(OffsetsError::Size {
                what: format!("{outer}.{}", path.join(".")),
                actual: m.size,
                expected: size,
            });
        }
        Ok(m.offset)
    };
    let cb = field("sk_buff", &["cb"], 48)?;
    let gso_segs = field("tcp_skb_cb", &["tcp_gso_segs"], 2)?;
    Ok(KernelOffsets {
        skc_family: field("sock_common", &["skc_family"], 2)?,
        skc_state: field("sock_common", &["skc_state"], 1)?,
        skc_daddr: field("sock_common", &["skc_daddr"], 4)?,
        skc_rcv_saddr: field("sock_common", &["skc_rcv_saddr"], 4)?,
        skc_dport: field("sock_common", &["skc_dport"], 2)?,
        skc_num: field("sock_common", &["skc_num"], 2)?,
        skc_v6_daddr: field("sock_common", &["skc_v6_daddr"], 16)?,
        skc_v6_rcv_saddr: field("sock_common", &["skc_v6_rcv_saddr"], 16)?,
        inet_sport: field("inet_sock", &["inet_sport"], 2)?,
        sk_protocol: field("sock", &["sk_protocol"], 2)?,
        sk_err: field("sock", &["sk_err"], 4)?,
        sk_err_soft: field("sock", &["sk_err_soft"], 4)?,
        sk_error_queue_prev: field("sock", &["sk_error_queue", "prev"], 8)?,
        sk_error_queue_qlen: field("sock", &["sk_error_queue", "qlen"], 4)?,
        skb_cb_ee: cb + field("sock_exterr_skb", &["ee"], 16)?,
        sk_flags: field("sock_common", &["skc_flags"], 8)?,
        sock_done_bit: btf.enum_value("sock_flags", "SOCK_DONE")?,
        skc_net: field("sock_common", &["skc_net", "net"], 8)?,
        net_ns_inum: field("net", &["ns", "inum"], 4)?,
        tcp_bytes_sent: field("tcp_sock", &["bytes_sent"], 8)?,
        tcp_bytes_received: field("tcp_sock", &["bytes_received"], 8)?,
        tcp_data_segs_out: field("tcp_sock", &["data_segs_out"], 4)?,
        tcp_total_retrans: field("tcp_sock", &["total_retrans"], 4)?,
        skb_head: field("sk_buff", &["head"], 8)?,
        skb_network_header: field("sk_buff", &["network_header"], 2)?,
        skb_transport_header: field("sk_buff", &["transport_header"], 2)?,
        skb_cb_gso_segs: cb + gso_segs,
        skb_sk: field("sk_buff", &["sk"], 8)?,
        skb_protocol: field("sk_buff", &["protocol"], 2)?,
        skb_dev: field("sk_buff", &["dev"], 8)?,
        dev_nd_net: field("net_device", &["nd_net", "net"], 8)?,
        sk_max_ack_backlog: field("sock", &["sk_max_ack_backlog"], 4)?,
        ..KernelOffsets::default()
    })
}

/// Where a classic tracepoint field's offset goes in [`KernelOffsets`].
type OffsetSlot = fn(&mut KernelOffsets) -> &mut u32;

/// The hook families, each a tracepoint with a BTF program and a classic fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    TcpState,
    SockError,
    TcpRetransmit,
    TcpRetransmitSynack,
    TcpSendReset,
    TcpReceiveReset,
    TcpDestroy,
    /// Packets dropped with a reason (`kfree_skb`).
    Drop,
}

impl Hook {
    pub const ALL: [Hook; 8] = [
        Hook::TcpState,
        Hook::SockError,
        Hook::TcpRetransmit,
        Hook::TcpRetransmitSynack,
        Hook::TcpSendReset,
        Hook::TcpReceiveReset,
        Hook::TcpDestroy,
        Hook::Drop,
    ];

    /// (category, name) of the kernel tracepoint.
    pub fn tracepoint(self) -> (&'static str, &'static str) {
        match self {
            Hook::TcpState => ("sock", "inet_sock_set_state"),
            Hook::SockError => ("sock", "inet_sk_error_report"),
            Hook::TcpRetransmit => ("tcp", "tcp_retransmit_skb"),
            Hook::TcpRetransmitSynack => ("tcp", "tcp_retransmit_synack"),
            Hook::TcpSendReset => ("tcp", "tcp_send_reset"),
            Hook::TcpReceiveReset => ("tcp", "tcp_receive_reset"),
            Hook::TcpDestroy => ("tcp", "tcp_destroy_sock"),
            Hook::Drop => ("skb", "kfree_skb"),
        }
    }

    /// The programs for this hook in the eBPF object are `<stem>_btf`, `<stem>_tp` (classic)
    /// and `<stem>_empty` (benchmark floor).
    pub fn program_stem(self) -> &'static str {
        match self {
            Hook::TcpState => "tcp_state",
            Hook::SockError => "sock_error",
            Hook::TcpRetransmit => "tcp_retransmit",
            Hook::TcpRetransmitSynack => "tcp_retransmit_synack",
            Hook::TcpSendReset => "tcp_send_reset",
            Hook::TcpReceiveReset => "tcp_receive_reset",
            Hook::TcpDestroy => "tcp_destroy",
            Hook::Drop => "drop",
        }
    }

    /// Arguments the BTF program reads; a kernel whose tracepoint has fewer needs the classic one.
    pub fn btf_args_needed(self) -> u32 {
        match self {
            Hook::TcpState => 3,
            Hook::SockError => 1,
            // `err` came in Linux 6.13; the BTF program reads it.
            Hook::TcpRetransmit => 3,
            Hook::TcpRetransmitSynack => 2,
            // `reason` came in Linux 6.10; the BTF program reads it.
            Hook::TcpSendReset => 3,
            Hook::TcpReceiveReset => 1,
            Hook::TcpDestroy => 1,
            // `rx_sk` came in Linux 6.11; the BTF program reads it.
            Hook::Drop => 4,
        }
    }

    /// Arguments of the tracepoint on older kernels that a second BTF program (`<stem>_btf_older`)
    /// takes, for the hooks that have one.
    pub fn btf_older_args(self) -> Option<u32> {
        match self {
            // Before 6.13 the tracepoint has no `err` and fires only for successful resends.
            Hook::TcpRetransmit => Some(2),
            // Before 6.10 the tracepoint has no `reason`.
            Hook::TcpSendReset => Some(2),
            // Before 6.11 the tracepoint has no `rx_sk`.
            Hook::Drop => Some(3),
            _ => None,
        }
    }

    /// Whether the fallback program is a raw tracepoint rather than a classic one: the classic
    /// `inet_sk_error_report` record has no socket, and only `sk_err`, which is 0 for the soft
    /// errors a non-blocking connect gets. Raw tracepoints need no tracefs.
    pub fn fallback_is_raw(self) -> bool {
        self == Hook::SockError
    }

    /// The classic tracepoint fields the program reads, and where each goes in the offsets.
    fn classic_fields(self) -> &'static [(&'static str, OffsetSlot)] {
        match self {
            Hook::SockError => &[],
            Hook::TcpState => &[
                ("skaddr", |o| &mut o.tp_state_skaddr),
                ("oldstate", |o| &mut o.tp_state_oldstate),
                ("newstate", |o| &mut o.tp_state_newstate),
            ],
            Hook::TcpRetransmit => &[
                ("skaddr", |o| &mut o.tp_retransmit_skaddr),
                ("skbaddr", |o| &mut o.tp_retransmit_skbaddr),
            ],
            Hook::TcpRetransmitSynack => &[
                ("skaddr", |o| &mut o.tp_synack_skaddr),
                ("req", |o| &mut o.tp_synack_req),
            ],
            Hook::TcpSendReset => &[
                ("skaddr", |o| &mut o.tp_send_reset_skaddr),
                ("skbaddr", |o| &mut o.tp_send_reset_skbaddr),
            ],
            Hook::TcpReceiveReset => &[("skaddr", |o| &mut o.tp_receive_reset_skaddr)],
            Hook::TcpDestroy => &[("skaddr", |o| &mut o.tp_destroy_skaddr)],
            Hook::Drop => &[
                ("skbaddr", |o| &mut o.tp_drop_skbaddr),
                ("protocol", |o| &mut o.tp_drop_protocol),
                ("reason", |o| &mut o.tp_drop_reason),
            ],
        }
    }
}

/// Fills the classic tracepoint offsets of `hook` from its format file.
pub fn add_classic_fields(
    tracefs: &Tracefs,
    hook: Hook,
    offsets: &mut KernelOffsets,
) -> Result<(), OffsetsError> {
    let (category, name) = hook.tracepoint();
    let fields = tracefs.format(category, name)?;
    let full = format!("{category}/{name}");
    for (field, slot) in hook.classic_fields() {
        let at = fields
            .get(*field)
            .ok_or_else(|| OffsetsError::NoField(full.clone(), field.to_string()))?;
        *slot(offsets) = at.0;
    }
    if hook == Hook::TcpRetransmit
        && let Some((at, _)) = fields.get("err")
    {
        offsets.tp_retransmit_err = *at;
        offsets.has_retransmit_err = 1;
    }
    if hook == Hook::TcpSendReset
        && let Some((at, 4)) = fields.get("reason")
    {
        offsets.tp_send_reset_reason = *at;
        offsets.has_reset_reason = 1;
    }
    if hook == Hook::Drop
        && let Some((at, 8)) = fields.get("rx_sk")
    {
        offsets.tp_drop_rx_sk = *at;
        offsets.has_drop_rx_sk = 1;
    }
    Ok(())
}

/// Parses a tracepoint `format` file into field name -> (offset, size).
pub fn parse_format(text: &str) -> HashMap<String, (u32, u32)> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("field:") else {
            continue;
        };
        let mut parts = rest.split(';').map(str::trim);
        let (Some(decl), Some(offset), Some(size)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or("");
        let name = name.split('[').next().unwrap_or(name);
        let num = |s: &str, key: &str| s.strip_prefix(key).and_then(|v| v.trim().parse().ok());
        if let (Some(offset), Some(size)) = (num(offset, "offset:"), num(size, "size:")) {
            fields.insert(name.to_string(), (offset, size));
        }
    }
    fields
}

/// The tracefs mount, mounted by the agent when it was missing (and unmounted again on drop,
/// right after attaching).
pub struct Tracefs {
    root: PathBuf,
    mounted_by_us: bool,
}

impl Tracefs {
    const PATHS: [&'static str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

    /// Finds tracefs, mounting it at /sys/kernel/tracing if no mount has `events/`. A tracefs
    /// this user may not enter (it is mode 0700, root's) is an error: mounting cannot help.
    pub fn find_or_mount() -> Result<Self, OffsetsError> {
        for path in Self::PATHS {
            match std::fs::metadata(Path::new(path).join("events")) {
                Ok(events) if events.is_dir() => {
                    return Ok(Tracefs {
                        root: path.into(),
                        mounted_by_us: false,
                    });
                }
                Err(cause) if cause.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(OffsetsError::Unreadable {
                        path: path.into(),
                        cause,
                    });
                }
                _ => {}
            }
        }
        let path = Self::PATHS[0];
        let target = CString::new(path).expect("no NUL in a constant path");
        let fstype = CString::new("tracefs").expect("no NUL in a constant");
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(OffsetsError::Mount {
                path: path.into(),
                cause: std::io::Error::last_os_error(),
            });
        }
        tracing::info!(
            "mounted tracefs at {path} (unmounted again once the programs are attached)"
        );
        Ok(Tracefs {
            root: path.into(),
            mounted_by_us: true,
        })
    }

    fn format(
        &self,
        category: &str,
        name: &str,
    ) -> Result<HashMap<String, (u32, u32)>, OffsetsError> {
        let path = self
            .root
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(parse_format(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(OffsetsError::NoTracepoint(
                format!("{category}/{name}"),
                self.root.join("events").display().to_string(),
            )),
            Err(source) => Err(OffsetsError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

impl Drop for Tracefs {
    fn drop(&mut self) {
        if self.mounted_by_us {
            let Ok(target) = CString::new(self.root.as_os_str().as_encoded_bytes()) else {
                return;
            };
            // SAFETY: valid NUL-terminated path. A lazy unmount never fails because a reader
            // still has a file open; the attached programs do not depend on the mount.
            let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
            if rc != 0 {
                tracing::debug!(
                    "could not unmount tracefs: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEND_RESET: &str = "name: tcp_send_reset
ID: 1480
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:enum sk_rst_reason reason;\toffset:28;\tsize:4;\tsigned:0;
\tfield:__u8 saddr[28];\toffset:32;\tsize:28;\tsigned:0;

print fmt: \"skbaddr=%p\", REC->skbaddr
";

    #[test]
    fn format_files_parse() {
        let f = parse_format(SEND_RESET);
        assert_eq!(f["skbaddr"], (8, 8));
        assert_eq!(f["skaddr"], (16, 8));
        assert_eq!(f["reason"], (28, 4));
        assert_eq!(f["saddr"], (32, 28));
        assert_eq!(f["common_type"], (0, 2));
    }

    #[test]
    fn this_kernels_structs_resolve() {
        let btf = Btf::from_file(Btf::VMLINUX).expect("connprobe's test machines have BTF");
        let o = struct_offsets(&btf).unwrap();
        assert_eq!(o.skc_daddr, 0);
        assert_eq!(o.skc_rcv_saddr, 4);
        assert!(o.sk_err > o.skc_v6_rcv_saddr);
        // tcp_skb_cb opens with seq and end_seq; tcp_gso_segs follows in a union.
        let cb = btf.member("sk_buff", &["cb"]).unwrap().offset;
        assert_eq!(o.skb_cb_gso_segs, cb + 8);
        for hook in Hook::ALL {
            let (_, name) = hook.tracepoint();
            assert!(
                btf.tracepoint_args(name).unwrap() >= hook.btf_args_needed(),
                "{name}"
            );
        }
    }
}
