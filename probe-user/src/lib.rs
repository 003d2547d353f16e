//! connprobe's agent, top to bottom as the data flows:
//! kernel offsets (`btf`, `offsets`) -> `loader` -> `reader` (ring buffer) -> `decode` ->
//! `event` (the typed event; `samplers` make more from counts the agent reads each second;
//! `schema` is its JSON form) -> `aggregate` (the one owner of
//! per-destination state, keyed by `destination`) -> readers of that state: `export`
//! (Prometheus, the `/destinations` view; the JSON log takes the events) and `diagnose` (verdicts,
//! flight recorder, evidence bundles). `tally` counts what was delivered and lost.
//! `pipeline` wires them together and handles shutdown; `cli` is the command line, `logging`
//! its stderr. `top` is the live console on a running agent (it reads `export::view`); `watch` runs
//! a command under the pipeline and judges only that command's connections (CI checks);
//! `probe` is the active check: it connects to targets and runs the loader, reader and
//! decoder in-process to judge its own sockets with `diagnose`.
//! The reader gives each event its owner's `workload` (cgroup, container, pod) and, behind a
//! DNAT'd address, its `backend`.
pub mod aggregate;
pub mod backend;
pub mod btf;
pub mod cli;
pub mod decode;
pub mod destination;
pub mod diagnose;
pub mod dns;
pub mod event;
pub mod export;
pub mod listeners;
pub mod loader;
pub mod logging;
pub mod offsets;
pub mod own_traffic;
pub mod pipeline;
pub mod privileges;
pub mod probe;
pub mod quantile;
pub mod reader;
pub mod samplers;
pub mod schema;
pub mod tally;
pub mod top;
pub mod units;
pub mod watch;
pub mod workload;
