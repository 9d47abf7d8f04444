"""The embedded runtime's own duties, on chDB: what a replayed file already wrote counts once."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson

from ingest.files import read_chunks
from llmpulse.runtime import EmbeddedRuntime
from tests.conftest import NOW, call, iso, scalar


def _replay(settings: Any, conn: Any, path: Path, chunk_lines: int) -> EmbeddedRuntime:
    """As ``llmpulse replay``, in a new runtime (a new process's dedup step remembers nothing)."""
    rt = EmbeddedRuntime(settings, conn)
    for chunk in read_chunks(path, chunk_lines):
        rt.ingest(chunk, now=NOW)
        rt.flush()
    rt.finish()
    rt.close()
    return rt


def _lines(first: int, n: int) -> list[bytes]:
    out = []
    for i in range(first, first + n):
        out.append(orjson.dumps(call(event_id=f"c-{i}", request_id=f"r-{i}", ts=iso(NOW - 7200 + 10 * i))))
        if i % 10 == 0:  # feedback with and without an id of its own (then derived from its content)
            fb = {"kind": "feedback", "request_id": f"r-{i}", "ts": iso(NOW - 7000 + 10 * i), "thumbs": "down"}
            out.append(orjson.dumps({**fb, "event_id": f"fb-{i}"} if i % 20 == 0 else fb))
    return out


def test_a_copied_or_grown_file_counts_each_event_once(settings: Any, conn: Any, tmp_path: Path) -> None:
    """Chunk tokens are per path and content: a copy of a replayed file, or the same file grown by
    appended lines (log shipping), passed them, and the rollup views counted the calls again."""
    original = tmp_path / "calls.jsonl"
    original.write_bytes(b"\n".join(_lines(0, 120)) + b"\n")
    _replay(settings, conn, original, 50)
    copy = tmp_path / "copy-of-calls.jsonl"
    shutil.copy(original, copy)
    again = _replay(settings, conn, copy, 50)
    assert again.stats.counters.duplicates == 120 and again.stats.feedback.duplicates == 12
    grown = tmp_path / "calls-grown.jsonl"  # the same lines and 40 more: chunks cut elsewhere
    grown.write_bytes(b"\n".join(_lines(0, 160)) + b"\n")
    more = _replay(settings, conn, grown, 70)
    assert (more.stats.counters.accepted, more.stats.feedback.accepted) == (40, 4)
    assert scalar(conn, "SELECT count() FROM llm_calls FINAL") == 160
    assert scalar(conn, "SELECT sum(calls) FROM llm_calls_1m") == 160
    assert scalar(conn, "SELECT count() FROM feedback FINAL") == 16
    assert scalar(conn, "SELECT sum(thumbs_down) FROM feedback_1h") == 16
