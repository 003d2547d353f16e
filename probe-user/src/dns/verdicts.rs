//! DNS verdicts on a resolver (its `ip:port`, side client) from the client-side exchanges of a
//! window: `dns_timeout` (queries unanswered), `dns_servfail`, `dns_refused`, each with the
//! share and the names behind it. NXDOMAIN answers are counted and their names listed in the
//! evidence, but are no verdict on their own: search-domain expansion makes them normal.
use std::{
    collections::{BTreeMap, HashMap},
    time::SystemTime,
};

use super::{
    exchange::{DnsExchange, DnsOutcome},
    message::Rcode,
    stats::Failure,
};
use crate::{
    diagnose::{
        round,
        rules::{confidence, instants, verdict},
        verdict::{
            DestinationReport, DnsFigures, Evidence, Finding, NameCount, Owners, ProcessEvidence,
            Verdict,
        },
    },
    event::{Endpoint, Side},
};

/// Names listed per verdict.
const NAMES_LISTED: usize = 5;
/// Processes listed per verdict.
const PROCESSES_LISTED: usize = 5;
/// A resolver failing this share of its queries is fully consistent evidence (one in twenty).
const FULL_SHARE: f64 = 0.05;

#[derive(Default)]
struct ResolverWindow<'a> {
    queries: u64,
    by_failure: BTreeMap<Failure, Vec<&'a DnsExchange>>,
    first: Option<SystemTime>,
    last: Option<SystemTime>,
}

/// One report per resolver with a failure in the window, most failing queries first.
pub fn dns_destinations(exchanges: &[DnsExchange]) -> Vec<DestinationReport> {
    let mut resolvers: BTreeMap<Endpoint, ResolverWindow<'_>> = BTreeMap::new();
    for x in exchanges.iter().filter(|x| x.side == Side::Client) {
        let r = resolvers.entry(x.resolver).or_default();
        r.queries += 1;
        r.first = Some(r.first.map_or(x.time, |t| t.min(x.time)));
        r.last = Some(r.last.map_or(x.time, |t| t.max(x.time)));
        let failure = match &x.outcome {
            DnsOutcome::Timeout => Some(Failure::Timeout),
            DnsOutcome::Answered { rcode, .. } => match *rcode {
                Rcode::SERVFAIL => Some(Failure::Servfail),
                Rcode::REFUSED => Some(Failure::Refused),
                Rcode::NXDOMAIN => Some(Failure::Nxdomain),
                _ => None,
            },
        };
        if let Some(f) = failure {
            r.by_failure.entry(f).or_default().push(x);
        }
    }
    let mut reports: Vec<(u64, DestinationReport)> = resolvers
        .into_iter()
        .filter_map(|(resolver, r)| {
            let verdicts = resolver_verdicts(&resolver, &r);
            let failing = verdicts.iter().map(|v| figures(v).matching).sum::<u64>();
            (!verdicts.is_empty()).then(|| {
                (
                    failing,
                    DestinationReport {
                        destination: resolver.to_string(),
                        side: Some(Side::Client.name().to_string()),
                        name: None,
                        verdicts,
                    },
                )
            })
        })
        .collect();
    reports.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| a.1.destination.cmp(&b.1.destination))
    });
    reports.into_iter().map(|(_, r)| r).collect()
}

fn figures(v: &Verdict) -> &DnsFigures {
    match &v.finding {
        Finding::DnsTimeout(e) | Finding::DnsServfail(e) | Finding::DnsRefused(e) => &e.figures,
        _ => unreachable!("only DNS findings are made here"),
    }
}

