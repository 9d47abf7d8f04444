"""The one configuration file, ``llmpulse.yaml``, and its environment overrides.

Precedence: command-line flag > ``LLMPULSE_*`` environment variable > file > default.
Nested keys use a double underscore in the environment (``LLMPULSE_PIPELINE__WINDOW=5m``).
Every error names where the bad value came from (the file or the variable), the key, and
what was expected, because "validation error" helps nobody at 3 a.m.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from schemas import limits
from schemas.channels import CHANNEL_TYPES, ChannelList
from schemas.durations import Duration
from schemas.files import read_yaml
from schemas.judge import JudgeSettings
from schemas.server import ServerSettings

ENV_PREFIX = "LLMPULSE_"
DEFAULT_CONFIG_NAME = "llmpulse.yaml"


class ConfigError(ValueError):
    """A configuration problem, already phrased for the operator."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClickHouseSettings(_Section):
    url: str | None = Field(
        None, description="http(s)://host:8123 of a ClickHouse server; unset = embedded chDB in data_dir."
    )
    database: str = "llmpulse"
    username: str = "default"
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="Read the password from this file (k8s secrets).")
    verify_tls: bool = True
    ca_cert: Path | None = None
    cluster: str | None = Field(
        None,
        description="A cluster from the server's remote_servers: migrations emit ON CLUSTER, Replicated engines "
        "on `<table>_local` tables and Distributed tables under the plain names (sinks/migrations.py).",
        pattern=r"^[A-Za-z0-9_.-]+$",
    )
    connect_timeout_s: Duration = 10.0
    send_receive_timeout_s: Duration = 300.0

    def secret_password(self) -> str:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"clickhouse.password_file: cannot read {self.password_file}: {exc.strerror}"
                ) from exc
        return ""


class RetentionSettings(_Section):
    raw_days: Annotated[int, Field(ge=1, le=3650)] = 90
    content_days: Annotated[int, Field(ge=1, le=3650)] = 30
    rollup_days: Annotated[int, Field(ge=1, le=3650)] = 400
    dlq_days: Annotated[int, Field(ge=1, le=3650)] = 30
    tables: dict[
        Literal[
            "llm_calls",
            "llm_calls_1m",
            "served_models_1m",
            "dlq",
            "dlq_replays",
            "judge_samples",
            "feedback",
            "judge_scores",
            "eval_1h",
            "feedback_1h",
            "cost_history",
            "alerts",
        ],
        Annotated[int, Field(ge=1, le=3650)],
    ] = Field(default_factory=dict)
    """Row retention in days for single tables (``{judge_scores: 30}``), beating the class default above.
    The key type lists the tables, so a misspelt name fails at load with every valid one named."""

    @classmethod
    def default_classes(cls) -> dict[str, str]:
        """Which class setting each table's rows follow unless ``tables`` names it; the keys are exactly
        the tables with a row TTL (a test holds them equal to the migrations and to ``tables``' keys)."""
        return {
            "llm_calls": "raw_days", "judge_samples": "raw_days", "feedback": "raw_days",
            "judge_scores": "raw_days", "cost_history": "raw_days", "alerts": "raw_days",
            "llm_calls_1m": "rollup_days", "served_models_1m": "rollup_days", "eval_1h": "rollup_days",
            "feedback_1h": "rollup_days",
            "dlq": "dlq_days", "dlq_replays": "dlq_days",
        }  # fmt: skip

    def days_for(self, table: str) -> int:
        """The row retention of ``table`` in days: its override, else its class default."""
        for name, days in self.tables.items():
            if name == table:
                return days
        field = self.default_classes().get(table)
        if field is None:
            raise KeyError(f"no retention for table {table!r}: not one of {sorted(self.default_classes())}")
        return int(getattr(self, field))


def _whole_seconds(value: float) -> float:
    """The stream keys its windows by whole seconds: ``0s`` passed here and failed at the first event
    with a traceback, and ``1.5s`` silently became 1 s."""
    if value < 1 or value != int(value):
        raise ValueError("expected a whole number of seconds, at least 1s (e.g. 60s or 1m)")
    return value


class PipelineSettings(_Section):
    window: Annotated[Duration, AfterValidator(_whole_seconds)] = 60.0
    allowed_lateness: Duration = 120.0
    flow_idle: Duration = 30.0
    """A conversation's next call starting this long after the previous one ended is a new turn
    (a new flow); an agent run (trace) is over once this long passed without a call."""
    idle_timeout: Duration = 60.0
    batch_max_events: Annotated[int, Field(ge=1, le=1_000_000)] = 50_000
    batch_max_seconds: Duration = 1.0
    max_event_bytes: Annotated[int, Field(ge=1024)] = limits.DEFAULT_MAX_EVENT_BYTES
    max_depth: Annotated[int, Field(ge=2, le=64)] = limits.DEFAULT_MAX_DEPTH
    future_tolerance: Duration = limits.DEFAULT_FUTURE_TOLERANCE_S
    dedup_capacity: Annotated[int, Field(ge=1000)] = 1_000_000
    insert_retries: Annotated[int, Field(ge=0)] = 8
    """Attempts after the first; backoff doubles from 0.5 s up to 30 s between them."""


