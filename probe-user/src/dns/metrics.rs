//! The DNS families of `/metrics`, read from [`DnsState`] at scrape time. Resolvers are labels
//! (bounded, see `stats`); names never are.
use std::collections::HashMap;

use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};

use super::{DnsState, SharedDns, stats::DURATION_BUCKETS};

struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    labels: &'static [&'static str],
}

const FAMILIES: [Family; 8] = [
    Family {
        name: "connprobe_dns_queries_total",
        help: "DNS queries this host sent to the resolver (client side), counted when answered \
               or timed out.",
        kind: MetricType::COUNTER,
        labels: &["resolver"],
    },
    Family {
        name: "connprobe_dns_responses_total",
        help: "Answers this host received from the resolver, by rcode (NOERROR, NXDOMAIN, \
               SERVFAIL, REFUSED, ...).",
        kind: MetricType::COUNTER,
        labels: &["resolver", "rcode"],
    },
    Family {
        name: "connprobe_dns_timeouts_total",
        help: "DNS queries to the resolver that got no answer within --dns-timeout (or whose \
               TCP connection closed first).",
        kind: MetricType::COUNTER,
        labels: &["resolver"],
    },
    Family {
        name: "connprobe_dns_duration_seconds",
        help: "Time from a DNS query to its answer, per resolver.",
        kind: MetricType::HISTOGRAM,
        labels: &["resolver"],
    },
    Family {
        name: "connprobe_dns_packets_total",
        help: "DNS packets (UDP and TCP, both directions, both sides) delivered from the kernel.",
        kind: MetricType::COUNTER,
        labels: &[],
    },
    Family {
        name: "connprobe_dns_packets_lost_total",
        help: "DNS packets or exchanges lost, by stage: ringbuf (DNS ring buffer full), queue \
               (the log's queue full).",
        kind: MetricType::COUNTER,
        labels: &["stage"],
    },
    Family {
        name: "connprobe_dns_malformed_total",
        help: "Captured DNS payloads that are not a DNS message (rejected by the parser).",
        kind: MetricType::COUNTER,
        labels: &[],
    },
    Family {
        name: "connprobe_dns_pending_evicted_total",
        help: "DNS queries dropped unmatched because --dns-max-pending queries were waiting.",
        kind: MetricType::COUNTER,
        labels: &[],
    },
];

pub struct DnsCollector {
    descs: Vec<Desc>,
    state: SharedDns,
}

impl DnsCollector {
    pub fn new(state: SharedDns) -> Self {
        let descs = FAMILIES
            .iter()
            .map(|f| {
                Desc::new(
                    f.name.to_string(),
                    f.help.to_string(),
                    f.labels.iter().map(|l| l.to_string()).collect(),
                    HashMap::new(),
                )
                .expect("metric names, help and labels are valid")
            })
            .collect();
        DnsCollector { descs, state }
    }
}

impl Collector for DnsCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        families(&state)
    }
}

fn families(state: &DnsState) -> Vec<MetricFamily> {
    let mut metrics: Vec<Vec<proto::Metric>> = FAMILIES.iter().map(|_| Vec::new()).collect();
    for (label, s) in &state.stats.by_resolver {
        let resolver = label.text();
        let r = [("resolver", resolver.as_str())];
        metrics[0].push(counter(&r, s.queries));
        for (rcode, n) in &s.responses {
            metrics[1].push(counter(&[r[0], ("rcode", rcode.name())], *n));
        }
        metrics[2].push(counter(&r, s.timeouts));
        let mut histogram = proto::Histogram::default();
        histogram.set_sample_count(s.duration_count);
        histogram.set_sample_sum(s.duration_sum);
        histogram.set_bucket(
            DURATION_BUCKETS
                .iter()
                .zip(s.duration_buckets)
                .map(|(bound, count)| {
                    let mut bucket = proto::Bucket::default();
                    bucket.set_upper_bound(*bound);
                    bucket.set_cumulative_count(count);
                    bucket
                })
                .collect(),
        );
        let mut m = proto::Metric::default();
        m.set_label(labels(&r));
        m.set_histogram(histogram);
        metrics[3].push(m);
    }
    let c = &state.counts;
    metrics[4].push(counter(&[], c.packets));
    metrics[5].push(counter(&[("stage", "ringbuf")], c.lost_ringbuf));
    metrics[5].push(counter(&[("stage", "queue")], c.lost_queue));
    metrics[6].push(counter(&[], c.malformed));
    metrics[7].push(counter(&[], state.evicted()));
    FAMILIES
        .iter()
        .zip(metrics)
        .map(|(f, metrics)| {
            let mut family = MetricFamily::default();
            family.set_name(f.name.to_string());
            family.set_help(f.help.to_string());
            family.set_field_type(f.kind);
            family.set_metric(metrics);
            family
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<proto::LabelPair> {
    let mut pairs = pairs.to_vec();
    pairs.sort_by_key(|(name, _)| *name);
    pairs
        .into_iter()
        .map(|(name, value)| {
            let mut pair = proto::LabelPair::default();
            pair.set_name(name.to_string());
            pair.set_value(value.to_string());
            pair
        })
        .collect()
}

fn counter(pairs: &[(&str, &str)], value: u64) -> proto::Metric {
    let mut m = proto::Metric::default();
    m.set_label(labels(pairs));
    let mut c = proto::Counter::default();
    c.set_value(value as f64);
    m.set_counter(c);
    m
}
