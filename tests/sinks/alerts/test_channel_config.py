"""``alerting.channels``: the YAML shape, the discriminated union, selectors, and secrets that never show."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from schemas.channels import (
    AlertChannels,
    AlertmanagerChannelConfig,
    ConsoleChannelConfig,
    PagerDutyChannelConfig,
    SecretUnavailable,
    SlackChannelConfig,
    WebhookChannelConfig,
)
from sinks.alerts.channels import build_channel
from sinks.alerts.routing import ChannelRouter
from tests.sinks.alerts.conftest import alert

SECRET = "T0KEN-Sup3rS3cret-9f8e7d"

EXAMPLE = f"""
channels:
  console:
    type: console
  slack-search:
    type: slack
    webhook_url: https://hooks.slack.com/services/T000/B000/{SECRET}
    min_severity: warning
    matchers: ["team=search"]
  slack-all:
    type: slack
    webhook_url_env: LLMPULSE_TEST_SLACK_URL
    send_resolved: false
  pagerduty:
    type: pagerduty
    routing_key_file: {{key_file}}
    min_severity: critical
    actions: [page]
    severity_map: {{warning: error}}
  alertmanager:
    type: alertmanager
    urls: ["http://am-0:9093", "http://am-1:9093/"]
    basic_auth: {{username: llmpulse, password_env: LLMPULSE_TEST_AM_PASSWORD}}
    resend_interval_s: 30
  audit:
    type: webhook
    url: https://audit.example.com/hooks/{SECRET}
    headers: {{Authorization: "Bearer {SECRET}"}}
    default: false
    timeout_s: 3
    retries: 2
