"""The `llmpulse` command end to end, in subprocesses, on a real chDB data directory."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import call, iso

ENV = {k: v for k, v in os.environ.items() if not k.startswith("LLMPULSE_")}


def llmpulse(*args: str, check: bool = True, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "llmpulse.cli", *args],
        capture_output=True,
        text=True,
        env={**ENV, "COLUMNS": "200", **env},
        cwd=cwd,
        timeout=600,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"llmpulse {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def query(data_dir: Path, sql: str) -> list[dict[str, Any]]:
    out = llmpulse("query", sql, "--format", "json", "--data-dir", str(data_dir)).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    data = tmp_path_factory.mktemp("demo")
    proc = llmpulse("demo", "--events", "200000", "--days", "7", "--seed", "3", "--data-dir", str(data), "--json")
    return data, json.loads(proc.stdout)


def test_demo_json_summary(demo_dir: tuple[Path, dict[str, Any]]) -> None:
    _, s = demo_dir
    for key in ("events", "dlq", "cost_by_feature", "latency_ms_by_feature", "refusal_rate_by_model",
                "judge_samples", "events_per_second"):  # fmt: skip
        assert key in s
    assert s["events"] + s["dlq"] + s["duplicates"] == s["received"]
    assert s["events"] > 199_000 and s["dlq"] > 0 and s["judge_samples"] > 0
    assert len(s["cost_by_feature"]) >= 5 and len(s["cost_by_team"]) >= 3
    assert set(s["latency_ms_by_feature"]["support-chat"]) == {"p50", "p95", "p99"}
    lat = s["latency_ms_by_feature"]["support-chat"]
    assert lat["p50"] < lat["p95"] < lat["p99"]
    assert s["events_per_second"] > 0


def test_demo_canary_fails_the_gate_on_its_refusal_rate(demo_dir: tuple[Path, dict[str, Any]]) -> None:
    """The demo's v13 support-chat canary refuses far more than control: the gate must say so."""
    _, s = demo_dir
    gate = s["canary"]["gate"]
    assert gate["passed"] is False
    checks = {c["metric"]: c for c in gate["checks"]}
    refusal = checks["refusal rate"]
    assert (refusal["verdict"], refusal["limit"]) == ("FAIL", "<= +2.0%")
    control, canary = (float(refusal[side].removesuffix("%")) for side in ("baseline", "candidate"))
    assert canary > 2 * control
    # the gate's figures are the summary's per-release ones pooled per variant (rates shown to 0.01%)
    releases = s["canary"]["releases"]
    for variant, shown in (("control", control), ("canary", canary)):
        rows = [r for r in releases if r["variant"] == variant]
        calls = sum(r["calls"] for r in rows)
        assert checks["calls (sample size)"]["baseline" if variant == "control" else "candidate"] == f"{calls:,}"
        pooled = sum(r["refusal_rate"] * r["calls"] for r in rows) / calls
        assert abs(pooled * 100 - shown) <= 0.05 + 0.005


def test_demo_rollups_match_raw_and_show_the_incidents(demo_dir: tuple[Path, dict[str, Any]]) -> None:
    data, s = demo_dir
    (check,) = query(
        data,
        "SELECT (SELECT count() FROM llm_calls FINAL) raw, (SELECT sum(calls) FROM llm_calls_1m) rolled, "
        "(SELECT round(sum(ifNull(cost_usd, 0)), 6) FROM llm_calls FINAL) raw_cost, "
        "(SELECT round(sum(cost_usd), 6) FROM llm_calls_1m) rolled_cost",
    )
    assert check["raw"] == check["rolled"] == s["events"]
    assert abs(check["raw_cost"] - check["rolled_cost"]) < 1e-4
    assert s["cost_usd"] == pytest.approx(check["raw_cost"], abs=1e-4)  # to the micro-dollar, as the rollups sum
    per_version = {
        r["prompt_version"]: r["out"]
        for r in query(
            data,
            "SELECT prompt_version, sum(output_tokens) / sum(calls - errors) out FROM llm_calls_1m "
            "WHERE feature = 'search-summarize' GROUP BY prompt_version",
        )
    }
    assert 1.7 < per_version["v8"] / per_version["v7"] < 2.3
    assert s["refusal_rate_by_model"]["claude-haiku-4-5"] > 2 * s["refusal_rate_by_model"]["gpt-4o-mini"]


def test_demo_table_output_is_readable(tmp_path: Path) -> None:
    proc = llmpulse("demo", "--events", "3000", "--days", "1", "--data-dir", str(tmp_path / "d"))
    for heading in (
        "Overview",
        "Cost per feature",
        "Cost per team",
        "Latency per feature",
        "Refusal and error rate",
    ):
        assert heading in proc.stdout
    assert "Injected incidents" in proc.stdout


