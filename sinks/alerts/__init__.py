"""Alert delivery: console, generic webhook, Slack, PagerDuty and Alertmanager channels.

``AlertDispatcher`` is the one thing the runtime wires in; the renderers are pure and public so
formats can be checked (and reused) without sending anything.
"""

from __future__ import annotations

from sinks.alerts.channels import build_channel
from sinks.alerts.dispatcher import AlertDispatcher, ChannelStats
from sinks.alerts.render import (
    render_alertmanager,
    render_console,
    render_pagerduty,
    render_slack,
    render_webhook,
)
from sinks.alerts.routing import ChannelRouter

__all__ = [
    "AlertDispatcher",
    "ChannelRouter",
    "ChannelStats",
    "build_channel",
    "render_alertmanager",
    "render_console",
    "render_pagerduty",
    "render_slack",
    "render_webhook",
]
