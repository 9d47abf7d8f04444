"""The quality loop on the real engine, with hand-computed numbers: judge verdicts and feedback
joined to their calls, per-release eval score (with its confidence interval) and thumbs-down
rate, flagged outputs, a thumbs-down asking for its call to be judged, and the cost levers
(cache opportunity, provider reliability, fallbacks, agent flows)."""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from llmpulse.runtime import EmbeddedRuntime
from processors.release import release_id
from schemas.config import JudgeBudgetSettings
from sinks import queries
from tests.conftest import NOW, batch, call, iso, run_embedded

PERIOD = {"start": datetime.fromtimestamp(NOW - 86400, UTC), "end": datetime.fromtimestamp(NOW + 3600, UTC)}
CONTROL_SCORES = [0.9, 0.8, 0.7, 0.85, 0.95, 0.6, 0.75, 0.8]
CANARY_SCORES = [0.5, 0.6, 0.4, 0.55]


class RecordingJudge:
    """An in-process judge that scores by request id and remembers what it was asked."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores
        self.requests: list[dict[str, Any]] = []

    def __call__(self, requests: list[dict[str, Any]]) -> list[bytes]:
        self.requests += requests
        return [
            orjson.dumps({"kind": "judge_result", "request_id": r["request_id"], "rubric": "helpfulness",
                          "score": self.scores.get(r["request_id"], 0.0), "judge_model": "judge-x",
                          "ts": iso(NOW - 60)})
            for r in requests
        ]  # fmt: skip


@pytest.fixture
def quality_settings(settings: Any) -> Any:
    sampling = {"default_rate": 0.0, "rates": {"support-chat": 1.0}, "max_per_hour": None, "judge_usd_per_day": None}
    return settings.model_copy(
        update={
            "sampling": settings.sampling.model_copy(update=sampling),
            "content": settings.content.model_copy(update={"capture": True}),
        }
    )


def _events() -> tuple[list[dict[str, Any]], dict[str, float]]:
    events: list[dict[str, Any]] = []
    scores: dict[str, float] = {}
    for i, s in enumerate(CONTROL_SCORES):
        events.append(call(request_id=f"ctl-{i}", conversation_id=f"c-ctl-{i}", prompt_version="v12",
                           variant="control", prompt=f"question {i}", output=f"answer {i}",
                           ts=iso(NOW - 3000 + i)))  # fmt: skip
        scores[f"ctl-{i}"] = s
    for i, s in enumerate(CANARY_SCORES):
        events.append(call(request_id=f"can-{i}", conversation_id=f"c-can-{i}", prompt_version="v13",
                           variant="canary", prompt=f"question {i}", output=f"canary answer {i}",
                           ts=iso(NOW - 3000 + i)))  # fmt: skip
        scores[f"can-{i}"] = s
    # email-draft is not rate-sampled: its error and refusal are judged as boosted samples, its
    # ok call only once a user flags it
    events.append(call(request_id="em-err", feature="email-draft", status="error", error_type="server_error",
                       output_tokens=0, ts=iso(NOW - 2500)))  # fmt: skip
    events.append(call(request_id="em-ref", feature="email-draft", refusal=True, ts=iso(NOW - 2500)))
    events.append(call(request_id="em-ok", feature="email-draft", output="Dear team, ...", ts=iso(NOW - 2500)))
    scores.update({"em-err": 0.0, "em-ref": 0.1, "em-ok": 0.2})
    return events, scores


def _feedback() -> list[dict[str, Any]]:
    def fb(request_id: str, **kw: Any) -> dict[str, Any]:
        return {"kind": "feedback", "request_id": request_id, "ts": iso(NOW - 1200), "user_id": f"u-{request_id}",
                **kw}  # fmt: skip

    return [
        fb("ctl-0", thumbs="up"), fb("ctl-1", thumbs="up"), fb("ctl-2", thumbs="up", rating=4),
        fb("ctl-3", thumbs="down", comment="too long"),
        fb("can-0", thumbs="down", comment="refused a normal question"), fb("can-1", thumbs="down", rating=1),
        fb("em-ok", thumbs="down", comment="wrong answer"),
    ]  # fmt: skip


def _run(settings: Any, conn: Any, judge: RecordingJudge) -> EmbeddedRuntime:
    events, _ = _events()
    runtime: EmbeddedRuntime = run_embedded(settings, conn, events, _feedback(), judge=judge)
    return runtime


def _ci95(xs: list[float]) -> float:
    return 1.96 * statistics.stdev(xs) / math.sqrt(len(xs))


def test_verdicts_and_feedback_roll_up_per_release(quality_settings: Any, conn: Any) -> None:
    _, scores = _events()
    judge = RecordingJudge(scores)
    runtime = _run(quality_settings, conn, judge)

    # every support-chat call (rate 1.0) and the email-draft error and refusal, then the flagged em-ok
    asked = {r["request_id"]: r["reason"] for r in judge.requests}
    assert len(asked) == len(judge.requests) == 15
    assert asked["em-err"] == "error" and asked["em-ref"] == "refusal" and asked["em-ok"] == "thumbs_down"
    assert all(asked[f"ctl-{i}"] == "rate" for i in range(8))
    first = next(r for r in judge.requests if r["request_id"] == "can-2")
    control_release = release_id("v12", "gpt-4o", None, None, None, None)
    canary_release = release_id("v13", "gpt-4o", None, None, None, None)
    assert first["release_id"] == canary_release and first["feature"] == "support-chat"
    assert first["prompt"] == "question 2" and first["output"] == "canary answer 2"
    assert runtime.stats.flagged_for_judge == 1 and runtime.stats.judge_results == 15

    stored = conn.client.query(
        "SELECT request_id, feature, release_id, variant, sample_reason, score FROM judge_scores FINAL"
    ).result_rows
    by_id = {r[0]: r[1:] for r in stored}
    assert len(by_id) == 15
    assert by_id["ctl-3"] == ("support-chat", control_release, "control", "rate", 0.85)
    assert by_id["em-ok"][3:] == ("thumbs_down", 0.2)

    evals = {r["release_id"]: r for r in queries.run(conn.client, "eval_by_release", **PERIOD)}
    assert set(evals) == {control_release, canary_release}  # boosted email-draft scores stay out of the mean
    ctl = evals[control_release]
    assert ctl["judged"] == 8 and ctl["eval_score"] == pytest.approx(statistics.mean(CONTROL_SCORES))
    assert ctl["ci95"] == pytest.approx(_ci95(CONTROL_SCORES))
    can = evals[canary_release]
    assert can["judged"] == 4 and can["eval_score"] == pytest.approx(0.5125)
    assert can["ci95"] == pytest.approx(_ci95(CANARY_SCORES))

    fbk = {r["release_id"]: r for r in queries.run(conn.client, "feedback_by_release", **PERIOD)}
    assert (fbk[control_release]["feedback"], fbk[control_release]["flagged"]) == (4, 1)
    assert fbk[control_release]["thumbs_down_rate"] == pytest.approx(0.25)
    assert fbk[control_release]["rating_avg"] == pytest.approx(4.0)
    assert fbk[canary_release]["thumbs_down_rate"] == pytest.approx(1.0)
    assert fbk[canary_release]["rating_avg"] == pytest.approx(1.0)

    releases = {r["release_id"]: r for r in queries.run(conn.client, "release_metrics", **PERIOD)}
    assert releases[canary_release]["calls"] == 4 and releases[canary_release]["variant"] == "canary"
    assert releases[canary_release]["eval_score"] == pytest.approx(0.5125)
    assert releases[canary_release]["thumbs_down_rate"] == pytest.approx(1.0)
    assert releases[control_release]["eval_score"] == pytest.approx(0.79375, abs=5e-5)  # rounded to 4 places

    flagged = queries.run(conn.client, "top_flagged_outputs", **PERIOD)
    assert sum(r["flags"] for r in flagged) == 4
    # a call written twice and not merged yet (inserts no longer collapse a block) still counts once
    conn.client.command("INSERT INTO llm_calls SELECT * FROM llm_calls WHERE request_id IN "
                        "(SELECT request_id FROM feedback WHERE thumbs = 'down')")  # fmt: skip
    assert sum(r["flags"] for r in queries.run(conn.client, "top_flagged_outputs", **PERIOD)) == 4
    outputs = {r["example_output"] for r in flagged}
    assert {"answer 3", "canary answer 0", "canary answer 1", "Dear team, ..."} == outputs
    comments = {c for r in flagged for c in r["comments"]}
    assert {"too long", "refused a normal question", "wrong answer"} <= comments


def test_feedback_for_an_unknown_call_is_kept_without_lineage(settings: Any, conn: Any) -> None:
    runtime = EmbeddedRuntime(settings, conn)
    runtime.ingest(batch([orjson.dumps({"kind": "feedback", "request_id": "nobody", "ts": iso(NOW - 60),
                                        "thumbs": "down"})]), now=NOW)  # fmt: skip
    runtime.finish()
    runtime.close()
    rows = conn.client.query("SELECT request_id, release_id, event_id FROM feedback").result_rows
    assert rows == [("nobody", "", "")]
    assert conn.client.command("SELECT count() FROM judge_samples") == 0


def _cost_lever_events() -> list[dict[str, Any]]:
    t0 = NOW - 20_000
    out = [
        # cache opportunity: p1 repeats within the hour once; the third p1 is 4000 s later
        call(feature="search", request_id="s1", prompt_hash="p1", ts=iso(t0)),
        call(feature="search", request_id="s2", prompt_hash="p1", ts=iso(t0 + 600)),
        call(feature="search", request_id="s3", prompt_hash="p1", ts=iso(t0 + 4600)),
        call(feature="search", request_id="s4", prompt_hash="p2", ts=iso(t0 + 10)),
    ]
    # provider reliability: 10 anthropic calls, 1 error, 2 timeouts, 1 rate-limited
    statuses = ["error", "timeout", "timeout", "rate_limited"] + ["ok"] * 6
    for i, status in enumerate(statuses):
        extra = {} if status == "ok" else {"error_type": status, "output_tokens": 0}
        out.append(call(feature="chat", provider="anthropic", model="claude-sonnet-4-5", request_id=f"a{i}",
                        status=status, ts=iso(t0 + 100 + i), **extra))  # fmt: skip
    # two fallbacks anthropic -> openai (one succeeded), one google -> openai
    out.append(call(feature="chat", provider="openai", fallback_from="anthropic", request_id="f1", ts=iso(t0 + 200)))
    out.append(call(feature="chat", provider="openai", fallback_from="anthropic", request_id="f2", status="error",
                    error_type="server_error", output_tokens=0, ts=iso(t0 + 201)))  # fmt: skip
    out.append(call(feature="chat", provider="openai", fallback_from="google", request_id="f3", ts=iso(t0 + 202)))
    # agent flows: trace A = 3 steps back to back (2 s + 3 s + 1 s), trace B = 2 steps with a 4 s gap
    for rid, start, lat, trace in (("A1", 0.0, 2000.0, "tA"), ("A2", 2.0, 3000.0, "tA"), ("A3", 5.0, 1000.0, "tA"),
                                   ("B1", 0.0, 1000.0, "tB"), ("B2", 5.0, 1000.0, "tB")):  # fmt: skip
        out.append(call(feature="agent", trace_id=trace, request_id=rid, latency_ms=lat, ts=iso(t0 + 1000 + start)))
    # a chat conversation: two quick calls (one flow, 1.5 s), then the user comes back 10 min later
    for rid, start, lat in (("c1", 0.0, 500.0), ("c2", 0.5, 1000.0), ("c3", 600.0, 800.0)):
        out.append(call(feature="helpdesk", conversation_id="conv-1", request_id=rid, latency_ms=lat,
                        ts=iso(t0 + 2000 + start)))  # fmt: skip
    return out


@pytest.mark.parametrize("written_twice", [False, True], ids=["once", "written-twice"])
def test_cost_levers_and_flows(settings: Any, conn: Any, written_twice: bool) -> None:
    events = _cost_lever_events()
    runtime = EmbeddedRuntime(settings, conn)
    runtime.ingest(batch([orjson.dumps(e) for e in events]), now=NOW)
    runtime.finish()
    runtime.close()
    if written_twice:
        # a client retry reaching a restarted writer (its dedup memory empty), before ClickHouse merges the
        # copies: every call but anthropic's (whose figures come from the rollups) is in llm_calls twice
        conn.client.command("SYSTEM STOP MERGES llm_calls")
        again = [e for e in events if e.get("provider") != "anthropic"]
        retry = EmbeddedRuntime(settings, conn)
        retry.ingest(batch([orjson.dumps(e) for e in again], first=5000), now=NOW)
        retry.finish()
        retry.close()
        raw = conn.client.command("SELECT count() FROM llm_calls")
        assert raw == len(events) + len(again) == 2 * conn.client.command("SELECT count() FROM llm_calls FINAL") - 10
    per_call = 1000 * 2.5e-6 + 200 * 10e-6  # gpt-4o: $2.50 in, $10 out per million tokens

    cache = {r["feature"]: r for r in queries.run(conn.client, "cache_opportunity", **PERIOD)}
    assert (cache["search"]["calls"], cache["search"]["repeats"]) == (4, 1)
    assert cache["search"]["repeat_share"] == 0.25
    assert cache["search"]["repeat_cost_usd"] == pytest.approx(round(per_call, 4))

    rel = {(r["provider"], r["model"]): r for r in queries.run(conn.client, "provider_reliability", **PERIOD)}
    sonnet = rel[("anthropic", "claude-sonnet-4-5")]
    assert sonnet["calls"] == 10
    assert (sonnet["error_rate"], sonnet["timeout_rate"], sonnet["rate_limited_rate"]) == (0.4, 0.2, 0.1)

    fallbacks = {(r["fallback_from"], r["fell_back_to"]): (r["calls"], r["succeeded"])
                 for r in queries.run(conn.client, "fallbacks", **PERIOD)}  # fmt: skip
    assert fallbacks == {("anthropic", "openai"): (2, 1), ("google", "openai"): (1, 1)}

    flows = {r["feature"]: r for r in queries.run(conn.client, "flows_by_feature", **PERIOD)}
    agent = flows["agent"]
    assert agent["flows"] == 2 and agent["calls_per_flow"] == 2.5
    assert agent["tokens_per_flow"] == 3000  # 2.5 calls x 1200 tokens
    # perceived: A = 0 s .. 6 s = 6000 ms, B = 0 s .. 6 s = 6000 ms
    assert (agent["perceived_p50_ms"], agent["perceived_p95_ms"]) == (6000, 6000)
    assert agent["model_time_ms"] == (6000 + 2000) / 2
    helpdesk = flows["helpdesk"]  # c3 starts a new turn after 10 minutes: a single-call flow, left out
    assert helpdesk["flows"] == 1 and helpdesk["calls_per_flow"] == 2
    assert helpdesk["perceived_p50_ms"] == 1500


def test_eval_view_leaves_out_exactly_the_boosted_reasons() -> None:
    import re
    from importlib import resources

    from processors.sampling import BOOSTED_REASONS

    for sql in (resources.files("schemas").joinpath("migrations", "0004_quality.sql").read_text(),
                resources.files("sinks").joinpath("queries", "gate_quality.sql").read_text()):  # fmt: skip
        listed = re.search(r"sample_reason NOT IN \(([^)]*)\)", sql)
        assert listed is not None
        assert {x.strip(" '") for x in listed.group(1).split(",")} == BOOSTED_REASONS


def test_thumbs_downs_beyond_the_judge_budget_are_capped(settings: Any, conn: Any) -> None:
    """A flood of thumbs-downs buys no more judging than the feature's budget allows."""
    sampling = {
        "default_rate": 0.0, "boost_cap_per_hour": 200, "max_per_hour": None, "judge_usd_per_day": None,
        "budgets": {"email-draft": JudgeBudgetSettings(max_per_hour=3),
                    "summarize": JudgeBudgetSettings(usd_per_day=0.0015)},
    }  # fmt: skip
    budgeted = settings.model_copy(update={"sampling": settings.sampling.model_copy(update=sampling)})
    tuple_fields = {"prompt_version": "v4", "response_model": "gpt-4o-2024-08-06", "adapter": "lora-7",
                    "feature_view": "fv-3", "guardrail_version": "g2"}  # fmt: skip
    # the email-draft calls were served in ten different hours: flagged now, they spend this hour's
    # budget, not a fresh one in each of theirs
    calls = [call(feature="email-draft", request_id=f"em-{i}", variant="canary", release={"retriever": "bm25"},
                  ts=iso(NOW - 3000 - i * 3600), **tuple_fields) for i in range(10)]  # fmt: skip
    calls += [call(feature="summarize", request_id=f"su-{i}", ts=iso(NOW - 3000 + i)) for i in range(6)]
    feedback = [{"kind": "feedback", "request_id": f"em-{i}", "ts": iso(NOW - 1200), "thumbs": "down"}
                for i in range(10)]  # fmt: skip
    feedback += [{"kind": "feedback", "request_id": f"su-{i}", "ts": iso(NOW - 1200), "rating": 1} for i in range(6)]
    judge = RecordingJudge({})
    runtime = run_embedded(budgeted, conn, calls, feedback, judge=judge)

    # email-draft: 3 judged calls per hour, the oldest first. summarize: gpt-4o-mini judges a call
    # for (1000 + 200 + 600) x $0.15/1M + 150 x $0.60/1M = $0.00036, so $0.0015 a day buys 4
    asked = sorted(r["request_id"] for r in judge.requests)
    assert asked == ["em-7", "em-8", "em-9", "su-0", "su-1", "su-2", "su-3"]
    assert {r["reason"] for r in judge.requests} == {"thumbs_down"}
    assert runtime.stats.flagged_for_judge == 7
    assert runtime.calls.sampler.capped == 7 + 2
    assert conn.client.command("SELECT count() FROM judge_samples FINAL") == 7

    # the flagged call's request carries the whole release tuple, as a stream-sampled one does
    em0 = next(r for r in judge.requests if r["request_id"] == "em-9")
    assert em0["release"] == {"model": "gpt-4o", "retriever": "bm25", **tuple_fields}
    assert em0["release_id"] == release_id("v4", "gpt-4o", "gpt-4o-2024-08-06", "lora-7", "fv-3", "g2",
                                           {"retriever": "bm25"})  # fmt: skip
    assert (em0["variant"], em0["feature"], em0["team"], em0["finish_reason"]) == ("canary", "email-draft", "cx", None)


