//! What `connprobe watch` says at the end: the command and how it exited, per destination
//! figures, the verdicts, and the rules; as text for people, one JSON object for machines, and
//! a JUnit XML report (one testcase per rule) for CI systems.
use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::rule::RuleResult;
use crate::{
    diagnose::{DestinationSummary, Report, render},
    dns::{
        exchange::{DnsExchange, DnsOutcome},
        message::Rcode,
    },
};

/// One resolver the command asked, with how its queries ended.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResolverSummary {
    /// `ip:port`.
    pub resolver: String,
    pub queries: u64,
    /// Answered with NOERROR or NXDOMAIN (the others are SERVFAIL, REFUSED, ...).
    pub answered: u64,
    /// No answer within `--dns-timeout`, or none before the command ended.
    pub timeouts: u64,
}

impl ResolverSummary {
    /// One per resolver of the client-side `exchanges`, by address.
    pub fn of(exchanges: &[DnsExchange]) -> Vec<Self> {
        let mut by: BTreeMap<String, ResolverSummary> = BTreeMap::new();
        for x in exchanges {
            let resolver = x.resolver.to_string();
            let r = by.entry(resolver.clone()).or_insert(ResolverSummary {
                resolver,
                queries: 0,
                answered: 0,
                timeouts: 0,
            });
            r.queries += 1;
            match &x.outcome {
                DnsOutcome::Timeout => r.timeouts += 1,
                DnsOutcome::Answered { rcode, .. }
                    if *rcode == Rcode::NOERROR || *rcode == Rcode::NXDOMAIN =>
                {
                    r.answered += 1
                }
                DnsOutcome::Answered { .. } => {}
            }
        }
        by.into_values().collect()
    }
}

/// Everything `watch` found; `--json` prints it as is.
#[derive(Debug, Serialize)]
pub struct WatchReport {
    pub command: Vec<String>,
    /// The command's exit code (128 + N when a signal N ended it); null when it never ran.
    pub command_exit_code: Option<i32>,
    /// What connprobe exits with.
    pub exit_code: i32,
    /// How the command's connections were told apart: `cgroup /connprobe-watch-PID`, or `pid
    /// tree` where no cgroup could be made.
    pub scope: String,
    /// How long COMMAND ran.
    pub seconds: f64,
    /// Events the agent lost (by stage): the figures rest on the others.
    pub events_lost: BTreeMap<String, u64>,
    pub destinations: Vec<DestinationSummary>,
    pub resolvers: Vec<ResolverSummary>,
    pub rules: Vec<RuleResult>,
    /// The verdicts, as `connprobe analyze --json` gives them.
    pub report: Report,
}

impl WatchReport {
    pub fn failed_rules(&self) -> impl Iterator<Item = &RuleResult> {
        self.rules.iter().filter(|r| !r.passed)
    }

    /// The text for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let code = match self.command_exit_code {
            Some(code) => format!("exited with {code} after {:.1} s", self.seconds),
            None => "could not be started".into(),
        };
        let _ = writeln!(
            out,
            "connprobe watch: `{}` {code}; connections told apart by {}",
            shell_words(&self.command),
            self.scope
        );
        let lost: u64 = self.events_lost.values().sum();
        if lost > 0 {
            let _ = writeln!(
                out,
                "Note: the agent lost {lost} events; the figures rest on the others."
            );
        }
        out.push('\n');
        if self.destinations.is_empty() {
            out.push_str("No TCP connection made or accepted by the command.\n");
        } else {
            out.push_str(&destination_table(&self.destinations));
        }
        if !self.resolvers.is_empty() {
            out.push_str("\nRESOLVER               QUERIES  ANSWERED  TIMEOUTS\n");
            for r in &self.resolvers {
                let _ = writeln!(
                    out,
                    "{:<22} {:>7}  {:>8}  {:>8}",
                    r.resolver, r.queries, r.answered, r.timeouts
                );
            }
        }
        out.push('\n');
        out.push_str(&render::text(&self.report));
        if !self.rules.is_empty() {
            out.push('\n');
            for r in &self.rules {
                let verdict = if r.passed { "passed" } else { "FAILED" };
                let _ = writeln!(out, "rule {} {verdict}: {}", r.rule, r.message);
            }
        }
        out
    }

    /// A JUnit XML report: one testsuite, one testcase per rule (a `failure` when it failed),
    /// and the command's own exit as one more testcase.
    pub fn junit(&self) -> String {
        let failures = self.failed_rules().count() + usize::from(self.command_exit_code != Some(0));
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            out,
            "<testsuites name=\"connprobe watch\" tests=\"{}\" failures=\"{failures}\" time=\"{:.3}\">",
            self.rules.len() + 1,
            self.seconds
        );
        let _ = writeln!(
            out,
            "  <testsuite name=\"connprobe watch: {}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" time=\"{:.3}\">",
            xml_escape(&shell_words(&self.command)),
            self.rules.len() + 1,
            self.seconds
        );
        let summary = xml_escape(&destination_table(&self.destinations));
        let case = |out: &mut String, name: &str, failure: Option<&str>| {
            let _ = write!(
                out,
                "    <testcase classname=\"connprobe.watch\" name=\"{}\" time=\"{:.3}\"",
                xml_escape(name),
                self.seconds
            );
            match failure {
                None => out.push_str("/>\n"),
                Some(message) => {
                    let _ = writeln!(
                        out,
                        ">\n      <failure message=\"{}\" type=\"connprobe\">{}\n\n{summary}</failure>\n    </testcase>",
                        xml_escape(message),
                        xml_escape(message),
                    );
                }
            }
        };
        let exit = match self.command_exit_code {
            Some(0) => None,
            Some(code) => Some(format!("the command exited with {code}")),
            None => Some("the command did not run".to_string()),
        };
        case(&mut out, "command exits 0", exit.as_deref());
        for r in &self.rules {
            let message = format!("{}: {}", r.rule, r.message);
            case(&mut out, &r.rule, (!r.passed).then_some(message.as_str()));
        }
        let _ = writeln!(
            out,
            "    <system-out>{}</system-out>",
            xml_escape(&self.text())
        );
        out.push_str("  </testsuite>\n</testsuites>\n");
        out
    }
}

