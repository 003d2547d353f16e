//! The namespace lab and the agent harness behind connprobe's kernel tests (`tests/tests/`).
//!
//! A [`Lab`] is two network namespaces (client and server) joined by a veth pair, with IPv4 and
//! IPv6 addresses of their own and nftables faults on the server's input. Test traffic runs on
//! named threads that enter one namespace each ([`Lab::client`], [`Lab::server`]): the thread's
//! name becomes the comm the agent reports, the test process's pid its pid. An [`Agent`] is the
//! real `connprobe` binary (`$CONNPROBE_BIN`) writing a JSON log, and [`expect`] asserts that the
//! log holds exactly the events a scenario predicts for the lab's addresses.
//!
//! Everything here needs root and a kernel that lets connprobe attach; run it through
//! `cargo xtask test`, which builds the agent and sets `CONNPROBE_BIN`.
pub mod agent;
pub mod bpf;
pub mod clients;
pub mod dns_lab;
pub mod events;
pub mod expect;
pub mod http;
pub mod lab;
pub mod netns;
pub mod prometheus;
pub mod seqlog;
pub mod socket;
pub mod storm;
pub mod traffic;
pub mod verdict_lab;

pub use agent::Agent;
pub use expect::{Check, Pattern, assert_exactly, assert_exactly_unless_missed};
pub use lab::Lab;
