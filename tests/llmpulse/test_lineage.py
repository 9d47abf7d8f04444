"""``llmpulse trace``: the call, its release tuple, verdicts and feedback, and the comparison with
the release it followed, on the real engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from llmpulse.lineage import NotFound, trace
from llmpulse.runtime import EmbeddedRuntime
from processors.release import release_id
from tests.conftest import NOW, batch, call, iso, run_embedded
from tests.llmpulse.test_cli import ENV


def _events() -> list[dict[str, Any]]:
    out = []
    for i in range(20):  # the old prompt: 1,000 in / 200 out, a day ago
        out.append(call(request_id=f"old-{i}", feature="helpdesk", prompt_version="v1", ts=iso(NOW - 86400 + i)))
    for i in range(5):  # another model's release, even older: not the one v2 replaced
        out.append(call(request_id=f"other-{i}", feature="helpdesk", model="gpt-4o-mini", prompt_version="v0",
                        ts=iso(NOW - 2 * 86400 + i)))  # fmt: skip
    for i in range(10):  # the new prompt writes 300 tokens; its calls form one agent trace
        out.append(call(request_id=f"new-{i}", feature="helpdesk", prompt_version="v2", output_tokens=300,
                        trace_id="run-1", adapter="lora-7", release={"retriever": "bm25"},
                        ts=iso(NOW - 3600 + i * 2)))  # fmt: skip
    return out


QUALITY = [
    {"kind": "judge_result", "request_id": "new-3", "rubric": "helpfulness", "score": 0.4, "judge_model": "j",
     "ts": iso(NOW - 3000)},
    {"kind": "judge_result", "request_id": "old-3", "rubric": "helpfulness", "score": 0.9, "judge_model": "j",
     "ts": iso(NOW - 80000)},
    {"kind": "feedback", "request_id": "new-3", "ts": iso(NOW - 3000), "thumbs": "down", "comment": "wrong"},
]  # fmt: skip


def _seed(settings: Any, conn: Any) -> None:
    run_embedded(settings, conn, _events(), QUALITY, first=100)


def test_trace_shows_release_verdicts_feedback_and_the_release_before(settings: Any, conn: Any) -> None:
    _seed(settings, conn)
    t = trace(conn, "new-3")
    new_release = release_id("v2", "gpt-4o", None, "lora-7", None, None, {"retriever": "bm25"})
    assert t.call["release_id"] == new_release and t.call["output_tokens"] == 300
    assert t.release == {"prompt_version": "v2", "model": "gpt-4o", "adapter": "lora-7", "retriever": "bm25"}
    assert [(v["rubric"], v["score"], v["sample_reason"]) for v in t.verdicts] == [("helpfulness", 0.4, "")]
    assert [(f["thumbs"], f["comment"]) for f in t.feedback] == [("down", "wrong")]
    assert t.flow is not None
    assert (t.flow["by"], t.flow["calls"], t.flow["position"], t.flow["tokens"]) == ("trace_id", 10, 4, 13_000)
    assert t.flow["span_ms"] == 18_850  # 9 steps 2 s apart, the last one 850 ms long
    assert t.this_release is not None and t.this_release.calls == 10
    assert t.previous_release is not None
    assert t.previous_release.release_id == release_id("v1", "gpt-4o", None, None, None, None)
    assert t.comparison is not None
    checks = {c.metric: c for c in t.comparison.checks}
    assert (checks["tokens per call"].baseline, checks["tokens per call"].candidate) == ("1,200", "1,300")
    assert checks["tokens per call"].change == "+8.3%"
    assert checks["quality (judge score)"].change == "-0.500"


def test_the_oldest_release_has_nothing_to_compare_with(settings: Any, conn: Any) -> None:
    _seed(settings, conn)
    t = trace(conn, "other-1")
    assert t.previous_release is None and t.comparison is None and t.flow is None


def test_trace_cli(tmp_path: Path) -> None:
    data, events = tmp_path / "d", tmp_path / "events.jsonl"
    events.write_text("\n".join(orjson.dumps(e).decode() for e in [*_events(), *QUALITY]) + "\n")
    subprocess.run([sys.executable, "-m", "llmpulse.cli", "replay", str(events), "--data-dir", str(data)],
                   check=True, capture_output=True, env=ENV)  # fmt: skip
    args = [sys.executable, "-m", "llmpulse.cli", "trace", "--data-dir", str(data)]
    shown = subprocess.run([*args, "new-3"], capture_output=True, text=True, env={**ENV, "COLUMNS": "160"}, check=False)
    assert shown.returncode == 0, shown.stderr
    for text in ("Release", "lora-7", "retriever", "Judge verdicts", "wrong", "Against the release before it",
                 "+8.3%", "call 4 of 10"):  # fmt: skip
        assert text in shown.stdout, shown.stdout
    missing = subprocess.run([*args, "nope"], capture_output=True, text=True, env=ENV, check=False)
    assert missing.returncode == 1 and "no call with request_id 'nope'" in missing.stderr


def test_the_comparison_is_with_the_last_release_of_the_feature_whatever_changed(settings: Any, conn: Any) -> None:
    """v1 on gpt-4o two days ago, then a switch to gpt-4o-mini a day ago, then v2 back on gpt-4o: v2 is
    compared with the gpt-4o-mini release it followed, not with the older release on its own model."""
    events = [
        *(call(request_id=f"v1-{i}", feature="faq", prompt_version="v1", ts=iso(NOW - 2 * 86400 + i))
          for i in range(4)),
        *(call(request_id=f"mini-{i}", feature="faq", prompt_version="v1", model="gpt-4o-mini", output_tokens=100,
               ts=iso(NOW - 86400 + i)) for i in range(6)),
        *(call(request_id=f"v2-{i}", feature="faq", prompt_version="v2", output_tokens=300, ts=iso(NOW - 3600 + i))
          for i in range(3)),
        call(request_id="elsewhere", feature="other", prompt_version="v9", ts=iso(NOW - 1800)),  # another feature
    ]  # fmt: skip
    runtime = EmbeddedRuntime(settings, conn)
    runtime.ingest(batch([orjson.dumps(e) for e in events]), now=NOW)
    runtime.finish()
    runtime.close()
    t = trace(conn, "v2-1")
    assert t.previous_release is not None
    assert t.previous_release.release_id == release_id("v1", "gpt-4o-mini", None, None, None, None)
    assert (t.previous_release.model, t.previous_release.calls) == ("gpt-4o-mini", 6)
    assert t.comparison is not None
    tokens = {c.metric: c for c in t.comparison.checks}["tokens per call"]
    assert (tokens.baseline, tokens.candidate, tokens.change) == ("1,100", "1,300", "+18.2%")
    before_mini = trace(conn, "mini-0").previous_release
    assert before_mini is not None and before_mini.release_id == release_id("v1", "gpt-4o", None, None, None, None)
    with pytest.raises(NotFound):  # bound to a tenant, another tenant's call is not there
        trace(conn, "v2-1", tenant="someone-else")
