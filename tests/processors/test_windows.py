"""Event-time tumbling windows: boundaries, watermark, lateness, flush, merge, wire form."""

from __future__ import annotations

import base64

import msgspec
import orjson
import pytest

from processors.pricing import CostAttribution
from processors.windows import _COUNTS, _SUMS, SCOPE_DIMS, WindowAggregator, WindowPartial, project, read_wire
from schemas.prices import builtin_price_table
from schemas.wire import WireCall
from tests.conftest import iso, payload

T0 = 1_795_000_020.0  # 11:07:00 UTC, a minute boundary
DECODE = msgspec.json.Decoder(WireCall).decode
PRICE = CostAttribution(builtin_price_table())


def events(specs: list[tuple[float, dict]]) -> tuple[list[WireCall], list[float]]:
    evs = [DECODE(payload(ts=iso(t), **kw)) for t, kw in specs]
    return evs, [e.ts.timestamp() for e in evs]


def feed(agg: WindowAggregator, specs: list[tuple[float, dict]]) -> list[WindowPartial]:
    evs, ts = events(specs)
    return agg.add(evs, ts, PRICE(evs))


def test_boundaries_are_half_open() -> None:
    agg = WindowAggregator(window_s=60, lateness_s=0)
    assert T0 % 60 == 0
    closed = feed(agg, [(T0 + 59.999, {}), (T0 + 60.0, {}), (T0 + 121, {})])
    starts = sorted((p.window_start, p.calls) for p in closed)
    assert starts == [(int(T0), 1), (int(T0) + 60, 1)]  # 59.999 in the first window, 60.0 in the next


def test_window_closes_only_after_allowed_lateness() -> None:
    agg = WindowAggregator(window_s=60, lateness_s=30)
    assert feed(agg, [(T0 + 10, {}), (T0 + 85, {})]) == []  # watermark 55: window [0,60) still open
    assert agg.watermark == T0 + 55
    closed = feed(agg, [(T0 + 95, {})])  # watermark 65 passes 60
    assert [(p.window_start, p.calls) for p in closed] == [(int(T0), 1)]


def test_event_within_lateness_counts_and_beyond_is_late_not_lost() -> None:
    agg = WindowAggregator(window_s=60, lateness_s=30)
    feed(agg, [(T0 + 10, {}), (T0 + 80, {})])
    feed(agg, [(T0 + 40, {})])  # 40 s behind the newest event: within lateness, counted
    closed = feed(agg, [(T0 + 200, {})])
    first = next(p for p in closed if p.window_start == int(T0))
    assert first.calls == 2
    assert agg.late_events == 0
    feed(agg, [(T0 + 20, {})])  # its window was emitted already: late
    assert agg.late_events == 1


def test_aggregates_are_exact() -> None:
    agg = WindowAggregator(window_s=60, lateness_s=0)
    specs = [
        (T0 + 1, {"status": "ok", "latency_ms": 100.0, "ttft_ms": 40.0, "output_tokens": 10}),
        (T0 + 2, {"status": "error", "latency_ms": 300.0, "output_tokens": 0}),
        (T0 + 3, {"status": "timeout", "latency_ms": 30_000.0, "output_tokens": 0}),
        (T0 + 4, {"refusal": True, "latency_ms": 200.0, "ttft_ms": 60.0, "schema_valid": False}),
        (T0 + 5, {"model": "acme-llm-1", "latency_ms": 50.0, "tool_calls": ["search"], "schema_valid": True}),
        (T0 + 6, {"input_tokens": 0, "output_tokens": 0, "latency_ms": 70.0}),  # usage unknown: no cost either
    ]
    evs, ts = events(specs)
    costs = PRICE(evs)
    agg.add(evs, ts, costs)
    parts = agg.flush()
    merged = project(parts, ("feature",))
    p = merged[(int(T0), "support-chat")]
    assert costs.cost_usd[5] is None and costs.usage_unknown == 1
    assert (p.calls, p.errors, p.timeouts, p.refusals, p.price_missing) == (6, 2, 1, 1, 2)
    assert p.cost_usd == pytest.approx(sum(c for c in costs.cost_usd if c is not None))
    assert (p.schema_checked, p.schema_valid, p.tool_call_calls) == (2, 1, 1)
    m = p.metrics()
    assert m["error_rate"] == pytest.approx(2 / 6)
    assert m["refusal_rate"] == pytest.approx(1 / 6)
    assert m["latency_avg_ms"] == pytest.approx((100 + 300 + 30_000 + 200 + 50 + 70) / 6)
    assert m["ttft_p50_ms"] == pytest.approx(50.0)
    assert m["schema_valid_rate"] == pytest.approx(0.5)


