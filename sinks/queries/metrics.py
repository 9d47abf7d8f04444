"""Every stream metric as SQL over the minute rollups: the backtest, warm baselines after a
restart, and each alert's "query behind it" use these, so they say exactly what the stream says.

Each expression aggregates ``llm_calls_1m`` rows (alias ``r``) within one rule window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from processors.drift import PINNED_PATTERN

_Q = "quantilesTDigestMerge(0.5, 0.9, 0.95, 0.99)"


def sql_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ratio(num: str, den: str) -> str:
    return f"if(sum(r.{den}) > 0, sum(r.{num}) / sum(r.{den}), NULL)"


METRIC_SQL: dict[str, str] = {
    "calls": "sum(r.calls)",
    "cost_usd": "sum(r.cost_usd)",
    "cost_per_call_usd": (  # over the calls with a cost, as the stream's (processors.windows)
        "if(sum(r.calls) > sum(r.price_missing), sum(r.cost_usd) / (sum(r.calls) - sum(r.price_missing)), NULL)"
    ),
    "error_rate": _ratio("errors", "calls"),
    "timeout_rate": _ratio("timeouts", "calls"),
    "rate_limited_rate": _ratio("rate_limited", "calls"),
    "refusal_rate": _ratio("refusals", "calls"),
    "price_missing": "sum(r.price_missing)",
    "input_tokens": "sum(r.input_tokens)",
    "output_tokens": "sum(r.output_tokens)",
    "output_tokens_avg": _ratio("output_tokens", "calls"),
    "cached_input_share": _ratio("cached_input_tokens", "input_tokens"),
    "output_chars_avg": _ratio("output_chars", "calls"),
    "schema_valid_rate": _ratio("schema_valid", "schema_checked"),
    "tool_call_rate": _ratio("tool_call_calls", "calls"),
    "unpinned_model_share": (
        "if(sum(r.calls) > 0, sumIf(r.calls, endsWith(r.model, '-latest') OR endsWith(r.model, '-preview') "
        f"OR NOT match(r.model, {sql_literal(PINNED_PATTERN)})) / sum(r.calls), NULL)"
    ),  # processors.drift.is_pinned
    "latency_avg_ms": _ratio("latency_ms_sum", "calls"),
    "latency_p50_ms": f"{_Q}(r.latency_ms_q)[1]",
    "latency_p95_ms": f"{_Q}(r.latency_ms_q)[3]",
    "latency_p99_ms": f"{_Q}(r.latency_ms_q)[4]",
    "ttft_p50_ms": f"if(sum(r.ttft_calls) > 0, {_Q}(r.ttft_ms_q)[1], NULL)",
    "ttft_p95_ms": f"if(sum(r.ttft_calls) > 0, {_Q}(r.ttft_ms_q)[3], NULL)",
    "ttft_p99_ms": f"if(sum(r.ttft_calls) > 0, {_Q}(r.ttft_ms_q)[4], NULL)",
    "output_tokens_p50": f"{_Q}(r.output_tokens_q)[1]",
    "output_tokens_p95": f"{_Q}(r.output_tokens_q)[3]",
}


EVIDENCE_SQL: dict[str, str] = {"cost_per_call_usd": "sum(r.calls) - sum(r.price_missing)"}
"""What a metric's ``min_calls`` counts where that is not the calls (``processors.windows.EVIDENCE``)."""


def where_clause(filters: Mapping[str, str]) -> str:
    return " AND ".join(f"r.{k} = {sql_literal(v)}" for k, v in sorted(filters.items())) or "1"


def metric_over_time(metric: str, filters: Mapping[str, str], start: float, end: float, window_s: int) -> str:
    """A readable query for one scope: the metric per window around an alert (what on-call runs)."""
    expr = METRIC_SQL.get(metric, "sum(r.calls)")
    return (
        f"SELECT toStartOfInterval(r.minute, INTERVAL {window_s} SECOND) AS window, sum(r.calls) AS calls, "
        f"{expr} AS {metric} FROM llm_calls_1m AS r WHERE {where_clause(filters)} "
        f"AND r.minute >= toDateTime({int(start)}) AND r.minute < toDateTime({int(end)}) "
        "GROUP BY window ORDER BY window"
    )


def flow_windows_sql(by: list[str], where: Mapping[str, str], window_s: int, start: float, end: float) -> str:
    """Active flows and calls per window and scope value, from the raw calls (absence rules: the
    rollups keep no flow ids). A flow is a ``trace_id``, else a ``conversation_id``, and a call in
    neither counts alone, once per window, as the stream counts them
    (``processors.windows.WindowPartial.new_flows``). Where the stream's scope is finer than the
    feature, a flow spanning two of its scopes (a run that switches model) counts in the first
    only; here in each. The stream's memory is bounded (``FLOWS_REMEMBERED``); here it is not."""
    dims, group = scope_columns(by)
    flow = "if(r.trace_id != '', r.trace_id, r.conversation_id)"
    return (
        f"SELECT toUnixTimestamp(toStartOfInterval(r.ts, INTERVAL {window_s} SECOND)) AS ws, {dims}"
        f"uniqExactIf({flow}, {flow} != '') + uniqExactIf(r.event_id, {flow} = '') AS value, "
        f"uniqExact(r.event_id) AS calls FROM llm_calls AS r WHERE {where_clause(where)} "
        f"AND r.ts >= toDateTime({int(start)}) AND r.ts < toDateTime({int(end)}) "
        f"GROUP BY ws{group} ORDER BY ws"
    )


def scope_columns(by: Sequence[str]) -> tuple[str, str]:
    """A scope's columns for a per-window query over alias ``r``: (``r.team AS d0, ``…, ``, d0``…)."""
    return "".join(f"r.{d} AS d{i}, " for i, d in enumerate(by)), "".join(f", d{i}" for i in range(len(by)))


def rule_windows_sql(
    metric: str, by: list[str], where: Mapping[str, str], window_s: int, start: float, end: float
) -> str:
    """A rule's metric and evidence (what its ``min_calls`` counts: ``EVIDENCE_SQL``, else calls) per
    window and scope value, in time order (backtests, baselines)."""
    expr = METRIC_SQL[metric]
    evidence = EVIDENCE_SQL.get(metric, "sum(r.calls)")
    dims, group = scope_columns(by)
    return (
        f"SELECT toUnixTimestamp(toStartOfInterval(r.minute, INTERVAL {window_s} SECOND)) AS ws, {dims}"
        f"{expr} AS value, {evidence} AS calls FROM llm_calls_1m AS r WHERE {where_clause(where)} "
        f"AND r.minute >= toDateTime({int(start)}) AND r.minute < toDateTime({int(end)}) "
        f"GROUP BY ws{group} ORDER BY ws"
    )
