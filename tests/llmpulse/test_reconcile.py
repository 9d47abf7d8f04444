"""``llmpulse reconcile`` on the real engine: silent when rows are exactly once, and for each way
they can fail to be — a rollup cell counted twice, a raw block inserted twice, one event under
two features — it names the cell or the event, and ``--fix`` repairs what can be repaired."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import orjson

from llmpulse.reconcile import as_json, reconcile
from llmpulse.runtime import EmbeddedRuntime
from tests.conftest import NOW, batch, call, iso
from tests.llmpulse.test_cli import llmpulse

START, END = NOW - 7200, NOW + 60


def seed(settings: Any, conn: Any, n: int = 300) -> None:
    runtime = EmbeddedRuntime(settings, conn)
    calls = [call(event_id=f"ev{i}", request_id=f"r{i}", feature=f"f{i % 3}", ts=iso(NOW - 3600 + i * 7))
             for i in range(n)]  # fmt: skip
    runtime.ingest(batch([orjson.dumps(e) for e in calls]), now=NOW)
    runtime.finish()
    runtime.close()


def test_exactly_once_rows_reconcile_clean(settings: Any, conn: Any) -> None:
    seed(settings, conn)
    report = reconcile(conn, START, END)
    assert report.ok and report.found == 0
    assert (report.raw.rows, report.raw.rows_final, report.raw.event_ids) == (300, 300, 300)
    assert as_json(report)["differences"] == []


def test_a_double_counted_minute_is_named_and_fixed(settings: Any, conn: Any) -> None:
    seed(settings, conn)
    conn.client.command("INSERT INTO llm_calls_1m SELECT * FROM llm_calls_1m WHERE feature = 'f1' AND "
                        "minute = (SELECT min(minute) FROM llm_calls_1m WHERE feature = 'f1')")  # fmt: skip
    report = reconcile(conn, START, END)
    assert not report.ok and report.repeated_ids == 0
    assert {(d.table, d.key["feature"]) for d in report.differences} == {("llm_calls_1m", "f1")}
    calls = next(d for d in report.differences if d.column == "calls")
    assert calls.stored == 2 * calls.recomputed  # type: ignore[operator]
    fixed = reconcile(conn, START, END, fix=True)
    assert fixed.ok and fixed.remaining == 0 and len(fixed.rebuilt["llm_calls_1m"]) == 1
    assert reconcile(conn, START, END).found == 0
    assert conn.client.command("SELECT sum(calls) FROM llm_calls_1m") == 300


def test_a_raw_block_inserted_twice_is_found_then_merged_and_rebuilt(settings: Any, conn: Any) -> None:
    seed(settings, conn)
    # what a worker without progress tracking would do after a crash: write a written block again
    conn.client.command("INSERT INTO llm_calls SELECT * FROM llm_calls WHERE event_id IN ('ev1', 'ev2', 'ev4') "
                        "SETTINGS insert_deduplicate = 0")  # fmt: skip
    report = reconcile(conn, START, END)
    assert (report.raw.rows, report.raw.rows_final, report.raw.event_ids) == (303, 300, 300)
    assert report.repeated_ids == 3
    assert {(r.event_id, r.rows, r.rows_final) for r in report.repeats} == {(f"ev{i}", 2, 1) for i in (1, 2, 4)}
    assert sum(d.stored - d.recomputed for d in report.differences if d.column == "calls") == 3  # type: ignore[operator]
    fixed = reconcile(conn, START, END, fix=True)
    assert fixed.ok and fixed.merged_months and fixed.remaining == 0
    again = reconcile(conn, START, END)
    assert again.found == 0 and again.raw.rows == 300


def test_one_event_under_two_features_is_reported_not_deleted(settings: Any, conn: Any) -> None:
    seed(settings, conn)
    conn.client.command("INSERT INTO llm_calls SELECT * REPLACE ('other' AS feature) FROM llm_calls "
                        "WHERE event_id = 'ev7' SETTINGS insert_deduplicate = 0")  # fmt: skip
    report = reconcile(conn, START, END, fix=True)
    assert [(r.event_id, r.rows, r.rows_final) for r in report.repeats] == [("ev7", 2, 2)]
    assert report.differences == []  # the view and FINAL both count it twice: only the id check sees it
    assert not report.ok and report.remaining == 1
    assert conn.client.command("SELECT count() FROM llm_calls WHERE event_id = 'ev7'") == 2


def test_cli_exit_codes_and_json(tmp_path: Path) -> None:
    now = time.time()
    lines = [orjson.dumps(call(event_id=f"c{i}", feature=f"f{i % 2}", ts=iso(now - 3000 + i * 10))) for i in range(200)]
    (tmp_path / "calls.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    data = str(tmp_path / "data")
    llmpulse("replay", str(tmp_path / "calls.jsonl"), "--data-dir", data)
    clean = llmpulse("reconcile", "--since", "2h", "--json", "--data-dir", data)
    body = json.loads(clean.stdout)
    assert body["ok"] and body["raw"] == {"rows": 200, "rows_final": 200, "event_ids": 200}
    llmpulse("query", "SELECT 1", "--data-dir", data)  # the data dir is free again
    corrupt = (
        "from schemas.config import load_settings; from llmpulse.runtime import open_clickhouse; "
        f"c = open_clickhouse(load_settings(None, {{'data_dir': {data!r}}}), 'test'); "
        "c.client.command(\"INSERT INTO llm_calls_1m SELECT * FROM llm_calls_1m WHERE feature = 'f0' LIMIT 1\"); "
        "c.close()"
    )
    import subprocess
    import sys

    from tests.llmpulse.test_cli import ENV

    subprocess.run([sys.executable, "-c", corrupt], check=True, env=ENV, capture_output=True)
    found = llmpulse("reconcile", "--since", "2h", "--data-dir", data, check=False)
    assert found.returncode == 1, found.stdout + found.stderr
    assert "llm_calls_1m" in found.stdout and "feature=f0" in found.stdout and "--fix" in found.stdout
    fixed = llmpulse("reconcile", "--since", "2h", "--fix", "--json", "--data-dir", data, check=False)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert list(json.loads(fixed.stdout)["rebuilt"]) == ["llm_calls_1m"]
    assert json.loads(llmpulse("reconcile", "--since", "2h", "--json", "--data-dir", data).stdout)["ok"]
