"""Prometheus and Alertmanager configuration, checked with the real tools (Debian's ``prometheus``
and ``prometheus-alertmanager`` packages) since neither server runs in Docker here:
``promtool check config``/``check rules``/``test rules``, ``amtool check-config`` and
``amtool config routes test``, and a real Alertmanager process for inhibition.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from schemas.config import MetricsSettings
from tests.deploy.prometheus import (
    ALERTMANAGER,
    AMTOOL,
    PROMTOOL,
    THIRD_PARTY,
    exported_names,
    metric_names,
    running_alertmanager,
)

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*_test.yml"))
ALERTMANAGER_YML = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="no promtool (apt-get install prometheus)")
needs_amtool = pytest.mark.skipif(AMTOOL is None, reason="no amtool (apt-get install prometheus-alertmanager)")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False, cwd=ROOT)


def rules() -> list[dict[str, Any]]:
    return [
        rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]
    ]


# ---- Prometheus --------------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_config_and_its_rule_files() -> None:
    proc = run(str(PROMTOOL), "check", "config", str(PROMETHEUS_YML))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in proc.stdout + proc.stderr
    proc = run(str(PROMTOOL), "check", "rules", *map(str, RULE_FILES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS, "deploy/prometheus/tests/*_test.yml"
    tested = {t["alertname"] for path in RULE_TESTS for case in yaml.safe_load(path.read_text())["tests"]
              for t in case.get("alert_rule_test", [])}  # fmt: skip
    assert {"LlmpulseConsumerLagGrowing", "LlmpulseConsumerLagCritical", "LlmpulseDeadLetterRateHigh"} <= tested
    assert tested == {r["alert"] for r in rules()}, "every alerting rule has a unit test"
    proc = run(str(PROMTOOL), "test", "rules", *map(str, RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_use_exported_metrics_and_say_what_to_do() -> None:
    known = exported_names() | set(THIRD_PARTY)
    for rule in rules():
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule['alert']}: {sorted(unknown)} is not exported (sinks/metrics.py, llmpulse/server.py)"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["labels"]["component"] in {"pipeline", "alerting"}
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])


def test_every_runbook_link_has_its_runbook() -> None:
    readme = (ROOT / "README.md").read_text()
    for rule in rules():
        anchor = rule["annotations"]["runbook_url"].removeprefix("README.md#")
        assert f'<a id="{anchor}"></a>' in readme, f"{rule['alert']}: no runbook {anchor} in README.md"


def test_scrape_targets_are_the_compose_services_on_their_metrics_ports() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets["llmpulse-worker"] == [f"worker:{MetricsSettings().port}"]
    assert targets["llmpulse-server"] == ["server:8080"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for job_targets in targets.values():
        for target in job_targets:
            host = target.split(":")[0]
            assert host == "localhost" or host in compose, f"{target}: no such compose service"
    (alertmanagers,) = config["alerting"]["alertmanagers"]
    assert alertmanagers["static_configs"][0]["targets"] == ["alertmanager:9093"]


# ---- Alertmanager ------------------------------------------------------------------------------


@needs_amtool
def test_amtool_accepts_the_alertmanager_config() -> None:
    proc = run(str(AMTOOL), "check-config", str(ALERTMANAGER_YML))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_amtool
@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        ("alertname=ttft-p95 severity=critical dedup_key=llmpulse-0a1b feature=search", "oncall-pagerduty"),
        ("alertname=refusals severity=warning dedup_key=llmpulse-0a1b", "team-webhook"),
        ("alertname=tokens severity=info dedup_key=llmpulse-0a1b", "blackhole"),
        ("alertname=LlmpulseConsumerLagCritical severity=critical component=pipeline", "oncall-pagerduty"),
        ("alertname=LlmpulseDeadLetterRateHigh severity=warning component=pipeline", "team-webhook"),
        ("alertname=LlmpulseAlertDeliveryFailing severity=warning component=alerting", "team-webhook"),
    ],
)
def test_alerts_route_by_severity(labels: str, receiver: str) -> None:
    proc = run(str(AMTOOL), "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}",
               f"--verify.receivers={receiver}", *labels.split())  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_receivers_read_their_secrets_from_files() -> None:
    text = ALERTMANAGER_YML.read_text()
    config = yaml.safe_load(text)
    receivers = {r["name"]: r for r in config["receivers"]}
    assert receivers["oncall-pagerduty"]["pagerduty_configs"][0]["routing_key_file"].startswith("/run/secrets/")
    auth = receivers["team-webhook"]["webhook_configs"][0]["http_config"]["authorization"]
    assert auth["credentials_file"].startswith("/run/secrets/")
    assert "routing_key:" not in text and "credentials:" not in text


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    """Our alertmanager.yml in a real Alertmanager, its secret files pointed at placeholders here."""
    if ALERTMANAGER is None:
        pytest.skip("no Alertmanager binary (apt-get install prometheus-alertmanager)")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name in ("pagerduty_routing_key", "alert_webhook_token"):
        (secrets / name).write_text("placeholder\n")
    config = tmp_path / "alertmanager.yml"
    config.write_text(ALERTMANAGER_YML.read_text().replace("/run/secrets/", f"{secrets}/"))
    with running_alertmanager(config, tmp_path) as url:
        yield url


def _alert(**labels: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"labels": labels, "annotations": {"summary": "test"}, "startsAt": (now - timedelta(minutes=5)).isoformat(),
            "endsAt": (now + timedelta(hours=1)).isoformat()}  # fmt: skip


def test_inhibition_in_a_real_alertmanager(alertmanager: str) -> None:
    w1 = {"job": "llmpulse-worker", "instance": "w1:9464", "component": "pipeline"}
    w2 = {**w1, "instance": "w2:9464"}
    alerts = [
        _alert(alertname="LlmpulseTargetDown", severity="critical", **w1),
        _alert(alertname="LlmpulseDeadLetterRateHigh", severity="warning", **w1),  # explained by the outage
        _alert(alertname="LlmpulseDeadLetterRateHigh", severity="warning", **w2),  # another worker: stays
        _alert(alertname="LlmpulseConsumerLagCritical", severity="critical", **w2),
        _alert(alertname="LlmpulseConsumerLagGrowing", severity="warning", **w2),  # said already
    ]
    request = urllib.request.Request(alertmanager + "/api/v2/alerts", data=orjson.dumps(alerts), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    urllib.request.urlopen(request, timeout=5).close()
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(alertmanager + "/api/v2/alerts", timeout=5) as response:
            shown = orjson.loads(response.read())
        state = {(a["labels"]["alertname"], a["labels"]["instance"]): a["status"]["state"] for a in shown}
        if (len(state) == len(alerts) and "suppressed" in state.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert state == {
        ("LlmpulseTargetDown", "w1:9464"): "active",
        ("LlmpulseDeadLetterRateHigh", "w1:9464"): "suppressed",
        ("LlmpulseDeadLetterRateHigh", "w2:9464"): "active",
        ("LlmpulseConsumerLagCritical", "w2:9464"): "active",
        ("LlmpulseConsumerLagGrowing", "w2:9464"): "suppressed",
    }


def test_the_alertmanager_metrics_we_use_exist(alertmanager: str) -> None:
    """The third-party names the rules and dashboards rely on, scraped from a real Alertmanager."""
    with urllib.request.urlopen(alertmanager + "/metrics", timeout=5) as response:
        text = response.read().decode()
    for name in THIRD_PARTY:
        if name.startswith("alertmanager_"):
            assert f"\n{name}{{" in text, name
