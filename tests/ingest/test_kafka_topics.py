"""`llmpulse topics create` semantics on the real broker: creates what is missing, leaves the rest."""

from __future__ import annotations

import asyncio
from typing import Any

from ingest.kafka import create_topics, topic_specs


def test_topics_are_created_once_with_their_configs(kafka_settings: Any) -> None:
    first = asyncio.run(create_topics(kafka_settings))
    assert set(first.values()) == {"created"}
    assert set(first) == {s.name for s in topic_specs(kafka_settings)}
    again = asyncio.run(create_topics(kafka_settings))
    assert set(again.values()) == {"exists"}
    specs = {s.name: s for s in topic_specs(kafka_settings)}
    assert specs[kafka_settings.topics.alerts].configs["cleanup.policy"] == "compact"
    assert specs[kafka_settings.topics.calls].partitions == kafka_settings.partitions
