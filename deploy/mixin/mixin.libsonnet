// connprobe's monitoring mixin: `prometheusRules`, `prometheusAlerts`, `grafanaDashboards`, in
// the shape of the other mixins (node-mixin), tuned through `_config`.
(import 'config.libsonnet') +
(import 'rules/rules.libsonnet') +
(import 'alerts/alerts.libsonnet') +
(import 'dashboards/connprobe.libsonnet')
