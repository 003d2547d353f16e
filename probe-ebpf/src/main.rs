//! connprobe's eBPF programs: TCP connect lifecycle, socket errors, retransmits and resets, from
//! tracepoints only.
//!
//! Every hook family has a BTF-typed tracepoint (`tp_btf`, cheapest, no tracefs) and a classic
//! tracepoint as the fallback; both hand the same pointers to one shared handler.
#![no_std]
#![no_main]

mod access;
mod backend;
mod connects;
mod dns;
mod drops;
mod emit;
mod empty;
mod listeners;
mod maps;
mod sock;
mod sock_error;
mod tcp_reset;
mod tcp_retransmit;
mod tcp_state;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
