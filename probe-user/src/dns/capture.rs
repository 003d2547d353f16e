//! The kernel's DNS record ([`probe_common::DnsPacket`], straight from the DNS ring buffer)
//! as a typed, borrowed view. Length-checked, no allocation.
use std::{
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use probe_common::{
    AF_INET, AF_INET6, DNS_PAYLOAD_BYTES, DnsPacket, IPPROTO_TCP, IPPROTO_UDP, direction, dns_flags,
};
use serde::{Deserialize, Serialize};

use crate::event::{Comm, Direction, Endpoint, Process};

/// The log's `transport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
}

/// One captured packet.
#[derive(Clone, Debug)]
pub struct Capture<'a> {
    /// CLOCK_MONOTONIC nanoseconds.
    pub mono_ns: u64,
    pub direction: Direction,
    pub transport: Transport,
    pub src: Endpoint,
    pub dst: Endpoint,
    /// The sending process, for packets this host sent from a syscall.
    pub process: Option<Process>,
    pub payload: &'a [u8],
    /// The packet carried more payload than was copied.
    pub cut: bool,
    /// A TCP segment with FIN or RST.
    pub closing: bool,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    #[error("DNS record of {0} bytes is shorter than its layout")]
    Truncated(usize),
    #[error("DNS record with unknown address family {0}")]
    Family(u16),
    #[error("DNS record with unknown transport {0}")]
    Transport(u8),
    #[error("DNS record with unknown direction {0}")]
    Direction(u8),
}

pub fn decode(bytes: &[u8]) -> Result<Capture<'_>, CaptureError> {
    if bytes.len() < size_of::<DnsPacket>() {
        return Err(CaptureError::Truncated(bytes.len()));
    }
    // SAFETY: the length is checked; DnsPacket is plain data valid for any bytes. Unaligned
    // because ring buffer records are only 8-byte aligned.
    let raw: DnsPacket = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let ip = |a: [u8; 16]| match raw.family {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
        AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(a))),
        other => Err(CaptureError::Family(other)),
    };
    let transport = match raw.transport {
        IPPROTO_UDP => Transport::Udp,
        t if u16::from(t) == IPPROTO_TCP => Transport::Tcp,
        other => return Err(CaptureError::Transport(other)),
    };
    let direction = match raw.direction {
        direction::SENT => Direction::Sent,
        direction::RECEIVED => Direction::Received,
        other => return Err(CaptureError::Direction(other)),
    };
    let copied = (raw.payload_len as usize).min(DNS_PAYLOAD_BYTES);
    let at = std::mem::offset_of!(DnsPacket, payload);
    Ok(Capture {
        mono_ns: raw.timestamp_ns,
        direction,
        transport,
        src: Endpoint::new(ip(raw.src_addr)?, raw.src_port),
        dst: Endpoint::new(ip(raw.dst_addr)?, raw.dst_port),
        process: (raw.flags & dns_flags::PROCESS_KNOWN != 0).then(|| Process {
            pid: raw.tgid,
            comm: if raw.flags & dns_flags::COMM_KNOWN != 0 {
                Comm::from_kernel(&raw.comm)
            } else {
                comm_of(raw.tgid)
            },
        }),
        payload: &bytes[at..at + copied],
        cut: raw.payload_len as usize > DNS_PAYLOAD_BYTES,
        closing: raw.flags & dns_flags::TCP_CLOSING != 0,
    })
}

/// The name of process `pid` from /proc, for kernels whose egress program learns only the pid;
/// empty when the process has already gone (a resolver that got its answer exits at once).
fn comm_of(pid: u32) -> Comm {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|name| Comm::from_str_lossy(name.trim_end_matches('\n')))
        .unwrap_or_else(|_| Comm::from_str_lossy(""))
}
