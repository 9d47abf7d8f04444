"""Alert delivery channels: where on-call hears about an alert, and which alerts each one takes.

Nested under the main config as ``alerting.channels``, either a list of channels or a mapping
from name to channel (the key becomes the name). Secrets (webhook URLs, routing keys,
passwords, header values) are ``SecretStr`` and may instead name an environment variable
(``*_env``) or a file (``*_file``, e.g. a mounted k8s secret), because the config file is
usually committed; they never appear in a repr, a dump, an error or a log line.

This module is a leaf on purpose (no import from ``schemas.config``), so the main config can
import it without a cycle.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from schemas.durations import Duration

AlertSeverity = Literal["critical", "warning", "info"]
"""The severities an alert rule may carry (``processors.alerts.events`` uses this one definition)."""
AlertAction = Literal["page", "notify", "rollback", "pause_for_review"]
"""What an alert asks for; channels select on it (e.g. PagerDuty only for page/rollback)."""
PagerDutySeverity = Literal["critical", "error", "warning", "info"]

SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}
"""Order used by ``min_severity``."""

DEFAULT_PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"

_CHANNEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_MATCHER = re.compile(r"^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*$")


class SecretUnavailable(ValueError):
    """A channel's secret is configured to come from an env var or a file that is not there.

    Raised when the channel is built (at start-up), not when the config is parsed, so a config
    file can be validated on a machine that does not hold the secrets.
    """


def _http_url(value: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("expected an http(s)://host/... URL")
    return value


def _secret_http_url(value: SecretStr | None) -> SecretStr | None:
    # the input was masked by _Section, so a failure is reported as SecretStr('**********')
    if value is not None:
        _http_url(value.get_secret_value())
    return value


def _checked_secret_url(where: str, url: str) -> str:
    try:
        return _http_url(url)
    except ValueError:
        raise SecretUnavailable(f"{where}: the configured value is not an http(s)://host/... URL") from None


HttpUrl = Annotated[str, AfterValidator(_http_url)]
SecretHttpUrl = Annotated[SecretStr | None, AfterValidator(_secret_http_url)]


def read_secret(where: str, value: SecretStr | None, env: str | None, file: Path | None) -> str:
    """The secret from whichever of its three sources is set; ``where`` names the key in errors."""
    if value is not None:
        return value.get_secret_value()
    if env is not None:
        got = os.environ.get(env, "").strip()
        if not got:
            raise SecretUnavailable(f"{where}_env: environment variable {env} is not set or empty")
        return got
    if file is not None:
        try:
            got = file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SecretUnavailable(f"{where}_file: cannot read {file}: {exc.strerror}") from exc
        if not got:
            raise SecretUnavailable(f"{where}_file: {file} is empty")
        return got
    raise SecretUnavailable(f"{where}: not configured (set {where}, {where}_env or {where}_file)")


def _check_sources(data: Mapping[str, Any], key: str, file_value: Path | None) -> None:
    """Exactly one of ``key``, ``key_env``, ``key_file``.

    Runs as a validator of the ``*_file`` field (declared last), not of the model: a model-level
    error carries the raw input, secrets included, into the message; a field error carries only
    the file path.
    """
    if key not in data or f"{key}_env" not in data:
        return  # that field failed on its own and is reported already
    given = [name for name, value in ((key, data[key]), (f"{key}_env", data[f"{key}_env"])) if value is not None]
    if file_value is not None:
        given.append(f"{key}_file")
    if len(given) > 1:
        raise ValueError(f"give only one of {', '.join(given)}")
    if not given:
        raise ValueError(f"one of {key}, {key}_env or {key}_file is required")


def _mask(data: Any, known: Collection[str], secret_keys: frozenset[str]) -> Any:
    """Wrap secret and unknown string values in ``SecretStr`` before anything can fail on them.

    pydantic puts the offending input into every error, and a misspelled ``webhok_url:`` is
    still a webhook URL; masked, the error reads ``SecretStr('**********')`` instead.
    """
    if not isinstance(data, Mapping):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "headers" and "headers" in secret_keys and isinstance(value, Mapping):
            out[key] = {h: SecretStr(v) if isinstance(v, str) else v for h, v in value.items()}
        elif isinstance(value, str) and (key in secret_keys or key not in known):
            out[key] = SecretStr(value)
        else:
            out[key] = value
    return out


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    secret_keys: ClassVar[frozenset[str]] = frozenset()
    """Keys whose string values are secrets."""
    plain_keys: ClassVar[frozenset[str]] = frozenset()
    """Accepted input keys that are not fields (aliases), left unmasked."""

    @classmethod
    def mask_input(cls, data: Any) -> Any:
        return _mask(data, cls.model_fields.keys() | cls.plain_keys, cls.secret_keys)

    @model_validator(mode="before")
    @classmethod
    def _mask_secrets(cls, data: Any) -> Any:
        return cls.mask_input(data)


class LabelMatcher(BaseModel):
    """One Alertmanager-style matcher: ``team=search``, ``team!=search``, ``feature=~chat.*``, ``model!~gpt-3.*``.

    Matched against the alert's scope and labels plus ``rule``, ``metric``, ``severity`` and
    ``action``; a missing label matches as the empty string, and regexes are anchored, as in
    Alertmanager, so routing rules read the same in both places.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    op: Literal["=", "!=", "=~", "!~"]
    value: str
    _regex: re.Pattern[str] | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: Any) -> Any:
        if isinstance(data, str):
            match = _MATCHER.match(data)
            if not match:
                raise ValueError(f"expected a matcher like team=search, team!=search or feature=~chat.*, got {data!r}")
            name, op, value = match.groups()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return {"name": name, "op": op, "value": value}
        return data

    @model_validator(mode="after")
    def _compile(self) -> Self:
        if not _LABEL_NAME.match(self.name):
            raise ValueError(f"label name {self.name!r} must match [a-zA-Z_][a-zA-Z0-9_]*")
        if self.op in {"=~", "!~"}:
            try:
                self._regex = re.compile(f"(?:{self.value})")
            except re.error as exc:
                raise ValueError(f"invalid regular expression {self.value!r}: {exc}") from exc
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        got = labels.get(self.name, "")
        if self.op == "=":
            return got == self.value
        if self.op == "!=":
            return got != self.value
        assert self._regex is not None
        hit = self._regex.fullmatch(got) is not None
        return hit if self.op == "=~" else not hit

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value}"


