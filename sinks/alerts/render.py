"""One pure renderer per channel format: AlertEvent → the request body that service documents.

Pure so the exact bodies can be asserted in tests without a network, and so a format change is
one function. Every body carries the runbook and a link or query to the data behind the alert
(issue 4), and every timestamp is RFC 3339 in UTC, because receivers in other time zones and
languages parse these.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.text import Text

from processors.alerts.events import AlertEvent

WEBHOOK_VERSION = 1
"""Bumped only on a breaking change to the generic webhook body; additions keep it."""

PAGERDUTY_SUMMARY_MAX = 1024
SLACK_HEADER_MAX = 150
SLACK_TEXT_MAX = 3000
SLACK_FIELD_MAX = 2000
SLACK_FALLBACK_MAX = 4000

_LABEL_NAME_START = re.compile(r"^[a-zA-Z_]")
_LABEL_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")
_PD_COMPONENT_KEYS = ("feature", "model", "provider", "prompt_version", "variant")


def rfc3339(ts: datetime) -> str:
    """``2026-11-18T11:06:40.000Z``; a naive datetime is taken as UTC rather than failing a delivery."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S") + f".{ts.microsecond // 1000:03d}Z"


def format_value(value: float | None) -> str:
    """Short and exact enough for a human: ``931``, ``0.05123``, ``12.35``, ``n/a``."""
    if value is None or not math.isfinite(value):
        return "n/a" if value is None or math.isnan(value) else str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 1e6:
        return f"{value:.0f}"
    return f"{value:.4g}"


def scope_text(scope: Mapping[str, str], sep: str = ", ") -> str:
    return sep.join(f"{key}={value}" for key, value in scope.items()) or "all traffic"


