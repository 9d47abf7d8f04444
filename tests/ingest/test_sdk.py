"""The producer SDK against the real Kafka broker: exact bytes, exactly-once counts, a broker that is
down or comes back, fork safety, the timing context manager, and sticky canary assignment."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.partitioner import DefaultPartitioner

from ingest.kafka import create_topics
from ingest.sdk import CallbackTransport, KafkaTransport, OutMessage, Telemetry, assign_variant, bucket, prompt_hash
from schemas.events import CallEvent, FeedbackEvent
from schemas.limits import SCHEMA_VERSION
from tests.conftest import ROOT

pytestmark = pytest.mark.kafka


def _event(event_id: str, feature: str = "support-chat", **extra: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "feature": feature,
        "model": "gpt-4o",
        "input_tokens": 100,
        "output_tokens": 20,
        "latency_ms": 12.5,
        "status": "ok",
        **extra,
    }


async def _read_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[ConsumerRecord[Any, Any]]:
    """Every message of the topic, once there are ``expected``; the end offsets prove there are no more."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()  # no group: every partition is assigned to this consumer
    try:
        deadline = time.monotonic() + timeout
        records: list[ConsumerRecord[Any, Any]] = []
        while len(records) < expected and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
        ends = await consumer.end_offsets(list(consumer.assignment()))
        assert sum(ends.values()) == len(records), "the topic holds more messages than were read"
        return records
    finally:
        await consumer.stop()


def read_all(bootstrap: str, topic: str, expected: int) -> list[ConsumerRecord[Any, Any]]:
    return asyncio.run(_read_all(bootstrap, topic, expected))


def _ids(records: list[ConsumerRecord[Any, Any]]) -> list[str]:
    return [orjson.loads(r.value)["event_id"] for r in records]


@pytest.fixture
def topics(kafka_settings: Any) -> Any:
    asyncio.run(create_topics(kafka_settings))
    return kafka_settings


@pytest.fixture
def telemetry(topics: Any) -> Iterator[Telemetry]:
    t = Telemetry(
        topics.bootstrap_servers,
        topic=topics.topics.calls,
        feedback_topic=topics.topics.feedback,
        service="checkout-api",
        team="cx",
        linger_ms=5,
    )
    yield t
    t.close(5)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------


def test_messages_carry_the_exact_event_keyed_by_feature(topics: Any, telemetry: Telemetry) -> None:
    ts = datetime(2026, 11, 18, 11, 0, 0, 123000, tzinfo=UTC)
    model_event = CallEvent(
        event_id="e-model",
        ts=ts,
        feature="support-chat",
        model="gpt-4o",
        input_tokens=1200,
        output_tokens=80,
        cached_input_tokens=1000,
        latency_ms=812.5,
        ttft_ms=95.25,
        status="ok",
        params={"temperature": 0.2, "max_tokens": 256},
        tool_calls=["lookup_order"],
        attributes={"region": "eu"},
        team="payments",  # an explicit team wins over the instance default
    )
    assert telemetry.record(model_event)
    assert telemetry.record(
        {"event_id": "e-dict", "ts": "2026-11-18T11:00:01Z", "feature": "search", "model": "gpt-4o-mini"},
        input_tokens=10,
        output_tokens=2,
        latency_ms=40,
        status="rate_limited",
        error_type="RateLimitError",
        prompt="Where is my order 1234?",  # capture is off: only the hash leaves the process
        output="It ships today.",
        shadow_flag=True,  # an unknown field travels as-is; the pipeline files it under attributes
    )
    assert telemetry.record_feedback(request_id="chatcmpl-7", thumbs="down", ts=ts, event_id="fb-1", comment="wrong")
    assert telemetry.flush(20)

    calls = read_all(topics.bootstrap_servers, topics.topics.calls, 2)
    by_id = {orjson.loads(r.value)["event_id"]: r for r in calls}
    assert by_id["e-model"].key == b"support-chat"
    assert orjson.loads(by_id["e-model"].value) == {
        "kind": "call",
        "schema_version": SCHEMA_VERSION,
        "event_id": "e-model",
        "ts": "2026-11-18T11:00:00.123000Z",
        "feature": "support-chat",
        "model": "gpt-4o",
        "input_tokens": 1200,
        "output_tokens": 80,
        "latency_ms": 812.5,
        "status": "ok",
        "service": "checkout-api",
        "team": "payments",
        "params": {"temperature": 0.2, "max_tokens": 256},
        "cached_input_tokens": 1000,
        "ttft_ms": 95.25,
        "tool_calls": ["lookup_order"],
        "attributes": {"region": "eu"},
    }
    assert by_id["e-dict"].key == b"search"
    assert orjson.loads(by_id["e-dict"].value) == {
        "kind": "call",
        "schema_version": SCHEMA_VERSION,
        "event_id": "e-dict",
        "ts": "2026-11-18T11:00:01Z",
        "feature": "search",
        "model": "gpt-4o-mini",
        "input_tokens": 10,
        "output_tokens": 2,
        "latency_ms": 40.0,
        "status": "rate_limited",
        "service": "checkout-api",
        "team": "cx",
        "error_type": "RateLimitError",
        "prompt_hash": prompt_hash("Where is my order 1234?"),
        "output_chars": 15,
        "shadow_flag": True,
    }
    # what was sent is what the schema of record reads back
    assert CallEvent.model_validate_json(by_id["e-model"].value) == model_event.model_copy(
        update={"service": "checkout-api"}
    )
    # keyed by feature with Kafka's standard partitioner, like any other client would place it
    partitions = list(range(topics.partitions))
    assert by_id["e-dict"].partition == DefaultPartitioner()(b"search", partitions, partitions)

    feedback = read_all(topics.bootstrap_servers, topics.topics.feedback, 1)
    assert feedback[0].key == b"chatcmpl-7"
    assert orjson.loads(feedback[0].value) == {
        "kind": "feedback",
        "schema_version": SCHEMA_VERSION,
        "request_id": "chatcmpl-7",
        "ts": "2026-11-18T11:00:00.123000Z",
        "event_id": "fb-1",
        "thumbs": "down",
        "comment": "wrong",
    }
    FeedbackEvent.model_validate_json(feedback[0].value)