/// Per destination: connects, failures by reason, handshake percentiles, retransmits, resets.
fn destination_table(destinations: &[DestinationSummary]) -> String {
    let mut out = String::from(
        "DESTINATION                    SIDE    CONNECTS  FAILED  HANDSHAKE p50/p99 ms  RETRANS  RESETS  FAILURES\n",
    );
    for d in destinations {
        let mut place = d.destination.clone();
        if let Some(name) = &d.name {
            place = format!("{place} ({name})");
        }
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |ms| format!("{ms:.1}"));
        let latency = format!("{}/{}", ms(d.handshake_p50_ms), ms(d.handshake_p99_ms));
        let reasons = d
            .failures
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "{place:<30} {:<7} {:>8}  {:>6}  {latency:>20}  {:>7}  {:>6}  {}",
            d.side.as_deref().unwrap_or("-"),
            d.connects,
            d.failed(),
            d.retransmits,
            d.resets,
            if reasons.is_empty() { "-" } else { &reasons },
        );
    }
    out
}

/// The command as a shell would take it: words with spaces or quotes in single quotes.
fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b));
            match plain {
                true => w.clone(),
                false => format!("'{}'", w.replace('\'', r"'\''")),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Text as XML attribute or element content.
fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 allows no other control characters, even escaped.
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\r' | '\t') => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::{Judge, engine::Window};

    fn report(rules: Vec<RuleResult>, code: i32) -> WatchReport {
        WatchReport {
            command: vec!["sh".into(), "-c".into(), "curl <x> & y".into()],
            command_exit_code: Some(code),
            exit_code: code,
            scope: "cgroup /connprobe-watch-1".into(),
            seconds: 1.5,
            events_lost: BTreeMap::new(),
            destinations: vec![DestinationSummary {
                destination: "10.0.0.2:8081".into(),
                side: Some("client".into()),
                name: None,
                connects: 4,
                established: 0,
                failures: BTreeMap::from([("refused".into(), 4)]),
                handshake_p50_ms: None,
                handshake_p99_ms: None,
                retransmits: 0,
                resets: 0,
            }],
            resolvers: Vec::new(),
            rules,
            report: Judge::new(Some(Window {
                start: std::time::SystemTime::UNIX_EPOCH,
                end: std::time::SystemTime::UNIX_EPOCH,
            }))
            .finish(),
        }
    }

    #[test]
    fn junit_has_a_testcase_per_rule_and_escapes() {
        let failed = RuleResult {
            rule: "failures>0".into(),
            passed: false,
            message: "4 failed connects (limit 0): 10.0.0.2:8081: 4 refused".into(),
        };
        let passed = RuleResult {
            rule: "resets>0".into(),
            passed: true,
            message: "0 resets (limit 0)".into(),
        };
        let xml = report(vec![failed, passed], 0).junit();
        assert!(xml.contains("tests=\"3\" failures=\"1\""), "{xml}");
        assert!(xml.contains("<testcase classname=\"connprobe.watch\" name=\"failures&gt;0\""));
        assert!(xml.contains(
            "<failure message=\"failures&gt;0: 4 failed connects (limit 0): 10.0.0.2:8081: 4 refused\""
        ));
        assert!(
            xml.contains("name=\"resets&gt;0\" time=\"1.500\"/>"),
            "{xml}"
        );
        assert!(
            xml.contains("sh -c &apos;curl &lt;x&gt; &amp; y&apos;"),
            "{xml}"
        );
        assert_eq!(xml.matches("<testcase").count(), 3);
        assert_eq!(xml.matches("<failure").count(), 1);
        let xml = report(Vec::new(), 3).junit();
        assert!(
            xml.contains("<failure message=\"the command exited with 3\""),
            "{xml}"
        );
    }

    #[test]
    fn text_lists_destinations_then_verdicts_then_rules() {
        let failed = RuleResult {
            rule: "failures>0".into(),
            passed: false,
            message: "4 failed connects".into(),
        };
        let text = report(vec![failed], 0).text();
        let table = text.find("10.0.0.2:8081").unwrap();
        let verdicts = text.find("connprobe verdicts").unwrap();
        let rule = text
            .find("rule failures>0 FAILED: 4 failed connects")
            .unwrap();
        assert!(table < verdicts && verdicts < rule, "{text}");
        assert!(text.contains("refused 4"), "{text}");
    }
}