class _ChannelBase(_Section):
    """What every channel has: a name, which alerts it takes, and how much it may buffer."""

    name: Annotated[str, Field(pattern=_CHANNEL_NAME)]
    default: bool = Field(
        True, description="Receives alerts that name no channels; false: only alerts that name it explicitly."
    )
    min_severity: AlertSeverity = "info"
    actions: list[AlertAction] | None = Field(None, description="Actions this channel accepts; unset: all.")
    matchers: list[LabelMatcher] = Field(
        default_factory=list, description="All must match, e.g. ['team=search', 'feature=~chat.*']."
    )
    send_resolved: bool = True
    queue_size: Annotated[int, Field(ge=1, le=100_000)] = 1000
    """Alerts waiting for this channel; beyond it the oldest is dropped, counted and logged."""

    def accepts(self, severity: str, action: str, labels: Mapping[str, str], *, resolved: bool) -> bool:
        """The channel's own policy, applied whether the alert named the channel or not."""
        if resolved and not self.send_resolved:
            return False
        if SEVERITY_RANK[severity] < SEVERITY_RANK[self.min_severity]:
            return False
        if self.actions is not None and action not in self.actions:
            return False
        return all(m.matches(labels) for m in self.matchers)


class _HttpChannelBase(_ChannelBase):
    timeout_s: Annotated[Duration, Field(gt=0, le=300)] = 10.0
    """Whole request, connect to last byte: a hanging receiver costs at most this per attempt."""
    retries: Annotated[int, Field(ge=0, le=10_000)] = 125
    """Attempts after the first, on connection errors, timeouts, 429 and 5xx; never on other 4xx.
    With the default backoff (0.5 s doubling to 30 s) 125 retries span about an hour: a page must
    outlive a receiver's restart or deploy (at 5, about 15 s, it was lost for good)."""
    backoff_initial_s: Annotated[Duration, Field(ge=0, le=3600)] = 0.5
    backoff_max_s: Annotated[Duration, Field(ge=0, le=3600)] = 30.0
    retry_after_max_s: Annotated[Duration, Field(ge=0, le=3600)] = 300.0
    """A Retry-After header is honoured up to this long, so one odd header cannot park a channel for hours."""
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    """Requests in flight; alerts with the same dedup_key still go out in order (trigger before resolve)."""

    @field_validator("backoff_max_s")
    @classmethod
    def _backoff_order(cls, value: float, info: ValidationInfo) -> float:
        if value < info.data.get("backoff_initial_s", 0.0):
            raise ValueError("backoff_max_s must not be below backoff_initial_s")
        return value


class ConsoleChannelConfig(_ChannelBase):
    """One or two readable lines per alert on stderr: the demo's and a developer's channel."""

    type: Literal["console"] = "console"