def _delivered_again_after_a_restart(settings: Any, conn: Any, prefix: str, topic: str, items: list[bytes],
                                     extra: bytes) -> None:  # fmt: skip
    """Four calls (``{prefix}-0`` to ``-3``), then ``items`` about them from ``topic``; then a restarted
    runtime (its dedup memory empty) gets the same items again in a batch of another shape, with
    ``extra`` beside them."""
    from processors.records import Source

    source = Source("kafka", topic, 0)
    first = EmbeddedRuntime(settings, conn)
    first.ingest(batch([orjson.dumps(call(request_id=f"{prefix}-{i}", ts=iso(NOW - 3000 + i))) for i in range(4)]),
                 now=NOW)  # fmt: skip
    first.flush()
    first.ingest(batch(items, source, first=100), now=NOW)
    first.finish()
    first.close()
    second = EmbeddedRuntime(settings, conn)
    second.ingest(batch([*items[2:], *items[:2], extra], source, first=102), now=NOW)
    second.finish()
    second.close()


def test_a_verdict_redelivered_after_a_restart_counts_once(settings: Any, conn: Any) -> None:
    """judge_scores FINAL shows a verdict once; eval_1h, fed per inserted row, must count it once too."""

    def verdict(request_id: str, rubric: str, score: float, ts: float) -> bytes:
        return orjson.dumps({"kind": "judge_result", "request_id": request_id, "rubric": rubric, "score": score,
                             "judge_model": "judge-x", "ts": iso(ts)})  # fmt: skip

    verdicts = [verdict(f"r-{i}", "helpfulness", 0.5 + i / 10, NOW - 60) for i in range(4)]
    # the extra one: a new rubric on a call already judged
    _delivered_again_after_a_restart(settings, conn, "r", "llm.judge.results", verdicts,
                                     extra=verdict("r-0", "tone", 1.0, NOW - 30))  # fmt: skip

    assert conn.client.command("SELECT count() FROM judge_scores") == 5
    rolled = conn.client.query("SELECT rubric, sum(n), round(sum(score_sum), 6) FROM eval_1h GROUP BY rubric "
                               "ORDER BY rubric").result_rows  # fmt: skip
    assert rolled == [("helpfulness", 4, 2.6), ("tone", 1, 1.0)]  # 0.5 + 0.6 + 0.7 + 0.8


