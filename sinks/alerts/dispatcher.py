"""AlertDispatcher: fans each AlertEvent out to its channels without ever making the caller wait.

Why it is shaped this way:

- ``dispatch()`` only routes and appends to an inbox (no lock); one background thread running
  an asyncio loop with aiohttp picks the inbox up ``pickup_delay_s`` after the first alert of a
  burst, into per-channel queues. Processing never waits on a network, and a channel that hangs
  or is down holds only its own queue and its own requests.
- Queues are bounded and drop their oldest alert when full, with a counter and a log line:
  memory stays flat through an alert storm or a long outage of a receiver.
- Alerts of one incident (same ``dedup_key``) leave a channel in the order they were
  dispatched, so a receiver never sees a resolve before its trigger, while unrelated alerts
  go out ``concurrency`` at a time.
- Retries with exponential backoff on connection errors, timeouts, 429 and 5xx (honouring
  Retry-After), none on other 4xx, which are logged as errors.
- Alertmanager closes an alert whose ``endsAt`` has passed, so firing alerts must be announced
  again and again. Built into the Alertmanager channels: every firing alert dispatched to one is
  re-sent every ``resend_interval_s`` until its resolve is dispatched. After a restart the
  evaluator calls ``refresh(firing_alerts)`` once with the alerts it restored, which re-announces
  them to Alertmanager only (no new page anywhere else).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import IO

import aiohttp

from processors.alerts.events import AlertEvent
from schemas.channels import ChannelConfig
from sinks.alerts.channels import (
    AlertChannel,
    AlertmanagerChannel,
    ConsoleChannel,
    HttpChannel,
    HttpRequest,
    build_channel,
    safe_target,
)
from sinks.alerts.retry import Backoff, Verdict, classify_status, parse_retry_after
from sinks.alerts.routing import ChannelRouter

log = logging.getLogger("llmpulse.alerts")

DROP_LOG_INTERVAL_S = 10.0
"""At most one drop line per channel this often (with the count since the last), so a storm cannot flood the log."""


@dataclass(slots=True)
class ChannelStats:
    """One channel's counters, in alerts (not HTTP requests), ready to export as Prometheus metrics.

    ``sent``, ``resent``, ``failed``, ``retried`` and ``dropped`` only grow (counters);
    ``queued`` is the current backlog (a gauge).
    """

    sent: int = 0
    """Delivered (every request of the delivery got a 2xx)."""
    resent: int = 0
    """Alertmanager re-announcements of still-firing alerts that got through."""
    failed: int = 0
    """Given up: rejected (4xx) or out of retries."""
    retried: int = 0
    """HTTP attempts repeated after a retryable failure."""
    dropped: int = 0
    """Never attempted to the end: pushed out of a full queue, or still waiting at close."""
    queued: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class _Delivery:
    events: tuple[AlertEvent, ...]
    resend: bool = False
    """A placeholder until claimed: the Alertmanager channel's firing alerts, read when it goes out."""

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(e.dedup_key for e in self.events)

    def describe(self) -> str:
        if self.resend:
            return f"re-send of {len(self.events)} firing alert(s)"
        if len(self.events) == 1:
            e = self.events[0]
            return f"{e.state} alert {e.dedup_key} (rule {e.rule!r})"
        return f"{len(self.events)} alerts"


@dataclass(frozen=True, slots=True)
class _Attempt:
    verdict: Verdict
    reason: str
    retry_after: float | None = None


