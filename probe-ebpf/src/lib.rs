#![no_std]
// The library target exists so that probe-user can name this crate as a build dependency; the
// programs are in the `probe-ebpf` binary (src/main.rs), built for bpfel-unknown-none.
