"""BudgetTracker: spend against per-team/per-feature budgets, with a forecast of when it runs out.

Spend accumulates from stage-2's final minutes (event time), seeded with what ClickHouse
already holds for the period, so a restart neither forgets the month nor double counts it.
Each warn threshold notifies once per period; the forecast extrapolates the trailing burn rate
(the last ``burn_window_s`` of spend) to the moment the budget is exhausted.
"""

from __future__ import annotations

import calendar
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from processors.alerts.engine import dedup_key
from processors.alerts.events import AlertEvent
from processors.alerts.stage2 import FinalCell, scope_cell
from processors.windows import SCOPE_DIMS
from schemas.rules import Budget


def period_bounds(period: str, t: float) -> tuple[float, float]:
    """UTC calendar day or month containing ``t``: [start, end)."""
    d = datetime.fromtimestamp(t, UTC)
    if period == "day":
        start = datetime(d.year, d.month, d.day, tzinfo=UTC)
        return start.timestamp(), start.timestamp() + 86400
    start = datetime(d.year, d.month, 1, tzinfo=UTC)
    days = calendar.monthrange(d.year, d.month)[1]
    return start.timestamp(), start.timestamp() + days * 86400


def period_label(period: str, start: float) -> str:
    d = datetime.fromtimestamp(start, UTC)
    return d.strftime("%Y-%m-%d") if period == "day" else d.strftime("%Y-%m")


@dataclass
class BudgetStatus:
    name: str
    period: str
    period_start: float
    period_end: float
    spent_usd: float
    limit_usd: float
    burn_usd_per_hour: float
    exhausted_at: float | None
    """When spend reaches the limit at the current burn rate (None: not within the period)."""
    now: float

    @property
    def used(self) -> float:
        return self.spent_usd / self.limit_usd

    @property
    def projected_usd(self) -> float:
        """Spend by the period's end at the current burn rate."""
        return self.spent_usd + self.burn_usd_per_hour * max(0.0, self.period_end - self.now) / 3600


def forecast(name: str, period: str, limit: float, spent: float, burn_per_hour: float, now: float) -> BudgetStatus:
    start, end = period_bounds(period, now)
    exhausted = None
    if spent >= limit:
        exhausted = now
    elif burn_per_hour > 0:
        at = now + (limit - spent) / burn_per_hour * 3600
        exhausted = at if at < end else None
    return BudgetStatus(name, period, start, end, spent, limit, burn_per_hour, exhausted, now)


@dataclass
class _BudgetState:
    period_start: float = -1.0
    spent: float = 0.0
    notified: set[float] = field(default_factory=set)
    recent: deque[tuple[float, float]] = field(default_factory=deque)
    """(minute start, spend) of the burn window."""


