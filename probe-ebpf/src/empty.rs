//! Empty programs on the same hooks, attached only by `connprobe run --hooks empty`: the cost of
//! the hooks alone, the floor the benchmark compares connprobe against.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tcp_state_empty(_ctx: BtfTracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_empty(_ctx: BtfTracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack_empty(_ctx: BtfTracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset_empty(_ctx: BtfTracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset_empty(_ctx: BtfTracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn tcp_destroy_empty(_ctx: BtfTracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn sock_error_empty(_ctx: BtfTracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn drop_empty(_ctx: BtfTracePointContext) -> u32 {
    0
}