class WebhookChannelConfig(_HttpChannelBase):
    """Any HTTP endpoint that takes the full alert as JSON (see ``sinks.alerts.render.render_webhook``)."""

    secret_keys: ClassVar[frozenset[str]] = frozenset({"url", "headers"})

    type: Literal["webhook"] = "webhook"
    url: SecretHttpUrl = None
    url_env: str | None = None
    url_file: Path | None = Field(None, validate_default=True)
    headers: dict[str, SecretStr] = Field(default_factory=dict, description="e.g. Authorization: Bearer ...")
    headers_env: dict[str, str] = Field(default_factory=dict, description="header name → environment variable")
    headers_file: dict[str, Path] = Field(
        default_factory=dict, validate_default=True, description="header name → file holding the value"
    )

    @field_validator("url_file")
    @classmethod
    def _one_url(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        _check_sources(info.data, "url", value)
        return value

    @field_validator("headers_file")
    @classmethod
    def _header_names(cls, value: dict[str, Path], info: ValidationInfo) -> dict[str, Path]:
        names = [*info.data.get("headers", {}), *info.data.get("headers_env", {}), *value]
        for name in names:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"invalid HTTP header name {name!r}")
        lowered = [n.lower() for n in names]
        duplicated = sorted({n for n in lowered if lowered.count(n) > 1})
        if duplicated:
            raise ValueError(f"header given more than once (headers, headers_env, headers_file): {duplicated}")
        return value

    def secret_url(self) -> str:
        url = read_secret(f"alerting.channels.{self.name}.url", self.url, self.url_env, self.url_file)
        return _checked_secret_url(f"alerting.channels.{self.name}.url", url)

    def secret_headers(self) -> dict[str, str]:
        out = {name: value.get_secret_value() for name, value in self.headers.items()}
        for name, env in self.headers_env.items():
            out[name] = read_secret(f"alerting.channels.{self.name}.headers.{name}", None, env, None)
        for name, file in self.headers_file.items():
            out[name] = read_secret(f"alerting.channels.{self.name}.headers.{name}", None, None, file)
        return out


