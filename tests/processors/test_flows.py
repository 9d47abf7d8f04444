"""Flows in the stream, as numbers: agent runs and conversation turns, their perceived latency
(first start to last end), and the window each is counted in."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from processors.pricing import CostAttribution
from processors.windows import WindowAggregator, WindowPartial
from schemas.prices import builtin_price_table
from schemas.wire import WireCall
from tests.conftest import iso, payload

T0 = 1_795_000_200  # a minute boundary
DECODE = msgspec.json.Decoder(WireCall).decode
PRICE = CostAttribution(builtin_price_table())


def feed(agg: WindowAggregator, specs: list[tuple[float, dict[str, Any]]]) -> list[WindowPartial]:
    events = [DECODE(payload(ts=iso(t), **kw)) for t, kw in specs]
    return agg.add(events, [e.ts.timestamp() for e in events], PRICE(events))


def flows_of(partials: list[WindowPartial]) -> dict[int, tuple[int, int, float]]:
    """window start → (flows, flow calls, perceived ms sum)."""
    out: dict[int, tuple[int, int, float]] = {}
    for p in partials:
        if p.flows:
            f, c, s = out.get(p.window_start, (0, 0, 0.0))
            out[p.window_start] = (f + p.flows, c + p.flow_calls, s + p.flow_ms_sum)
    return out


def test_an_agent_run_is_one_flow_from_first_start_to_last_end() -> None:
    agg = WindowAggregator(60, lateness_s=0, flow_idle_s=30)
    # five steps 2 s apart, each 1.5 s long: the user waits 4 × 2 + 1.5 = 9.5 s
    run = [(T0 + i * 2.0, {"trace_id": "run-1", "latency_ms": 1500.0}) for i in range(5)]
    assert feed(agg, run) == []  # lateness 0: the watermark is at the last step, the run may go on
    out = feed(agg, [(T0 + 300, {"feature": "other"})])  # moves the watermark well past the idle gap
    out += agg.flush()
    (p,) = [p for p in out if p.flows]
    assert (p.flows, p.flow_calls, p.flow_ms_sum) == (1, 5, 9500.0)
    assert p.flow_tokens == 5 * 1200 and p.flow_cost_usd == pytest.approx(5 * (1000 * 2.5 + 200 * 10) / 1e6)
    # known over at the last end (T0 + 9.5) + 30 s idle: counted in the window starting at T0
    assert p.window_start == T0 and p.key[0] == "support-chat"
    assert p.metric("flow_perceived_p95_ms") == 9500.0 and p.metric("flow_calls_avg") == 5.0


def test_a_flow_with_an_unpriced_call_has_no_cost_rather_than_a_smaller_one() -> None:
    """Counted as $0, the unpriced step made the run look cheaper, and a model with no price in
    an agent's chain pulled the feature's cost per flow down."""
    agg = WindowAggregator(60, lateness_s=0, flow_idle_s=30)
    priced = [(T0 + i * 2.0, {"trace_id": "run-1"}) for i in range(3)]
    mixed = [(T0 + i * 2.0, {"trace_id": "run-2"}) for i in range(2)]
    mixed.append((T0 + 4.0, {"trace_id": "run-2", "model": "acme-llm-9"}))  # no price for it
    out = feed(agg, priced + mixed) + feed(agg, [(T0 + 300, {"feature": "other"})]) + agg.flush()
    (p,) = [p for p in out if p.flows]
    per_call = (1000 * 2.5 + 200 * 10) / 1e6  # gpt-4o: $2.50 / $10 per 1M input / output tokens
    assert (p.flows, p.flow_unpriced, p.flow_calls) == (2, 1, 6)
    assert p.flow_cost_usd == pytest.approx(3 * per_call)  # run-1's alone
    assert p.metric("flow_cost_usd_avg") == pytest.approx(3 * per_call)  # not (3 + 2) * per_call / 2
    assert p.metric("priced_flows") == 1.0
    back = WindowPartial.from_wire(p.to_wire())
    assert (back.flow_unpriced, back.metric("flow_cost_usd_avg")) == (1, p.metric("flow_cost_usd_avg"))
    only_unpriced = WindowPartial(0, 60, ("k",), flows=1, flow_calls=2, flow_unpriced=1)
    assert only_unpriced.metric("flow_cost_usd_avg") is None  # unknown, not $0


def test_a_conversation_splits_into_turns_at_the_idle_gap_and_single_calls_are_not_flows() -> None:
    agg = WindowAggregator(60, lateness_s=0, flow_idle_s=30)
    conv = {"conversation_id": "c-1", "latency_ms": 1000.0}
    specs = [
        (T0, conv), (T0 + 5, conv),  # turn 1: 0 → 6 s
        (T0 + 100, conv), (T0 + 103, conv), (T0 + 110, conv),  # turn 2 (94 s of quiet): 100 → 111 s
        (T0 + 200, conv),  # turn 3: one call, not a flow
        (T0 + 201, {"conversation_id": "c-2", "feature": "search", "latency_ms": 500.0}),  # one call
    ]  # fmt: skip
    out = feed(agg, specs) + feed(agg, [(T0 + 600, {"feature": "other"})]) + agg.flush()
    assert flows_of(out) == {T0: (1, 2, 6000.0), T0 + 120: (1, 3, 11000.0)}


def test_flows_are_per_feature_and_a_trace_ignores_conversation_gaps() -> None:
    agg = WindowAggregator(60, lateness_s=0, flow_idle_s=30)
    specs = [
        (T0, {"trace_id": "t", "conversation_id": "c", "latency_ms": 100.0}),
        (T0 + 20, {"trace_id": "t", "conversation_id": "c", "latency_ms": 100.0}),
        (T0, {"trace_id": "t", "feature": "search", "latency_ms": 100.0}),
        (T0 + 1, {"trace_id": "t", "feature": "search", "latency_ms": 100.0}),
    ]
    out = feed(agg, specs) + agg.flush()
    by_feature = {p.key[0]: (p.flows, p.flow_ms_sum) for p in out if p.flows}
    assert by_feature == {"support-chat": (1, pytest.approx(20100.0)), "search": (1, pytest.approx(1100.0))}


def test_closed_flows_land_in_open_windows_and_survive_the_wire() -> None:
    agg = WindowAggregator(60, lateness_s=120, flow_idle_s=30)
    first = feed(agg, [(T0 + i, {"trace_id": "r", "latency_ms": 500.0}) for i in range(3)])
    assert first == []
    later = feed(agg, [(T0 + 400, {"feature": "other"})])  # watermark T0 + 280 closes the run
    (p,) = [p for p in later if p.flows]
    assert p.window_start == T0  # known over at T0 + 2.5 + 30: that window was still open
    copy = WindowPartial.from_wire(p.to_wire())
    assert (copy.flows, copy.flow_calls, copy.flow_ms_sum, copy.metric("flow_perceived_p50_ms")) == (
        1, 3, 2500.0, 2500.0,
    )  # fmt: skip
    merged = WindowPartial(T0, 60, p.key)
    merged.merge(copy)
    merged.merge(copy)
    assert merged.flows == 2 and merged.metric("flow_perceived_avg_ms") == 2500.0


def test_the_tracker_closes_only_what_is_due_and_bounds_its_memory() -> None:
    from processors.flows import FlowTracker

    tracker = FlowTracker(idle_s=30, max_open=3)
    conv = [DECODE(payload(ts=iso(T0 + t), conversation_id=c, latency_ms=1000.0))
            for t, c in [(0, "a"), (1, "b"), (2, "a"), (40, "a")]]  # fmt: skip
    key = ("support-chat", "cx", "gpt-4o", "", "", "")
    tracker.add(conv[:3], [T0, T0 + 1, T0 + 2], [key] * 3, PRICE(conv[:3]))
    # "a" was listed due at T0 + 31 and again at T0 + 33 when its second call came: not due at T0 + 32
    assert tracker.close(T0 + 32.5) == [] and tracker.open_flows == 2
    (a,) = tracker.close(T0 + 34)  # "b" (one call) closes unseen
    assert tracker.open_flows == 0
    assert (a.calls, a.perceived_ms, a.known_at) == (2, 3000.0, T0 + 33)
    many = [DECODE(payload(ts=iso(T0 + 100 + i), conversation_id=f"c{i}", latency_ms=10.0)) for i in range(5)]
    tracker.add(many, [T0 + 100 + i for i in range(5)], [key] * 5, PRICE(many))
    tracker.close(T0 + 105)
    assert tracker.open_flows == 3 and tracker.evicted == 2  # the two due soonest went first


def test_a_late_call_does_not_start_a_stray_flow() -> None:
    agg = WindowAggregator(60, lateness_s=0, flow_idle_s=30)
    conv = {"conversation_id": "c", "latency_ms": 1000.0}
    out = feed(agg, [(T0, conv), (T0 + 5, conv), (T0 + 300, {"feature": "other"})])
    # two calls arrive minutes late for the same conversation: their window is emitted, counted late
    out += feed(agg, [(T0 + 10, conv), (T0 + 12, conv)]) + agg.flush()
    assert flows_of(out) == {T0: (1, 2, pytest.approx(6000.0))} and agg.late_events == 2


def test_a_trace_quiet_past_the_idle_gap_splits_the_same_in_one_batch_or_two() -> None:
    """Across batches close() ends the flow while the run waits; within one batch the gap must
    split it too, or the count would depend on how the consumer happened to batch."""
    steps = [(T0 + t, {"trace_id": "run", "latency_ms": 2000.0}) for t in (0.0, 3.0, 60.0, 63.0)]
    closer = [(T0 + 600, {"feature": "other"})]
    together = WindowAggregator(60, lateness_s=0, flow_idle_s=30)
    one = feed(together, steps) + feed(together, closer) + together.flush()
    apart = WindowAggregator(60, lateness_s=0, flow_idle_s=30)
    two = feed(apart, steps[:2]) + feed(apart, steps[2:]) + feed(apart, closer) + apart.flush()
    assert flows_of(one) == flows_of(two)
    assert sum(f[0] for f in flows_of(one).values()) == 2
