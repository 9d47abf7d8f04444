"""AlertDispatcher against real local HTTP receivers: exact bodies on the wire, routing, retries,
isolation of slow or dead channels, bounded queues, Alertmanager re-sends, and secrets kept out of logs."""

from __future__ import annotations

import base64
import io
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from schemas.channels import ChannelConfig, SecretUnavailable
from sinks.alerts import AlertDispatcher, render_slack
from tests.sinks.alerts.conftest import FAST, FIRING, NOW, RESOLVED, Receiver, Reply, alert, channels, eventually
from tests.sinks.alerts.test_render import (
    AM_ANNOTATIONS,
    AM_LABELS,
    DASHBOARD,
    PD_KEY,
    WEBHOOK_FIRING,
)

SLACK_SECRET = "XoXbSlackTokenZ9y8x7w6"
PD_SECRET = "PDroutingKeyQ1w2e3r4t5y6u7i8o9p0"
HEADER_SECRET = "Bearer hdr-S3cr3t-a1b2c3"
AM_PASSWORD = "am-P4ssw0rd-zyx"

Make = Callable[..., Receiver]


@pytest.fixture
def dispatchers() -> Iterator[Callable[..., AlertDispatcher]]:
    made: list[AlertDispatcher] = []

    def make(configs: list[ChannelConfig], **kwargs: Any) -> AlertDispatcher:
        dispatcher = AlertDispatcher(configs, **kwargs)
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        dispatcher.close(0.2)


def test_each_service_gets_its_exact_body_firing_then_resolved(
    receivers: Make, dispatchers: Callable[..., AlertDispatcher]
) -> None:
    hook, slack, pd, am = receivers(), receivers(), receivers(Reply(202, '{"status":"success"}')), receivers()
    dispatcher = dispatchers(
        channels(
            {"name": "hook", "type": "webhook", "url": hook.url + "/in", "headers": {"X-Token": "t0k"}, **FAST},
            {"name": "slack", "type": "slack", "webhook_url": slack.url + "/services/T0/B0/abcdefgh", **FAST},
            {
                "name": "pd",
                "type": "pagerduty",
                "routing_key": PD_KEY,
                "events_url": pd.url + "/v2/enqueue",
                **FAST,
            },
            {
                "name": "am",
                "type": "alertmanager",
                "url": am.url,
                "basic_auth": {"username": "llmpulse", "password": "pw"},
                **FAST,
            },
        ),
        clock=NOW.timestamp,
    )
    assert dispatcher.dispatch(FIRING) == ["hook", "slack", "pd", "am"]
    assert dispatcher.dispatch(RESOLVED) == ["hook", "slack", "pd", "am"]

    got = hook.wait_for(2)
    assert [r.path for r in got] == ["/in", "/in"]
    assert got[0].headers["X-Token"] == "t0k" and got[0].headers["Content-Type"] == "application/json"
    assert got[0].body == WEBHOOK_FIRING
    assert got[1].body["state"] == "resolved" and got[1].body["ended_at"] == "2026-11-18T11:32:00.000Z"

    got = slack.wait_for(2)
    assert got[0].path == "/services/T0/B0/abcdefgh"
    assert [r.body for r in got] == [render_slack(FIRING), render_slack(RESOLVED)]
    assert got[0].body["blocks"][0]["text"]["text"] == ":rotating_light: FIRING [critical] ttft-p95-support-chat"
    assert got[1].body["blocks"][0]["text"]["text"] == ":white_check_mark: RESOLVED [critical] ttft-p95-support-chat"

    got = pd.wait_for(2)
    assert got[0].path == "/v2/enqueue"
    assert got[0].body["event_action"] == "trigger" and got[0].body["payload"]["severity"] == "critical"
    assert got[0].body["links"] == [
        {"href": "https://runbooks.example.com/llm/ttft", "text": "Runbook"},
        {"href": DASHBOARD, "text": "Dashboard"},
    ]
    assert got[1].body == {"routing_key": PD_KEY, "event_action": "resolve", "dedup_key": FIRING.dedup_key}

    got = am.wait_for(2)
    assert [r.path for r in got] == ["/api/v2/alerts", "/api/v2/alerts"]
    assert got[0].headers["Authorization"] == "Basic " + base64.b64encode(b"llmpulse:pw").decode()
    assert got[0].body == [
        {
            "labels": AM_LABELS,
            "annotations": AM_ANNOTATIONS,
            "startsAt": "2026-11-18T11:08:00.250Z",
            "endsAt": "2026-11-18T11:12:01.000Z",
            "generatorURL": DASHBOARD,
        }
    ]
    assert got[1].body[0]["labels"] == AM_LABELS and got[1].body[0]["endsAt"] == "2026-11-18T11:32:00.000Z"

    assert dispatcher.flush(2)
    assert {name: s.sent for name, s in dispatcher.stats().items()} == {"hook": 2, "slack": 2, "pd": 2, "am": 2}


