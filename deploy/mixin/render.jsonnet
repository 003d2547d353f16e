// Renders the mixin into the files committed under rendered/:
//   jsonnet -S -m deploy/mixin/rendered deploy/mixin/render.jsonnet
// The tests render it again and fail when the committed files differ.
local mixin = import 'mixin.libsonnet';
local tests = import 'tests/alerts.jsonnet';
local header = '# Rendered from deploy/mixin/*.libsonnet by `jsonnet -S -m deploy/mixin/rendered deploy/mixin/render.jsonnet`; do not edit.\n';
{
  'prometheus_rules.yaml': header + std.manifestYamlDoc(mixin.prometheusRules, quote_keys=false),
  'prometheus_alerts.yaml': header + std.manifestYamlDoc(mixin.prometheusAlerts, quote_keys=false),
  'alerts_test.yaml': header + std.manifestYamlDoc(tests, quote_keys=false),
} + {
  ['dashboards/' + name]: std.manifestJsonEx(mixin.grafanaDashboards[name], '  ') + '\n'
  for name in std.objectFields(mixin.grafanaDashboards)
}
