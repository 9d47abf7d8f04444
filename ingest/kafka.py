"""Kafka plumbing shared by the worker, the CLI and the tests: client options and topics.

Topic configs are chosen for what each topic carries: the hot ``llm.calls`` is partitioned by
feature for scale-out and kept a week so a worker outage can be replayed; the DLQ is kept a
month for re-drive; alerts are compacted by dedup key so the latest state of every incident
survives; window partials are short-lived.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaTimeoutError, TopicAlreadyExistsError

from schemas.config import KafkaSettings

DAY_MS = 86_400_000

log = logging.getLogger(__name__)


def client_options(k: KafkaSettings) -> dict[str, Any]:
    """aiokafka keyword arguments for the configured security (the same for every client)."""
    opts: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers,
        "security_protocol": k.security_protocol,
        "client_id": k.client_id,
    }
    if k.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        opts["sasl_mechanism"] = k.sasl_mechanism or "PLAIN"
        opts["sasl_plain_username"] = k.sasl_username
        opts["sasl_plain_password"] = k.secret_sasl_password()
    if k.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=str(k.ssl_cafile) if k.ssl_cafile else None)
        if k.ssl_certfile:
            context.load_cert_chain(str(k.ssl_certfile), str(k.ssl_keyfile) if k.ssl_keyfile else None)
        context.check_hostname = k.ssl_check_hostname
        opts["ssl_context"] = context
    return opts


def producer_options(k: KafkaSettings) -> dict[str, Any]:
    """``client_options`` plus the configured compression: every pipeline producer's keywords."""
    return {**client_options(k), "compression_type": None if k.compression == "none" else k.compression}


GIVE_UP_S = 1.0
"""How long each step of giving up on a producer may take (closing its connections, ending its stop)."""


async def stop_producer(producer: Any, within: float) -> bool:
    """Stop an aiokafka producer, waiting at most ``within`` seconds for what is not acknowledged.

    aiokafka's ``stop`` first waits until every queued batch is acknowledged, and an idempotent
    producer never expires a batch: with the broker unreachable, ``stop`` does not return
    (measured: still waiting after 120 s). A worker's SIGTERM, the ingest server's producer
    restart and the judge's exit would hang until something kills them. Past ``within``, the
    batches still queued fail with ``KafkaTimeoutError``, so every sender waiting on one sees a
    failed send (the worker has not committed for them; the SDK and the server count them), and
    the producer closes without them. Returns True when everything queued was acknowledged;
    takes at most ``within + 2 * GIVE_UP_S``.
    """
    stopping = asyncio.ensure_future(producer.stop())
    try:
        done, _ = await asyncio.wait({stopping}, timeout=within)
        acknowledged = bool(done)
        if not acknowledged:
            log.warning("Kafka producer: not everything acknowledged after %g s; stopping without the rest", within)
            await _abandon_queue(producer, KafkaTimeoutError(f"not acknowledged within {within:g} s of stopping"))
            done, _ = await asyncio.wait({stopping}, timeout=GIVE_UP_S)
    except asyncio.CancelledError:
        stopping.cancel()
        raise
    if not done or stopping.cancelled():
        stopping.cancel()  # the connections themselves hang: the process's exit closes them
        return False
    failure = stopping.exception()
    if failure is not None:
        # after giving up, expected (the sender trips over the batches failed under it)
        (log.warning if acknowledged else log.debug)("Kafka producer stop: %r", failure)
    return acknowledged and failure is None


async def _abandon_queue(producer: Any, reason: Exception) -> None:
    """Fail what ``producer`` still holds, which ends its ``stop``'s flush. aiokafka internals
    (0.13, 0.14), checked by a test that needs no broker; if they move, only the connections are
    closed and the caller's bound still holds."""
    # Close the connections first, so a request in flight fails as any lost connection does and
    # its batch goes back to the queue. Bounded: a close waits for the write buffer to drain,
    # which against a host that does not answer takes TCP's retransmission timeouts.
    closing = asyncio.ensure_future(producer.client.close())
    try:
        await asyncio.wait({closing}, timeout=GIVE_UP_S)
    except asyncio.CancelledError:
        closing.cancel()
        raise
    if not closing.done():
        closing.cancel()
    elif not closing.cancelled() and closing.exception() is not None:
        log.debug("Kafka producer close: %r", closing.exception())
    try:
        sender, queue = producer._sender, producer._message_accumulator
        if sender is not None and sender.sender_task is not None:
            # its failure would fail the queue, which is done here; aiokafka's own callback then
            # trips over the idempotent producer's transaction manager and logs a traceback
            sender.sender_task.remove_done_callback(sender._fail_all)
        queue.fail_all(reason)
    except AttributeError as exc:
        log.warning("Kafka producer: cannot fail what it holds (aiokafka changed: %s)", exc)


