"""One config file, env overrides, flags on top; errors name the source, the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.config import ConfigError, load_settings
from schemas.durations import parse_duration


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LLMPULSE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "llmpulse.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    s = load_settings(None)
    assert s.pipeline.window == 60.0
    assert s.clickhouse.url is None
    assert s.data_dir == Path(".llmpulse")


def test_precedence_flag_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "pipeline:\n  window: 2m\n  batch_max_events: 100\nclickhouse:\n  database: fromfile\n")
    assert load_settings(path).pipeline.window == 120.0
    monkeypatch.setenv("LLMPULSE_PIPELINE__WINDOW", "5m")
    s = load_settings(path)
    assert s.pipeline.window == 300.0
    assert s.pipeline.batch_max_events == 100  # the rest of the file still applies
    assert s.clickhouse.database == "fromfile"
    assert load_settings(path, {"pipeline": {"window": "30s"}}).pipeline.window == 30.0


def test_config_path_from_env_and_default_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "retention:\n  raw_days: 30\n")
    assert load_settings(None).retention.raw_days == 30  # ./llmpulse.yaml is picked up
    other = tmp_path / "other.yaml"
    other.write_text("retention:\n  raw_days: 7\n")
    monkeypatch.setenv("LLMPULSE_CONFIG", str(other))
    assert load_settings(None).retention.raw_days == 7


def test_file_error_names_file_key_and_expectation(tmp_path: Path) -> None:
    path = write(tmp_path, "pipeline:\n  batch_max_events: lots\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(err.value).startswith(f"{path}: key `pipeline.batch_max_events`:")
    assert "valid integer" in str(err.value) and "'lots'" in str(err.value)


def test_unknown_key_is_reported_as_such(tmp_path: Path) -> None:
    path = write(tmp_path, "pipeline:\n  windw: 1m\n")
    with pytest.raises(ConfigError, match=r"key `pipeline.windw`: unknown key"):
        load_settings(path)


def test_env_error_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPULSE_RETENTION__RAW_DAYS", "zero")
    with pytest.raises(
        ConfigError, match=r"^environment variable LLMPULSE_RETENTION__RAW_DAYS: key `retention.raw_days`"
    ):
        load_settings(None)


def test_a_list_from_the_env_names_the_variable_set_and_the_key_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """Channels come whole, as JSON, in LLMPULSE_ALERTING__CHANNELS: the error named a variable
    nobody can set (``..._CHANNELS__0__WEBHOOK__TIMEOUT_S``) and the union's tag as a key."""
    monkeypatch.setenv("LLMPULSE_ALERTING__CHANNELS", '[{"name": "w", "type": "webhook", "url": "http://x", '
                       '"timeout_s": "slow"}]')  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_settings(None)
    assert str(info.value) == (
        "environment variable LLMPULSE_ALERTING__CHANNELS: key `alerting.channels.0.timeout_s`: "
        "expected a duration like '30s', '5m', '1h' or '7d', got 'slow'"
    )  # no pydantic "Value error," label, and the value once


def test_a_section_given_a_plain_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLMPULSE_SERVER is the server section, not a URL: a readable error, not pydantic's traceback."""
    monkeypatch.setenv("LLMPULSE_SERVER", "http://127.0.0.1:4318")
    with pytest.raises(ConfigError, match=r"^environment variable LLMPULSE_SERVER: `server` is a section .*"
                                          r"LLMPULSE_SERVER__<KEY>.*LLMPULSE_SERVER_URL"):  # fmt: skip
        load_settings(None)


def test_bad_duration_and_bad_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "pipeline:\n  window: soon\n")
    with pytest.raises(ConfigError, match=r"expected a duration like '30s', '5m', '1h' or '7d', got 'soon'"):
        load_settings(path)
    path = write(tmp_path, "pipeline: [\n")
    with pytest.raises(ConfigError, match=r"line 2, column 1: not valid YAML"):
        load_settings(path)
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(missing)


def test_durations() -> None:
    assert parse_duration("90") == 90 and parse_duration(1.5) == 1.5
    assert parse_duration("250ms") == 0.25 and parse_duration("1h") == 3600 and parse_duration("7d") == 604800


def test_secret_is_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPULSE_CLICKHOUSE__PASSWORD", "hunter2")
    s = load_settings(None)
    assert "hunter2" not in repr(s) and "hunter2" not in s.model_dump_json()
    assert s.clickhouse.secret_password() == "hunter2"


def test_repository_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "llmpulse.yaml"
    assert load_settings(example) == load_settings(None)  # the example documents the defaults


@pytest.mark.parametrize("window", ["0s", "0", "500ms", "1.5s"])
def test_window_must_be_whole_seconds_of_at_least_one(window: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """0s passed here and failed at the first event with a traceback; 1.5s silently became 1 s."""
    monkeypatch.setenv("LLMPULSE_PIPELINE__WINDOW", window)
    with pytest.raises(ConfigError, match=r"key `pipeline.window`: .*whole number of seconds, at least 1s"):
        load_settings(None)


def test_window_of_whole_seconds_is_accepted() -> None:
    assert load_settings(None, {"pipeline": {"window": "1s"}}).pipeline.window == 1.0
    assert load_settings(None, {"pipeline": {"window": "2m"}}).pipeline.window == 120.0


@pytest.mark.parametrize(
    "text, key",
    [
        ("clickhouse: {password: 20240917}\n", "clickhouse.password"),
        ("kafka: {sasl_password: 20240917}\n", "kafka.sasl_password"),
        ("clickhouse: {url: [20240917]}\n", "clickhouse.url"),
        ("alerting:\n  channels: [{type: slack, name: s, webhook_url: 'x-20240917'}]\n", "webhook_url"),
    ],
)
def test_a_secret_value_is_never_echoed(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert key in str(err.value) and "not shown" in str(err.value)
    assert "20240917" not in str(err.value)


def test_a_plain_value_is_still_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, "clickhouse: {username: [20240917]}\n")
    with pytest.raises(ConfigError, match=r"clickhouse.username.*20240917"):
        load_settings(path)


@pytest.mark.parametrize("servers", ["garbage::x", "a:1,,b:2", "kafka:99999", "host name:9092", ""])
def test_malformed_bootstrap_servers_are_a_config_error(servers: str) -> None:
    with pytest.raises(ConfigError, match=r"key `kafka.bootstrap_servers`: .*is not a host:port; expected host:port"):
        load_settings(None, {"kafka": {"bootstrap_servers": servers}})


def test_bootstrap_servers_accept_lists_ipv6_and_a_default_port() -> None:
    k = load_settings(None, {"kafka": {"bootstrap_servers": "kafka-1:9092, [::1]:19092,kafka-3"}}).kafka
    assert k.bootstrap_servers == "kafka-1:9092,[::1]:19092,kafka-3"


def test_a_limit_that_contains_the_value_still_shows_the_value(tmp_path: Path) -> None:
    """102 is inside pydantic's "greater than or equal to 1024": only our own validators' messages,
    which quote the value themselves, go without the "(got ...)"."""
    path = write(tmp_path, "pipeline:\n  max_event_bytes: 102\n")
    with pytest.raises(ConfigError, match=r"key `pipeline.max_event_bytes`: Input should be greater than or equal "
                       r"to 1024 \(got 102\)$"):  # fmt: skip
        load_settings(path)
