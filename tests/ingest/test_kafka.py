"""Kafka plumbing on the real broker: `llmpulse topics create` creates what is missing and leaves
the rest; a producer's stop is bounded whether or not the broker answers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from ingest.kafka import create_topics, stop_consumer, stop_producer, topic_specs
from tests.conftest import PrivateBroker


@pytest.mark.kafka
def test_topics_are_created_once_with_their_configs(kafka_settings: Any) -> None:
    first = asyncio.run(create_topics(kafka_settings))
    assert set(first.values()) == {"created"}
    assert set(first) == {s.name for s in topic_specs(kafka_settings)}
    again = asyncio.run(create_topics(kafka_settings))
    assert set(again.values()) == {"exists"}
    specs = {s.name: s for s in topic_specs(kafka_settings)}
    assert specs[kafka_settings.topics.alerts].configs["cleanup.policy"] == "compact"
    assert specs[kafka_settings.topics.calls].partitions == kafka_settings.partitions


@pytest.mark.kafka
def test_stop_producer_waits_for_every_acknowledgement(kafka_settings: Any) -> None:
    async def scenario() -> tuple[bool, list[asyncio.Future[Any]]]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers, acks="all",
                                    enable_idempotence=True, linger_ms=50)  # fmt: skip
        await producer.start()
        sent = [await producer.send(kafka_settings.topics.calls, b"%d" % i) for i in range(2000)]
        return await stop_producer(producer, 30.0), sent

    acknowledged, sent = asyncio.run(scenario())
    assert acknowledged
    assert all(f.done() and f.exception() is None for f in sent)


@pytest.mark.kafka
def test_stops_give_up_on_a_broker_that_went_away(private_broker: PrivateBroker) -> None:
    """aiokafka's own ``stop`` waited here for ever (the producer's: still waiting after 120 s)."""

    async def scenario() -> dict[str, Any]:
        producer = AIOKafkaProducer(bootstrap_servers=private_broker.bootstrap, acks="all",
                                    enable_idempotence=True, linger_ms=5)  # fmt: skip
        await producer.start()
        await (await producer.send("stop.test", b"acknowledged"))
        consumer = AIOKafkaConsumer("stop.test", bootstrap_servers=private_broker.bootstrap, group_id="stop.test",
                                    auto_offset_reset="earliest", enable_auto_commit=False)  # fmt: skip
        await consumer.start()
        while not await consumer.getmany(timeout_ms=1000):
            pass  # a member of the group, holding the partition
        await asyncio.to_thread(private_broker.run, "stop")
        pending = await producer.send("stop.test", b"never acknowledged")
        began = time.monotonic()
        acknowledged = await stop_producer(producer, 2.0)
        producer_s = time.monotonic() - began
        began = time.monotonic()
        await stop_consumer(consumer, 2.0)  # True or not: aiokafka may give up on leaving first
        consumer_s = time.monotonic() - began
        await asyncio.sleep(0.2)
        running = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return {"acknowledged": acknowledged, "producer_s": producer_s, "pending": pending,
                "consumer_s": consumer_s, "running": running}  # fmt: skip

    got = asyncio.run(scenario())
    assert not got["acknowledged"]
    assert 2.0 <= got["producer_s"] < 5.0, got  # the bound, closing the connections, then at most 1 s
    assert isinstance(got["pending"].exception(), KafkaTimeoutError)  # its sender sees a failed send
    assert got["consumer_s"] < 3.0, got
    producer_tasks = [t for t in got["running"] if "producer" in repr(t.get_coro()).lower()]
    assert producer_tasks == []  # nothing of the producer keeps retrying in the background


def test_the_aiokafka_internals_a_give_up_needs_are_there() -> None:
    """``ingest.kafka._abandon_queue`` reaches into aiokafka; an upgrade that moves these fails here,
    not in a stop against a dead broker."""

    async def scenario() -> None:
        producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", enable_idempotence=True)
        try:
            assert callable(producer.client.close)
            assert callable(producer._sender._fail_all)
            assert hasattr(producer._sender, "sender_task")
            assert callable(producer._message_accumulator.fail_all)
        finally:
            await producer.stop()

    asyncio.run(scenario())
