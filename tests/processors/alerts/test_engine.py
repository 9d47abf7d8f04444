"""The alert state machine on hand-built window sequences: exact firing and resolving points."""

from __future__ import annotations

from typing import Any

import pytest

from processors.alerts.engine import AlertEngine, dedup_key
from processors.alerts.events import AlertEvent
from schemas.rules import Rule, parse_rules


def rule(**kw: Any) -> Rule:
    base: dict[str, Any] = {"name": "r", "metric": "ttft_p95_ms", "scope": ["feature"], "window": "1m", "min_calls": 10}
    base.update(kw)
    return parse_rules({"rules": [base]}, "test").rules[0]


def run(r: Rule, values: list[float | None], calls: int = 100, scope: dict[str, str] | None = None,
        engine: AlertEngine | None = None) -> list[tuple[int, AlertEvent]]:  # fmt: skip
    engine = engine or AlertEngine([r])
    out = []
    for i, v in enumerate(values):
        metrics = {"calls": float(calls), "eval_count": float(calls), "feedback_count": float(calls), r.metric: v}
        event = engine.evaluate(r, scope or {"feature": "chat"}, i * 60.0, (i + 1) * 60.0, metrics)
        if event is not None:
            out.append((i, event))
    return out


def test_ttft_limit_with_for_3_fires_once_at_the_fourth_window() -> None:
    r = rule(max=850, **{"for": 3})
    events = run(r, [790, 910, 930, 905])
    assert [(i, e.state) for i, e in events] == [(3, "firing")]
    (_, e) = events[0]
    assert e.value == 905 and e.action == "rollback" and e.metric == "ttft_p95_ms"
    assert e.condition == "ttft_p95_ms > 850 for 3 windows (1m windows)"
    assert e.dedup_key == dedup_key("r", {"feature": "chat"})
    # more breaching windows do not page again
    assert [i for i, _ in run(r, [790, 910, 930, 905, 990, 1200, 900])] == [3]


def test_a_value_hovering_at_the_limit_does_not_flap() -> None:
    r = rule(max=850, hysteresis=0.05, clear_for=2)
    values = [900, 845, 860, 840, 855, 849, 700, 690]  # 845/840/849 are inside, but not 5% inside
    assert [(i, e.state) for i, e in run(r, values)] == [(0, "firing"), (7, "resolved")]


def test_cooldown_holds_back_a_refire_and_resolve_carries_the_incident() -> None:
    r = rule(max=850, cooldown="5m", hysteresis=0.0)
    events = run(r, [900, 700, 900, 900, 900, 900, 900, 900])
    assert [(i, e.state) for i, e in events] == [(0, "firing"), (1, "resolved"), (6, "firing")]
    fired, resolved = events[0][1], events[1][1]
    assert resolved.started_at == fired.started_at and resolved.ended_at is not None
    assert resolved.dedup_key == fired.dedup_key


def test_min_calls_windows_carry_no_evidence() -> None:
    r = rule(max=850, **{"for": 2})
    engine = AlertEngine([r])
    assert run(r, [900], calls=5, engine=engine) == []  # too few calls: not even pending
    assert engine.state(r, {"feature": "chat"}).state == "ok"
    assert [i for i, _ in run(r, [900, 900, None], calls=50)] == [1]


def test_quality_breach_pauses_for_review_latency_breach_rolls_back() -> None:
    quality = rule(name="eval", metric="eval_score", min=0.8)
    latency = rule(name="lat", metric="latency_p95_ms", max=2000)
    ((_, q),) = run(quality, [0.72])
    ((_, lat),) = run(latency, [2600])
    assert q.action == "pause_for_review"
    assert lat.action == "rollback"
    explicit = rule(name="x", metric="latency_p95_ms", max=2000, action="notify")
    assert run(explicit, [2600])[0][1].action == "notify"


def test_restart_with_a_firing_alert_does_not_page_again() -> None:
    r = rule(max=850)
    engine = AlertEngine([r])
    engine.restore_firing("r", {"feature": "chat"}, since=0.0)
    events = run(r, [900, 950, 700], engine=engine)
    assert [(i, e.state) for i, e in events] == [(2, "resolved")]


