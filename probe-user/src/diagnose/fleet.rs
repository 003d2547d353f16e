//! Several hosts' verdicts side by side: one host cannot tell "this destination is down" from
//! "this host's path is broken"; its peers can. Each host is judged on its own events, as its
//! agent would judge them; then, per destination this host set connects to, the hosts whose top
//! verdict is a failure are counted ("refused from 11 of 12 hosts"), and per host, the
//! destinations it fails to while most other hosts reach them.
//!
//! The same shares and minimums as the mixin's fleet rules (deploy/mixin/config.libsonnet:
//! `fleetShare`, `fleetMinHosts`, `fleetMinDestinations`), so `analyze` on the shipped logs
//! and the alerts on the metrics agree.
use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::{
    render,
    verdict::{Report, VerdictId},
};

/// A destination is down when at least this share of the hosts connecting to it fail...
const FLEET_SHARE: f64 = 0.5;
/// ... and at least this many of them.
const MIN_HOSTS: usize = 2;
/// A host's path is broken when it fails alone to at least `FLEET_SHARE` of the destinations
/// it shares with other hosts, and to at least this many.
const MIN_DESTINATIONS: usize = 2;

/// Verdicts that say connections to a destination fail or suffer.
fn is_failure(id: VerdictId) -> bool {
    match id {
        VerdictId::Refused
        | VerdictId::Blackhole
        | VerdictId::Unreachable
        | VerdictId::Lossy
        | VerdictId::ResetMidstream
        | VerdictId::SlowHandshakes
        | VerdictId::DnsTimeout
        | VerdictId::DnsServfail
        | VerdictId::DnsRefused
        | VerdictId::LocalDrop
        | VerdictId::ListenOverflow
        | VerdictId::ConntrackFull => true,
        VerdictId::LocalResets
        | VerdictId::PoolPartialFailure
        | VerdictId::Healthy
        | VerdictId::NotEnoughData => false,
    }
}

/// The fleet's view, with every host's own report.
#[derive(Debug, Serialize)]
pub struct FleetReport {
    pub destinations: Vec<DestinationAcrossHosts>,
    pub hosts_with_broken_paths: Vec<HostPath>,
    pub hosts: BTreeMap<String, Report>,
}

/// A destination (as a client connects to it) that fails from at least one host.
#[derive(Debug, Serialize)]
pub struct DestinationAcrossHosts {
    pub destination: String,
    /// The most frequent failing verdict among the hosts.
    pub verdict: &'static str,
    /// Hosts whose top verdict on the destination is a failure, by verdict.
    pub failing: BTreeMap<&'static str, Vec<String>>,
    /// Hosts that connect to it.
    pub hosts: usize,
    /// Hosts that connect to it without a failing verdict.
    pub not_failing: Vec<String>,
    /// At least `FLEET_SHARE` (and `MIN_HOSTS`) of its hosts fail: the destination is down.
    pub down: bool,
}

/// A host that fails to destinations the other hosts reach.
#[derive(Debug, Serialize)]
pub struct HostPath {
    pub host: String,
    /// Destinations it fails to while most other hosts connecting to them do not.
    pub failing_alone: Vec<String>,
    /// Destinations it shares with at least one other host.
    pub shared: usize,
}