def test_feedback_redelivered_after_a_restart_counts_once(settings: Any, conn: Any) -> None:
    """feedback FINAL shows a thumb once; feedback_1h, fed per inserted row, must count it once too."""

    def thumb(request_id: str, user: str, thumbs: str, ts: float) -> bytes:
        return orjson.dumps({"kind": "feedback", "request_id": request_id, "ts": iso(ts), "user_id": user,
                             "thumbs": thumbs})  # fmt: skip

    thumbs = [thumb(f"f-{i}", f"u{i}", "down" if i % 2 else "up", NOW - 60) for i in range(4)]
    # the extra one: another user's thumb on a call already rated
    _delivered_again_after_a_restart(settings, conn, "f", "llm.feedback", thumbs,
                                     extra=thumb("f-0", "u9", "down", NOW - 30))  # fmt: skip

    assert conn.client.command("SELECT count() FROM feedback") == 5
    rolled = conn.client.query("SELECT sum(n), sum(thumbs_up), sum(thumbs_down) FROM feedback_1h").result_rows
    assert rolled == [(5, 2, 3)]  # f-1 and f-3 down, f-0 and f-2 up, and u9's down on f-0


def test_a_retried_write_keeps_its_own_rows(settings: Any, conn: Any) -> None:
    """A write retried after part of it landed sends the same rows again (the insert token dedupes
    them); it must not take its own first attempt's rows for stored ones and drop them."""
    from processors.records import Source

    runtime = EmbeddedRuntime(settings, conn)
    runtime.ingest(batch([orjson.dumps(call(request_id=f"w-{i}", ts=iso(NOW - 3000 + i))) for i in range(3)]),
                   now=NOW)  # fmt: skip
    runtime.flush()
    thumbs = [orjson.dumps({"kind": "feedback", "request_id": f"w-{i}", "ts": iso(NOW - 60), "user_id": "u",
                            "thumbs": "down"}) for i in range(3)]  # fmt: skip
    processed = runtime.feedback.process(batch(thumbs, Source("kafka", "llm.feedback", 0), first=7), NOW)
    runtime.sink.write_feedback([processed], "retry-token")
    runtime.sink.write_feedback([processed], "retry-token")  # the retry after an error later in the block
    runtime.close()
    assert [e.request_id for e in processed.events] == ["w-0", "w-1", "w-2"]  # still there for the judge
    assert processed.counters.duplicates == 0
    assert conn.client.command("SELECT count() FROM feedback") == 3
    assert conn.client.query("SELECT sum(n), sum(thumbs_down) FROM feedback_1h").result_rows == [(3, 3)]
