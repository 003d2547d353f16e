//! The pool behind one virtual address: connects to a DNAT'd destination grouped by the backend
//! their SYN reached (`Event::backend`). One or a few backends failing while the others work is
//! `pool_partial_failure` for that address, naming the bad backend: "behind 10.96.0.10:80,
//! backend 10.1.4.7:8080 refuses".
use std::{collections::BTreeMap, time::SystemTime};

use strum::{EnumCount, VariantArray as _};

use super::{
    fold::FailedConnect,
    round,
    rules::{POOL_MIN_ATTEMPTS, PoolSplit, confidence, ratio, split_pool, verdict_for_pool},
    verdict::{GroupReport, PoolFigures, PoolMember},
};
use crate::event::{ConnectOutcome, Endpoint, Event, EventDetail, FailureReason, Side};

/// Connects to one backend behind one virtual address.
#[derive(Clone, Debug)]
pub(super) struct BackendEvidence {
    attempts: u64,
    failures: [u64; FailureReason::COUNT],
    failed: Vec<FailedConnect>,
    first: SystemTime,
    last: SystemTime,
}

impl BackendEvidence {
    fn failures_total(&self) -> u64 {
        self.failures.iter().sum()
    }

    fn failure_ratio(&self) -> f64 {
        ratio(self.failures_total(), self.attempts)
    }

    /// What the backend does to most of its failed connects, as a verb.
    fn failing_verb(&self) -> &'static str {
        let worst = FailureReason::VARIANTS
            .iter()
            .max_by_key(|r| self.failures[**r as usize])
            .copied()
            .unwrap_or(FailureReason::Other);
        match worst {
            FailureReason::Refused => "refuses",
            FailureReason::Timeout => "times out",
            FailureReason::Unreachable => "is unreachable",
            FailureReason::Cancelled | FailureReason::Other => "fails",
        }
    }
}

/// Translated connects by virtual address, then backend.
#[derive(Default)]
pub(super) struct Pools {
    by_address: BTreeMap<Endpoint, BTreeMap<Endpoint, BackendEvidence>>,
}

impl Pools {
    pub(super) fn add(&mut self, event: &Event) {
        let (Some(backend), EventDetail::Connect(c)) = (event.backend, &event.detail) else {
            return;
        };
        if event.side == Some(Side::Server) {
            return;
        }
        let ev = self
            .by_address
            .entry(event.dst)
            .or_default()
            .entry(backend)
            .or_insert_with(|| BackendEvidence {
                attempts: 0,
                failures: [0; FailureReason::COUNT],
                failed: Vec::new(),
                first: event.time,
                last: event.time,
            });
        ev.attempts += 1;
        ev.first = ev.first.min(event.time);
        ev.last = ev.last.max(event.time);
        if let ConnectOutcome::Failed { reason, .. } = c.outcome {
            ev.failures[reason as usize] += 1;
            ev.failed.push(FailedConnect {
                time: event.time,
                reason,
                syn_retransmits: c.syn_retransmits,
                waited_us: c.latency.map(|l| l.as_micros() as u64),
                local_port: event.src.port(),
                backend: Some(backend),
                name: None,
            });
        }
    }

