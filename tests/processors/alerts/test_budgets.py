"""Budgets: thresholds notify once per period, and the forecast extrapolates the burn rate."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from processors.alerts.budgets import BudgetTracker, forecast, period_bounds
from processors.alerts.stage2 import FinalCell
from processors.windows import SCOPE_DIMS, WindowPartial
from schemas.rules import parse_rules

NOV_10 = datetime(2026, 11, 10, tzinfo=UTC).timestamp()


def cell(t: float, cost: float, team: str = "search") -> FinalCell:
    key = ("f", team, "gpt-4o", "openai", "v1", "control")
    p = WindowPartial(int(t), 60, key, calls=10, cost_usd=cost)
    return FinalCell(SCOPE_DIMS, key, p)


def test_periods_are_utc_calendar_days_and_months() -> None:
    start, end = period_bounds("month", NOV_10)
    assert datetime.fromtimestamp(start, UTC) == datetime(2026, 11, 1, tzinfo=UTC)
    assert (end - start) / 86400 == 30
    day_start, day_end = period_bounds("day", NOV_10 + 3600)
    assert (day_start, day_end) == (NOV_10, NOV_10 + 86400)


def test_forecast_of_exhaustion_from_burn_rate() -> None:
    # $400 of $1,000 spent on Nov 10 00:00, burning $5/h: 600 / 5 = 120 h later → Nov 15 00:00
    s = forecast("b", "month", 1000.0, 400.0, 5.0, NOV_10)
    assert s.exhausted_at == datetime(2026, 11, 15, tzinfo=UTC).timestamp()
    assert s.used == pytest.approx(0.4)
    assert s.projected_usd == pytest.approx(400 + 5 * 21 * 24)  # 21 days left: Nov 10 00:00 → Dec 1
    calm = forecast("b", "month", 1000.0, 400.0, 0.5, NOV_10)
    assert calm.exhausted_at is None  # 1,200 h needed, 504 h left


def test_each_threshold_notifies_once_and_the_period_resets() -> None:
    rules = parse_rules({"budgets": [{"name": "search-daily", "scope": {"team": "search"}, "period": "day",
                                      "limit_usd": 100, "warn_at": [0.5, 0.8, 1.0]}]}, "t")  # fmt: skip
    tracker = BudgetTracker(rules.budgets, burn_window_s=3600)
    events = tracker.feed([cell(NOV_10 + 60 * i, 10.0) for i in range(6)], NOV_10 + 360)  # $60
    assert [e.extra["threshold"] for e in events] == [0.5]
    assert events[0].value == 60.0 and "$60.00 of $100.00 (60%)" in events[0].summary
    assert events[0].condition == "spend >= 50% of the daily $100.00 budget"
    assert tracker.feed([cell(NOV_10 + 400, 5.0, team="other")], NOV_10 + 460) == []  # other team
    events = tracker.feed([cell(NOV_10 + 500, 45.0)], NOV_10 + 560)  # $105: both 80% and 100%
    assert [(e.extra["threshold"], e.severity) for e in events] == [(0.8, "warning"), (1.0, "critical")]
    assert tracker.feed([cell(NOV_10 + 600, 1.0)], NOV_10 + 660) == []  # already announced
    nov_11 = NOV_10 + 86400
    events = tracker.feed([cell(nov_11 + 60 * i, 10.0) for i in range(5)], nov_11 + 300)  # a new day
    assert [e.extra["threshold"] for e in events] == [0.5]
    assert events[0].scope["period"] == "2026-11-11"


def test_seeded_spend_and_notifications_survive_a_restart() -> None:
    rules = parse_rules({"budgets": [{"name": "m", "scope": {"team": "search"}, "limit_usd": 1000}]}, "t")
    tracker = BudgetTracker(rules.budgets)
    start, _ = period_bounds("month", NOV_10)
    tracker.seed("m", start, 790.0, notified=[0.5])
    events = tracker.feed([cell(NOV_10, 20.0)], NOV_10 + 60)
    assert [e.extra["threshold"] for e in events] == [0.8]


def test_a_budget_under_a_dollar_reads_as_itself() -> None:
    rules = parse_rules({"budgets": [{"name": "t1-daily", "scope": {"team": "t1"}, "period": "day",
                                      "limit_usd": 0.5, "warn_at": [0.5]}]}, "t")  # fmt: skip
    (event,) = BudgetTracker(rules.budgets, burn_window_s=3600).feed([cell(NOV_10, 0.3, team="t1")], NOV_10 + 60)
    assert "$0.30 of $0.50 (60%)" in event.summary and "daily $0.50 budget" in event.condition
