//! connprobe's agent, top to bottom as the data flows:
//! kernel offsets (`btf`, `offsets`) -> `loader` -> `reader` (ring buffer) -> `decode` -> `event`
//! -> consumers: `export::json_log`, the aggregator and Prometheus exporter, the verdict engine.
//! `pipeline` wires them together and handles shutdown; `cli` is the command line.
pub mod aggregate;
pub mod btf;
pub mod cli;
pub mod decode;
pub mod diagnose;
pub mod event;
pub mod export;
pub mod listeners;
pub mod loader;
pub mod offsets;
pub mod pipeline;
pub mod privileges;
pub mod reader;
