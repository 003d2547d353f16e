//! `--fail-on` rules: `METRIC>THRESHOLD`, judged on what the watched command did.
//!
//! Counts (`failures`, `retransmits`, `resets`, `dns_timeouts`) are totals over every
//! destination; the handshake percentiles (`p50`, `p99`) are per destination, and the rule fails
//! for each destination whose percentile is over the threshold. Either way the message names the
//! destinations behind it.
use std::{fmt, str::FromStr, time::Duration};

use serde::Serialize;

use super::report::ResolverSummary;
use crate::{
    diagnose::{DestinationSummary, render::counted},
    units::parse_duration,
};

/// What a rule measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Failures,
    Retransmits,
    Resets,
    DnsTimeouts,
    P50,
    P99,
}

impl Metric {
    const ALL: [(&'static str, Metric); 6] = [
        ("failures", Metric::Failures),
        ("retransmits", Metric::Retransmits),
        ("resets", Metric::Resets),
        ("dns_timeouts", Metric::DnsTimeouts),
        ("p50", Metric::P50),
        ("p99", Metric::P99),
    ];

    fn is_latency(self) -> bool {
        matches!(self, Metric::P50 | Metric::P99)
    }
}

/// The limit a rule puts on its metric: more than it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threshold {
    Count(u64),
    Latency(Duration),
}

