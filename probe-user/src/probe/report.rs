//! What `connprobe probe` says per target: the probe's own count of outcomes beside the kernel's
//! view of the same sockets (its reason for each failure, SYN retransmits, handshake latency)
//! and the verdict engine's judgement of those events. Pure: unit-tested without a kernel.
use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use serde::Serialize;

use super::target::Target;
use crate::{
    diagnose::{Judge, Verdict, render},
    event::{ConnectOutcome, Event, EventDetail},
    quantile,
};

/// How one connect ended, as the probe saw it from `connect()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptResult {
    Established,
    /// What `connect()` returned (`ECONNREFUSED`), `timeout` when `--timeout` ran out first, or
    /// the local error that kept the socket from being made (`bind: EADDRINUSE`).
    Failed(String),
}

/// Handshake times of the established connects, from the kernel's events, in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TargetReport {
    /// As given on the command line.
    pub target: String,
    /// The address connected to.
    pub address: String,
    pub attempts: u64,
    /// Connects that `connect()` reported established.
    pub established: u64,
    pub failed: u64,
    /// The kernel's reason for each failed connect of these sockets (`refused`, `timeout`,
    /// `unreachable`, `cancelled`: the probe closed the socket first, on `--timeout`, `other`).
    pub reasons: BTreeMap<String, u64>,
    /// What `connect()` returned for each failure.
    pub errors: BTreeMap<String, u64>,
    /// Attempts whose connect the kernel's events did not show (lost, or never started).
    pub unseen: u64,
    /// SYNs the kernel sent again, over all these connects.
    pub syn_retransmits: u64,
    /// `None` when nothing was established.
    pub handshake_ms: Option<Percentiles>,
    /// The verdict engine's, ranked, most likely first.
    pub verdicts: Vec<Verdict>,
}

impl TargetReport {
    /// Folds the probe's results for `target` and the kernel's events of its sockets (every
    /// event kept, for every target: the engine judges them together, as `analyze` would).
    pub fn new(target: &Target, results: &[AttemptResult], events: &[Event]) -> Self {
        let mine = |e: &&Event| e.dst.socket_addr() == target.addr;
        let mut reasons = BTreeMap::new();
        let mut seen = 0;
        let mut syn_retransmits = 0;
        let mut latencies_us = Vec::new();
        for event in events.iter().filter(mine) {
            let EventDetail::Connect(connect) = &event.detail else {
                continue;
            };
            seen += 1;
            syn_retransmits += u64::from(connect.syn_retransmits);
            match connect.outcome {
                ConnectOutcome::Established => {
                    latencies_us.extend(connect.latency.map(|l| l.as_micros() as u64))
                }
                ConnectOutcome::Failed { reason, .. } => {
                    *reasons.entry(reason.name().to_string()).or_insert(0) += 1
                }
            }
        }
        latencies_us.sort_unstable();
        let ms = |q| quantile::of_sorted(&latencies_us, q).map(|us| us as f64 / 1000.0);
        let handshake_ms = match (ms(0.5), ms(0.9), ms(0.99)) {
            (Some(p50), Some(p90), Some(p99)) => Some(Percentiles { p50, p90, p99 }),
            _ => None,
        };
        let mut errors = BTreeMap::new();
        for result in results {
            if let AttemptResult::Failed(why) = result {
                *errors.entry(why.clone()).or_insert(0) += 1;
            }
        }
        let attempts = results.len() as u64;
        let failed = errors.values().sum::<u64>();
        TargetReport {
            target: target.name.clone(),
            address: target.addr.to_string(),
            attempts,
            established: attempts - failed,
            failed,
            reasons,
            errors,
            unseen: attempts.saturating_sub(seen),
            syn_retransmits,
            handshake_ms,
            verdicts: verdicts_of(target.addr, events),
        }
    }

    /// The paragraph for people: counts, the kernel's reasons, SYN retransmits, handshake
    /// percentiles, then the verdict as `connprobe analyze` words it.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let name = match self.target == self.address {
            true => self.target.clone(),
            false => format!("{} ({})", self.target, self.address),
        };
        let _ = writeln!(
            out,
            "{name}: {} attempts, {} established, {} failed",
            self.attempts, self.established, self.failed
        );
        if self.failed > 0 {
            let _ = writeln!(
                out,
                "  kernel's reasons: {}; connect() returned: {}",
                counts(&self.reasons),
                counts(&self.errors)
            );
        }
        if self.unseen > 0 {
            let _ = writeln!(
                out,
                "  {} connects not seen in the kernel's events",
                self.unseen
            );
        }
        let _ = writeln!(out, "  SYN retransmits: {}", self.syn_retransmits);
        match &self.handshake_ms {
            Some(p) => {
                let _ = writeln!(
                    out,
                    "  handshake: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms",
                    p.p50, p.p90, p.p99
                );
            }
            None => out.push_str("  handshake: none established\n"),
        }
        let mut lines = render::paragraph_lines("verdict", Some("client"), &self.verdicts)
            .into_iter()
            .peekable();
        if lines.peek().is_none() {
            out.push_str("  verdict: none (no events of these connects)\n");
        }
        for (i, line) in lines.enumerate() {
            let indent = if i == 0 { "  " } else { "    " };
            let _ = writeln!(out, "{indent}{line}");
        }
        out
    }
}