def test_keys_split_by_scope_and_projection_merges_partitions() -> None:
    a, b = WindowAggregator(60, 0, partition=0), WindowAggregator(60, 0, partition=1)
    feed(a, [(T0 + 1, {"feature": "f1", "model": "gpt-4o"}), (T0 + 2, {"feature": "f2", "model": "gpt-4o"})])
    feed(b, [(T0 + 3, {"feature": "f3", "model": "gpt-4o", "refusal": True})])
    parts = a.flush() + b.flush()
    assert len(parts) == 3
    by_model = project(parts, ("model",))
    merged = by_model[(int(T0), "gpt-4o")]
    assert merged.calls == 3 and merged.refusals == 1
    assert merged.metrics()["refusal_rate"] == pytest.approx(1 / 3)


def test_partial_survives_the_wire() -> None:
    agg = WindowAggregator(60, 0)
    feed(agg, [(T0 + i, {"latency_ms": 100.0 + i}) for i in range(50)])
    (part,) = agg.flush()
    back = WindowPartial.from_wire(part.to_wire())
    assert back.calls == 50 and back.key == part.key
    assert back.latency.quantile(0.5) == pytest.approx(part.latency.quantile(0.5))
    assert back.labels()["feature"] == "support-chat"
    assert set(back.labels()) == set(SCOPE_DIMS)


def test_every_count_and_sum_survives_the_wire_with_its_type() -> None:
    part = WindowPartial(int(T0), 60, ("k",))
    for i, name in enumerate(_COUNTS):
        setattr(part, name, 1000 + i)
    for i, name in enumerate(_SUMS):
        setattr(part, name, 0.25 + i)
    back = WindowPartial.from_wire(part.to_wire())
    for name in _COUNTS:
        assert getattr(back, name) == getattr(part, name) and type(getattr(back, name)) is int, name
    for name in _SUMS:
        assert getattr(back, name) == getattr(part, name) and type(getattr(back, name)) is float, name


def test_the_wire_carries_sketches_as_bytes_and_skips_the_ones_stage_2_does_not_read() -> None:
    agg = WindowAggregator(60, 0)
    feed(agg, [(T0 + i % 60, {"latency_ms": 100.0 + i, "ttft_ms": 10.0 + i % 7}) for i in range(900)])
    (part,) = agg.flush()
    assert part.latency.to_bytes()[:1] == b"t" and part.ttft.to_bytes()[:1] == b"t"  # digests, not raw values
    value = part.to_wire(type="partial", scope_dims=list(SCOPE_DIMS), watermark=T0 + 60)
    header, back = read_wire(value)
    assert header["type"] == "partial" and header["watermark"] == T0 + 60
    assert back is not None and back.calls == 900
    for q in (0.5, 0.95, 0.99):
        assert back.latency.quantile(q) == part.latency.quantile(q)
        assert back.ttft.quantile(q) == part.ttft.quantile(q)
    _, skipped = read_wire(value, (False, True, False))
    assert skipped is not None and skipped.latency.count == 0 and skipped.ttft.count == 900
    assert skipped.calls == 900
    # what no rule reads is not sent at all
    lean = part.to_wire((True, False, False), type="partial")
    assert len(lean) < len(value) - len(part.ttft.to_bytes()) + 10
    _, sent = read_wire(lean)
    assert sent is not None and sent.latency.count == 900 and sent.ttft.count == 0 and sent.calls == 900