class BudgetTracker:
    def __init__(self, budgets: Iterable[Budget], burn_window_s: float = 6 * 3600) -> None:
        self.budgets = list(budgets)
        self.burn_window_s = burn_window_s
        self._state = {b.name: _BudgetState() for b in self.budgets}
        self.full_grain = True
        """Whether full-grain cells stand in for a budget's grain with none (``RuleWindows.full_grain``)."""
        self.owned = {b.name for b in self.budgets}
        """Budgets this stage 2 tracks: with several workers, the one whose partials partition holds
        the budget's scope (``keep``). Another's stale spend would announce a threshold twice."""

    def seed(self, name: str, period_start: float, spent: float, notified: Iterable[float] = ()) -> None:
        """Spend ClickHouse already holds for the current period, and thresholds already announced."""
        st = self._state[name]
        st.period_start, st.spent, st.notified = period_start, spent, set(notified)

    @staticmethod
    def cell(budget: Budget) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The partials key of the budget's scope."""
        return scope_cell(budget.scope)

    def keep(self, owns: Callable[[tuple[str, ...], tuple[str, ...]], bool]) -> list[Budget]:
        """Track only the budgets whose scope this stage 2 owns; returns those newly owned, which
        need seeding from ClickHouse. One no longer owned forgets its spend."""
        gained = []
        for budget in self.budgets:
            if owns(*self.cell(budget)):
                if budget.name not in self.owned:
                    self.owned.add(budget.name)
                    gained.append(budget)
            elif budget.name in self.owned:
                self.owned.discard(budget.name)
                self._state[budget.name] = _BudgetState()
        return gained

    def _matches(self, budget: Budget, cell: FinalCell) -> bool:
        labels = dict(zip(cell.dims, cell.values, strict=True))
        return all(labels.get(k) == v for k, v in budget.scope.items())

    def feed(self, cells: list[FinalCell], through: float) -> list[AlertEvent]:
        full = [c for c in cells if c.dims == SCOPE_DIMS] if self.full_grain else []
        events: list[AlertEvent] = []
        for budget in self.budgets:
            if budget.name not in self.owned:
                continue
            st = self._state[budget.name]
            dims = tuple(d for d in SCOPE_DIMS if d in budget.scope)
            usable = [c for c in cells if c.dims == dims] or full
            for cell in usable:
                if not self._matches(budget, cell):
                    continue
                t = cell.partial.window_start
                start, _ = period_bounds(budget.period, t)
                if start != st.period_start:
                    if start < st.period_start:
                        continue  # a minute of an earlier period: already closed
                    st.period_start, st.spent, st.notified = start, 0.0, set()
                st.spent += cell.partial.cost_usd
                st.recent.append((t, cell.partial.cost_usd))
            while st.recent and st.recent[0][0] < through - self.burn_window_s:
                st.recent.popleft()
            events.extend(self._check(budget, st, through))
        return events

    def status(self, budget: Budget, now: float) -> BudgetStatus:
        st = self._state[budget.name]
        burn = sum(c for _, c in st.recent) / (self.burn_window_s / 3600)
        return forecast(budget.name, budget.period, budget.limit_usd, st.spent, burn, now)

    def _check(self, budget: Budget, st: _BudgetState, now: float) -> list[AlertEvent]:
        if st.period_start < 0:
            return []
        status = self.status(budget, now)
        out = []
        for threshold in budget.warn_at:
            if status.used >= threshold and threshold not in st.notified:
                st.notified.add(threshold)
                out.append(budget_event(budget, status, threshold, now))
        return out


_PERIODIC = {"day": "daily", "month": "monthly"}


def _usd(amount: float) -> str:
    """Cents always: a $0.50 daily budget read "$0" at whole dollars."""
    return f"${amount:,.2f}"


def budget_event(budget: Budget, s: BudgetStatus, threshold: float, now: float) -> AlertEvent:
    label = period_label(budget.period, s.period_start)
    scope = {**budget.scope, "period": label}
    when = (
        "already exhausted"
        if s.exhausted_at is not None and s.exhausted_at <= now
        else f"exhausted by {datetime.fromtimestamp(s.exhausted_at, UTC):%Y-%m-%d %H:%M} UTC at the current burn"
        if s.exhausted_at is not None
        else "on track to stay within it this period"
    )
    scope_text = ", ".join(f"{k}={v}" for k, v in sorted(budget.scope.items()))
    severity = "critical" if threshold >= 1.0 else budget.severity
    return AlertEvent(
        dedup_key=dedup_key(f"budget:{budget.name}:{threshold:g}", scope),
        rule=budget.name,
        state="firing",
        severity=severity,
        action="notify",
        metric="budget_spend_usd",
        value=round(s.spent_usd, 2),
        condition=f"spend >= {threshold:.0%} of the {_PERIODIC[budget.period]} {_usd(budget.limit_usd)} budget",
        scope=scope,
        labels={**budget.scope, **budget.labels},
        window_start=datetime.fromtimestamp(s.period_start, UTC),
        window_end=datetime.fromtimestamp(now, UTC),
        started_at=datetime.fromtimestamp(now, UTC),
        ended_at=None,
        summary=(
            f"[{severity}] budget {budget.name} ({scope_text}, {label}): {_usd(s.spent_usd)} of "
            f"{_usd(budget.limit_usd)} ({s.used:.0%}); {when}"
        ),
        runbook_url=budget.runbook_url,
        channels=tuple(budget.channels),
        extra={
            "threshold": threshold,
            "burn_usd_per_hour": round(s.burn_usd_per_hour, 4),
            "exhausted_at": datetime.fromtimestamp(s.exhausted_at, UTC).isoformat() if s.exhausted_at else None,
        },
    )