class _ChannelQueue:
    """One channel's bounded queue, in-flight keys, counters and session; guarded by the dispatcher's lock."""

    def __init__(self, channel: AlertChannel, capacity: int) -> None:
        self.channel = channel
        self.capacity = capacity
        self.pending: deque[_Delivery] = deque()
        self.in_flight_keys: set[str] = set()
        self.in_flight = 0
        self.stats = ChannelStats()
        self.active: dict[str, AlertEvent] = {}
        """Alertmanager only: firing alerts to re-announce, by dedup_key."""
        self.resend_queued = False
        self.drops_since_log = 0
        self.last_drop_log = float("-inf")
        self.wake: asyncio.Event | None = None
        self.session: aiohttp.ClientSession | None = None
        self.backoff: Backoff | None = None

    @property
    def name(self) -> str:
        return self.channel.name

    def label(self, target: str = "") -> str:
        return f"alert channel {self.name!r} ({self.channel.kind}{' → ' + target if target else ''})"

    def enqueue(self, delivery: _Delivery) -> _Delivery | None:
        """Append; when full, drop and return the oldest delivery."""
        dropped = None
        if len(self.pending) >= self.capacity:
            dropped = self.pending.popleft()
            if dropped.resend:
                self.resend_queued = False
            else:
                self.stats.dropped += len(dropped.events)
                self.drops_since_log += len(dropped.events)
        self.pending.append(delivery)
        return dropped

    def enqueue_resend(self) -> bool:
        # a re-announcement never pushes a real alert out of a full queue, and never stacks up
        if self.resend_queued or not self.active or len(self.pending) >= self.capacity:
            return False
        self.pending.append(_Delivery((), resend=True))
        self.resend_queued = True
        return True

    def claim(self) -> _Delivery | None:
        """The oldest delivery that shares no dedup_key with one in flight or queued before it."""
        while True:
            blocked = set(self.in_flight_keys)
            index = None
            for i, delivery in enumerate(self.pending):
                if delivery.resend or blocked.isdisjoint(delivery.keys):
                    index = i
                    break
                blocked |= delivery.keys
            if index is None:
                return None
            delivery = self.pending[index]
            del self.pending[index]
            if delivery.resend:
                self.resend_queued = False
                # alerts in flight or queued ahead are on their way anyway, firing or resolving
                events = tuple(e for key, e in self.active.items() if key not in blocked)
                if not events:
                    continue
                delivery = _Delivery(events, resend=True)
            self.in_flight_keys |= delivery.keys
            self.in_flight += 1
            return delivery

    def release(self, delivery: _Delivery) -> None:
        self.in_flight_keys -= delivery.keys
        self.in_flight -= 1

    def idle(self) -> bool:
        return self.in_flight == 0 and not any(not d.resend for d in self.pending)

    def queued_alerts(self) -> int:
        return sum(len(d.events) for d in self.pending)