def test_spike_ratio_against_median_baseline() -> None:
    r = rule(metric="cost_usd", spike={"ratio": 2.0, "baseline": 6, "min_baseline": 4})
    values = [10, 11, 9, 10, 10, 25, 26, 10, 10]
    assert [(i, e.state) for i, e in run(r, values)] == [(5, "firing"), (7, "resolved")]
    # learning: with too little history nothing can breach
    assert run(r, [10, 50]) == []


def test_spike_baseline_excludes_the_anomaly_so_a_lasting_regression_keeps_firing() -> None:
    r = rule(metric="cost_usd", spike={"ratio": 2.0, "baseline": 4, "min_baseline": 3})
    events = run(r, [10, 10, 10, 30, 30, 30, 30, 30, 30, 30])
    assert [(i, e.state) for i, e in events] == [(3, "firing")]


def test_spike_zscore_and_ewma() -> None:
    z = rule(metric="latency_p95_ms", spike={"zscore": 3.0, "baseline": 8, "min_baseline": 6})
    values = [100, 104, 98, 102, 99, 101, 103, 97, 160]
    assert [(i, e.state) for i, e in run(z, values)] == [(8, "firing")]
    ewma = rule(metric="cost_usd", spike={"ratio": 1.5, "baseline": 5, "method": "ewma", "min_baseline": 3})
    assert [(i, e.state) for i, e in run(ewma, [10, 10, 10, 10, 16])] == [(4, "firing")]


def test_the_summary_says_why_spike_and_absence_alerts_fired() -> None:
    both = rule(metric="cost_usd", spike={"ratio": 2.0, "zscore": 3.0, "baseline": 6, "min_baseline": 4})
    ((_, e),) = run(both, [10, 11, 9, 10, 10, 30])
    assert e.summary == "[warning] r: cost_usd 30 (3.00× baseline 10; z 31.6) on feature=chat"  # pstdev √0.4
    assert e.extra["baseline"] == 10
    r = rule(metric="calls", absent={"baseline": 3, "min_baseline_calls": 30}, min_calls=0)
    engine = AlertEngine([r])
    for i, calls in enumerate([20, 20, 20, 0]):
        e = engine.evaluate(r, {"feature": "chat"}, i * 60.0, (i + 1) * 60.0, {"calls": float(calls)}) or e
    assert e.summary == "[warning] r: calls 0 (60 calls before; a silent window had p=2e-09) on feature=chat"


def test_spike_min_delta_ignores_tiny_absolute_moves() -> None:
    r = rule(metric="refusal_rate", spike={"ratio": 2.5, "baseline": 6, "min_baseline": 3, "min_delta": 0.03})
    assert run(r, [0.001, 0.001, 0.001, 0.004]) == []  # 4× but +0.3 points: not an incident
    assert [i for i, _ in run(r, [0.02, 0.02, 0.02, 0.18])] == [3]


def test_absence_fires_when_a_busy_scope_goes_silent() -> None:
    r = rule(metric="calls", absent={"baseline": 3, "min_baseline_calls": 30}, min_calls=0)
    engine = AlertEngine([r])
    out = []
    for i, calls in enumerate([20, 20, 20, 0, 0, 15]):
        e = engine.evaluate(r, {"feature": "chat"}, i * 60.0, (i + 1) * 60.0, {"calls": float(calls)})
        if e:
            out.append((i, e.state))
    assert out == [(3, "firing"), (5, "resolved")]
    assert engine.evaluate(r, {"feature": "quiet"}, 0, 60, {"calls": 0.0}) is None  # never had traffic


