//! DNS packets (UDP and TCP, to or from the ports in [`DNS_PORTS`]) of every socket on the host:
//! cgroup_skb programs on the cgroup v2 root see each packet a socket sends (egress) or receives
//! (ingress), in every network namespace. They copy a bounded prefix of the payload to the agent,
//! which parses and matches it; the programs never drop or change a packet (they return 1).
//!
//! cgroup_skb rather than tc or a socket filter: one attachment covers every namespace and
//! interface (loopback included) and the packets are those of a local socket, whose cookie and,
//! on egress, whose sending process the program can name.
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_skb_load_bytes,
    },
    macros::{cgroup_skb, map},
    maps::RingBuf,
    programs::SkBuffContext,
};
use probe_common::{
    AF_INET, AF_INET6, COMM_LEN, Counter, DNS_PAYLOAD_BYTES, DNS_RING_BYTES, DnsPacket, DnsPorts,
    IPPROTO_TCP, IPPROTO_UDP, MAX_DNS_PORTS, direction, dns_flags,
};

use crate::maps::bump;

const _: () = assert!(DNS_PAYLOAD_BYTES.is_power_of_two());

/// DNS packets to the agent, apart from the TCP events: a burst of queries never crowds them out.
#[map(name = "DNS_EVENTS")]
pub static DNS_EVENTS: RingBuf = RingBuf::with_byte_size(DNS_RING_BYTES, 0);

/// The watched ports, set by the agent before load.
#[unsafe(no_mangle)]
pub static DNS_PORTS: DnsPorts = DnsPorts {
    ports: [0; MAX_DNS_PORTS],
    count: 0,
};

/// Allow the packet: these programs only watch.
const PASS: i32 = 1;

/// What an egress program learns of the sending process.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sender {
    /// Its pid and command name.
    Named,
    /// Its pid only: cgroup_skb programs may call `bpf_get_current_pid_tgid` from Linux 6.10
    /// on, `bpf_get_current_comm` only later.
    Pid,
    /// Nothing: before Linux 6.10.
    Unknown,
}

#[cgroup_skb]
pub fn dns_egress(ctx: SkBuffContext) -> i32 {
    capture(&ctx, direction::SENT, Sender::Named);
    PASS
}

/// Egress with the sending process's pid but not its name (the agent reads that from /proc).
#[cgroup_skb]
pub fn dns_egress_pid(ctx: SkBuffContext) -> i32 {
    capture(&ctx, direction::SENT, Sender::Pid);
    PASS
}

/// Egress without the sending process, for kernels whose cgroup_skb programs may not call
/// `bpf_get_current_pid_tgid` (before Linux 6.10).
#[cgroup_skb]
pub fn dns_egress_anonymous(ctx: SkBuffContext) -> i32 {
    capture(&ctx, direction::SENT, Sender::Unknown);
    PASS
}

#[cgroup_skb]
pub fn dns_ingress(ctx: SkBuffContext) -> i32 {
    capture(&ctx, direction::RECEIVED, Sender::Unknown);
    PASS
}

