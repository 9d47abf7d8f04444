"""``llmpulse trace REQUEST_ID``: which release served this answer, what the judge and the user
thought of it, and whether that release is better or worse than the one before it.

The call is read from the raw table (its release tuple is stored with it), verdicts and
feedback from their tables (already joined to the call at ingest), and the comparison reuses
the gate's per-call measurements over each release's own active period.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from llmpulse.gate import GateResult, Policy, evaluate, measure
from processors.release import RELEASE_FIELDS
from sinks.clickhouse import Connection

CALL_COLUMNS = (
    "event_id", "ts", "service", "feature", "team", "tenant", "user_id", "provider", "model", "response_model",
    "prompt_version", "variant", "adapter", "feature_view", "guardrail_version", "release", "release_id",
    "request_id", "conversation_id", "trace_id", "input_tokens", "output_tokens", "cached_input_tokens",
    "cache_write_tokens", "latency_ms", "ttft_ms", "cost_usd", "cost_source", "price_version", "price_missing",
    "status", "refusal", "finish_reason", "error_type", "error_message", "tool_calls", "fallback_from",
    "schema_valid", "prompt_hash", "prompt", "output", "output_chars",
)  # fmt: skip


@dataclass
class ReleaseSpan:
    release_id: str
    prompt_version: str
    model: str
    variant: str
    first_seen: datetime
    last_seen: datetime
    calls: int


@dataclass
class Trace:
    call: dict[str, Any]
    release: dict[str, str]
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    feedback: list[dict[str, Any]] = field(default_factory=list)
    flow: dict[str, Any] | None = None
    """Where the call sits in its trace or conversation: position, calls, tokens, cost."""
    this_release: ReleaseSpan | None = None
    previous_release: ReleaseSpan | None = None
    comparison: GateResult | None = None


class NotFound(LookupError):
    pass


def _rows(conn: Connection, sql: str, **params: Any) -> list[dict[str, Any]]:
    result = conn.client.query(sql, parameters=params)
    return [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _spans(conn: Connection, feature: str) -> list[ReleaseSpan]:
    rows = _rows(
        conn,
        "SELECT release_id, any(prompt_version) pv, any(model) m, any(variant) v, min(minute) first, "
        "max(minute) last, sum(calls) n FROM llm_calls_1m WHERE feature = {f:String} GROUP BY release_id "
        "ORDER BY first",
        f=feature,
    )
    return [
        ReleaseSpan(r["release_id"], r["pv"], r["m"], r["v"], _utc(r["first"]), _utc(r["last"]), int(r["n"]))
        for r in rows
    ]


def previous_release(spans: list[ReleaseSpan], current: ReleaseSpan) -> ReleaseSpan | None:
    """The release this one followed: the latest to start before it, on the same model if there is
    one (a prompt change is compared with the prompt it replaced, not with another model's traffic)."""
    earlier = [s for s in spans if s.first_seen < current.first_seen and s.release_id != current.release_id]
    same_model = [s for s in earlier if s.model == current.model]
    pool = same_model or earlier
    return max(pool, key=lambda s: (s.first_seen, s.calls)) if pool else None


def trace(conn: Connection, request_id: str) -> Trace:
    calls = _rows(
        conn,
        f"SELECT {', '.join(CALL_COLUMNS)} FROM llm_calls FINAL WHERE request_id = {{r:String}} ORDER BY ts LIMIT 1",
        r=request_id,
    )
    if not calls:
        raise NotFound(request_id)
    call = calls[0]
    release = {k: call[k] for k in RELEASE_FIELDS if call.get(k)}
    release.update(call.get("release") or {})
    out = Trace(call, release)
    out.verdicts = _rows(
        conn,
        "SELECT rubric, score, judge_model, sample_reason, ts, rationale FROM judge_scores FINAL "
        "WHERE request_id = {r:String} ORDER BY ts",
        r=request_id,
    )
    out.feedback = _rows(
        conn,
        "SELECT ts, thumbs, rating, comment, user_id FROM feedback FINAL WHERE request_id = {r:String} ORDER BY ts",
        r=request_id,
    )
    flow_key, flow_col = (call["trace_id"], "trace_id") if call["trace_id"] else (call["conversation_id"],
                                                                                 "conversation_id")  # fmt: skip
    if flow_key:
        (flow,) = _rows(
            conn,
            f"SELECT count() calls, countIf(ts < {{t:DateTime64(3)}}) + 1 position, "
            "sum(input_tokens + output_tokens) tokens, sum(ifNull(cost_usd, 0)) cost_usd, "
            "dateDiff('millisecond', min(ts), max(ts + toIntervalMillisecond(toInt64(latency_ms)))) span_ms "
            f"FROM llm_calls FINAL WHERE feature = {{f:String}} AND {flow_col} = {{k:String}}",
            t=call["ts"], f=call["feature"], k=flow_key,
        )  # fmt: skip
        out.flow = {"by": flow_col, "id": flow_key, **flow}
    spans = _spans(conn, call["feature"])
    current = next((s for s in spans if s.release_id == call["release_id"]), None)
    out.this_release = current
    if current is not None:
        out.previous_release = prev = previous_release(spans, current)
        if prev is not None:
            # each release over its whole life, verdicts and feedback that came in later included
            end = max(time.time(), current.last_seen.timestamp() + 60)
            before, after = (
                measure(conn, {"feature": call["feature"], "release_id": s.release_id}, s.first_seen.timestamp(),
                        end, s.release_id)
                for s in (prev, current)
            )  # fmt: skip
            out.comparison = evaluate(before, after, Policy(min_calls=1, min_judged=1))
    return out