class ContentSettings(_Section):
    capture: bool = Field(False, description="Store prompt/output text (redacted). Off: hashes and lengths only.")
    redact: bool = True


class JudgeBudgetSettings(_Section):
    max_per_hour: Annotated[int, Field(ge=0)] | None = None
    usd_per_day: Annotated[float, Field(ge=0)] | None = None


class SamplingSettings(_Section):
    default_rate: Annotated[float, Field(ge=0, le=1)] = 0.02
    rates: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=dict)
    boost_cap_per_hour: Annotated[int, Field(ge=0)] = 200
    max_per_hour: Annotated[int, Field(ge=0)] | None = 600
    """Judged calls per feature per hour, at most."""
    judge_usd_per_day: Annotated[float, Field(ge=0)] | None = 25.0
    """Estimated judge spend per feature per day, at most."""
    budgets: dict[str, JudgeBudgetSettings] = Field(default_factory=dict)
    """Per-feature overrides of the two caps."""
    judge_model: str = "gpt-4o-mini"
    """Priced from the price table to estimate what judging a call costs."""
    rubric_tokens: Annotated[int, Field(ge=0)] = 600
    judge_output_tokens: Annotated[int, Field(ge=0)] = 150


class PricingSettings(_Section):
    path: Path | None = Field(None, description="Price table JSON; default: data_dir/prices.json, else built-in.")


class MetricsSettings(_Section):
    enabled: bool = True
    port: Annotated[int, Field(ge=0, le=65535)] = 9464
    """Prometheus /metrics of the worker (0: pick a free port)."""
    addr: str = "0.0.0.0"


class AlertingSettings(_Section):
    enabled: bool = True
    rules_path: Path | None = Field(None, description="Rules and budgets YAML; default: the built-in rules.")
    channels: ChannelList = Field(default_factory=list)
    """Where alerts go; none configured: the console."""
    dashboard_url: str | None = Field(None, description="Linked from every alert (e.g. the Grafana dashboard).")
    lag_check_interval: Duration = 60.0


class TopicNames(_Section):
    calls: str = "llm.calls"
    feedback: str = "llm.feedback"
    dlq: str = "llm.calls.dlq"
    judge_requests: str = "llm.judge.requests"
    judge_results: str = "llm.judge.results"
    alerts: str = "llm.alerts"
    partials: str = "llm.window.partials"


_BROKER = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(\d{1,5}))?$")


def _broker_list(value: str) -> str:
    """``host:port[,host:port...]``, checked here: the Kafka client failed on a malformed address with
    ``invalid literal for int()`` from deep inside its bootstrap. Spaces after the commas are dropped
    (faust would take them as part of the host)."""
    entries = [entry.strip() for entry in value.split(",")]
    for entry in entries:
        match = _BROKER.match(entry)
        if match is None or (match[2] is not None and not 1 <= int(match[2]) <= 65535):
            raise ValueError(f"{entry!r} is not a host:port; expected host:port[,host:port...], e.g. kafka-1:9092")
    return ",".join(entries)