impl FleetReport {
    pub fn new(hosts: BTreeMap<String, Report>) -> Self {
        // destination -> host -> top verdict, for connections the hosts opened.
        let mut seen: BTreeMap<&str, BTreeMap<&str, VerdictId>> = BTreeMap::new();
        for (host, report) in &hosts {
            for d in &report.destinations {
                if d.side.as_deref() == Some("server") {
                    continue;
                }
                if let Some(top) = d.verdicts.first() {
                    seen.entry(&d.destination)
                        .or_default()
                        .insert(host.as_str(), top.id());
                }
            }
        }
        let mut destinations = Vec::new();
        let mut down_or_shared: BTreeMap<&str, (bool, usize)> = BTreeMap::new();
        for (&destination, by_host) in &seen {
            let mut failing: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
            let mut not_failing = Vec::new();
            for (&host, &id) in by_host {
                if is_failure(id) {
                    failing
                        .entry(id.as_str())
                        .or_default()
                        .push(host.to_owned());
                } else {
                    not_failing.push(host.to_owned());
                }
            }
            let failing_hosts: usize = failing.values().map(Vec::len).sum();
            let down = failing_hosts >= MIN_HOSTS
                && failing_hosts as f64 >= FLEET_SHARE * by_host.len() as f64;
            down_or_shared.insert(destination, (down, by_host.len()));
            let Some(verdict) = failing
                .iter()
                .max_by_key(|(id, hosts)| (hosts.len(), std::cmp::Reverse(**id)))
                .map(|(id, _)| *id)
            else {
                continue;
            };
            destinations.push(DestinationAcrossHosts {
                destination: destination.to_owned(),
                verdict,
                failing,
                hosts: by_host.len(),
                not_failing,
                down,
            });
        }
        // Down everywhere first, then by how many hosts fail.
        destinations.sort_by_key(|d| {
            let failing: usize = d.failing.values().map(Vec::len).sum();
            (!d.down, std::cmp::Reverse(failing), d.destination.clone())
        });

        let mut hosts_with_broken_paths = Vec::new();
        for host in hosts.keys() {
            let mut shared = 0;
            let mut failing_alone = Vec::new();
            for (&destination, by_host) in &seen {
                let Some(&id) = by_host.get(host.as_str()) else {
                    continue;
                };
                if by_host.len() < 2 {
                    continue;
                }
                shared += 1;
                let (down, _) = down_or_shared[destination];
                if is_failure(id) && !down {
                    failing_alone.push(destination.to_owned());
                }
            }
            if failing_alone.len() >= MIN_DESTINATIONS
                && failing_alone.len() as f64 >= FLEET_SHARE * shared as f64
            {
                hosts_with_broken_paths.push(HostPath {
                    host: host.clone(),
                    failing_alone,
                    shared,
                });
            }
        }
        FleetReport {
            destinations,
            hosts_with_broken_paths,
            hosts,
        }
    }
}

/// Orders host names as people count: `web-2` before `web-10`.
fn natural_key(name: &str) -> Vec<(u8, u64, String)> {
    let mut key = Vec::new();
    let mut rest = name;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 {
            let (number, tail) = rest.split_at(digits);
            key.push((0, number.parse().unwrap_or(u64::MAX), number.to_owned()));
            rest = tail;
        } else {
            let text = rest.len() - rest.trim_start_matches(|c: char| !c.is_ascii_digit()).len();
            let (word, tail) = rest.split_at(text);
            key.push((1, 0, word.to_owned()));
            rest = tail;
        }
    }
    key
}

/// Names, at most a few (in natural order), then how many more.
fn listed(names: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut names = names.to_vec();
    names.sort_by_cached_key(|n| natural_key(n));
    let mut text = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        let _ = write!(text, " and {} more", names.len() - SHOWN);
    }
    text
}