def test_rules_file_errors_name_file_rule_and_key() -> None:
    from schemas.rules import RulesError

    with pytest.raises(RulesError, match=r"^rules.yaml: rule 'slow': key `metric`: unknown metric 'latency_p96_ms'"):
        parse_rules({"rules": [{"name": "slow", "metric": "latency_p96_ms", "max": 1}]}, "rules.yaml")
    with pytest.raises(RulesError, match=r"rule #2: key `scope.by`: .*unknown dimension 'region'"):
        parse_rules(
            {"rules": [{"name": "a", "metric": "calls", "max": 1}, {"metric": "calls", "max": 1, "scope": ["region"]}]},
            "rules.yaml",
        )
    with pytest.raises(RulesError, match=r"rule 'c': key `\(the entry\)`: a rule needs exactly one condition"):
        parse_rules({"rules": [{"name": "c", "metric": "calls"}]}, "rules.yaml")
    with pytest.raises(RulesError, match=r"rule 'w': key `window`: window must be a whole number of minutes"):
        parse_rules({"rules": [{"name": "w", "metric": "calls", "max": 1, "window": "90s"}]}, "rules.yaml")
    with pytest.raises(RulesError, match=r"rule 'k': key `fro`: unknown key"):
        parse_rules({"rules": [{"name": "k", "metric": "calls", "max": 1, "fro": 2}]}, "rules.yaml")


def test_rules_that_could_never_fire_or_reach_nobody_are_refused() -> None:
    from schemas.rules import RulesError, check_channels

    with pytest.raises(RulesError, match=r"rule 'e': key `max`: error_rate is a fraction from 0 to 1, so it never "
                                         r"exceeds 10 \(for 10% write 0.1\)"):  # fmt: skip
        parse_rules({"rules": [{"name": "e", "metric": "error_rate", "max": 10}]}, "rules.yaml")
    with pytest.raises(RulesError, match=r"rule 'm': key `min`: refusal_rate is a fraction from 0 to 1"):
        parse_rules({"rules": [{"name": "m", "metric": "refusal_rate", "min": 0}]}, "rules.yaml")
    with pytest.raises(RulesError, match=r"name 'd' is used twice \(rules #1 and budgets #1\)"):
        parse_rules({"rules": [{"name": "d", "metric": "calls", "max": 1}],
                     "budgets": [{"name": "d", "scope": {"team": "t"}, "limit_usd": 5}]}, "rules.yaml")  # fmt: skip
    rules = parse_rules({"rules": [{"name": "p", "metric": "error_rate", "max": 0.2, "channels": ["pagerdty"]}],
                         "budgets": [{"name": "b", "scope": {"team": "t"}, "limit_usd": 5, "channels": ["slack"]}]},
                        "rules.yaml")  # fmt: skip
    check_channels(rules, {"pagerdty", "slack"}, "rules.yaml")
    with pytest.raises(RulesError) as caught:
        check_channels(rules, {"pagerduty", "slack"}, "rules.yaml")
    assert str(caught.value) == ("rules.yaml: rule 'p': key `channels`: 'pagerdty' is not a configured channel "
                                 "(alerting.channels has: pagerduty, slack)")  # fmt: skip


def test_default_rules_load() -> None:
    from schemas.rules import default_rules

    rules = default_rules()
    names = {r.name for r in rules.rules}
    assert {"cost-spike", "refusal-regression", "traffic-stopped", "error-rate-high"} <= names


def test_absence_ignores_bursty_scopes_and_holds_through_a_long_outage() -> None:
    r = rule(metric="calls", absent={"baseline": 3, "min_baseline_calls": 30}, min_calls=0)
    engine = AlertEngine([r])

    def feed(scope: str, counts: list[int]) -> list[tuple[int, str]]:
        out = []
        for i, calls in enumerate(counts):
            e = engine.evaluate(r, {"feature": scope}, i * 60.0, (i + 1) * 60.0, {"calls": float(calls)})
            if e:
                out.append((i, e.state))
        return out

    # agent runs: 40 calls, a quiet window, 40 calls...: silence is normal there
    assert feed("agents", [40, 0, 40, 0, 40, 0, 40, 0]) == []
    # never silent, but bursty (mean 14.8, variance 150): a silent window has p = 0.03, not news
    assert feed("batch", [2, 30, 1, 25, 3, 28, 0]) == []
    # steady traffic (last three windows: mean 11, variance 0.67): p = e^-11 = 1.7e-5
    assert feed("steady", [10, 12, 9, 12, 10, 11, 0]) == [(6, "firing")]
    # a steady feature goes dark for far longer than the baseline: one page, held until calls return
    assert feed("chat", [20, 20, 20] + [0] * 10 + [5]) == [(3, "firing"), (13, "resolved")]
    # only two of the last three windows need traffic when the rule says so
    lax = rule(name="lax", metric="calls", min_calls=0,
               absent={"baseline": 3, "min_baseline_calls": 30, "min_active_windows": 2})  # fmt: skip
    engine = AlertEngine([lax])
    fired = [i for i, c in enumerate([40, 0, 40, 40, 0])
             if engine.evaluate(lax, {"feature": "x"}, i * 60.0, (i + 1) * 60.0, {"calls": float(c)})]  # fmt: skip
    assert fired == [4]