def test_partials_of_the_earlier_all_json_wire_form_still_read() -> None:
    """Messages a previous version left on the partials topic: an upgrade mid-stream loses no minute."""
    agg = WindowAggregator(60, 0)
    feed(agg, [(T0 + i, {"latency_ms": 100.0 + i}) for i in range(50)])
    (part,) = agg.flush()
    old = {name: getattr(part, name) for name in _COUNTS + _SUMS}
    old.update(window_start=part.window_start, window_s=60, key=list(part.key), partition=3, type="partial",
               watermark=T0 + 60, latency=base64.b64encode(part.latency.to_bytes()).decode(),
               ttft=base64.b64encode(part.ttft.to_bytes()).decode())  # fmt: skip
    header, back = read_wire(orjson.dumps(old))
    assert header["watermark"] == T0 + 60
    assert back is not None and back.calls == 50 and back.partition == 3
    assert back.latency.quantile(0.5) == part.latency.quantile(0.5)
    assert back.output.count == 0  # not sent by versions before drift metrics
    beat, none = read_wire(orjson.dumps({"type": "watermark", "partition": 1, "watermark": T0}))
    assert none is None and beat["partition"] == 1


def test_idle_partition_closes_windows_by_wall_clock() -> None:
    agg = WindowAggregator(60, 30)
    evs, ts = events([(T0 + 5, {})])
    agg.add(evs, ts, PRICE(evs), now=1000.0)
    assert agg.tick(now=1030.0, idle_timeout_s=60) == []  # not idle long enough
    closed = agg.tick(now=T0 + 300, idle_timeout_s=60)
    assert [p.calls for p in closed] == [1]


def test_a_partition_behind_in_a_backlog_is_not_idle() -> None:
    agg = WindowAggregator(60, 30)
    evs, ts = events([(T0 + 5, {})])
    agg.add(evs, ts, PRICE(evs), now=T0 + 10)
    agg.behind(now=T0 + 200)  # its next events wait upstream: the countdown starts again
    assert agg.tick(now=T0 + 250, idle_timeout_s=60) == [] and agg.watermark == T0 + 5 - 30
    assert [p.calls for p in agg.tick(now=T0 + 260, idle_timeout_s=60)] == [1]  # caught up, then idle


def test_merge_adds_every_field() -> None:
    from dataclasses import fields

    a = WindowPartial(0, 60, ("k",))
    b = WindowPartial(0, 60, ("k",))
    numeric = [f.name for f in fields(WindowPartial) if f.type in ("int", "float") and f.name not in
               ("window_start", "window_s", "partition")]  # fmt: skip
    for i, name in enumerate(numeric, start=1):
        setattr(b, name, i)
    a.merge(b)
    a.merge(b)
    assert {name: getattr(a, name) for name in numeric} == {name: 2 * i for i, name in enumerate(numeric, start=1)}


def test_a_flow_counts_once_per_absence_window_however_many_minutes_keys_or_gaps_it_spans() -> None:
    """What silence is judged by: an agent run or conversation is one flow however many calls it
    makes, minutes it spans, models it uses or quiet minutes between its turns; a call in no flow
    is its own. Counted afresh in each (aligned) ten-minute window, as rule windows are."""
    from processors.windows import active_flows

    w0 = 1_795_000_200  # a ten-minute boundary
    agg = WindowAggregator(60, 0, flow_windows=(600,))
    closed = feed(agg, [
        (w0 + 1, {"conversation_id": "c1"}), (w0 + 2, {"conversation_id": "c1"}),
        (w0 + 3, {"conversation_id": "c1", "trace_id": "run-1"}), (w0 + 4, {"trace_id": "run-1"}),  # a run in c1
        (w0 + 5, {}), (w0 + 6, {}),  # no flow: each call its own
        (w0 + 61, {"conversation_id": "c1"}), (w0 + 62, {"conversation_id": "c2"}),
        (w0 + 63, {"conversation_id": "c2", "model": "gpt-4o-mini"}),  # c2 again, under another scope key
        (w0 + 301, {"conversation_id": "c1"}),  # c1's next turn, after three quiet minutes
        (w0 + 601, {"conversation_id": "c1"}),  # the next ten minutes: c1 is active there too
        (w0 + 605, {"feature": "other", "conversation_id": "c1"}),  # another feature: its own flow
    ])  # fmt: skip
    closed += agg.flush()
    assert all(not p.flow_ids for p in closed)  # the ids are not kept past the close, nor sent

    def window(start: int, feature: str = "support-chat") -> WindowPartial:
        acc = WindowPartial(start, 60, ())  # what stage 2 does: the rule window's minutes added up
        for p in closed:
            if start <= p.window_start < start + 600 and p.key[0] == feature:
                acc.merge(p)
        return acc

    first, second = window(w0), window(w0 + 600)
    assert (first.calls, first.lone_calls, first.new_flows) == (10, 2, {600: 3})  # c1, run-1, c2
    assert active_flows(first, 600) == 5.0
    assert (second.calls, active_flows(second, 600)) == (1, 1.0)
    assert active_flows(window(w0 + 600, "other"), 600) == 1.0
    # a length no absence rule has was not counted: each call is its own flow there
    assert active_flows(first, 3600) == 10.0


