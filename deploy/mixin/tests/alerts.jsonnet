// promtool unit tests for every alert: each fires on the series it is written for and stays
// quiet on the look-alikes. Rendered to rendered/alerts_test.json; run with
//   promtool test rules deploy/mixin/rendered/alerts_test.json
// The tests in tests/tests/mixin.rs check that every alert has a case where it fires and one
// where it stays quiet.
local job = { job: 'connprobe' };
local labels(l) = std.join(', ', ['%s="%s"' % [k, l[k]] for k in std.objectFields(l)]);
local series(name, l, values) = { series: '%s{%s}' % [name, labels(job + l)], values: values };
local attempts(host, dest, values) = series('connprobe_connect_attempts_total', { instance: host, destination: dest }, values);
local failures(host, dest, reason, values) = series('connprobe_connect_failures_total', { instance: host, destination: dest, reason: reason }, values);
local fires(alert, at, expected) = { alertname: alert, eval_time: at, exp_alerts: expected };
local quiet(alert, at) = { alertname: alert, eval_time: at, exp_alerts: [] };

// The fleet: four hosts; one destination every host connects to, per scenario.
local hosts = ['host-a', 'host-b', 'host-c', 'host-d'];
local healthy(host, dest) = [attempts(host, dest, '0+60x20'), failures(host, dest, 'refused', '0x20')];
local refusing(host, dest) = [attempts(host, dest, '0+60x20'), failures(host, dest, 'refused', '0+60x20')];