class SlackChannelConfig(_HttpChannelBase):
    """A Slack incoming webhook (one per Slack channel: route per team with ``matchers``)."""

    secret_keys: ClassVar[frozenset[str]] = frozenset({"webhook_url"})

    type: Literal["slack"] = "slack"
    webhook_url: SecretHttpUrl = None
    webhook_url_env: str | None = None
    webhook_url_file: Path | None = Field(None, validate_default=True)

    @field_validator("webhook_url_file")
    @classmethod
    def _one_url(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        _check_sources(info.data, "webhook_url", value)
        return value

    def secret_webhook_url(self) -> str:
        where = f"alerting.channels.{self.name}.webhook_url"
        url = read_secret(where, self.webhook_url, self.webhook_url_env, self.webhook_url_file)
        return _checked_secret_url(where, url)


class PagerDutyChannelConfig(_HttpChannelBase):
    """PagerDuty Events API v2: trigger on firing, resolve on resolved, correlated by dedup_key."""

    secret_keys: ClassVar[frozenset[str]] = frozenset({"routing_key"})

    type: Literal["pagerduty"] = "pagerduty"
    routing_key: SecretStr | None = None
    routing_key_env: str | None = None
    routing_key_file: Path | None = Field(None, validate_default=True)
    events_url: HttpUrl = DEFAULT_PAGERDUTY_EVENTS_URL
    severity_map: dict[AlertSeverity, PagerDutySeverity] = Field(
        default_factory=dict,
        description="Our severity → PagerDuty's (critical, error, warning, info); unmapped ones keep their name.",
    )
    source: str | None = Field(
        None, description="payload.source; unset: the alert's scope (feature=...,model=...), else 'llmpulse'."
    )

    @field_validator("routing_key_file")
    @classmethod
    def _one_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        _check_sources(info.data, "routing_key", value)
        return value

    def secret_routing_key(self) -> str:
        return read_secret(
            f"alerting.channels.{self.name}.routing_key", self.routing_key, self.routing_key_env, self.routing_key_file
        )


class BasicAuth(_Section):
    secret_keys: ClassVar[frozenset[str]] = frozenset({"password"})

    username: str
    password: SecretStr | None = None
    password_env: str | None = None
    password_file: Path | None = Field(None, validate_default=True)

    @field_validator("password_file")
    @classmethod
    def _one_password(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        _check_sources(info.data, "password", value)
        return value

    def secret_password(self, where: str) -> str:
        return read_secret(f"{where}.password", self.password, self.password_env, self.password_file)


class AlertmanagerChannelConfig(_HttpChannelBase):
    """Prometheus Alertmanager API v2 (``POST {url}/api/v2/alerts``); silences and inhibition are Alertmanager's.

    Every URL gets every alert, as Prometheus does for an Alertmanager HA cluster (the cluster
    dedups). Firing alerts are re-sent every ``resend_interval_s`` with ``endsAt`` four
    intervals ahead, so Alertmanager keeps them open while llmpulse runs and resolves them by
    itself if llmpulse stops announcing them.
    """

    plain_keys: ClassVar[frozenset[str]] = frozenset({"url"})

    type: Literal["alertmanager"] = "alertmanager"
    urls: Annotated[list[HttpUrl], Field(min_length=1)]
    basic_auth: BasicAuth | None = None
    resend_interval_s: Annotated[Duration, Field(gt=0, le=3600)] = 60.0

    @model_validator(mode="before")
    @classmethod
    def _url_alias(cls, data: Any) -> Any:
        # `url: http://am:9093` reads naturally for the common single-instance case; with both
        # given, `url` stays and is reported as an unknown key
        if isinstance(data, Mapping) and "url" in data and "urls" not in data:
            data = dict(data)
            data["urls"] = [data.pop("url")]
        return data

    @property
    def firing_ttl_s(self) -> float:
        """``endsAt`` of a firing alert is this far ahead: four missed re-sends, Prometheus's margin."""
        return 4 * self.resend_interval_s

    def alerts_endpoints(self) -> list[str]:
        return [url.rstrip("/") + "/api/v2/alerts" for url in self.urls]


ChannelConfig = Annotated[
    ConsoleChannelConfig
    | WebhookChannelConfig
    | SlackChannelConfig
    | PagerDutyChannelConfig
    | AlertmanagerChannelConfig,
    Field(discriminator="type"),
]


CHANNEL_TYPES: dict[str, type[_Section]] = {
    "console": ConsoleChannelConfig,
    "webhook": WebhookChannelConfig,
    "slack": SlackChannelConfig,
    "pagerduty": PagerDutyChannelConfig,
    "alertmanager": AlertmanagerChannelConfig,
}


def _mask_everything(value: Any, keep: frozenset[str] = frozenset()) -> Any:
    if isinstance(value, Mapping):
        return {k: v if k in keep else _mask_everything(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_everything(v) for v in value]
    return SecretStr(value) if isinstance(value, str) else value


def _mask_channel(item: Any) -> Any:
    """Mask one raw channel before the union looks at it: a bad ``type`` is reported with the whole item."""
    if not isinstance(item, Mapping):
        return item
    kind = item.get("type")
    model = CHANNEL_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        return _mask_everything(item, keep=frozenset({"name", "type"}))
    masked = model.mask_input(item)
    auth = masked.get("basic_auth")
    if isinstance(auth, Mapping):
        masked["basic_auth"] = BasicAuth.mask_input(auth)
    elif isinstance(auth, str):
        masked["basic_auth"] = SecretStr(auth)
    return masked


def _prepare_channels(value: Any) -> Any:
    """Accept ``{name: channel}`` as well as ``[channel, ...]`` (the key becomes the name), masked.

    Errors raised here are built by hand (a ``ValidationError`` passes through pydantic as is)
    so that they carry the offending name, never the raw channel with its secrets.
    """
    if isinstance(value, Mapping):
        items: list[Any] = []
        for name, channel in value.items():
            if isinstance(channel, Mapping):
                inner = channel.get("name", name)
                if inner != name:
                    raise ValidationError.from_exception_data(
                        "alerting.channels",
                        [
                            InitErrorDetails(
                                type=PydanticCustomError(
                                    "channel_name_mismatch",
                                    "channel '{key}' says its name is '{inner}': drop `name` or make them equal",
                                    {"key": str(name), "inner": str(inner)},
                                ),
                                loc=(str(name), "name"),
                                input=inner,
                            )
                        ],
                    )
                items.append({**channel, "name": name})
            else:
                items.append(channel)
        value = items
    if isinstance(value, list):
        return [_mask_channel(item) for item in value]
    return value


def _unique_names(channels: list[Any]) -> list[Any]:
    seen: set[str] = set()
    for channel in channels:
        if channel.name in seen:
            raise ValueError(f"channel name {channel.name!r} is used twice")
        seen.add(channel.name)
    return channels


# order matters: the BeforeValidator (masking) must wrap the AfterValidator, so that even a
# duplicate-name error reports the masked input
ChannelList = Annotated[list[ChannelConfig], AfterValidator(_unique_names), BeforeValidator(_prepare_channels)]
"""The type of ``alerting.channels``: ``channels: ChannelList = Field(default_factory=list)``."""


class AlertChannels(_Section):
    """``alerting.channels`` on its own, for loading or testing the channels without the rest of the config."""

    channels: ChannelList = Field(default_factory=list)