#[inline(always)]
fn watched(port: u16) -> bool {
    // SAFETY: a plain read of a load-time constant; volatile so the zeros are not folded.
    let ports = unsafe { core::ptr::read_volatile(&raw const DNS_PORTS) };
    let mut i = 0;
    while i < MAX_DNS_PORTS {
        if (i as u32) < ports.count && ports.ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

/// The packet's addresses, transport and where its payload starts; `None` for anything that is
/// not a first (or only) IP fragment of UDP or TCP to or from a watched port.
struct Layout {
    family: u16,
    transport: u8,
    src_addr: [u8; 16],
    dst_addr: [u8; 16],
    src_port: u16,
    dst_port: u16,
    payload_at: u32,
    closing: bool,
}

/// The packet's socket, from the context alone (no helper call): most packets of a host are
/// on connected sockets whose ports are known, and those not to or from a watched port are
/// passed over here. An unconnected socket (remote port 0, e.g. a UDP client that never called
/// `connect()`) may send to any port: its packets are parsed.
#[inline(always)]
fn socket_may_carry_dns(ctx: &SkBuffContext) -> bool {
    // `local_port` is in host order, `remote_port` in network order (linux/bpf.h).
    let local = ctx.skb.local_port() as u16;
    let remote = u16::from_be(ctx.skb.remote_port() as u16);
    remote == 0 || watched(local) || watched(remote)
}

#[inline(always)]
fn layout(ctx: &SkBuffContext) -> Option<Layout> {
    if !socket_may_carry_dns(ctx) {
        return None;
    }
    // In cgroup_skb programs the packet starts at its IP header.
    let first: u8 = ctx.load(0).ok()?;
    let mut src_addr = [0u8; 16];
    let mut dst_addr = [0u8; 16];
    let (family, transport, l4) = match first >> 4 {
        4 => {
            let transport: u8 = ctx.load(9).ok()?;
            // Later fragments carry no transport header.
            let frag: [u8; 2] = ctx.load(6).ok()?;
            if u16::from_be_bytes(frag) & 0x1fff != 0 {
                return None;
            }
            let src: [u8; 4] = ctx.load(12).ok()?;
            let dst: [u8; 4] = ctx.load(16).ok()?;
            src_addr[..4].copy_from_slice(&src);
            dst_addr[..4].copy_from_slice(&dst);
            (AF_INET, transport, u32::from(first & 0x0f) * 4)
        }
        6 => {
            // Extension headers are not followed: DNS does not use them.
            let transport: u8 = ctx.load(6).ok()?;
            src_addr = ctx.load(8).ok()?;
            dst_addr = ctx.load(24).ok()?;
            (AF_INET6, transport, 40)
        }
        _ => return None,
    };
    if transport != IPPROTO_UDP && transport != IPPROTO_TCP as u8 {
        return None;
    }
    let ports: [u8; 4] = ctx.load(l4 as usize).ok()?;
    let src_port = u16::from_be_bytes([ports[0], ports[1]]);
    let dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    if !watched(src_port) && !watched(dst_port) {
        return None;
    }
    let (payload_at, closing) = if transport == IPPROTO_UDP {
        (l4 + 8, false)
    } else {
        // Data offset (high nibble of byte 12) and flags (byte 13: FIN 0x01, RST 0x04).
        let bytes: [u8; 2] = ctx.load(l4 as usize + 12).ok()?;
        (l4 + u32::from(bytes[0] >> 4) * 4, bytes[1] & 0x05 != 0)
    };
    Some(Layout {
        family,
        transport,
        src_addr,
        dst_addr,
        src_port,
        dst_port,
        payload_at,
        closing,
    })
}

#[inline(always)]
fn capture(ctx: &SkBuffContext, dir: u8, sender: Sender) {
    let Some(l) = layout(ctx) else { return };
    let total = ctx.len();
    let payload_len = total.saturating_sub(l.payload_at);
    // Segments without payload matter only when they close a TCP connection: a query still
    // open on it then has no answer to wait for.
    if payload_len == 0 && !l.closing {
        return;
    }
    bump(Counter::ProducedDns);
    let Some(mut entry) = DNS_EVENTS.reserve::<DnsPacket>(0) else {
        bump(Counter::LostDnsRingbuf);
        return;
    };
    let packet = entry.as_mut_ptr();
    let (tgid, comm, known) = match sender {
        Sender::Named => (
            (bpf_get_current_pid_tgid() >> 32) as u32,
            bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
            dns_flags::PROCESS_KNOWN | dns_flags::COMM_KNOWN,
        ),
        Sender::Pid => (
            (bpf_get_current_pid_tgid() >> 32) as u32,
            [0; COMM_LEN],
            dns_flags::PROCESS_KNOWN,
        ),
        Sender::Unknown => (0, [0; COMM_LEN], 0),
    };
    // SAFETY: `packet` points at the reserved record, which is ours until submit or discard.
    unsafe {
        (*packet).timestamp_ns = bpf_ktime_get_ns();
        (*packet).socket_cookie = bpf_get_socket_cookie(ctx.skb.skb.cast());
        (*packet).tgid = tgid;
        (*packet).payload_len = payload_len;
        (*packet).family = l.family;
        (*packet).src_port = l.src_port;
        (*packet).dst_port = l.dst_port;
        (*packet).direction = dir;
        (*packet).transport = l.transport;
        (*packet).flags = known | if l.closing { dns_flags::TCP_CLOSING } else { 0 };
        (*packet)._pad = [0; 7];
        (*packet).src_addr = l.src_addr;
        (*packet).dst_addr = l.dst_addr;
        (*packet).comm = comm;
    }
    if payload_len > 0 {
        // The length must be provably in 1..=DNS_PAYLOAD_BYTES where the helper is called. The
        // compiler folds range checks into forms the verifier cannot follow, so the bound is a
        // mask on a value the compiler knows nothing about (black_box): ((n - 1) & 511) + 1.
        let copy = core::hint::black_box(payload_len.min(DNS_PAYLOAD_BYTES as u32) as u64);
        let copy = ((copy.wrapping_sub(1)) & (DNS_PAYLOAD_BYTES as u64 - 1)) + 1;
        // SAFETY: `copy` is in 1..=DNS_PAYLOAD_BYTES, the size of the payload field; the
        // helper fails (and nothing is sent) should the packet hold fewer bytes.
        let ret = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb.cast(),
                l.payload_at,
                (&raw mut (*packet).payload).cast(),
                copy as u32,
            )
        };
        if ret != 0 {
            entry.discard(0);
            bump(Counter::ReadError);
            return;
        }
    }
    entry.submit(wakeup());
}

/// When a record wakes the agent: only when it falls far behind (a quarter of the ring unread).
/// Waking it was the dearest part of a query's capture (an interrupt: about 11 us per query on
/// this project's VM against 0.4 us for the rest, measured with `cargo xtask bench --scenarios
/// dns`), and a query that found the ring empty always paid it. The agent's DNS reader drains
/// the ring every 100 ms, and its event consumer drains it before naming connects, so an answer
/// is read before the connect that follows it without waking anyone.
#[inline(always)]
fn wakeup() -> u64 {
    if DNS_EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= DNS_RING_BYTES as u64 / 4 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}
