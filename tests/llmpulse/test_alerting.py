"""Alerting wired to the real ClickHouse engine: delivery, restart, budgets, and the backtest."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from llmpulse.alerting import AlertPipeline
from llmpulse.backtest import backtest
from llmpulse.runtime import EmbeddedRuntime
from processors.alerts.budgets import period_bounds
from processors.records import Source
from schemas.channels import AlertmanagerChannelConfig, WebhookChannelConfig
from schemas.rules import parse_rules
from sinks.alert_store import AlertStore
from tests.conftest import batch, call, iso
from tests.llmpulse.test_worker import Receiver

RULES = {
    "rules": [
        {"name": "errors-high", "metric": "error_rate", "scope": ["model"], "window": "5m", "max": 0.25,
         "min_calls": 20, "severity": "critical", "runbook_url": "https://runbooks.example/errors"},
    ],
    "budgets": [{"name": "cx-daily", "scope": {"team": "cx"}, "period": "day", "limit_usd": 1.0,
                 "warn_at": [0.5, 1.0]}],
}  # fmt: skip


def traffic(start: float, minutes: int, error_every: int | None, prefix: str) -> list[bytes]:
    """30 calls a minute of gpt-4o (1,000 in / 200 out: $0.0045 each), failing 1 in ``error_every``."""
    out = []
    for m in range(minutes):
        for i in range(30):
            failed = error_every is not None and i % error_every == 0
            out.append(orjson.dumps(call(event_id=f"{prefix}-{m}-{i}", ts=iso(start + m * 60 + i),
                                         status="error" if failed else "ok")))  # fmt: skip
    return out


def run(settings: Any, conn: Any, payloads: list[bytes], alerts: AlertPipeline, now: float) -> None:
    runtime = EmbeddedRuntime(settings, conn, alerts=alerts)
    runtime.ingest(batch(payloads, Source("test", "alerting"), digest=str(now)), now=now, mixed=False)
    runtime.finish()
    runtime.close()


def test_alert_delivery_restart_and_budget_on_the_real_engine(settings: Any, conn: Any) -> None:
    receiver = Receiver()
    hook = WebhookChannelConfig(name="hook", type="webhook", url=receiver.url)
    rules = parse_rules(RULES, "test")
    # yesterday noon: the budget's day holds all 30 minutes of traffic whenever this runs (an hour
    # before the wall clock, it straddled UTC midnight in runs between 00:30 and 01:00: two budget days)
    day, _ = period_bounds("day", time.time())
    start = day - 86400 + 12 * 3600
    now = start + 3600
    alerts = AlertPipeline(settings, conn, rules=rules, channels=[hook])
    # 10 healthy minutes, then 10 minutes where 1 in 2 calls fail
    run(settings, conn, traffic(start, 10, None, "ok") + traffic(start + 600, 10, 2, "bad"), alerts, now)
    alerts.close()
    deadline = time.time() + 10
    while not receiver.received and time.time() < deadline:
        time.sleep(0.05)
    kinds = [(b["rule"], b["state"]) for _, b in receiver.received]
    assert kinds.count(("errors-high", "firing")) == 1
    fired = next(b for _, b in receiver.received if b["rule"] == "errors-high")
    assert fired["scope"] == {"model": "gpt-4o"} and fired["value"] == 0.5
    assert fired["window_start"].startswith(iso(start + 600)[:16])  # the first bad window
    # budget: 600 calls × $0.0045 = $2.70 ≥ 100% of $1 — both thresholds announced once
    budget = sorted(b["extra"]["threshold"] for _, b in receiver.received if b["rule"] == "cx-daily")
    assert budget == [0.5, 1.0]
    stored = conn.client.query("SELECT rule, state FROM alerts ORDER BY rule").result_rows
    assert stored == [("cx-daily", "firing"), ("cx-daily", "firing"), ("errors-high", "firing")]

    # a restart: the incident is restored (not paged again) and the budget knows what it announced
    restarted = AlertPipeline(settings, conn, rules=rules, channels=[hook])
    firing = restarted.restore(now=now)
    assert [e.rule for e in firing] == ["errors-high"]
    more = traffic(start + 1200, 10, 2, "more")
    run(settings, conn, more, restarted, now)
    restarted.close()
    time.sleep(0.5)
    receiver.close()
    assert [(b["rule"], b["state"]) for _, b in receiver.received].count(("errors-high", "firing")) == 1
    assert len([b for _, b in receiver.received if b["rule"] == "cx-daily"]) == 2


def test_backtest_finds_what_the_stream_found(settings: Any, conn: Any) -> None:
    rules = parse_rules({"rules": RULES["rules"]}, "test")
    now = time.time()
    start = now - now % 300 - 7200
    alerts = AlertPipeline(settings, conn, rules=rules, channels=[])
    payloads = traffic(start, 15, None, "a") + traffic(start + 900, 15, 2, "b") + traffic(start + 1800, 15, None, "c")
    run(settings, conn, payloads, alerts, now)
    alerts.close()
    streamed = [(e.state, e.window_end.timestamp()) for e in alerts.delivered]
    result = backtest(AlertStore(conn), rules, start, start + 2700)
    replayed = [
        (i.fired_at.timestamp(), i.resolved_at.timestamp() if i.resolved_at else None) for i in result.incidents
    ]
    assert streamed == [("firing", start + 1200), ("resolved", start + 2100)]
    assert replayed == [(start + 1200, start + 2100)]


def test_flow_latency_rule_agrees_with_the_flows_query(settings: Any, conn: Any) -> None:
    """Perceived latency of agent runs, in the stream (an alert rule) and in SQL (flows_by_feature)."""
    from sinks import queries

    now = time.time()
    start = now - now % 3600 - 7200  # two hours ago, on an hour boundary
    payloads, perceived = [], []
    for k in range(20):  # runs of 2..6 steps, 3 s apart, 2 s each: 5, 8, 11, 14, 17 s perceived
        steps = k % 5 + 2
        for i in range(steps):
            payloads.append(orjson.dumps(call(feature="agent", trace_id=f"run-{k}", latency_ms=2000.0,
                                              ts=iso(start + k * 120 + i * 3))))  # fmt: skip
        perceived.append((steps - 1) * 3000.0 + 2000.0)
    payloads.append(orjson.dumps(call(feature="agent", ts=iso(start + 3600 + 600))))  # closes the hour
    rules = parse_rules({"rules": [{"name": "slow-agents", "metric": "flow_perceived_p95_ms", "scope": ["feature"],
                                    "window": "1h", "max": 10_000, "min_calls": 10},
                                   {"name": "needs-21-flows", "metric": "flow_perceived_p95_ms", "scope": ["feature"],
                                    "window": "1h", "max": 10_000, "min_calls": 21}]}, "test")  # fmt: skip
    alerts = AlertPipeline(settings, conn, rules=rules, channels=[])
    run(settings, conn, payloads, alerts, now)
    alerts.close()
    fired = conn.client.query("SELECT value, extra FROM alerts WHERE rule = 'slow-agents' AND state = 'firing'")
    ((value, extra),) = fired.result_rows
    exact = sorted(perceived)
    pos = 0.95 * (len(exact) - 1)  # 20 flows: a small cell answers exactly, interpolating
    assert value == exact[int(pos)] + (exact[int(pos) + 1] - exact[int(pos)]) * (pos - int(pos))
    assert orjson.loads(extra)["calls"] == 80
    unfired = conn.client.query("SELECT count() FROM alerts WHERE rule = 'needs-21-flows'").result_rows
    assert unfired == [(0,)]  # min_calls counts finished flows for flow metrics: 20 < 21, though 80 calls
    (row,) = queries.run(conn.client, "flows_by_feature", start=start, end=start + 3600)
    assert (row["feature"], row["flows"], row["calls_per_flow"]) == ("agent", 20, 4.0)
    assert row["perceived_p95_ms"] == 17_000 and abs(value - row["perceived_p95_ms"]) <= 0.05 * value


def test_progress_is_saved_once_a_minute_and_a_restart_resumes_from_it(settings: Any, conn: Any) -> None:
    """A save per watermark move was an insert ten times a second; a restart floors to the minute anyway."""
    rules = parse_rules({"rules": [{"name": "calls", "metric": "calls", "scope": ["feature"], "max": 1e9}]}, "t")
    alerts = AlertPipeline(settings, conn, rules=rules, channels=[], progress_key="group-a")
    saved = []
    for through in (600.0, 612.5, 659.9, 660.0, 661.0, 780.5):
        alerts.stage2.released_through = through
        saved.append(alerts.save_progress())
    assert saved == [True, False, False, True, False, True]
    assert conn.client.command("SELECT count() FROM llmpulse_meta WHERE key = 'alerts_evaluated_through:group-a'") == 3
    restarted = AlertPipeline(settings, conn, rules=rules, channels=[], progress_key="group-a")
    restarted.restore()
    assert restarted.stage2.released_through == 780.5
    (group,) = restarted.windows._groups.values()
    assert group.done == 780  # the 12:00 minute was evaluated; 13:00 is next


def test_a_restart_reads_drift_baselines_back_from_the_rollups(settings: Any, conn: Any) -> None:
    """Drift memories start empty in a new process; refilled from the rollups, a reshaped output
    length (feature/model scope: served_models_1m) and a snapshot switch (team scope: raw calls)
    in the first window after a restart still page, where an empty memory learns for 3 windows."""
    now = time.time()
    start = now - now % 60 - 3600

    def minute(m: int, tokens: list[int], snapshot: str, tag: str) -> list[bytes]:
        return [orjson.dumps(call(event_id=f"{tag}-{m}-{i}", ts=iso(start + m * 60 + i * 0.5), output_tokens=t,
                                  response_model=snapshot)) for i, t in enumerate(tokens)]  # fmt: skip

    steady = [100 + i for i in range(100)]
    bimodal = [50 if i % 2 else 250 for i in range(100)]  # the same mean, another shape
    runtime = EmbeddedRuntime(settings, conn)
    history = [p for m in range(6) for p in minute(m, steady, "gpt-4o-2024-08-06", "before")]
    runtime.ingest(batch(history, Source("test", "drift")), now=now, mixed=False)
    runtime.finish()
    runtime.close()
    rules = parse_rules({"rules": [
        {"name": "psi", "metric": "output_tokens_psi", "scope": ["feature", "model"], "max": 0.25, "min_calls": 50},
        {"name": "switch", "metric": "response_models_new", "scope": ["team"], "max": 0, "min_calls": 1},
    ]}, "test")  # fmt: skip
    fired = {}
    for restored in (True, False):
        alerts = AlertPipeline(settings, conn, rules=rules, channels=[])
        if restored:
            alerts.restore(now=start + 6 * 60 + 1)
        after = minute(6, bimodal, "gpt-4o-2024-11-20", f"after-{restored}")
        run(settings, conn, after, alerts, now)
        alerts.close()
        fired[restored] = sorted((e.rule, e.state, e.window_start.timestamp(), e.value) for e in alerts.delivered)
    (psi_fired, switch_fired) = fired[True]
    assert psi_fired[:3] == ("psi", "firing", start + 360) and psi_fired[3] > 1.0
    assert switch_fired == ("switch", "firing", start + 360, 1.0)
    assert fired[False] == []  # the same window with an empty memory: still learning


def test_a_trace_that_goes_quiet_splits_into_two_flows_in_the_stream_and_in_sql(settings: Any, conn: Any) -> None:
    """An agent run that waits 55 s (idle gap 30 s) between its second and third step: the stream
    closes the first flow while it waits, so the SQL counts two flows as well, not one."""
    from sinks import queries

    now = time.time()
    start = now - now % 3600 - 7200
    steps = (0.0, 3.0, 60.0, 63.0)  # 2 s each: 0-5 s, then 60-65 s
    payloads = [orjson.dumps(call(feature="agent", trace_id="run-1", latency_ms=2000.0, ts=iso(start + 600 + t)))
                for t in steps]  # fmt: skip
    payloads.append(orjson.dumps(call(feature="agent", ts=iso(start + 3600 + 600))))  # closes the hour
    rules = parse_rules({"rules": [{"name": "flow-count", "metric": "flows", "scope": ["feature"], "window": "1h",
                                    "max": 0, "min_calls": 1}]}, "test")  # fmt: skip
    alerts = AlertPipeline(settings, conn, rules=rules, channels=[])
    run(settings, conn, payloads, alerts, now)
    alerts.close()
    (event,) = [e for e in alerts.delivered if e.state == "firing"]
    assert event.value == 2.0
    (row,) = queries.run(conn.client, "flows_by_feature", start=start, end=start + 3600)
    assert (row["feature"], row["flows"], row["calls_per_flow"], row["perceived_p50_ms"]) == ("agent", 2, 2.0, 5000)


def test_unpriced_calls_are_no_evidence_and_no_cost_in_sql_as_in_the_stream(settings: Any, conn: Any) -> None:
    """Three priced agent runs and one with a step on a model without a price: cost per flow is over
    the priced runs in the stream and in ``flows_by_feature``, and a cost-per-call rule (in the
    stream, its baseline and the backtest) counts the 11 calls with a cost as its evidence, not all 12."""
    from sinks import queries

    now = time.time()
    start = now - now % 3600 - 5 * 3600  # an hour no other test here writes
    payloads = []
    for k in range(4):
        for i in range(3):
            model = "acme-llm-9" if (k, i) == (3, 2) else "gpt-4o"
            payloads.append(orjson.dumps(call(feature="agent-costs", trace_id=f"cost-run-{k}", model=model,
                                              ts=iso(start + k * 300 + i * 3))))  # fmt: skip
    payloads.append(orjson.dumps(call(feature="agent-costs", ts=iso(start + 3600 + 600))))  # closes the hour
    per_call = (1000 * 2.5 + 200 * 10) / 1e6  # gpt-4o, 1,000 in / 200 out: $0.0045
    rules = parse_rules({"rules": [
        {"name": "flow-cost", "metric": "flow_cost_usd_avg", "scope": ["feature"], "window": "1h", "max": 0,
         "min_calls": 1},
        {"name": "call-cost", "metric": "cost_per_call_usd", "scope": ["feature"], "window": "1h", "max": 0,
         "min_calls": 12},
    ]}, "test")  # fmt: skip
    alerts = AlertPipeline(settings, conn, rules=rules, channels=[])
    run(settings, conn, payloads, alerts, now)
    alerts.close()
    fired = {e.rule: e for e in alerts.delivered if e.state == "firing" and e.scope == {"feature": "agent-costs"}}
    assert fired["flow-cost"].value == pytest.approx(3 * per_call)  # (3 runs x 3 calls) / 3 runs, not / 4
    assert "call-cost" not in fired  # 11 priced calls < min_calls 12, though the hour had 12 calls
    (row,) = [r for r in queries.run(conn.client, "flows_by_feature", start=start, end=start + 3600)
              if r["feature"] == "agent-costs"]  # fmt: skip
    assert (row["flows"], row["flows_without_cost"]) == (4, 1)
    assert row["cost_per_flow_usd"] == pytest.approx(3 * per_call)
    store = AlertStore(conn)
    windows = store.window_values(rules.rules[1], start, start + 3600)
    assert windows[int(start)][("agent-costs",)] == (pytest.approx(per_call), 11.0)  # (cost per call, priced calls)
    only = {"by": ["feature"], "where": {"feature": "agent-costs"}}
    lax = parse_rules({"rules": [{"name": "call-cost", "metric": "cost_per_call_usd", "scope": only, "window": "1h",
                                  "max": 0, "min_calls": 11}]}, "test")  # fmt: skip
    (incident,) = backtest(store, lax, start, start + 3600).incidents
    assert incident.value == pytest.approx(per_call)  # 11 priced calls are evidence enough for 11
    strict = parse_rules({"rules": [{"name": "call-cost", "metric": "cost_per_call_usd", "scope": only,
                                     "window": "1h", "max": 0, "min_calls": 12}]}, "test")  # fmt: skip
    assert backtest(store, strict, start, start + 3600).incidents == []


def test_stage2_merges_a_partials_message_once_though_a_rebalance_reads_it_again(settings: Any, conn: Any) -> None:
    """After a rebalance the consumer starts every assigned partition again from its committed
    offset, which stage 2 pins behind the minutes it has not evaluated: those messages come
    twice, and the second reading must not add to the open minutes again."""
    from processors.chain import CallPipeline
    from schemas.prices import builtin_price_table
    from sinks.kafka import partial_messages
    from tests.conftest import NOW

    pipe = CallPipeline(builtin_price_table(), partition=0)
    start = NOW - NOW % 60 - 600
    out = pipe.process(batch([orjson.dumps(call(ts=iso(start + i))) for i in range(30)]), NOW)
    messages = partial_messages(pipe.flush_windows(), [("model",)], 0, start + 60)
    wire = [(0, offset, value) for offset, (_, value) in enumerate(messages)]
    heartbeat = orjson.dumps({"type": "watermark", "partition": 0, "watermark": start + 60})  # after the batch
    alerts = AlertPipeline(settings, conn, rules=parse_rules({"rules": []}, "test"), sources=[0], channels=[])
    alerts.stage2.listen_on([0])
    assert alerts.on_wire(wire) == len(wire) == 1
    assert alerts.on_wire(wire) == 0  # the same offsets again: skipped
    assert alerts.on_wire([(0, 1, b"{not json"), (0, 2, orjson.dumps({"type": "partial"}))]) == 0
    assert alerts.bad_messages == 2  # logged and skipped, and what follows in the fetch is still read
    alerts.on_wire([(0, 3, heartbeat)])
    (cell,), through = alerts.stage2.release()
    assert through == start + 60 and cell.partial.calls == len(out.events) == 30
    alerts.close()


def test_a_rebalance_hands_scopes_over_with_their_firing_alerts_and_budgets(settings: Any, conn: Any) -> None:
    """Stage 2 in the worker owns the scopes whose partials partition it is assigned. The first
    assignment restores only those; a gained partition brings its scopes' firing alerts and
    budgets back from ClickHouse (no second page, and the new owner can resolve them), all or
    nothing; a lost one takes them away. Alertmanager hears of exactly the alerts owned."""
    day, _ = period_bounds("day", time.time())
    start = day - 86400 + 12 * 3600  # yesterday noon: the budget's day holds all of it
    now = start + 1200
    payloads = [
        orjson.dumps(
            call(
                event_id=f"{model}-{m}-{i}",
                ts=iso(start + m * 60 + i),
                model=model,
                team=team,
                status="error" if i % 2 else "ok",
            )
        )
        for model, team in (("gpt-4o", "cx"), ("gpt-4o-mini", "ml"))
        for m in range(10)
        for i in range(30)
    ]
    rules = parse_rules(RULES, "test")
    first = AlertPipeline(settings, conn, rules=rules, channels=[])
    run(settings, conn, payloads, first, now)
    first.close()
    assert sorted(e.scope["model"] for e in first.delivered if e.rule == "errors-high") == ["gpt-4o", "gpt-4o-mini"]

    # the partials partition of each scope key, as the producer's partitioner would place them
    placed = {"model=gpt-4o": 0, "model=gpt-4o-mini": 1, "team=cx": 1}
    receiver = Receiver()  # an Alertmanager: it keeps an alert open while someone re-announces it
    manager = AlertmanagerChannelConfig(name="am", type="alertmanager", urls=[receiver.url], resend_interval_s=0.1)
    worker = AlertPipeline(settings, conn, rules=rules, channels=[manager])  # as the worker builds it

    def announced() -> list[str]:
        """The models of the firing alerts in the next re-announcement."""
        since = time.time()
        deadline = since + 5
        while time.time() < deadline:
            fresh = [body for t, body in list(receiver.received) if t > since + 0.05]
            if fresh:
                return sorted(a["labels"]["model"] for a in fresh[-1] if a["labels"]["alertname"] == "errors-high")
            time.sleep(0.02)
        return []

    def firing() -> list[str]:
        return sorted(dict(scope)["model"] for _, scope, _ in worker.engine.firing())

    def spent() -> float:
        (budget,) = rules.budgets
        return worker.budgets.status(budget, now).spent_usd if budget.name in worker.budgets.owned else -1.0

    worker.on_wire([(1, 5, b"{}")])  # something read on partition 1 (skipped as unreadable)
    worker.assign([0], placed.__getitem__, now=now)  # the first assignment restores its own scopes only
    assert firing() == ["gpt-4o"] and spent() == -1.0  # cx's budget is partition 1's owner's
    assert announced() == ["gpt-4o"]  # gpt-4o-mini's is its owner's to keep open, or to resolve
    assert worker.assign([0], placed.__getitem__, now=now) == 0  # the same assignment again: nothing to do
    real = worker.store.period_spend

    def unreachable(*args: Any) -> Any:
        raise ConnectionError("ClickHouse is restarting")

    worker.store.period_spend = unreachable  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):  # gained partition 1, but its scopes cannot be read back
        worker.assign([0, 1], placed.__getitem__, now=now)
    assert worker.stage2.inputs == {0} and firing() == ["gpt-4o"]  # nothing changed: the next step retries
    worker.store.period_spend = real  # type: ignore[method-assign]
    worker.assign([0, 1], placed.__getitem__, now=now)
    assert firing() == ["gpt-4o", "gpt-4o-mini"]  # taken over firing: a recovery resolves it, no second page
    assert spent() == pytest.approx(300 * 0.0045)  # $0.0045 a call of gpt-4o (1,000 in, 200 out)
    assert announced() == ["gpt-4o", "gpt-4o-mini"]  # its own as well as the one taken over
    heartbeat = orjson.dumps({"type": "watermark", "partition": 0, "watermark": now})
    worker.on_wire([(0, 0, heartbeat), (1, 5, heartbeat)])  # offset 5 again: read, since partition 1 left
    assert worker.stage2.watermarks == {0: now}  # heard on both inputs
    worker.assign([1], placed.__getitem__, now=now)  # lost partition 0
    assert firing() == ["gpt-4o-mini"] and announced() == ["gpt-4o-mini"]
    worker.assign([], placed.__getitem__, now=now)  # holds none (more workers than partitions)
    assert firing() == []
    # later it gets partitions again: restored as at a start, from the group's saved progress
    worker.stage2.released_through = now - 3600  # evaluation here stood still meanwhile
    worker.store.conn.client.insert(f"{worker.store.conn.database}.llmpulse_meta",
                                    [["alerts_evaluated_through:group", repr(float(now))]],
                                    column_names=["key", "value"])  # fmt: skip
    worker.progress_key = "alerts_evaluated_through:group"
    worker.assign([0, 1], placed.__getitem__, now=now)
    assert firing() == ["gpt-4o", "gpt-4o-mini"] and worker.stage2.released_through == now
    worker.close()
    receiver.close()

    # restore() (a stage 2 owning every scope) reads every scope back; an assignment then keeps its own
    restored = AlertPipeline(settings, conn, rules=rules, channels=[])
    assert sorted(e.scope["model"] for e in restored.restore(now=now) if e.rule == "errors-high") == [
        "gpt-4o", "gpt-4o-mini"]  # fmt: skip
    restored.assign([1], placed.__getitem__, now=now)
    assert sorted(dict(scope)["model"] for _, scope, _ in restored.engine.firing()) == ["gpt-4o-mini"]
    restored.close()


def test_evaluation_holds_the_commit_behind_an_open_rule_window(settings: Any, conn: Any) -> None:
    """The worker commits partials offsets below ``pinned_offsets``: while a 5-minute window is
    open, below its first minute's partials, so a restart or a new owner evaluates it whole."""
    from processors.chain import CallPipeline
    from schemas.prices import builtin_price_table
    from sinks.kafka import partial_messages
    from tests.conftest import NOW

    rules = parse_rules({"rules": [{"name": "busy", "metric": "calls", "scope": ["model"], "window": "5m",
                                    "max": 1000}]}, "test")  # fmt: skip
    alerts = AlertPipeline(settings, conn, rules=rules, sources=[0], channels=[])
    alerts.assign([0], lambda key: 0)
    start = NOW - NOW % 300 - 600
    pipe = CallPipeline(builtin_price_table(), partition=0)
    for minute in range(6):
        pipe.process(batch([orjson.dumps(call(ts=iso(start + minute * 60 + i))) for i in range(5)]), NOW)
        (message,) = partial_messages(pipe.flush_windows(), [("model",)], 0, start + minute * 60 + 60)
        heartbeat = orjson.dumps({"type": "watermark", "partition": 0, "watermark": start + minute * 60 + 60})
        alerts.on_wire([(0, 2 * minute, message[1]), (0, 2 * minute + 1, heartbeat)])
        alerts.evaluate()
        if minute < 4:  # minutes 0-3 released, window [start, start + 300) open: held at minute 0
            assert alerts.stage2.pinned_offsets() == {0: 0}
    assert alerts.stage2.pinned_offsets() == {0: 10}  # the window closed; minute 5 opens the next
    alerts.close()


