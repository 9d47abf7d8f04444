"""The publisher's keying, against the real broker: stage 2 predicts which partials partition holds
a scope (``partition_of``) and must agree with where the producer put it."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer

from ingest.kafka import client_options, create_topics
from processors.windows import WindowPartial
from sinks.kafka import DEFAULT_SCOPES, KafkaPublisher, partition_of
from tests.llmpulse.workers import consume_all


def test_partition_of_agrees_with_the_producer_on_every_scope(kafka_settings: Any) -> None:
    asyncio.run(create_topics(kafka_settings))
    partials = [
        WindowPartial(
            1_795_000_200, 60, (f"f{i}", f"team-{i % 7}", f"m{i % 5}", "openai", f"v{i % 3}", "control"), calls=1
        )
        for i in range(200)
    ]

    async def publish() -> int:
        producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **client_options(kafka_settings))
        await producer.start()
        try:
            await KafkaPublisher(kafka_settings, producer).partials(partials, DEFAULT_SCOPES, 0, 1_795_000_260.0)
            return len(await producer.partitions_for(kafka_settings.topics.partials))
        finally:
            await producer.stop()

    count = asyncio.run(publish())
    messages = asyncio.run(consume_all(kafka_settings, kafka_settings.topics.partials, timeout=6))
    assert count == kafka_settings.partitions == 4
    keys = {m.key for m in messages}
    assert len(messages) == len(keys) == 200 + 200 + 7 + 5 + 1  # full grain, feature, team, model, provider
    assert all(m.partition == partition_of(m.key.decode(), count) for m in messages)
    assert {m.partition for m in messages} == {0, 1, 2, 3}
