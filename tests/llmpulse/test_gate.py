"""The release gate on the seed's example: quality 0.84 → 0.87, tokens 620 → 790, p95 970 ms."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from llmpulse.gate import (
    NO_LIMIT,
    GateUsageError,
    Policy,
    Side,
    describe_period,
    evaluate,
    measure,
    parse_selector,
    parse_time,
)
from llmpulse.runtime import EmbeddedRuntime
from tests.conftest import NOW, call, iso, run_embedded
from tests.llmpulse.test_cli import ENV


def seed_example(path: Path) -> Path:
    now = time.time()
    lines = []
    for i in range(1000):  # baseline: 500 in + 120 out = 620 tokens per call
        lines.append(call(event_id=f"b{i}", request_id=f"rb{i}", feature="deploy-buddy", prompt_version="v7",
                          variant="control", input_tokens=500, output_tokens=120, latency_ms=800.0,
                          ts=iso(now - 3000 + i)))  # fmt: skip
    for i in range(200):  # candidate: 600 in + 190 out = 790 tokens per call, p95 970 ms
        lines.append(call(event_id=f"c{i}", request_id=f"rc{i}", feature="deploy-buddy", prompt_version="v8",
                          variant="canary", input_tokens=600, output_tokens=190, latency_ms=970.0,
                          ts=iso(now - 3000 + i)))  # fmt: skip
    for prefix, n, score in (("rb", 300, 0.84), ("rc", 100, 0.87)):
        for i in range(n):
            lines.append({"kind": "judge_result", "request_id": f"{prefix}{i}", "rubric": "correctness",
                          "score": score, "judge_model": "gpt-4o", "ts": iso(now - 600)})  # fmt: skip
    path.write_text("\n".join(orjson.dumps(x).decode() for x in lines) + "\n")
    return path


def test_seed_example_is_refused_on_tokens(settings, conn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ingest.files import read_chunks

    runtime = EmbeddedRuntime(settings, conn)
    for chunk in read_chunks(seed_example(tmp_path / "seed.jsonl")):
        runtime.ingest(chunk)
        runtime.flush()
    runtime.close()
    now = time.time()
    base = measure(conn, parse_selector("variant=control,feature=deploy-buddy"), now - 7200, now, "baseline")
    cand = measure(conn, parse_selector("variant=canary,feature=deploy-buddy"), now - 7200, now, "candidate")
    assert (base.calls, cand.calls) == (1000, 200)
    assert (base.tokens_per_call, cand.tokens_per_call) == (620.0, 790.0)
    assert cand.latency_p95_ms == pytest.approx(970.0)
    assert base.quality == pytest.approx(0.84) and cand.quality == pytest.approx(0.87)
    assert (base.quality_n, cand.quality_n) == (300, 100)
    result = evaluate(base, cand, Policy(max_token_increase=0.15, max_p95_ms=1000, min_quality_delta=0.0))
    verdicts = {c.metric: (c.change, c.verdict) for c in result.checks}
    assert verdicts["tokens per call"] == ("+27.4%", "FAIL")
    assert verdicts["p95 latency, candidate (ms)"][1] == "pass"
    assert verdicts["quality (judge score)"] == ("+0.030", "pass")
    assert not result.passed


def test_gate_cli_exits_non_zero_with_a_readable_table(tmp_path: Path) -> None:
    data = tmp_path / "d"
    subprocess.run([sys.executable, "-m", "llmpulse.cli", "replay", str(seed_example(tmp_path / "seed.jsonl")),
                    "--data-dir", str(data)], check=True, capture_output=True, env=ENV)  # fmt: skip
    args = [sys.executable, "-m", "llmpulse.cli", "gate", "--candidate", "variant=canary", "--baseline",
            "variant=control", "--feature", "deploy-buddy", "--since", "2h", "--max-token-increase", "0.15",
            "--max-p95-ms", "1000", "--min-quality-delta", "0", "--data-dir", str(data)]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, env={**ENV, "COLUMNS": "200"}, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "REFUSE: tokens per call outside policy" in proc.stdout
    assert "+27.4%" in proc.stdout and "0.870 ±0.000 (n=100)" in proc.stdout
    ok = subprocess.run([*args[:-2], "--max-token-increase", "0.3", "--data-dir", str(data), "--json"],
                        capture_output=True, text=True, env=ENV, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stdout
    assert json.loads(ok.stdout)["passed"] is True
    thin = subprocess.run([*args, "--min-calls", "5000"], capture_output=True, text=True, env=ENV, check=False)
    assert thin.returncode == 3 and "INCONCLUSIVE" in thin.stdout


def _side(label: str, cost: float | None, tokens: float) -> Side:
    return Side(label, 100, tokens, tokens / 4, cost, 900.0, 0.0, 0.0, None, 0, None)


def test_a_check_without_a_limit_never_makes_the_gate_inconclusive() -> None:
    """An unpriced model costs 0 per call on both sides: no relative change, but no cost limit was asked for."""
    result = evaluate(_side("b", 0.0, 600.0), _side("c", 0.0, 630.0), Policy(max_token_increase=0.15))
    verdicts = {c.metric: (c.change, c.verdict) for c in result.checks}
    assert verdicts["tokens per call"] == ("+5.0%", "pass")
    assert verdicts["cost per call"] == ("—", NO_LIMIT)
    assert verdicts["quality (judge score)"] == ("—", NO_LIMIT)
    assert result.passed and result.conclusive
    limited = evaluate(_side("b", 0.0, 600.0), _side("c", 0.0, 630.0), Policy(max_cost_increase=0.1))
    assert {c.metric: c.verdict for c in limited.checks}["cost per call"] == "no data"  # asked for, cannot tell
    assert not limited.conclusive


def test_a_cost_limit_is_not_passed_by_calls_without_a_cost() -> None:
    """Counted as $0, a candidate on a model missing from the price table read -100% and passed any
    cost limit. Its calls without a cost now leave the check undecided, unless they are a sliver."""
    baseline = _side("b", 0.005, 600.0)
    unpriced = replace(_side("c", None, 600.0), unpriced=100)
    result = evaluate(baseline, unpriced, Policy(max_cost_increase=0.1))
    cost = {c.metric: c for c in result.checks}["cost per call"]
    assert (cost.candidate, cost.verdict) == ("— (100 without a cost)", "FAIL")  # --allow-inconclusive cannot pass it
    assert not result.passed
    mostly = replace(_side("c", 0.0052, 600.0), unpriced=30)  # 30 of 100 calls: where the cost may have gone
    assert {c.metric: c.verdict for c in evaluate(baseline, mostly, Policy(max_cost_increase=0.1)).checks}[
        "cost per call"] == "FAIL"  # fmt: skip
    policy = Policy(max_cost_increase=0.1)
    unpriced_baseline = evaluate(replace(baseline, unpriced=50), _side("c", 0.0052, 600.0), policy)
    assert {c.metric: c.verdict for c in unpriced_baseline.checks}["cost per call"] == "no data"
    sliver = replace(_side("c", 0.0052, 600.0), unpriced=1)  # 1%: the priced 99 decide
    checks = {c.metric: c for c in evaluate(baseline, sliver, Policy(max_cost_increase=0.1)).checks}
    assert (checks["cost per call"].change, checks["cost per call"].verdict) == ("+4.0%", "pass")


def _teams_and_tenants(settings: Any, conn: Any) -> None:
    """20 canary calls of one feature, call i judged i/20: teams a (i < 10) and b, providers openai
    (even i) and azure, tenants t1 (i < 5 or i >= 15) and t2."""
    events = [
        call(request_id=f"q{i}", feature="triage", variant="canary", team="a" if i < 10 else "b",
             provider="openai" if i % 2 == 0 else "azure", tenant="t1" if i < 5 or i >= 15 else "t2",
             input_tokens=100 * (i + 1), output_tokens=0, ts=iso(NOW - 1800 + i))
        for i in range(20)
    ]  # fmt: skip
    verdicts = [
        {"kind": "judge_result", "request_id": f"q{i}", "rubric": "helpfulness", "score": i / 20, "judge_model": "j",
         "ts": iso(NOW - 900)}
        for i in range(20)
    ]  # fmt: skip
    run_embedded(settings, conn, events, verdicts, first=100)


def test_team_provider_and_tenant_narrow_the_judge_score_too(settings: Any, conn: Any) -> None:
    _teams_and_tenants(settings, conn)

    def side(text: str, tenant: str = "") -> tuple[int, float | None, int, float | None]:
        s = measure(conn, parse_selector(text), NOW - 7200, NOW, text, tenant)
        return s.calls, s.tokens_per_call, s.quality_n, s.quality

    assert side("variant=canary") == (20, 1050.0, 20, pytest.approx(9.5 / 20))
    assert side("variant=canary,team=a") == (10, 550.0, 10, pytest.approx(4.5 / 20))  # i = 0..9
    assert side("variant=canary,team=b") == (10, 1550.0, 10, pytest.approx(14.5 / 20))
    assert side("variant=canary,provider=openai") == (10, 1000.0, 10, pytest.approx(9.0 / 20))  # even i
    assert side("variant=canary,team=b,provider=azure") == (5, 1600.0, 5, pytest.approx(15.0 / 20))  # 11..19 odd
    assert side("variant=canary", tenant="t1") == (10, 1050.0, 10, pytest.approx(9.5 / 20))  # 0..4 and 15..19
    assert side("variant=canary", tenant="t2") == (10, 1050.0, 10, pytest.approx(9.5 / 20))
    assert side("variant=canary,team=a", tenant="t1") == (5, 300.0, 5, pytest.approx(2.0 / 20))  # 0..4
    assert side("variant=canary", tenant="nobody") == (0, None, 0, None)


def test_selectors_need_values_and_periods_read_both_ways() -> None:
    with pytest.raises(GateUsageError, match="team needs a value"):
        parse_selector("variant=canary,team=")
    assert parse_time("2h", 1_000_000.0) == 1_000_000.0 - 7200
    assert parse_time("2026-11-18T11:06:40Z", 0) == parse_time("2026-11-18T11:06:40", 0) == NOW
    with pytest.raises(GateUsageError, match="expected a duration"):
        parse_time("yesterday", 0)
    assert describe_period("24h", None) == "over the last 24h"
    assert describe_period("24h", "1h") == "from 24h ago to 1h ago"
    assert describe_period("2026-11-18T00:00:00Z", None) == "from 2026-11-18T00:00:00Z to now"


def test_gate_cli_until_ends_the_period_and_an_unpriced_model_is_conclusive(tmp_path: Path) -> None:
    """Two hours of an unpriced model: tokens per call rise only in the second hour. ``--until`` at the
    end of the first hour passes the gate (0 when only the token limit is set, not 3 for "no cost data")."""
    first = (int(time.time()) // 3600 - 3) * 3600  # the start of an hour, 3 to 4 hours ago
    lines = []
    for hour, cand_out in ((0, 100), (1, 400)):
        for i in range(60):
            t = first + hour * 3600 + 60 * i
            lines.append(call(event_id=f"b{hour}-{i}", model="in-house-llm", variant="control", input_tokens=500,
                              output_tokens=100, ts=iso(t)))  # fmt: skip
            lines.append(call(event_id=f"c{hour}-{i}", model="in-house-llm", variant="canary", input_tokens=500,
                              output_tokens=cand_out, ts=iso(t)))  # fmt: skip
    events = tmp_path / "two-hours.jsonl"
    events.write_text("\n".join(orjson.dumps(x).decode() for x in lines) + "\n")
    data = tmp_path / "d"
    subprocess.run([sys.executable, "-m", "llmpulse.cli", "replay", str(events), "--data-dir", str(data)],
                   check=True, capture_output=True, env=ENV)  # fmt: skip
    args = [sys.executable, "-m", "llmpulse.cli", "gate", "--candidate", "variant=canary", "--baseline",
            "variant=control", "--since", iso(first), "--max-token-increase", "0.15", "--json",
            "--data-dir", str(data)]  # fmt: skip
    # minutes are inclusive at both ends: the first hour is [first, first + 59 min]
    hour_one = subprocess.run([*args, "--until", iso(first + 3540)], capture_output=True, text=True, env=ENV,
                              check=False)  # fmt: skip
    out = json.loads(hour_one.stdout)
    assert hour_one.returncode == 0, hour_one.stdout
    assert (out["baseline"]["calls"], out["candidate"]["calls"]) == (60, 60)
    assert (out["baseline"]["tokens_per_call"], out["candidate"]["tokens_per_call"]) == (600.0, 600.0)
    assert out["conclusive"] is True and out["baseline"]["cost_per_call"] is None  # unknown, not $0
    assert (out["baseline"]["unpriced"], out["candidate"]["unpriced"]) == (60, 60)
    both = subprocess.run(args, capture_output=True, text=True, env=ENV, check=False)
    out = json.loads(both.stdout)
    assert both.returncode == 1  # 750 tokens per call against 600: +25%
    assert (out["candidate"]["calls"], out["candidate"]["tokens_per_call"]) == (120, 750.0)
    empty = subprocess.run([*args, "--until", "5h"], capture_output=True, text=True, env=ENV, check=False)
    assert empty.returncode == 2 and "the period is empty" in empty.stderr
