"""Judge sampling is deterministic, sticky per conversation, stable across processes."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from processors.sampling import REASON_ERROR, REASON_RATE, REASON_REFUSAL, JudgeSampler
from schemas.wire import WireCall
from tests.conftest import NOW, payload

DECODE = msgspec.json.Decoder(WireCall).decode


def evs(n: int, **kw: object) -> list[WireCall]:
    return [DECODE(payload(event_id=f"ev-{i}", conversation_id=f"conv-{i // 4}", **kw)) for i in range(n)]


def picked(sampler: JudgeSampler, events: list[WireCall]) -> list[int]:
    return [s.index for s in sampler(events, [NOW] * len(events))]


def test_rate_is_respected_and_sticky_per_conversation() -> None:
    events = evs(40_000)
    chosen = set(picked(JudgeSampler(default_rate=0.05), events))
    assert 0.04 < len(chosen) / 40_000 < 0.06
    for i in chosen:  # every turn of a chosen conversation is chosen
        base = i - i % 4
        assert {base, base + 1, base + 2, base + 3} <= chosen


def test_per_feature_rates() -> None:
    sampler = JudgeSampler(default_rate=0.0, rates={"support-chat": 1.0})
    assert len(picked(sampler, evs(100))) == 100
    assert picked(sampler, evs(100, feature="other")) == []


def test_errors_and_refusals_are_kept_up_to_the_cap() -> None:
    sampler = JudgeSampler(default_rate=0.0, boost_cap_per_hour=30)
    errors = evs(20, status="error")
    refusals = evs(20, refusal=True)
    out = sampler(errors + refusals, [NOW] * 40)
    reasons = [s.reason for s in out]
    assert reasons.count(REASON_ERROR) == 20
    assert reasons.count(REASON_REFUSAL) == 10  # the cap (30 per feature-hour) reached
    assert REASON_RATE not in reasons


SCRIPT = """
import msgspec, sys
from processors.sampling import JudgeSampler
from schemas.wire import WireCall
from tests.conftest import NOW, payload
d = msgspec.json.Decoder(WireCall).decode
events = [d(payload(event_id=f"ev-{i}", conversation_id=f"conv-{i}")) for i in range(5000)]
print(",".join(str(s.index) for s in JudgeSampler(default_rate=0.1)(events, [NOW] * 5000)))
"""


def test_same_choice_in_another_process() -> None:
    events = [DECODE(payload(event_id=f"ev-{i}", conversation_id=f"conv-{i}")) for i in range(5000)]
    here = ",".join(str(s.index) for s in JudgeSampler(default_rate=0.1)(events, [NOW] * 5000))
    there = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},
    ).stdout.strip()
    assert here == there
    assert here  # not trivially empty


def test_rates_are_validated() -> None:
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        JudgeSampler(default_rate=1.5)


def test_budget_caps_judged_calls_per_hour_and_spend_per_day() -> None:
    from processors.sampling import JudgeBudget

    events = evs(1000)  # 250 conversations, all in one hour
    hourly = JudgeSampler(default_rate=1.0, budget=JudgeBudget(max_per_hour=100))
    assert len(picked(hourly, events)) == 100
    assert hourly.capped == 900
    # $0.01 per judged call, $2.50 a day: 250 calls
    daily = JudgeSampler(default_rate=1.0, budget=JudgeBudget(usd_per_day=2.5), judge_cost=lambda e: 0.01)
    assert len(picked(daily, events)) == 250
    # a feature with its own budget
    per_feature = JudgeSampler(default_rate=1.0, budget=JudgeBudget(max_per_hour=10),
                               budgets={"support-chat": JudgeBudget(max_per_hour=40)})  # fmt: skip
    assert len(picked(per_feature, events)) == 40
    assert len(picked(per_feature, evs(100, feature="other"))) == 10


def test_judge_cost_estimate_uses_the_judge_models_price() -> None:
    from processors.chain import CallPipeline, PipelineOptions
    from schemas.prices import builtin_price_table

    pipe = CallPipeline(
        builtin_price_table(), PipelineOptions(judge_model="gpt-4o-mini", judge_extra_tokens=(600, 150))
    )
    e = DECODE(payload(input_tokens=1000, output_tokens=400))
    # gpt-4o-mini reads 1,000 + 400 + 600 tokens at $0.15/1M and writes 150 at $0.60/1M
    assert pipe.sampler.judge_cost is not None
    assert pipe.sampler.judge_cost(e) == pytest.approx(2000 * 0.15e-6 + 150 * 0.6e-6)


def test_calls_the_budget_refuses_do_not_use_up_the_boost_cap() -> None:
    from processors.sampling import JudgeBudget

    # $1 a day; an error with 2,000 input tokens costs $2 to judge, one with 100 costs $0.10
    sampler = JudgeSampler(default_rate=0.0, boost_cap_per_hour=3, budget=JudgeBudget(usd_per_day=1.0),
                           judge_cost=lambda e: e.input_tokens / 1000)  # fmt: skip
    expensive = evs(3, status="error", input_tokens=2000)
    cheap = evs(3, status="error", input_tokens=100)
    assert sampler(expensive, [NOW] * 3) == []
    assert sampler.capped == 3
    assert [(s.index, s.reason) for s in sampler(cheap, [NOW] * 3)] == [(0, REASON_ERROR), (1, REASON_ERROR),
                                                                         (2, REASON_ERROR)]  # fmt: skip


def test_flagged_calls_share_the_boost_cap_and_budget_with_the_stream() -> None:
    from processors.sampling import REASON_FLAGGED, JudgeBudget, pick_sampler

    sampler = JudgeSampler(default_rate=0.0, rates={"support-chat": 1.0}, boost_cap_per_hour=200,
                           budget=JudgeBudget(max_per_hour=5))  # fmt: skip
    assert len(picked(sampler, evs(3))) == 3  # the stream judged 3 of the hour's 5
    flagged = sampler.flagged(evs(8, feature="support-chat"), [NOW] * 8)
    assert [(s.index, s.reason) for s in flagged] == [(0, REASON_FLAGGED), (1, REASON_FLAGGED)]
    assert sampler.capped == 6
    # the next hour has a fresh budget, but the boost cap bounds flagged calls too
    capped = JudgeSampler(default_rate=0.0, boost_cap_per_hour=4)
    assert len(capped.flagged(evs(10, status="error"), [NOW + 3600] * 10)) == 4
    assert len(sampler.flagged(evs(8), [NOW + 3600] * 8)) == 5
    # a flagged call counts against the sampler that already counts its feature
    other = JudgeSampler()
    other(evs(1, feature="email-draft"), [NOW])
    assert pick_sampler([sampler, other], "email-draft") is other
    assert pick_sampler([sampler, other], "never-seen") is sampler
