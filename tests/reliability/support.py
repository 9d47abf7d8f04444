"""Shared pieces of the reliability suite: sizes from the environment, paced producers, the
consumer group's committed offsets read from the broker, RSS, exactly-once checks, figures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from ingest.kafka import client_options
from ingest.kafka import end_offsets as kafka_end_offsets
from schemas.config import KafkaSettings
from tests.conftest import ROOT, iso
from tests.llmpulse.workers import ENV, Worker, query

FIGURES: dict[str, dict[str, Any]] = {}
"""test name → what it measured; printed at the end of the run and written as JSON."""


def size(name: str, default: int) -> int:
    """A CI-sized default, overridable (LLMPULSE_RELIABILITY_EVENTS=1000000 for the issue's full size)."""
    return int(os.environ.get(f"LLMPULSE_RELIABILITY_{name}", default))


def record(test: str, **figures: Any) -> None:
    FIGURES.setdefault(test, {}).update(figures)


def call_payload(prefix: str, i: int, now: float, n: int) -> tuple[bytes, bytes]:
    """A valid call keyed by feature, ~450 bytes; event ids are ``prefix-i`` so the set is checkable in SQL."""
    feature = f"feature-{i % 7}"
    body = {
        "event_id": f"{prefix}-{i}",
        "ts": iso(now - 900 + (i % 9000) * 0.1),
        "feature": feature,
        "team": f"team-{i % 3}",
        "model": ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5")[i % 3],
        "provider": ("openai", "openai", "anthropic")[i % 3],
        "input_tokens": 500 + i % 1000,
        "output_tokens": 50 + i % 300,
        "latency_ms": 200.0 + i % 2000,
        "status": "error" if i % 50 == 0 else "ok",
        "request_id": f"{prefix}-r{i}",
        "prompt_version": f"v{i % 4}",
    }
    return feature.encode(), orjson.dumps(body)


@dataclass
class PacedProducer:
    """Produces ``n`` calls at about ``rate``/s from a thread (acks=all, idempotent), so events
    are still arriving while the test kills or breaks things."""

    kafka: KafkaSettings
    topic: str
    prefix: str
    n: int
    rate: float
    chunk: int = 2000
    produced: int = 0
    errors: list[BaseException] = field(default_factory=list)
    _thread: threading.Thread | None = None

    def start(self) -> PacedProducer:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    async def _run(self) -> None:
        producer = AIOKafkaProducer(acks="all", enable_idempotence=True, linger_ms=20, max_batch_size=1 << 20,
                                    **client_options(self.kafka))  # fmt: skip
        await producer.start()
        started = time.monotonic()
        now = time.time()
        try:
            for first in range(0, self.n, self.chunk):
                futures = [
                    await producer.send(self.topic, value, key=key)
                    for key, value in (call_payload(self.prefix, i, now, self.n)
                                       for i in range(first, min(self.n, first + self.chunk)))
                ]  # fmt: skip
                await asyncio.gather(*futures)
                self.produced = min(self.n, first + self.chunk)
                ahead = started + self.produced / self.rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        except BaseException as exc:
            self.errors.append(exc)
            raise
        finally:
            await producer.stop()

    def join(self, timeout: float = 600) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the producer did not finish"
        assert not self.errors, self.errors


def committed(kafka: KafkaSettings, topic: str) -> dict[int, int]:
    """The worker group's committed offsets on the broker, per partition of ``topic``."""

    async def read() -> dict[int, int]:
        admin = AIOKafkaAdminClient(**client_options(kafka))
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(kafka.consumer_group)
        finally:
            await admin.close()
        return {tp.partition: o.offset for tp, o in offsets.items() if tp.topic == topic and o.offset >= 0}

    return asyncio.run(read())


def end_offsets(kafka: KafkaSettings, topic: str) -> dict[int, int]:
    return asyncio.run(kafka_end_offsets(kafka, topic))


def rss_mb(pid: int) -> float:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2, workers: list[Worker] = ()) -> float:
    """Poll until ``predicate()`` is true; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        for w in workers:
            assert w.alive(), f"worker died; see {w.log}:\n{w.log.read_text(errors='replace')[-3000:]}"
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


def cli_query(target: Path | list[str], sql: str) -> list[dict[str, Any]]:
    """``llmpulse query`` on a worker's data directory (a Path) or with other CLI args (``--config``)."""
    if isinstance(target, Path):
        return query(target, sql)
    proc = subprocess.run(
        [sys.executable, "-m", "llmpulse.cli", "query", sql, "--format", "json", *target],
        capture_output=True, text=True, env=ENV, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def assert_exactly_the_produced_ids(target: Path | list[str], prefix: str, n: int) -> dict[str, Any]:
    """n rows, n distinct ids, every id ``prefix-i`` with 0 <= i < n: so exactly the produced set."""
    (row,) = cli_query(
        target,
        f"SELECT count() AS rows, uniqExact(event_id) AS ids, "
        f"countIf(NOT match(event_id, '^{prefix}-[0-9]+$')) AS foreign, "
        f"min(toUInt64OrZero(substring(event_id, {len(prefix) + 2}))) AS lo, "
        f"max(toUInt64OrZero(substring(event_id, {len(prefix) + 2}))) AS hi, "
        "(SELECT sum(calls) FROM llm_calls_1m) AS rolled FROM llm_calls",
    )
    assert row == {"rows": n, "ids": n, "foreign": 0, "lo": 0, "hi": n - 1, "rolled": n}, row
    return row


def reconcile(target: Path | list[str], since: str = "2d") -> dict[str, Any]:
    """``llmpulse reconcile --json`` on the worker's data directory (the worker must have stopped) or other args."""
    args = ["--data-dir", str(target)] if isinstance(target, Path) else target
    proc = subprocess.run(
        [sys.executable, "-m", "llmpulse.cli", "reconcile", "--since", since, "--json", *args],
        capture_output=True, text=True, env=ENV, check=False, timeout=300,
    )  # fmt: skip
    body: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
    assert proc.returncode == 0 and body.get("ok"), f"reconcile found differences:\n{proc.stdout}\n{proc.stderr}"
    return body


class FaultyWorker(Worker):
    """``llmpulse worker`` through ``tests.reliability.faults``: ClickHouse is down while ``flag`` exists."""

    def __init__(self, config: Path, data_dir: Path, log: Path, flag: Path) -> None:
        super().__init__(config, data_dir, log)
        self.flag = flag

    def start(self) -> FaultyWorker:
        self._out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.faults", str(self.flag), "--", "-v", "worker",
             "--config", str(self.config), "--data-dir", str(self.data_dir)],
            stdout=self._out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT,
        )  # fmt: skip
        return self


def timed() -> Iterator[float]:
    """Seconds since the first ``next()``."""
    started = time.monotonic()
    while True:
        yield time.monotonic() - started


class TcpProxy:
    """A loopback TCP proxy to a real server that can be switched off: while off, nothing listens on
    its port, so clients get a genuine refused connection (the real-server outage variant)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        import socket

        self.upstream = upstream
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self._listener: Any = None
        self._conns: list[Any] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        import socket

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: Any) -> None:
        import socket

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: Any, dst: Any) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def stop(self) -> None:
        """Stop listening and cut every open connection."""
        import socket

        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close alone does not
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()
