// What an operator tunes: the selector of connprobe's scrape job, the label that names a host,
// and every threshold. Override with `(import 'mixin.libsonnet') + { _config+:: { ... } }`.
{
  _config+:: {
    // Selects connprobe's own series (and its `up`): the job name of the scrape config or
    // PodMonitor.
    selector: 'job="connprobe"',
    // The label that tells hosts apart. Prometheus sets `instance` from the scrape target; a
    // PodMonitor can relabel the node name into `node` instead.
    hostLabel: 'instance',

    // A destination's failed connects over 5 minutes, by reason, as a share of its attempts.
    failureRatio: 0.05,
    // ... with at least this many attempts in those 5 minutes (a rare error is no incident).
    minAttempts: 10,
    // SYN blackhole: this share of a destination's connects ends unanswered (timeout, or given
    // up by the application) while SYNs are being resent.
    blackholeRatio: 0.2,
    // Resets of established connections: this many in 5 minutes, at this many times the
    // destination's rate over the last hour.
    midstreamResetsMin: 5,
    midstreamResetsFactor: 3,
    // Handshake p99 over 5 minutes at this many times its usual p99 (the median over a day), and at
    // least this many seconds above it (the verdict engine's `slow_handshakes` uses the same).
    slowHandshakeFactor: 4,
    slowHandshakeMinSeconds: 0.010,
    // DNS: share of a resolver's queries left unanswered, and the least number of them.
    dnsTimeoutRatio: 0.01,
    dnsTimeoutsMin: 3,

    // Fleet: a host counts as failing to a destination at this failure ratio; a destination is
    // down when at least `fleetShare` of the hosts that connect to it (and at least
    // `fleetMinHosts` of them) fail to it; a host's path is broken when at least `fleetShare` of
    // its destinations (and at least `fleetMinDestinations`) fail from it alone, while most other
    // hosts reach them.
    fleetFailingRatio: 0.5,
    fleetShare: 0.5,
    fleetMinHosts: 2,
    fleetMinDestinations: 2,

    // How long a condition must hold before an alert fires.
    forShort: '2m',
    forLong: '5m',

    // Metrics the mixin already uses although the agent on this branch does not export them
    // yet (they come with other issues). Their alerts are rendered and tested with promtool like
    // every other, but the lab check that every query matches real series skips them, and
    // asserts that they are indeed absent: once the agent exports one, that check fails until
    // the name is removed here (and, if needed, the lab made to produce it).
    pendingMetrics: [],

    dashboardUid: 'connprobe-overview',
    dashboardTitle: 'connprobe / TCP connections',
  },
}