/// The fleet's findings, then each host's report.
pub fn text(fleet: &FleetReport) -> String {
    let mut out = String::new();
    let names: Vec<String> = fleet.hosts.keys().cloned().collect();
    let _ = writeln!(
        out,
        "connprobe verdicts across {} hosts ({}), each judged on its own log",
        names.len(),
        listed(&names)
    );
    out.push('\n');
    if fleet.destinations.is_empty() && fleet.hosts_with_broken_paths.is_empty() {
        out.push_str("No destination fails from any host.\n");
    }
    for d in &fleet.destinations {
        let failing: usize = d.failing.values().map(Vec::len).sum();
        let verdict = d.verdict;
        let _ = write!(
            out,
            "{}: {verdict} from {failing} of {} hosts",
            d.destination, d.hosts
        );
        let others: Vec<String> = d
            .failing
            .iter()
            .filter(|(id, _)| **id != d.verdict)
            .map(|(id, hosts)| format!("{id} {}", hosts.len()))
            .collect();
        if !others.is_empty() {
            let _ = write!(out, " (also {})", others.join(", "));
        }
        if d.down {
            out.push_str(": the destination or its load balancer fails, not the hosts' network.");
        } else {
            out.push_str(": the other hosts reach it; look at the failing hosts' paths.");
        }
        let failing_hosts: Vec<String> = d.failing.values().flatten().cloned().collect();
        let _ = write!(out, "\n  Failing: {}.", listed(&failing_hosts));
        if !d.not_failing.is_empty() {
            let _ = write!(out, " Not failing: {}.", listed(&d.not_failing));
        }
        out.push('\n');
    }
    for h in &fleet.hosts_with_broken_paths {
        let _ = writeln!(
            out,
            "{}: fails to {} of the {} destinations it shares with other hosts, which reach them: \
             this host's network, DNS or firewall, not the destinations.\n  Failing alone: {}.",
            h.host,
            h.failing_alone.len(),
            h.shared,
            listed(&h.failing_alone)
        );
    }
    let mut hosts: Vec<(&String, &Report)> = fleet.hosts.iter().collect();
    hosts.sort_by_cached_key(|(h, _)| natural_key(h));
    for (host, report) in hosts {
        let _ = write!(out, "\n== {host} ==\n{}", render::text(report));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        diagnose::engine::Judge,
        event::{
            Event, FailureReason,
            testing::{at, connect_failed, connect_ok},
        },
    };

    fn report(events: &[Event]) -> Report {
        let mut judge = Judge::new(None);
        for e in events {
            judge.add(e);
        }
        judge.finish()
    }

    fn refusing(dst: &str) -> Vec<Event> {
        (0..6)
            .map(|i| connect_failed(dst, at(f64::from(i)), FailureReason::Refused, 0))
            .collect()
    }

    fn healthy(dst: &str) -> Vec<Event> {
        (0..6)
            .map(|i| connect_ok(dst, at(f64::from(i)), 200))
            .collect()
    }

    fn fleet(hosts: &[(&str, Vec<Event>)]) -> FleetReport {
        FleetReport::new(
            hosts
                .iter()
                .map(|(h, e)| ((*h).to_owned(), report(e)))
                .collect(),
        )
    }

    #[test]
    fn a_destination_refusing_most_hosts_is_down() {
        let mut hosts: Vec<(String, Vec<Event>)> = (1..=11)
            .map(|i| (format!("host-{i:02}"), refusing("10.0.0.9:443")))
            .collect();
        hosts.push(("host-12".into(), healthy("10.0.0.9:443")));
        let named: Vec<(&str, Vec<Event>)> =
            hosts.iter().map(|(h, e)| (h.as_str(), e.clone())).collect();
        let f = fleet(&named);
        assert_eq!(f.destinations.len(), 1);
        let d = &f.destinations[0];
        assert!(d.down);
        assert_eq!(d.verdict, "refused");
        assert_eq!(d.hosts, 12);
        assert_eq!(d.not_failing, ["host-12"]);
        assert!(f.hosts_with_broken_paths.is_empty());
        let t = text(&f);
        assert!(
            t.contains("10.0.0.9:443: refused from 11 of 12 hosts: the destination or its load balancer fails"),
            "{t}"
        );
    }

    #[test]
    fn one_host_failing_where_the_others_succeed_has_a_broken_path() {
        let dests = ["10.0.1.1:443", "10.0.1.2:443", "10.0.1.3:443"];
        let mut broken = Vec::new();
        let mut ok = Vec::new();
        for d in dests {
            broken.extend(refusing(d));
            ok.extend(healthy(d));
        }
        broken.extend(healthy("10.0.1.4:443"));
        ok.extend(healthy("10.0.1.4:443"));
        let f = fleet(&[
            ("a", ok.clone()),
            ("b", ok.clone()),
            ("c", broken),
            ("d", ok),
        ]);
        assert!(f.destinations.iter().all(|d| !d.down));
        assert_eq!(f.hosts_with_broken_paths.len(), 1);
        let h = &f.hosts_with_broken_paths[0];
        assert_eq!(
            (h.host.as_str(), h.failing_alone.len(), h.shared),
            ("c", 3, 4)
        );
        let t = text(&f);
        assert!(
            t.contains("10.0.1.1:443: refused from 1 of 4 hosts: the other hosts reach it"),
            "{t}"
        );
        assert!(
            t.contains("c: fails to 3 of the 4 destinations it shares"),
            "{t}"
        );
        assert!(t.contains("\n== a ==\n"), "{t}");
    }

    #[test]
    fn hosts_are_listed_as_people_count() {
        let names: Vec<String> = ["web-10", "web-2", "web-1", "db"]
            .map(String::from)
            .to_vec();
        assert_eq!(listed(&names), "db, web-1, web-2, web-10");
    }

    #[test]
    fn a_healthy_fleet_says_so() {
        let f = fleet(&[("a", healthy("10.0.2.1:80")), ("b", healthy("10.0.2.1:80"))]);
        assert!(f.destinations.is_empty() && f.hosts_with_broken_paths.is_empty());
        assert!(text(&f).contains("No destination fails from any host."));
    }
}
