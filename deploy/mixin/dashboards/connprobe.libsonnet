// One dashboard: every destination's connects, failures by reason, handshake times,
// retransmits and resets; the fleet's view; the agents' own health.
local g = import '../lib/dashboard.libsonnet';
{
  grafanaDashboards+:: {
    local c = $._config,
    local h = c.hostLabel,
    // Every connprobe series of the chosen hosts; per-destination metrics add the destination.
    local sel = '%s, %s=~"$%s"' % [c.selector, h, h],
    local dsel = sel + ', destination=~"$destination"',
    // Recorded series keep the host label, not the job's.
    local rsel = '%s=~"$%s"' % [h, h],
    local rate(metric, extra='') = 'rate(%s{%s%s}[$__rate_interval])' % [metric, dsel, extra],

    'connprobe.json': {
      uid: c.dashboardUid,
      title: c.dashboardTitle,
      description: 'TCP connects, failures and their kernel reasons, handshake times, retransmits and resets per destination, as connprobe sees them in the kernel.',
      tags: ['connprobe', 'network'],
      schemaVersion: 39,
      editable: true,
      graphTooltip: 1,
      time: { from: 'now-1h', to: 'now' },
      refresh: '30s',
      timezone: 'utc',
      annotations: { list: [] },
      links: [],
      templating: {
        list: [
          g.datasourceVariable,
          g.variable(h, 'Host', 'label_values(connprobe_build_info{%s}, %s)' % [c.selector, h]),
          g.variable('destination', 'Destination', 'label_values(connprobe_connect_attempts_total{%s}, destination)' % sel),
        ],
      },
      panels: g.layout([
        g.row('Overview'),
        g.stat('Agents up', 'Agents Prometheus scraped successfully.', [
          g.target('sum(up{%s})' % sel, 'up'),
        ]) { width: 6 },
        g.stat('Connects/s', 'Connects opened by the selected hosts, to the selected destinations.', [
          g.target('sum(%s)' % rate('connprobe_connect_attempts_total'), 'connects/s'),
        ], 'reqps') { width: 6 },
        g.stat('Failed connects', 'Share of those connects that failed, any reason.', [
          g.target('sum(%s) / sum(%s)' % [rate('connprobe_connect_failures_total'), rate('connprobe_connect_attempts_total')], 'failed'),
        ], 'percentunit') { width: 6 },
        g.stat('Events lost (1h)', 'Events the agents lost, any stage. Anything above 0 means the counts miss something.', [
          g.target('sum(increase(connprobe_events_lost_total{%s}[1h]))' % sel, 'lost'),
        ]) { width: 6 },

        g.row('Destinations'),
        g.timeseries('Connect failure ratio', 'Failed connects as a share of attempts, per destination.', [
          g.target('sum by (destination) (%s) / sum by (destination) (%s)' % [rate('connprobe_connect_failures_total'), rate('connprobe_connect_attempts_total')], '{{destination}}'),
        ], 'percentunit'),
        g.timeseries('Failed connects by reason', 'refused: answered with a reset; timeout: the kernel gave up after its SYN retries; unreachable: an ICMP error; cancelled: the application gave up before the handshake ended.', [
          g.target('sum by (destination, reason) (%s)' % rate('connprobe_connect_failures_total'), '{{destination}} {{reason}}'),
        ], 'reqps'),
        g.timeseries('Connects/s', 'Connects opened per destination, established or failed.', [
          g.target('sum by (destination) (%s)' % rate('connprobe_connect_attempts_total'), '{{destination}}'),
        ], 'reqps'),
        g.timeseries('Handshake time p50 / p99', 'SYN sent to ESTABLISHED, for established connects.', [
          g.target('histogram_quantile(0.5, sum by (destination, le) (%s))' % rate('connprobe_connect_duration_seconds_bucket'), '{{destination}} p50'),
          g.target('histogram_quantile(0.99, sum by (destination, le) (%s))' % rate('connprobe_connect_duration_seconds_bucket'), '{{destination}} p99'),
        ], 's'),
        g.timeseries('Retransmit ratio (data)', 'Segments resent after the handshake (established, and closing: a sender that shuts down its side with data still queued resends in fin_wait1) as a share of data segments sent (counted when connections close).', [
          g.target('sum by (destination) (%s) / sum by (destination) (%s)' % [rate('connprobe_retransmits_total', ', phase!="syn"'), rate('connprobe_segments_sent_total')], '{{destination}}'),
        ], 'percentunit'),
        g.timeseries('SYN retransmits/s', 'SYNs (client) and SYN-ACKs (server) resent: the handshake is waiting for an answer.', [
          g.target('sum by (destination, side) (%s)' % rate('connprobe_retransmits_total', ', phase="syn"'), '{{destination}} {{side}}'),
        ], 'pps'),
        g.timeseries('Resets/s', 'Resets received or sent, per destination.', [
          g.target('sum by (destination, direction) (%s)' % rate('connprobe_resets_total'), '{{destination}} {{direction}}'),
        ], 'pps'),
        g.timeseries('Resets of established connections/s', 'Resets received on connections this host opened, less the refused connects: the peer or a middlebox resets connections mid-stream.', [
          g.target('sum by (destination) (connprobe:%s_destination_midstream_resets:rate5m{%s, destination=~"$destination"})' % [h, rsel], '{{destination}}'),
        ], 'pps'),

        g.row('Fleet'),
        g.timeseries('Share of hosts failing, per destination', 'Of the hosts that connect to a destination, the share whose connects fail (at least %g%%). Near 1 from many hosts: the destination is down.' % (c.fleetFailingRatio * 100), [
          g.target('connprobe:destination_hosts_failing:ratio{destination=~"$destination"}', '{{destination}}'),
        ], 'percentunit'),
        g.timeseries('Failing destinations, per host', 'Destinations each host fails to (at least %g%% of its connects). One host failing to many destinations that others reach: its own path is broken.' % (c.fleetFailingRatio * 100), [
          g.target('count by (%s) (connprobe:%s_destination_failure_ratio:rate5m{%s} >= %g)' % [h, h, rsel, c.fleetFailingRatio], '{{%s}}' % h),
        ]),

        g.row('DNS'),
        g.timeseries('DNS queries unanswered', "Share of each resolver's queries that got no answer within the agent's --dns-timeout.", [
          g.target('sum by (resolver) (rate(connprobe_dns_timeouts_total{%s}[$__rate_interval])) / sum by (resolver) (rate(connprobe_dns_queries_total{%s}[$__rate_interval]))' % [sel, sel], '{{resolver}}'),
        ], 'percentunit') { width: 24 },

        g.row('Agents'),
        g.timeseries('Events/s by type', 'Events delivered from the kernel.', [
          g.target('sum by (type) (rate(connprobe_events_total{%s}[$__rate_interval]))' % sel, '{{type}}'),
        ], 'ops') { width: 8 },
        g.timeseries('Events lost/s by stage', "ringbuf: the agent fell behind; map: a connect's start record was evicted; queue, log: the agent's own queues.", [
          g.target('sum by (%s, stage) (rate(connprobe_events_lost_total{%s}[$__rate_interval]))' % [h, sel], '{{%s}} {{stage}}' % h),
        ], 'ops') { width: 8 },
        g.timeseries('Destinations with a label', 'Destinations with their own series, and those folded into destination="other" because every slot was taken.', [
          g.target('sum by (%s) (connprobe_destinations_tracked{%s})' % [h, sel], '{{%s}} tracked' % h),
          g.target('sum by (%s) (increase(connprobe_destinations_folded_total{%s}[$__rate_interval]))' % [h, sel], '{{%s}} folded' % h),
        ]) { width: 8 },
      ]),
    },
  },
}
