"""AlertEvent: one state change of one alert, the unit every channel delivers.

Channels (console, webhook, Slack, PagerDuty, Alertmanager, the ``llm.alerts`` topic, the
``alerts`` table) all receive the same record and render it their own way; the ``dedup_key``
is stable for a (rule, scope) pair across restarts, so a receiver can correlate the trigger
with its resolve and drop repeats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from schemas.channels import AlertAction as Action
from schemas.channels import AlertSeverity as Severity

AlertState = Literal["firing", "resolved"]


@dataclass(frozen=True, slots=True)
class AlertEvent:
    dedup_key: str
    """Stable id of the (rule, scope key) incident stream, e.g. ``llmpulse-3f9c0a1b2c4d5e6f``."""
    rule: str
    state: AlertState
    severity: Severity
    action: Action
    metric: str
    value: float | None
    """The metric's value in the window that caused this transition."""
    condition: str
    """Human form of the condition, e.g. ``ttft_p95_ms > 850 for 3 windows``."""
    scope: dict[str, str]
    """The scope key, e.g. ``{"feature": "support-chat", "model": "gpt-4o"}``."""
    labels: dict[str, str]
    """Routing labels from the rule (team, channel...), merged with the scope."""
    window_start: datetime
    window_end: datetime
    started_at: datetime
    """When the incident started firing (for a resolve: when it had started)."""
    ended_at: datetime | None
    """Set on resolve."""
    summary: str
    """One line for a pager: ``[critical] p95 TTFT 931 ms > 850 ms on support-chat``."""
    description: str = ""
    runbook_url: str | None = None
    query: str | None = None
    """SQL that shows the data behind the alert."""
    link: str | None = None
    """A dashboard URL, when one is configured."""
    channels: tuple[str, ...] = ()
    """Names of the configured channels this alert goes to (empty: all default channels)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Context a channel may show: calls in window, baseline value, spike ratio, z-score..."""

    @property
    def firing(self) -> bool:
        return self.state == "firing"
