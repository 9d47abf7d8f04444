"""Helpers for tests that run `llmpulse worker` processes against the real broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaProducer

from ingest.kafka import consumer_lag
from schemas.config import KafkaSettings

ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("LLMPULSE_")}, "PYTHONUNBUFFERED": "1"}


RAW_PART_ONLY = """
import os
import sinks.clickhouse as ch
original = ch.ClickHouseSink.write

def write_raw_only(self, batches, token):
    # what a kill between ClickHouse committing the raw part and the views' parts leaves behind
    for view in ("llm_calls_1m_mv", "served_models_1m_mv"):
        self.client.command(f"DETACH TABLE {self.conn.database}.{view}")  # attached again on restart
    original(self, batches, token)
    os._exit(9)

ch.ClickHouseSink.write = write_raw_only
"""
"""Crash hook for ``crashing_cli``: the first insert lands in raw only, then the process dies."""


TERM_MID_BATCH = """
import os, signal, time
import processors.chain as chain
original = chain.CallPipeline.process
seen = []

def process_while_stopping(self, batch, now, others=None):
    out = original(self, batch, now, others)
    seen.append(len(batch))
    if len(seen) == 3:  # mid-stream, mid-batch: windows hold these events, the writer does not yet
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.5)  # the stop begins while this batch is still being processed
    return out

chain.CallPipeline.process = process_while_stopping
"""
"""Hook for ``crashing_cli``: SIGTERM arrives while the worker's thread is processing a batch."""


FIRST_PROGRESS_READ_FAILS = """
import sinks.clickhouse as ch
original = ch.ClickHouseSink.kafka_progress
failed = []

def unreachable_once(self, *args):
    if not failed:
        failed.append(True)
        raise ConnectionError("ClickHouse unreachable (injected)")
    return original(self, *args)

ch.ClickHouseSink.kafka_progress = unreachable_once
"""
"""Hook for ``Worker``: reading the first assigned partition's progress back fails once."""


_SENDS_FAIL = """
import asyncio
import aiokafka
from aiokafka.errors import KafkaTimeoutError
original = aiokafka.AIOKafkaProducer.send
failed = {}  # id of the value object -> its topic: an Outbox sends the same object again

def should_fail(topic, value, partition):
    raise NotImplementedError

async def send(self, topic, value=None, key=None, partition=None, **kw):
    if id(value) not in failed and should_fail(topic, value, partition):
        failed[id(value)] = (topic, value)  # kept alive, so its id is not reused
        future = asyncio.get_running_loop().create_future()
        future.set_exception(KafkaTimeoutError(f"{topic}: not acknowledged (injected)"))
        return future  # never reaches the broker, as a batch that expired in the producer
    return await original(self, topic, value=value, key=key, partition=partition, **kw)

aiokafka.AIOKafkaProducer.send = send
"""


def quality_outputs_fail_once(kafka: KafkaSettings) -> str:
    """Hook for ``Worker``: the quality agent's first judge-request send and first quality partials
    publish fail (after the batch is durable)."""
    return _SENDS_FAIL + _QUALITY_OUTPUTS_FAIL.replace("{judge}", kafka.topics.judge_requests).replace(
        "{partials}", kafka.topics.partials
    )


_QUALITY_OUTPUTS_FAIL = """
def should_fail(topic, value, partition):
    # the quality agent's first judge request (a thumbs-down) and its first quality partial: a
    # round where the others land, when the batch has several
    if topic == "{judge}" and b'"reason":"thumbs_down"' in value:
        kind = "judge"
    elif topic == "{partials}" and b'"partition":-2,' in value.split(b"\\n", 1)[0]:
        kind = "partials"
    else:
        return False
    if kind in kinds:
        return False
    kinds.add(kind)
    return True

kinds = set()
"""


def calls_outputs_fail_halfway(kafka: KafkaSettings) -> str:
    """Hook for ``Worker``: one in five of the calls path's output messages is not acknowledged
    once, in rounds of sends where the others are."""
    return _SENDS_FAIL + _CALLS_OUTPUTS_FAIL.replace("{alerts}", kafka.topics.alerts)


_CALLS_OUTPUTS_FAIL = """
import itertools
counter = itertools.count()

def should_fail(topic, value, partition):
    # every fifth partial, judge request or dead letter of the first 2,000 fails once; heartbeats
    # (sent to a given partition) pass. A round of sends thus fails halfway, many times over.
    return partition is None and topic != "{alerts}" and next(counter) % 5 == 2 and len(failed) < 400
"""