"""


def _load(tmp_path: Path) -> AlertChannels:
    key_file = tmp_path / "pd.key"
    key_file.write_text(SECRET + "\n")
    return AlertChannels.model_validate(yaml.safe_load(EXAMPLE.replace("{key_file}", str(key_file))))


def test_yaml_mapping_form_builds_typed_channels(tmp_path: Path) -> None:
    config = _load(tmp_path)
    kinds = {c.name: type(c) for c in config.channels}
    assert kinds == {
        "console": ConsoleChannelConfig,
        "slack-search": SlackChannelConfig,
        "slack-all": SlackChannelConfig,
        "pagerduty": PagerDutyChannelConfig,
        "alertmanager": AlertmanagerChannelConfig,
        "audit": WebhookChannelConfig,
    }
    am = config.channels[4]
    assert isinstance(am, AlertmanagerChannelConfig)
    assert am.alerts_endpoints() == ["http://am-0:9093/api/v2/alerts", "http://am-1:9093/api/v2/alerts"]
    assert am.firing_ttl_s == 120
    pd = config.channels[3]
    assert isinstance(pd, PagerDutyChannelConfig)
    assert pd.events_url == "https://events.pagerduty.com/v2/enqueue"
    assert pd.secret_routing_key() == SECRET  # read from the file, stripped
    audit = config.channels[5]
    assert isinstance(audit, WebhookChannelConfig)
    assert (audit.timeout_s, audit.retries, audit.default) == (3.0, 2, False)


def test_list_form_and_single_url_alias() -> None:
    config = AlertChannels.model_validate(
        {
            "channels": [
                {"name": "am", "type": "alertmanager", "url": "http://am:9093"},
                {"name": "c", "type": "console"},
            ]
        }
    )
    am = config.channels[0]
    assert isinstance(am, AlertmanagerChannelConfig) and am.urls == ["http://am:9093"]


def test_secrets_never_appear_in_repr_str_or_dump(tmp_path: Path) -> None:
    config = _load(tmp_path)
    for text in (repr(config), str(config), config.model_dump_json(), str(config.model_dump())):
        assert SECRET not in text


@pytest.mark.parametrize(
    "channel",
    [
        {"name": "x", "type": "slack", "webhook_url": f"ftp://{SECRET}"},  # not http(s)
        {"name": "x", "type": "slack", "webhok_url": f"https://h/{SECRET}"},  # misspelled key
        {"name": "x", "type": "slak", "webhook_url": f"https://h/{SECRET}"},  # unknown type
        {"name": "x", "webhook_url": f"https://h/{SECRET}"},  # no type
        {"name": "x", "type": "slack", "webhook_url": f"https://h/{SECRET}", "webhook_url_env": "E"},  # two sources
        {"name": "x", "type": "pagerduty", "routing_key": SECRET, "timeout_s": -1},
        {"name": "x", "type": "webhook", "url": f"https://h/{SECRET}", "headers": {"bad header": SECRET}},
        {"name": "x", "type": "alertmanager", "url": "http://am", "basic_auth": f"user:{SECRET}"},
        {"name": "x", "type": "alertmanager", "url": "http://am", "basic_auth": {"username": "u", "pasword": SECRET}},
    ],
)
def test_validation_errors_never_show_a_secret(channel: dict[str, object]) -> None:
    with pytest.raises(ValidationError) as info:
        AlertChannels.model_validate({"channels": [channel]})
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value.errors())


def test_errors_name_the_channel_and_key() -> None:
    with pytest.raises(ValidationError) as info:
        AlertChannels.model_validate({"channels": {"pd": {"type": "pagerduty"}}})
    (error,) = info.value.errors()
    assert error["loc"] == ("channels", 0, "pagerduty", "routing_key_file")
    assert "one of routing_key, routing_key_env or routing_key_file is required" in error["msg"]

    with pytest.raises(ValidationError) as info:
        AlertChannels.model_validate({"channels": {"a": {"type": "console", "name": "b"}}})
    assert "channel 'a' says its name is 'b'" in str(info.value)

    with pytest.raises(ValidationError, match="used twice"):
        AlertChannels.model_validate({"channels": [{"type": "console", "name": "c"}, {"type": "console", "name": "c"}]})

    with pytest.raises(ValidationError, match="expected a matcher like"):
        AlertChannels.model_validate({"channels": [{"type": "console", "name": "c", "matchers": ["team search"]}]})

    with pytest.raises(ValidationError, match="invalid regular expression"):
        AlertChannels.model_validate({"channels": [{"type": "console", "name": "c", "matchers": ["team=~("]}]})


def test_env_secrets_resolve_at_build_time_and_fail_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _load(tmp_path)
    slack_all = config.channels[2]
    monkeypatch.delenv("LLMPULSE_TEST_SLACK_URL", raising=False)
    with pytest.raises(SecretUnavailable, match=r"slack-all\.webhook_url_env: environment variable LLMPULSE_TEST"):
        build_channel(slack_all)
    monkeypatch.setenv("LLMPULSE_TEST_SLACK_URL", "not a url " + SECRET)
    with pytest.raises(SecretUnavailable) as info:
        build_channel(slack_all)
    assert SECRET not in str(info.value)
    monkeypatch.setenv("LLMPULSE_TEST_SLACK_URL", f"https://hooks.slack.com/services/{SECRET}")
    assert isinstance(slack_all, SlackChannelConfig)
    assert slack_all.secret_webhook_url() == f"https://hooks.slack.com/services/{SECRET}"
    missing = PagerDutyChannelConfig(name="p", routing_key_file=tmp_path / "absent")
    with pytest.raises(SecretUnavailable, match=r"p\.routing_key_file: cannot read"):
        build_channel(missing)


def test_routing_by_default_severity_action_labels_and_explicit_names(tmp_path: Path) -> None:
    router = ChannelRouter(_load(tmp_path).channels)
    critical_search = alert(severity="critical", action="page", labels={"team": "search"})
    assert router.route(critical_search) == ["console", "slack-search", "slack-all", "pagerduty", "alertmanager"]
    # warning: no PagerDuty (critical only); other team: not the search channel
    assert router.route(alert(severity="warning", labels={"team": "ads"})) == ["console", "slack-all", "alertmanager"]
    # info: below slack-search's min_severity even for team search
    assert router.route(alert(severity="info", labels={"team": "search"})) == ["console", "slack-all", "alertmanager"]
    # critical but notify only: PagerDuty takes pages only
    assert "pagerduty" not in router.route(alert(action="notify"))
    # resolved: slack-all does not want resolves; routing is otherwise the same as firing
    assert router.route(alert(state="resolved", labels={"team": "search"})) == [
        "console",
        "slack-search",
        "pagerduty",
        "alertmanager",
    ]
    # explicit channels: only those, a non-default one included, unknown names ignored
    assert router.route(alert(channels=("audit", "slack-search", "nope"), labels={"team": "search"})) == [
        "audit",
        "slack-search",
    ]


def test_matchers_follow_alertmanager_semantics() -> None:
    (channel,) = AlertChannels.model_validate(
        {
            "channels": [
                {
                    "name": "c",
                    "type": "console",
                    "matchers": ["feature=~chat.*", "model!~gpt-3.*", 'team!=""', "metric!=cost_usd"],
                }
            ]
        }
    ).channels

    def ok(**labels: str) -> bool:
        return channel.accepts("critical", "page", labels, resolved=False)

    assert ok(feature="chat-support", model="gpt-4o", team="search", metric="ttft_p95_ms")
    assert not ok(feature="support-chat", model="gpt-4o", team="search")  # regex is anchored
    assert not ok(feature="chat", model="gpt-3.5-turbo", team="search")
    assert not ok(feature="chat", model="gpt-4o")  # missing label = "" (team!="" fails)
    assert not ok(feature="chat", model="gpt-4o", team="search", metric="cost_usd")


def test_the_documented_example_is_valid() -> None:
    readme = (Path(__file__).parents[3] / "sinks" / "alerts" / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = AlertChannels.model_validate(yaml.safe_load(block)["alerting"])
    assert [c.type for c in config.channels] == ["console", "slack", "slack", "pagerduty", "alertmanager", "webhook"]


def test_default_retries_outlive_a_receiver_restart() -> None:
    """At the old default (5 retries) a webhook down for 15 s lost the alert for good."""
    from schemas.channels import AlertChannels
    from sinks.alerts.retry import Backoff

    (hook,) = AlertChannels.model_validate({"channels": [{"type": "webhook", "name": "h", "url": "http://x"}]}).channels
    backoff = Backoff(hook.backoff_initial_s, hook.backoff_max_s, hook.retry_after_max_s)
    shortest = sum(backoff.delay(i, rand=lambda: 1.0) for i in range(hook.retries))  # every jitter at its most
    longest = sum(backoff.delay(i, rand=lambda: 0.0) for i in range(hook.retries))
    assert 45 * 60 < shortest < longest < 65 * 60