def test_routes_by_severity_action_labels_and_explicit_channels(
    receivers: Make, dispatchers: Callable[..., AlertDispatcher]
) -> None:
    search, everyone, pager, audit = receivers(), receivers(), receivers(), receivers()
    dispatcher = dispatchers(
        channels(
            {"name": "slack-search", "type": "slack", "webhook_url": search.url, "matchers": ["team=search"], **FAST},
            {"name": "slack-all", "type": "slack", "webhook_url": everyone.url, "min_severity": "warning", **FAST},
            {
                "name": "pd",
                "type": "webhook",
                "url": pager.url,
                "min_severity": "critical",
                "actions": ["page", "rollback"],
                **FAST,
            },
            {"name": "audit", "type": "webhook", "url": audit.url, "default": False, **FAST},
        )
    )
    dispatcher.dispatch(alert(dedup_key="a", severity="info", labels={"team": "search"}))
    dispatcher.dispatch(alert(dedup_key="b", severity="warning", labels={"team": "ads"}))
    dispatcher.dispatch(alert(dedup_key="c", severity="critical", action="notify", labels={"team": "ads"}))
    dispatcher.dispatch(alert(dedup_key="d", severity="critical", action="rollback", labels={"team": "search"}))
    dispatcher.dispatch(alert(dedup_key="e", channels=("audit",), labels={"team": "search"}))
    assert dispatcher.flush(3)

    def keys(receiver: Receiver) -> list[str]:
        bodies = receiver.bodies()
        return sorted(b["dedup_key"] if "dedup_key" in b else b["text"] for b in bodies)

    assert len(search.bodies()) == 2  # a, d (e named another channel)
    assert len(everyone.bodies()) == 3  # b, c, d
    assert keys(pager) == ["d"]
    assert keys(audit) == ["e"]


def test_retries_500_and_429_with_backoff_and_retry_after_then_succeeds(
    receivers: Make, dispatchers: Callable[..., AlertDispatcher]
) -> None:
    hook = receivers().reply(
        Reply(500, "boom"), Reply(429, "slow down", headers={"Retry-After": "0.3"}), Reply(503), Reply(200)
    )
    dispatcher = dispatchers(channels({"name": "hook", "type": "webhook", "url": hook.url, **FAST}))
    dispatcher.dispatch(FIRING)
    got = hook.wait_for(4)
    eventually(lambda: dispatcher.stats()["hook"].sent == 1)
    gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
    assert gaps[0] >= 0.04  # 0.05 s backoff, up to 20% jitter off
    assert gaps[1] >= 0.29  # Retry-After: 0.3 beats the 0.1 s backoff
    assert gaps[2] >= 0.16  # 0.2 s (capped), jittered
    assert all(gap < 1.0 for gap in gaps)
    assert all(r.body == got[0].body for r in got)
    stats = dispatcher.stats()["hook"]
    assert (stats.sent, stats.retried, stats.failed) == (1, 3, 0)


def test_gives_up_after_the_configured_retries(
    receivers: Make, dispatchers: Callable[..., AlertDispatcher], caplog: pytest.LogCaptureFixture
) -> None:
    hook = receivers(Reply(503, "unavailable"))
    dispatcher = dispatchers(channels({"name": "hook", "type": "webhook", "url": hook.url, **FAST, "retries": 2}))
    with caplog.at_level(logging.WARNING, logger="llmpulse.alerts"):
        dispatcher.dispatch(FIRING)
        hook.wait_for(3)
        assert dispatcher.flush(2)
    assert len(hook.requests) == 3
    stats = dispatcher.stats()["hook"]
    assert (stats.sent, stats.retried, stats.failed) == (0, 2, 1)
    assert "gave up on firing alert llmpulse-3f9c0a1b2c4d5e6f" in caplog.text
    assert "after 3 attempt(s): HTTP 503 'unavailable'" in caplog.text


