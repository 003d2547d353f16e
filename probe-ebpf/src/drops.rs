//! Packets the kernel drops with a reason (`skb:kfree_skb`): TCP segments and DNS packets,
//! each keyed to the connection it belongs to.
//!
//! The hook fires for every freed packet the kernel counts as dropped, so the programs filter
//! first on what costs nothing: the reason (an argument) against the agent's bitmap of reasons to
//! report ([`DROP_FILTER`]: not `NOT_SPECIFIED`, not the reasons that mean no packet was lost on
//! its way), then the packet's protocol. Only then are the IP and TCP/UDP headers read.
//!
//! Which connection a packet belongs to: its socket where the kernel has one (`rx_sk` on input,
//! Linux 6.11 and later; `skb->sk` on output and after early demux on input), whose port says
//! whether the packet was leaving or arriving; otherwise its own headers, matched to the connects
//! in flight ([`CONNECTS`]) in either direction: a SYN a firewall dropped before any socket lookup
//! belongs to the connect that sent it, a SYN-ACK to the connect it answers, even in another
//! namespace of this host. A local connect names the owner; a listener on the port makes this host
//! the server. Handshake segments (SYN, SYN-ACK, RST) and DNS packets are events of their own;
//! data segments are counted per connection and reason in [`DROP_COUNTS`], which the agent reads.
use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use probe_common::{
    AF_INET, AF_INET6, Counter, DNS_PORT, DROP_REASON_WORDS, DropEvent, DropKey, Endpoints,
    EventKind, IPPROTO_TCP, IPPROTO_UDP, ListenerKey, Owner, direction, side,
};

