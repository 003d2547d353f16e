//! Listening sockets and their owners: `listen()` runs in the owning process, so the owner is
//! known there; the connections a listener accepts appear later in softirq context, where the
//! current task is whoever ran, and take the listener's owner instead.
use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use probe_common::{ListenerKey, ListenerRecord, Owner, side};

use crate::{
    access::Kernel,
    emit::{current_owner, unknown_owner},
    maps::{LISTENERS, offset},
    sock::{local_port, netns},
};

#[inline(always)]
fn key<K: Kernel>(k: K, sk: u64, port: u16) -> Result<ListenerKey, i32> {
    Ok(ListenerKey {
        netns: netns(k, sk)?,
        port,
        _pad: 0,
    })
}

/// CLOSE -> LISTEN, inside `listen()`. The port is bound already (`skc_num`); `inet_sport` is set
/// only after this transition; `listen()` has set the backlog before. With SO_REUSEPORT several processes listen on one port: the last
/// one to call `listen()` names them all.
#[inline(always)]
pub fn listen<K: Kernel>(k: K, sk: u64) -> Result<(), i32> {
    let port = k.read::<u16>(sk, offset!(skc_num))?;
    let record = ListenerRecord {
        sk,
        owner: current_owner(side::SERVER),
        backlog: k.read::<u32>(sk, offset!(sk_max_ack_backlog))?,
        tid: bpf_get_current_pid_tgid() as u32,
    };
    let _ = LISTENERS.insert(&key(k, sk, port)?, &record, 0);
    Ok(())
}

/// LISTEN -> CLOSE: forget the listener, unless another socket took the port over since (a
/// restart with SO_REUSEPORT). A listener found at start-up (`sk == 0`) goes with the first close.
/// The port comes from `inet_sport`: CLOSE may have released `skc_num` already.
#[inline(always)]
pub fn unlisten<K: Kernel>(k: K, sk: u64) -> Result<(), i32> {
    let key = key(k, sk, local_port(k, sk)?)?;
    // SAFETY: the value is copied out at once.
    if let Some(record) = unsafe { LISTENERS.get(&key) }
        && (record.sk == sk || record.sk == 0)
    {
        let _ = LISTENERS.remove(&key);
    }
    Ok(())
}

/// The owner of the listener on `port` in the namespace of `sk` (a socket of that namespace:
/// the listener itself, or a connection it accepted), marked as the server side.
#[inline(always)]
pub fn listener_owner<K: Kernel>(k: K, sk: u64, port: u16) -> Result<Owner, i32> {
    // SAFETY: the value is copied out at once.
    Ok(match unsafe { LISTENERS.get(&key(k, sk, port)?) } {
        Some(record) => {
            let mut owner = record.owner;
            owner.side = side::SERVER;
            owner
        }
        None => unknown_owner(side::SERVER),
    })
}