@pytest.mark.parametrize(
    ("status", "body"), [(400, "invalid_payload"), (404, "no_service"), (410, "channel_is_archived"), (301, "")]
)
def test_other_4xx_and_redirects_are_not_retried_and_logged(
    status: int,
    body: str,
    receivers: Make,
    dispatchers: Callable[..., AlertDispatcher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    slack = receivers(Reply(status, body, headers={"Location": "https://elsewhere.example/x"} if status == 301 else {}))
    dispatcher = dispatchers(channels({"name": "slack", "type": "slack", "webhook_url": slack.url, **FAST}))
    with caplog.at_level(logging.ERROR, logger="llmpulse.alerts"):
        dispatcher.dispatch(FIRING)
        assert dispatcher.flush(2)
        time.sleep(0.15)  # longer than the first backoff: a retry would have arrived
    assert len(slack.requests) == 1
    stats = dispatcher.stats()["slack"]
    assert (stats.sent, stats.retried, stats.failed) == (0, 0, 1)
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert f"alert channel 'slack' (slack → {slack.url}) rejected firing alert" in record.getMessage()
    assert f"HTTP {status}" in record.getMessage() and "not retried" in record.getMessage()
    assert body in record.getMessage()


def test_hanging_and_dead_channels_do_not_block_dispatch_or_other_channels(
    receivers: Make, dispatchers: Callable[..., AlertDispatcher], dead_url: str
) -> None:
    hang, healthy = receivers(Reply(delay=float("inf"))), receivers()
    dispatcher = dispatchers(
        channels(
            {"name": "hang", "type": "webhook", "url": hang.url, **FAST, "timeout_s": 30},
            {"name": "dead", "type": "webhook", "url": dead_url, **FAST},
            {"name": "ok", "type": "webhook", "url": healthy.url, **FAST},
        )
    )
    durations = []
    sent_at = time.monotonic()
    for i in range(20):
        start = time.perf_counter()
        dispatcher.dispatch(alert(dedup_key=f"k{i}"))
        durations.append(time.perf_counter() - start)
    assert max(durations) < 0.005, durations

    got = healthy.wait_for(20, timeout=1.0)
    assert got[-1].at - sent_at < 1.0
    assert sorted(r.body["dedup_key"] for r in got) == sorted(f"k{i}" for i in range(20))
    hang.wait_for(1)  # the hanging channel really is stuck in a request meanwhile
    eventually(lambda: dispatcher.stats()["ok"].sent == 20)
    assert dispatcher.stats()["hang"].sent == 0

    start = time.monotonic()
    dispatcher.close(timeout=0.3)
    assert time.monotonic() - start < 1.5  # close gives up on the hanging channel instead of waiting 30 s
    stats = dispatcher.stats()
    assert stats["hang"].dropped == 20
    assert stats["dead"].failed + stats["dead"].dropped == 20


def test_full_queue_drops_the_oldest_with_a_counter_and_a_log_line(
    receivers: Make, dispatchers: Callable[..., AlertDispatcher], caplog: pytest.LogCaptureFixture
) -> None:
    hang = receivers(Reply(delay=float("inf")))
    dispatcher = dispatchers(
        channels({"name": "hang", "type": "webhook", "url": hang.url, **FAST, "concurrency": 1, "queue_size": 3})
    )
    with caplog.at_level(logging.WARNING, logger="llmpulse.alerts"):
        dispatcher.dispatch(alert(dedup_key="k0"))
        hang.wait_for(1)  # k0 is in flight, hanging
        for i in range(1, 10):
            dispatcher.dispatch(alert(dedup_key=f"k{i}"))
        eventually(lambda: dispatcher.stats()["hang"].dropped == 6)  # k1..k6 pushed out by k7..k9
        eventually(lambda: "queue full" in caplog.text)  # logged just after the counter moved
    assert dispatcher.stats()["hang"].queued == 3
    assert "alert channel 'hang' (webhook): queue full (3 waiting), dropped the oldest: firing alert k1" in caplog.text
    assert caplog.text.count("queue full") == 1  # one line per interval, not one per drop
    dispatcher.close(timeout=0.1)
    assert dispatcher.stats()["hang"].dropped == 10  # plus the 3 queued and the one in flight at close


def test_inbox_is_bounded_when_the_delivery_thread_lags(
    receivers: Make, dispatchers: Callable[..., AlertDispatcher], caplog: pytest.LogCaptureFixture
) -> None:
    hook = receivers()
    # the delivery thread picks up the inbox a minute after the first alert: it "lags"
    dispatcher = dispatchers(
        channels({"name": "hook", "type": "webhook", "url": hook.url, **FAST}), pickup_delay_s=60, inbox_size=5
    )
    with caplog.at_level(logging.WARNING, logger="llmpulse.alerts"):
        for i in range(8):
            dispatcher.dispatch(alert(dedup_key=f"k{i}"))
    stats = dispatcher.stats()["hook"]
    assert (stats.dropped, stats.queued) == (3, 5)
    assert "5 alerts waiting for the delivery thread, dropped the oldest: firing alert k0 for hook" in caplog.text
    dispatcher.close(timeout=2)  # close still delivers what waits in the inbox
    assert sorted(r.body["dedup_key"] for r in hook.requests) == ["k3", "k4", "k5", "k6", "k7"]
    assert dispatcher.stats()["hook"].sent == 5


def test_each_burst_wakes_the_delivery_thread_and_an_idle_one_sleeps(
    dispatchers: Callable[..., AlertDispatcher],
) -> None:
    stream = io.StringIO()
    dispatcher = dispatchers(channels({"name": "console", "type": "console"}), console_stream=stream)
    loop = dispatcher._loop
    # idle, the delivery thread has nothing scheduled: it wakes for an alert, not on a timer
    # (the console channel: an HTTP one keeps aiohttp's keep-alive timers)
    eventually(lambda: not loop._scheduled)  # type: ignore[attr-defined]
    for i in range(50):  # a burst: one wake-up, one pick-up
        dispatcher.dispatch(alert(dedup_key=f"a{i}"))
    eventually(lambda: dispatcher.stats()["console"].sent == 50)
    eventually(lambda: not loop._scheduled)  # type: ignore[attr-defined]
    dispatcher.dispatch(alert(dedup_key="later"))  # after the pick-up: wakes it again
    eventually(lambda: dispatcher.stats()["console"].sent == 51)
    assert "later" in stream.getvalue()


def test_one_incident_stays_in_order_through_retries(
    receivers: Make, dispatchers: Callable[..., AlertDispatcher]
) -> None:
    hook = receivers().reply(Reply(500), Reply(200), Reply(200))
    dispatcher = dispatchers(channels({"name": "hook", "type": "webhook", "url": hook.url, **FAST, "concurrency": 4}))
    dispatcher.dispatch(FIRING)
    dispatcher.dispatch(RESOLVED)
    got = hook.wait_for(3)
    assert [r.body["state"] for r in got] == ["firing", "firing", "resolved"]


def test_alertmanager_firing_alerts_are_resent_until_resolved(
    receivers: Make, dispatchers: Callable[..., AlertDispatcher]
) -> None:
    am = receivers()
    dispatcher = dispatchers(
        channels({"name": "am", "type": "alertmanager", "url": am.url, **FAST, "resend_interval_s": 0.15}),
        clock=NOW.timestamp,
    )
    dispatcher.dispatch(FIRING)
    got = am.wait_for(3, timeout=2)
    for request in got:
        (sent,) = request.body
        assert sent["labels"] == AM_LABELS
        assert sent["endsAt"] == "2026-11-18T11:08:01.600Z"  # still open: NOW + 4 × 0.15 s
    dispatcher.dispatch(RESOLVED)
    deadline = time.monotonic() + 2
    while not any(r.body[0]["endsAt"] == "2026-11-18T11:32:00.000Z" for r in am.requests):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    count = len(am.requests)
    time.sleep(0.4)  # more than two intervals: nothing left to re-send
    assert len(am.requests) == count
    stats = dispatcher.stats()["am"]
    assert stats.sent == 2 and stats.resent >= 2


def test_refresh_after_restart_reannounces_to_alertmanager_only(
    receivers: Make, dispatchers: Callable[..., AlertDispatcher]
) -> None:
    am, pd = receivers(), receivers()
    dispatcher = dispatchers(
        channels(
            {"name": "am", "type": "alertmanager", "url": am.url, **FAST},
            {"name": "pd", "type": "pagerduty", "routing_key": PD_KEY, "events_url": pd.url, **FAST},
        ),
        clock=NOW.timestamp,
    )
    other_resolved = alert(dedup_key="other", state="resolved", ended_at=NOW)
    assert dispatcher.refresh([FIRING, other_resolved]) == ["am"]
    (got,) = am.wait_for(1)
    assert [a["labels"]["dedup_key"] for a in got.body] == [FIRING.dedup_key]
    assert got.body[0]["endsAt"] == "2026-11-18T11:12:01.000Z"
    eventually(lambda: dispatcher.stats()["am"].resent == 1)
    time.sleep(0.1)
    assert pd.requests == []  # no second page after a restart


def test_close_drains_what_is_queued(receivers: Make, dispatchers: Callable[..., AlertDispatcher]) -> None:
    hook = receivers(Reply(delay=0.02))
    dispatcher = dispatchers(channels({"name": "hook", "type": "webhook", "url": hook.url, **FAST, "concurrency": 1}))
    for i in range(10):
        dispatcher.dispatch(alert(dedup_key=f"k{i}"))
    dispatcher.close(timeout=3)
    assert [r.body["dedup_key"] for r in hook.requests] == [f"k{i}" for i in range(10)]
    assert dispatcher.stats()["hook"].sent == 10
    assert dispatcher.dispatch(alert(dedup_key="late")) == []
    assert dispatcher.stats()["hook"].dropped == 1


def test_console_channel_writes_readable_lines() -> None:
    stream = io.StringIO()
    with AlertDispatcher(channels({"name": "console", "type": "console"}), console_stream=stream) as dispatcher:
        dispatcher.dispatch(FIRING)
        dispatcher.dispatch(RESOLVED)
        assert dispatcher.flush(2)
    text = stream.getvalue()
    assert "● FIRING  critical/page  ttft-p95-support-chat" in text
    assert "✔ RESOLVED  critical/page  ttft-p95-support-chat" in text
    assert "runbook https://runbooks.example.com/llm/ttft" in text


def test_missing_secret_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMPULSE_TEST_NO_SUCH_VAR", raising=False)
    with pytest.raises(SecretUnavailable, match="LLMPULSE_TEST_NO_SUCH_VAR"):
        AlertDispatcher(channels({"name": "s", "type": "slack", "webhook_url_env": "LLMPULSE_TEST_NO_SUCH_VAR"}))


def test_secrets_never_reach_the_logs(
    receivers: Make,
    dispatchers: Callable[..., AlertDispatcher],
    dead_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # receivers that echo the request path and Authorization header back in their errors
    slack = receivers(Reply(404, "no_service", echo=True))
    pd = receivers(Reply(500, "internal", echo=True))
    am = receivers(Reply(401, "unauthorized", echo=True))
    hook = receivers(Reply(403, "forbidden", echo=True))
    dispatcher = dispatchers(
        channels(
            {"name": "slack", "type": "slack", "webhook_url": f"{slack.url}/services/T0/B0/{SLACK_SECRET}", **FAST},
            {"name": "pd", "type": "pagerduty", "routing_key": PD_SECRET, "events_url": pd.url, **FAST, "retries": 1},
            {
                "name": "am",
                "type": "alertmanager",
                "url": am.url,
                "basic_auth": {"username": "llmpulse", "password": AM_PASSWORD},
                **FAST,
            },
            {
                "name": "hook",
                "type": "webhook",
                "url": f"{hook.url}/h/{SLACK_SECRET}?token={PD_SECRET}",
                "headers": {"Authorization": HEADER_SECRET},
                **FAST,
            },
            {
                "name": "dead",
                "type": "slack",
                "webhook_url": f"{dead_url}/services/{SLACK_SECRET}",
                **FAST,
                "retries": 1,
            },
        )
    )
    with caplog.at_level(logging.DEBUG):
        dispatcher.dispatch(FIRING)
        assert dispatcher.flush(3)
        dispatcher.close(0.5)
    # the failures were logged, with the services' own words...
    for expected in ("no_service", "internal", "unauthorized", "forbidden", "Cannot connect"):
        assert expected in caplog.text
    # ...and never a secret, in any shape
    basic = base64.b64encode(f"llmpulse:{AM_PASSWORD}".encode()).decode()
    for secret in (SLACK_SECRET, PD_SECRET, HEADER_SECRET, "hdr-S3cr3t-a1b2c3", AM_PASSWORD, basic):
        assert secret not in caplog.text
    assert repr(dispatcher.stats())  # stats are plain numbers: safe to export