class AlertDispatcher:
    """Routes alerts to channels and delivers them from one background thread; see the module docstring.

    Build it once at start-up (it resolves every channel's secrets and raises
    ``SecretUnavailable`` if one is missing), call ``dispatch`` from anywhere, ``close`` at the end.
    """

    def __init__(
        self,
        channels: Sequence[ChannelConfig],
        *,
        clock: Callable[[], float] = time.time,
        console_stream: IO[str] | None = None,
        pickup_delay_s: float = 0.02,
        inbox_size: int = 10_000,
    ) -> None:
        """``pickup_delay_s``: how long after the first alert of a burst the delivery thread picks
        the inbox up (the latency it adds), so a burst costs the caller one wake-up call.

        The first alert of a burst wakes the delivery thread (one system call, where the caller
        may lose the GIL for a switch interval); later ones only append. Polling the inbox 50
        times a second instead cost the delivery thread 0.5-0.7 s of CPU in a 90 s P3w run with no
        alert at all, about 1% of the worker, and took the GIL from stage 1 at every poll.
        ``inbox_size`` bounds what may wait for the pick-up (oldest dropped and counted beyond
        it); the channels' ``queue_size`` bounds what waits for delivery.
        """
        self._router = ChannelRouter(channels)
        self._queues = {
            c.name: _ChannelQueue(build_channel(c, console_stream=console_stream), c.queue_size) for c in channels
        }
        self._clock = clock
        self._pickup_s = pickup_delay_s
        self._wake_pending = False
        """Set by the caller that woke the delivery thread, cleared when a pick-up starts: an alert
        appended before the clear is picked up by it, one appended after wakes the thread again."""
        self._lock = threading.Lock()
        self._inbox: deque[tuple[AlertEvent, tuple[str, ...]]] = deque()
        """Dispatched, not yet in a channel queue: ``deque.append`` is atomic, so ``dispatch`` takes no lock."""
        self._inbox_capacity = inbox_size
        self._inbox_drops = 0
        self._inbox_last_log = float("-inf")
        self._closing = False
        self._warned_closed = False
        self._loop = asyncio.new_event_loop()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop: asyncio.Future[float] | None = None
        """Resolved by ``close`` with its deadline (monotonic)."""
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="llmpulse-alert-dispatcher", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise RuntimeError("alert dispatcher failed to start") from self._startup_error

    # --- the caller's side (any thread) --------------------------------------------------------

    @property
    def channel_names(self) -> list[str]:
        return list(self._queues)

    def dispatch(self, event: AlertEvent) -> list[str]:
        """Queue ``event`` for every channel it routes to and return their names at once.

        No I/O and, unless the delivery thread is starved, no lock: routing and one
        ``deque.append``, tens of microseconds; the first alert of a burst also wakes the thread.
        """
        names = self._router.route(event)
        if not names:
            log.debug("alert %s (rule %r) matches no alert channel", event.dedup_key, event.rule)
            return []
        if self._closing:
            with self._lock:
                for name in names:
                    self._queues[name].stats.dropped += 1
                warn, self._warned_closed = not self._warned_closed, True
            if warn:
                log.warning("alert dispatcher is closed: alert %s (rule %r) dropped", event.dedup_key, event.rule)
            return []
        if len(self._inbox) >= self._inbox_capacity:
            self._drop_from_inbox()
        self._inbox.append((event, tuple(names)))
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(RuntimeError):  # the loop is gone: close() counts what is left
                self._loop.call_soon_threadsafe(self._loop.call_later, self._pickup_s, self._drain_inbox)
        return names

    def refresh(self, active_events: Iterable[AlertEvent]) -> list[str]:
        """Make the Alertmanager channels re-announce exactly these firing alerts, now and every interval.

        For start-up after a restart, with the firing alerts the evaluator restored: Alertmanager
        gets them again before their ``endsAt`` passes, and no other channel pages again.
        Resolved events in the list are ignored. Returns the channels that will announce something.
        """
        wanted: dict[str, dict[str, AlertEvent]] = {
            name: {} for name, q in self._queues.items() if isinstance(q.channel, AlertmanagerChannel)
        }
        for event in active_events:
            if event.firing:
                for name in self._router.route(event):
                    if name in wanted:
                        wanted[name][event.dedup_key] = event
        if self._closing:
            return []
        with contextlib.suppress(RuntimeError):  # the loop closed under us
            self._loop.call_soon_threadsafe(self._apply_refresh, wanted)
        return [name for name, active in wanted.items() if active]

    def stats(self) -> dict[str, ChannelStats]:
        """A consistent snapshot of every channel's counters (copies: safe to keep and compare)."""
        with self._lock:
            waiting: dict[str, int] = {}
            for _, names in list(self._inbox):
                for name in names:
                    waiting[name] = waiting.get(name, 0) + 1
            return {
                name: dataclasses.replace(q.stats, queued=q.queued_alerts() + waiting.get(name, 0))
                for name, q in self._queues.items()
            }

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every dispatched alert was delivered or given up; False on timeout (tests, batch commands)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._inbox and all(q.idle() for q in self._queues.values()):
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking alerts, deliver what can be delivered within ``timeout``, count the rest as dropped."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        deadline = time.monotonic() + timeout
        with contextlib.suppress(RuntimeError):  # the loop is already gone
            self._loop.call_soon_threadsafe(self._request_stop, deadline)
        self._thread.join(timeout + 5.0)
        if self._thread.is_alive():
            log.error("alert dispatcher thread did not stop within %.1f s of its close timeout", timeout + 5.0)

    def __enter__(self) -> AlertDispatcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _drop_from_inbox(self) -> None:
        """The delivery thread has not kept up (starved of CPU): drop the oldest dispatched alert."""
        with self._lock:
            try:
                event, names = self._inbox.popleft()
            except IndexError:
                return
            for name in names:
                self._queues[name].stats.dropped += 1
            self._inbox_drops += 1
            now = time.monotonic()
            if now - self._inbox_last_log < DROP_LOG_INTERVAL_S:
                return
            self._inbox_last_log, count, self._inbox_drops = now, self._inbox_drops, 0
        log.warning(
            "alert dispatcher: %d alerts waiting for the delivery thread, dropped the oldest: %s alert %s for %s; "
            "%d dropped since the last report",
            self._inbox_capacity,
            event.state,
            event.dedup_key,
            ", ".join(names),
            count,
        )

    def _log_drop(self, queue: _ChannelQueue, dropped: _Delivery, depth: int) -> None:
        now = time.monotonic()
        with self._lock:
            if now - queue.last_drop_log < DROP_LOG_INTERVAL_S:
                return
            queue.last_drop_log = now
            count, queue.drops_since_log = queue.drops_since_log, 0
            total = queue.stats.dropped
        log.warning(
            "%s: queue full (%d waiting), dropped the oldest: %s; %d dropped since the last report, %d in total",
            queue.label(),
            depth,
            dropped.describe(),
            count,
            total,
        )

    # --- the loop's side (background thread) -----------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:
            if self._ready.is_set():
                log.exception("alert dispatcher thread stopped on an error; alerts are no longer delivered")
            else:
                self._startup_error = exc
        finally:
            self._ready.set()
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _request_stop(self, deadline: float) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(deadline)

    async def _main(self) -> None:
        self._stop = self._loop.create_future()
        for queue in self._queues.values():
            queue.wake = asyncio.Event()
            workers = 1
            if isinstance(queue.channel, HttpChannel):
                cfg = queue.channel.config
                assert cfg.type != "console"
                workers = cfg.concurrency
                queue.backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s, cfg.retry_after_max_s)
                queue.session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=cfg.timeout_s),
                    connector=aiohttp.TCPConnector(limit=0),
                    trust_env=True,  # HTTPS_PROXY / NO_PROXY: Slack and PagerDuty are often behind an egress proxy
                )
            for _ in range(workers):
                self._tasks.append(asyncio.create_task(self._work(queue)))
            if isinstance(queue.channel, AlertmanagerChannel):
                self._tasks.append(asyncio.create_task(self._resend_loop(queue, queue.channel.resend_interval_s)))
        self._ready.set()
        await self._shutdown(await self._stop)

    def _drain_inbox(self) -> None:
        """Move dispatched alerts into their channels' bounded queues (loop thread only)."""
        self._wake_pending = False  # before the pops: see ``_wake_pending``
        woken: list[_ChannelQueue] = []
        drops: list[tuple[_ChannelQueue, _Delivery, int]] = []
        with self._lock:
            while self._inbox:
                event, names = self._inbox.popleft()
                delivery = _Delivery((event,))
                for name in names:
                    queue = self._queues[name]
                    if isinstance(queue.channel, AlertmanagerChannel):
                        if event.firing:
                            queue.active[event.dedup_key] = event
                        else:
                            queue.active.pop(event.dedup_key, None)
                    dropped = queue.enqueue(delivery)
                    if dropped is not None and not dropped.resend:
                        drops.append((queue, dropped, len(queue.pending)))
                    woken.append(queue)
        for queue in dict.fromkeys(woken):
            assert queue.wake is not None
            queue.wake.set()
        for queue, dropped, depth in drops:
            self._log_drop(queue, dropped, depth)

    def _apply_refresh(self, wanted: dict[str, dict[str, AlertEvent]]) -> None:
        self._drain_inbox()  # alerts dispatched before refresh() apply first
        with self._lock:
            queued = []
            for name, active in wanted.items():
                queue = self._queues[name]
                queue.active = active
                if queue.enqueue_resend():
                    queued.append(queue)
        for queue in queued:
            assert queue.wake is not None
            queue.wake.set()

    async def _shutdown(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._drain_inbox()
            with self._lock:
                if all(q.idle() for q in self._queues.values()):
                    break
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._drain_inbox()
        for queue in self._queues.values():
            with self._lock:
                left = sum(len(d.events) for d in queue.pending if not d.resend)
                queue.pending.clear()
                queue.stats.dropped += left
                dropped_total = queue.stats.dropped
            if left:
                log.warning(
                    "%s: closing with %d alert(s) undelivered, dropped (%d dropped in total)",
                    queue.label(),
                    left,
                    dropped_total,
                )
            if queue.session is not None:
                await queue.session.close()

    async def _resend_loop(self, queue: _ChannelQueue, interval: float) -> None:
        assert queue.wake is not None
        while True:
            await asyncio.sleep(interval)
            with self._lock:
                queued = queue.enqueue_resend()
            if queued:
                queue.wake.set()

    async def _work(self, queue: _ChannelQueue) -> None:
        assert queue.wake is not None
        while True:
            with self._lock:
                delivery = queue.claim()
            if delivery is None:
                queue.wake.clear()
                await queue.wake.wait()
                continue
            try:
                await self._deliver(queue, delivery)
            except asyncio.CancelledError:
                if not delivery.resend:
                    with self._lock:
                        queue.stats.dropped += len(delivery.events)
                raise
            finally:
                with self._lock:
                    queue.release(delivery)
                queue.wake.set()  # its dedup_keys may have been holding back another delivery

    async def _deliver(self, queue: _ChannelQueue, delivery: _Delivery) -> None:
        channel = queue.channel
        try:
            if isinstance(channel, ConsoleChannel):
                # written inline: a stderr that stops reading blocks every log call of the process
                # anyway, so a thread would buy no isolation
                channel.write(delivery.events)
                ok = True
            else:
                assert isinstance(channel, HttpChannel)
                requests = channel.requests(delivery.events, datetime.fromtimestamp(self._clock(), UTC))
                results = await asyncio.gather(*(self._send(queue, r, delivery) for r in requests))
                ok = all(results)
        except Exception as exc:
            # a rendering bug must cost one alert, not the channel's worker; redacted like every line here
            detail = channel.redact("".join(traceback.format_exception(exc)))
            log.error("%s: could not deliver %s:\n%s", queue.label(), delivery.describe(), detail)
            ok = False
        with self._lock:
            if not ok:
                queue.stats.failed += len(delivery.events)
            elif delivery.resend:
                queue.stats.resent += len(delivery.events)
            else:
                queue.stats.sent += len(delivery.events)

    async def _send(self, queue: _ChannelQueue, request: HttpRequest, delivery: _Delivery) -> bool:
        cfg = queue.channel.config
        assert cfg.type != "console" and queue.backoff is not None
        attempt = 0
        while True:
            result = await self._attempt(queue, request)
            if result.verdict == "ok":
                log.debug("%s: delivered %s (%s)", queue.label(request.target), delivery.describe(), result.reason)
                return True
            if result.verdict == "reject":
                log.error(
                    "%s rejected %s: %s; not retried (check the channel's URL/credentials or the payload)",
                    queue.label(request.target),
                    delivery.describe(),
                    result.reason,
                )
                return False
            if attempt >= cfg.retries:
                log.error(
                    "%s: gave up on %s after %d attempt(s): %s",
                    queue.label(request.target),
                    delivery.describe(),
                    attempt + 1,
                    result.reason,
                )
                return False
            delay = queue.backoff.delay(attempt, result.retry_after)
            with self._lock:
                queue.stats.retried += 1
            log.warning(
                "%s: %s for %s; retry %d/%d in %.2f s",
                queue.label(request.target),
                result.reason,
                delivery.describe(),
                attempt + 1,
                cfg.retries,
                delay,
            )
            await asyncio.sleep(delay)
            attempt += 1

    async def _attempt(self, queue: _ChannelQueue, request: HttpRequest) -> _Attempt:
        assert queue.session is not None
        redact = queue.channel.redact
        try:
            async with queue.session.post(
                request.url, data=request.body, headers=dict(request.headers), allow_redirects=False
            ) as response:
                verdict = classify_status(response.status)
                reason = f"HTTP {response.status}"
                if verdict != "ok":
                    snippet = (await response.content.read(300)).decode("utf-8", "replace").strip()
                    if snippet:
                        reason += f" {snippet!r}"
                    if 300 <= response.status < 400:
                        location = safe_target(response.headers.get("Location", ""))
                        reason += f" (redirect to {location}: configure the final URL)"
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                return _Attempt(verdict, redact(reason), retry_after)
        except TimeoutError:
            cfg = queue.channel.config
            assert cfg.type != "console"
            return _Attempt("retry", f"no complete response within {cfg.timeout_s:g} s")
        except aiohttp.InvalidURL:
            return _Attempt("reject", "invalid URL")
        except (aiohttp.ClientError, OSError) as exc:
            return _Attempt("retry", redact(f"{type(exc).__name__}: {exc}"))