def crashing_cli(hook: str, *command: str) -> str:
    """A ``python -c`` script: install ``hook`` (code that makes the process die somewhere), then run
    ``llmpulse COMMAND --config ARGV1 --data-dir ARGV2``."""
    args = ", ".join(repr(a) for a in command)
    argv = f"['llmpulse', {args}, '--config', sys.argv[1], '--data-dir', sys.argv[2]]"
    return f"import sys\n{hook}\nfrom llmpulse.cli import main\nsys.argv = {argv}\nmain()\n"


def write_config(path: Path, kafka: KafkaSettings, **extra: Any) -> Path:
    """A worker config; /metrics on a free port (workers of a test run side by side)."""
    data = {"kafka": json.loads(kafka.model_dump_json(exclude_none=True)), "metrics": {"port": 0}, **extra}
    if kafka.sasl_password is not None:
        data["kafka"]["sasl_password"] = kafka.sasl_password.get_secret_value()
    path.write_text(yaml.safe_dump(data))
    return path


class Worker:
    """One `llmpulse worker` subprocess with its own chDB data directory."""

    def __init__(self, config: Path, data_dir: Path, log: Path, hook: str | None = None) -> None:
        self.config = config
        self.data_dir = data_dir
        self.log = log
        self.hook = hook
        """Code run first in the worker process (see ``crashing_cli``): a fault it injects."""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        self._out = self.log.open("ab")
        if self.hook is None:
            cmd = [sys.executable, "-m", "llmpulse.cli", "-v", "worker", "--config", str(self.config),
                   "--data-dir", str(self.data_dir)]  # fmt: skip
        else:
            cmd = [sys.executable, "-c", crashing_cli(self.hook, "-v", "worker"), str(self.config), str(self.data_dir)]
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=ENV)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the worker owns partitions (signal handlers are installed by then)."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.alive():
            if "llm.calls partitions assigned" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.1)

    def metrics_url(self) -> str:
        import re

        found = re.search(r"metrics at http://[^:]+:(\d+)/metrics", self.log.read_text(errors="replace"))
        assert found, "the worker did not log its metrics address"
        return f"http://127.0.0.1:{found.group(1)}/metrics"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.wait_ready()
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._out.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def crash_worker(config: Path, data_dir: Path, hook: str, log: Path) -> None:
    """Run ``llmpulse worker`` with a crash ``hook`` (see ``crashing_cli``) until the hook kills it."""
    with log.open("wb") as out:
        crashed = subprocess.run(
            [sys.executable, "-c", crashing_cli(hook, "-v", "worker"), str(config), str(data_dir)],
            stdout=out, stderr=subprocess.STDOUT, env=ENV, timeout=120, check=False,
        )  # fmt: skip
    assert crashed.returncode == 9, log.read_text(errors="replace")[-3000:]


def drain_with_worker(config: Path, data_dir: Path, log: Path, kafka: KafkaSettings) -> str:
    """Start a worker, let it catch up with the calls topic, stop it cleanly; its log."""
    worker = Worker(config, data_dir, log).start()
    try:
        worker.wait_ready(120)
        wait_caught_up(kafka, kafka.topics.calls, workers=[worker])
    finally:
        assert worker.stop() == 0
    return worker.log.read_text()


def query(data_dir: Path, sql: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "llmpulse.cli", "query", sql, "--format", "json", "--data-dir", str(data_dir)],
        capture_output=True, text=True, env=ENV, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


async def produce(kafka: KafkaSettings, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers, acks="all", enable_idempotence=True, linger_ms=20,
        max_batch_size=1 << 20,
    )  # fmt: skip
    await producer.start()
    try:
        for key, value in messages:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


def wait_caught_up(kafka: KafkaSettings, topic: str, timeout: float = 120, workers: list[Worker] | None = None) -> None:
    deadline = time.time() + timeout
    lag = -1
    while time.time() < deadline:
        lag = sum(asyncio.run(consumer_lag(kafka, kafka.consumer_group, topic)).values())
        if lag == 0:
            return
        for w in workers or []:
            assert w.alive(), f"worker died; see {w.log}:\n{w.log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"consumer group {kafka.consumer_group} still {lag} behind on {topic}")


async def consume_all(kafka: KafkaSettings, topic: str, timeout: float = 10) -> list[Any]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            got = [m for msgs in batch.values() for m in msgs]
            if not got and out:
                break
            out.extend(got)
    finally:
        await consumer.stop()
    return out
