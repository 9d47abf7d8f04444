"""AlertStore: alert history in ClickHouse, and what a restarted evaluator needs to carry on.

Every state change is a row of ``alerts``; the latest row per dedup key is the alert's state.
After a restart the evaluator asks which alerts are firing (so it does not page again), what
each spike rule's recent windows looked like (so baselines are warm), and how much each budget
has spent this period and which thresholds it already announced.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from processors.alerts.events import AlertEvent
from processors.drift import MID_QUANTILES
from processors.sketch import QuantileSketch
from schemas.rules import Budget, Rule
from sinks.clickhouse import Connection, RetryPolicy
from sinks.queries.metrics import (
    METRIC_SQL,
    flow_windows_sql,
    rule_windows_sql,
    scope_columns,
    sql_literal,
    where_clause,
)

_COLUMNS = [
    "dedup_key", "rule", "state", "severity", "action", "metric", "value", "condition", "scope", "labels",
    "window_start", "window_end", "started_at", "ended_at", "summary", "runbook_url", "query", "extra",
]  # fmt: skip


def _row(e: AlertEvent) -> list[Any]:
    return [
        e.dedup_key, e.rule, e.state, e.severity, e.action, e.metric, e.value, e.condition, e.scope, e.labels,
        e.window_start, e.window_end, e.started_at, e.ended_at, e.summary, e.runbook_url or "", e.query or "",
        json.dumps(e.extra, default=str),
    ]  # fmt: skip


class AlertStore:
    def __init__(self, conn: Connection, retry: RetryPolicy | None = None) -> None:
        self.conn = conn
        self.retry = retry or RetryPolicy(retries=3)

    def write(self, events: Sequence[AlertEvent]) -> None:
        if events:
            rows = [_row(e) for e in events]
            self.retry.run(
                "insert into alerts",
                lambda: self.conn.client.insert(f"{self.conn.database}.alerts", rows, column_names=_COLUMNS),
            )

    def firing(self) -> list[AlertEvent]:
        """Alerts whose latest state is firing (rule alerts; budget notices do not resolve).

        Latest by event time (the window that caused the change), not by ``emitted_at``: a worker
        catching up writes an incident's firing and its resolve in one insert, with one
        ``emitted_at``, and a tie there picked either row, so a restart restored resolved alerts
        as firing (and the incident after them never paged)."""
        result = self.conn.client.query(
            "SELECT dedup_key, argMax(tuple(" + ", ".join(_COLUMNS[1:]) + "), "
            "tuple(window_end, state = 'resolved', emitted_at)) AS last "
            "FROM alerts GROUP BY dedup_key HAVING last.2 = 'firing' AND last.5 != 'budget_spend_usd'"
        )
        out = []
        for key, last in result.result_rows:
            values = dict(zip(_COLUMNS[1:], last, strict=True))
            out.append(
                AlertEvent(
                    dedup_key=key, rule=values["rule"], state="firing", severity=values["severity"],
                    action=values["action"], metric=values["metric"], value=values["value"],
                    condition=values["condition"], scope=dict(values["scope"]), labels=dict(values["labels"]),
                    window_start=_aware(values["window_start"]), window_end=_aware(values["window_end"]),
                    started_at=_aware(values["started_at"]), ended_at=None, summary=values["summary"],
                    runbook_url=values["runbook_url"] or None, query=values["query"] or None,
                    extra=json.loads(values["extra"] or "{}"),
                )
            )  # fmt: skip
        return out

    def window_values(
        self, rule: Rule, start: float, end: float
    ) -> dict[int, dict[tuple[str, ...], tuple[float | None, float]]]:
        """The rule's metric per window start and scope value: {window: {values: (metric, calls)}};
        for an absence rule, (active flows, calls)."""
        if rule.absent is not None:
            sql = flow_windows_sql(rule.scope.by, rule.scope.where, int(rule.window), start, end)
        elif rule.metric in METRIC_SQL:
            sql = rule_windows_sql(rule.metric, rule.scope.by, rule.scope.where, int(rule.window), start, end)
        else:
            return {}
        n = len(rule.scope.by)
        out: dict[int, dict[tuple[str, ...], tuple[float | None, float]]] = {}
        for row in self.conn.client.query(sql).result_rows:
            values = tuple(str(v) for v in row[1 : 1 + n])
            value, calls = row[1 + n], row[2 + n]
            out.setdefault(int(row[0]), {})[values] = (None if value is None else float(value), float(calls))
        return out

    def recent_values(
        self,
        rule: Rule,
        before: float,
        windows: int,
        by_window: dict[int, dict[tuple[str, ...], tuple[float | None, float]]] | None = None,
    ) -> dict[tuple[str, ...], list[tuple[float, float]]]:
        """A rule's (value, calls) per scope for the ``windows`` windows before ``before`` (baseline
        warm-up). ``by_window``: those windows' ``window_values``, where the caller read them already."""
        out: dict[tuple[str, ...], list[tuple[float, float]]] = {}
        start = before - rule.window * windows
        if by_window is None:
            by_window = self.window_values(rule, start, before)
        if rule.absent is not None:
            return _absence_history(by_window, int(start - start % rule.window), int(before), int(rule.window))
        for ws in sorted(by_window):
            for values, (value, calls) in by_window[ws].items():
                if value is not None and calls >= rule.min_calls:
                    out.setdefault(values, []).append((value, calls))
        return out

    def drift_history(
        self, by: Sequence[str], where: Mapping[str, str], window_s: int, start: float, end: float
    ) -> dict[tuple[str, ...], list[tuple[int, QuantileSketch, set[str]]]]:
        """Per scope value, its windows with calls in [start, end), oldest first: (window start, output
        lengths, response models). Output lengths come back as the rollup's 100 evenly spaced quantiles
        weighted by the window's calls; response models from ``served_models_1m`` where the scope is
        feature/model (what it keeps), else from the raw calls of those windows."""
        n = len(by)
        dims, group = scope_columns(by)
        interval = f"toUnixTimestamp(toStartOfInterval(r.minute, INTERVAL {int(window_s)} SECOND)) AS ws"
        span = f"r.minute >= toDateTime({int(start)}) AND r.minute < toDateTime({int(end)})"
        points = ", ".join(f"{q:g}" for q in MID_QUANTILES)
        sizes = self.conn.client.query(
            f"SELECT {interval}, {dims}sum(r.calls) AS calls, quantilesTDigestMerge({points})(r.output_tokens_q) "
            f"FROM llm_calls_1m AS r WHERE {where_clause(where)} AND {span} GROUP BY ws{group} HAVING calls > 0 "
            "ORDER BY ws"
        ).result_rows
        if set(by) | set(where) <= {"feature", "model"}:
            source = "served_models_1m AS r"
        else:  # the raw calls: a restart reads the scope's baseline windows once
            interval = interval.replace("r.minute", "r.ts")
            span = f"r.ts >= toDateTime({int(start)}) AND r.ts < toDateTime({int(end)})"
            source = "llm_calls AS r"
        served: dict[tuple[Any, ...], set[str]] = {
            (int(row[0]), *(str(v) for v in row[1 : 1 + n])): set(row[1 + n])
            for row in self.conn.client.query(
                f"SELECT {interval}, {dims}groupUniqArray(r.response_model) FROM {source} "
                f"WHERE {where_clause(where)} AND {span} AND r.response_model != '' GROUP BY ws{group}"
            ).result_rows
        }
        out: dict[tuple[str, ...], list[tuple[int, QuantileSketch, set[str]]]] = {}
        for row in sizes:
            ws, values = int(row[0]), tuple(str(v) for v in row[1 : 1 + n])
            calls, quantiles = float(row[1 + n]), [float(q) for q in row[2 + n]]
            sketch = QuantileSketch.from_quantiles(quantiles, calls)
            out.setdefault(values, []).append((ws, sketch, served.get((ws, *values), set())))
        return out

    def period_spend(self, budget: Budget, start: float, end: float) -> float:
        sql = (
            f"SELECT sum(r.cost_usd) FROM llm_calls_1m AS r WHERE {where_clause(budget.scope)} "
            f"AND r.minute >= toDateTime({int(start)}) AND r.minute < toDateTime({int(end)})"
        )
        value = self.conn.client.query(sql).result_rows[0][0]
        return float(value or 0.0)

    def announced_thresholds(self, budget: Budget, period_label: str) -> list[float]:
        sql = (
            "SELECT DISTINCT JSONExtractFloat(extra, 'threshold') FROM alerts "
            f"WHERE rule = {sql_literal(budget.name)} AND metric = 'budget_spend_usd' "
            f"AND scope['period'] = {sql_literal(period_label)}"
        )
        return [float(r[0]) for r in self.conn.client.query(sql).result_rows]


def _absence_history(
    by_window: dict[int, dict[tuple[str, ...], tuple[float | None, float]]], start: int, end: int, step: int
) -> dict[tuple[str, ...], list[tuple[float, float]]]:
    """(calls, active flows) per window for absence rules, silent windows included as zeros (the raw
    table has no rows for them, and a bursty scope must not look steady after a restart), up to
    each scope's last window with calls: a silence still going on is the outage, not the baseline
    (the stream keeps breaching windows out of the history the same way)."""
    out: dict[tuple[str, ...], list[tuple[float, float]]] = {}
    scopes = {values for cells in by_window.values() for values in cells}
    for values in scopes:
        series = [by_window.get(ws, {}).get(values, (0.0, 0.0)) for ws in range(start, end, step)]
        while series and series[-1][1] == 0:
            series.pop()
        while series and series[0][1] == 0:
            series.pop(0)  # before its first call the scope did not exist yet
        out[values] = [(float(calls), float(flows or 0.0)) for flows, calls in series]
    return out


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
