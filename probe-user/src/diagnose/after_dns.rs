//! The join of a destination's failures with the DNS queries for its name: a failed connect
//! whose `dst_name` had a query go unanswered shortly before it failed says so in its verdict
//! (`FailureFigures::after_dns_timeout`). The unanswered queries are kept by name, bounded.
use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::{
    fold::{DestinationEvidence, FailedConnect, truncate_to_millis},
    verdict::{AfterDnsTimeout, NameFailures},
};
use crate::{
    dns::exchange::{DnsExchange, DnsOutcome},
    event::{Endpoint, Side},
};

/// A failure follows an unanswered query for its name when the query was sent at most this
/// long before the connect failed: glibc gives up on a silent resolver after 5 s per try
/// (`timeout:5`, `attempts:2` by default), retries, and the application connects to what it
/// got (an older answer, the other family, a second resolver) and fails seconds later.
pub const AFTER_DNS_TIMEOUT: Duration = Duration::from_secs(30);

/// Unanswered queries kept (the DNS path keeps as many recent exchanges); past it, newer
/// timeouts are not joined.
pub const TIMEOUTS_KEPT: usize = 20_000;

/// Names and resolvers listed in the evidence.
const LISTED: usize = 5;

/// Client-side queries that got no answer, by name: when each was sent, and to which resolver.
#[derive(Debug, Default)]
pub(super) struct DnsTimeouts {
    by_name: HashMap<Arc<str>, Vec<(SystemTime, Endpoint)>>,
    kept: usize,
}

impl DnsTimeouts {
    pub(super) fn add(&mut self, x: &DnsExchange) {
        if x.side != Side::Client || x.outcome != DnsOutcome::Timeout || self.kept >= TIMEOUTS_KEPT
        {
            return;
        }
        self.kept += 1;
        self.by_name
            .entry(x.name.clone())
            .or_default()
            .push((truncate_to_millis(x.time), x.resolver));
    }

    /// The resolver of an unanswered query for `name` sent within `AFTER_DNS_TIMEOUT` before
    /// `failed` (the latest such query), if any.
    fn before(&self, name: &str, failed: SystemTime) -> Option<Endpoint> {
        let since = failed.checked_sub(AFTER_DNS_TIMEOUT)?;
        self.by_name
            .get(name)?
            .iter()
            .filter(|(sent, _)| since <= *sent && *sent <= failed)
            .max_by_key(|(sent, resolver)| (*sent, *resolver))
            .map(|(_, resolver)| *resolver)
    }

