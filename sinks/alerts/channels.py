"""Configured channels, ready to send: secrets resolved once, bodies rendered, requests built.

A channel knows *what* to send (``requests``); the dispatcher knows *how* (queues, retries,
timeouts). Secrets are resolved here, at start-up, so a missing env var fails the start, not
the first page at 3 a.m.; and each channel carries a ``Redactor`` for its own secrets, applied to
everything it logs.
"""

from __future__ import annotations

import base64
import sys
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

import orjson
import yarl
from rich.console import Console

from processors.alerts.events import AlertEvent
from schemas.channels import (
    AlertmanagerChannelConfig,
    ChannelConfig,
    ConsoleChannelConfig,
    PagerDutyChannelConfig,
    SlackChannelConfig,
    WebhookChannelConfig,
)
from sinks.alerts.render import (
    render_alertmanager,
    render_console,
    render_pagerduty,
    render_slack,
    render_webhook,
)

USER_AGENT = "llmpulse-alerts/1"
ALERTMANAGER_BATCH = 64
"""Alerts per POST to Alertmanager, as Prometheus batches them."""


class Redactor:
    """Replaces a channel's secrets in any text about to be logged.

    A URL secret is registered in every shape it may be printed in (as given, normalised, its
    path and its query), because aiohttp and yarl print URLs their own way.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str, *, url: bool = False) -> None:
        shapes = {secret}
        if url:
            parts = urllib.parse.urlsplit(secret)
            derived = {
                str(yarl.URL(secret)),
                parts.path,
                urllib.parse.unquote(parts.path),
                parts.query,
                parts.path.rstrip("/").rsplit("/", 1)[-1],  # Slack's token is the last segment
            }
            if "@" in parts.netloc:
                derived.add(parts.netloc.rsplit("@", 1)[0])
            # short pieces (``/hook``) are not worth mangling every log line that contains them
            shapes |= {d for d in derived if len(d) >= 8}
        for shape in shapes:
            if len(shape) >= 4 and shape not in self._secrets:
                self._secrets.append(shape)
        self._secrets.sort(key=len, reverse=True)  # longest first, so a URL is replaced whole

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


def safe_target(url: str) -> str:
    """``https://hooks.slack.com``: where a request goes, without the path or credentials that may be the secret."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


@dataclass(frozen=True, slots=True)
class HttpRequest:
    url: str
    body: bytes
    headers: Mapping[str, str]
    target: str
    """What logs may say about the destination (see ``safe_target``)."""


def _json_request(url: str, body: Any, headers: Mapping[str, str] | None = None) -> HttpRequest:
    all_headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
    return HttpRequest(url, orjson.dumps(body, default=str), all_headers, safe_target(url))


@dataclass
class AlertChannel(ABC):
    config: ChannelConfig
    redact: Redactor = field(default_factory=Redactor)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def kind(self) -> str:
        return self.config.type


@dataclass
class ConsoleChannel(AlertChannel):
    """Writes to stderr (or ``stream``); looked up at write time so pytest and redirects see it."""

    stream: IO[str] | None = None

    def write(self, events: Sequence[AlertEvent]) -> None:
        console = Console(file=self.stream or sys.stderr, highlight=False, soft_wrap=True)
        for event in events:
            console.print(render_console(event))


@dataclass
class HttpChannel(AlertChannel):
    @abstractmethod
    def requests(self, events: Sequence[AlertEvent], now: datetime) -> list[HttpRequest]:
        """The HTTP requests that deliver ``events``; all must succeed for the delivery to count as sent."""


@dataclass
class WebhookChannel(HttpChannel):
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    def requests(self, events: Sequence[AlertEvent], now: datetime) -> list[HttpRequest]:
        return [_json_request(self.url, render_webhook(e), self.headers) for e in events]


@dataclass
class SlackChannel(HttpChannel):
    webhook_url: str = ""

    def requests(self, events: Sequence[AlertEvent], now: datetime) -> list[HttpRequest]:
        return [_json_request(self.webhook_url, render_slack(e)) for e in events]


@dataclass
class PagerDutyChannel(HttpChannel):
    routing_key: str = ""

    def requests(self, events: Sequence[AlertEvent], now: datetime) -> list[HttpRequest]:
        assert isinstance(self.config, PagerDutyChannelConfig)
        cfg = self.config
        severity_map: dict[str, str] = {str(ours): str(theirs) for ours, theirs in cfg.severity_map.items()}
        return [
            _json_request(
                cfg.events_url,
                render_pagerduty(e, routing_key=self.routing_key, severity_map=severity_map, source=cfg.source),
            )
            for e in events
        ]


@dataclass
class AlertmanagerChannel(HttpChannel):
    """Every Alertmanager of the list gets every alert; firing ones are re-sent by the dispatcher."""

    authorization: str | None = None

    @property
    def resend_interval_s(self) -> float:
        assert isinstance(self.config, AlertmanagerChannelConfig)
        return self.config.resend_interval_s

    def requests(self, events: Sequence[AlertEvent], now: datetime) -> list[HttpRequest]:
        assert isinstance(self.config, AlertmanagerChannelConfig)
        headers = {"Authorization": self.authorization} if self.authorization else {}
        out: list[HttpRequest] = []
        for start in range(0, len(events), ALERTMANAGER_BATCH):
            body = render_alertmanager(
                events[start : start + ALERTMANAGER_BATCH], now=now, firing_ttl_s=self.config.firing_ttl_s
            )
            out.extend(_json_request(url, body, headers) for url in self.config.alerts_endpoints())
        return out


def build_channel(config: ChannelConfig, *, console_stream: IO[str] | None = None) -> AlertChannel:
    """Resolve the channel's secrets (``SecretUnavailable`` if an env var or file is missing)."""
    redact = Redactor()
    where = f"alerting.channels.{config.name}"
    if isinstance(config, ConsoleChannelConfig):
        return ConsoleChannel(config, redact, console_stream)
    if isinstance(config, WebhookChannelConfig):
        url, headers = config.secret_url(), config.secret_headers()
        redact.add(url, url=True)
        for value in headers.values():
            redact.add(value)
        return WebhookChannel(config, redact, url, headers)
    if isinstance(config, SlackChannelConfig):
        url = config.secret_webhook_url()
        redact.add(url, url=True)
        return SlackChannel(config, redact, url)
    if isinstance(config, PagerDutyChannelConfig):
        key = config.secret_routing_key()
        redact.add(key)
        return PagerDutyChannel(config, redact, key)
    if isinstance(config, AlertmanagerChannelConfig):
        authorization = None
        if config.basic_auth is not None:
            password = config.basic_auth.secret_password(f"{where}.basic_auth")
            token = base64.b64encode(f"{config.basic_auth.username}:{password}".encode()).decode()
            authorization = f"Basic {token}"
            redact.add(password)
            redact.add(token)
        return AlertmanagerChannel(config, redact, authorization)
    raise TypeError(f"{where}: unknown channel type {type(config).__name__}")
