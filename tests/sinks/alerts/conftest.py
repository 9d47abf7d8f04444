"""Real HTTP receivers on 127.0.0.1 that play Slack, PagerDuty, Alertmanager or a webhook, and a fixed alert.

Each receiver is an aiohttp.web server in its own thread and loop (separate from the
dispatcher's), with scripted replies (status, Retry-After, delay, hang) and every request
recorded with its arrival time, so tests assert exact bodies and real timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp import web

from processors.alerts.events import AlertEvent
from schemas.channels import AlertChannels, ChannelConfig

FIRING = AlertEvent(
    dedup_key="llmpulse-3f9c0a1b2c4d5e6f",
    rule="ttft-p95-support-chat",
    state="firing",
    severity="critical",
    action="page",
    metric="ttft_p95_ms",
    value=931.0,
    condition="ttft_p95_ms > 850 for 3 windows",
    scope={"feature": "support-chat", "model": "gpt-4o"},
    labels={"team": "search", "oncall-rotation": "search-primary"},
    window_start=datetime(2026, 11, 18, 11, 5, tzinfo=UTC),
    window_end=datetime(2026, 11, 18, 11, 6, tzinfo=UTC),
    started_at=datetime(2026, 11, 18, 11, 8, 0, 250_000, tzinfo=UTC),
    ended_at=None,
    summary="[critical] p95 TTFT 931 ms > 850 ms on support-chat",
    description="p95 time to first token above 850 ms for 3 consecutive 1-minute windows.",
    runbook_url="https://runbooks.example.com/llm/ttft",
    query="SELECT quantileTDigest(0.95)(ttft_ms) AS p95 FROM llm_calls WHERE feature = 'support-chat' AND p95 > 850",
    link="https://grafana.example.com/d/llm?var-feature=support-chat",
    channels=(),
    extra={"calls": 1840, "baseline": 612.5},
)
RESOLVED = dataclasses.replace(
    FIRING,
    state="resolved",
    value=790.0,
    window_start=datetime(2026, 11, 18, 11, 29, tzinfo=UTC),
    window_end=datetime(2026, 11, 18, 11, 30, tzinfo=UTC),
    ended_at=datetime(2026, 11, 18, 11, 32, 0, tzinfo=UTC),
    summary="[resolved] p95 TTFT 790 ms on support-chat",
)
NOW = datetime(2026, 11, 18, 11, 8, 1, tzinfo=UTC)
"""The dispatcher's clock in exact-payload tests (Alertmanager's endsAt depends on it)."""

FAST = {"timeout_s": 2.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "retries": 3}
"""Retry settings small enough for a fast suite."""


def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    """Counters are updated by the delivery thread after the receiver answered: wait for them."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def alert(**changes: Any) -> AlertEvent:
    return dataclasses.replace(FIRING, **changes)


def channels(*raw: dict[str, Any]) -> list[ChannelConfig]:
    return AlertChannels.model_validate({"channels": list(raw)}).channels


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: str = "ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    """Seconds before answering; ``float('inf')`` hangs until the receiver stops."""
    echo: bool = False
    """Append the request path and Authorization header to the body, as careless services do in errors."""


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: Any
    at: float
    """time.monotonic() on arrival."""


class Receiver:
    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or Reply()
        self.script: deque[Reply] = deque()
        self.requests: list[Received] = []
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        started.wait(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reply(self, *replies: Reply) -> Receiver:
        self.script.extend(replies)
        return self

    def wait_for(self, count: int, timeout: float = 3.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} request(s) at {self.url}, got {len(self.requests)}")
                self._cond.wait(left)
            return list(self.requests)

    def bodies(self) -> list[Any]:
        with self._cond:
            return [r.body for r in self.requests]

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def handle(request: web.Request) -> web.Response:
            raw = await request.read()
            with self._cond:
                self.requests.append(
                    Received(
                        request.path_qs,
                        dict(request.headers),
                        orjson.loads(raw) if raw else None,
                        time.monotonic(),
                    )
                )
                self._cond.notify_all()
                reply = self.script.popleft() if self.script else self.default
            if reply.delay:
                assert self._release is not None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._release.wait(), None if reply.delay == float("inf") else reply.delay)
            text = reply.body
            if reply.echo:
                text += f" {request.path_qs} {request.headers.get('Authorization', '')}"
            return web.Response(status=reply.status, text=text, headers=reply.headers)

        async def start() -> None:
            self._release = asyncio.Event()
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
            await self._runner.setup()
            await web.SockSite(self._runner, self._sock).start()

        self._loop.run_until_complete(start())
        started.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._release is not None and self._runner is not None
            self._release.set()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatcher honours *_PROXY variables; local receivers must be reached directly."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receivers() -> Iterator[Any]:
    """``receivers()`` → a new started Receiver, stopped at the end of the test."""
    started: list[Receiver] = []

    def make(default: Reply | None = None) -> Receiver:
        receiver = Receiver(default)
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.stop()


@pytest.fixture
def dead_url() -> str:
    """A local port with nothing listening: connection refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
