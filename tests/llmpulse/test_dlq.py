"""``llmpulse dlq replay`` into ClickHouse: letters of every kind go back through the pipeline."""

from __future__ import annotations

import time
from typing import Any

import orjson

from llmpulse.dlq import replay_into_clickhouse
from llmpulse.runtime import EmbeddedRuntime
from tests.conftest import iso, payload, scalar


def test_replay_routes_letters_by_kind_as_ingest_does(settings: Any, conn: Any) -> None:
    """Calls, feedback and a call whose unknown field mentions a kind (which the old byte-scan
    split sent to the feedback decoder, and the DLQ) are replayed where they belong; a letter
    still bad is recorded as rejected with its reason."""
    now = time.time()
    feedback = orjson.dumps({"kind": "feedback", "request_id": "r-1", "ts": iso(now), "thumbs": "up"})
    letters = [
        {"dlq_id": "a", "raw": payload(request_id="r-1", ts=iso(now - 60))},
        {"dlq_id": "b", "raw": feedback},
        {"dlq_id": "c", "raw": payload(latency_ms=-1, ts=iso(now - 60))},
        {"dlq_id": "d", "raw": payload(extra={"kind": "feedback"}, ts=iso(now - 60))},
    ]
    runtime = EmbeddedRuntime(settings, conn)
    outcome = replay_into_clickhouse(runtime, letters, dry_run=False)
    runtime.close()
    assert (outcome.considered, outcome.accepted, outcome.rejected) == (4, 3, 1)
    rows = conn.client.query("SELECT dlq_id, outcome, reason FROM dlq_replays ORDER BY dlq_id").result_rows
    assert [(r[0], r[1]) for r in rows] == [("a", "accepted"), ("b", "accepted"), ("c", "rejected"), ("d", "accepted")]
    assert rows[2][2] == "Expected `float` >= 0.0"
    assert scalar(conn, "SELECT count() FROM llm_calls FINAL") == 2
    assert scalar(conn, "SELECT count() FROM feedback FINAL WHERE event_id != ''") == 1  # with its call's lineage