def test_5k_sync_and_5k_async_events_arrive_exactly_once(topics: Any, telemetry: Telemetry) -> None:
    def sync_producer(worker: int) -> None:
        for i in range(2500):
            telemetry.record(_event(f"sync-{worker}-{i}", feature=f"feature-{i % 7}"))

    threads = [threading.Thread(target=sync_producer, args=(w,)) for w in range(2)]
    for th in threads:
        th.start()

    async def async_producers() -> None:
        async def one(i: int) -> None:
            async with telemetry.acall(feature=f"feature-{i % 5}", model="gpt-4o", event_id=f"async-{i}") as call:
                await asyncio.sleep(0)
                call.usage(input_tokens=50, output_tokens=5)

        await asyncio.gather(*(one(i) for i in range(5000)))
        assert await telemetry.aflush(30)

    asyncio.run(async_producers())
    for th in threads:
        th.join()
    assert telemetry.flush(30)

    records = read_all(topics.bootstrap_servers, topics.topics.calls, 10_000)
    ids = _ids(records)
    assert len(ids) == 10_000
    expected = {f"sync-{w}-{i}" for w in range(2) for i in range(2500)} | {f"async-{i}" for i in range(5000)}
    assert set(ids) == expected
    stats = telemetry.stats()
    assert stats["recorded"] == stats["sent"] == 10_000
    assert stats["dropped_buffer_full"] == stats["dropped_invalid"] == stats["send_errors"] == 0
    # a feature's events share one partition, in the order they were recorded
    per_feature: dict[str, set[int]] = {}
    for r in records:
        per_feature.setdefault(r.key.decode(), set()).add(r.partition)
    assert all(len(p) == 1 for p in per_feature.values())


