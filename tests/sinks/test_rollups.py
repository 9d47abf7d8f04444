"""Rollups recomputed from raw with their views' own SELECT: equal when nothing went wrong, a
difference reported cell by cell when something did, and a rebuild that puts it right."""

from __future__ import annotations

import time
from typing import Any

import orjson

from llmpulse.runtime import EmbeddedRuntime
from sinks.rollups import ROLLUPS, WriteHorizon, compare, rebuild, repair
from tests.conftest import NOW, batch, call, iso, run_embedded

START, END = NOW - 7200, NOW + 60


def seed(settings: Any, conn: Any) -> None:
    calls = [call(request_id=f"r{i}", feature=f"f{i % 3}", latency_ms=100.0 + i, ts=iso(NOW - 3600 + i * 7),
                  response_model="served-a" if i % 4 else "served-b") for i in range(300)]  # fmt: skip
    quality = [
        *({"kind": "judge_result", "request_id": f"r{i}", "rubric": "h", "score": i / 300, "judge_model": "j",
           "ts": iso(NOW - 1800)} for i in range(0, 300, 10)),
        *({"kind": "feedback", "request_id": f"r{i}", "ts": iso(NOW - 1200), "thumbs": "down" if i % 2 else "up"}
          for i in range(0, 300, 25)),
    ]  # fmt: skip
    run_embedded(settings, conn, calls, quality)


def test_stored_rollups_equal_their_recomputation(settings: Any, conn: Any) -> None:
    seed(settings, conn)
    for table in ROLLUPS:
        assert compare(conn, table, START, END) == [], table


def test_a_double_counted_minute_is_found_and_rebuilt(settings: Any, conn: Any) -> None:
    seed(settings, conn)
    c = conn.client
    # a block written twice past deduplication: the view counted its calls twice
    c.command("INSERT INTO llm_calls_1m SELECT * FROM llm_calls_1m WHERE feature = 'f1' AND "
              "minute = (SELECT min(minute) FROM llm_calls_1m WHERE feature = 'f1')")  # fmt: skip
    c.command("INSERT INTO feedback_1h SELECT * FROM feedback_1h LIMIT 1")
    diffs = compare(conn, "llm_calls_1m", START, END)
    assert {d.key["feature"] for d in diffs} == {"f1"}
    calls = next(d for d in diffs if d.column == "calls")
    assert calls.stored == 2 * calls.recomputed  # type: ignore[operator]
    assert compare(conn, "feedback_1h", START, END)
    for table in ("llm_calls_1m", "feedback_1h"):
        rebuild(conn, table, START, END)
        assert compare(conn, table, START, END) == []
    assert c.command("SELECT sum(calls) FROM llm_calls_1m") == 300
    # rebuilding again (identical rows) must not be swallowed by insert deduplication
    rebuild(conn, "llm_calls_1m", START, END)
    assert c.command("SELECT sum(calls) FROM llm_calls_1m") == 300
    p95 = c.command("SELECT quantilesTDigestMerge(0.5, 0.9, 0.95, 0.99)(latency_ms_q)[3] FROM llm_calls_1m")
    assert abs(float(p95) - 385) <= 3  # latencies 100..399 ms: t-digest state rebuilt too


def test_eval_rebuild_keeps_boosted_samples_out(settings: Any, conn: Any) -> None:
    seed(settings, conn)
    conn.client.command("ALTER TABLE judge_scores UPDATE sample_reason = 'refusal' WHERE request_id = 'r10' "
                        "SETTINGS mutations_sync = 2")  # fmt: skip
    diffs = compare(conn, "eval_1h", START, END)
    assert {d.column for d in diffs} == {"n", "score_sum", "score_sumsq"}
    rebuild(conn, "eval_1h", START, END)
    assert conn.client.command("SELECT sum(n) FROM eval_1h") == 29


