"""``llmpulse rules backtest``: replay rules over ClickHouse history before they page anyone.

The same engine that runs in the stream evaluates the rules' windows as the minute rollups
recorded them (the metrics are the stream's, as SQL: ``sinks/queries/metrics.py``), window by
window in time order, so the output is when each rule would have fired and resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from llmpulse.alerting import query_for
from processors.alerts.engine import AlertEngine
from processors.alerts.events import AlertEvent
from processors.windows import EVIDENCE
from schemas.rules import RulesFile
from sinks.alert_store import AlertStore
from sinks.queries.metrics import METRIC_SQL


@dataclass
class Incident:
    rule: str
    scope: dict[str, str]
    severity: str
    action: str
    fired_at: datetime
    resolved_at: datetime | None
    value: float | None
    """The metric in the window that fired it."""
    summary: str

    @property
    def duration_s(self) -> float | None:
        return (self.resolved_at - self.fired_at).total_seconds() if self.resolved_at else None


@dataclass
class BacktestResult:
    incidents: list[Incident]
    windows: int
    skipped_rules: dict[str, str]
    shortened: dict[str, str] = field(default_factory=dict)
    """Rules evaluated over less than the period asked for, and why."""


def backtest(
    store: AlertStore, rules: RulesFile, start: float, end: float, raw_since: float | None = None
) -> BacktestResult:
    """``raw_since``: the oldest raw call kept (retention). Absence rules read raw calls (their
    flows), so they start there; before it they would see nothing but silence."""
    engine = AlertEngine(rules.rules, query_for=query_for)
    events: list[AlertEvent] = []
    skipped: dict[str, str] = {}
    shortened: dict[str, str] = {}
    evaluated = 0
    for rule in rules.rules:
        if rule.absent is None and rule.metric not in METRIC_SQL:
            skipped[rule.name] = f"{rule.metric} is not kept in the rollups (stream only)"
            continue
        w = int(rule.window)
        first = int(start) - int(start) % w
        if rule.absent is not None and raw_since is not None and raw_since > first:
            first = -(-int(raw_since) // w) * w  # the first window wholly inside it
            shortened[rule.name] = (
                f"evaluated from {datetime.fromtimestamp(first, UTC):%Y-%m-%d %H:%M} UTC on: absence reads "
                "the raw calls, kept for the raw retention period"
            )
        by_window = store.window_values(rule, first, end)
        keys = sorted({values for windows in by_window.values() for values in windows})
        for ws in range(first, int(end) - w + 1, w):
            cells = by_window.get(ws, {})
            for values in keys:
                value, calls = cells.get(values, (0.0 if rule.absent is not None else None, 0.0))
                scope = dict(zip(rule.scope.by, values, strict=True))
                if rule.absent is not None:  # the store gives absence rules (active flows, calls)
                    metrics = {"calls": calls, "active_flows": value}
                else:  # and for the rest (value, evidence): what the rule's min_calls counts
                    metrics = {"calls": calls, EVIDENCE.get(rule.metric, "calls"): calls, rule.metric: value}
                e = engine.evaluate(rule, scope, ws, ws + w, metrics)
                evaluated += 1
                if e is not None:
                    events.append(e)
    return BacktestResult(_incidents(events), evaluated, skipped, shortened)


def _incidents(events: list[AlertEvent]) -> list[Incident]:
    open_: dict[str, Incident] = {}
    out: list[Incident] = []
    for e in sorted(events, key=lambda e: e.window_end):
        if e.state == "firing":
            inc = Incident(e.rule, e.scope, e.severity, e.action, e.window_end, None, e.value, e.summary)
            open_[e.dedup_key] = inc
            out.append(inc)
        else:
            inc = open_.pop(e.dedup_key, None)
            if inc is not None:
                inc.resolved_at = e.window_end
    return out
