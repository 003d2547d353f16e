//! The backend behind a virtual address: a cgroup_skb egress program on the cgroup v2 root sees
//! every packet a local socket sends after the netfilter hooks (its attach point,
//! `ip_finish_output`, comes after NF_INET_LOCAL_OUT and NF_INET_POST_ROUTING), so the
//! destination in a connect's SYN is the one DNAT chose. When it differs from the socket's own
//! remote end, the program reports the pair once per SYN; the agent attaches the backend to the
//! socket's connect, retransmit, reset and close events.
//!
//! Cost on every other packet: one `bpf_sk_fullsock` call and one load of the socket's state
//! (only a socket in SYN_SENT sends a SYN). The program never drops anything: it returns 1.
use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock},
    helpers::generated::{bpf_sk_fullsock, bpf_skb_load_bytes},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use probe_common::{
    AF_INET, AF_INET6, Endpoints, EventKind, IPPROTO_TCP, TranslationEvent, tcp_state,
};

use crate::emit::{emit, header, now_ns};

/// Let the packet through: the program only watches.
const PASS: i32 = 1;
/// Bytes of the IPv6 header; the program reads the TCP header right after it (a SYN carries no
/// extension headers).
const IPV6_HEADER: u32 = 40;

#[cgroup_skb]
pub fn backend_egress(ctx: SkBuffContext) -> i32 {
    on_egress(ctx.skb.skb);
    PASS
}

#[inline(always)]
fn on_egress(skb: *mut __sk_buff) {
    // SAFETY: `skb` is the program's context; `sk` is checked for NULL by the helper, which
    // returns a full socket or NULL; field loads from `bpf_sock` are rewritten by the verifier.
    unsafe {
        let sk = (*skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return;
        }
        let sk = bpf_sk_fullsock(sk);
        if sk.is_null() {
            return;
        }
        if core::ptr::read_volatile(&(*sk).state) != u32::from(tcp_state::SYN_SENT)
            || core::ptr::read_volatile(&(*sk).protocol) != u32::from(IPPROTO_TCP)
        {
            return;
        }
        let _ = translated(skb, sk);
    }
}

/// Compares the SYN's destination with the socket's and reports a difference.
#[inline(never)]
fn translated(skb: *mut __sk_buff, sk: *mut bpf_sock) -> Result<(), i32> {
    // SAFETY: `sk` is a full socket (checked by the caller); `skb` is the context.
    let family = unsafe { core::ptr::read_volatile(&(*sk).family) } as u16;
    let mut endpoints = Endpoints {
        family,
        local_port: unsafe { core::ptr::read_volatile(&(*sk).src_port) } as u16,
        remote_port: u16::from_be(unsafe { core::ptr::read_volatile(&(*sk).dst_port) }),
        _pad: 0,
        local_addr: [0; 16],
        remote_addr: [0; 16],
    };
    match family {
        AF_INET => {
            let src = unsafe { core::ptr::read_volatile(&(*sk).src_ip4) };
            let dst = unsafe { core::ptr::read_volatile(&(*sk).dst_ip4) };
            endpoints.local_addr[..4].copy_from_slice(&src.to_ne_bytes());
            endpoints.remote_addr[..4].copy_from_slice(&dst.to_ne_bytes());
        }
        AF_INET6 => {
            for i in 0..4 {
                let src = unsafe { core::ptr::read_volatile(&(*sk).src_ip6[i]) };
                let dst = unsafe { core::ptr::read_volatile(&(*sk).dst_ip6[i]) };
                endpoints.local_addr[i * 4..i * 4 + 4].copy_from_slice(&src.to_ne_bytes());
                endpoints.remote_addr[i * 4..i * 4 + 4].copy_from_slice(&dst.to_ne_bytes());
            }
        }
        _ => return Ok(()),
    }
    let (backend_addr, backend_port) = packet_destination(skb, family)?;
    if backend_addr == endpoints.remote_addr && backend_port == endpoints.remote_port {
        return Ok(());
    }
    let now = now_ns();
    emit(
        EventKind::Translation,
        TranslationEvent {
            header: header(EventKind::Translation, now),
            endpoints,
            backend_addr,
            backend_port,
            _pad: [0; 6],
        },
    );
    Ok(())
}

/// The packet's destination address and TCP port, in the socket's family's layout (an IPv4
/// packet of an IPv6 socket as `::ffff:a.b.c.d`). The skb's data starts at the network header.
#[inline(always)]
fn packet_destination(skb: *mut __sk_buff, family: u16) -> Result<([u8; 16], u16), i32> {
    let load = |offset: u32, to: &mut [u8]| -> Result<(), i32> {
        // SAFETY: the helper checks bounds against the packet and fails without reading.
        match unsafe {
            bpf_skb_load_bytes(
                skb as *const _,
                offset,
                to.as_mut_ptr().cast(),
                to.len() as u32,
            )
        } {
            0 => Ok(()),
            err => Err(err as i32),
        }
    };
    let mut first = [0u8; 1];
    load(0, &mut first)?;
    let mut addr = [0u8; 16];
    let transport = match first[0] >> 4 {
        4 => {
            let mut v4 = [0u8; 4];
            load(16, &mut v4)?;
            if family == AF_INET6 {
                addr[10] = 0xff;
                addr[11] = 0xff;
                addr[12..].copy_from_slice(&v4);
            } else {
                addr[..4].copy_from_slice(&v4);
            }
            u32::from(first[0] & 0x0f) * 4
        }
        6 => {
            load(24, &mut addr)?;
            IPV6_HEADER
        }
        _ => return Err(-22),
    };
    let mut port = [0u8; 2];
    load(transport + 2, &mut port)?;
    Ok((addr, u16::from_be_bytes(port)))
}
