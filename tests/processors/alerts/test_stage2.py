"""Stage 2: partials from several partitions add up before a rule sees them; silence is a window too."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from processors.alerts.budgets import BudgetTracker
from processors.alerts.engine import AlertEngine
from processors.alerts.stage2 import RuleWindows, Stage2, sketches_read
from processors.pricing import CostAttribution
from processors.windows import SCOPE_DIMS, WindowAggregator, WindowPartial, project
from schemas.prices import builtin_price_table
from schemas.rules import parse_rules
from schemas.wire import WireCall
from tests.conftest import iso, payload

T0 = 1_795_000_200  # a five-minute boundary (so also a minute boundary)
DECODE = msgspec.json.Decoder(WireCall).decode
PRICE = CostAttribution(builtin_price_table())


def partials(partition: int, specs: list[tuple[float, dict[str, Any]]]) -> tuple[list[WindowPartial], float]:
    agg = WindowAggregator(60, 0, partition=partition, flow_windows=(60, 600))
    events = [DECODE(payload(ts=iso(t), **kw)) for t, kw in specs]
    agg.add(events, [e.ts.timestamp() for e in events], PRICE(events))
    return agg.flush(), agg.watermark


def rules(*items: dict[str, Any]) -> RuleWindows:
    return RuleWindows(AlertEngine(parse_rules({"rules": list(items)}, "test").rules))


def test_model_scoped_rule_sees_the_rate_merged_across_partitions() -> None:
    # partition 0 (feature a): 40 calls of gpt-4o, 2 refused; partition 1 (feature b): 40 calls, 18 refused
    p0, _ = partials(0, [(T0 + i, {"feature": "a", "refusal": i < 2}) for i in range(40)])
    p1, _ = partials(1, [(T0 + i, {"feature": "b", "refusal": i < 18}) for i in range(40)])
    stage2 = Stage2(sources=[0, 1])
    for p in p0:
        stage2.add(SCOPE_DIMS, p, 0, T0 + 60)
    assert stage2.release() == ([], stage2.released_through)  # partition 1 has not reported yet
    for p in p1:
        stage2.add(SCOPE_DIMS, p, 1, T0 + 60)
    cells, through = stage2.release()
    assert through == T0 + 60 and len(cells) == 2
    windows = rules({"name": "refusals", "metric": "refusal_rate", "scope": ["model"], "max": 0.2, "min_calls": 50})
    (event,) = windows.feed(cells, through)
    assert event.scope == {"model": "gpt-4o"}
    assert event.value == 20 / 80  # neither partition alone breaches at this scope: 0.05 and 0.45
    assert event.extra["calls"] == 80


def test_commits_stay_below_the_oldest_minute_not_yet_evaluated() -> None:
    # partials of three minutes from two input partitions, at these (partition, offset) positions
    stage2 = Stage2(sources=[0])
    positions = {0: [(0, 10), (1, 4)], 1: [(0, 12), (1, 3)], 2: [(1, 9)]}
    for minute, where in positions.items():
        for n, position in enumerate(where):
            (p,) = partials(0, [(T0 + minute * 60 + 1, {"feature": f"f{n}"})])[0]
            stage2.add(SCOPE_DIMS, p, 0, None, position)
    assert stage2.pinned_offsets() == {0: 10, 1: 3}  # the lowest over every open minute
    stage2.heartbeat(0, T0 + 60)
    cells, _ = stage2.release()
    assert [c.partial.window_start for c in cells] == [T0, T0]
    assert stage2.pinned_offsets() == {0: 10, 1: 3}  # released, but a rule window it counts toward is open
    stage2.hold_released(T0 + 60)  # every window holding minute 0 is evaluated
    assert stage2.pinned_offsets() == {0: 12, 1: 3}
    stage2.heartbeat(0, T0 + 180)  # two minutes at once: released oldest first
    cells, _ = stage2.release()
    assert [c.partial.window_start for c in cells] == [T0 + 60, T0 + 60, T0 + 120]
    stage2.hold_released(math.inf)
    assert stage2.pinned_offsets() == {}  # nothing open: nothing holds a commit back


def test_a_restart_mid_window_reads_the_windows_earlier_minutes_again() -> None:
    """A 5-minute window is open when the worker stops after evaluating minute 1. Its commit held
    behind minute 0 (the window's first), so the next run reads minutes 0-1 again: they complete
    the window instead of counting late, and the window is evaluated once, whole."""
    rule = {"name": "many", "metric": "calls", "scope": ["feature"], "window": "5m", "max": 100, "min_calls": 0}
    first, windows = Stage2(sources=[0]), rules(rule)
    first.listen_on([0])
    messages = []
    for minute in range(5):  # 30 calls a minute at offsets 0-4, then a heartbeat at 5
        parts, _ = partials(0, [(T0 + minute * 60 + i, {"feature": "a"}) for i in range(30)])
        messages.append((project_one(parts[0], "feature"), T0 + minute * 60 + 60, minute))
    for partial, watermark, offset in messages[:3]:
        first.add(("feature",), partial, 0, watermark, (0, offset))
    assert windows.feed(*first.release()) == []  # minutes 0 and 1 released (minute 2's watermark waits)
    first.hold_released(windows.open_since())
    assert windows.open_since() == T0 and first.pinned_offsets() == {0: 0}  # the commit stays at the window
    # the restart: progress says evaluated through minute 1; the commit replays from offset 0
    second, windows = Stage2(sources=[0]), rules(rule)
    second.released_through = second.restored_through = T0 + 120
    windows.resume_after(T0 + 120)
    second.listen_on([0])
    for partial, watermark, offset in messages:
        second.add(("feature",), partial, 0, watermark, (0, offset))
    windows.feed(*second.release(), second.take_catch_up())
    second.hold_released(windows.open_since())
    assert second.pinned_offsets() == {0: 0}  # the replayed minutes stay pinned while their window is open
    second.heartbeat(0, T0 + 300, 0)
    (event,) = windows.feed(*second.release(), second.take_catch_up())
    assert (event.value, event.window_start.timestamp(), second.late_partials) == (150.0, T0, 0)
    second.hold_released(windows.open_since())
    assert second.pinned_offsets() == {}


def test_rule_windows_group_minutes_and_wait_for_the_last_one() -> None:
    stage2 = Stage2(sources=[0])
    windows = rules({"name": "cost", "metric": "calls", "scope": ["feature"], "window": "5m", "max": 100,
                     "min_calls": 0})  # fmt: skip
    fired = []
    for minute in range(5):
        parts, _ = partials(0, [(T0 + minute * 60 + i, {"feature": "a"}) for i in range(30)])
        for p in parts:
            stage2.add(SCOPE_DIMS, p, 0, T0 + (minute + 1) * 60)
        cells, through = stage2.release()
        fired += windows.feed(cells, through)
        if minute < 4:
            assert fired == []  # 30, 60, 90, 120 calls so far, but the 5-minute window is not complete
    assert [e.value for e in fired] == [150.0]


def test_a_silent_feature_pages_through_idle_watermarks() -> None:
    stage2 = Stage2(sources=[0])
    windows = rules({"name": "stopped", "metric": "calls", "scope": ["feature"], "window": "1m",
                     "absent": {"baseline": 3, "min_baseline_calls": 30}, "min_calls": 0})  # fmt: skip
    events = []
    for minute in range(3):
        parts, _ = partials(0, [(T0 + minute * 60 + i, {"feature": "a"}) for i in range(20)])
        for p in parts:
            stage2.add(SCOPE_DIMS, p, 0, T0 + (minute + 1) * 60)
        events += windows.feed(*stage2.release())
    assert events == []
    # no more calls: the partition's watermark advances by wall clock (idle) two minutes on
    stage2.heartbeat(0, T0 + 5 * 60)
    events += windows.feed(*stage2.release())
    assert [(e.state, e.scope, e.window_start.timestamp()) for e in events] == [("firing", {"feature": "a"}, T0 + 180)]


def test_a_feature_whose_calls_come_in_runs_does_not_page_for_a_quiet_minute() -> None:
    """The previous test's traffic as one 20-call agent run a minute: one arrival each, so a
    silent minute is unremarkable (p = e^-1), and stage 2 hands the rule the flows to see it."""
    stage2 = Stage2(sources=[0])
    windows = rules({"name": "stopped", "metric": "calls", "scope": ["feature"], "window": "1m",
                     "absent": {"baseline": 3, "min_baseline_calls": 30}, "min_calls": 0})  # fmt: skip
    events = []
    for minute in range(3):
        run = f"run-{minute}"
        parts, _ = partials(0, [(T0 + minute * 60 + i, {"feature": "a", "trace_id": run}) for i in range(20)])
        for p in parts:
            stage2.add(SCOPE_DIMS, p, 0, T0 + (minute + 1) * 60)
        events += windows.feed(*stage2.release())
    rule = windows.engine.rules["stopped"]
    assert windows.engine.state(rule, {"feature": "a"}).history == [(20.0, 1.0)] * 3
    stage2.heartbeat(0, T0 + 5 * 60)
    events += windows.feed(*stage2.release())
    assert events == []


def test_a_flow_across_minutes_counts_once_per_rule_window_and_again_in_the_next() -> None:
    """One agent run calling every 20 s for 20 minutes, and a second run in the second window only,
    a call every 150 s (quiet minutes between): the first ten-minute window saw one flow, the second
    two (the first run is still active there), however many minutes or gaps each spanned."""
    stage2 = Stage2(sources=[0])
    windows = rules({"name": "stopped", "metric": "calls", "scope": ["feature"], "window": "10m",
                     "absent": {"baseline": 3, "min_baseline_calls": 30}, "min_calls": 0})  # fmt: skip
    agg = WindowAggregator(60, 0, flow_windows=(600,))
    specs = [(T0 + t, {"feature": "a", "trace_id": "long"}) for t in range(0, 1200, 20)]
    specs += [(T0 + 600 + t, {"feature": "a", "trace_id": "chat"}) for t in range(0, 600, 150)]
    specs.append((T0 + 1300, {"feature": "b"}))  # closes minute 19
    evs = [DECODE(payload(ts=iso(t), **kw)) for t, kw in sorted(specs, key=lambda s: s[0])]
    for p in agg.add(evs, [e.ts.timestamp() for e in evs], PRICE(evs)):
        stage2.add(SCOPE_DIMS, p, 0, T0 + 1300)
    windows.feed(*stage2.release())
    history = windows.engine.state(windows.engine.rules["stopped"], {"feature": "a"}).history
    assert history == [(30.0, 1.0), (34.0, 2.0)]


def test_a_watermark_read_on_one_partials_partition_waits_for_the_others() -> None:
    """One worker sends a block's partials to several partials partitions at once. Batch 1
    closes minute 0 for scope b (partials partition 1); batch 2 closes minute 1 for scope a
    (partition 0) with a watermark past both. Stage 2 reads partition 0 first: batch 1's partial
    is still on its way, so minute 0 must wait for it rather than count it late."""
    (minute0,) = partials(0, [(T0 + 1, {"feature": "b"})])[0]
    (minute1,) = partials(0, [(T0 + 61, {"feature": "a"})])[0]
    stage2 = Stage2(sources=[0])
    stage2.listen_on([0, 1])
    stage2.add(SCOPE_DIMS, minute1, 0, T0 + 120, position=(0, 7))
    stage2.heartbeat(0, T0 + 120, via=0)  # the worker's heartbeat after batch 2, on every partition
    assert stage2.release() == ([], -math.inf) and 0 not in stage2.watermarks  # partition 1 not heard yet
    stage2.add(SCOPE_DIMS, minute0, 0, T0 + 60, position=(1, 3))
    stage2.heartbeat(0, T0 + 120, via=1)
    cells, through = stage2.release()
    assert through == T0 + 120
    assert [(c.values[0], c.partial.window_start) for c in cells] == [("b", T0), ("a", T0 + 60)]
    assert stage2.late_partials == 0


def test_a_batch_split_across_fetches_is_merged_whole() -> None:
    """Every partial of a batch carries the batch's watermark, and a fetch may stop halfway
    through them on one partition: the watermark holds only once something after the batch is
    read there (the next batch's partials, or a heartbeat)."""
    first, second = (partials(0, [(T0 + 1, {"feature": f})])[0][0] for f in ("a", "b"))
    third = partials(0, [(T0 + 61, {"feature": "a"})])[0][0]
    stage2 = Stage2(sources=[0])
    stage2.listen_on([0])
    stage2.add(SCOPE_DIMS, first, 0, T0 + 60, position=(0, 0))
    assert stage2.release()[0] == []  # the rest of the batch may be in the next fetch
    stage2.add(SCOPE_DIMS, second, 0, T0 + 60, position=(0, 1))
    stage2.add(SCOPE_DIMS, third, 0, T0 + 120, position=(0, 2))  # the next batch: minute 0 is whole
    cells, through = stage2.release()
    assert through == T0 + 60 and sorted(c.values[0] for c in cells) == ["a", "b"]
    assert stage2.late_partials == 0
    stage2.heartbeat(0, T0 + 120, via=0)
    assert [c.partial.window_start for c in stage2.release()[0]] == [T0 + 60]


def test_a_partition_gained_in_a_rebalance_holds_time_until_heard_from() -> None:
    stage2 = Stage2(sources=[0])
    stage2.listen_on([0])
    stage2.heartbeat(0, T0 + 60, via=0)
    assert stage2.final_through() == T0 + 60
    stage2.listen_on([0, 1])  # partition 1 may still hold partials behind that watermark
    assert stage2.final_through() == -math.inf
    stage2.heartbeat(0, T0 + 120, via=1)
    assert stage2.final_through() == T0 + 60  # the slower of the two
    stage2.listen_on([1])  # partition 0 moved to another worker
    assert stage2.final_through() == T0 + 120
    stage2.listen_on([0, 1])  # and came back: read again from its commit, so what it said is forgotten
    assert stage2.final_through() == -math.inf


def test_without_the_source_list_every_source_heard_from_holds_time() -> None:
    stage2 = Stage2()
    stage2.listen_on([0, 1])
    stage2.heartbeat(0, T0 + 60, via=0)
    stage2.heartbeat(0, T0 + 60, via=1)
    stage2.heartbeat(1, T0 + 120, via=0)  # source 1 not yet heard on partition 1
    assert stage2.final_through() == -math.inf
    stage2.heartbeat(1, T0 + 120, via=1)
    assert stage2.final_through() == T0 + 60


def test_partials_read_again_after_a_restart_are_replays_not_late() -> None:
    """A restarted stage 2 reads from its commit, pinned behind the minutes it had not evaluated:
    partials of minutes the earlier run evaluated (its saved progress) come again and are dropped
    quietly; one for a minute this run evaluated is late."""
    stage2 = Stage2(sources=[0])
    stage2.released_through = stage2.restored_through = T0 + 60  # restored from saved progress
    (replayed,) = partials(0, [(T0 + 1, {})])[0]
    stage2.add(SCOPE_DIMS, replayed, 0, T0 + 60)
    assert stage2.late_partials == 0
    (current,) = partials(0, [(T0 + 61, {})])[0]
    stage2.add(SCOPE_DIMS, current, 0, T0 + 120)
    stage2.release()
    (late,) = partials(0, [(T0 + 62, {"feature": "other"})])[0]
    stage2.add(SCOPE_DIMS, late, 0, T0 + 120)
    assert stage2.late_partials == 1


def test_partials_for_an_evaluated_minute_are_counted_late_not_added() -> None:
    stage2 = Stage2(sources=[0])
    parts, _ = partials(0, [(T0 + 1, {})])
    stage2.add(SCOPE_DIMS, parts[0], 0, T0 + 60)
    stage2.release()
    stage2.add(SCOPE_DIMS, parts[0], 0, T0 + 60)
    assert stage2.late_partials == 1


def test_where_filter_and_projection() -> None:
    parts, _ = partials(0, [(T0 + i, {"feature": "a" if i % 2 else "b", "team": "x"}) for i in range(10)])
    merged = project(parts, ("team",))
    assert merged[(T0, "x")].calls == 10
    stage2 = Stage2(sources=[0])
    for p in parts:
        stage2.add(SCOPE_DIMS, p, 0, T0 + 60)
    windows = rules({"name": "w", "metric": "calls", "scope": {"by": ["team"], "where": {"feature": "a"}},
                     "max": 1, "min_calls": 0})  # fmt: skip
    (event,) = windows.feed(*stage2.release())
    assert event.value == 5.0 and event.scope == {"team": "x"}


def _minutes(specs: list[list[dict[str, Any]]], windows: RuleWindows) -> list[Any]:
    """Feed one minute per spec list (one partition), returning every alert event."""
    stage2 = Stage2(sources=[0])
    fired: list[Any] = []
    for minute, calls in enumerate(specs):
        parts, _ = partials(0, [(T0 + minute * 60 + i * 0.1, kw) for i, kw in enumerate(calls)])
        for p in parts:
            stage2.add(SCOPE_DIMS, p, 0, T0 + (minute + 1) * 60)
        fired += windows.feed(*stage2.release())
    return fired


def test_output_length_drift_fires_on_a_reshaped_distribution_not_on_the_same_mean() -> None:
    # six steady minutes of 100..199 tokens, then a bimodal 50/250 mix: the mean stays at 150,
    # so output_tokens_avg sees nothing; PSI sees the shape change
    steady = [{"output_tokens": 100 + i} for i in range(100)]
    bimodal = [{"output_tokens": 50 if i % 2 else 250} for i in range(100)]
    windows = rules({"name": "psi", "metric": "output_tokens_psi", "scope": ["feature", "model"], "max": 0.25,
                     "min_calls": 50, "clear_for": 1})  # fmt: skip
    fired = _minutes([steady] * 6 + [bimodal, steady], windows)
    assert [(e.state, e.window_start.timestamp()) for e in fired] == [
        ("firing", T0 + 6 * 60),
        ("resolved", T0 + 7 * 60),
    ]
    assert fired[0].value > 1.0 and fired[0].scope == {"feature": "support-chat", "model": "gpt-4o"}
    assert (
        sum(c["output_tokens"] for c in bimodal) / 100 == 150 and sum(c["output_tokens"] for c in steady) / 100 == 149.5
    )


def test_a_new_snapshot_under_the_same_model_name_notifies_once() -> None:
    old = [{"model": "gpt-4o-mini", "response_model": "gpt-4o-mini-2024-07-18"}] * 20
    mixed = old[:10] + [{"model": "gpt-4o-mini", "response_model": "gpt-4o-mini-2025-10-28"}] * 10
    windows = rules({"name": "switch", "metric": "response_models_new", "scope": ["model"], "max": 0,
                     "min_calls": 1, "clear_for": 1})  # fmt: skip
    # the first three minutes only learn (a restarted worker must not call every snapshot new)
    fired = _minutes([old] * 3 + [old, mixed, mixed, old], windows)
    assert [(e.state, e.window_start.timestamp(), e.value) for e in fired] == [
        ("firing", T0 + 4 * 60, 1.0),
        ("resolved", T0 + 5 * 60, 0.0),
    ]


def test_output_length_percentiles_are_stream_metrics() -> None:
    windows = rules({"name": "p95", "metric": "output_tokens_p95", "scope": ["feature"], "max": 150,
                     "min_calls": 10})  # fmt: skip
    (event,) = _minutes([[{"output_tokens": t} for t in range(1, 201)]], windows)
    assert event.value == 0.95 * 199 + 1  # 200 values: exact (small cells keep raw values)


def test_after_a_restart_a_scope_seen_in_the_rollups_still_gets_its_silent_windows() -> None:
    windows = rules({"name": "gone", "metric": "calls", "scope": ["feature"], "absent": {"baseline": 3,
                     "min_baseline_calls": 30}, "min_calls": 0})  # fmt: skip
    rule = windows.engine.rules["gone"]
    windows.engine.seed_history(rule, {"feature": "chat"}, [(20.0, 20.0)] * 3)  # what restore reads back
    windows.resume_after(T0)
    stage2 = Stage2(sources=[0])
    parts, _ = partials(0, [(T0 + i, {"feature": "other"}) for i in range(10)])  # chat says nothing
    for p in parts:
        stage2.add(SCOPE_DIMS, p, 0, T0 + 60)
    cells, through = stage2.release()
    assert windows.feed(cells, through) == []  # without knowing chat had traffic, its silence is invisible
    windows.saw(rule, ("chat",), T0 - 60)
    parts, _ = partials(0, [(T0 + 60 + i, {"feature": "other"}) for i in range(10)])
    for p in parts:
        stage2.add(SCOPE_DIMS, p, 0, T0 + 120)
    (event,) = windows.feed(*stage2.release())
    assert (event.state, event.scope, event.value) == ("firing", {"feature": "chat"}, 0.0)


def test_a_scope_gone_quiet_is_forgotten_with_its_labels_and_alerts_come_in_scope_then_rule_order() -> None:
    windows = RuleWindows(
        AlertEngine(parse_rules({"rules": [
            {"name": "z-calls", "metric": "calls", "scope": ["feature"], "max": 0, "min_calls": 0},
            {"name": "a-calls", "metric": "calls", "scope": ["feature"], "max": 0, "min_calls": 0},
        ]}, "test").rules),
        forget_after_windows=2,
    )  # fmt: skip
    (group,) = windows._groups.values()
    stage2 = Stage2(sources=[0])
    parts, _ = partials(0, [(T0 + i, {"feature": f}) for i in range(3) for f in ("b", "a")])
    for p in parts:
        stage2.add(SCOPE_DIMS, p, 0, T0 + 60)
    events = windows.feed(*stage2.release())
    assert [(e.scope["feature"], e.rule) for e in events] == [("a", "z-calls"), ("a", "a-calls"),
                                                               ("b", "z-calls"), ("b", "a-calls")]  # fmt: skip
    assert set(group.scopes) == {("a",), ("b",)}
    for minute in range(1, 5):  # only a keeps calling
        parts, _ = partials(0, [(T0 + minute * 60, {"feature": "a"})])
        for p in parts:
            stage2.add(SCOPE_DIMS, p, 0, T0 + minute * 60 + 60)
        windows.feed(*stage2.release())
    assert set(group.scopes) == {("a",)} and set(group.seen) == {("a",)}


def test_only_the_sketches_some_rule_reads_are_published_and_decoded() -> None:
    def read(*specs: dict[str, Any]) -> tuple[bool, bool, bool]:
        base = {"scope": ["feature"], "max": 0.5}
        return sketches_read(parse_rules({"rules": [{"name": f"r{i}", **base, **s} for i, s in enumerate(specs)]},
                                         "t").rules)  # fmt: skip

    assert read({"metric": "error_rate"}) == (False, False, False)
    assert read({"metric": "latency_p95_ms"}, {"metric": "ttft_p99_ms"}) == (True, True, False)
    assert read({"metric": "output_tokens_psi"}) == (False, False, True)  # drift keeps the length distribution


def test_scopes_lost_in_a_rebalance_are_forgotten_and_their_silence_does_not_page() -> None:
    """Two features share a worker's stage 2; a rebalance hands feature b's partials partition to
    another worker midway through a 5-minute window. b's open cells, its window, its last-seen
    window and its rule states go: finishing b's window with two and a half minutes of five
    pages on half its calls, and its silence here pages "traffic stopped"."""

    def run(rebalance: bool) -> list[Any]:
        windows = rules(
            {"name": "few", "metric": "calls", "scope": ["feature"], "window": "5m", "min": 100, "min_calls": 0},
            {"name": "stopped", "metric": "calls", "scope": ["feature"], "window": "1m",
             "absent": {"baseline": 2, "min_baseline_calls": 10}, "min_calls": 0},
        )  # fmt: skip
        stage2 = Stage2(sources=[0])
        events = []
        for minute in range(3):  # 30 calls a minute each; minute 2 stays open (the watermark is mid-minute)
            parts, _ = partials(0, [(T0 + minute * 60 + i, {"feature": f}) for i in range(30) for f in ("a", "b")])
            for p in parts:
                stage2.add(("feature",), project_one(p, "feature"), 0, T0 + minute * 60 + (60 if minute < 2 else 30))
            events += windows.feed(*stage2.release())
        assert events == []
        if rebalance:

            def owns(dims: tuple[str, ...], values: tuple[str, ...]) -> bool:
                assert dims == ("feature",)
                return values == ("a",)

            assert stage2.keep_scopes(owns) == 1  # b's open minute 2
            assert windows.keep_scopes(owns) == 2  # b in each group (its 5-minute window, its 1-minute seen)
            assert {scope for _, scope in windows.engine.states} == {(("feature", "a"),)}
        for minute in range(2, 6):  # a carries on; b is someone else's now
            parts, _ = partials(0, [(T0 + minute * 60 + 30 + i, {"feature": "a"}) for i in range(30)])
            for p in parts:
                stage2.add(("feature",), project_one(p, "feature"), 0, T0 + minute * 60 + 60)
            events += windows.feed(*stage2.release())
        return events

    kept = run(rebalance=False)  # what keeping b's state would do
    assert sorted((e.rule, e.scope["feature"]) for e in kept) == [("few", "b"), ("stopped", "b")]
    assert run(rebalance=True) == []  # a's window [0, 300) holds 180 calls; b is evaluated by its new owner


def test_a_gained_partitions_replay_completes_open_windows_and_is_not_late() -> None:
    """A partition gained in a rebalance is read again from its commit, which its previous owner
    held behind its open windows (and a commit interval more). Minutes released here before the
    gain count toward windows ending after it; windows ending before it were evaluated by the
    previous owner. None of it counts as late."""
    windows = rules({"name": "many", "metric": "calls", "scope": ["feature"], "window": "5m", "max": 100,
                     "min_calls": 0})  # fmt: skip
    stage2 = Stage2(sources=[0])
    stage2.listen_on([0])
    events = []
    offset = 0
    for minute in range(7):  # feature a on input 0: 10 calls a minute; minutes 0-6 released
        parts, _ = partials(0, [(T0 + minute * 60 + i, {"feature": "a"}) for i in range(10)])
        for p in parts:
            stage2.add(("feature",), project_one(p, "feature"), 0, T0 + minute * 60 + 60, (0, offset))
            offset += 1
        events += windows.feed(*stage2.release())
    stage2.heartbeat(0, T0 + 420, 0)  # after the last batch's messages: its watermark holds
    events += windows.feed(*stage2.release())
    assert stage2.released_through == T0 + 420 and events == []  # window [0, 300) evaluated: 50 calls
    stage2.listen_on([0, 1])  # gained input 1: feature b, 30 calls a minute, minutes 3-6 replayed
    for minute in range(3, 7):
        parts, _ = partials(0, [(T0 + minute * 60 + i, {"feature": "b"}) for i in range(30)])
        for p in parts:
            stage2.add(("feature",), project_one(p, "feature"), 0, T0 + minute * 60 + 60, (1, minute))
    assert stage2.late_partials == 0
    for minute in range(7, 10):  # both carry on
        for feature, n, via in (("a", 10, 0), ("b", 30, 1)):
            parts, _ = partials(0, [(T0 + minute * 60 + i, {"feature": feature}) for i in range(n)])
            for p in parts:
                stage2.add(("feature",), project_one(p, "feature"), 0, T0 + minute * 60 + 60, (via, 100 + minute))
        events += windows.feed(*stage2.release(), stage2.take_catch_up())
    for via in (0, 1):  # the worker's heartbeat, on every partials partition
        stage2.heartbeat(0, T0 + 600, via)
    events += windows.feed(*stage2.release(), stage2.take_catch_up())
    # b's window [300, 600): minutes 5 and 6 replayed + 7, 8, 9 live = 150 calls; minutes 3 and 4
    # belong to [0, 300), which was evaluated before (by b's previous owner): not added anywhere
    assert [(e.scope, e.value, e.window_start.timestamp()) for e in events] == [({"feature": "b"}, 150.0, T0 + 300)]
    # a partial of minute 8 read now on input 1 is late (minute 8 was released after the gain)
    late = partials(0, [(T0 + 480, {"feature": "b"})])[0][0]
    stage2.add(("feature",), project_one(late, "feature"), 0, None, (1, 200))
    assert stage2.late_partials == 1
    # the replay on input 1 is over (its watermark is past the gain): minute 1 now is late too
    older = partials(0, [(T0 + 60, {"feature": "b"})])[0][0]
    stage2.add(("feature",), project_one(older, "feature"), 0, None, (1, 201))
    assert stage2.late_partials == 2


def test_a_replay_skips_windows_evaluated_before_the_gain_even_where_this_group_lags() -> None:
    """This worker's own scope went quiet at minute 4, so its 5-minute group evaluated nothing
    after [0, 300) although minutes up to 900 are released. A gained partition replays feature b's
    minutes 10-14: their window [600, 900) ended before the gain and was evaluated by b's previous
    owner. Judged by how far this group got, it would be evaluated a second time."""
    windows = rules({"name": "many", "metric": "calls", "scope": ["feature"], "window": "5m", "max": 100,
                     "min_calls": 0})  # fmt: skip
    stage2 = Stage2(sources=[0])
    stage2.listen_on([0])
    events = []
    for minute in range(5):
        parts, _ = partials(0, [(T0 + minute * 60 + i, {"feature": "a"}) for i in range(10)])
        stage2.add(("feature",), project_one(parts[0], "feature"), 0, T0 + minute * 60 + 60, (0, minute))
    stage2.heartbeat(0, T0 + 900, 0)  # quiet since: the idle watermark moves on
    events += windows.feed(*stage2.release())
    assert stage2.released_through == T0 + 900 and events == []
    stage2.listen_on([0, 1])
    for minute in range(10, 15):
        parts, _ = partials(0, [(T0 + minute * 60 + i, {"feature": "b"}) for i in range(30)])
        stage2.add(("feature",), project_one(parts[0], "feature"), 0, T0 + minute * 60 + 60, (1, minute))
    for via in (0, 1):
        stage2.heartbeat(0, T0 + 960, via)
    events += windows.feed(*stage2.release(), stage2.take_catch_up())
    assert events == [] and stage2.late_partials == 0


def test_a_restored_budget_owned_elsewhere_announces_nothing() -> None:
    budget = parse_rules({"rules": [], "budgets": [{"name": "cx", "scope": {"team": "cx"}, "period": "day",
                                                    "limit_usd": 1.0, "warn_at": [0.5]}]}, "test").budgets  # fmt: skip
    tracker = BudgetTracker(budget)
    tracker.seed("cx", T0 - T0 % 86400, 0.9)  # restored: over 50% of $1, not announced yet
    assert tracker.keep(lambda dims, values: False) == []  # its partials partition is another worker's
    tracker.seed("cx", T0 - T0 % 86400, 0.9)  # as a restart's restore would, before the first assignment
    assert tracker.feed([], T0) == []  # the owner announces; this one would have too
    (gained,) = tracker.keep(lambda dims, values: (dims, values) == (("team",), ("cx",)))
    assert gained.name == "cx"
    tracker.seed("cx", T0 - T0 % 86400, 0.9)
    assert [e.extra["threshold"] for e in tracker.feed([], T0)] == [0.5]


def project_one(p: WindowPartial, dim: str) -> WindowPartial:
    """A full-grain partial onto one dimension, as stage 1 publishes it for a rule scoped by it."""
    ((_, *_values), merged), *rest = project([p], (dim,)).items()
    assert not rest
    return merged
