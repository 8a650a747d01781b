// Type of deploy/grafana/s3proxy.json, built from the dashboard and panel types of
// @grafana/schema. tests/deploy/test_grafana_schema.py copies this file next to a generated
// dashboard.ts that assigns the dashboard JSON as an object literal to S3ProxyDashboard, then
// runs tsc --noEmit --strict on it.

import type * as common from '@grafana/schema';
import type * as stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as stateTimeline from '@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen';
import type * as timeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

// The package's "exports" map does not list the generated dashboard types, so they are imported
// by file path. The root export `Dashboard` is a hand-written wrapper around them that, among
// other changes, allows null data source references.
import type * as raw from './node_modules/@grafana/schema/dist/types/raw/dashboard/x/types.gen';

// JSON cannot name a TypeScript enum member, and a string literal such as "absolute" is not
// assignable to a string enum type such as ThresholdsMode. Json<T> replaces every string enum
// by the union of its values, so "absolute" is accepted and "absolut" is not. Number literals
// are already assignable to numeric enums when they are member values, so numbers stay as they
// are. Objects are mapped property by property, which keeps optional markers and the
// excess-property check of object literals.
type Json<T> = T extends string
  ? `${T}`
  : T extends ReadonlyArray<infer Item>
    ? Array<Json<Item>>
    : T extends object
      ? { [Key in keyof T]: Json<T[Key]> }
      : T;

// A Prometheus query as Grafana stores it in a panel's targets. @grafana/schema 13.2.3 has no
// Prometheus query type, so the fields come from the Prometheus interface in
// packages/grafana-prometheus/src/dataquery.gen.ts of grafana/grafana.
interface PrometheusQuery extends common.DataQuery {
  datasource?: raw.DataSourceRef;
  editorMode?: 'code' | 'builder';
  exemplar?: boolean;
  expr: string;
  format?: 'time_series' | 'table' | 'heatmap';
  instant?: boolean;
  intervalFactor?: number;
  legendFormat?: string;
  range?: boolean;
}

// Grafana's query variables store the query text shown in the variable editor in `definition`
// (QueryVariableModel in @grafana/data), but the schema's VariableModel does not list it.
interface Variable extends raw.VariableModel {
  definition?: string;
}

// raw.FieldConfigSource types `custom` as Record<string, unknown>, which accepts any field.
// Each panel plugin declares the type of its `custom` field config instead.
type FieldConfigSource<Custom> = Omit<raw.FieldConfigSource, 'defaults'> & {
  defaults: Omit<raw.FieldConfig, 'custom'> & { custom?: Custom };
};

// raw.Panel types `options` and `targets` as records of unknown values. A panel of a known
// plugin type gets that plugin's options and Prometheus queries instead.
type PluginPanel<Type extends string, Options, Custom> = Omit<
  raw.Panel,
  'type' | 'options' | 'fieldConfig' | 'targets'
> & {
  type: Type;
  options?: Options;
  fieldConfig?: FieldConfigSource<Custom>;
  targets?: PrometheusQuery[];
};

// The stat panel has no custom field config, so `custom` must be absent.
type StatPanel = PluginPanel<'stat', stat.Options, never>;
type TimeSeriesPanel = PluginPanel<'timeseries', timeSeries.Options, timeSeries.FieldConfig>;
type StateTimelinePanel = PluginPanel<
  'state-timeline',
  stateTimeline.Options,
  stateTimeline.FieldConfig
>;
type Panel = StatPanel | TimeSeriesPanel | StateTimelinePanel;
type RowPanel = Omit<raw.RowPanel, 'panels'> & { panels: Panel[] };

// `type` is a string literal in every member of the panel union, so tsc picks the member by the
// panel's type and checks the panel against that member only.
export type S3ProxyDashboard = Json<
  Omit<raw.Dashboard, 'panels' | 'templating'> & {
    panels?: Array<RowPanel | Panel>;
    templating?: { list?: Variable[] };
  }
>;