def test_broker_down_never_blocks_drops_oldest_with_a_log_line_then_a_live_broker_delivers(
    topics: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ingest.sdk")
    caplog.set_level(logging.WARNING, logger="aiokafka")
    down = Telemetry(f"127.0.0.1:{_unused_port()}", topic=topics.topics.calls, buffer_size=1000)
    durations = []
    for i in range(5000):
        t0 = time.perf_counter()
        accepted = down.record(_event(f"lost-{i}"))
        durations.append(time.perf_counter() - t0)
        assert accepted
    durations.sort()
    p99_ms = durations[int(len(durations) * 0.99)] * 1000
    assert p99_ms < 1.0, f"record() p99 {p99_ms:.3f} ms with the broker down and the buffer full"

    stats = down.stats()
    assert stats["buffered"] == 1000
    assert stats["dropped_buffer_full"] == 4000
    assert stats["recorded"] == 5000
    assert stats["sent"] == 0
    deadline = time.monotonic() + 5
    while "buffer full" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(r.getMessage() for r in caplog.records if "buffer full" in r.getMessage())
    assert "dropped the 4000 oldest events" in line
    assert "cannot reach Kafka at 127.0.0.1:" in caplog.text
    # aiokafka's ERROR at each reconnect from the sender thread is demoted (the warning above says
    # it, throttled); the host's own aiokafka lines are not
    logging.getLogger("aiokafka").error("the host's own aiokafka line")
    client = [(r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith("aiokafka")]
    assert client == [("ERROR", "the host's own aiokafka line")]
    caplog.set_level(logging.DEBUG, logger="aiokafka")  # asked for, the demoted lines are there
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
        r.name == "aiokafka" and "Unable connect" in r.getMessage() for r in caplog.records
    ):
        time.sleep(0.1)
    demoted = {(r.levelname, r.threadName) for r in caplog.records if "Unable connect" in r.getMessage()}
    assert demoted == {("DEBUG", "llmpulse-telemetry")}

    assert not down.flush(0.5)
    assert not down.close(1)
    assert down.stats()["dropped_closed"] == 1000
    assert not down.record(_event("after-close"))  # closed: counted, not raised

    live = Telemetry(topics.bootstrap_servers, topic=topics.topics.calls)
    for i in range(100):
        live.record(_event(f"live-{i}"))
    assert live.close(20)
    assert sorted(_ids(read_all(topics.bootstrap_servers, topics.topics.calls, 100))) == sorted(
        f"live-{i}" for i in range(100)
    )


class _TcpProxy:
    """A plain TCP forwarder in front of the real broker: closing its port is the broker going
    away for a new client (bootstrap), opening it again is the broker coming back."""

    def __init__(self, target_port: int) -> None:
        self.port = _unused_port()
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.base_events.Server | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def open(self) -> None:
        async def start() -> None:
            self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)

    def shutdown(self) -> None:
        async def stop() -> None:
            if self.server is not None:
                self.server.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_reconnects_when_the_broker_returns_and_delivers_the_newest_buffered(topics: Any) -> None:
    broker_port = int(topics.bootstrap_servers.rsplit(":", 1)[1])
    proxy = _TcpProxy(broker_port)
    t = Telemetry(f"127.0.0.1:{proxy.port}", topic=topics.topics.calls, buffer_size=500)
    try:
        for i in range(800):
            t.record(_event(f"seq-{i:04d}"))
        time.sleep(0.3)  # the sender has tried and failed to connect by now
        assert t.stats()["sent"] == 0
        proxy.open()
        assert t.flush(30)
        stats = t.stats()
        assert stats["sent"] == 500
        assert stats["dropped_buffer_full"] == 300
    finally:
        t.close(5)
        proxy.shutdown()
    ids = sorted(_ids(read_all(topics.bootstrap_servers, topics.topics.calls, 500)))
    assert ids == [f"seq-{i:04d}" for i in range(300, 800)]  # drop-oldest: the newest 500 survive


