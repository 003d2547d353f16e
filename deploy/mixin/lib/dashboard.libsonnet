// The few pieces of Grafana's dashboard model the dashboard uses (schemaVersion 39), written
// out instead of pulling grafonnet and its dependencies through jsonnet-bundler.
local datasource = { type: 'prometheus', uid: '${datasource}' };
{
  target(expr, legend):: { datasource: datasource, expr: expr, legendFormat: legend },

  local panel(type, title, description, targets, unit) = {
    type: type,
    title: title,
    description: description,
    datasource: datasource,
    targets: [
      t { refId: std.char(std.codepoint('A') + i) }
      for i in std.range(0, std.length(targets) - 1)
      for t in [targets[i]]
    ],
    fieldConfig: { defaults: { unit: unit }, overrides: [] },
  },

  timeseries(title, description, targets, unit='short'):: panel('timeseries', title, description, targets, unit) {
    options: { legend: { displayMode: 'table', placement: 'right', calcs: ['max', 'last'] }, tooltip: { mode: 'multi', sort: 'desc' } },
  },
  stat(title, description, targets, unit='short'):: panel('stat', title, description, targets, unit) {
    options: { reduceOptions: { calcs: ['lastNotNull'], fields: '', values: false }, colorMode: 'value', graphMode: 'area' },
  },
  row(title):: { type: 'row', title: title, collapsed: false, panels: [] },

  // Lays panels out left to right in rows of 24 columns; a row panel starts a new line. Ids are
  // given in order.
  layout(panels, height=8)::
    local step(state, p) =
      local w = if p.type == 'row' then 24 else std.get(p, 'width', 12);
      local h = if p.type == 'row' then 1 else height;
      local wrap = state.x + w > 24 || p.type == 'row';
      local x = if wrap then 0 else state.x;
      local y = if wrap then state.y + state.h else state.y;
      {
        x: x + w,
        y: y,
        h: if wrap then h else std.max(state.h, h),
        panels: state.panels + [std.mergePatch(p, { width: null }) {
          id: std.length(state.panels) + 1,
          gridPos: { x: x, y: y, w: w, h: h },
        }],
      };
    std.foldl(step, panels, { x: 0, y: 0, h: 0, panels: [] }).panels,

  variable(name, label, query):: {
    type: 'query',
    name: name,
    label: label,
    datasource: datasource,
    query: { query: query, refId: name },
    definition: query,
    refresh: 2,
    includeAll: true,
    multi: true,
    allValue: '.+',
    current: { selected: true, text: ['All'], value: ['$__all'] },
    sort: 1,
  },
  datasourceVariable:: {
    type: 'datasource',
    name: 'datasource',
    label: 'Data source',
    query: 'prometheus',
    current: {},
  },
}
