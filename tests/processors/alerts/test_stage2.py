"""Stage 2: partials from several partitions add up before a rule sees them; silence is a window too."""

from __future__ import annotations

from typing import Any

import msgspec

from processors.alerts.engine import AlertEngine
from processors.alerts.stage2 import RuleWindows, Stage2
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
    agg = WindowAggregator(60, 0, partition=partition)
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
