"""Which channels an alert goes to: the alert's own ``channels`` narrow the candidates, each channel's policy filters.

Pure, so the routing of a rules file can be checked without sending anything, and identical
for the firing and the resolve of one incident (it reads nothing that changes between them),
so no channel ever gets a resolve without its trigger.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from processors.alerts.events import AlertEvent
from schemas.channels import ChannelConfig

log = logging.getLogger("llmpulse.alerts")


def routing_labels(event: AlertEvent) -> dict[str, str]:
    """What channel matchers see: scope, rule labels, then the alert's own fields (which win)."""
    return {
        **event.scope,
        **event.labels,
        "rule": event.rule,
        "metric": event.metric,
        "severity": event.severity,
        "action": event.action,
    }


class ChannelRouter:
    """Candidates: the channels the alert names, else every ``default`` channel; then each channel's selectors."""

    def __init__(self, channels: Sequence[ChannelConfig]) -> None:
        self._channels = {c.name: c for c in channels}
        self._defaults = [c.name for c in channels if c.default]
        self._warned: set[str] = set()

    @property
    def names(self) -> list[str]:
        return list(self._channels)

    def route(self, event: AlertEvent) -> list[str]:
        if event.channels:
            candidates = []
            for name in event.channels:
                if name in self._channels:
                    candidates.append(name)
                elif name not in self._warned:
                    # once per name: a typo in a rules file should be visible, not repeated every window
                    self._warned.add(name)
                    log.warning(
                        "alert rule %r names channel %r, which is not configured (alerting.channels has: %s)",
                        event.rule,
                        name,
                        ", ".join(self._channels) or "none",
                    )
        else:
            candidates = self._defaults
        labels = routing_labels(event)
        return [
            name
            for name in dict.fromkeys(candidates)
            if self._channels[name].accepts(event.severity, event.action, labels, resolved=not event.firing)
        ]
