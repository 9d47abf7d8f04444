"""The publisher's keying, against the real broker: stage 2 predicts which partials partition holds
a scope (``partition_of``) and must agree with where the producer put it."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer

from ingest.kafka import client_options, create_topics
from processors.windows import WindowPartial
from sinks.kafka import DEFAULT_SCOPES, KafkaPublisher, partial_messages, partition_of, scope_key
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


def test_stage2_names_each_scope_by_the_key_stage1_publishes_it_under() -> None:
    """Ownership after a rebalance is decided on the key a scope's partials are published under:
    grouped and filtered dimensions together, for rules with a ``where``, without a scope, and
    for budgets."""
    from processors.alerts.budgets import BudgetTracker
    from processors.alerts.engine import AlertEngine
    from processors.alerts.stage2 import RuleWindows
    from schemas.rules import parse_rules

    rules = parse_rules(
        {
            "rules": [
                {"name": "by-team", "metric": "calls", "scope": ["team"], "max": 1},
                {"name": "team-on-m1", "metric": "calls", "scope": {"by": ["team"], "where": {"model": "m1"}},
                 "max": 1},
                {"name": "model-in-f3", "metric": "calls", "scope": {"by": ["model"], "where": {"feature": "f3"}},
                 "max": 1},
                {"name": "everything", "metric": "calls", "max": 1},
            ],
            "budgets": [{"name": "t1", "scope": {"team": "team-1", "model": "m1"}, "period": "day",
                         "limit_usd": 1.0}],
        },
        "test",
    )  # fmt: skip
    partials = [
        WindowPartial(1_795_000_200, 60, (f"f{i}", f"team-{i % 2}", f"m{i % 4}", "openai", "v1", "control"), calls=1)
        for i in range(8)
    ]
    published = {key.decode() for key, _ in partial_messages(partials, sorted(rules.scope_dims), 0, None)}
    windows = RuleWindows(AlertEngine(rules.rules))
    engine_rules = windows.engine.rules

    def owns(dims: tuple[str, ...], values: tuple[str, ...]) -> bool:
        return scope_key(dims, values) in published

    assert windows.owns_rule_scope(engine_rules["by-team"], {"team": "team-1"}, owns)
    assert windows.owns_rule_scope(engine_rules["team-on-m1"], {"team": "team-1"}, owns)  # f1 and f5 are m1
    assert not windows.owns_rule_scope(engine_rules["team-on-m1"], {"team": "team-0"}, owns)  # no m1 call
    assert windows.owns_rule_scope(engine_rules["model-in-f3"], {"model": "m3"}, owns)
    assert not windows.owns_rule_scope(engine_rules["model-in-f3"], {"model": "m0"}, owns)
    assert windows.owns_rule_scope(engine_rules["everything"], {}, owns)
    assert owns(*BudgetTracker.cell(rules.budgets[0]))  # f1 is team-1 on m1