def test_absence_judges_silence_by_active_flows_not_calls() -> None:
    """Three six-call agent runs per window look steady as calls (18 ± 1: a silent window would be
    p = e^-18), but the runs arrive independently, at three a window: p = e^-3 = 5%, a quiet
    window several times a day. Counted in calls, a demo week of such a feature paged 12 times."""
    r = rule(metric="calls", absent={"baseline": 3, "min_baseline_calls": 30}, min_calls=0)
    engine = AlertEngine([r])

    def feed(scope: str, windows: list[tuple[int, int]]) -> list[tuple[int, str]]:
        out = []
        for i, (calls, flows) in enumerate(windows):
            metrics = {"calls": float(calls), "active_flows": float(flows)}
            e = engine.evaluate(r, {"feature": scope}, i * 60.0, (i + 1) * 60.0, metrics)
            if e:
                out.append((i, e.state))
        return out

    assert feed("agents", [(18, 3), (17, 3), (19, 3), (0, 0)]) == []
    assert feed("chat", [(18, 18), (17, 16), (19, 19), (0, 0)]) == [(3, "firing")]
    # the baseline (its last three windows) keeps both: calls arm the rule, flows give the odds
    assert engine.state(r, {"feature": "agents"}).history == [(17.0, 3.0), (19.0, 3.0), (0.0, 0.0)]


def test_cost_per_call_evidence_is_the_calls_with_a_cost() -> None:
    """A window of 50 calls, 45 of them on a model without a price, holds five costs: too few
    for a rule wanting 20, however many calls the window had."""
    r = rule(name="cost", metric="cost_per_call_usd", max=0.01, min_calls=20)
    engine = AlertEngine([r])
    few = {"calls": 50.0, "priced_calls": 5.0, "cost_per_call_usd": 0.05}
    assert engine.evaluate(r, {"feature": "chat"}, 0.0, 60.0, few) is None
    enough = {"calls": 50.0, "priced_calls": 20.0, "cost_per_call_usd": 0.05}
    event = engine.evaluate(r, {"feature": "chat"}, 60.0, 120.0, enough)
    assert event is not None and event.state == "firing"


def test_min_active_windows_cannot_exceed_the_baseline() -> None:
    from schemas.rules import RulesError

    with pytest.raises(RulesError, match=r"rule 'g': key `absent`: min_active_windows \(5\) must be at most baseline"):
        parse_rules({"rules": [{"name": "g", "metric": "calls", "absent": {"baseline": 3, "min_active_windows": 5}}]},
                    "rules.yaml")  # fmt: skip


def test_absence_with_for_and_cooldown_still_pages() -> None:
    """The silent windows of an outage do not erode the baseline that made silence news."""
    r = rule(metric="calls", absent={"baseline": 3, "min_baseline_calls": 30}, min_calls=0, **{"for": 2},
             cooldown="10m")  # fmt: skip
    engine = AlertEngine([r])
    states = []
    for i, calls in enumerate([20, 20, 20, 0, 0, 0, 20, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]):
        e = engine.evaluate(r, {"feature": "chat"}, i * 60.0, (i + 1) * 60.0, {"calls": float(calls)})
        if e:
            states.append((i, e.state))
    # for: 2 fires on the second silent window; the outage right after the resolve waits out the
    # 10-minute cooldown (counted from the resolve) and then pages, though far longer than the baseline
    assert states == [(4, "firing"), (6, "resolved"), (16, "firing")]