def test_pipeline_lag_is_evaluated_by_one_stage_2_of_the_group(settings: Any, conn: Any) -> None:
    """Every stage 2 sees every source's watermark, so each one evaluating the lag rule under the
    one alert identity let a worker that restored another's lag page resolve it while the other
    kept re-opening it. The owner of the group-wide scope's partials partition evaluates it; a
    worker that loses that partition forgets the rule's state, and one holding none keeps none."""
    lag = {"name": "lagging", "metric": "pipeline_lag_s", "max": 60}  # min_calls (default 20) does not apply
    busy = {"name": "busy", "metric": "calls", "scope": ["model"], "max": 10}
    rules = parse_rules({"rules": [lag, busy]}, "test")

    def placed(key: str) -> int:  # the group-wide scope (key "") on partition 1, gpt-4o's on 0
        return 0 if key == "model=gpt-4o" else 1

    now = time.time()
    workers = [AlertPipeline(settings, conn, rules=rules, sources=[0], channels=[]) for _ in range(2)]
    for w, partitions in zip(workers, ([1], [0]), strict=True):
        w.assign(partitions, placed)
        for p in partitions:
            w.stage2.heartbeat(0, now - 600, p)  # ten minutes behind, and both see it
    owner, other = workers
    (paged,) = owner.check_lag(now)
    assert (paged.rule, paged.extra["calls"]) == ("lagging", None)  # measured, not counted: no call count
    assert other.check_lag(now) == []
    assert [name for name, _, _ in other.engine.firing()] == []

    owner.assign([0], placed)  # the group-wide scope moved away: its lag state goes with it
    assert [name for name, _, _ in owner.engine.firing()] == []
    assert owner.check_lag(now) == []
    other.assign([0, 1], placed)
    other.engine.restore_firing("lagging", {}, now)
    other.engine.restore_firing("busy", {"model": "gpt-4o"}, now)
    other.assign([0], placed)
    assert [name for name, _, _ in other.engine.firing()] == ["busy"]
    other.assign([], placed)
    assert other.engine.firing() == []
    for w in workers:
        w.close()


def test_an_absence_backtest_past_the_raw_retention_says_where_it_starts(settings: Any, conn: Any) -> None:
    """Absence reads the raw calls' flows; before the retention it would see only silence."""
    rules = parse_rules({"rules": [{"name": "gone", "metric": "calls", "scope": ["feature"], "window": "10m",
                                    "absent": {"baseline": 6}, "min_calls": 0},
                                   {"name": "errors", "metric": "error_rate", "scope": ["feature"], "window": "10m",
                                    "max": 0.5}]}, "test")  # fmt: skip
    start = 1_795_000_200.0  # a ten-minute boundary
    result = backtest(AlertStore(conn), rules, start, start + 7200, raw_since=start + 1000)
    assert result.shortened == {"gone": "evaluated from 2026-11-18 11:30 UTC on: absence reads the raw calls, "
                                         "kept for the raw retention period"}  # fmt: skip