def test_demo_refuses_to_overwrite_real_data(tmp_path: Path) -> None:
    data = tmp_path / "d"
    file = tmp_path / "calls.jsonl"
    file.write_text(orjson.dumps(call(ts=iso(time.time() - 60))).decode() + "\n")
    llmpulse("replay", str(file), "--data-dir", str(data))
    proc = llmpulse("demo", "--events", "1000", "--data-dir", str(data), check=False)
    assert proc.returncode == 2
    assert "holds 1 calls that are not demo data" in proc.stderr


def test_replay_twice_leaves_counts_unchanged(tmp_path: Path) -> None:
    data = tmp_path / "d"
    now = time.time()
    lines = [orjson.dumps(call(event_id=f"f-{i}", ts=iso(now - 3600 + i), cost_usd=0.01)).decode() for i in range(300)]
    lines.insert(10, '{"event_id": "broken"')
    lines.insert(20, orjson.dumps(call(event_id="neg", input_tokens=-3)).decode())
    lines.append(orjson.dumps({"kind": "feedback", "request_id": "r-1", "ts": iso(now), "thumbs": "down"}).decode())
    file = tmp_path / "calls.jsonl"
    file.write_text("\n".join(lines) + "\n")
    first = llmpulse("replay", str(file), "--data-dir", str(data))
    assert "rejected → dlq" in first.stdout
    llmpulse("replay", str(file), "--data-dir", str(data))
    (counts,) = query(
        data,
        "SELECT (SELECT count() FROM llm_calls) raw, (SELECT sum(calls) FROM llm_calls_1m) rolled, "
        "(SELECT round(sum(cost_usd), 2) FROM llm_calls_1m) cost, (SELECT count() FROM dlq FINAL) dlq, "
        "(SELECT count() FROM feedback FINAL) feedback",
    )
    assert counts == {"raw": 300, "rolled": 300, "cost": 3.0, "dlq": 2, "feedback": 1}
    reasons = query(data, "SELECT source_offset, path, reason FROM dlq FINAL ORDER BY source_offset")
    assert reasons == [
        {"source_offset": 11, "path": "$", "reason": "not valid JSON: Input data was truncated"},
        {"source_offset": 21, "path": "$.input_tokens", "reason": "Expected `int` >= 0"},
    ]


def test_replay_names_both_kinds_of_calls_without_a_cost(tmp_path: Path) -> None:
    now = time.time()
    lines = [
        call(event_id="free?", input_tokens=0, output_tokens=0, ts=iso(now - 60)),
        call(event_id="acme", model="acme-llm-1", ts=iso(now - 60)),
        call(event_id="fine", ts=iso(now - 60)),
    ]
    file = tmp_path / "calls.jsonl"
    file.write_text("\n".join(orjson.dumps(x).decode() for x in lines) + "\n")
    out = llmpulse("replay", str(file), "--data-dir", str(tmp_path / "d")).stdout
    shown = {" ".join(cells[0].split()): cells[1].strip() for line in out.splitlines()
             if len(cells := line.strip("│ ").split("│")) == 2}  # fmt: skip
    assert shown["unpriced: model not in the price table"] == shown["unpriced: ok calls without usage"] == "1"
    rows = query(tmp_path / "d", "SELECT event_id, cost_source, price_missing FROM llm_calls ORDER BY event_id")
    assert [(r["event_id"], r["cost_source"], r["price_missing"]) for r in rows] == [
        ("acme", "missing", True), ("fine", "computed", False), ("free?", "usage_unknown", True)]  # fmt: skip


def test_query_table_and_errors(tmp_path: Path) -> None:
    data = tmp_path / "d"
    llmpulse("migrate", "--data-dir", str(data))  # query reads, and only from a data directory that exists
    out = llmpulse("query", "SELECT 1 + 1 AS two", "--data-dir", str(data)).stdout
    assert "two" in out and "2" in out and "1 row(s)" in out
    bad = llmpulse("query", "SELECT nope FROM nowhere", "--data-dir", str(data), check=False)
    assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_config_error_names_file_key_and_expectation(tmp_path: Path) -> None:
    cfg = tmp_path / "llmpulse.yaml"
    cfg.write_text("pipeline:\n  batch_max_events: many\n")
    proc = llmpulse("query", "SELECT 1", "--config", str(cfg), check=False)
    assert proc.returncode == 2
    assert f"{cfg}: key `pipeline.batch_max_events`" in proc.stderr
    assert "Traceback" not in proc.stderr
    env_bad = llmpulse("query", "SELECT 1", "--data-dir", str(tmp_path / "x"), check=False,
                       LLMPULSE_PIPELINE__WINDOW="soon")  # fmt: skip
    assert "environment variable LLMPULSE_PIPELINE__WINDOW: key `pipeline.window`" in env_bad.stderr


