from __future__ import annotations

from ingest.synthetic import FEATURES, UNKNOWN_MODEL, Scenario, generate
from processors.records import PayloadBatch
from processors.validate import Decoded, ValidationLimits, decode_calls, decode_feedback
from schemas.wire import WireCall
from tests.conftest import NOW, batch


def flat(s: Scenario) -> list[bytes]:
    return [p for b in generate(s, 1000) for p in b]


def calls_and_others(raws: list[bytes]) -> tuple[Decoded[WireCall], dict[str, PayloadBatch]]:
    """The calls decoded, other kinds moved aside, as the embedded runtime reads a mixed stream."""
    others: dict[str, PayloadBatch] = {}
    return decode_calls(ValidationLimits())(batch(raws), NOW, others), others


def test_same_seed_same_traffic() -> None:
    s = Scenario(events=3000, days=1, seed=5, end=NOW)
    assert flat(s) == flat(s)
    assert flat(s) != flat(Scenario(events=3000, days=1, seed=6, end=NOW))


def test_a_malformed_call_that_the_service_retried_elsewhere_still_generates() -> None:
    """The retry on another provider is built from the call, not from the mangled bytes sent for
    it: P1's traffic (seed 11, ten minutes) once crashed here on a payload made invalid UTF-8."""
    s = Scenario(events=20_000, days=10 / 1440, seed=11, end=NOW)
    raws = flat(s)
    out, _ = calls_and_others(raws)
    fallbacks = [e for e in out.events if e.fallback_from == "anthropic"]
    assert len(raws) >= 20_000 and fallbacks
    assert all(e.status == "ok" and e.model == "gpt-4o" for e in fallbacks)


def test_traffic_shape() -> None:
    s = Scenario(events=20_000, days=2, seed=3, end=NOW)
    raws = flat(s)
    out, kinds = calls_and_others(raws)
    feedback = decode_feedback(ValidationLimits())(kinds["feedback"], NOW)
    assert len(raws) >= 20_000
    assert 0 < len(out.dead) < 40  # a sprinkling of malformed payloads
    assert not feedback.dead and 0.01 < len(feedback.events) / len(out.events) < 0.04
    calls = {e.request_id for e in out.events}
    orphans = [f for f in feedback.events if f.request_id not in calls]
    assert len(orphans) <= 2  # feedback is about calls that happened (bar one whose call payload was mangled)
    features = {e.feature for e in out.events}
    assert features == {f.name for f in FEATURES}
    assert len({e.team for e in out.events}) >= 3
    assert len({e.model for e in out.events}) >= 5 and UNKNOWN_MODEL in {e.model for e in out.events}
    assert any(e.cached_input_tokens for e in out.events)
    assert any(e.conversation_id and e.event_id for e in out.events)
    assert min(out.ts) >= s.start - 900 and max(out.ts) <= s.end + 60


def test_incidents_are_in_the_data() -> None:
    s = Scenario(events=60_000, days=7, seed=9, end=NOW)
    events = calls_and_others(flat(s))[0].events
    ok = [e for e in events if e.status == "ok"]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    v7 = mean([e.output_tokens for e in ok if e.prompt_version == "v7"])
    v8 = mean([e.output_tokens for e in ok if e.prompt_version == "v8"])
    assert 1.7 < v8 / v7 < 2.3  # the prompt change doubles output tokens
    haiku = [e for e in events if e.model == "claude-haiku-4-5" and e.variant == "control"]
    before = mean([e.refusal for e in haiku if e.ts.timestamp() < s.refusal_regression_at])
    after = mean([e.refusal for e in haiku if e.ts.timestamp() >= s.refusal_regression_at])
    assert before < 0.03 and 0.14 < after < 0.22
    canary = [e for e in events if e.feature == "support-chat" and e.variant == "canary"]
    assert canary and all(e.prompt_version == "v13" for e in canary)


def test_agent_runs_are_back_to_back_traces() -> None:
    s = Scenario(events=20_000, days=1, seed=4, end=NOW)
    events = calls_and_others(flat(s))[0].events
    runs: dict[str, list[float]] = {}
    for e in events:
        if e.feature == "agent-planner":
            assert e.trace_id
            runs.setdefault(e.trace_id, []).append(e.ts.timestamp())
    spans = sorted(max(ts) - min(ts) for ts in runs.values() if len(ts) > 1)
    assert len(spans) > 100 and spans[len(spans) // 2] < 120  # a run takes seconds to minutes, not the day


def test_simulated_judge_is_deterministic_and_penalises_refusals() -> None:
    import orjson

    from ingest.synthetic import simulated_judge

    def request(rid: str, **kw: object) -> dict[str, object]:
        return {"request_id": rid, "feature": "support-chat", "ts": "2026-11-18T10:00:00Z", "status": "ok",
                "refusal": False, "release": {"prompt_version": "v12"}, **kw}  # fmt: skip

    reqs = [request(f"r{i}") for i in range(400)]
    first = [orjson.loads(p) for p in simulated_judge(reqs)]
    assert first == [orjson.loads(p) for p in simulated_judge(reqs)]
    ok = sum(v["score"] for v in first) / len(first)
    assert 0.78 < ok < 0.86 and all(0 <= v["score"] <= 1 and v["kind"] == "judge_result" for v in first)
    refused = [orjson.loads(p)["score"] for p in simulated_judge([request(f"x{i}", refusal=True) for i in range(50)])]
    assert max(refused) < 0.3
    assert orjson.loads(simulated_judge([request("e", status="error")])[0])["score"] == 0.0
