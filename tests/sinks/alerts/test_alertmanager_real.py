"""The Alertmanager channel against a real Alertmanager (Debian's ``prometheus-alertmanager``), when installed.

The fake receivers check that we send what we mean; this checks that Alertmanager agrees:
it accepts the labels (it rejects names outside ``[a-zA-Z_][a-zA-Z0-9_]*`` with a 400), keeps
a firing alert open until its ``endsAt``, closes it on the resolve, and lets a silence on our
labels suppress it (silences are Alertmanager's, not ours).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from sinks.alerts import AlertDispatcher
from tests.deploy.prometheus import ALERTMANAGER, running_alertmanager
from tests.sinks.alerts.conftest import FAST, alert, channels

pytestmark = pytest.mark.skipif(
    ALERTMANAGER is None, reason="no Alertmanager binary (apt-get install prometheus-alertmanager)"
)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return orjson.loads(response.read())


def _post(url: str, body: Any) -> Any:
    request = urllib.request.Request(
        url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return orjson.loads(response.read())


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    config = tmp_path / "alertmanager.yml"
    config.write_text("route:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n")
    with running_alertmanager(config, tmp_path) as url:
        yield url


def test_real_alertmanager_keeps_silences_and_resolves_our_alert(alertmanager: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    firing = alert(started_at=now - timedelta(minutes=1))
    resolved = alert(state="resolved", started_at=now - timedelta(minutes=1), ended_at=now)
    with AlertDispatcher(channels({"name": "am", "type": "alertmanager", "url": alertmanager, **FAST})) as dispatcher:
        dispatcher.dispatch(firing)
        assert dispatcher.flush(5)
        assert dispatcher.stats()["am"].sent == 1  # a 400 (e.g. an unsanitized label name) would be a failure

        (shown,) = _get(alertmanager + "/api/v2/alerts")
        assert shown["labels"] == {
            "alertname": "ttft-p95-support-chat",
            "severity": "critical",
            "action": "page",
            "dedup_key": "llmpulse-3f9c0a1b2c4d5e6f",
            "feature": "support-chat",
            "model": "gpt-4o",
            "team": "search",
            "oncall_rotation": "search-primary",
        }
        assert shown["annotations"]["runbook_url"] == "https://runbooks.example.com/llm/ttft"
        assert shown["annotations"]["query"].startswith("SELECT quantileTDigest(0.95)(ttft_ms)")
        assert shown["status"]["state"] == "active"
        ends = datetime.fromisoformat(shown["endsAt"])
        assert timedelta(minutes=3) < ends - datetime.now(UTC) <= timedelta(minutes=4)  # 4 × resend interval

        # a silence is Alertmanager's business: match our labels, e.g. the incident's dedup_key
        _post(
            alertmanager + "/api/v2/silences",
            {
                "matchers": [{"name": "dedup_key", "value": firing.dedup_key, "isRegex": False, "isEqual": True}],
                "startsAt": (now - timedelta(minutes=1)).isoformat(),
                "endsAt": (now + timedelta(hours=1)).isoformat(),
                "createdBy": "pytest",
                "comment": "known incident",
            },
        )
        (shown,) = _get(alertmanager + "/api/v2/alerts")
        assert shown["status"]["state"] == "suppressed" and shown["status"]["silencedBy"]

        dispatcher.dispatch(resolved)
        assert dispatcher.flush(5)
        assert dispatcher.stats()["am"].sent == 2
        assert _get(alertmanager + "/api/v2/alerts") == []  # endsAt = ended_at: closed
