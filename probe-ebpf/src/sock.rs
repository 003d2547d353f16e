//! Reading sockets and packets from kernel memory, at offsets found in BTF at start-up.
use aya_ebpf::helpers::bpf_probe_read_kernel;
use probe_common::{AF_INET, AF_INET6, Endpoints};

use crate::maps::offset;

/// Reads a `T` at `base + off` in kernel memory.
#[inline(always)]
pub fn read<T>(base: u64, off: usize) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel((base as usize + off) as *const T) }
}

#[inline(always)]
pub fn family(sk: u64) -> Result<u16, i32> {
    read::<u16>(sk, offset!(skc_family))
}

#[inline(always)]
pub fn protocol(sk: u64) -> Result<u16, i32> {
    read::<u16>(sk, offset!(sk_protocol))
}

/// The inode number of the socket's network namespace (what `/proc/PID/ns/net` links to).
#[inline(always)]
pub fn netns(sk: u64) -> Result<u32, i32> {
    let net = read::<u64>(sk, offset!(skc_net))?;
    read::<u32>(net, offset!(net_ns_inum))
}

#[inline(always)]
pub fn state(sk: u64) -> Result<u8, i32> {
    read::<u8>(sk, offset!(skc_state))
}

/// This host's port of a full socket (`inet_sport`, which CLOSE leaves in place).
#[inline(always)]
pub fn local_port(sk: u64) -> Result<u16, i32> {
    Ok(u16::from_be(read::<u16>(sk, offset!(inet_sport))?))
}

/// Both ends of a full socket. The local port comes from `inet_sport`: on the way to CLOSE the
/// kernel releases the port (clearing `skc_num`) before the state change is traced.
#[inline(always)]
pub fn endpoints(sk: u64) -> Result<Endpoints, i32> {
    common_endpoints(sk, local_port(sk)?)
}

/// Both ends of a request socket (a pending connection of a listener).
#[inline(always)]
pub fn request_endpoints(req: u64) -> Result<Endpoints, i32> {
    common_endpoints(req, read::<u16>(req, offset!(skc_num))?)
}

/// Addresses and remote port from `sock_common`, which opens every kind of socket.
#[inline(always)]
fn common_endpoints(sk: u64, local_port: u16) -> Result<Endpoints, i32> {
    let family = family(sk)?;
    let mut ep = Endpoints {
        family,
        local_port,
        remote_port: u16::from_be(read::<u16>(sk, offset!(skc_dport))?),
        _pad: 0,
        local_addr: [0; 16],
        remote_addr: [0; 16],
    };
    if family == AF_INET6 {
        ep.local_addr = read::<[u8; 16]>(sk, offset!(skc_v6_rcv_saddr))?;
        ep.remote_addr = read::<[u8; 16]>(sk, offset!(skc_v6_daddr))?;
    } else {
        let local = read::<[u8; 4]>(sk, offset!(skc_rcv_saddr))?;
        let remote = read::<[u8; 4]>(sk, offset!(skc_daddr))?;
        ep.local_addr[..4].copy_from_slice(&local);
        ep.remote_addr[..4].copy_from_slice(&remote);
    }
    Ok(ep)
}

/// A received packet's ends, turned to this host's view: its destination is the local end.
/// Returns the endpoints and whether the packet was a bare SYN (a connection attempt).
#[inline(always)]
pub fn packet_endpoints(skb: u64) -> Result<(Endpoints, bool), i32> {
    let head = read::<u64>(skb, offset!(skb_head))?;
    let network = read::<u16>(skb, offset!(skb_network_header))? as u64;
    let transport = read::<u16>(skb, offset!(skb_transport_header))? as u64;
    let ip = head + network;
    let tcp = head + transport;
    let version = read::<u8>(ip, 0)? >> 4;
    let mut ep = Endpoints {
        family: AF_INET,
        local_port: u16::from_be(read::<u16>(tcp, 2)?),
        remote_port: u16::from_be(read::<u16>(tcp, 0)?),
        _pad: 0,
        local_addr: [0; 16],
        remote_addr: [0; 16],
    };
    if version == 6 {
        ep.family = AF_INET6;
        ep.remote_addr = read::<[u8; 16]>(ip, 8)?;
        ep.local_addr = read::<[u8; 16]>(ip, 24)?;
    } else {
        let remote = read::<[u8; 4]>(ip, 12)?;
        let local = read::<[u8; 4]>(ip, 16)?;
        ep.remote_addr[..4].copy_from_slice(&remote);
        ep.local_addr[..4].copy_from_slice(&local);
    }
    let flags = read::<u8>(tcp, 13)?;
    let bare_syn = flags & 0x02 != 0 && flags & 0x10 == 0;
    Ok((ep, bare_syn))
}

/// Payload bytes received: `bytes_received` counts the peer's FIN as one.
#[inline(always)]
pub fn payload_bytes_received(sk: u64) -> Result<u64, i32> {
    let received = read::<u64>(sk, offset!(tcp_bytes_received))?;
    let flags = read::<u64>(sk, offset!(sk_flags))?;
    let fin_received = (flags >> (offset!(sock_done_bit) & 63)) & 1 == 1;
    Ok(if fin_received {
        received.saturating_sub(1)
    } else {
        received
    })
}