/// `refused 10, timeout 2`; `none` when empty.
fn counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The engine's verdicts on the client destination `addr`, over every event of the run.
fn verdicts_of(addr: SocketAddr, events: &[Event]) -> Vec<Verdict> {
    let mut judge = Judge::new(None);
    for event in events {
        judge.add(event);
    }
    let wanted = addr.to_string();
    judge
        .finish()
        .destinations
        .into_iter()
        .find(|d| d.destination == wanted && d.side.as_deref() != Some("server"))
        .map(|d| d.verdicts)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{
        diagnose::VerdictId,
        event::{Connect, Endpoint, FailureReason, Side},
    };

    fn connect(port: u16, target: SocketAddr, outcome: ConnectOutcome, ms: u64) -> Event {
        Event {
            seq: 0,
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            process: None,
            side: Some(Side::Client),
            src: Endpoint::new("10.0.0.1".parse().unwrap(), port),
            dst: target.into(),
            detail: EventDetail::Connect(Connect {
                outcome,
                latency: Some(Duration::from_millis(ms)),
                syn_retransmits: if ms > 1000 { 2 } else { 0 },
                dst_name: None,
            }),
            workload: None,
            backend: None,
        }
    }

    fn target(addr: &str) -> Target {
        Target {
            name: addr.into(),
            addr: addr.parse().unwrap(),
        }
    }

    #[test]
    fn refused_connects_count_by_the_kernels_reason() {
        let t = target("10.0.0.2:8081");
        let refused = ConnectOutcome::failed(libc::ECONNREFUSED as u32);
        let events: Vec<Event> = (0..10)
            .map(|i| connect(40000 + i, t.addr, refused, 1))
            .collect();
        let results = vec![AttemptResult::Failed("ECONNREFUSED".into()); 10];
        let r = TargetReport::new(&t, &results, &events);
        assert_eq!(
            (r.attempts, r.established, r.failed, r.unseen),
            (10, 0, 10, 0)
        );
        assert_eq!(r.reasons, BTreeMap::from([("refused".to_string(), 10)]));
        assert_eq!(r.errors, BTreeMap::from([("ECONNREFUSED".to_string(), 10)]));
        assert_eq!(r.handshake_ms, None);
        assert_eq!(r.verdicts[0].id(), VerdictId::Refused);
        let text = r.text();
        assert!(text.contains("kernel's reasons: refused 10"), "{text}");
        assert!(text.contains("verdict: refused"), "{text}");
    }

    #[test]
    fn established_connects_give_percentiles_and_other_targets_stay_apart() {
        let t = target("10.0.0.2:8080");
        let other = target("10.0.0.2:8082");
        let mut events: Vec<Event> = (1..=10)
            .map(|ms| connect(40000 + ms as u16, t.addr, ConnectOutcome::Established, ms))
            .collect();
        let cancelled = ConnectOutcome::Failed {
            reason: FailureReason::Cancelled,
            errno: None,
        };
        events.push(connect(50000, other.addr, cancelled, 2000));
        let results = vec![AttemptResult::Established; 10];
        let r = TargetReport::new(&t, &results, &events);
        assert_eq!((r.established, r.failed, r.syn_retransmits), (10, 0, 0));
        assert!(r.reasons.is_empty());
        let p = r.handshake_ms.clone().unwrap();
        assert_eq!((p.p50, p.p90, p.p99), (5.0, 9.0, 10.0));
        assert_eq!(r.verdicts[0].id(), VerdictId::Healthy);
        let r = TargetReport::new(&other, &[AttemptResult::Failed("timeout".into())], &events);
        assert_eq!((r.failed, r.syn_retransmits, r.unseen), (1, 2, 0));
        assert_eq!(r.reasons, BTreeMap::from([("cancelled".to_string(), 1)]));
    }

    #[test]
    fn attempts_the_kernel_did_not_show_are_counted() {
        let t = target("[fd00::2]:8080");
        let results = vec![AttemptResult::Failed("bind: EADDRINUSE".into())];
        let r = TargetReport::new(&t, &results, &[]);
        assert_eq!((r.unseen, r.failed), (1, 1));
        assert!(r.verdicts.is_empty());
        assert!(r.text().contains("verdict: none"), "{}", r.text());
    }
}
