// Renders the mixin into the files committed under rendered/:
//   jsonnet -m deploy/mixin/rendered deploy/mixin/render.jsonnet
// JSON throughout: Prometheus and promtool read rule and test files as YAML, of which JSON is a
// part, and jsonnet writes JSON natively (its YAML writer takes minutes on these files).
// The tests render it again and fail when the committed files differ.
local mixin = import 'mixin.libsonnet';
{
  'prometheus_rules.json': mixin.prometheusRules,
  'prometheus_alerts.json': mixin.prometheusAlerts,
  'alerts_test.json': import 'tests/alerts.jsonnet',
} + {
  ['dashboards/' + name]: mixin.grafanaDashboards[name]
  for name in std.objectFields(mixin.grafanaDashboards)
}