def test_a_rollup_added_by_a_migration_is_backfilled_from_raw_once(settings: Any, conn: Any) -> None:
    """Migration 0005 adds served_models_1m over existing calls: rebuilt from raw, and running the
    backfill again (a migration interrupted before it was recorded) does not count twice."""
    from sinks.migrations import _backfill

    runtime = EmbeddedRuntime(settings, conn)
    events = [call(response_model="gpt-4o-2024-08-06", ts=iso(NOW - 40 * 86400 + i * 3600)) for i in range(30)]
    events += [call(response_model="gpt-4o-2024-11-20", ts=iso(NOW - 3600 + i)) for i in range(5)]
    runtime.ingest(batch([orjson.dumps(e) for e in events]), now=NOW)
    runtime.finish()
    runtime.close()
    db = conn.database
    conn.client.command(f"TRUNCATE TABLE {db}.served_models_1m")  # as before the migration
    for _ in range(2):
        _backfill(conn, "served_models_1m")
        rows = conn.client.query(
            f"SELECT response_model, sum(calls) FROM {db}.served_models_1m GROUP BY 1 ORDER BY 1"
        ).result_rows
        assert rows == [("gpt-4o-2024-08-06", 30), ("gpt-4o-2024-11-20", 5)]


def test_repair_rebuilds_only_the_features_it_owns_and_only_where_a_view_missed_rows(settings: Any, conn: Any) -> None:
    """A worker killed between the raw part and the view parts: its successor repairs its own features."""
    seed(settings, conn)
    c = conn.client
    assert repair(conn, "llm_calls", START, END, {"f0", "f1"}) == []  # nothing missed: nothing rebuilt
    # f0's view parts never landed; f2 (another owner's feature) is double-counted and not ours to touch
    for table in ("llm_calls_1m", "served_models_1m"):
        c.command(f"ALTER TABLE {table} DELETE WHERE feature = 'f0'", settings={"mutations_sync": 2})
    c.command("INSERT INTO llm_calls_1m SELECT * FROM llm_calls_1m WHERE feature = 'f2' LIMIT 1")
    assert repair(conn, "llm_calls", START, END, {"f0", "f1"}) == ["llm_calls_1m", "served_models_1m"]
    assert compare(conn, "llm_calls_1m", START, END, features={"f0", "f1"}) == []
    assert compare(conn, "served_models_1m", START, END) == []
    assert {d.key["feature"] for d in compare(conn, "llm_calls_1m", START, END)} == {"f2"}
    assert c.command("SELECT sum(calls) FROM llm_calls_1m WHERE feature IN ('f0', 'f1')") == 200
    # the judge and feedback rollups read other tables: a repair of llm_calls leaves them alone
    assert compare(conn, "eval_1h", START, END) == [] and compare(conn, "feedback_1h", START, END) == []


def test_write_horizon_checks_only_after_an_unclean_stop_and_only_what_came_after(
    settings: Any, conn: Any, tmp_path: Any
) -> None:
    horizon = WriteHorizon(tmp_path / "horizon.json", every_s=5.0)
    assert horizon.recover(conn) is None  # never ran, or stopped cleanly
    seed(settings, conn)
    horizon.advance(1000.0, force=True)
    horizon.advance(1003.0)  # within every_s: not written
    assert orjson.loads(horizon.path.read_bytes())["since"] == 1000.0
    # the rows seeded were ingested after 1000 (1970): a crash now leaves all of them to check
    conn.client.command("ALTER TABLE llm_calls_1m DELETE WHERE feature = 'f1'", settings={"mutations_sync": 2})
    found = horizon.recover(conn)
    assert found is not None and found.since == 1000.0
    assert found.rebuilt["llm_calls"] == ["llm_calls_1m"] and found.rebuilt["feedback"] == []
    assert compare(conn, "llm_calls_1m", START, END) == []
    assert len(found.ids["llm_calls"]) == 300 and len(found.ids["feedback"]) == 12
    horizon.advance(time.time(), force=True)  # a fresh start: nothing ingested since
    found = horizon.recover(conn)
    assert found is not None and found.rebuilt == {s: [] for s in ("feedback", "judge_scores", "llm_calls")}
    assert len(found.ids["llm_calls"]) == 300  # answered moments before: a client may still retry them
    horizon.path.write_text('{"since": ')  # torn: everything is checked, nothing is assumed
    assert horizon.recover(conn).since == 0.0  # type: ignore[union-attr]
    horizon.close()
    assert horizon.recover(conn) is None
