"""The publisher's keying, against the real broker: stage 2 predicts which partials partition holds
a scope (``partition_of``) and must agree with where the producer put it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from ingest.kafka import client_options, create_topics
from processors.records import DeadLetter, Source
from processors.windows import WindowPartial
from sinks.kafka import DEFAULT_SCOPES, KafkaPublisher, Outbox, partial_messages, partition_of, scope_key
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
            publisher = KafkaPublisher(kafka_settings, producer)
            await publisher.deliver(publisher.outbox(partials=[(partials, 0, 1_795_000_260.0)], scopes=DEFAULT_SCOPES))
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


class _Unacknowledged:
    """The real producer, except that the messages whose value ``fail`` names are not acknowledged
    the first time (their future fails and they never reach the broker), as a batch that expired
    in the producer while the others of the round landed."""

    def __init__(self, producer: AIOKafkaProducer, fail: set[bytes]) -> None:
        self.producer, self.fail = producer, set(fail)

    async def send(self, topic: str, value: bytes, **kw: Any) -> asyncio.Future[Any]:
        if value in self.fail:
            self.fail.discard(value)
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(KafkaTimeoutError(f"{value!r} expired (injected)"))
            return future
        return await self.producer.send(topic, value=value, **kw)


def _letters(n: int, size: int = 10) -> list[DeadLetter]:
    return [DeadLetter(b"%06d" % i + b"x" * size, "bad", "$", Source("kafka", "llm.calls", 0), i) for i in range(n)]


async def _deliver_rounds(kafka: Any, box_of: Any, fail: set[bytes], keep: Any = lambda exc: True) -> list[Any]:
    """Deliver until the box is empty. Returns each failed round's (error, messages left, given up),
    None for the round that succeeded, then the messages counted sent and those given up."""
    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **client_options(kafka))
    await producer.start()
    try:
        publisher = KafkaPublisher(kafka, producer)
        publisher.producer = _Unacknowledged(producer, fail)  # type: ignore[assignment]
        box: Outbox = box_of(publisher)
        rounds: list[Any] = []
        while True:
            try:
                await publisher.deliver(box, keep=keep)
            except Exception as exc:
                rounds.append((type(exc), len(box), box.given_up))
                continue
            return [*rounds, None, publisher.sent["dlq"], box.given_up]
    finally:
        await producer.stop()


def test_a_failed_round_sends_again_only_what_the_broker_did_not_take(kafka_settings: Any) -> None:
    """Outputs are retried after a failure, and a round fails halfway: the broker takes some of its
    messages and not others. Sending the round again would repeat what landed (a window partial
    read twice counts its calls twice in stage 2): the outbox keeps only what failed."""
    asyncio.run(create_topics(kafka_settings))
    letters = _letters(50)
    fail = {letters[i].raw for i in (3, 17, 18, 49)}
    rounds = asyncio.run(_deliver_rounds(kafka_settings, lambda p: p.outbox(dead=letters), fail))
    assert rounds == [(KafkaTimeoutError, 4, 0), None, 50, 0]  # four left after the first round, then none
    got = [m.value for m in asyncio.run(consume_all(kafka_settings, kafka_settings.topics.dlq, timeout=6))]
    assert sorted(got) == sorted(d.raw for d in letters)  # each once


@pytest.mark.parametrize("where", [0, 7, 19])
def test_a_message_retrying_cannot_mend_is_dropped_and_counted(kafka_settings: Any, where: int) -> None:
    """A message over the producer's size limit is refused when it is enqueued: it is given up (the
    caller's ``keep`` says retrying cannot mend it) and the rest of the round still goes out;
    nothing else is lost or sent twice, and with nothing left there is nothing to retry."""
    asyncio.run(create_topics(kafka_settings))
    letters = _letters(20)
    letters[where] = _letters(where + 1, size=2 << 20)[where]  # 2 MiB: over max_request_size (1 MiB)
    rounds = asyncio.run(
        _deliver_rounds(
            kafka_settings,
            lambda p: p.outbox(dead=letters),
            set(),
            keep=lambda exc: not isinstance(exc, MessageSizeTooLargeError),
        )
    )
    assert rounds == [None, 19, 1]
    got = [m.value for m in asyncio.run(consume_all(kafka_settings, kafka_settings.topics.dlq, timeout=6))]
    assert sorted(got) == [d.raw for i, d in enumerate(letters) if i != where]


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