    /// Of `matching` (a verdict's failures at one destination), those that followed an
    /// unanswered query for their name; `None` when none did.
    pub(super) fn after(
        &self,
        ev: &DestinationEvidence,
        matching: &[FailedConnect],
    ) -> Option<AfterDnsTimeout> {
        if self.by_name.is_empty() {
            return None;
        }
        let mut names: HashMap<&str, u64> = HashMap::new();
        let mut resolvers = BTreeSet::new();
        let mut failures = 0;
        for f in matching {
            let Some(name) = f.name.and_then(|i| ev.failed_names.get(usize::from(i))) else {
                continue;
            };
            if let Some(resolver) = self.before(name, f.time) {
                failures += 1;
                *names.entry(name).or_default() += 1;
                resolvers.insert(resolver);
            }
        }
        if failures == 0 {
            return None;
        }
        let mut names: Vec<NameFailures> = names
            .into_iter()
            .map(|(name, failures)| NameFailures {
                name: name.to_string(),
                failures,
            })
            .collect();
        names.sort_by(|a, b| {
            b.failures
                .cmp(&a.failures)
                .then_with(|| a.name.cmp(&b.name))
        });
        names.truncate(LISTED);
        Some(AfterDnsTimeout {
            failures,
            within_seconds: AFTER_DNS_TIMEOUT.as_secs(),
            names,
            resolvers: resolvers
                .iter()
                .take(LISTED)
                .map(|r| r.to_string())
                .collect(),
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{
        diagnose::{
            engine::{judge_with_dns, tests::window},
            render::evidence_sentence,
            verdict::{Finding, Report, VerdictId},
        },
        dns::{capture::Transport, message::Rcode},
        event::{
            Event, EventDetail, FailureReason,
            testing::{at, connect_failed, connect_ok},
        },
    };

    pub(in crate::diagnose) const RESOLVER: &str = "10.0.0.53:53";

    /// A client-side query for `name` sent at `time` to `RESOLVER`.
    pub(in crate::diagnose) fn query(
        name: &str,
        time: SystemTime,
        outcome: DnsOutcome,
    ) -> DnsExchange {
        DnsExchange {
            seq: 0,
            time,
            process: None,
            side: Side::Client,
            transport: Transport::Udp,
            client: "10.9.9.9:41000".parse().unwrap(),
            resolver: RESOLVER.parse().unwrap(),
            id: 7,
            name: Arc::from(name),
            qtype: Arc::from("A"),
            outcome,
        }
    }

    pub(in crate::diagnose) fn answered() -> DnsOutcome {
        DnsOutcome::Answered {
            rcode: Rcode::NOERROR,
            latency: Duration::from_millis(2),
            answers: vec![("10.0.0.2".parse().unwrap(), 0)],
        }
    }

    /// A connect to `dest` that failed (timed out) at `time`, for `name`.
    pub(in crate::diagnose) fn failed_for(dest: &str, name: &str, time: SystemTime) -> Event {
        let mut event = connect_failed(dest, time, FailureReason::Timeout, 2);
        if let EventDetail::Connect(c) = &mut event.detail {
            c.dst_name = Some(Arc::from(name));
        }
        event
    }

    fn finding(report: &Report, dest: &str) -> Finding {
        report
            .destinations
            .iter()
            .find(|d| d.destination == dest)
            .and_then(|d| d.verdicts.first())
            .map(|v| v.finding.clone())
            .expect("a verdict")
    }

    fn after(finding: &Finding) -> Option<AfterDnsTimeout> {
        match finding {
            Finding::Blackhole(e) => e.figures.failures.after_dns_timeout.clone(),
            other => panic!("not a blackhole: {other:?}"),
        }
    }

    #[test]
    fn failures_after_a_timeout_for_their_name_say_so() {
        // api.lab's query goes unanswered at 100 s; 7 connects to its address fail in the 30 s
        // after, 2 more long after; a connect that works is no failure.
        let mut events: Vec<Event> = (0..7)
            .map(|i| failed_for("10.0.0.2:443", "api.lab", at(103.0 + f64::from(i))))
            .collect();
        events.push(failed_for("10.0.0.2:443", "api.lab", at(300.0)));
        events.push(failed_for("10.0.0.2:443", "api.lab", at(301.0)));
        events.push(connect_ok("10.0.0.2:443", at(104.0), 500));
        let exchanges = [
            query("api.lab", at(100.0), DnsOutcome::Timeout),
            query("api.lab", at(290.0), answered()),
            query("other.lab", at(299.0), DnsOutcome::Timeout),
        ];
        let report = judge_with_dns(&events, &exchanges, window(0.0, 600.0));
        // The resolver's verdict comes first.
        assert_eq!(report.destinations[0].destination, RESOLVER);
        assert_eq!(report.verdict_ids(RESOLVER), vec![VerdictId::DnsTimeout]);
        let finding = finding(&report, "10.0.0.2:443");
        assert_eq!(
            after(&finding),
            Some(AfterDnsTimeout {
                failures: 7,
                within_seconds: 30,
                names: vec![NameFailures {
                    name: "api.lab".into(),
                    failures: 7
                }],
                resolvers: vec![RESOLVER.into()],
            })
        );
        assert!(
            evidence_sentence(&finding).ends_with(
                " 7 of these 9 failures came within 30 s after a DNS query for api.lab went \
                 unanswered (see the dns_timeout verdict on 10.0.0.53:53)."
            ),
            "{}",
            evidence_sentence(&finding)
        );
        let json = serde_json::to_value(&report).unwrap();
        let dest = json["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["destination"] == "10.0.0.2:443")
            .unwrap();
        assert_eq!(
            dest["verdicts"][0]["evidence"]["after_dns_timeout"]["failures"],
            7
        );
        // The same whatever the order: DNS first, events after.
        let mut judge = crate::diagnose::Judge::new(Some(window(0.0, 600.0)));
        for x in &exchanges {
            judge.add_dns(x);
        }
        for e in &events {
            judge.add(e);
        }
        assert_eq!(judge.finish(), report);
    }

    #[test]
    fn failures_with_no_timeout_before_them_get_nothing() {
        let events: Vec<Event> = (0..5)
            .map(|i| failed_for("10.0.0.2:443", "api.lab", at(100.0 + f64::from(i))))
            .collect();
        let exchanges = [
            // After the failures, for another name, more than 30 s before, and answered.
            query("api.lab", at(110.0), DnsOutcome::Timeout),
            query("db.lab", at(99.0), DnsOutcome::Timeout),
            query("api.lab", at(69.0), DnsOutcome::Timeout),
            query("api.lab", at(99.0), answered()),
        ];
        let report = judge_with_dns(&events, &exchanges, window(0.0, 600.0));
        let finding = finding(&report, "10.0.0.2:443");
        assert_eq!(after(&finding), None);
        assert!(!evidence_sentence(&finding).contains("DNS"));
        let json = serde_json::to_string(&report).unwrap();
        assert!(!json.contains("after_dns_timeout"), "{json}");
        // Failures without a name are not joined either.
        let unnamed: Vec<Event> = (0..5)
            .map(|i| {
                connect_failed(
                    "10.0.0.2:443",
                    at(100.0 + f64::from(i)),
                    FailureReason::Timeout,
                    2,
                )
            })
            .collect();
        let exchanges = [query("api.lab", at(99.0), DnsOutcome::Timeout)];
        let report = judge_with_dns(&unnamed, &exchanges, window(0.0, 600.0));
        assert_eq!(after(&finding_of(&report)), None);
    }

    fn finding_of(report: &Report) -> Finding {
        finding(report, "10.0.0.2:443")
    }

    #[test]
    fn names_per_destination_are_capped() {
        // Twelve names, each with a timeout just before its failure: only the first eight are
        // kept, and five listed.
        let mut events = Vec::new();
        let mut exchanges = Vec::new();
        for i in 0..12u32 {
            let name = format!("n{i:02}.lab");
            let t = 100.0 + f64::from(i) * 40.0;
            exchanges.push(query(&name, at(t), DnsOutcome::Timeout));
            events.push(failed_for("10.0.0.2:443", &name, at(t + 1.0)));
        }
        let report = judge_with_dns(&events, &exchanges, window(0.0, 1000.0));
        let a = after(&finding_of(&report)).expect("joined");
        assert_eq!(a.failures, super::super::fold::NAMES_PER_DESTINATION as u64);
        assert_eq!(a.names.len(), LISTED);
        assert_eq!(a.names[0].name, "n00.lab");
    }
}