fn resolver_verdicts(resolver: &Endpoint, r: &ResolverWindow<'_>) -> Vec<Verdict> {
    let nx = r
        .by_failure
        .get(&Failure::Nxdomain)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let active = (
        r.first.unwrap_or(SystemTime::UNIX_EPOCH),
        r.last.unwrap_or(SystemTime::UNIX_EPOCH),
    );
    let mut verdicts = Vec::new();
    for failure in [Failure::Timeout, Failure::Servfail, Failure::Refused] {
        let Some(matching) = r.by_failure.get(&failure) else {
            continue;
        };
        let n = matching.len() as u64;
        let share = n as f64 / r.queries.max(1) as f64;
        let evidence = Evidence {
            figures: DnsFigures {
                queries: r.queries,
                matching: n,
                share: round(share, 4),
                names: top_names(matching),
                nxdomain: nx.len() as u64,
                nxdomain_names: top_names(nx),
            },
            owners: owners(matching),
        };
        let (finding, next_step) = match failure {
            Failure::Timeout => (
                Finding::DnsTimeout(evidence),
                format!(
                    "queries to {resolver} went unanswered: check that resolver's load and \
                     upstreams, and the path to it (on UDP 53, conntrack races and full tables: \
                     `conntrack -S` insert_failed, drop)"
                ),
            ),
            Failure::Servfail => (
                Finding::DnsServfail(evidence),
                format!(
                    "{resolver} could not resolve the names listed: check its upstreams or \
                     forwarders, and DNSSEC validation, for them"
                ),
            ),
            _ => (
                Finding::DnsRefused(evidence),
                format!(
                    "{resolver} refuses these queries: check its access rules (allow-query, \
                     allow-recursion) for this host"
                ),
            ),
        };
        let times: Vec<SystemTime> = matching.iter().map(|x| x.time).collect();
        let consistency = 0.5 + 0.5 * (share / FULL_SHARE).min(1.0);
        verdicts.push(verdict(
            finding,
            confidence(n, consistency),
            &instants(&times),
            active,
            next_step,
        ));
    }
    verdicts.sort_by(|a, b| {
        b.confidence
            .partial_cmp(&a.confidence)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    verdicts
}

fn top_names(exchanges: &[&DnsExchange]) -> Vec<NameCount> {
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for x in exchanges {
        *counts.entry(&x.name).or_default() += 1;
    }
    let mut names: Vec<NameCount> = counts
        .into_iter()
        .map(|(name, queries)| NameCount {
            name: name.to_string(),
            queries,
        })
        .collect();
    names.sort_by(|a, b| b.queries.cmp(&a.queries).then_with(|| a.name.cmp(&b.name)));
    names.truncate(NAMES_LISTED);
    names
}

fn owners(exchanges: &[&DnsExchange]) -> Owners {
    let mut counts: HashMap<(u32, String), u64> = HashMap::new();
    for x in exchanges {
        if let Some(p) = &x.process {
            *counts
                .entry((p.pid, p.comm.to_string_lossy().into_owned()))
                .or_default() += 1;
        }
    }
    let mut processes: Vec<ProcessEvidence> = counts
        .into_iter()
        .map(|((pid, comm), events)| ProcessEvidence { pid, comm, events })
        .collect();
    processes.sort_by(|a, b| b.events.cmp(&a.events).then_with(|| a.pid.cmp(&b.pid)));
    let unlisted = processes
        .iter()
        .skip(PROCESSES_LISTED)
        .map(|p| p.events)
        .sum();
    processes.truncate(PROCESSES_LISTED);
    Owners {
        processes,
        unlisted_process_events: unlisted,
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::dns::capture::Transport;

    fn exchange(name: &str, outcome: DnsOutcome, secs: u64) -> DnsExchange {
        DnsExchange {
            seq: 0,
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            process: None,
            side: Side::Client,
            transport: Transport::Udp,
            client: "10.0.0.1:40000".parse().unwrap(),
            resolver: "10.0.0.2:53".parse().unwrap(),
            id: 1,
            name: Arc::from(name),
            qtype: Arc::from("A"),
            outcome,
        }
    }

    fn answered(rcode: Rcode) -> DnsOutcome {
        DnsOutcome::Answered {
            rcode,
            latency: Duration::from_millis(1),
            answers: vec![],
        }
    }

    #[test]
    fn timeouts_and_servfails_are_verdicts_nxdomain_only_evidence() {
        let mut xs = vec![
            exchange("api.lab", DnsOutcome::Timeout, 1),
            exchange("api.lab", DnsOutcome::Timeout, 2),
            exchange("db.lab", DnsOutcome::Timeout, 3),
            exchange("db.lab", answered(Rcode::SERVFAIL), 4),
            exchange("x.lab.svc", answered(Rcode::NXDOMAIN), 5),
        ];
        for i in 0..15 {
            xs.push(exchange("ok.lab", answered(Rcode::NOERROR), 10 + i));
        }
        let reports = dns_destinations(&xs);
        assert_eq!(reports.len(), 1);
        let r = &reports[0];
        assert_eq!(
            (r.destination.as_str(), r.side.as_deref()),
            ("10.0.0.2:53", Some("client"))
        );
        let ids: Vec<&str> = r.verdicts.iter().map(|v| v.id().as_str()).collect();
        assert_eq!(ids, vec!["dns_timeout", "dns_servfail"]);
        let f = figures(&r.verdicts[0]);
        assert_eq!((f.queries, f.matching, f.nxdomain), (20, 3, 1));
        assert_eq!(
            f.names[0],
            NameCount {
                name: "api.lab".into(),
                queries: 2
            }
        );
        assert_eq!(f.nxdomain_names[0].name, "x.lab.svc");
        // NXDOMAIN alone is no verdict.
        let only_nx = [exchange("a.svc", answered(Rcode::NXDOMAIN), 1)];
        assert!(dns_destinations(&only_nx).is_empty());
    }
}
