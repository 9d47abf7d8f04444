"""What a restarted evaluator learns from the rollups (the real engine): absence baselines keep
their silent windows and leave out a silence still going on."""

from __future__ import annotations

from typing import Any

import orjson

from llmpulse.runtime import EmbeddedRuntime
from schemas.rules import parse_rules
from sinks.alert_store import AlertStore
from tests.conftest import NOW, batch, call, iso

START = NOW - NOW % 3600 - 6 * 3600  # six hours before NOW, on an hour boundary


def test_absence_history_has_zeros_for_silent_windows_and_stops_at_the_last_call(settings: Any, conn: Any) -> None:
    events = []
    for w in range(6):  # six 10-minute windows
        events += [call(feature="steady", ts=iso(START + w * 600 + i)) for i in range(10)]
        if w % 2 == 0:
            events += [call(feature="bursty", ts=iso(START + w * 600 + i)) for i in range(30)]
    events += [call(feature="stopped", ts=iso(START + w * 600 + i)) for w in range(3) for i in range(5)]
    # two six-call agent runs per window (a trace each, in one conversation) and a lone call
    events += [call(feature="agents", ts=iso(START + w * 600 + run * 60 + i), conversation_id=f"c{w}",
                    trace_id=f"run-{w}-{run}") for w in range(6) for run in range(2) for i in range(6)]  # fmt: skip
    events += [call(feature="agents", ts=iso(START + w * 600 + 300)) for w in range(6)]
    runtime = EmbeddedRuntime(settings, conn)
    runtime.ingest(batch([orjson.dumps(e) for e in events]), now=NOW)
    runtime.finish()
    runtime.close()
    rule = parse_rules({"rules": [{"name": "gone", "metric": "calls", "scope": ["feature"], "window": "10m",
                                   "absent": {"baseline": 6, "min_baseline_calls": 30}, "min_calls": 0}]},
                       "test").rules[0]  # fmt: skip
    history = AlertStore(conn).recent_values(rule, START + 6 * 600, 6)
    # (calls, active flows): a call without a flow is its own, as the stream counts them
    assert history[("steady",)] == [(10.0, 10.0)] * 6
    assert history[("agents",)] == [(13.0, 3.0)] * 6
    # bursty: its quiet windows are zeros (the rollups have no row for them), the last one dropped
    # as a silence still going on
    assert history[("bursty",)] == [(30.0, 30.0), (0.0, 0.0), (30.0, 30.0), (0.0, 0.0), (30.0, 30.0)]
    assert history[("stopped",)] == [(5.0, 5.0)] * 3  # silent for its last three windows: the outage


def test_an_incident_fired_and_resolved_in_one_insert_is_not_restored_as_firing(settings: Any, conn: Any) -> None:
    """A worker catching up writes a firing and its resolve in one insert, with one emitted_at: the
    latest state is the later window's, whatever order the rows are in."""
    from datetime import UTC, datetime, timedelta

    from processors.alerts.events import AlertEvent

    t0 = datetime.fromtimestamp(START, UTC)

    def event(key: str, state: str, minute: int, started: int) -> AlertEvent:
        return AlertEvent(key, "err-high", state, "warning", "notify", "error_rate", 0.5, "error_rate > 0.2",  # type: ignore[arg-type]
                          {"feature": key}, {}, t0 + timedelta(minutes=minute - 1), t0 + timedelta(minutes=minute),
                          t0 + timedelta(minutes=started),
                          t0 + timedelta(minutes=minute) if state == "resolved" else None,
                          f"[warning] {key}")  # fmt: skip

    store = AlertStore(conn)
    store.write([event("k-resolved", "resolved", 14, 12), event("k-resolved", "firing", 12, 12),
                 event("k-firing", "firing", 20, 20),
                 event("k-again", "firing", 10, 10), event("k-again", "resolved", 13, 10),
                 event("k-again", "firing", 30, 30)])  # fmt: skip
    assert sorted(e.dedup_key for e in store.firing()) == ["k-again", "k-firing"]
    (again,) = [e for e in store.firing() if e.dedup_key == "k-again"]
    assert again.started_at == t0 + timedelta(minutes=30)