def test_call_context_manager_times_classifies_and_reraises(topics: Any, telemetry: Telemetry) -> None:
    with telemetry.call(feature="support-chat", model="gpt-4o", event_id="cm-ok", variant="canary") as call:
        time.sleep(0.03)
        call.first_token()
        time.sleep(0.03)
        call.usage(input_tokens=300, output_tokens=40, cached_input_tokens=200, cache_write_tokens=50)
        call.set(finish_reason="stop", request_id="req-1")

    class RateLimitError(Exception):
        """Named like the provider SDKs' class: recognised without importing them."""

    class HttpError(Exception):
        status_code = 429

    for event_id, exc in (
        ("cm-timeout", TimeoutError("read timed out")),
        ("cm-error", RuntimeError("x" * 5000)),
        ("cm-rate", RateLimitError("slow down")),
        ("cm-429", HttpError("too many requests")),
    ):
        with pytest.raises(type(exc)) as info, telemetry.call(feature="f", model="m", event_id=event_id):
            raise exc
        assert info.value is exc  # the caller's own exception, unchanged

    async def async_calls() -> None:
        async with telemetry.acall(feature="f", model="m", event_id="acm-ok") as call:
            await asyncio.sleep(0.02)
            call.first_token()
        with pytest.raises(TimeoutError):
            async with telemetry.acall(feature="f", model="m", event_id="acm-timeout"):
                await asyncio.wait_for(asyncio.sleep(1), 0.01)

    asyncio.run(async_calls())

    # the SDK's own trouble (here: an invalid event) never reaches the caller
    with telemetry.call(feature="f", model="m", event_id="cm-invalid") as call:
        call.usage(input_tokens=-1)
    assert telemetry.stats()["dropped_invalid"] == 1

    assert telemetry.flush(20)
    events = {
        e["event_id"]: e
        for e in (orjson.loads(r.value) for r in read_all(topics.bootstrap_servers, topics.topics.calls, 7))
    }
    ok = events["cm-ok"]
    assert ok["status"] == "ok"
    assert 60 <= ok["latency_ms"] < 1000
    assert 30 <= ok["ttft_ms"] < ok["latency_ms"]
    assert (ok["input_tokens"], ok["output_tokens"], ok["cached_input_tokens"], ok["cache_write_tokens"]) == (
        300,
        40,
        200,
        50,
    )
    assert (ok["finish_reason"], ok["request_id"], ok["variant"]) == ("stop", "req-1", "canary")
    assert (events["cm-timeout"]["status"], events["cm-timeout"]["error_type"]) == ("timeout", "TimeoutError")
    assert events["cm-timeout"]["error_message"] == "read timed out"
    assert (events["cm-error"]["status"], events["cm-error"]["error_type"]) == ("error", "RuntimeError")
    assert len(events["cm-error"]["error_message"]) == 1000
    assert events["cm-rate"]["status"] == "rate_limited"
    assert events["cm-429"]["status"] == "rate_limited"
    assert (events["cm-ok"]["input_tokens"], events["cm-timeout"]["input_tokens"]) == (300, 0)
    assert events["acm-ok"]["status"] == "ok" and events["acm-ok"]["ttft_ms"] >= 20
    assert events["acm-timeout"]["status"] == "timeout"


def test_a_forked_child_publishes_its_own_events_and_the_parent_keeps_its_buffer(topics: Any) -> None:
    t = Telemetry(topics.bootstrap_servers, topic=topics.topics.calls, linger_ms=400)
    try:
        for i in range(50):
            t.record(_event(f"parent-early-{i}"))
        assert t.flush(20)  # the sender thread and its producer are running
        for i in range(50):
            t.record(_event(f"parent-buffered-{i}"))  # still lingering in the parent's buffer at fork time
        before = t.stats()
        assert before["buffered"] + before["in_flight"] == 50

        pid = os.fork()
        if pid == 0:  # the child: must leave through os._exit whatever happens
            code = 1
            try:
                fresh = t.stats()
                for i in range(100):
                    t.record(_event(f"child-{i}"))
                delivered = t.flush(20)
                after = t.stats()
                code = 0 if (fresh["recorded"], fresh["buffered"], delivered, after["sent"]) == (0, 0, True, 100) else 3
            finally:
                os._exit(code)

        for i in range(50):
            t.record(_event(f"parent-late-{i}"))
        deadline = time.monotonic() + 40
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish")
        assert os.waitstatus_to_exitcode(status) == 0, "the child did not deliver exactly its own 100 events"
        assert t.flush(20)
        assert t.stats()["sent"] == 150
    finally:
        t.close(5)
    ids = _ids(read_all(topics.bootstrap_servers, topics.topics.calls, 250))
    expected = [f"{who}-{i}" for who in ("parent-early", "parent-buffered", "parent-late") for i in range(50)]
    assert sorted(ids) == sorted(expected + [f"child-{i}" for i in range(100)])


