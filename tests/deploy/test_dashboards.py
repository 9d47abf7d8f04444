"""The Grafana dashboards: structure, and every query run against real pipeline output.

No Grafana runs here. What Grafana would do with a panel is reproduced instead: its variables and
the ClickHouse plugin's macros are expanded (tests/deploy/grafana.py) and the SQL runs on chDB — the
ClickHouse engine itself — over a database that a synthetic scenario filled through the embedded
pipeline (calls, feedback, judge scores, dead letters, and the rollups the views built from them).
PromQL panels are checked against the metrics the worker and server really export, and evaluated
offline by ``promtool test rules`` over series shaped like a scrape of them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import iso
from tests.deploy.grafana import (
    ALL,
    CLICKHOUSE_TYPE,
    PROMETHEUS_TYPE,
    TimeRange,
    dashboards,
    expand_clickhouse,
    expand_prometheus,
    panels,
    provisioned_datasources,
    targets,
)
from tests.deploy.prometheus import (
    PROMTOOL,
    THIRD_PARTY,
    exported_names,
    metric_names,
    run_promtool_expression_tests,
    scraped,
    third_party_series,
)

DASHBOARDS = dashboards()
EXPECTED = {"cost.json", "latency.json", "quality.json", "pipeline.json"}
RAW_TABLE_PANELS = {"Exact-repeat prompts (response-cache opportunity)"}
"""Panels allowed to read raw llm_calls: prompt hashes are not in the rollups. Everything else reads
llm_calls_1m, eval_1h, feedback_1h (or the small dlq table)."""


def test_the_four_dashboards_are_provisioned_with_unique_uids() -> None:
    assert set(DASHBOARDS) == EXPECTED
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids) and all(re.fullmatch(r"[a-z0-9-]{1,40}", u) for u in uids)
    titles = [d["title"] for d in DASHBOARDS.values()]
    assert len(set(titles)) == len(titles)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_panels_have_targets_ids_and_datasources_that_resolve(name: str) -> None:
    dashboard = DASHBOARDS[name]
    sources = provisioned_datasources()
    ids = [p["id"] for p in dashboard["panels"]] + [p["id"] for p in panels(dashboard) if p not in dashboard["panels"]]
    assert len(set(ids)) == len(ids), "panel ids must be unique within a dashboard"
    shown = list(panels(dashboard))
    assert len(shown) >= 8
    for panel in shown:
        assert panel["title"] and panel.get("targets"), f"{name}: panel {panel.get('title')!r} has no query"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        for target in panel["targets"]:
            ref = target.get("datasource") or panel["datasource"]
            assert ref["uid"] in sources, f"{name}/{panel['title']}: datasource {ref} is not provisioned"
            assert sources[ref["uid"]]["type"] == ref["type"]
            if ref["type"] == CLICKHOUSE_TYPE:
                assert target["editorType"] == "sql" and target["rawSql"].strip()
                assert target["queryType"] == ("timeseries" if panel["type"] == "timeseries" else "table")
            else:
                assert target["expr"].strip()
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] in sources


def test_clickhouse_panels_read_rollups_and_use_the_time_range() -> None:
    for name, dashboard in DASHBOARDS.items():
        for panel, target in targets(dashboard, CLICKHOUSE_TYPE):
            sql = target["rawSql"]
            assert re.search(r"\$__(timeFilter|fromTime)", sql), f"{name}/{panel['title']}: no time range"
            if re.search(r"\bFROM llm_calls\b(?!_)", sql):
                assert panel["title"] in RAW_TABLE_PANELS, f"{name}/{panel['title']} reads raw llm_calls"
            if panel["type"] == "timeseries":
                assert "$__timeInterval(" in sql, f"{name}/{panel['title']}: buckets without $__timeInterval"


# ---- every ClickHouse query on pipeline output ------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_db(chdb_dir: Path) -> Iterator[tuple[Any, TimeRange]]:
    """Two days of synthetic traffic through the embedded pipeline, plus judge scores for 600 calls."""
    from ingest.synthetic import Scenario, generate
    from llmpulse.runtime import EmbeddedRuntime, open_clickhouse
    from processors.records import PayloadBatch, Source
    from schemas.config import load_settings

    settings = load_settings(None, {"data_dir": chdb_dir, "clickhouse": {"database": f"dashboards_{time.time_ns()}"}})
    conn = open_clickhouse(settings, purpose="pytest dashboards")
    scenario = Scenario(events=30_000, days=2.0, seed=11, end=float(int(time.time() // 60 * 60)))
    runtime = EmbeddedRuntime(settings, conn)
    source, offset = Source("file", "dashboards.jsonl"), 0
    try:
        for payloads in generate(scenario):
            runtime.ingest(PayloadBatch(source, payloads, list(range(offset, offset + len(payloads)))), scenario.end)
            offset += len(payloads)
        runtime.finish()
        judged = conn.client.query(
            "SELECT request_id, toUnixTimestamp(ts) FROM llm_calls WHERE request_id != '' AND status = 'ok' "
            "ORDER BY cityHash64(request_id) LIMIT 600"
        ).result_rows
        results = [
            orjson.dumps({"kind": "judge_result", "request_id": rid, "rubric": rubric, "judge_model": "gpt-4o-mini",
                          "score": round(0.55 + (hash(rid + rubric) % 40) / 100, 2), "ts": iso(float(ts) + 90)})
            for rid, ts in judged for rubric in ("correctness", "helpfulness")
        ]  # fmt: skip
        runtime.ingest(PayloadBatch(source, results, list(range(offset, offset + len(results)))), scenario.end)
        runtime.flush()
    finally:
        runtime.close()
    tr = TimeRange(int(scenario.start) - 3600, int(time.time()) + 3600, 3600)
    try:
        yield conn, tr
    finally:
        conn.client.command(f"DROP DATABASE IF EXISTS {settings.clickhouse.database} SYNC")
        conn.close()


def _variable_values(conn: Any, dashboard: dict[str, Any], tr: TimeRange) -> dict[str, list[str]]:
    """Run the dashboard's variable queries as Grafana does to fill the drop-downs: with the
    variables before them at All, and again with one value picked (chained variables)."""
    at_all: dict[str, list[str] | None] = {v["name"]: ALL for v in dashboard["templating"]["list"]}
    values: dict[str, list[str]] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["datasource"]["type"] == CLICKHOUSE_TYPE:
            sql = expand_clickhouse(variable["query"], at_all, tr)
            values[variable["name"]] = [str(r[0]) for r in conn.client.query(sql).result_rows]
            picked = {**at_all, **{name: found[:1] for name, found in values.items()}}
            assert conn.client.query(expand_clickhouse(variable["query"], picked, tr)).result_rows
    return values


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_clickhouse_query_runs_on_pipeline_output(name: str, pipeline_db: tuple[Any, TimeRange]) -> None:
    conn, tr = pipeline_db
    dashboard = DASHBOARDS[name]
    values = _variable_values(conn, dashboard, tr)
    assert all(values.values()), f"{name}: a variable query found no values: {values}"
    everything: dict[str, list[str] | None] = dict.fromkeys(values, ALL)
    first: dict[str, list[str] | None] = {k: v[:1] for k, v in values.items()}  # one team, one feature
    two_features: dict[str, list[str] | None] = {**everything, "feature": values["feature"][:2]} if values else {}
    selections: list[dict[str, list[str] | None]] = [everything, first, two_features] if values else [{}]
    ran = 0
    for panel, target in targets(dashboard, CLICKHOUSE_TYPE):
        for selection in selections:
            sql = expand_clickhouse(target["rawSql"], selection, tr)
            try:
                result = conn.client.query(sql)
            except Exception as exc:  # the engine's message, with the SQL that caused it
                pytest.fail(f"{name}/{panel['title']} ({selection}) failed: {exc}\n{sql}")
            if selection is everything or not values:
                assert result.result_rows, f"{name}/{panel['title']}: no rows on the pipeline's output\n{sql}"
                if panel["type"] == "timeseries":
                    assert result.column_names[0] == "time", f"{name}/{panel['title']}: time must come first"
            ran += 1
    assert ran >= (1 if name == "pipeline.json" else 9)


def test_drift_tables_compare_with_the_previous_period(pipeline_db: tuple[Any, TimeRange]) -> None:
    """The half-range check: with the range set to the scenario's second day, 'before' is its first."""
    conn, tr = pipeline_db
    (panel,) = [p for p in panels(DASHBOARDS["quality.json"]) if p["title"].startswith("Call behaviour")]
    half = TimeRange(tr.start + (tr.end - tr.start) // 2, tr.end, tr.interval_s)
    sql = expand_clickhouse(panel["targets"][0]["rawSql"], {"feature": ALL, "team": ALL}, half)
    rows = conn.client.query(sql).named_results()
    totals = conn.client.query(
        f"SELECT sum(calls) FROM llm_calls_1m WHERE minute >= toDateTime({half.start})"
    ).result_rows
    assert sum(r["call_count"] for r in rows) == totals[0][0]
    assert all(r["refusal_rate"] is not None and r["refusal_rate_before"] is not None for r in rows)


# ---- PromQL ------------------------------------------------------------------------------------


def _prometheus_exprs() -> dict[str, str]:
    out = {}
    for name, dashboard in DASHBOARDS.items():
        for panel, target in targets(dashboard, PROMETHEUS_TYPE):
            out[f"{name}/{panel['title']}/{target['refId']}"] = expand_prometheus(target["expr"], {"instance": ".*"})
    return out


def test_promql_panels_use_only_metrics_that_are_exported() -> None:
    exprs = _prometheus_exprs()
    assert len(exprs) >= 20
    known = exported_names() | set(THIRD_PARTY)
    for where, expr in exprs.items():
        unknown = metric_names(expr) - known
        assert not unknown, f"{where}: {sorted(unknown)} not exported by llmpulse (sinks/metrics.py) nor listed"


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(llmpulse_http_request_duration_seconds_bucket'
            '{route="/v1/events", instance=~".*"}[5m]))) / on (job) group_left up offset 1h > bool 1e3')  # fmt: skip
    assert metric_names(expr) == {"llmpulse_http_request_duration_seconds_bucket", "up"}


@pytest.mark.skipif(PROMTOOL is None, reason="no promtool (apt-get install prometheus)")
def test_promql_panels_return_series_when_promtool_evaluates_them(tmp_path: Path) -> None:
    series = scraped("llmpulse-worker") + scraped("llmpulse-server") + third_party_series()
    run_promtool_expression_tests(_prometheus_exprs(), series, tmp_path)