{
  rule_files: ['prometheus_rules.json', 'prometheus_alerts.json'],
  evaluation_interval: '1m',
  // Input series one sample a minute (promtool's default spacing is none at all).
  tests: [{ interval: '1m' } + t for t in self.cases],
  cases:: [
    {
      // One destination refuses half of its connects; a busy one fails rarely; a quiet one
      // fails every connect but makes too few of them.
      input_series: [
        attempts('host-a', '10.0.0.1:443', '0+60x20'),
        failures('host-a', '10.0.0.1:443', 'refused', '0+30x20'),
        attempts('host-a', '10.0.0.2:443', '0+600x20'),
        failures('host-a', '10.0.0.2:443', 'timeout', '0+1x20'),
        attempts('host-a', '10.0.0.3:443', '0+1x20'),
        failures('host-a', '10.0.0.3:443', 'refused', '0+1x20'),
      ],
      alert_rule_test: [
        fires('ConnprobeConnectFailures', '10m', [{
          exp_labels: { severity: 'warning', instance: 'host-a', destination: '10.0.0.1:443', reason: 'refused' },
          exp_annotations: {
            summary: 'Connects to a destination fail (refused).',
            description: '50% of the connects from host-a to 10.0.0.1:443 failed with reason refused over the last 5 minutes. Ask the agent why: `connprobe diagnose`.',
          },
        }]),
        // Not before its 5 minutes.
        quiet('ConnprobeConnectFailures', '3m'),
        // Refused with no SYN resent is no blackhole.
        quiet('ConnprobeSynBlackhole', '10m'),
      ],
    },
    {
      // SYNs resent and connects timing out or given up: a blackhole. Next to it, timeouts
      // without SYN retransmits (the application gave up on a slow server that answered).
      input_series: [
        attempts('host-a', '10.0.0.5:5432', '0+60x20'),
        failures('host-a', '10.0.0.5:5432', 'timeout', '0+20x20'),
        failures('host-a', '10.0.0.5:5432', 'cancelled', '0+20x20'),
        series('connprobe_retransmits_total', { instance: 'host-a', destination: '10.0.0.5:5432', side: 'client', phase: 'syn' }, '0+80x20'),
        attempts('host-a', '10.0.0.6:5432', '0+60x20'),
        failures('host-a', '10.0.0.6:5432', 'cancelled', '0+30x20'),
      ],
      alert_rule_test: [
        fires('ConnprobeSynBlackhole', '10m', [{
          exp_labels: { severity: 'critical', instance: 'host-a', destination: '10.0.0.5:5432' },
          exp_annotations: {
            summary: 'SYNs to a destination go unanswered.',
            description: '66.67% of the connects from host-a to 10.0.0.5:5432 got no answer to their SYNs (timed out or given up) while SYNs were resent: a drop on the path, a firewall, or a full listen backlog.',
          },
        }]),
        quiet('ConnprobeSynBlackhole', '4m'),
      ],
    },
    {
      // Resets of established connections: one destination quiet for an hour, then 10 a
      // minute; one at 10 a minute all along; one whose resets all refuse connects.
      input_series: [
        series('connprobe_resets_total', { instance: 'host-a', destination: '10.0.0.7:80', side: 'client', direction: 'received' }, '0x60 0+10x15'),
        series('connprobe_resets_total', { instance: 'host-a', destination: '10.0.0.8:80', side: 'client', direction: 'received' }, '0+10x75'),
        series('connprobe_resets_total', { instance: 'host-a', destination: '10.0.0.9:80', side: 'client', direction: 'received' }, '0x60 0+10x15'),
        failures('host-a', '10.0.0.9:80', 'refused', '0x60 0+10x15'),
      ],
      alert_rule_test: [
        fires('ConnprobeMidstreamResetsRising', '70m', [{
          exp_labels: { severity: 'warning', instance: 'host-a', destination: '10.0.0.7:80' },
          exp_annotations: {
            summary: 'The peer resets established connections more than it used to.',
            description: '50 resets of established connections from 10.0.0.7:80 to host-a in 5 minutes, over 3x its rate of the last hour: idle timeouts of a load balancer or NAT, or the backend crashing.',
          },
        }]),
        quiet('ConnprobeMidstreamResetsRising', '59m'),
      ],
    },
    {
      // Handshakes under 1 ms for an hour, then at about 50 ms; next to it a destination at
      // 50 ms all along, and one going from 0.1 ms to 1 ms (10x, but under 10 ms more).
      local bucket(dest, le, values) = series('connprobe_connect_duration_seconds_bucket', { instance: 'host-a', destination: dest, le: le }, values),
      local count(dest, values) = series('connprobe_connect_duration_seconds_count', { instance: 'host-a', destination: dest }, values),
      input_series: [
        bucket('10.0.1.1:443', '0.001', '0+60x60 3600x20'),
        bucket('10.0.1.1:443', '0.1', '0+60x80'),
        bucket('10.0.1.1:443', '+Inf', '0+60x80'),
        count('10.0.1.1:443', '0+60x80'),
        bucket('10.0.1.2:443', '0.001', '0x80'),
        bucket('10.0.1.2:443', '0.1', '0+60x80'),
        bucket('10.0.1.2:443', '+Inf', '0+60x80'),
        count('10.0.1.2:443', '0+60x80'),
        bucket('10.0.1.3:443', '0.0001', '0+60x60 3600x20'),
        bucket('10.0.1.3:443', '0.001', '0+60x80'),
        bucket('10.0.1.3:443', '+Inf', '0+60x80'),
        count('10.0.1.3:443', '0+60x80'),
      ],
      alert_rule_test: [
        fires('ConnprobeSlowHandshakes', '75m', [{
          exp_labels: { severity: 'warning', instance: 'host-a', destination: '10.0.1.1:443' },
          exp_annotations: {
            summary: 'Handshakes to a destination are far slower than its own baseline.',
            description: 'The p99 handshake time from host-a to 10.0.1.1:443 is 99.01ms over the last 5 minutes, at least 4x its usual p99 (the median over the last day): overload or queueing at the server.',
          },
        }]),
        quiet('ConnprobeSlowHandshakes', '60m'),
      ],
    },
    {
      // A resolver leaving a tenth of its queries unanswered; a busy one leaving a few; one
      // answering every query.
      local dns(name, resolver, values) = series(name, { instance: 'host-a', resolver: resolver }, values),
      input_series: [
        dns('connprobe_dns_queries_total', '10.0.0.53:53', '0+60x20'),
        dns('connprobe_dns_timeouts_total', '10.0.0.53:53', '0+6x20'),
        dns('connprobe_dns_queries_total', '10.0.0.54:53', '0+6000x20'),
        dns('connprobe_dns_timeouts_total', '10.0.0.54:53', '0+1x20'),
        dns('connprobe_dns_queries_total', '10.0.0.55:53', '0+60x20'),
        dns('connprobe_dns_timeouts_total', '10.0.0.55:53', '0x20'),
      ],
      alert_rule_test: [
        fires('ConnprobeDnsTimeouts', '10m', [{
          exp_labels: { severity: 'warning', instance: 'host-a', resolver: '10.0.0.53:53' },
          exp_annotations: {
            summary: 'A resolver leaves DNS queries unanswered.',
            description: 'The resolver 10.0.0.53:53 left 30 queries from host-a unanswered in 5 minutes: `connprobe diagnose` names the queries.',
          },
        }]),
        quiet('ConnprobeDnsTimeouts', '1m'),
      ],
    },
    {
      // The fleet, first case: 10.0.9.1:443 refuses three of the four hosts that connect to it
      // (the server is down); 10.0.9.2:443 fails from one host only.
      input_series: std.flattenArrays(
        [refusing(h, '10.0.9.1:443') for h in ['host-a', 'host-b', 'host-c']]
        + [healthy('host-d', '10.0.9.1:443')]
        + [refusing('host-a', '10.0.9.2:443')]
        + [healthy(h, '10.0.9.2:443') for h in ['host-b', 'host-c', 'host-d']]
      ),
      alert_rule_test: [
        fires('ConnprobeDestinationDown', '10m', [{
          exp_labels: { severity: 'critical', destination: '10.0.9.1:443' },
          exp_annotations: {
            summary: 'A destination fails from most of the hosts that connect to it.',
            description: "10.0.9.1:443 fails from 75% of the hosts that connect to it: the server or its load balancer is down, not the hosts' network.",
          },
        }]),
        // host-a fails to both of its destinations, but one of them is down for everyone.
        quiet('ConnprobeHostPathBroken', '10m'),
      ],
      promql_expr_test: [
        {
          expr: 'connprobe:destination_hosts_failing:ratio',
          eval_time: '10m',
          exp_samples: [
            { labels: 'connprobe:destination_hosts_failing:ratio{destination="10.0.9.1:443"}', value: 0.75 },
            { labels: 'connprobe:destination_hosts_failing:ratio{destination="10.0.9.2:443"}', value: 0.25 },
          ],
        },
      ],
    },
    {
      // The fleet, second case: host-c fails to three destinations that the other three hosts
      // reach (its own path is broken), and reaches a fourth.
      input_series: std.flattenArrays(
        [refusing('host-c', d) for d in ['10.0.9.3:443', '10.0.9.4:443', '10.0.9.5:443']]
        + [healthy('host-c', '10.0.9.6:443')]
        + [healthy(h, d) for h in ['host-a', 'host-b', 'host-d'] for d in ['10.0.9.3:443', '10.0.9.4:443', '10.0.9.5:443', '10.0.9.6:443']]
      ),
      alert_rule_test: [
        fires('ConnprobeHostPathBroken', '10m', [{
          exp_labels: { severity: 'critical', instance: 'host-c' },
          exp_annotations: {
            summary: 'A host fails to destinations that the other hosts reach.',
            description: "host-c fails to 75% of its destinations while most other hosts reach them: this host's network, DNS or firewall is broken, not the destinations.",
          },
        }]),
        quiet('ConnprobeDestinationDown', '10m'),
      ],
      promql_expr_test: [
        {
          expr: 'connprobe:instance_destinations_failing_alone:count',
          eval_time: '10m',
          exp_samples: [{ labels: 'connprobe:instance_destinations_failing_alone:count{instance="host-c"}', value: 3 }],
        },
      ],
    },
    {
      // Every host reaches every destination.
      input_series: std.flattenArrays([healthy(h, d) for h in hosts for d in ['10.0.9.7:443', '10.0.9.8:443']]),
      alert_rule_test: [
        quiet('ConnprobeDestinationDown', '10m'),
        quiet('ConnprobeHostPathBroken', '10m'),
        quiet('ConnprobeConnectFailures', '10m'),
      ],
    },
    {
      // Events lost in the ring buffer on one host; nothing lost on another.
      input_series: [
        series('connprobe_events_lost_total', { instance: 'host-a', stage: 'ringbuf' }, '0 0 0 12 12 12 12'),
        series('connprobe_events_lost_total', { instance: 'host-b', stage: 'ringbuf' }, '0x6'),
      ],
      alert_rule_test: [
        fires('ConnprobeEventsLost', '4m', [{
          exp_labels: { severity: 'warning', instance: 'host-a', stage: 'ringbuf' },
          exp_annotations: {
            summary: 'connprobe lost events.',
            description: 'The agent on host-a lost 12 events at stage ringbuf in 5 minutes; its counts and verdicts miss them. ringbuf: raise --ring-buffer-bytes; map: raise --max-sockets.',
          },
        }]),
        quiet('ConnprobeEventsLost', '2m'),
      ],
    },
    {
      // The kernel skips runs of one agent's programs; another agent's total stands still at
      // runs missed long ago; a third restarted (its counter back to 0) and misses none since.
      local missed(host, values) = series('connprobe_program_runs_missed_total', { instance: host }, values),
      input_series: [
        missed('host-a', '0 0 0 3 3 3 3'),
        missed('host-b', '40x6'),
        missed('host-c', '7 7 7 0 0 0 0'),
      ],
      alert_rule_test: [
        fires('ConnprobeProgramRunsMissed', '4m', [{
          exp_labels: { severity: 'warning', instance: 'host-a' },
          exp_annotations: {
            summary: 'The kernel skipped runs of connprobe eBPF programs.',
            description: "The kernel skipped 3 runs of the agent's eBPF programs on host-a in 5 minutes because a BPF program was already running on that CPU. Whatever those runs would have reported (a connect, retransmit, reset or close) is lost: it is in no other counter, connprobe_events_lost_total included, and its counts and verdicts miss it. `bpftool prog show` names the program (recursion_misses). On classic tracepoints (--hooks classic, or auto on a kernel without BTF ones) any kprobe or tracepoint program or BPF map syscall on that CPU blocks them; on BTF tracepoints only the same program, hit again from an interrupt.",
          },
        }]),
        quiet('ConnprobeProgramRunsMissed', '2m'),
        // Runs missed are not events lost at a stage: the other alert stays quiet.
        quiet('ConnprobeEventsLost', '4m'),
      ],
    },
    {
      // One agent stops answering scrapes; another keeps answering.
      input_series: [
        series('up', { instance: 'host-a:9977' }, '1 1 0x10'),
        series('up', { instance: 'host-b:9977' }, '1x12'),
      ],
      alert_rule_test: [
        fires('ConnprobeAgentDown', '8m', [{
          exp_labels: { severity: 'critical', instance: 'host-a:9977', job: 'connprobe' },
          exp_annotations: {
            summary: 'A connprobe agent cannot be scraped.',
            description: 'Prometheus could not scrape connprobe on host-a:9977 for 5 minutes: its connections go unwatched.',
          },
        }]),
        quiet('ConnprobeAgentDown', '5m'),
      ],
    },
  ],
}