class KafkaSettings(_Section):
    bootstrap_servers: Annotated[str, AfterValidator(_broker_list)] = "127.0.0.1:19092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True
    client_id: str = "llmpulse"
    consumer_group: str = "llmpulse-worker"
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "zstd"
    """What the pipeline's producers (worker outputs, judge, DLQ re-drive, ``serve --kafka``)
    compress with; the SDK's ``LLMPULSE_SDK__COMPRESSION`` is its own (same default). zstd needs
    brokers from Kafka 2.1 on."""
    topics: TopicNames = Field(default_factory=TopicNames)
    partitions: Annotated[int, Field(ge=1, le=10_000)] = 12
    """Partitions of llm.calls when `llmpulse topics create` makes it (scale-out ceiling)."""
    replication_factor: Annotated[int, Field(ge=1, le=10)] = 1
    fetch_max_records: Annotated[int, Field(ge=1)] = 20_000
    fetch_max_wait: Duration = 0.2
    session_timeout: Duration = 30.0

    def secret_sasl_password(self) -> str | None:
        if self.sasl_password is not None:
            return self.sasl_password.get_secret_value()
        if self.sasl_password_file is not None:
            try:
                return self.sasl_password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"kafka.sasl_password_file: cannot read {self.sasl_password_file}: {exc.strerror}"
                ) from exc
        return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    data_dir: Path = Field(Path(".llmpulse"), description="Embedded chDB data and local state.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    clickhouse: ClickHouseSettings = Field(default_factory=ClickHouseSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    content: ContentSettings = Field(default_factory=ContentSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    pricing: PricingSettings = Field(default_factory=PricingSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    alerting: AlertingSettings = Field(default_factory=AlertingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    """``llmpulse serve``: address, API keys, limits, group commit (``LLMPULSE_SERVER__PORT=4318``)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the YAML file arrives through init kwargs merged under the CLI flags (see load_settings)
        return (init_settings, env_settings)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_name(loc: tuple[Any, ...]) -> str:
    return ENV_PREFIX + "__".join(str(p).upper() for p in loc)


def find_config_path(explicit: str | Path | None = None) -> Path | None:
    """--config, else $LLMPULSE_CONFIG, else ./llmpulse.yaml if present."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_PREFIX + "CONFIG")
    if env:
        return Path(env)
    default = Path(DEFAULT_CONFIG_NAME)
    return default if default.is_file() else None


def read_config_file(path: Path) -> dict[str, Any]:
    data = read_yaml(path, "config file", ConfigError, missing="given by --config or LLMPULSE_CONFIG")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def load_settings(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings with the documented precedence and operator-readable errors.

    ``overrides`` are the command-line flags, nested like the file (``{"clickhouse": {"url": ...}}``);
    None values mean "flag not given".
    """
    path = find_config_path(config)
    file_data = read_config_file(path) if path else {}
    flags = _drop_none(overrides or {})
    # Env must beat the file but lose to flags. pydantic-settings puts init kwargs above env,
    # so the file's values are passed only where no env variable overrides them.
    file_data = _without_env_overridden(file_data, ())
    try:
        return Settings(**_deep_merge(file_data, flags))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, file_data, flags)) from exc
    except SettingsError as exc:  # a section given a plain value (LLMPULSE_SERVER=http://...)
        field = re.search(r'field "([^"]+)"', str(exc))
        name = _env_name((field[1],)) if field else "LLMPULSE_*"
        raise ConfigError(
            f"environment variable {name}: `{field[1] if field else '?'}` is a section of settings, so its value "
            f"must be a JSON object (got {os.environ.get(name, '')!r}); set one key as {name}__<KEY>. "
            "(The CLI's server URL is LLMPULSE_SERVER_URL.)"
        ) from exc


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            nested = _drop_none(value)
            if nested:
                out[key] = nested
        elif value is not None:
            out[key] = value
    return out


def _without_env_overridden(data: dict[str, Any], loc: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        here = (*loc, str(key))
        if _env_name(here) in os.environ:
            continue
        out[key] = _without_env_overridden(value, here) if isinstance(value, dict) else value
    return out


def _lookup(data: dict[str, Any], loc: tuple[Any, ...]) -> bool:
    node: Any = data
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


SECRET_KEY = re.compile(r"(^|_)(password|secret|token|key|key_hash|webhook_url|url|headers)$")
"""Keys whose values are never echoed in an error: passwords, tokens and API keys, and URLs and
headers, which carry credentials (``https://user:pass@host``, a Slack webhook, ``Authorization``)."""


def _is_secret(loc: tuple[Any, ...]) -> bool:
    """Any part counts: a header's own name comes after ``headers`` in the location."""
    return any(isinstance(part, str) and SECRET_KEY.search(part) for part in loc)


def _readable_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The location as the user wrote it: pydantic puts a tagged union's tag after the list index
    (``alerting.channels.0.slack.webhook_url``), naming a key nobody set."""
    return tuple(p for i, p in enumerate(loc) if not (i and isinstance(loc[i - 1], int) and p in CHANNEL_TYPES))


def _describe(exc: ValidationError, path: Path | None, file_data: dict[str, Any], flags: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        loc = _readable_loc(tuple(err["loc"]))
        key = ".".join(str(p) for p in loc)
        env = next((_env_name(loc[:i]) for i in range(len(loc), 0, -1) if _env_name(loc[:i]) in os.environ), None)
        if _lookup(flags, loc):
            origin = "command-line flag"
        elif env is not None:  # the variable that is set: a list or section comes whole, as JSON
            origin = f"environment variable {env}"
        elif path is not None and _lookup(file_data, loc):
            origin = str(path)
        else:
            origin = str(path) if path else "settings"
        msg = err["msg"].removeprefix("Value error, ")  # our validators' own words need no pydantic label
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see llmpulse.yaml in the repository for every key)"
        elif "input" in err and err["type"] != "missing":
            if _is_secret(loc):
                msg += " (the value is a secret, so it is not shown)"
            elif f"got {err['input']!r}" not in msg:  # our validators say what they got
                msg += f" (got {err['input']!r})"
        lines.append(f"{origin}: key `{key}`: {msg}")
    return "\n".join(lines)
