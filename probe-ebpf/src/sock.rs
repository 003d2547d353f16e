//! Reading sockets and packets from kernel memory, at offsets found in BTF at start-up, through
//! either kind of access (see `access`).
use probe_common::{AF_INET, AF_INET6, Endpoints};

use crate::{
    access::{Kernel, Raw},
    maps::offset,
};

#[inline(always)]
pub fn family<K: Kernel>(k: K, sk: u64) -> Result<u16, i32> {
    k.read::<u16>(sk, offset!(skc_family))
}

#[inline(always)]
pub fn protocol<K: Kernel>(k: K, sk: u64) -> Result<u16, i32> {
    k.read::<u16>(sk, offset!(sk_protocol))
}

#[inline(always)]
pub fn state<K: Kernel>(k: K, sk: u64) -> Result<u8, i32> {
    k.read::<u8>(sk, offset!(skc_state))
}

/// The inode number of the socket's network namespace (what `/proc/PID/ns/net` links to).
#[inline(always)]
pub fn netns<K: Kernel>(k: K, sk: u64) -> Result<u32, i32> {
    let net = k.read::<u64>(sk, offset!(skc_net))?;
    k.read::<u32>(net, offset!(net_ns_inum))
}

/// This host's port of a full TCP socket (`inet_sport`, which CLOSE leaves in place).
#[inline(always)]
pub fn local_port<K: Kernel>(k: K, sk: u64) -> Result<u16, i32> {
    Ok(u16::from_be(
        k.read::<u16>(k.tcp(sk)?, offset!(inet_sport))?,
    ))
}

/// Both ends of a full TCP socket. The local port comes from `inet_sport`: on the way to CLOSE
/// the kernel releases the port (clearing `skc_num`) before the state change is traced.
#[inline(always)]
pub fn endpoints<K: Kernel>(k: K, sk: u64) -> Result<Endpoints, i32> {
    common_endpoints(k, sk, local_port(k, sk)?)
}

/// Both ends of a request socket (a pending connection of a listener).
#[inline(always)]
pub fn request_endpoints<K: Kernel>(k: K, req: u64) -> Result<Endpoints, i32> {
    common_endpoints(k, req, k.read::<u16>(req, offset!(skc_num))?)
}

/// A 16-byte address as four 32-bit loads (each within the kernel's `in6_addr`).
#[inline(always)]
fn address16<K: Kernel>(k: K, base: u64, off: usize) -> Result<[u8; 16], i32> {
    let mut addr = [0u8; 16];
    for (i, chunk) in addr.chunks_exact_mut(4).enumerate() {
        chunk.copy_from_slice(&k.read::<u32>(base, off + i * 4)?.to_ne_bytes());
    }
    Ok(addr)
}

/// Addresses and remote port from `sock_common`, which opens every kind of socket.
#[inline(always)]
fn common_endpoints<K: Kernel>(k: K, sk: u64, local_port: u16) -> Result<Endpoints, i32> {
    let family = family(k, sk)?;
    let mut ep = Endpoints {
        family,
        local_port,
        remote_port: u16::from_be(k.read::<u16>(sk, offset!(skc_dport))?),
        _pad: 0,
        local_addr: [0; 16],
        remote_addr: [0; 16],
    };
    if family == AF_INET6 {
        ep.local_addr = address16(k, sk, offset!(skc_v6_rcv_saddr))?;
        ep.remote_addr = address16(k, sk, offset!(skc_v6_daddr))?;
    } else {
        let local = k.read::<u32>(sk, offset!(skc_rcv_saddr))?;
        let remote = k.read::<u32>(sk, offset!(skc_daddr))?;
        ep.local_addr[..4].copy_from_slice(&local.to_ne_bytes());
        ep.remote_addr[..4].copy_from_slice(&remote.to_ne_bytes());
    }
    Ok(ep)
}

/// A received packet's ends, turned to this host's view: its destination is the local end.
/// Returns the endpoints and whether the packet was a bare SYN (a connection attempt). The
/// `sk_buff` is read through `k`; the packet's bytes always with `bpf_probe_read_kernel`, since
/// they sit at a variable offset from `head`.
#[inline(always)]
pub fn packet_endpoints<K: Kernel>(k: K, skb: u64) -> Result<(Endpoints, bool), i32> {
    let head = k.read::<u64>(skb, offset!(skb_head))?;
    let network = k.read::<u16>(skb, offset!(skb_network_header))? as u64;
    let transport = k.read::<u16>(skb, offset!(skb_transport_header))? as u64;
    let ip = head + network;
    let tcp = head + transport;
    let version = Raw.read::<u8>(ip, 0)? >> 4;
    let mut ep = Endpoints {
        family: AF_INET,
        local_port: u16::from_be(Raw.read::<u16>(tcp, 2)?),
        remote_port: u16::from_be(Raw.read::<u16>(tcp, 0)?),
        _pad: 0,
        local_addr: [0; 16],
        remote_addr: [0; 16],
    };
    if version == 6 {
        ep.family = AF_INET6;
        ep.remote_addr = Raw.read::<[u8; 16]>(ip, 8)?;
        ep.local_addr = Raw.read::<[u8; 16]>(ip, 24)?;
    } else {
        let remote = Raw.read::<[u8; 4]>(ip, 12)?;
        let local = Raw.read::<[u8; 4]>(ip, 16)?;
        ep.remote_addr[..4].copy_from_slice(&remote);
        ep.local_addr[..4].copy_from_slice(&local);
    }
    let flags = Raw.read::<u8>(tcp, 13)?;
    let bare_syn = flags & 0x02 != 0 && flags & 0x10 == 0;
    Ok((ep, bare_syn))
}

/// Payload bytes received: `bytes_received` counts the peer's FIN as one.
#[inline(always)]
pub fn payload_bytes_received<K: Kernel>(k: K, sk: u64) -> Result<u64, i32> {
    let received = k.read::<u64>(k.tcp(sk)?, offset!(tcp_bytes_received))?;
    let flags = k.read::<u64>(sk, offset!(sk_flags))?;
    let fin_received = (flags >> (offset!(sock_done_bit) & 63)) & 1 == 1;
    Ok(if fin_received {
        received.saturating_sub(1)
    } else {
        received
    })
}
