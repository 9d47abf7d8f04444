"""Feedback written before its call is linked to it once the call is there, rollups included."""

from __future__ import annotations

from typing import Any

import orjson

from llmpulse.runtime import EmbeddedRuntime
from sinks.relink import relink_feedback
from sinks.rollups import compare
from tests.conftest import NOW, batch, call, iso


def _ingest(settings: Any, conn: Any, events: list[dict[str, Any]], first: int, now: float = NOW) -> None:
    """One embedded runtime per delivery, as separate worker batches would be."""
    rt = EmbeddedRuntime(settings, conn)
    rt.ingest(batch([orjson.dumps(e) for e in events], first=first), now=now)
    rt.finish()
    rt.close()


def _thumb(request_id: str, ts: float, thumbs: str = "down") -> dict[str, Any]:
    return {"kind": "feedback", "request_id": request_id, "ts": iso(ts), "thumbs": thumbs, "user_id": "u1"}


def _feedback(conn: Any) -> dict[str, tuple[Any, ...]]:
    rows = conn.client.query(
        "SELECT request_id, event_id, feature, release_id, model, thumbs FROM feedback FINAL ORDER BY request_id"
    ).result_rows
    return {r[0]: r[1:] for r in rows}


def _rollup(conn: Any) -> dict[str, tuple[int, int]]:
    rows = conn.client.query(
        "SELECT feature, sum(n), sum(thumbs_down) FROM feedback_1h GROUP BY feature ORDER BY feature"
    ).result_rows
    return {r[0]: (r[1], r[2]) for r in rows}


def test_feedback_written_before_its_call_is_linked_later(settings: Any, conn: Any) -> None:
    at = NOW - 3 * 3600
    # the thumbs arrive first (the call's worker is behind): written unlinked; r-never's call never comes
    _ingest(settings, conn, [_thumb("r-late", at + 60), _thumb("r-never", at + 90, "up")], first=0)
    assert _feedback(conn)["r-late"] == ("", "", "", "", "down")
    assert _rollup(conn) == {"": (2, 1)}
    _ingest(settings, conn, [call(request_id="r-late", feature="search", model="gpt-4o", ts=iso(at))], first=100)

    first = relink_feedback(conn, NOW - 86400, NOW)

    assert (first.unlinked, first.linked, first.features) == (2, 1, {"", "search"})
    (event_id,) = conn.client.query("SELECT event_id FROM llm_calls WHERE request_id = 'r-late'").result_rows[0]
    late = _feedback(conn)["r-late"]
    assert late[:2] == (event_id, "search") and late[2] != "" and late[3:] == ("gpt-4o", "down")
    assert _feedback(conn)["r-never"][:2] == ("", "")
    assert _rollup(conn) == {"": (1, 0), "search": (1, 1)}  # moved, not counted twice
    assert compare(conn, "feedback_1h", NOW - 86400, NOW) == []
    again = relink_feedback(conn, NOW - 86400, NOW)
    assert (again.unlinked, again.linked) == (1, 0)
    assert conn.client.query("SELECT count() FROM feedback FINAL").result_rows[0][0] == 2


def test_recent_feedback_is_left_to_the_live_pipeline(settings: Any, conn: Any) -> None:
    """The last hour's rollup cells are still being written: rebuilding them could race the writer."""
    import time

    now = time.time()
    _ingest(settings, conn, [_thumb("r-now", now - 600)], first=0, now=now)
    _ingest(settings, conn, [call(request_id="r-now", ts=iso(now - 700))], first=100, now=now)
    outcome = relink_feedback(conn, now - 86400, now)
    assert (outcome.unlinked, outcome.linked) == (0, 0)
    assert _feedback(conn)["r-now"][:2] == ("", "")


def test_feedback_relink_command(tmp_path: Any) -> None:
    import time

    from tests.llmpulse.test_cli import llmpulse, query

    at = time.time() - 5 * 3600
    thumbs, calls = tmp_path / "thumbs.jsonl", tmp_path / "calls.jsonl"
    thumbs.write_bytes(orjson.dumps(_thumb("r-1", at + 60)) + b"\n" + orjson.dumps(_thumb("r-2", at + 61)) + b"\n")
    calls.write_bytes(orjson.dumps(call(request_id="r-1", feature="search", ts=iso(at))) + b"\n")
    data = tmp_path / "d"
    llmpulse("replay", str(thumbs), "--data-dir", str(data))
    llmpulse("replay", str(calls), "--data-dir", str(data))
    dry = llmpulse("feedback", "relink", "--dry-run", "--data-dir", str(data)).stdout
    assert "Would link 1 of 2 feedback rows without a call in the last 2d" in dry
    assert "Linked 1 of 2" in llmpulse("feedback", "relink", "--data-dir", str(data)).stdout
    rows = query(data, "SELECT request_id, feature, event_id != '' AS linked FROM feedback FINAL ORDER BY request_id")
    assert rows == [{"request_id": "r-1", "feature": "search", "linked": True},
                    {"request_id": "r-2", "feature": "", "linked": False}]  # fmt: skip
