"""Feedback written before its call: linked to it once the call is there.

A thumb is copied its call's lineage (feature, release, model) when it is written
(``ClickHouseSink.write_feedback``), so per-release feedback needs no join later. When the call
is not in ClickHouse yet (a worker that owns the call's partition is behind or down; another
worker's batch not written yet) the feedback is written unlinked: no event id, no release, and
the feature only if the client sent it. ``relink_feedback`` finds such rows whose call has
arrived since, writes them again with the lineage (the table keeps the newest ``ingested_at``),
and rebuilds the hourly feedback rollup cells the rows move between.

Rows newer than ``SETTLE_S`` are left for the next run: the live pipeline is still writing
those hours' cells, and a rebuild there could race it (``sinks.rollups.rebuild``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sinks.clickhouse import ClickHouseSink, Connection
from sinks.rollups import rebuild

SETTLE_S = 3600.0
"""Unlinked feedback younger than this (and the current hour) is not relinked yet."""


@dataclass
class RelinkOutcome:
    unlinked: int = 0
    """Unlinked feedback rows in the period."""
    linked: int = 0
    """Of those, written again with their call's lineage."""
    features: set[str] = field(default_factory=set)
    """Rollup features rebuilt (the rows' features before and after)."""


def relink_feedback(conn: Connection, start: float, end: float, dry_run: bool = False) -> RelinkOutcome:
    end = min(end, time.time() - SETTLE_S)
    end -= end % 3600  # whole hours: the rollup cells rebuilt are the rows' hours, all closed
    outcome = RelinkOutcome()
    if start >= end:
        return outcome
    result = conn.client.query(
        "SELECT feedback_id, request_id, ts, thumbs, rating, comment, user_id, feature, tenant, attributes "
        "FROM feedback FINAL WHERE event_id = '' AND ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)}",
        parameters={"s": datetime.fromtimestamp(start, UTC), "e": datetime.fromtimestamp(end, UTC)},
    )
    rows = [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]
    outcome.unlinked = len(rows)
    if not rows:
        return outcome
    sink = ClickHouseSink(conn)
    times = [r["ts"].timestamp() for r in rows]
    known = sink.lineage({r["request_id"] for r in rows}, (min(times), max(times)))
    linked = [r for r in rows if r["request_id"] in known]
    outcome.linked = len(linked)
    if not linked or dry_run:
        return outcome
    # the feedback's own feature, else its call's (as write_feedback fills it); the rollup cells
    # rebuilt are those the rows leave and those they join
    relinked = [{**r, "feature": r["feature"] or known[r["request_id"]].feature} for r in linked]
    outcome.features = {r["feature"] for r in linked} | {r["feature"] for r in relinked}
    sink.write_relinked_feedback(relinked, known)
    linked_times = [r["ts"].timestamp() for r in linked]
    rebuild(conn, "feedback_1h", min(linked_times), max(linked_times) + 1, outcome.features)
    return outcome