@contextlib.contextmanager
def holding(data: Path, command: str, server_url: str | None = None) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``data``'s lock as ``command`` would (with the URL ``serve`` records)."""
    update = f"l.update(server_url={server_url!r});" if server_url else ""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; from pathlib import Path; from sinks.lock import DataDirLock;"
         f"l=DataDirLock(Path(sys.argv[1])); l.acquire({command!r}); {update} print('ok', flush=True); time.sleep(60)",
         str(data)],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_busy_data_dir_names_the_holder(tmp_path: Path) -> None:
    data = tmp_path / "d"
    with holding(data, "llmpulse demo") as holder:
        proc = llmpulse("query", "SELECT 1", "--data-dir", str(data), check=False)
        assert proc.returncode == 2
        assert f"is in use by `llmpulse demo` (pid {holder.pid}" in proc.stderr.replace("\n", " ")


def test_prices_import_and_show(tmp_path: Path) -> None:
    data = tmp_path / "d"
    litellm = tmp_path / "model_prices_and_context_window.json"
    litellm.write_text(json.dumps({
        "acme-llm-1": {"litellm_provider": "acme", "mode": "chat",
                       "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06},
    }))  # fmt: skip
    out = llmpulse("prices", "import", str(litellm), "--version", "2026-11-acme", "--data-dir", str(data)).stdout
    assert "Imported 1 models" in out and "2026-11-acme" in out
    shown = llmpulse("prices", "show", "acme-llm-1", "--data-dir", str(data)).stdout
    assert "input 1, cached input 1, cache write 1 (1-hour 1), output 2" in shown
    # the imported table prices a call that was price_missing before
    file = tmp_path / "c.jsonl"
    file.write_text(orjson.dumps(call(model="acme-llm-1", input_tokens=1_000_000, output_tokens=500_000,
                                      ts=iso(time.time() - 60))).decode() + "\n")  # fmt: skip
    llmpulse("replay", str(file), "--data-dir", str(data))
    (row,) = query(data, "SELECT cost_usd, price_version, price_missing FROM llm_calls")
    assert row == {"cost_usd": 2.0, "price_version": "2026-11-acme", "price_missing": False}
    missing = llmpulse("prices", "show", "nobody-model", "--data-dir", str(data), check=False)
    assert missing.returncode == 1 and "price_missing" in missing.stderr


def test_demo_fires_the_cost_spike_and_the_refusal_regression(demo_dir: tuple[Path, dict[str, Any]]) -> None:
    data, s = demo_dir
    firing = {(a["rule"], tuple(a["scope"].items())) for a in s["alerts"] if a["state"] == "firing"}
    assert ("cost-spike", (("feature", "search-summarize"),)) in firing
    assert ("refusal-regression", (("model", "claude-haiku-4-5"),)) in firing
    prompt_change = s["incidents"]["prompt_change"]["at"]
    cost = next(a for a in s["alerts"] if a["rule"] == "cost-spike" and a["state"] == "firing")
    assert cost["at"] > prompt_change  # after the change, not before
    stored = query(data, "SELECT count() n FROM alerts WHERE state = 'firing'")[0]["n"]
    assert stored == sum(1 for a in s["alerts"] if a["state"] == "firing")


def test_migrate_print_sql_for_a_cluster(tmp_path: Path) -> None:
    from schemas.config import RetentionSettings
    from sinks.migrations import retention_sql, schema_sql

    out = llmpulse("migrate", "--print-sql", "--cluster", "prod", "--data-dir", str(tmp_path / "d")).stdout
    statements = [s for s in out.split(";\n\n") if s.strip()]
    expected = schema_sql("llmpulse", RetentionSettings(), "prod") + retention_sql(
        "llmpulse", RetentionSettings(), "prod"
    )
    assert len(statements) == len(expected) and all("ON CLUSTER `prod`" in s for s in statements[:3])
    assert "llm_calls_local" in out and "ENGINE = Distributed" in out
    assert not (tmp_path / "d").exists()  # printing the DDL touches no database
    wrong = llmpulse("migrate", "--cluster", "prod", "--data-dir", str(tmp_path / "d"), check=False)
    assert wrong.returncode == 2 and "--print-sql" in wrong.stderr