async def stop_consumer(consumer: Any, within: float) -> bool:
    """Stop an aiokafka consumer, waiting at most ``within`` seconds; True when it stopped.

    Leaving the group needs the group coordinator, and aiokafka looks for an unreachable one
    without end. Past the bound the stop is abandoned: the broker expires the membership after
    the session timeout, and the offsets stay where the last successful commit left them.
    """
    try:
        await asyncio.wait_for(consumer.stop(), within)
    except TimeoutError:
        log.warning("Kafka consumer did not stop within %g s (is the broker reachable?); left as it is", within)
        return False
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # this stop is being cancelled itself
        # aiokafka's fetcher re-raises the cancellation of its own fetch task when a fetch to an
        # unreachable broker is in flight (measured): its stop ended, not ours
        log.warning("Kafka consumer stopped with a fetch to an unreachable broker cut short")
        return False
    except Exception as exc:
        log.warning("Kafka consumer stop: %r", exc)
        return False
    return True


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)
    purpose: str = ""


def topic_specs(k: KafkaSettings) -> list[TopicSpec]:
    t = k.topics
    small = max(1, min(6, k.partitions))
    return [
        TopicSpec(
            t.calls, k.partitions,
            {"retention.ms": str(7 * DAY_MS), "compression.type": "producer", "max.message.bytes": "4194304"},
            "one event per LLM call, keyed by feature",
        ),
        TopicSpec(t.feedback, small, {"retention.ms": str(7 * DAY_MS)}, "user feedback, keyed by request_id"),
        TopicSpec(t.dlq, small, {"retention.ms": str(30 * DAY_MS)}, "rejected payloads: raw bytes + reason headers"),
        TopicSpec(t.judge_requests, small, {"retention.ms": str(7 * DAY_MS)}, "sampled calls for the LLM judge"),
        TopicSpec(t.judge_results, small, {"retention.ms": str(30 * DAY_MS)}, "judge scores, keyed by request_id"),
        TopicSpec(
            t.alerts, 1,
            {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000", "segment.ms": str(DAY_MS)},
            "alert state changes, compacted by dedup key",
        ),
        TopicSpec(t.partials, small, {"retention.ms": str(DAY_MS)}, "stage-1 window partials, keyed by scope"),
    ]  # fmt: skip


async def create_topics(k: KafkaSettings) -> dict[str, str]:
    """Create every llmpulse topic that does not exist yet; returns name → created|exists."""
    admin = AIOKafkaAdminClient(**client_options(k))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        outcome: dict[str, str] = {}
        missing = []
        for spec in topic_specs(k):
            if spec.name in existing:
                outcome[spec.name] = "exists"
            else:
                missing.append(NewTopic(spec.name, spec.partitions, k.replication_factor, topic_configs=spec.configs))
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent creator won: it is there
                await admin.create_topics(missing)
            for topic in missing:
                outcome[topic.name] = "created"
        return outcome
    finally:
        await admin.close()


async def topic_partitions(k: KafkaSettings, names: list[str]) -> dict[str, int]:
    """How many partitions each of these topics has on the broker (those it has)."""
    admin = AIOKafkaAdminClient(**client_options(k))
    await admin.start()
    try:
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    return {d["topic"]: len(d["partitions"]) for d in described if not d.get("error_code") and d.get("partitions")}


async def _topic_ends(consumer: Any, topic: str) -> dict[Any, int]:
    """End offset of each partition of ``topic``, through a started consumer (metadata refreshed
    once if the topic is not known yet)."""
    from aiokafka import TopicPartition

    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    return dict(await consumer.end_offsets(tps)) if tps else {}


async def end_offsets(k: KafkaSettings, topic: str) -> dict[int, int]:
    """Messages written to each partition of ``topic`` so far (its end offsets)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(**client_options(k))
    await consumer.start()
    try:
        return {tp.partition: offset for tp, offset in (await _topic_ends(consumer, topic)).items()}
    finally:
        await consumer.stop()


async def consumer_lag(k: KafkaSettings, group: str, topic: str) -> dict[int, int]:
    """Messages not yet committed by ``group``, per partition (what `pipeline lag` alerts watch)."""
    from aiokafka import AIOKafkaConsumer

    admin = AIOKafkaAdminClient(**client_options(k))
    consumer = AIOKafkaConsumer(**client_options(k))
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        lag: dict[int, int] = {}
        for tp, end in (await _topic_ends(consumer, topic)).items():
            done = committed.get(tp)
            lag[tp.partition] = end - (done.offset if done is not None and done.offset >= 0 else 0)
        return lag
    finally:
        await consumer.stop()
        await admin.close()
