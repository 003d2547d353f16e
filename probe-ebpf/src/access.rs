//! How a program reaches kernel memory and the per-socket records: one handler per hook family,
//! built twice.
//!
//! - [`Typed`], for BTF tracepoints: their pointer arguments carry the kernel's BTF type, so the
//!   verifier lets the program load fields directly (checked against BTF, made fault-safe by the
//!   kernel) instead of calling `bpf_probe_read_kernel` per field, and it may keep the socket's
//!   record in the socket itself (`BPF_MAP_TYPE_SK_STORAGE`: no hashing, no LRU lock, freed with
//!   the socket).
//! - [`Raw`], for classic and raw tracepoints: untyped addresses, read with
//!   `bpf_probe_read_kernel`; records in the LRU hash [`SOCKETS`] (or, for the benchmark's
//!   comparison, [`SOCKETS_PER_CPU`], also on BTF tracepoints: see [`RecordStore`]).
//!
//! Offsets come from the agent at load (see `maps::OFFSETS`). A direct load needs the verifier to
//! know its offset: the offsets live in `.rodata`, which the agent freezes before loading, so the
//! verifier reads them as constants.
use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_sk_storage_delete, bpf_sk_storage_get, bpf_skc_to_tcp_sock},
    },
    maps::LruHashMap,
};
use probe_common::{RecordStore, SocketRecord};

use crate::maps::{RECORD_STORE, SOCKET_STORAGE, SOCKETS, SOCKETS_PER_CPU};

/// `BPF_SK_STORAGE_GET_F_CREATE`.
const CREATE: u64 = 1;

pub trait Kernel: Copy {
    /// Reads a `T` at `base + off` in kernel memory.
    fn read<T: Copy>(self, base: u64, off: usize) -> Result<T, i32>;

    /// The socket as a `struct tcp_sock` (which opens with `inet_sock`), the base for reading
    /// `inet_sock` and `tcp_sock` fields. `sk` must be a TCP socket.
    fn tcp(self, sk: u64) -> Result<u64, i32>;

    /// The socket's record, if it is followed.
    fn record(self, sk: u64) -> Option<*mut SocketRecord>;

    /// Starts following the socket with `record`.
    fn follow(self, sk: u64, record: &SocketRecord);

    /// Stops following the socket (`tcp_destroy_sock`; socket storage would go with the socket
    /// by itself, so the agent attaches that hook only for the LRU hash).
    fn forget(self, sk: u64);
}

/// Typed pointers of BTF tracepoints.
#[derive(Clone, Copy)]
pub struct Typed;

/// Untyped addresses of classic and raw tracepoints.
#[derive(Clone, Copy)]
pub struct Raw;

/// Where the records live: socket storage only when every hook family runs on a BTF tracepoint
/// (classic programs cannot reach it, and all must share one store). Frozen before load, so the
/// verifier drops the branches of the other stores.
#[inline(always)]
fn store() -> u32 {
    // SAFETY: a plain read of a load-time constant.
    unsafe { core::ptr::read_volatile(&raw const RECORD_STORE) }
}

#[inline(always)]
fn in_storage() -> bool {
    store() == RecordStore::SocketStorage as u32
}

/// The LRU hash of the records when they are not in socket storage.
#[inline(always)]
fn lru_hash() -> &'static LruHashMap<u64, SocketRecord> {
    if store() == RecordStore::PerCpuLruHash as u32 {
        &SOCKETS_PER_CPU
    } else {
        &SOCKETS
    }
}

/// The socket storage map, as the helpers take it.
#[inline(always)]
fn storage() -> *mut core::ffi::c_void {
    (&raw const SOCKET_STORAGE).cast_mut().cast()
}

impl Kernel for Typed {
    #[inline(always)]
    fn read<T: Copy>(self, base: u64, off: usize) -> Result<T, i32> {
        // SAFETY: `base` is a BTF-typed kernel pointer (or derived from one by a constant
        // offset); the verifier checks the access against the kernel's BTF and the kernel turns
        // it into a fault-safe load.
        Ok(unsafe { core::ptr::read((base as usize + off) as *const T) })
    }

    #[inline(always)]
    fn tcp(self, sk: u64) -> Result<u64, i32> {
        // SAFETY: `sk` is a BTF-typed socket pointer; the helper returns NULL for other kinds.
        match unsafe { bpf_skc_to_tcp_sock(sk as *mut _) } as u64 {
            0 => Err(-22),
            tcp => Ok(tcp),
        }
    }

    #[inline(always)]
    fn record(self, sk: u64) -> Option<*mut SocketRecord> {
        if !in_storage() {
            return Raw.record(sk);
        }
        // SAFETY: a BTF-typed socket pointer; no value, no flags: a lookup.
        let rec = unsafe { bpf_sk_storage_get(storage(), sk as *mut _, core::ptr::null_mut(), 0) };
        (!rec.is_null()).then_some(rec.cast())
    }

    #[inline(always)]
    fn follow(self, sk: u64, record: &SocketRecord) {
        if !in_storage() {
            return Raw.follow(sk, record);
        }
        // SAFETY: a BTF-typed socket pointer; `record` initialises a new entry (an existing one
        // is returned as is and overwritten below).
        let rec = unsafe {
            bpf_sk_storage_get(
                storage(),
                sk as *mut _,
                (record as *const SocketRecord).cast_mut().cast(),
                CREATE,
            )
        };
        if !rec.is_null() {
            // SAFETY: a valid map value of the right type while the program runs.
            unsafe { *rec.cast::<SocketRecord>() = *record };
        }
    }

    #[inline(always)]
    fn forget(self, sk: u64) {
        if !in_storage() {
            return Raw.forget(sk);
        }
        // SAFETY: a BTF-typed socket pointer.
        let _ = unsafe { bpf_sk_storage_delete(storage(), sk as *mut _) };
    }
}

impl Kernel for Raw {
    #[inline(always)]
    fn read<T: Copy>(self, base: u64, off: usize) -> Result<T, i32> {
        // SAFETY: the helper checks the address and fails without faulting.
        unsafe { bpf_probe_read_kernel((base as usize + off) as *const T) }
    }

    #[inline(always)]
    fn tcp(self, sk: u64) -> Result<u64, i32> {
        Ok(sk)
    }

    #[inline(always)]
    fn record(self, sk: u64) -> Option<*mut SocketRecord> {
        lru_hash().get_ptr_mut(&sk)
    }

    #[inline(always)]
    fn follow(self, sk: u64, record: &SocketRecord) {
        let _ = lru_hash().insert(&sk, record, 0);
    }

    #[inline(always)]
    fn forget(self, sk: u64) {
        let _ = lru_hash().remove(&sk);
    }
}