use crate::{
    access::{Kernel, Raw},
    connects::{self, Match},
    emit::{emit, finish, header, now_ns, unknown_owner},
    maps::{DROP_COUNTS, DROP_FILTER, LISTENERS, bump, offset},
    sock::netns,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Linux 6.11 and later: the receiving socket is an argument. The arguments' BTF types would
/// allow direct loads, but the body reads through `bpf_probe_read_kernel` as the classic program
/// does: the typed variant of `attribute` needs more stack than the verifier allows, and only
/// packets past the reason filter pay for it.
#[btf_tracepoint(function = "kfree_skb")]
pub fn drop_btf(ctx: BtfTracePointContext) -> u32 {
    let reason: u32 = ctx.arg(2);
    if !reported(reason) {
        return 0;
    }
    let skb: u64 = ctx.arg(0);
    let rx_sk: u64 = ctx.arg(3);
    finish(&ctx, "kfree_skb", on_drop(Raw, skb, reason, rx_sk, None))
}

/// Kernels before 6.11: no `rx_sk`.
#[btf_tracepoint(function = "kfree_skb")]
pub fn drop_btf_older(ctx: BtfTracePointContext) -> u32 {
    let reason: u32 = ctx.arg(2);
    if !reported(reason) {
        return 0;
    }
    let skb: u64 = ctx.arg(0);
    finish(&ctx, "kfree_skb", on_drop(Raw, skb, reason, 0, None))
}

#[tracepoint]
pub fn drop_tp(ctx: TracePointContext) -> u32 {
    // SAFETY: an offset inside the tracepoint's record, from its format file.
    let Ok(reason) = (unsafe { ctx.read_at::<u32>(offset!(tp_drop_reason)) }) else {
        return 0;
    };
    if !reported(reason) {
        return 0;
    }
    finish(&ctx, "kfree_skb", try_drop_tp(&ctx, reason))
}

fn try_drop_tp(ctx: &TracePointContext, reason: u32) -> Result<(), i32> {
    // SAFETY: offsets inside the tracepoint's record, from its format file.
    let skb: u64 = unsafe { ctx.read_at(offset!(tp_drop_skbaddr))? };
    // The record holds the protocol in host byte order.
    let protocol: u16 = unsafe { ctx.read_at(offset!(tp_drop_protocol))? };
    let rx_sk: u64 = if offset!(has_drop_rx_sk) != 0 {
        unsafe { ctx.read_at(offset!(tp_drop_rx_sk))? }
    } else {
        0
    };
    on_drop(Raw, skb, reason, rx_sk, Some(protocol))
}

/// Whether the agent asked for drops of this reason: one bit per `enum skb_drop_reason` value.
#[inline(always)]
fn reported(reason: u32) -> bool {
    let word = (reason / 64) as usize;
    if word >= DROP_REASON_WORDS {
        return false;
    }
    // SAFETY: a plain read of a load-time constant, the index checked above.
    let bits = unsafe { core::ptr::read_volatile(&raw const DROP_FILTER.bits[word]) };
    bits >> (reason % 64) & 1 == 1
}

/// A dropped packet's own headers: addresses and ports as on the wire (source first).
struct Packet {
    family: u16,
    protocol: u8,
    tcp_flags: u8,
    sport: u16,
    dport: u16,
    src: [u8; 16],
    dst: [u8; 16],
}

/// How a dropped packet relates to this host.
struct Attribution {
    /// 1: the packet left this host's end; 0: it arrived at it. (Not a `bool`: the BTF rustc
    /// emits for a `Result` of a struct with a niche puts the enum's tag inside a union at a
    /// non-zero offset, which the kernel's BTF check refuses.)
    leaving: u8,
    side: u8,
    owner: Owner,
}

#[inline(always)]
fn on_drop<K: Kernel>(
    k: K,
    skb: u64,
    reason: u32,
    rx_sk: u64,
    protocol: Option<u16>,
) -> Result<(), i32> {
    if skb == 0 {
        return Ok(());
    }
    let protocol = match protocol {
        Some(p) => p,
        None => u16::from_be(k.read::<u16>(skb, offset!(skb_protocol))?),
    };
    if protocol != ETH_P_IP && protocol != ETH_P_IPV6 {
        return Ok(());
    }
    let head = k.read::<u64>(skb, offset!(skb_head))?;
    let network = k.read::<u16>(skb, offset!(skb_network_header))?;
    let Some(packet) = parse(head, network) else {
        return Ok(());
    };
    let sk = match rx_sk {
        0 => k.read::<u64>(skb, offset!(skb_sk))?,
        sk => sk,
    };
    let attribution = attribute(k, skb, sk, rx_sk != 0, &packet)?;
    let dns = packet.sport == DNS_PORT || packet.dport == DNS_PORT;
    if dns || packet.tcp_flags & (TCP_SYN | TCP_RST) != 0 {
        report(&packet, &attribution, reason);
    } else {
        count(&packet, &attribution, reason);
    }
    Ok(())
}

/// The IP header at `head + network` and the TCP or UDP header after it; `None` for anything
/// else (other protocols, fragments, headers not built yet). Read with `bpf_probe_read_kernel`:
/// the packet sits at a variable offset.
#[inline(never)]
fn parse(head: u64, network: u16) -> Option<Packet> {
    // An skb whose network header was never set (a queued, unsent segment) has 0 here.
    if network == 0 || network == u16::MAX {
        return None;
    }
    let ip = head + u64::from(network);
    // 40 bytes: an IPv6 header, or an IPv4 header and what follows it.
    let hdr = Raw.read::<[u8; 40]>(ip, 0).ok()?;
    let mut packet = Packet {
        family: AF_INET,
        protocol: 0,
        tcp_flags: 0,
        sport: 0,
        dport: 0,
        src: [0; 16],
        dst: [0; 16],
    };
    let l4 = match hdr[0] >> 4 {
        4 => {
            let ihl = u64::from(hdr[0] & 0x0f) * 4;
            let fragment_offset = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
            if ihl < 20 || fragment_offset != 0 {
                return None;
            }
            packet.protocol = hdr[9];
            packet.src[..4].copy_from_slice(&hdr[12..16]);
            packet.dst[..4].copy_from_slice(&hdr[16..20]);
            ip + ihl
        }
        6 => {
            packet.family = AF_INET6;
            packet.protocol = hdr[6];
            packet.src.copy_from_slice(&hdr[8..24]);
            packet.dst.copy_from_slice(&hdr[24..40]);
            ip + 40
        }
        _ => return None,
    };
    let tcp = u16::from(packet.protocol) == IPPROTO_TCP;
    if !tcp && packet.protocol != IPPROTO_UDP {
        return None;
    }
    let ports = Raw.read::<[u8; 14]>(l4, 0).ok()?;
    packet.sport = u16::from_be_bytes([ports[0], ports[1]]);
    packet.dport = u16::from_be_bytes([ports[2], ports[3]]);
    if tcp {
        packet.tcp_flags = ports[13];
    } else if packet.sport != DNS_PORT && packet.dport != DNS_PORT {
        return None;
    }
    Some(packet)
}

/// Which way the packet went, which end this host is, and whose connection it is.
#[inline(never)]
fn attribute<K: Kernel>(
    k: K,
    skb: u64,
    sk: u64,
    received: bool,
    packet: &Packet,
) -> Result<Attribution, i32> {
    // The socket's port says which end of the packet it is; a socket of neither end (the
    // kernel's own control socket that sends resets) does not count.
    let (leaving, namespace) = if sk != 0 {
        let port = k.read::<u16>(sk, offset!(skc_num))?;
        let leaving = if received || port != packet.sport {
            (port == packet.dport).then_some(false)
        } else {
            Some(true)
        };
        (leaving, netns(k, sk)?)
    } else {
        (None, device_netns(k, skb)?)
    };
    let syn = packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let syn_ack = packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    let mut attribution = match leaving {
        Some(leaving) => match connect_of(packet, leaving) {
            Some(owner) => Attribution {
                leaving: u8::from(leaving),
                side: side::CLIENT,
                owner,
            },
            None => served(namespace, packet, leaving),
        },
        // No socket: a local connect's packet dropped on its way (a SYN), a reply to one (a
        // SYN-ACK), or a packet that arrived for this host.
        None => {
            let sent = if syn_ack {
                None
            } else {
                connect_of(packet, true)
            };
            let answered = match (&sent, syn) {
                (None, false) => connect_of(packet, false),
                _ => None,
            };
            match (sent, answered) {
                (Some(owner), _) => Attribution {
                    leaving: 1,
                    side: side::CLIENT,
                    owner,
                },
                (None, Some(owner)) => Attribution {
                    leaving: 0,
                    side: side::CLIENT,
                    owner,
                },
                (None, None) => {
                    let mut arrived = served(namespace, packet, false);
                    if arrived.side == side::UNKNOWN {
                        // A SYN is a connection attempt to this host, a SYN-ACK the answer to one
                        // it made.
                        if syn {
                            arrived.side = side::SERVER;
                        } else if syn_ack {
                            arrived.side = side::CLIENT;
                        }
                    }
                    arrived
                }
            }
        }
    };
    // A DNS packet: the end on port 53 is the server.
    let (local, remote) = if attribution.leaving != 0 {
        (packet.sport, packet.dport)
    } else {
        (packet.dport, packet.sport)
    };
    if remote == DNS_PORT && attribution.side == side::UNKNOWN {
        attribution.side = side::CLIENT;
    } else if local == DNS_PORT && attribution.side == side::UNKNOWN {
        attribution.side = side::SERVER;
    }
    Ok(attribution)
}

/// The connect in flight this packet belongs to, if this host started one: `local_is_src` says
/// which end of the packet is this host's. Its owner, where the match is certain.
#[inline(always)]
fn connect_of(packet: &Packet, local_is_src: bool) -> Option<Owner> {
    let matched = if local_is_src {
        connects::lookup(
            packet.family,
            &packet.src,
            &packet.dst,
            packet.sport,
            packet.dport,
        )
    } else {
        connects::lookup(
            packet.family,
            &packet.dst,
            &packet.src,
            packet.dport,
            packet.sport,
        )
    }?;
    Some(match matched {
        Match::Connect(owner) => owner,
        Match::Neighbour => unknown_owner(side::CLIENT),
    })
}

/// The side and owner of a packet of a connection this host did not start: a listener on its
/// port makes this host the server.
#[inline(always)]
fn served(namespace: u32, packet: &Packet, leaving: bool) -> Attribution {
    let port = if leaving { packet.sport } else { packet.dport };
    let key = ListenerKey {
        netns: namespace,
        port,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    match unsafe { LISTENERS.get(&key) } {
        Some(listener) if u16::from(packet.protocol) == IPPROTO_TCP => {
            let mut owner = listener.owner;
            owner.side = side::SERVER;
            Attribution {
                leaving: u8::from(leaving),
                side: side::SERVER,
                owner,
            }
        }
        _ => Attribution {
            leaving: u8::from(leaving),
            side: side::UNKNOWN,
            owner: unknown_owner(side::UNKNOWN),
        },
    }
}

/// The network namespace of the device the packet was on (`skb->dev->nd_net`), 0 without one.
#[inline(always)]
fn device_netns<K: Kernel>(k: K, skb: u64) -> Result<u32, i32> {
    let dev = k.read::<u64>(skb, offset!(skb_dev))?;
    if dev == 0 {
        return Ok(0);
    }
    let net = k.read::<u64>(dev, offset!(dev_nd_net))?;
    if net == 0 {
        return Ok(0);
    }
    k.read::<u32>(net, offset!(net_ns_inum))
}

/// The packet's ends seen from this host.
#[inline(always)]
fn endpoints(packet: &Packet, leaving: bool) -> Endpoints {
    let (local_addr, remote_addr, local_port, remote_port) = if leaving {
        (packet.src, packet.dst, packet.sport, packet.dport)
    } else {
        (packet.dst, packet.src, packet.dport, packet.sport)
    };
    Endpoints {
        family: packet.family,
        local_port,
        remote_port,
        _pad: 0,
        local_addr,
        remote_addr,
    }
}

fn direction_of(attribution: &Attribution) -> u8 {
    if attribution.leaving != 0 {
        direction::SENT
    } else {
        direction::RECEIVED
    }
}

/// A handshake segment or a DNS packet: an event of its own.
#[inline(never)]
fn report(packet: &Packet, attribution: &Attribution, reason: u32) {
    let mut owner = attribution.owner;
    owner.side = attribution.side;
    let event = DropEvent {
        header: header(EventKind::Drop, now_ns()),
        endpoints: endpoints(packet, attribution.leaving != 0),
        owner,
        reason,
        protocol: packet.protocol,
        tcp_flags: packet.tcp_flags,
        direction: direction_of(attribution),
        _pad: 0,
    };
    emit(EventKind::Drop, event);
}

/// A data segment (or a FIN): counted for its connection and reason.
#[inline(never)]
fn count(packet: &Packet, attribution: &Attribution, reason: u32) {
    let key = DropKey {
        endpoints: endpoints(packet, attribution.leaving != 0),
        reason,
        side: attribution.side,
        direction: direction_of(attribution),
        protocol: packet.protocol,
        _pad: 0,
    };
    bump(Counter::CountedDrops);
    if let Some(n) = DROP_COUNTS.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot of a valid map value: no other writer while the program runs.
        unsafe { *n += 1 };
        return;
    }
    // BPF_NOEXIST: another CPU that inserted the key first keeps its count; this CPU's slot of
    // its entry is added to then.
    if DROP_COUNTS.insert(&key, &1, 1).is_err()
        && let Some(n) = DROP_COUNTS.get_ptr_mut(&key)
    {
        // SAFETY: as above.
        unsafe { *n += 1 };
    }
}
