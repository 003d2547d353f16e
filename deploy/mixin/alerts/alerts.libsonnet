// Alerts. Each is one object in a group's list: an alert for a new metric (drop reasons, DNS,
// backends) is one more object here, its tests one more entry in tests/alerts.jsonnet, and, while
// the agent on main does not export the metric yet, its name in `pendingMetrics` (config).
{
  prometheusAlerts+:: {
    local c = $._config,
    local h = c.hostLabel,
    local s = c.selector,
    local where = '{{ $labels.%s }}' % h,
    groups+: [
      {
        name: 'connprobe.destinations',
        rules: [
          {
            alert: 'ConnprobeConnectFailures',
            expr: |||
              connprobe:%(h)s_destination_reason_failures:rate5m
                / on (%(h)s, destination) group_left connprobe:%(h)s_destination_attempts:rate5m
                > %(ratio)g
              and on (%(h)s, destination)
              connprobe:%(h)s_destination_attempts:rate5m * 300 >= %(min)d
            ||| % { h: h, min: c.minAttempts, ratio: c.failureRatio },
            'for': c.forLong,
            labels: { severity: 'warning' },
            annotations: {
              summary: 'Connects to a destination fail ({{ $labels.reason }}).',
              description: '{{ $value | humanizePercentage }} of the connects from %s to {{ $labels.destination }} failed with reason {{ $labels.reason }} over the last 5 minutes. Ask the agent why: `connprobe diagnose`.' % where,
            },
          },
          {
            alert: 'ConnprobeSynBlackhole',
            expr: |||
              sum by (%(h)s, destination) (connprobe:%(h)s_destination_reason_failures:rate5m{reason=~"timeout|cancelled"})
                / connprobe:%(h)s_destination_attempts:rate5m
                > %(ratio)g
              and on (%(h)s, destination)
              connprobe:%(h)s_destination_attempts:rate5m * 300 >= %(min)d
              and on (%(h)s, destination)
              connprobe:%(h)s_destination_syn_retransmits:rate5m > 0
            ||| % { h: h, min: c.minAttempts, ratio: c.blackholeRatio },
            'for': c.forLong,
            labels: { severity: 'critical' },
            annotations: {
              summary: 'SYNs to a destination go unanswered.',
              description: '{{ $value | humanizePercentage }} of the connects from %s to {{ $labels.destination }} got no answer to their SYNs (timed out or given up) while SYNs were resent: a drop on the path, a firewall, or a full listen backlog.' % where,
            },
          },
          {
            alert: 'ConnprobeMidstreamResetsRising',
            expr: |||
              connprobe:%(h)s_destination_midstream_resets:rate5m * 300 >= %(min)d
              and
              connprobe:%(h)s_destination_midstream_resets:rate5m
                > %(factor)g * connprobe:%(h)s_destination_midstream_resets:rate1h
            ||| % { h: h, min: c.midstreamResetsMin, factor: c.midstreamResetsFactor },
            'for': c.forShort,
            labels: { severity: 'warning' },
            annotations: {
              summary: 'The peer resets established connections more than it used to.',
              description: '{{ $value | humanize }} resets of established connections from {{ $labels.destination }} to %s in 5 minutes, over %gx its rate of the last hour: idle timeouts of a load balancer or NAT, or the backend crashing.' % [where, c.midstreamResetsFactor],
            },
          },
          {
            alert: 'ConnprobeSlowHandshakes',
            expr: |||
              connprobe:%(h)s_destination_handshake_seconds:p99_5m
                > %(factor)g * connprobe:%(h)s_destination_handshake_seconds:p99_5m_median1d
              and
              connprobe:%(h)s_destination_handshake_seconds:p99_5m
                - connprobe:%(h)s_destination_handshake_seconds:p99_5m_median1d > %(min)g
            ||| % { h: h, factor: c.slowHandshakeFactor, min: c.slowHandshakeMinSeconds },
            'for': c.forLong,
            labels: { severity: 'warning' },
            annotations: {
              summary: 'Handshakes to a destination are far slower than its own baseline.',
              description: 'The p99 handshake time from %s to {{ $labels.destination }} is {{ $value | humanizeDuration }} over the last 5 minutes, at least %gx its usual p99 (the median over the last day): overload or queueing at the server.' % [where, c.slowHandshakeFactor],
            },
          },
        ],
      },
      {
        name: 'connprobe.dns',
        rules: [
          {
            alert: 'ConnprobeDnsTimeouts',
            expr: |||
              sum by (%(h)s, resolver) (rate(connprobe_dns_timeouts_total{%(s)s}[5m])) * 300 >= %(min)d
              and
              sum by (%(h)s, resolver) (rate(connprobe_dns_timeouts_total{%(s)s}[5m]))
                / sum by (%(h)s, resolver) (rate(connprobe_dns_queries_total{%(s)s}[5m]))
                > %(ratio)g
            ||| % { h: h, s: s, min: c.dnsTimeoutsMin, ratio: c.dnsTimeoutRatio },
            'for': c.forShort,
            labels: { severity: 'warning' },
            annotations: {
              summary: 'A resolver leaves DNS queries unanswered.',
              description: 'The resolver {{ $labels.resolver }} left {{ $value | humanize }} queries from %s unanswered in 5 minutes: `connprobe diagnose` names the queries.' % where,
            },
          },
        ],
      },
      {
        name: 'connprobe.fleet',
        rules: [
          {
            alert: 'ConnprobeDestinationDown',
            expr: |||
              connprobe:destination_hosts_failing:ratio >= %(share)g
              and on (destination)
              connprobe:destination_hosts_failing:count >= %(min)d
            ||| % { share: c.fleetShare, min: c.fleetMinHosts },
            'for': c.forLong,
            labels: { severity: 'critical' },
            annotations: {
              summary: 'A destination fails from most of the hosts that connect to it.',
              description: "{{ $labels.destination }} fails from {{ $value | humanizePercentage }} of the hosts that connect to it: the server or its load balancer is down, not the hosts' network.",
            },
          },
          {
            alert: 'ConnprobeHostPathBroken',
            expr: |||
              connprobe:%(h)s_destinations_failing_alone:count
                / on (%(h)s) connprobe:%(h)s_destinations:count
                >= %(share)g
              and on (%(h)s)
              connprobe:%(h)s_destinations_failing_alone:count >= %(min)d
            ||| % { h: h, share: c.fleetShare, min: c.fleetMinDestinations },
            'for': c.forLong,
            labels: { severity: 'critical' },
            annotations: {
              summary: 'A host fails to destinations that the other hosts reach.',
              description: "%s fails to {{ $value | humanizePercentage }} of its destinations while most other hosts reach them: this host's network, DNS or firewall is broken, not the destinations." % where,
            },
          },
        ],
      },
      {
        name: 'connprobe.agent',
        rules: [
          {
            alert: 'ConnprobeEventsLost',
            expr: 'sum by (%s, stage) (increase(connprobe_events_lost_total{%s}[5m])) > 0' % [h, s],
            labels: { severity: 'warning' },
            annotations: {
              summary: 'connprobe lost events.',
              description: 'The agent on %s lost {{ $value | humanize }} events at stage {{ $labels.stage }} in 5 minutes; its counts and verdicts miss them. ringbuf: raise --ring-buffer-bytes; map: raise --max-sockets.' % where,
            },
          },
          {
            // Apart from ConnprobeEventsLost: what it counts is runs, not events (a run missed
            // is an event lost only where the hook hit would have reported one), it has no stage,
            // and its remedy is the hooks, not a buffer size. The metric is one total over the
            // agent's programs; bpftool names the program.
            alert: 'ConnprobeProgramRunsMissed',
            expr: 'sum by (%s) (increase(connprobe_program_runs_missed_total{%s}[5m])) > 0' % [h, s],
            labels: { severity: 'warning' },
            annotations: {
              summary: 'The kernel skipped runs of connprobe eBPF programs.',
              description: "The kernel skipped {{ $value | humanize }} runs of the agent's eBPF programs on %s in 5 minutes because a BPF program was already running on that CPU. Whatever those runs would have reported (a connect, retransmit, reset or close) is lost: it is in no other counter, connprobe_events_lost_total included, and its counts and verdicts miss it. `bpftool prog show` names the program (recursion_misses). On classic tracepoints (--hooks classic, or auto on a kernel without BTF ones) any kprobe or tracepoint program or BPF map syscall on that CPU blocks them; on BTF tracepoints only the same program, hit again from an interrupt." % where,
            },
          },
          {
            alert: 'ConnprobeAgentDown',
            expr: 'up{%s} == 0' % s,
            'for': c.forLong,
            labels: { severity: 'critical' },
            annotations: {
              summary: 'A connprobe agent cannot be scraped.',
              description: 'Prometheus could not scrape connprobe on %s for 5 minutes: its connections go unwatched.' % where,
            },
          },
        ],
      },
    ],
  },
}