    /// A `pool_partial_failure` for each virtual address where at most half of its backends
    /// fail (by the same ratios as a pool of destinations) while others work.
    pub(super) fn verdicts(&self) -> Vec<GroupReport> {
        let mut groups = Vec::new();
        for (address, backends) in &self.by_address {
            let members: Vec<_> = backends
                .iter()
                .filter(|(_, ev)| ev.attempts >= POOL_MIN_ATTEMPTS)
                .collect();
            let Some(PoolSplit {
                failing,
                healthy,
                consistency,
            }) = split_pool(&members, |(_, ev)| ev.failure_ratio())
            else {
                continue;
            };
            let failures: u64 = failing.iter().map(|(_, ev)| ev.failures_total()).sum();
            let describe = |list: &[&(&Endpoint, &BackendEvidence)]| -> Vec<PoolMember> {
                list.iter()
                    .map(|(b, ev)| PoolMember {
                        destination: b.to_string(),
                        attempts: ev.attempts,
                        failures: ev.failures_total(),
                        failure_ratio: round(ev.failure_ratio(), 4),
                    })
                    .collect()
            };
            let bad = failing
                .iter()
                .map(|(b, ev)| format!("backend {b} {}", ev.failing_verb()))
                .collect::<Vec<_>>()
                .join(", ");
            let good = healthy
                .iter()
                .map(|(b, _)| b.to_string())
                .collect::<Vec<_>>();
            let good = match good.as_slice() {
                [one] => format!("{one} is healthy"),
                [rest @ .., last] => format!("{} and {last} are healthy", rest.join(", ")),
                [] => unreachable!("checked above"),
            };
            let episodes: Vec<_> = failing
                .iter()
                .flat_map(|(_, ev)| ev.failed.iter().map(FailedConnect::episode))
                .collect();
            let active = members.iter().fold(
                (SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH),
                |(a, b), (_, ev)| match a == SystemTime::UNIX_EPOCH {
                    true => (ev.first, ev.last),
                    false => (a.min(ev.first), b.max(ev.last)),
                },
            );
            let figures = PoolFigures {
                port: address.port(),
                failing: describe(&failing),
                healthy: describe(&healthy),
                members: members.len() as u64,
                behind: Some(address.to_string()),
            };
            groups.push(GroupReport {
                port: address.port(),
                verdicts: vec![verdict_for_pool(
                    figures,
                    confidence(failures, consistency),
                    &episodes,
                    active,
                    format!(
                        "Behind {address}, {bad}; {good}: take the failing backend out of the \
                         service's endpoints (or fix it) rather than looking at the network."
                    ),
                )],
            });
        }
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        diagnose::{
            engine::{Window, judge},
            render,
            verdict::{Finding, VerdictId},
        },
        event::testing::{self, at},
    };

    fn via(backend: &str, mut event: Event) -> Event {
        event.backend = Some(backend.parse().unwrap());
        event
    }

    #[test]
    fn the_refusing_backend_behind_a_virtual_address_is_named() {
        let vip = "10.96.0.10:80";
        let mut events = Vec::new();
        for i in 0..4 {
            let t = at(f64::from(i));
            events.push(via(
                "10.1.4.7:8080",
                testing::client(vip, t, testing::failed(FailureReason::Refused, 0)),
            ));
            events.push(via(
                "10.1.4.8:8080",
                testing::client(vip, t, testing::established(90)),
            ));
            events.push(via(
                "10.1.4.9:8080",
                testing::client(vip, t, testing::established(90)),
            ));
        }
        let report = judge(
            &events,
            Window::ending_at(at(10.0), std::time::Duration::from_secs(60)),
        );
        let pools: Vec<_> = report
            .groups
            .iter()
            .flat_map(|g| &g.verdicts)
            .filter(|v| v.id() == VerdictId::PoolPartialFailure)
            .collect();
        assert_eq!(pools.len(), 1, "{report:#?}");
        let v = pools[0];
        let Finding::PoolPartialFailure(e) = &v.finding else {
            panic!("not a pool verdict")
        };
        assert_eq!(e.figures.behind.as_deref(), Some(vip));
        assert_eq!(e.figures.failing.len(), 1);
        assert_eq!(e.figures.failing[0].destination, "10.1.4.7:8080");
        assert_eq!(e.figures.healthy.len(), 2);
        assert!(
            v.next_step.starts_with(
                "Behind 10.96.0.10:80, backend 10.1.4.7:8080 refuses; 10.1.4.8:8080 and \
                 10.1.4.9:8080 are healthy"
            ),
            "{}",
            v.next_step
        );
        // The destination's own verdict (a third refused) names the backend behind it.
        let vip_report = report
            .destinations
            .iter()
            .find(|d| d.destination == vip)
            .expect("the VIP's report");
        let refused = vip_report
            .verdicts
            .iter()
            .find_map(|v| match &v.finding {
                Finding::Refused(e) => Some(e),
                _ => None,
            })
            .expect("a refused verdict");
        assert_eq!(
            refused.figures.failures.backends,
            [("10.1.4.7:8080".to_string(), 4)].into()
        );
        let text = render::evidence_sentence(&vip_report.verdicts[0].finding);
        assert!(text.contains(", through backend 10.1.4.7:8080"), "{text}");
        let text = render::evidence_sentence(&v.finding);
        assert!(
            text.starts_with("behind 10.96.0.10:80, backends failing: 10.1.4.7:8080"),
            "{text}"
        );
    }

    #[test]
    fn untranslated_connects_make_no_backend_pool() {
        let events: Vec<_> = (0..4)
            .map(|i| {
                testing::client(
                    "10.96.0.10:80",
                    at(f64::from(i)),
                    testing::failed(FailureReason::Refused, 0),
                )
            })
            .collect();
        let mut pools = Pools::default();
        events.iter().for_each(|e| pools.add(e));
        assert!(pools.verdicts().is_empty());
    }
}