def test_from_env_connects_with_sasl_scram(topics: Any) -> None:
    if os.environ.get("LLMPULSE_KAFKA_BOOTSTRAP"):
        pytest.skip("an external broker: the SASL listener is the project's own broker's")
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 19093)) != 0:
            pytest.skip("the local broker has no SASL listener on 19093")
    env = {
        "LLMPULSE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:19093",
        "LLMPULSE_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "LLMPULSE_KAFKA__SASL_MECHANISM": "SCRAM-SHA-256",
        "LLMPULSE_KAFKA__SASL_USERNAME": "llmpulse",
        "LLMPULSE_KAFKA__SASL_PASSWORD": "llmpulse-secret",
        "LLMPULSE_KAFKA__TOPICS__CALLS": topics.topics.calls,
        "LLMPULSE_SDK__SERVICE": "env-service",
        "LLMPULSE_SDK__BUFFER_SIZE": "500",
        "LLMPULSE_SDK__COMPRESSION": "none",
    }
    t = Telemetry.from_env(env)
    assert (t.topic, t.service, t.buffer_size) == (topics.topics.calls, "env-service", 500)
    for i in range(10):
        t.record(_event(f"sasl-{i}"))
    assert t.close(20)
    records = read_all(topics.bootstrap_servers, topics.topics.calls, 10)
    assert {orjson.loads(r.value)["service"] for r in records} == {"env-service"}

    with pytest.raises(ValueError, match="LLMPULSE_SDK__BUFFER_SIZE: expected an integer, got 'lots'"):
        Telemetry.from_env({"LLMPULSE_SDK__BUFFER_SIZE": "lots"})


# ---- without the broker ----------------------------------------------------------------------


def _sink_telemetry(**options: Any) -> tuple[Telemetry, list[OutMessage]]:
    sink: list[OutMessage] = []
    return Telemetry(transport=CallbackTransport(sink.extend), linger_ms=0, **options), sink


