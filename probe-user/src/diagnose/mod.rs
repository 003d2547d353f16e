//! Root-cause verdicts: why connections to a destination fail.
//!
//! Top to bottom: `engine` judges a sequence of events (one pure function, `judge`) into a
//! `verdict::Report`; `render` turns a report into text for people. Three entry points feed it:
//! `analyze` (a JSON event log, after the fact), `client` (`connprobe diagnose` asking a running
//! agent, and the agent's `/diagnose` handler), and `recorder` + `evidence` (the agent's flight
//! recorder of recent events, and the evidence bundles it writes when a destination crosses a
//! trigger threshold).
mod after_dns;
pub mod analyze;
mod backends;
pub mod client;
pub mod engine;
pub mod evidence;
pub mod fleet;
mod fold;
pub mod pattern;
mod processes;
mod record;
pub mod recorder;
pub mod render;
pub mod rules;
pub mod summary;
pub mod verdict;

use std::time::SystemTime;

pub use analyze::run_analyze;
pub use client::{diagnose_handler, run_diagnose};
pub use engine::{Judge, Window, judge, judge_with_dns};
pub use evidence::{EvidenceError, EvidenceWriter, TriggerConfig};
pub use recorder::FlightRecorder;
pub use summary::DestinationSummary;
pub use verdict::{Report, Verdict, VerdictId};

/// Times in reports: RFC 3339 UTC with milliseconds. Milliseconds, not the log's microseconds:
/// truncating nanoseconds or microseconds to milliseconds gives the same text, so a report from
/// the agent and one from its log agree.
pub(crate) fn format_time(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// Rounds figures in reports so they print and compare cleanly.
pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}
