"""Grafana dashboards as code: *run overview*, *fleet / hardware*, *supervisor health*.

Built with grafana-foundation-sdk pinned to the build for Grafana 11.6 (`1769699379!11.6.0`:
the package's versions are EPOCH!GRAFANA_VERSION and pip's "newest" is the highest epoch, not
the newest Grafana). The JSON is committed next to this file; `tests/unit/test_dashboards.py`
fails when it differs from this output and validates it against Grafana's JSON schemas
(`/work/shared/grafana-schema/`, or `GRAFANA_SCHEMA_DIR`). Regenerate with
``python -m alerts.dashboards.generate``.

Queries use the metric names of docs/metrics.md and the recording rules of alerts/rules/;
incident annotations are the ones supervisor/annotations.py posts (tags `titan-supervisor`,
`run:<run_id>`, `kind:<kind>`, `action:<action>`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, stat, table, timeseries
from grafana_foundation_sdk.builders.prometheus import Dataquery as Prom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

OUT = Path(__file__).resolve().parent
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
RUN = 'run_id=~"$run_id"'


def q(expr: str, legend: str = "", ref: str = "A") -> Prom:
    return Prom().expr(expr).legend_format(legend).ref_id(ref)


def ts(title: str, unit: str, *targets: Prom, desc: str = "", w: int = 12) -> timeseries.Panel:
    p = timeseries.Panel().title(title).unit(unit).datasource(DS).span(w).height(8).description(desc) \
        .legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST)
                .placement(cm.LegendPlacement.BOTTOM).show_legend(True).calcs([])) \
        .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
    for i, t in enumerate(targets):
        p = p.with_target(t.ref_id(chr(ord("A") + i)))
    return p


def st(title: str, unit: str, target: Prom, desc: str = "", w: int = 4) -> stat.Panel:
    return stat.Panel().title(title).unit(unit).datasource(DS).span(w).height(4).description(desc) \
        .graph_mode(cm.BigValueGraphMode.AREA).color_mode(cm.BigValueColorMode.VALUE) \
        .justify_mode(cm.BigValueJustifyMode.AUTO).text_mode(cm.BigValueTextMode.AUTO) \
        .wide_layout(True).show_percent_change(False) \
        .percent_change_color_mode(cm.PercentChangeColorMode.STANDARD) \
        .orientation(cm.VizOrientation.AUTO) \
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"])) \
        .with_target(target)


def base(uid: str, title: str, desc: str) -> db.Dashboard:
    ds_var = db.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    run_var = db.QueryVariable("run_id").label("Run").datasource(DS) \
        .query("label_values(titan_run_info, run_id)").multi(True).include_all(True) \
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
    return db.Dashboard(title).uid(uid).description(desc).tags(["titan-supervisor"]) \
        .refresh("30s").time("now-6h", "now").timezone("utc") \
        .with_variable(ds_var).with_variable(run_var)


def incidents_annotation() -> db.AnnotationQuery:
    grafana = DataSourceRef(type_val="grafana", uid="-- Grafana --")
    return db.AnnotationQuery().name("Incidents").datasource(grafana).enable(True).icon_color("red") \
        .target(db.AnnotationTarget().type("tags").tags(["titan-supervisor", "run:$run_id"]).match_any(False)
                .limit(500))


def run_overview() -> db.Dashboard:
    d = base("titan-run-overview", "titan-supervisor / Run overview",
             "One training run: loss, throughput, ranks, checkpoints, goodput, the policy.")
    d = d.annotation(incidents_annotation())
    d = d.with_row(db.Row("Training")) \
        .with_panel(ts("Loss", "none", q(f"titan_loss{{{RUN}}}", "{{run_id}}"),
                       desc="Incident annotations: opened / acted / resolved (supervisor/annotations.py).")) \
        .with_panel(ts("Gradient norm (pre-clip)", "none", q(f"titan_grad_norm{{{RUN}}}", "{{run_id}}"))) \
        .with_panel(ts("Learning rate and LR scale", "none", q(f"titan_lr{{{RUN}}}", "lr {{run_id}}"),
                       q(f"titan_lr_scale{{{RUN}}}", "scale {{run_id}}"))) \
        .with_panel(ts("Tokens per second", "short", q(f"titan_tokens_per_second{{{RUN}}}", "{{run_id}}")))
    d = d.with_row(db.Row("Ranks")) \
        .with_panel(heatmap.Panel().title("Per-rank step time").datasource(DS).span(16).height(8)
                    .description("Each row a rank (gathered every K steps, collective waits excluded).")
                    .with_target(q(f"titan_rank_step_seconds{{{RUN}}}", "rank {{rank}} {{node}}"))) \
        .with_panel(ts("Step time p50 (rank 0)", "s", q(f"titan:step_duration_seconds:p50_5m{{{RUN}}}",
                                                         "{{run_id}}"), w=8))
    d = d.with_row(db.Row("Checkpoints and goodput")) \
        .with_panel(st("Checkpoint age", "s", q(f"titan_checkpoint_age_seconds{{{RUN}}}"))) \
        .with_panel(st("Checkpoint interval applied", "none", q(f"titan_checkpoint_interval_steps{{{RUN}}}"))) \
        .with_panel(st("Interval recommended (Young/Daly)", "none",
                       q(f"titan_recommended_checkpoint_interval_steps{{{RUN}}}"))) \
        .with_panel(st("Goodput (ETTR)", "percentunit", q(f"titan_goodput_ratio{{{RUN}}}"))) \
        .with_panel(st("Last save", "s", q(f"titan_checkpoint_save_seconds{{{RUN}}}"))) \
        .with_panel(st("Generation", "none", q(f"titan_generation{{{RUN}}}"))) \
        .with_panel(ts("GPU-hours lost per day by incident kind", "none",
                       q(f"titan:lost_gpu_hours:increase1d{{{RUN}}}", "{{kind}}")))  \
        .with_panel(ts("Steps lost by incident kind", "none",
                       q(f"sum by (kind) (increase(titan_lost_steps_total{{{RUN}}}[$__range]))", "{{kind}}")))
    d = d.with_row(db.Row("Policy and incidents")) \
        .with_panel(ts("Budget left per rung", "none", q(f"titan_policy_budget_remaining{{{RUN}}}", "{{budget}}"),
                       w=8)) \
        .with_panel(st("Policy mode", "none", q(f"titan_policy_mode{{{RUN}}} == 1", "{{mode}}"), w=4)) \
        .with_panel(st("Human needed", "none", q(f"titan_human_needed{{{RUN}}}"), w=4)) \
        .with_panel(table.Panel().title("Open incidents").datasource(DS).span(8).height(8)
                    .with_target(q(f"titan_open_incidents{{{RUN}}} == 1", "{{kind}}").instant()))
    return d


def fleet() -> db.Dashboard:
    d = base("titan-fleet-hardware", "titan-supervisor / Fleet and hardware",
             "Per node: stragglers, DCGM XID/ECC/throttling, restarts, node-exporter health.")
    d = d.with_row(db.Row("Ranks per node")) \
        .with_panel(ts("Step time / median of ranks", "none",
                       q(f"titan:rank_step_seconds:ratio_to_median{{{RUN}}}", "rank {{rank}} {{node}}"),
                       desc="Above 1.5 for 15 min fires TitanStraggler.")) \
        .with_panel(ts("Heartbeat age per rank", "s",
                       q(f"titan_rank_heartbeat_age_seconds{{{RUN}}}", "rank {{rank}} {{node}}")))
    d = d.with_row(db.Row("GPUs (DCGM exporter)")) \
        .with_panel(ts("XID errors (last code)", "none", q("DCGM_FI_DEV_XID_ERRORS", "{{Hostname}} gpu {{gpu}}"), w=8)) \
        .with_panel(ts("Double-bit ECC errors (10 min)", "none",
                       q("increase(DCGM_FI_DEV_ECC_DBE_VOL_TOTAL[10m])", "{{Hostname}} gpu {{gpu}}"), w=8)) \
        .with_panel(ts("Clock throttle reasons", "none",
                       q("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS or DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
                         "{{Hostname}} gpu {{gpu}}"), w=8))
    d = d.with_row(db.Row("Restarts and nodes")) \
        .with_panel(ts("Restarts by cause", "none",
                       q(f"sum by (cause) (increase(titan_restarts_total{{{RUN}}}[1h]))", "{{cause}}"), w=8)) \
        .with_panel(ts("Nodes excluded", "none", q(f"titan_nodes_excluded{{{RUN}}}", "{{run_id}}"), w=8,
                       desc="Nodes the supervisor drained from the run (titan_nodes_excluded).")) \
        .with_panel(ts("Node exporters up", "none", q('up{job="node-exporter"}', "{{instance}}"), w=8)) \
        .with_panel(ts("Checkpoint volume free", "percentunit",
                       q('node_filesystem_avail_bytes{mountpoint=~"/data.*|/checkpoints.*"} '
                         '/ node_filesystem_size_bytes', "{{instance}} {{mountpoint}}"), w=24))
    return d


def supervisor_health() -> db.Dashboard:
    d = base("titan-supervisor-health", "titan-supervisor / Supervisor health",
             "The daemon itself: ingest rate and latency, loop lag, refused requests, dropped telemetry, journal errors.")
    d = d.with_row(db.Row("Ingest")) \
        .with_panel(ts("Requests per second by route", "reqps", q(f"titan:http_requests:rate5m{{{RUN}}}", "{{route}}"))) \
        .with_panel(ts("p99 latency by route", "s",
                       q(f"titan:http_request_duration_seconds:p99_5m{{{RUN}}}", "{{route}}"))) \
        .with_panel(ts("Refused requests (4xx) by route", "reqps",
                       q(f"titan:http_requests_refused:rate5m{{{RUN}}}", "{{route}}"))) \
        .with_panel(ts("Telemetry dropped by the trainer", "short",
                       q(f"rate(titan_telemetry_dropped_records_total{{{RUN}}}[5m])", "records {{run_id}}"),
                       q(f"rate(titan_telemetry_dropped_heartbeats_total{{{RUN}}}[5m])", "heartbeats {{run_id}}")))
    d = d.with_row(db.Row("Daemon")) \
        .with_panel(ts("Event loop lag", "s", q(f"titan_event_loop_lag_seconds{{{RUN}}}", "{{instance}}"), w=8)) \
        .with_panel(ts("Scrape up", "none", q('up{job="titan-supervisor"}', "{{instance}}"), w=8)) \
        .with_panel(ts("Failed actions", "none",
                       q(f'sum by (kind) (increase(titan_actions_total{{{RUN}, result="failed"}}[1h]))', "{{kind}}"),
                       w=8)) \
        .with_panel(ts("Journal write errors", "none",
                       q(f"increase(titan_journal_write_errors_total{{{RUN}}}[1h])", "{{instance}}"), w=24,
                       desc="Failed SQLite write transactions (disk full, I/O error, locked): each is a lost "
                            "journal record. Any is worth a look at the daemon's log and disk."))
    return d


DASHBOARDS = {"run-overview.json": run_overview, "fleet-hardware.json": fleet,
              "supervisor-health.json": supervisor_health}


def render() -> dict[str, str]:
    enc = JSONEncoder(sort_keys=True, indent=2)
    return {name: enc.encode(fn().build()) + "\n" for name, fn in DASHBOARDS.items()}


def main() -> int:
    for name, text in render().items():
        (OUT / name).write_text(text)
        json.loads(text)
        print(f"wrote {OUT / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