def test_invalid_events_are_dropped_counted_and_logged_without_their_values(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ingest.sdk")
    t, sink = _sink_telemetry()
    naive = datetime(2026, 1, 1, 12, 0)  # naive on purpose: the schema rejects it
    bad = [
        {"feature": "f"},
        _event("neg", input_tokens=-5),
        _event("naive", ts=naive),
        _event("cache", cached_input_tokens=500),  # more cached than input
        _event("huge", attributes={"blob": "y" * 1_100_000}),  # over the 1 MiB event limit
        _event("secret-value", status="exploded"),
    ]
    assert [t.record(b) for b in bad] == [False] * len(bad)
    assert not t.record_feedback(request_id="r-1")  # feedback without a verdict
    assert t.record(_event("fine"))
    assert t.flush(5)
    assert t.stats()["dropped_invalid"] == 7
    assert [orjson.loads(m.value)["event_id"] for m in sink] == ["fine"]
    deadline = time.monotonic() + 5
    while "invalid events" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    t.close(2)
    assert "dropped 7 invalid events" in caplog.text
    assert "exploded" not in caplog.text and "secret-value" not in caplog.text


def test_content_is_reduced_to_hash_and_length_unless_captured() -> None:
    for capture in (False, True):
        t, sink = _sink_telemetry(capture_content=capture)
        t.record(_event("c", prompt="héllo wörld", output="twelve chars"))
        t.record(CallEvent.model_validate({**_event("m"), "ts": datetime.now(UTC), "prompt": "p", "output": "oo"}))
        assert t.close(5)
        first, second = (orjson.loads(m.value) for m in sink)
        assert first["prompt_hash"] == prompt_hash("héllo wörld")
        assert first["output_chars"] == 12
        assert second["prompt_hash"] == prompt_hash("p")
        assert second["output_chars"] == 2
        assert ("prompt" in first, "output" in second) == (capture, capture)


def test_prompt_hash_is_the_pipelines() -> None:
    from processors.content import prompt_hash as pipeline_prompt_hash

    for text in ("", "hello", "héllo wörld 🌍", "lone surrogate \ud800", "x" * 100_000):
        assert prompt_hash(text) == pipeline_prompt_hash(text)


def test_failed_deliveries_are_retried_not_lost() -> None:
    attempts: list[int] = []
    delivered: list[OutMessage] = []

    def flaky(messages: list[OutMessage]) -> None:
        attempts.append(len(messages))
        if len(attempts) < 3:
            raise ConnectionError("destination away")
        delivered.extend(messages)

    t = Telemetry(transport=CallbackTransport(flaky), linger_ms=0)
    for i in range(20):
        t.record(_event(f"r-{i}"))
    assert t.flush(10)  # a flush cuts the retry back-off short
    stats = t.stats()
    assert stats["sent"] == 20 and stats["send_errors"] >= 2
    assert sorted(orjson.loads(m.value)["event_id"] for m in delivered) == sorted(f"r-{i}" for i in range(20))
    t.close(2)


def test_batches_are_zstd_compressed_unless_told_otherwise() -> None:
    """zstd: gzip's size for a fifteenth of its CPU (``KafkaTransport``). The broker tests read
    every SDK message back through this codec; here, the choice and its errors."""
    assert KafkaTransport("127.0.0.1:1")._options["compression_type"] == "zstd"
    assert KafkaTransport("127.0.0.1:1", compression_type=None)._options["compression_type"] is None
    chosen = {}
    for value in ("", "none", "LZ4"):
        t = Telemetry.from_env({"LLMPULSE_SDK__COMPRESSION": value, "LLMPULSE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"})
        chosen[value] = t._transport._options["compression_type"]  # type: ignore[attr-defined]
        t.close(1)
    assert chosen == {"": "zstd", "none": None, "LZ4": "lz4"}
    expected = "LLMPULSE_SDK__COMPRESSION: expected one of none, gzip, snappy, lz4, zstd, got 'brotli'"
    with pytest.raises(ValueError, match=expected):
        Telemetry.from_env({"LLMPULSE_SDK__COMPRESSION": "brotli"})


def test_importing_the_sdk_stays_light() -> None:
    code = """
import sys
import ingest
assert "ingest.sdk" not in sys.modules and "pydantic" not in sys.modules, "import ingest must import nothing"
from ingest import Telemetry, CallbackTransport, assign_variant
t = Telemetry(transport=CallbackTransport(lambda batch: None))
assert t.record(feature="f", model="m", input_tokens=1, output_tokens=1, latency_ms=1, status="ok")
assert t.flush(5)
k = Telemetry("127.0.0.1:1")  # building a Kafka client imports aiokafka, nothing heavier
heavy = {"msgspec", "pyarrow", "pydantic_settings", "yaml", "clickhouse_connect", "chdb", "faust",
         "openai", "processors", "sinks", "fastdigest", "click", "rich", "ingest.kafka", "schemas.config"}
loaded = sorted(m for m in heavy if m in sys.modules)
assert not loaded, loaded
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---- sticky canary assignment ----------------------------------------------------------------


def test_bucket_is_stable_across_processes_and_forever() -> None:
    golden = {
        ("user-42", ""): 0.3163802106423469,
        ("user-42", "release-7"): 0.9017500266071603,
        ("conversation-9f3a", ""): 0.6227144698540363,
    }
    for (subject, salt), value in golden.items():
        assert bucket(subject, salt) == value
    ids = [f"user-{i}" for i in range(200)]
    code = (
        "import sys, orjson\nfrom ingest.sdk import bucket\n"
        "print(orjson.dumps([bucket(s, 'exp') for s in orjson.loads(sys.argv[1])]).decode())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str-hash salt must not matter
    out = subprocess.run(
        [sys.executable, "-c", code, orjson.dumps(ids).decode()],
        check=False,
        cwd=ROOT,
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert orjson.loads(out.stdout) == [bucket(s, "exp") for s in ids]


def test_canary_share_is_what_was_asked_and_ramps_monotonically() -> None:
    ids = [f"subject-{i}" for i in range(100_000)]
    ten = [assign_variant(s, 0.10, salt="rel-12") for s in ids]
    assert abs(ten.count("canary") / len(ids) - 0.10) < 0.01
    twenty = [assign_variant(s, 0.20, salt="rel-12") for s in ids]
    assert abs(twenty.count("canary") / len(ids) - 0.20) < 0.01
    # ramping 10% → 20% only adds canaries: nobody flips back to control
    assert all(b == "canary" for a, b in zip(ten, twenty, strict=True) if a == "canary")
    # another salt picks other subjects
    other = [assign_variant(s, 0.10, salt="rel-13") for s in ids]
    overlap = sum(1 for a, b in zip(ten, other, strict=True) if a == b == "canary")
    assert overlap < 2000  # ~1% expected by chance, not ~10%
    assert {assign_variant("x", v) for v in (0.0, -1.0, float("nan"))} == {"control"}
    assert assign_variant("x", 1.0) == assign_variant("x", 7.0) == "canary"
