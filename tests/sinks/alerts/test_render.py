"""Each renderer's exact body for one fixed alert, firing and resolved, plus the format limits each service sets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from sinks.alerts.render import (
    PAGERDUTY_SUMMARY_MAX,
    SLACK_HEADER_MAX,
    alertmanager_labels,
    format_value,
    render_alertmanager,
    render_console,
    render_pagerduty,
    render_slack,
    render_webhook,
    rfc3339,
    sanitize_label_name,
)
from tests.sinks.alerts.conftest import FIRING, NOW, RESOLVED, alert

QUERY = "SELECT quantileTDigest(0.95)(ttft_ms) AS p95 FROM llm_calls WHERE feature = 'support-chat' AND p95 > 850"
RUNBOOK = "https://runbooks.example.com/llm/ttft"
DASHBOARD = "https://grafana.example.com/d/llm?var-feature=support-chat"
DESCRIPTION = "p95 time to first token above 850 ms for 3 consecutive 1-minute windows."

WEBHOOK_FIRING = {
    "version": 1,
    "dedup_key": "llmpulse-3f9c0a1b2c4d5e6f",
    "rule": "ttft-p95-support-chat",
    "state": "firing",
    "severity": "critical",
    "action": "page",
    "metric": "ttft_p95_ms",
    "value": 931.0,
    "condition": "ttft_p95_ms > 850 for 3 windows",
    "scope": {"feature": "support-chat", "model": "gpt-4o"},
    "labels": {"team": "search", "oncall-rotation": "search-primary"},
    "window_start": "2026-11-18T11:05:00.000Z",
    "window_end": "2026-11-18T11:06:00.000Z",
    "started_at": "2026-11-18T11:08:00.250Z",
    "ended_at": None,
    "summary": "[critical] p95 TTFT 931 ms > 850 ms on support-chat",
    "description": DESCRIPTION,
    "runbook_url": RUNBOOK,
    "query": QUERY,
    "link": DASHBOARD,
    "channels": [],
    "extra": {"calls": 1840, "baseline": 612.5},
}


def _roundtrip(body: object) -> object:
    """What the receiver parses: the body as it goes on the wire."""
    return orjson.loads(orjson.dumps(body))


def test_webhook_firing_carries_every_field_and_version() -> None:
    assert _roundtrip(render_webhook(FIRING)) == WEBHOOK_FIRING


def test_webhook_resolved() -> None:
    assert _roundtrip(render_webhook(RESOLVED)) == {
        **WEBHOOK_FIRING,
        "state": "resolved",
        "value": 790.0,
        "window_start": "2026-11-18T11:29:00.000Z",
        "window_end": "2026-11-18T11:30:00.000Z",
        "ended_at": "2026-11-18T11:32:00.000Z",
        "summary": "[resolved] p95 TTFT 790 ms on support-chat",
    }


def _slack_blocks(state_header: str, value_field: str, window: str, last_field: str, lead: str) -> list[object]:
    return [
        {"type": "header", "text": {"type": "plain_text", "text": state_header, "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn", "text": lead + "\n" + DESCRIPTION}},
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": value_field},
                {"type": "mrkdwn", "text": "*Condition*\n`ttft_p95_ms &gt; 850 for 3 windows`"},
                {"type": "mrkdwn", "text": "*Scope*\nfeature=support-chat, model=gpt-4o"},
                {"type": "mrkdwn", "text": f"*Window*\n{window}"},
                {"type": "mrkdwn", "text": "*Severity / action*\ncritical / page"},
                {"type": "mrkdwn", "text": last_field},
            ],
        },
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": "*Query*\n```" + QUERY.replace(">", "&gt;") + "```"},
        },
        {"type": "section", "text": {"type": "mrkdwn", "text": f"<{RUNBOOK}|Runbook>  ·  <{DASHBOARD}|Dashboard>"}},
        {
            "type": "context",
            "elements": [
                {
                    "type": "mrkdwn",
                    "text": "llmpulse · rule `ttft-p95-support-chat` · metric `ttft_p95_ms`"
                    " · dedup `llmpulse-3f9c0a1b2c4d5e6f`",
                },
                {"type": "mrkdwn", "text": "calls: 1840 · baseline: 612.5"},
            ],
        },
    ]


def test_slack_firing() -> None:
    assert _roundtrip(render_slack(FIRING)) == {
        "text": f"[FIRING] [critical] p95 TTFT 931 ms > 850 ms on support-chat — runbook: {RUNBOOK}",
        "blocks": _slack_blocks(
            ":rotating_light: FIRING [critical] ttft-p95-support-chat",
            "*Value*\n`931`",
            "2026-11-18 11:05:00–11:06:00 UTC",
            "*Firing since*\n2026-11-18 11:08:00 UTC",
            "[critical] p95 TTFT 931 ms &gt; 850 ms on support-chat",
        ),
    }


def test_slack_resolved_looks_different() -> None:
    assert _roundtrip(render_slack(RESOLVED)) == {
        "text": f"[RESOLVED] [resolved] p95 TTFT 790 ms on support-chat — runbook: {RUNBOOK}",
        "blocks": _slack_blocks(
            ":white_check_mark: RESOLVED [critical] ttft-p95-support-chat",
            "*Last value*\n`790`",
            "2026-11-18 11:29:00–11:30:00 UTC",
            "*Resolved*\n2026-11-18 11:32:00 UTC (after 23m 59s)",
            "[resolved] p95 TTFT 790 ms on support-chat",
        ),
    }


def test_slack_respects_block_kit_limits_and_escapes_mrkdwn() -> None:
    event = alert(rule="r" * 400, summary="a <b> & c", query="x" * 10_000, runbook_url="https://r.example/a|b>c")
    body = render_slack(event)
    header = body["blocks"][0]["text"]["text"]
    assert len(header) == SLACK_HEADER_MAX and header.endswith("…")
    assert body["blocks"][1]["text"]["text"].startswith("a &lt;b&gt; &amp; c")
    query_text = body["blocks"][3]["text"]["text"]
    assert len(query_text) <= 3000 and query_text.endswith("…```")
    assert body["blocks"][4]["text"]["text"].startswith("<https://r.example/a%7Cb%3Ec|Runbook>")
    assert all(len(f["text"]) <= 2000 for f in body["blocks"][2]["fields"])


def test_slack_without_optional_parts_keeps_the_core_blocks() -> None:
    body = render_slack(alert(description="", query=None, runbook_url=None, link=None, extra={}, scope={}))
    assert [b["type"] for b in body["blocks"]] == ["header", "section", "section", "context"]
    assert body["blocks"][2]["fields"][2]["text"] == "*Scope*\nall traffic"
    assert body["text"] == "[FIRING] [critical] p95 TTFT 931 ms > 850 ms on support-chat"


def test_slack_leaves_out_context_nobody_has() -> None:
    """A threshold rule has no baseline and a lag rule no call count: "baseline: None" is noise."""
    body = render_slack(alert(extra={"calls": None, "baseline": None, "evaluated_at": 1.5}))
    assert body["blocks"][-1]["elements"][1]["text"] == "evaluated_at: 1.5"
    body = render_slack(alert(extra={"calls": None, "baseline": None}))
    assert len(body["blocks"][-1]["elements"]) == 1


PD_KEY = "R0UT1NGKEY0123456789abcdef012345"


def test_pagerduty_trigger() -> None:
    assert _roundtrip(render_pagerduty(FIRING, routing_key=PD_KEY)) == {
        "routing_key": PD_KEY,
        "event_action": "trigger",
        "dedup_key": "llmpulse-3f9c0a1b2c4d5e6f",
        "payload": {
            "summary": "[critical] p95 TTFT 931 ms > 850 ms on support-chat",
            "source": "feature=support-chat,model=gpt-4o",
            "severity": "critical",
            "timestamp": "2026-11-18T11:08:00.250Z",
            "component": "support-chat",
            "group": "search",
            "class": "ttft_p95_ms",
            "custom_details": {
                "rule": "ttft-p95-support-chat",
                "metric": "ttft_p95_ms",
                "value": 931.0,
                "condition": "ttft_p95_ms > 850 for 3 windows",
                "action": "page",
                "scope": {"feature": "support-chat", "model": "gpt-4o"},
                "labels": {"team": "search", "oncall-rotation": "search-primary"},
                "window_start": "2026-11-18T11:05:00.000Z",
                "window_end": "2026-11-18T11:06:00.000Z",
                "description": DESCRIPTION,
                "query": QUERY,
                "runbook_url": RUNBOOK,
                "dashboard_url": DASHBOARD,
                "context": {"calls": 1840, "baseline": 612.5},
            },
        },
        "links": [{"href": RUNBOOK, "text": "Runbook"}, {"href": DASHBOARD, "text": "Dashboard"}],
        "client": "llmpulse",
    }


def test_pagerduty_resolve_carries_only_key_action_and_dedup() -> None:
    assert _roundtrip(render_pagerduty(RESOLVED, routing_key=PD_KEY)) == {
        "routing_key": PD_KEY,
        "event_action": "resolve",
        "dedup_key": "llmpulse-3f9c0a1b2c4d5e6f",
    }


def test_pagerduty_summary_limit_severity_map_and_source() -> None:
    body = render_pagerduty(
        alert(summary="s" * 5000, severity="warning", scope={}, labels={}, runbook_url=None, link=None),
        routing_key=PD_KEY,
        severity_map={"warning": "error"},
    )
    payload = body["payload"]
    assert len(payload["summary"]) == PAGERDUTY_SUMMARY_MAX
    assert payload["severity"] == "error"
    assert payload["source"] == "llmpulse"
    assert "component" not in payload and "group" not in payload and "links" not in body
    assert render_pagerduty(FIRING, routing_key=PD_KEY, source="llm-gateway")["payload"]["source"] == "llm-gateway"
    assert render_pagerduty(alert(severity="info"), routing_key=PD_KEY)["payload"]["severity"] == "info"


AM_LABELS = {
    "feature": "support-chat",
    "model": "gpt-4o",
    "team": "search",
    "oncall_rotation": "search-primary",
    "alertname": "ttft-p95-support-chat",
    "severity": "critical",
    "action": "page",
    "dedup_key": "llmpulse-3f9c0a1b2c4d5e6f",
}
AM_ANNOTATIONS = {
    "summary": "[critical] p95 TTFT 931 ms > 850 ms on support-chat",
    "description": DESCRIPTION,
    "runbook_url": RUNBOOK,
    "query": QUERY,
    "value": "931",
    "condition": "ttft_p95_ms > 850 for 3 windows",
    "dashboard_url": DASHBOARD,
}


def test_alertmanager_firing_ends_in_the_future() -> None:
    assert _roundtrip(render_alertmanager([FIRING], now=NOW, firing_ttl_s=240)) == [
        {
            "labels": AM_LABELS,
            "annotations": AM_ANNOTATIONS,
            "startsAt": "2026-11-18T11:08:00.250Z",
            "endsAt": "2026-11-18T11:12:01.000Z",  # NOW + 4 × 60 s
            "generatorURL": DASHBOARD,
        }
    ]


def test_alertmanager_resolved_ends_at_ended_at_with_identical_labels() -> None:
    assert _roundtrip(render_alertmanager([RESOLVED], now=NOW, firing_ttl_s=240)) == [
        {
            "labels": AM_LABELS,
            "annotations": {
                **AM_ANNOTATIONS,
                "summary": "[resolved] p95 TTFT 790 ms on support-chat",
                "value": "790",
            },
            "startsAt": "2026-11-18T11:08:00.250Z",
            "endsAt": "2026-11-18T11:32:00.000Z",
            "generatorURL": DASHBOARD,
        }
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("team", "team"),
        ("prompt-version", "prompt_version"),
        ("k8s.namespace", "k8s_namespace"),
        ("9lives", "_9lives"),
        ("", "_"),
        ("équipe", "_quipe"),
        ("_ok", "_ok"),
    ],
)
def test_label_names_are_sanitized(name: str, expected: str) -> None:
    assert sanitize_label_name(name) == expected


def test_reserved_labels_win_and_empty_values_are_left_out() -> None:
    labels = alertmanager_labels(
        alert(scope={"feature": "x"}, labels={"alertname": "spoof", "severity": "info", "variant": ""})
    )
    assert labels == {
        "feature": "x",
        "alertname": "ttft-p95-support-chat",
        "severity": "critical",
        "action": "page",
        "dedup_key": "llmpulse-3f9c0a1b2c4d5e6f",
    }


def test_alertmanager_leaves_out_empty_annotations_and_generator_url() -> None:
    (body,) = render_alertmanager(
        [alert(description="", query=None, runbook_url=None, link=None)], now=NOW, firing_ttl_s=60
    )
    assert set(body["annotations"]) == {"summary", "value", "condition"}
    assert "generatorURL" not in body


def test_console_two_lines() -> None:
    firing = render_console(FIRING).plain.splitlines()
    assert firing == [
        "● FIRING  critical/page  ttft-p95-support-chat  [critical] p95 TTFT 931 ms > 850 ms on support-chat",
        "    value 931 (ttft_p95_ms > 850 for 3 windows) · feature=support-chat model=gpt-4o"
        f" · runbook {RUNBOOK} · dashboard {DASHBOARD} · key llmpulse-3f9c0a1b2c4d5e6f",
    ]
    resolved = render_console(RESOLVED).plain.splitlines()
    assert resolved[0].startswith("✔ RESOLVED  critical/page  ttft-p95-support-chat")
    assert "lasted 23m 59s" in resolved[1]
    no_link = render_console(alert(link=None)).plain
    assert "query SELECT quantileTDigest" in no_link


def test_rfc3339_is_utc_with_milliseconds() -> None:
    paris = timezone(timedelta(hours=1))
    assert rfc3339(datetime(2026, 11, 18, 12, 0, 0, 123_456, tzinfo=paris)) == "2026-11-18T11:00:00.123Z"
    assert rfc3339(datetime(2026, 11, 18, 11, 0)) == "2026-11-18T11:00:00.000Z"  # naive: taken as UTC
    assert rfc3339(datetime(2026, 11, 18, 11, 0, tzinfo=UTC)) == "2026-11-18T11:00:00.000Z"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (931.0, "931"),
        (0.051234, "0.05123"),
        (12.3456, "12.35"),
        (None, "n/a"),
        (float("nan"), "n/a"),
        (2.5e7, "25000000"),
    ],
)
def test_format_value(value: float | None, text: str) -> None:
    assert format_value(value) == text


def test_webhook_extra_with_odd_types_still_serializes() -> None:
    body = render_webhook(alert(extra={"at": datetime(2026, 1, 1, tzinfo=UTC), "keys": ("a", "b"), "obj": object}))
    extra = _roundtrip(body)["extra"]  # type: ignore[index]
    assert extra["at"] == "2026-01-01T00:00:00.000Z"
    assert extra["keys"] == ["a", "b"]
    assert extra["obj"] == "<class 'object'>"
