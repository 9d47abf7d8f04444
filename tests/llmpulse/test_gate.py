"""The release gate on the seed's example: quality 0.84 → 0.87, tokens 620 → 790, p95 970 ms."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from llmpulse.gate import Policy, evaluate, measure, parse_selector
from tests.conftest import call, iso
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
    from llmpulse.runtime import EmbeddedRuntime

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
