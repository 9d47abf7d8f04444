"""``llmpulse trace REQUEST_ID``: which release served this answer, what the judge and the user
thought of it, and whether that release is better or worse than the last release of the same feature.

The call is read from the raw table (its release tuple is stored with it), verdicts and
feedback from their tables (already joined to the call at ingest), and the comparison reuses
the gate's per-call measurements over each release's own active period. All of it through named
queries (``sinks/queries/trace_*.sql``, ``gate_*.sql``) that take ``{tenant:String}``, so a
tenant key traces through ``llmpulse serve`` too, on its own calls only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from llmpulse.gate import GateResult, Policy, evaluate, measure
from processors.release import RELEASE_FIELDS
from sinks import queries
from sinks.clickhouse import Connection


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


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _spans(conn: Connection, feature: str, tenant: str) -> list[ReleaseSpan]:
    rows = queries.run(conn.client, "trace_releases", feature=feature, tenant=tenant)
    return [
        ReleaseSpan(r["release_id"], r["prompt_version"], r["model"], r["variant"], _utc(r["first_seen"]),
                    _utc(r["last_seen"]), int(r["calls"]))
        for r in rows
    ]  # fmt: skip


def previous_release(spans: list[ReleaseSpan], current: ReleaseSpan) -> ReleaseSpan | None:
    """The last release of the same feature before this one: the latest to start before it, whatever
    changed (prompt, model, adapter...); the most calls breaks a tie."""
    earlier = [s for s in spans if s.first_seen < current.first_seen and s.release_id != current.release_id]
    return max(earlier, key=lambda s: (s.first_seen, s.calls)) if earlier else None


def trace(conn: Connection, request_id: str, tenant: str = "") -> Trace:
    """Through ``llmpulse serve`` every read is a tenant-scoped named query: with a tenant key the
    server binds ``tenant`` to the key's own, so its calls are traced and others' are not found."""
    calls = queries.run(conn.client, "trace_call", request_id=request_id, tenant=tenant)
    if not calls:
        raise NotFound(request_id)
    call = calls[0]
    release = {k: call[k] for k in RELEASE_FIELDS if call.get(k)}
    release.update(call.get("release") or {})
    out = Trace(call, release)
    out.verdicts = queries.run(conn.client, "trace_verdicts", request_id=request_id, tenant=tenant)
    out.feedback = queries.run(conn.client, "trace_feedback", request_id=request_id, tenant=tenant)
    flow_key, flow_col = (call["trace_id"], "trace_id") if call["trace_id"] else (call["conversation_id"],
                                                                                 "conversation_id")  # fmt: skip
    if flow_key:
        (flow,) = queries.run(conn.client, "trace_flow", ts=call["ts"], feature=call["feature"], by=flow_col,
                              flow_id=flow_key, tenant=tenant)  # fmt: skip
        out.flow = {"by": flow_col, "id": flow_key, **flow}
    spans = _spans(conn, call["feature"], tenant)
    current = next((s for s in spans if s.release_id == call["release_id"]), None)
    out.this_release = current
    if current is not None:
        out.previous_release = prev = previous_release(spans, current)
        if prev is not None:
            # each release over its whole life, verdicts and feedback that came in later included
            end = max(time.time(), current.last_seen.timestamp() + 60)
            before, after = (
                measure(conn, {"feature": call["feature"], "release_id": s.release_id}, s.first_seen.timestamp(),
                        end, s.release_id, tenant)
                for s in (prev, current)
            )  # fmt: skip
            out.comparison = evaluate(before, after, Policy(min_calls=1, min_judged=1))
    return out