def _duration(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m {secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def _human_time(ts: datetime) -> str:
    ts = (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).astimezone(UTC)
    return ts.strftime("%Y-%m-%d %H:%M:%S UTC")


def _human_window(start: datetime, end: datetime) -> str:
    start = (start if start.tzinfo else start.replace(tzinfo=UTC)).astimezone(UTC)
    end = (end if end.tzinfo else end.replace(tzinfo=UTC)).astimezone(UTC)
    if start.date() == end.date():
        return f"{start:%Y-%m-%d %H:%M:%S}–{end:%H:%M:%S} UTC"
    return f"{start:%Y-%m-%d %H:%M:%S} – {end:%Y-%m-%d %H:%M:%S} UTC"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _jsonable(value: Any) -> Any:
    """Datetimes as RFC 3339, tuples and sets as lists, so ``extra`` cannot break a body."""
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


# --- generic webhook -------------------------------------------------------------------------


def render_webhook(event: AlertEvent) -> dict[str, Any]:
    """Every AlertEvent field, so a receiver never needs a second lookup, plus ``version``."""
    body: dict[str, Any] = {"version": WEBHOOK_VERSION}
    for f in dataclasses.fields(event):
        body[f.name] = _jsonable(getattr(event, f.name))
    return body


# --- Slack incoming webhook ------------------------------------------------------------------


def _slack_escape(text: str) -> str:
    # the three characters Slack's mrkdwn reserves; everything else passes through
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_link(url: str, label: str) -> str:
    safe = url.replace("|", "%7C").replace("<", "%3C").replace(">", "%3E").replace(" ", "%20")
    return f"<{safe}|{label}>"


def _slack_code(text: str, limit: int) -> str:
    return "```" + _truncate(_slack_escape(text).replace("```", "'''"), limit - 6) + "```"


def _slack_field(title: str, value: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": _truncate(f"*{title}*\n{value}", SLACK_FIELD_MAX)}


def render_slack(event: AlertEvent) -> dict[str, Any]:
    """Block Kit message for an incoming webhook; ``text`` is the notification and screen-reader fallback."""
    if event.firing:
        icon = {"critical": ":rotating_light:", "warning": ":warning:"}.get(event.severity, ":information_source:")
        state = "FIRING"
    else:
        icon, state = ":white_check_mark:", "RESOLVED"
    header = f"{icon} {state} [{event.severity}] {event.rule}"

    lead = _slack_escape(event.summary)
    if event.description:
        lead += "\n" + _slack_escape(event.description)
    fields = [
        _slack_field("Value" if event.firing else "Last value", f"`{_slack_escape(format_value(event.value))}`"),
        _slack_field("Condition", f"`{_slack_escape(event.condition)}`"),
        _slack_field("Scope", _slack_escape(scope_text(event.scope))),
        _slack_field("Window", _human_window(event.window_start, event.window_end)),
        _slack_field("Severity / action", f"{event.severity} / {event.action}"),
    ]
    if event.firing:
        fields.append(_slack_field("Firing since", _human_time(event.started_at)))
    else:
        ended = event.ended_at or event.window_end
        fields.append(_slack_field("Resolved", f"{_human_time(ended)} (after {_duration(ended - event.started_at)})"))

    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _truncate(header, SLACK_HEADER_MAX), "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _truncate(lead, SLACK_TEXT_MAX)}},
        {"type": "section", "fields": fields},
    ]
    if event.query:
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": "*Query*\n" + _slack_code(event.query, 2900)}}
        )
    links = []
    if event.runbook_url:
        links.append(_slack_link(event.runbook_url, "Runbook"))
    if event.link:
        links.append(_slack_link(event.link, "Dashboard"))
    if links:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": "  ·  ".join(links)}})
    context = f"llmpulse · rule `{_slack_escape(event.rule)}` · metric `{_slack_escape(event.metric)}`"
    context += f" · dedup `{_slack_escape(event.dedup_key)}`"
    elements = [{"type": "mrkdwn", "text": context}]
    shown = {k: v for k, v in event.extra.items() if v is not None}  # "baseline: None" tells on-call nothing
    if shown:
        detail = " · ".join(f"{k}: {_jsonable(v)}" for k, v in shown.items())
        elements.append({"type": "mrkdwn", "text": _truncate(_slack_escape(detail), SLACK_FIELD_MAX)})
    blocks.append({"type": "context", "elements": elements})

    fallback = f"[{state}] {event.summary}"
    if event.runbook_url:
        fallback += f" — runbook: {event.runbook_url}"
    return {"text": _truncate(fallback, SLACK_FALLBACK_MAX), "blocks": blocks}


# --- PagerDuty Events API v2 -----------------------------------------------------------------


def render_pagerduty(
    event: AlertEvent,
    *,
    routing_key: str,
    severity_map: Mapping[str, str] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """A trigger with the full context, or a resolve that carries only what PagerDuty reads from it."""
    if not event.firing:
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": event.dedup_key}
    severity = (severity_map or {}).get(event.severity, event.severity)
    details: dict[str, Any] = {
        "rule": event.rule,
        "metric": event.metric,
        "value": event.value,
        "condition": event.condition,
        "action": event.action,
        "scope": dict(event.scope),
        "labels": dict(event.labels),
        "window_start": rfc3339(event.window_start),
        "window_end": rfc3339(event.window_end),
    }
    if event.description:
        details["description"] = event.description
    if event.query:
        details["query"] = event.query
    if event.runbook_url:
        details["runbook_url"] = event.runbook_url
    if event.link:
        details["dashboard_url"] = event.link
    if event.extra:
        details["context"] = _jsonable(event.extra)
    if not source:
        source = scope_text(event.scope, ",") if event.scope else "llmpulse"
    payload: dict[str, Any] = {
        "summary": _truncate(event.summary, PAGERDUTY_SUMMARY_MAX),
        "source": source,
        "severity": severity,
        "timestamp": rfc3339(event.started_at),
    }
    component = next((event.scope[k] for k in _PD_COMPONENT_KEYS if event.scope.get(k)), None)
    if component:
        payload["component"] = component
    group = event.labels.get("team") or event.scope.get("team")
    if group:
        payload["group"] = group
    payload["class"] = event.metric
    payload["custom_details"] = details
    body: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": event.dedup_key,
        "payload": payload,
    }
    links = []
    if event.runbook_url:
        links.append({"href": event.runbook_url, "text": "Runbook"})
    if event.link:
        links.append({"href": event.link, "text": "Dashboard"})
    if links:
        body["links"] = links
    body["client"] = "llmpulse"
    return body


# --- Prometheus Alertmanager API v2 ----------------------------------------------------------


def sanitize_label_name(name: str) -> str:
    """Alertmanager (classic validation) takes ``[a-zA-Z_][a-zA-Z0-9_]*``: ``prompt-version`` → ``prompt_version``."""
    cleaned = _LABEL_NAME_BAD.sub("_", name)
    if not cleaned or not _LABEL_NAME_START.match(cleaned):
        cleaned = "_" + cleaned
    return cleaned


def alertmanager_labels(event: AlertEvent) -> dict[str, str]:
    """The alert's identity in Alertmanager: identical on firing and resolve, so the resolve closes it.

    Scope and rule labels first, then the reserved ones, so a rule label cannot shadow
    ``alertname``/``severity``/``dedup_key``. Empty values are left out: Alertmanager treats
    them as absent anyway.
    """
    labels: dict[str, str] = {}
    for key, value in (*event.scope.items(), *event.labels.items()):
        if value != "":
            labels[sanitize_label_name(key)] = str(value)
    labels["alertname"] = event.rule
    labels["severity"] = event.severity
    labels["action"] = event.action
    labels["dedup_key"] = event.dedup_key
    return labels


def alertmanager_alert(event: AlertEvent, *, now: datetime, firing_ttl_s: float) -> dict[str, Any]:
    """One postableAlert. Firing: ``endsAt`` = now + ttl (re-sent before it passes); resolved: ``endsAt`` = ended_at."""
    annotations = {
        "summary": event.summary,
        "description": event.description,
        "runbook_url": event.runbook_url or "",
        "query": event.query or "",
        "value": format_value(event.value),
        "condition": event.condition,
        "dashboard_url": event.link or "",
    }
    alert: dict[str, Any] = {
        "labels": alertmanager_labels(event),
        "annotations": {k: v for k, v in annotations.items() if v},
        "startsAt": rfc3339(event.started_at),
    }
    if event.firing:
        alert["endsAt"] = rfc3339(now + timedelta(seconds=firing_ttl_s))
    else:
        alert["endsAt"] = rfc3339(event.ended_at or now)
    if event.link:
        alert["generatorURL"] = event.link
    return alert


def render_alertmanager(events: Sequence[AlertEvent], *, now: datetime, firing_ttl_s: float) -> list[dict[str, Any]]:
    """The body of ``POST /api/v2/alerts``: a JSON array, several alerts per request."""
    return [alertmanager_alert(e, now=now, firing_ttl_s=firing_ttl_s) for e in events]


# --- console ---------------------------------------------------------------------------------


def render_console(event: AlertEvent) -> Text:
    """Two lines for a terminal: what happened, then the numbers and where to look."""
    if event.firing:
        style = {"critical": "bold red", "warning": "bold yellow"}.get(event.severity, "bold cyan")
        head = Text.assemble(("● FIRING  ", style), (f"{event.severity}/{event.action}  ", style))
    else:
        head = Text.assemble(("✔ RESOLVED  ", "bold green"), (f"{event.severity}/{event.action}  ", "green"))
    head.append(event.rule, style="bold")
    head.append(f"  {event.summary}")
    parts = [
        f"{'value' if event.firing else 'last value'} {format_value(event.value)} ({event.condition})",
        scope_text(event.scope, " "),
    ]
    if not event.firing:
        ended = event.ended_at or event.window_end
        parts.append(f"lasted {_duration(ended - event.started_at)}")
    if event.runbook_url:
        parts.append(f"runbook {event.runbook_url}")
    if event.link:
        parts.append(f"dashboard {event.link}")
    elif event.query:
        parts.append(f"query {_truncate(' '.join(event.query.split()), 200)}")
    parts.append(f"key {event.dedup_key}")
    head.append("\n    " + " · ".join(parts), style="dim")
    return head