/// One `--fail-on` rule, as the user wrote it (`text`) and as understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub text: String,
    pub metric: Metric,
    pub threshold: Threshold,
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text: String = s.split_whitespace().collect();
        let names = || {
            Metric::ALL
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some((name, value)) = text.split_once('>') else {
            return Err(format!(
                "a rule is METRIC>THRESHOLD (e.g. failures>0, p99>200ms), with METRIC one of {}",
                names()
            ));
        };
        let Some(&(_, metric)) = Metric::ALL.iter().find(|(n, _)| *n == name) else {
            return Err(format!(
                "{name:?} is no metric; a rule's METRIC is one of {}",
                names()
            ));
        };
        let threshold = if metric.is_latency() {
            // A bare number would read as seconds, a trap for `p99>200`.
            if value.parse::<f64>().is_ok() {
                return Err(format!(
                    "{name}'s threshold needs a unit: {value}ms or {value}s, not {value}"
                ));
            }
            Threshold::Latency(
                parse_duration(value)
                    .map_err(|e| format!("{name}'s threshold is a duration (200ms, 1s): {e}"))?,
            )
        } else {
            Threshold::Count(value.parse().map_err(|_| {
                format!("{name}'s threshold is a whole number (e.g. {name}>0), not {value:?}")
            })?)
        };
        Ok(Rule {
            text,
            metric,
            threshold,
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// How a rule came out.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleResult {
    pub rule: String,
    pub passed: bool,
    /// What was measured and where, in one line.
    pub message: String,
}

/// What the rules are judged on.
pub struct Figures<'a> {
    pub destinations: &'a [DestinationSummary],
    pub resolvers: &'a [ResolverSummary],
    /// DNS queries on this host during the run that name no process (a kernel before Linux
    /// 6.10), so that COMMAND's cannot be told from the others'.
    pub dns_unattributed: u64,
}

impl Rule {
    pub fn judge(&self, figures: &Figures<'_>) -> RuleResult {
        let (passed, message) = match (self.metric, self.threshold) {
            (Metric::P50 | Metric::P99, Threshold::Latency(limit)) => {
                self.judge_latency(figures, limit)
            }
            (metric, Threshold::Count(limit)) => self.judge_count(metric, figures, limit),
            (_, Threshold::Latency(_)) => unreachable!("only percentiles take a duration"),
        };
        RuleResult {
            rule: self.text.clone(),
            passed,
            message,
        }
    }

    fn judge_count(&self, metric: Metric, figures: &Figures<'_>, limit: u64) -> (bool, String) {
        if metric == Metric::DnsTimeouts && figures.dns_unattributed > 0 {
            // Passing would claim what was not seen: the rule fails, and says why.
            return (
                false,
                format!(
                    "cannot be judged: {} sent during the run named no process (this kernel's \
                     cgroup_skb programs may not ask for it before Linux 6.10), so COMMAND's \
                     cannot be told apart",
                    counted(figures.dns_unattributed, "DNS query", "DNS queries")
                ),
            );
        }
        // Each place with a non-zero count, with the count and its detail.
        let places: Vec<(String, u64, String)> = match metric {
            Metric::DnsTimeouts => figures
                .resolvers
                .iter()
                .filter(|r| r.timeouts > 0)
                .map(|r| {
                    (
                        r.resolver.clone(),
                        r.timeouts,
                        format!("{} of {} queries unanswered", r.timeouts, r.queries),
                    )
                })
                .collect(),
            _ => figures
                .destinations
                .iter()
                .filter_map(|d| {
                    let (n, detail) = match metric {
                        Metric::Failures => (
                            d.failed(),
                            d.failures
                                .iter()
                                .map(|(reason, n)| format!("{n} {reason}"))
                                .collect::<Vec<_>>()
                                .join(", "),
                        ),
                        Metric::Retransmits => {
                            (d.retransmits, format!("{} segments", d.retransmits))
                        }
                        _ => (d.resets, format!("{} resets", d.resets)),
                    };
                    (n > 0).then(|| (label(d), n, detail))
                })
                .collect(),
        };
        let total: u64 = places.iter().map(|(_, n, _)| n).sum();
        let (one, many) = match metric {
            Metric::Failures => ("failed connect", "failed connects"),
            Metric::Retransmits => ("retransmitted segment", "retransmitted segments"),
            Metric::Resets => ("reset", "resets"),
            _ => ("DNS timeout", "DNS timeouts"),
        };
        let mut message = format!("{} (limit {limit})", counted(total, one, many));
        if !places.is_empty() {
            let mut places = places;
            places.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let listed: Vec<String> = places
                .iter()
                .map(|(place, _, detail)| format!("{place}: {detail}"))
                .collect();
            message.push_str(&format!(": {}", listed.join("; ")));
        }
        (total <= limit, message)
    }

    fn judge_latency(&self, figures: &Figures<'_>, limit: Duration) -> (bool, String) {
        let name = match self.metric {
            Metric::P50 => "p50",
            _ => "p99",
        };
        let limit_ms = limit.as_secs_f64() * 1e3;
        let measured: Vec<(String, f64)> = figures
            .destinations
            .iter()
            .filter_map(|d| {
                let ms = match self.metric {
                    Metric::P50 => d.handshake_p50_ms,
                    _ => d.handshake_p99_ms,
                }?;
                Some((label(d), ms))
            })
            .collect();
        let mut over: Vec<&(String, f64)> =
            measured.iter().filter(|(_, ms)| *ms > limit_ms).collect();
        over.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let message = if over.is_empty() {
            match measured.iter().map(|(_, ms)| *ms).reduce(f64::max) {
                Some(worst) => format!(
                    "handshake {name} at most {worst} ms over {} (limit {})",
                    counted(measured.len() as u64, "destination", "destinations"),
                    humantime::format_duration(limit)
                ),
                None => "no established connect, no handshake to measure".to_string(),
            }
        } else {
            let listed: Vec<String> = over
                .iter()
                .map(|(place, ms)| format!("{place}: {ms} ms"))
                .collect();
            format!(
                "handshake {name} over {} at {} of {} destinations: {}",
                humantime::format_duration(limit),
                over.len(),
                measured.len(),
                listed.join("; ")
            )
        };
        (over.is_empty(), message)
    }
}

/// A destination as the messages name it: `ip:port`, with its DNS name and side where known.
pub fn label(d: &DestinationSummary) -> String {
    let mut text = d.destination.clone();
    if let Some(name) = &d.name {
        text = format!("{name} ({text})");
    }
    if d.side.as_deref() == Some("server") {
        text.push_str(" (served)");
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn summary(dst: &str, refused: u64, p99: Option<f64>) -> DestinationSummary {
        DestinationSummary {
            destination: dst.into(),
            side: Some("client".into()),
            name: None,
            connects: refused + 3,
            established: 3,
            failures: match refused {
                0 => BTreeMap::new(),
                n => BTreeMap::from([("refused".to_string(), n)]),
            },
            handshake_p50_ms: p99,
            handshake_p99_ms: p99,
            retransmits: 0,
            resets: 0,
        }
    }

    #[test]
    fn rules_parse_and_bad_ones_say_why_in_one_sentence() {
        let r: Rule = "failures > 0".parse().unwrap();
        assert_eq!(
            (r.metric, r.threshold),
            (Metric::Failures, Threshold::Count(0))
        );
        assert_eq!(r.text, "failures>0");
        let r: Rule = "p99>200ms".parse().unwrap();
        assert_eq!(r.threshold, Threshold::Latency(Duration::from_millis(200)));
        assert_eq!(
            "dns_timeouts>2".parse::<Rule>().unwrap().metric,
            Metric::DnsTimeouts
        );
        for (bad, says) in [
            ("failures", "METRIC>THRESHOLD"),
            ("latency>1s", "is no metric"),
            ("failures>x", "whole number"),
            ("failures>-1", "whole number"),
            ("p99>200", "needs a unit"),
            ("p99>fast", "is a duration"),
            ("", "METRIC>THRESHOLD"),
        ] {
            let e = bad.parse::<Rule>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
    }

    #[test]
    fn dns_timeouts_are_not_judged_when_queries_name_no_process() {
        let unattributed = Figures {
            destinations: &[],
            resolvers: &[],
            dns_unattributed: 3,
        };
        let r = "dns_timeouts>0"
            .parse::<Rule>()
            .unwrap()
            .judge(&unattributed);
        assert!(!r.passed, "nothing seen is not a pass");
        assert!(
            r.message.starts_with("cannot be judged: 3 DNS queries"),
            "{}",
            r.message
        );
        // Other rules do not depend on it.
        assert!(
            "failures>0"
                .parse::<Rule>()
                .unwrap()
                .judge(&unattributed)
                .passed
        );
    }

    #[test]
    fn counts_are_totals_and_name_the_destinations() {
        let destinations = [
            summary("10.0.0.2:8081", 4, None),
            summary("10.0.0.2:8080", 0, Some(1.0)),
        ];
        let figures = Figures {
            destinations: &destinations,
            resolvers: &[],
            dns_unattributed: 0,
        };
        let failed = "failures>0".parse::<Rule>().unwrap().judge(&figures);
        assert!(!failed.passed);
        assert_eq!(
            failed.message,
            "4 failed connects (limit 0): 10.0.0.2:8081: 4 refused"
        );
        assert!("failures>4".parse::<Rule>().unwrap().judge(&figures).passed);
        let resolvers = [ResolverSummary {
            resolver: "10.0.0.53:53".into(),
            queries: 3,
            answered: 1,
            timeouts: 2,
        }];
        let figures = Figures {
            destinations: &destinations,
            resolvers: &resolvers,
            dns_unattributed: 0,
        };
        let dns = "dns_timeouts>1".parse::<Rule>().unwrap().judge(&figures);
        assert!(!dns.passed);
        assert!(
            dns.message
                .contains("10.0.0.53:53: 2 of 3 queries unanswered"),
            "{}",
            dns.message
        );
    }

    #[test]
    fn percentiles_are_per_destination() {
        let destinations = [
            summary("10.0.0.2:80", 0, Some(250.0)),
            summary("10.0.0.3:80", 0, Some(20.0)),
            summary("10.0.0.4:80", 2, None),
        ];
        let figures = Figures {
            destinations: &destinations,
            resolvers: &[],
            dns_unattributed: 0,
        };
        let r = "p99>200ms".parse::<Rule>().unwrap().judge(&figures);
        assert!(!r.passed);
        assert_eq!(
            r.message,
            "handshake p99 over 200ms at 1 of 2 destinations: 10.0.0.2:80: 250 ms"
        );
        let r = "p99>1s".parse::<Rule>().unwrap().judge(&figures);
        assert!(r.passed, "{}", r.message);
        let none = Figures {
            destinations: &[],
            resolvers: &[],
            dns_unattributed: 0,
        };
        assert!("p99>1ms".parse::<Rule>().unwrap().judge(&none).passed);
    }
}
