"""The Kafka broker restarts mid-stream: the SDK and the worker both recover, nothing accepted is lost.

The session broker is shared by the whole test run, so these tests start a private one (same
recipe, deploy/kafka/kafka.sh, on its own ports and directories) and stop that. A service
records calls through the SDK (``ingest.Telemetry``) at a steady rate throughout; the SDK buffers
while the broker is away (best-effort by design: it never blocks its caller, and would drop only
past its buffer bound, counted). Afterwards every recorded call is in ClickHouse exactly once.
Size: LLMPULSE_RELIABILITY_BROKER_EVENTS (default 30,000), outage LLMPULSE_RELIABILITY_BROKER_DOWN_S (5).
The second test stops the worker while the broker is away (LLMPULSE_RELIABILITY_BROKER_STOP_EVENTS,
default 20,000).
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ingest.kafka import create_topics
from schemas.config import KafkaSettings, TopicNames
from tests.conftest import PrivateBroker, iso
from tests.llmpulse.workers import Worker, wait_caught_up, write_config
from tests.reliability.support import (
    PacedProducer,
    assert_exactly_the_produced_ids,
    committed,
    reconcile,
    record,
    size,
    wait_for,
)

pytestmark = pytest.mark.kafka  # the private broker fixture skips without Java and Maven


def _worker_on(broker: PrivateBroker, tmp_path: Path, group: str) -> tuple[KafkaSettings, Path, Worker]:
    """Topics on the private broker and a worker of ``group`` consuming them, ready."""
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, topics=TopicNames(), consumer_group=group,
                          partitions=4, fetch_max_wait=0.05, session_timeout=6.0)  # fmt: skip
    asyncio.run(create_topics(kafka))
    cfg = write_config(tmp_path / "w.yaml", kafka, pipeline={"batch_max_seconds": "200ms"})
    worker = Worker(cfg, tmp_path / "data", tmp_path / "w.log").start()
    worker.wait_ready(120)
    return kafka, cfg, worker


def test_broker_restart_mid_stream(tmp_path: Path, private_broker: PrivateBroker) -> None:
    from ingest import Telemetry

    n = size("BROKER_EVENTS", 30_000)
    down_s = size("BROKER_DOWN_S", 5)
    kafka, _, worker = _worker_on(private_broker, tmp_path, "restart-worker")
    telemetry = Telemetry(private_broker.bootstrap, topic=kafka.topics.calls, service="checkout", team="payments",
                          buffer_size=max(n, 10_000))  # fmt: skip
    rate = n / (10 + down_s + 15)  # before, during and after the outage
    recorded = [0]

    def service() -> None:
        """A service's request path: one record() per call, never blocked by the outage."""
        started = time.monotonic()
        for i in range(n):
            ok = telemetry.record(event_id=f"restart-{i}", ts=iso(time.time()), feature=f"feature-{i % 5}",
                                  model="gpt-4o-mini", input_tokens=100 + i % 50, output_tokens=20,
                                  latency_ms=300.0, status="ok")  # fmt: skip
            assert ok
            recorded[0] = i + 1
            ahead = started + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    calls = threading.Thread(target=service, daemon=True)
    calls.start()
    try:
        wait_for(lambda: sum(committed(kafka, kafka.topics.calls).values()) >= n // 5, 120, "flow before the restart",
                 workers=[worker])  # fmt: skip
        stop_s = private_broker.run("stop")
        stopped = time.monotonic()
        recorded_at_stop = recorded[0]
        time.sleep(down_s)
        start_s = private_broker.run("start")
        back = time.monotonic()
        assert worker.alive(), worker.log.read_text(errors="replace")[-4000:]
        calls.join(120)
        assert telemetry.flush(120), telemetry.stats()
        sdk_drained = time.monotonic() - back
        wait_caught_up(kafka, kafka.topics.calls, timeout=180, workers=[worker])
        worker_caught_up = time.monotonic() - back
    finally:
        telemetry.close()
        code = worker.stop()
    stats = telemetry.stats()
    assert code == 0, worker.log.read_text(errors="replace")[-4000:]
    assert stats["dropped_buffer_full"] == 0 and stats["dropped_unsendable"] == 0, stats
    assert stats["sent"] == n, stats
    assert_exactly_the_produced_ids(tmp_path / "data", "restart", n)
    reconcile(tmp_path / "data")
    record("broker_restart_mid_stream", events=n, broker_stop_s=round(stop_s, 1),
           broker_down_s=round(back - stopped, 1), broker_start_s=round(start_s, 1),
           recorded_before_stop=recorded_at_stop,
           sdk_send_errors=stats.get("send_errors", 0), sdk_drained_after_restart_s=round(sdk_drained, 1),
           worker_caught_up_after_restart_s=round(worker_caught_up, 1))  # fmt: skip


STOP_GRACE_S = 60
"""docker-compose.yml's ``stop_grace_period`` for the worker: past it, the worker is SIGKILLed."""


def test_sigterm_while_the_broker_is_down(tmp_path: Path, private_broker: PrivateBroker) -> None:
    """The broker goes away mid-stream and the worker is told to stop: it exits, cleanly and within
    the grace period (it used to wait for the broker forever: aiokafka's commit waits for its
    coordinator, an idempotent producer for every acknowledgement). What it could not publish or
    commit is read again once the broker is back: every event lands exactly once."""
    n = size("BROKER_STOP_EVENTS", 20_000)
    kafka, cfg, worker = _worker_on(private_broker, tmp_path, "stop-worker")
    producer = PacedProducer(kafka, kafka.topics.calls, "stop", n, rate=n / 10).start()
    try:
        producer.join(120)
        wait_for(lambda: sum(committed(kafka, kafka.topics.calls).values()) >= n // 4, 120, "flow before the outage",
                 workers=[worker])  # fmt: skip
        private_broker.run("stop")
        began = time.monotonic()
        try:
            code = worker.stop(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            worker.kill()
            raise AssertionError(f"the worker outlived the {STOP_GRACE_S} s grace period after SIGTERM") from None
        stopped_in = time.monotonic() - began
    finally:
        if worker.alive():
            worker.kill()
    assert code == 0, worker.log.read_text(errors="replace")[-4000:]
    # aiokafka logged each failed retry, ~250 lines a second here; each distinct line now shows
    # once per 30 s with a count (``llmpulse.logs.QuietRepeats``)
    text = worker.log.read_text(errors="replace")
    refused = text.count("Unable connect to")
    assert refused <= 10, refused
    assert "[WARNING] ^" not in text  # a thread's traceback is one record, not a line per write
    assert "retrying cannot mend" not in text  # nothing given up as unsendable behind the stop
    lines = text.count("\n")
    private_broker.run("start")
    again = Worker(cfg, tmp_path / "data", tmp_path / "w2.log").start()
    try:
        again.wait_ready(120)
        wait_caught_up(kafka, kafka.topics.calls, timeout=180, workers=[again])
        assert again.stop() == 0, again.log.read_text(errors="replace")[-4000:]
    finally:
        if again.alive():
            again.kill()
    assert_exactly_the_produced_ids(tmp_path / "data", "stop", n)
    reconcile(tmp_path / "data")
    record("sigterm_while_the_broker_is_down", events=n, stopped_in_s=round(stopped_in, 1),
           connection_refused_lines=refused, log_lines=lines)  # fmt: skip
