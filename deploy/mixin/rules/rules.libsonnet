// Recording rules: per host and destination, then across the fleet. Alerts and the dashboard
// read these, so each threshold and each window is written once.
{
  prometheusRules+:: {
    local c = $._config,
    local h = c.hostLabel,
    local s = c.selector,
    groups+: [
      {
        name: 'connprobe.rules',
        rules: [
          {
            record: 'connprobe:%s_destination_attempts:rate5m' % h,
            expr: 'sum by (%s, destination) (rate(connprobe_connect_attempts_total{%s}[5m]))' % [h, s],
          },
          {
            record: 'connprobe:%s_destination_reason_failures:rate5m' % h,
            expr: 'sum by (%s, destination, reason) (rate(connprobe_connect_failures_total{%s}[5m]))' % [h, s],
          },
          {
            // 0 where a destination has attempts and no failure series, so healthy hosts count.
            record: 'connprobe:%s_destination_failure_ratio:rate5m' % h,
            expr: |||
              (
                sum by (%(h)s, destination) (connprobe:%(h)s_destination_reason_failures:rate5m)
                or
                connprobe:%(h)s_destination_attempts:rate5m * 0
              )
              / (connprobe:%(h)s_destination_attempts:rate5m > 0)
            ||| % { h: h },
          },
          {
            record: 'connprobe:%s_destination_syn_retransmits:rate5m' % h,
            expr: 'sum by (%s, destination) (rate(connprobe_retransmits_total{%s, side="client", phase="syn"}[5m]))' % [h, s],
          },
          {
            // Resets received on connections this host opened, less those that refused a
            // connect (a refused connect is a reset received in SYN_SENT): resets mid-stream.
            record: 'connprobe:%s_destination_midstream_resets:rate5m' % h,
            expr: |||
              sum by (%(h)s, destination) (rate(connprobe_resets_total{%(s)s, side="client", direction="received"}[5m]))
              - (
                sum by (%(h)s, destination) (rate(connprobe_connect_failures_total{%(s)s, reason="refused"}[5m]))
                or
                sum by (%(h)s, destination) (rate(connprobe_resets_total{%(s)s, side="client", direction="received"}[5m])) * 0
              )
            ||| % { h: h, s: s },
          },
          {
            record: 'connprobe:%s_destination_midstream_resets:rate1h' % h,
            expr: |||
              sum by (%(h)s, destination) (rate(connprobe_resets_total{%(s)s, side="client", direction="received"}[1h]))
              - (
                sum by (%(h)s, destination) (rate(connprobe_connect_failures_total{%(s)s, reason="refused"}[1h]))
                or
                sum by (%(h)s, destination) (rate(connprobe_resets_total{%(s)s, side="client", direction="received"}[1h])) * 0
              )
            ||| % { h: h, s: s },
          },
          {
            // Only where handshakes completed in the window (else the quantile is NaN).
            record: 'connprobe:%s_destination_handshake_seconds:p99_5m' % h,
            expr: |||
              histogram_quantile(0.99, sum by (%(h)s, destination, le) (rate(connprobe_connect_duration_seconds_bucket{%(s)s}[5m])))
              and on (%(h)s, destination)
              sum by (%(h)s, destination) (rate(connprobe_connect_duration_seconds_count{%(s)s}[5m])) > 0
            ||| % { h: h, s: s },
          },
          {
            // The destination's own baseline: the median of its 5-minute p99 over the last day,
            // which a slowdown has to last twelve hours to move.
            record: 'connprobe:%s_destination_handshake_seconds:p99_5m_median1d' % h,
            expr: 'quantile_over_time(0.5, connprobe:%s_destination_handshake_seconds:p99_5m[1d])' % h,
          },
        ],
      },
      {
        // One host cannot tell "the destination is down" from "my path is broken"; the fleet
        // can: a destination failing from most of the hosts that connect to it, against a host
        // failing to destinations that the other hosts reach.
        name: 'connprobe.fleet.rules',
        rules: [
          {
            record: 'connprobe:destination_attempts:rate5m',
            expr: 'sum by (destination) (connprobe:%s_destination_attempts:rate5m)' % h,
          },
          {
            record: 'connprobe:destination_reason_failures:rate5m',
            expr: 'sum by (destination, reason) (connprobe:%s_destination_reason_failures:rate5m)' % h,
          },
          {
            record: 'connprobe:destination_hosts:count',
            expr: 'count by (destination) (connprobe:%s_destination_failure_ratio:rate5m)' % h,
          },
          {
            record: 'connprobe:destination_hosts_failing:count',
            expr: 'count by (destination) (connprobe:%s_destination_failure_ratio:rate5m >= %g)' % [h, c.fleetFailingRatio],
          },
          {
            record: 'connprobe:destination_hosts_failing:ratio',
            expr: |||
              (connprobe:destination_hosts_failing:count or connprobe:destination_hosts:count * 0)
              / connprobe:destination_hosts:count
            |||,
          },
          {
            record: 'connprobe:%s_destinations:count' % h,
            expr: 'count by (%s) (connprobe:%s_destination_failure_ratio:rate5m)' % [h, h],
          },
          {
            // Destinations this host fails to while other hosts connect to them and most of
            // those succeed.
            record: 'connprobe:%s_destinations_failing_alone:count' % h,
            expr: |||
              count by (%(h)s) (
                (connprobe:%(h)s_destination_failure_ratio:rate5m >= %(r)g)
                and on (destination) (connprobe:destination_hosts:count >= 2)
                and on (destination) (connprobe:destination_hosts_failing:ratio < %(share)g)
              )
            ||| % { h: h, r: c.fleetFailingRatio, share: c.fleetShare },
          },
        ],
      },
    ],
  },
}
