//! The connects in flight ([`CONNECTS`]): kept from `connect()` until the handshake ends, so that
//! a dropped packet without a socket (a SYN a firewall dropped before any socket lookup, a reply
//! dropped on its way back) can be matched to the connect it belongs to by its own headers.
//!
//! A socket bound before `connect()` (or in the connect itself, for the lab's and curl's
//! `--local-port` clients) is known by its whole tuple. An unbound one gets its port only after
//! the CLOSE -> SYN_SENT transition is traced, so it is kept under port 0 until its end: a packet
//! matched there is its connect's only if the socket's port is the packet's; several unbound
//! connects to one destination from one address at once share that key (the last one is kept).
use probe_common::{AF_INET, AF_INET6, ConnectInFlight, ConnectKey, Endpoints, Owner};

use crate::{
    access::{Kernel, Raw},
    emit::connect_owner,
    maps::{CONNECTS, offset},
    sock::endpoints,
};

/// The key of a connect from `local_addr` to `remote_addr:remote_port`, IPv4-mapped IPv6
/// addresses as IPv4 (the packets of such a socket are IPv4).
#[inline(always)]
pub fn key(
    family: u16,
    local_addr: &[u8; 16],
    remote_addr: &[u8; 16],
    local_port: u16,
    remote_port: u16,
) -> ConnectKey {
    let mut key = ConnectKey {
        family,
        local_port,
        remote_port,
        _pad: 0,
        local_addr: *local_addr,
        remote_addr: *remote_addr,
    };
    if family == AF_INET6 && is_v4_mapped(local_addr) && is_v4_mapped(remote_addr) {
        key.family = AF_INET;
        key.local_addr = [0; 16];
        key.remote_addr = [0; 16];
        key.local_addr[..4].copy_from_slice(&local_addr[12..]);
        key.remote_addr[..4].copy_from_slice(&remote_addr[12..]);
    }
    key
}

#[inline(always)]
fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff
}

#[inline(always)]
fn key_of(ep: &Endpoints, local_port: u16) -> ConnectKey {
    key(
        ep.family,
        &ep.local_addr,
        &ep.remote_addr,
        local_port,
        ep.remote_port,
    )
}

/// `connect()` moved `sk` to SYN_SENT, in the connecting process: it is the owner. The local
/// port is 0 when the socket was not bound.
///
/// This and [`ended`] are BPF functions of their own, called beside `tcp_state`'s handlers
/// rather than from them, and read the socket themselves: their keys and endpoints then take no
/// room in a handler's frame (see `tcp_state::Transition`).
#[inline(never)]
pub fn started<K: Kernel>(k: K, sk: u64) -> Result<(), i32> {
    let ep = endpoints(k, sk)?;
    let _ = CONNECTS.insert(
        &key_of(&ep, ep.local_port),
        &ConnectInFlight {
            sk,
            owner: connect_owner(),
        },
        0,
    );
    Ok(())
}

/// The handshake of `sk` ended; its local port is known now. An established connect is no
/// longer in flight; a failed one stays under its whole tuple until evicted, so that a reply
/// that comes after the client gave up is still matched to it.
#[inline(never)]
pub fn ended<K: Kernel>(k: K, sk: u64, established: bool) -> Result<(), i32> {
    let ep = endpoints(k, sk)?;
    let whole = key_of(&ep, ep.local_port);
    let unbound = key_of(&ep, 0);
    // SAFETY: the value is copied out at once.
    let kept_unbound = unsafe { CONNECTS.get(&unbound) }.is_some_and(|c| c.sk == sk);
    if established {
        if kept_unbound {
            let _ = CONNECTS.remove(&unbound);
        } else {
            let _ = CONNECTS.remove(&whole);
        }
    } else if kept_unbound {
        // SAFETY: as above.
        if let Some(connect) = unsafe { CONNECTS.get(&unbound) }.copied() {
            let _ = CONNECTS.insert(&whole, &connect, 0);
            let _ = CONNECTS.remove(&unbound);
        }
    }
    Ok(())
}

/// What a matched packet says about its connect.
pub enum Match {
    /// The connect it belongs to, and its owner.
    Connect(Owner),
    /// A connect from the same address to the same destination is in flight, but not this
    /// packet's: another socket of this host's, whose owner is not known.
    Neighbour,
}

/// The connect in flight that a packet from `local` to `remote` belongs to.
#[inline(always)]
pub fn lookup(
    family: u16,
    local_addr: &[u8; 16],
    remote_addr: &[u8; 16],
    local_port: u16,
    remote_port: u16,
) -> Option<Match> {
    let whole = key(family, local_addr, remote_addr, local_port, remote_port);
    // SAFETY: the value is copied out at once.
    if let Some(connect) = unsafe { CONNECTS.get(&whole) } {
        return Some(Match::Connect(connect.owner));
    }
    let unbound = key(family, local_addr, remote_addr, 0, remote_port);
    // SAFETY: as above.
    let connect = *unsafe { CONNECTS.get(&unbound) }?;
    let port = Raw.read::<u16>(connect.sk, offset!(skc_num)).unwrap_or(0);
    Some(if port == local_port {
        Match::Connect(connect.owner)
    } else {
        Match::Neighbour
    })
}
