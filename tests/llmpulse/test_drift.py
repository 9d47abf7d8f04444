"""``llmpulse drift`` on the real engine: a feature whose answers got longer and refuse more, served
by a new snapshot of the same model name, next to one that did not move."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from llmpulse.drift import Thresholds, drift
from llmpulse.runtime import EmbeddedRuntime
from processors.drift import psi
from tests.conftest import NOW, batch, call, iso
from tests.llmpulse.test_cli import llmpulse

DAY = 86400.0
OLD, NEW = "gpt-4o-mini-2024-07-18", "gpt-4o-mini-2025-10-28"


def _events(now: float) -> list[dict[str, Any]]:
    out = []
    for i in range(400):  # baseline: 4 to 1 days ago, 100..199 tokens, 2% refusals, the old snapshot
        out.append(call(feature="helpdesk", model="gpt-4o-mini", response_model=OLD, output_tokens=100 + i % 100,
                        refusal=i % 50 == 0, schema_valid=True, ts=iso(now - 4 * DAY + i * 600)))  # fmt: skip
        out.append(call(feature="billing", model="gpt-4o-2024-08-06", response_model="gpt-4o-2024-08-06",
                        output_tokens=300 + i % 7, ts=iso(now - 4 * DAY + i * 600 + 1)))  # fmt: skip
    for i in range(400):  # window: the last day, 150..249 tokens, 10% refusals, the new snapshot
        out.append(call(feature="helpdesk", model="gpt-4o-mini", response_model=NEW, output_tokens=150 + i % 100,
                        refusal=i % 10 == 0, schema_valid=True, ts=iso(now - DAY + i * 200)))  # fmt: skip
        out.append(call(feature="billing", model="gpt-4o-2024-08-06", response_model="gpt-4o-2024-08-06",
                        output_tokens=300 + i % 7, ts=iso(now - DAY + i * 200 + 1)))  # fmt: skip
    for i in range(10):  # too few to judge either way
        out.append(call(feature="rare", model="gpt-4o", ts=iso(now - DAY / 2 + i)))
    return out


def _exact_mid_quantiles(values: list[int]) -> list[float]:
    s = sorted(values)
    return [float(s[min(len(s) - 1, int((k + 0.5) / 100 * len(s)))]) for k in range(100)]


def test_drift_finds_longer_answers_more_refusals_and_the_new_snapshot(settings: Any, conn: Any) -> None:
    runtime = EmbeddedRuntime(settings, conn)
    runtime.ingest(batch([orjson.dumps(e) for e in _events(NOW)]), now=NOW)
    runtime.finish()
    runtime.close()

    report = drift(conn, (NOW - DAY, NOW), (NOW - 4 * DAY, NOW - DAY), Thresholds())
    by = {(m.feature, m.model): m for m in report.models}
    assert set(by) == {("helpdesk", "gpt-4o-mini"), ("billing", "gpt-4o-2024-08-06")}
    assert report.thin == [("rare", "gpt-4o", 10, 0)]

    helpdesk = by[("helpdesk", "gpt-4o-mini")]
    assert (helpdesk.calls, helpdesk.baseline_calls) == (400, 400)
    changes = {c.metric: c for c in helpdesk.changes}
    mean = changes["output_tokens_avg"]
    assert (mean.baseline, mean.window) == (149.5, 199.5)  # exact: sums over counts
    assert mean.drifted and mean.detail == "+33.4%"
    p95 = changes["output_tokens_p95"]  # t-digest: within 2% of the exact p95 (194 → 244)
    assert p95.baseline == pytest.approx(194.5, rel=0.02) and p95.window == pytest.approx(244.5, rel=0.02)
    refusal = changes["refusal_rate"]
    assert (refusal.baseline, refusal.window) == (8 / 400, 40 / 400)
    assert refusal.drifted and refusal.detail == "+8.0 pts"
    assert not changes["schema_valid_rate"].drifted and changes["schema_valid_rate"].window == 1.0
    exact_psi = psi(
        _exact_mid_quantiles([100 + i % 100 for i in range(400)]),
        _exact_mid_quantiles([150 + i % 100 for i in range(400)]),
    )
    assert exact_psi is not None and exact_psi > 1.0  # half the window lies beyond the baseline's top decile
    assert helpdesk.psi is not None and math.isclose(helpdesk.psi, exact_psi, rel_tol=0.15)
    assert changes["output_tokens_psi"].drifted and changes["output_tokens_psi"].detail == "significant"

    billing = by[("billing", "gpt-4o-2024-08-06")]
    assert not billing.drifted and billing.psi is not None and billing.psi < 0.1

    kinds = {model: [f.kind for f in found] for model, found in report.versions.items()}
    # billing's model is a pinned snapshot; rare's gpt-4o is an alias though no response_model says so
    assert kinds == {"gpt-4o-mini": ["switched", "unpinned"], "gpt-4o": ["unpinned"]}
    assert "no pinned snapshot" in report.versions["gpt-4o"][0].detail and report.features["gpt-4o"] == ["rare"]
    assert NEW in report.versions["gpt-4o-mini"][0].detail and "400 calls" in report.versions["gpt-4o-mini"][0].detail
    assert report.drifted

    only_billing = drift(conn, (NOW - DAY, NOW), (NOW - 4 * DAY, NOW - DAY), feature="billing")
    assert [m.feature for m in only_billing.models] == ["billing"] and not only_billing.drifted


def test_drift_cli_json_and_exit_code(tmp_path: Path) -> None:
    # The CLI's window is [its own now - 24h, now) in whole minutes. Events anchored on a `now` a
    # minute or two ahead stay inside it however long the replay takes (anchored on time.time(),
    # the oldest window call fell out whenever a minute began in between: 399 calls, +7.8 pts).
    now = (time.time() // 60 + 2) * 60
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(orjson.dumps(e).decode() for e in _events(now)) + "\n")
    data = str(tmp_path / "d")
    llmpulse("replay", str(events), "--data-dir", data)
    out = llmpulse("drift", "--window", "24h", "--baseline", "3d", "--json", "--fail-on-drift", "--data-dir", data,
                   check=False)  # fmt: skip
    assert out.returncode == 1, out.stderr
    report = orjson.loads(out.stdout)
    drifted = {(m["feature"], m["model"]) for m in report["models"] if any(c["drifted"] for c in m["changes"])}
    assert drifted == {("helpdesk", "gpt-4o-mini")}
    assert report["versions"]["gpt-4o-mini"][0]["kind"] == "switched"
    shown = llmpulse("drift", "--window", "24h", "--baseline", "3d", "--data-dir", data, COLUMNS="160")
    for text in ("helpdesk", "gpt-4o-mini", "+33.4%", "+8.0 pts", NEW, "significant"):
        assert text in shown.stdout, shown.stdout
    bad = llmpulse("drift", "--reference", "2026-11-09", "--data-dir", data, check=False)
    assert bad.returncode == 2 and "FROM..TO" in bad.stderr


def _reference_events(now: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """helpdesk on the alias gpt-4o (no response_model), 200 calls in each of three periods: a signed-off
    reference day 10 days ago (10% tool calls, 10% of thumbs down), three days ago and the last day
    (50% and 50% in both). Lengths never change."""
    hour = now - now % 3600
    calls: list[dict[str, Any]] = []
    feedback: list[dict[str, Any]] = []
    for name, start, tools, down in (("ref", hour - 10 * DAY, 10, 20), ("gap", hour - 3 * DAY, 2, 4),
                                     ("win", hour - 20 * 3600, 2, 4)):  # fmt: skip
        for i in range(200):
            rid = f"{name}-{i}"
            calls.append(call(feature="helpdesk", model="gpt-4o", request_id=rid, output_tokens=200,
                              tool_calls=["search"] if i % tools == 0 else [], ts=iso(start + i * 60)))  # fmt: skip
            if i % 2 == 0:  # every other call gets a thumb
                feedback.append({"kind": "feedback", "request_id": rid, "ts": iso(start + i * 60 + 30),
                                 "thumbs": "down" if i % down == 0 else "up"})  # fmt: skip
    return calls, feedback


def test_drift_against_a_pinned_reference_period(tmp_path: Path) -> None:
    """Tool-call and thumbs-down rates moved since the signed-off day, not over the trailing days."""
    now = time.time()
    calls, feedback = _reference_events(now)
    data = str(tmp_path / "d")
    for name, events in (("calls", calls), ("feedback", feedback)):  # feedback once its calls are stored
        file = tmp_path / f"{name}.jsonl"
        file.write_text("\n".join(orjson.dumps(e).decode() for e in events) + "\n")
        llmpulse("replay", str(file), "--data-dir", data)
    hour = now - now % 3600
    ref = (datetime.fromtimestamp(hour - 10 * DAY, UTC), datetime.fromtimestamp(hour - 9 * DAY, UTC))
    reference = f"{ref[0].isoformat(timespec='seconds')[:19]}..{ref[1].isoformat(timespec='seconds')[:19]}"
    out = llmpulse("drift", "--window", "24h", "--reference", reference, "--json", "--fail-on-drift",
                   "--data-dir", data, check=False)  # fmt: skip
    assert out.returncode == 1, out.stderr
    report = orjson.loads(out.stdout)
    assert [datetime.fromisoformat(t) for t in report["baseline"]] == list(ref)
    (helpdesk,) = report["models"]
    assert (helpdesk["feature"], helpdesk["model"], helpdesk["calls"], helpdesk["baseline_calls"]) == (
        "helpdesk", "gpt-4o", 200, 200)  # fmt: skip
    changes = {c["metric"]: c for c in helpdesk["changes"]}
    # tools: 20 of 200 → 100 of 200; thumbs down: 10 of 100 thumbs → 50 of 100
    assert changes["tool_call_rate"] == {"metric": "tool_call_rate", "baseline": 0.1, "window": 0.5,
                                         "drifted": True, "detail": "+40.0 pts"}  # fmt: skip
    assert changes["thumbs_down_rate"] == {"metric": "thumbs_down_rate", "baseline": 0.1, "window": 0.5,
                                           "drifted": True, "detail": "+40.0 pts"}  # fmt: skip
    assert (changes["output_tokens_avg"]["baseline"], changes["output_tokens_avg"]["window"]) == (200.0, 200.0)
    assert not changes["output_tokens_avg"]["drifted"] and not changes["refusal_rate"]["drifted"]
    assert helpdesk["psi"] == 0.0 and changes["output_tokens_psi"]["detail"] == "stable"
    # no call said which snapshot answered, yet the alias is reported
    assert [v["kind"] for v in report["versions"]["gpt-4o"]] == ["unpinned"]

    # the trailing three days already had today's rates: nothing drifted against them
    trailing = orjson.loads(llmpulse("drift", "--window", "24h", "--baseline", "3d", "--json", "--data-dir",
                                     data).stdout)  # fmt: skip
    (same,) = trailing["models"]
    moved = {c["metric"]: (c["baseline"], c["window"], c["drifted"]) for c in same["changes"]}
    assert moved["tool_call_rate"] == (0.5, 0.5, False) and moved["thumbs_down_rate"] == (0.5, 0.5, False)


def test_unpinned_model_share_reads_the_same_from_the_rollups(settings: Any, conn: Any) -> None:
    """The alert backtest's SQL for ``unpinned_model_share`` agrees with the stream's value."""
    from processors.windows import project
    from sinks.queries.metrics import METRIC_SQL

    models = ["gpt-4o", "gpt-4o", "gpt-4o-2024-08-06", "claude-sonnet-4-5", "gpt-4o-mini-latest",
              "gemini-1.5-pro-002", "anthropic.claude-3-haiku-20240307-v1:0", "o1-preview"]  # fmt: skip
    start = NOW - NOW % 60 - 600
    runtime = EmbeddedRuntime(settings, conn)
    runtime.ingest(batch([orjson.dumps(call(model=m, ts=iso(start + i))) for i, m in enumerate(models)]), now=NOW)
    partials = runtime.calls.flush_windows()
    runtime.finish()
    runtime.close()
    stream = project(partials, ("feature",))[(int(start), "support-chat")].metric("unpinned_model_share")
    sql = f"SELECT {METRIC_SQL['unpinned_model_share']} FROM llm_calls_1m AS r"
    # aliases: gpt-4o twice, claude-sonnet-4-5, the -latest and the -preview
    assert stream == conn.client.query(sql).result_rows[0][0] == 5 / 8