def test_flow_ids_are_collected_only_for_absence_rules_and_up_to_a_bound() -> None:
    """Off (no absence rule): no per-event work, and each call counts as its own flow, as before
    flows were counted. On: at most ``FLOW_IDS_KEPT`` ids per partial, so an OTLP source whose
    every call has its own trace id holds 256 strings per key, not one per call."""
    from processors.windows import FLOW_IDS_KEPT, active_flows

    spec = [(T0 + i * 0.1, {"trace_id": f"t{i}"}) for i in range(300)]
    off = WindowAggregator(60, 0)
    feed(off, spec)
    assert all(not p.flow_ids for bucket in off._open.values() for p in bucket.values())
    (part,) = off.flush()
    assert (part.calls, part.new_flows, active_flows(part, 600)) == (300, {}, 300.0)
    on = WindowAggregator(60, 0, flow_windows=(600,))
    feed(on, spec)
    (open_part,) = on._open[int(T0)].values()
    assert len(open_part.flow_ids) == FLOW_IDS_KEPT == 256
    (part,) = on.flush()
    assert (part.calls, part.new_flows) == (300, {600: 256})  # silence odds e^-256 either way


def test_new_flows_survive_the_wire_and_partials_without_them_count_calls() -> None:
    from processors.windows import active_flows

    agg = WindowAggregator(60, 0, flow_windows=(600, 3600))
    feed(agg, [(T0 + i, {"conversation_id": "c"}) for i in range(5)])
    (part,) = agg.flush()
    back = WindowPartial.from_wire(part.to_wire())
    assert back.new_flows == {600: 1, 3600: 1} and active_flows(back, 600) == 1.0
    header, blobs = part.to_wire().split(b"\n", 1)
    old = orjson.loads(header)
    del old["new_flows"]  # from a worker that counted none (an older one, or no absence rule)
    assert active_flows(WindowPartial.from_wire(orjson.dumps(old) + b"\n" + blobs), 600) == 5.0


def test_calls_naming_a_model_alias_are_counted_as_their_window_closes() -> None:
    agg = WindowAggregator(60, 0)
    # the call at T0 + 61 closes the first minute (no lateness): four calls, three of them to an alias
    first = feed(agg, [(T0 + 1, {"model": "gpt-4o"}), (T0 + 2, {"model": "gpt-4o"}),
                       (T0 + 3, {"model": "gpt-4o-2024-08-06"}), (T0 + 4, {"model": "claude-sonnet-4-5"}),
                       (T0 + 61, {"model": "gpt-4o-2024-08-06"})])  # fmt: skip
    assert {p.key[SCOPE_DIMS.index("model")]: p.unpinned_calls for p in first} == {
        "gpt-4o": 2, "gpt-4o-2024-08-06": 0, "claude-sonnet-4-5": 1}  # fmt: skip
    merged = project(first, ("feature",))[(int(T0), "support-chat")]
    assert (merged.unpinned_calls, merged.calls) == (3, 4) and merged.metric("unpinned_model_share") == 0.75
    assert WindowPartial.from_wire(merged.to_wire()).unpinned_calls == 3
    (last,) = agg.flush()
    assert last.metric("unpinned_model_share") == 0.0
