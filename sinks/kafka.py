"""KafkaPublisher: what the worker sends on besides ClickHouse rows.

* dead letters to ``llm.calls.dlq``: the value is the payload byte for byte (so a fixed
  consumer can read it as it was), reason and position ride in headers;
* sampled calls to ``llm.judge.requests``, with the release tuple the judge's verdict must be
  tied to;
* stage-1 window partials to ``llm.window.partials``, projected onto each alert scope and
  keyed by scope value, so one stage-2 consumer sees every partition's share of a scope.

Everything goes through an :class:`Outbox`: a failed round of sends leaves in it only what the
broker did not acknowledge, so a caller that tries again never sends a message twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError
from aiokafka.partitioner import murmur2

from processors.chain import ProcessedCalls
from processors.records import DeadLetter
from processors.windows import SCOPE_DIMS, WindowPartial, project
from schemas.config import KafkaSettings

DEFAULT_SCOPES: tuple[tuple[str, ...], ...] = (
    SCOPE_DIMS,
    ("feature",),
    ("team",),
    ("model",),
    ("provider",),
)
"""Scopes partials are published at until alert rules name their own."""


def scope_key(dims: Sequence[str], values: Sequence[str]) -> str:
    """``feature=support-chat,model=gpt-4o``: stable, readable, and the Kafka message key."""
    return ",".join(f"{d}={v}" for d, v in zip(dims, values, strict=True))


def partition_of(key: str, partitions: int) -> int:
    """The partition the producer sends a message keyed ``key`` to: aiokafka's default
    partitioner (murmur2, as the Java client), which ``KafkaPublisher`` leaves in place. Stage 2
    asks it which scopes an assignment of partials partitions gives it."""
    return int(murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def judge_request(batch: ProcessedCalls, index: int, reason: str) -> dict[str, Any]:
    """Everything a judge needs, and the lineage its score must be filed under."""
    e = batch.events[index]
    return {
        "event_id": e.event_id,
        "request_id": e.request_id,
        "conversation_id": e.conversation_id,
        "ts": e.ts.isoformat(),
        "reason": reason,
        "feature": e.feature,
        "team": e.team,
        "tenant": e.tenant,
        "service": e.service,
        "release_id": batch.release_ids[index],
        "release": {
            "prompt_version": e.prompt_version,
            "model": e.model,
            "response_model": e.response_model,
            "adapter": e.adapter,
            "feature_view": e.feature_view,
            "guardrail_version": e.guardrail_version,
            **e.release,
        },
        "variant": e.variant,
        "provider": e.provider,
        "status": e.status,
        "refusal": e.refusal,
        "finish_reason": e.finish_reason,
        "prompt_hash": e.prompt_hash,
        "prompt": e.prompt,
        "output": e.output,
        "output_chars": e.output_chars,
    }


def dead_letter_headers(d: DeadLetter) -> list[tuple[str, bytes]]:
    return [
        ("llmpulse.reason", d.reason.encode()),
        ("llmpulse.path", d.path.encode()),
        ("llmpulse.kind", d.kind.encode()),
        ("llmpulse.source", d.source.kind.encode()),
        ("llmpulse.source_topic", d.source.name.encode()),
        ("llmpulse.source_partition", str(d.source.partition).encode()),
        ("llmpulse.source_offset", str(d.offset).encode()),
    ]


def partial_messages(
    partials: Iterable[WindowPartial],
    scopes: Sequence[tuple[str, ...]],
    source_partition: int,
    watermark: float | None,
    sketches: tuple[bool, bool, bool] = (True, True, True),
) -> list[tuple[bytes, bytes]]:
    """(key, value) messages: each partial projected onto each scope, merged within this partition;
    with the latency / TTFT / output sketches that ``sketches`` asks for (what the rules read)."""
    partials = list(partials)
    out: list[tuple[bytes, bytes]] = []
    for dims in scopes:
        for (_, *values), merged in project(partials, dims).items():
            key = scope_key(dims, values)
            value = merged.to_wire(
                sketches,
                type="partial",
                scope_dims=list(dims),
                scope=key,
                partition=source_partition,
                watermark=watermark,
            )
            out.append((key.encode(), value))
    return out


Message = tuple[bytes | None, bytes, list[tuple[str, bytes]] | None]
"""(key, value, headers); a None key leaves the partition to the producer."""


@dataclass
class Outbox:
    """Messages not yet acknowledged by the broker, in the order they are to be sent, each with its
    topic and what it counts as in ``KafkaPublisher.sent``.

    Outputs are retried after a failure (the worker's durable blocks, the quality agent's batches),
    and a round of sends can fail halfway: the broker acknowledges some messages and not others.
    Sending everything again would repeat the acknowledged ones, and a window partial read twice
    counts its calls twice in stage 2; so ``KafkaPublisher.deliver`` keeps here only the failed.
    """

    pending: list[tuple[str, str, Message]] = field(default_factory=list)
    given_up: int = 0
    """Messages dropped after a failure that trying again cannot mend (``deliver``'s ``keep``)."""
    last_given_up: BaseException | None = None

    def add(self, kind: str, topic: str, messages: Iterable[Message]) -> None:
        self.pending.extend((kind, topic, m) for m in messages)

    def __len__(self) -> int:
        return len(self.pending)


def _failed(exc: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


class KafkaPublisher:
    def __init__(self, settings: KafkaSettings, producer: AIOKafkaProducer) -> None:
        self.topics = settings.topics
        self.producer = producer
        self.sent = {"dlq": 0, "judge_requests": 0, "partials": 0, "watermarks": 0, "alerts": 0}

    async def deliver(self, box: Outbox, keep: Callable[[BaseException], bool] = lambda exc: True) -> None:
        """Send what ``box`` holds, all enqueued before any is awaited (each wait lasts at least the
        producer's linger), and leave in it only what the broker did not take.

        A failure ``keep`` rejects (one retrying cannot mend: a message over the size limit) drops
        that message, counted in ``box.given_up``, and the round goes on. Raises the first kept
        failure when anything is left, which is exactly when the caller should try again. A
        message the producer will not enqueue for a kept reason ends the round: it and those after
        it stay, in order. Cancelled halfway, it still takes out of the box what was acknowledged.
        """
        pending = box.pending
        if not pending:
            return
        futures: list[asyncio.Future[Any]] = []
        refused: BaseException | None = None
        try:
            for _kind, topic, (key, value, headers) in pending:
                try:
                    futures.append(await self.producer.send(topic, value=value, key=key, headers=headers))
                except Exception as exc:
                    if keep(exc):
                        refused = exc  # the rest wait for the next round, in order
                        break
                    futures.append(_failed(exc))
            if futures:
                await asyncio.wait(futures)
        finally:
            left: list[tuple[str, str, Message]] = []
            for item, future in zip(pending, futures, strict=False):
                finished = future.done() and not future.cancelled()
                error = future.exception() if finished else None
                if finished and error is None:
                    self.sent[item[0]] += 1
                elif error is not None and not keep(error):
                    box.given_up += 1
                    box.last_given_up = error
                else:  # failed for a passing reason, or still in flight when cancelled
                    left.append(item)
                    refused = refused or error
            box.pending = left + pending[len(futures) :]
        if box.pending:
            raise refused or KafkaTimeoutError("messages left unacknowledged")

    def outbox(
        self,
        *,
        dead: Iterable[DeadLetter] = (),
        judge: Iterable[dict[str, Any]] = (),
        partials: Iterable[tuple[list[WindowPartial], int, float | None]] = (),
        scopes: Sequence[tuple[str, ...]] = DEFAULT_SCOPES,
        sketches: tuple[bool, bool, bool] = (True, True, True),
        alerts: Iterable[Any] = (),
        into: Outbox | None = None,
    ) -> Outbox:
        """The messages for these outputs, dead letters first, added to ``into`` (a new box by default).

        * ``judge``: requests keyed by conversation, so a judge consumer sees a conversation's
          turns in order;
        * ``partials``: several batches' (partials, source partition, watermark); every batch
          keeps its own watermark and the messages go in batch order, so each partials partition
          sees them in the order it did one batch at a time (across partitions stage 2 could never
          rely on order). A watermark of None adds the partials to their minutes without moving
          any watermark (judge scores and feedback arrive long after their calls' minutes);
        * ``alerts``: state changes keyed by dedup key, on the compacted alerts topic.
        """
        box = Outbox() if into is None else into
        box.add("dlq", self.topics.dlq, ((None, d.raw, dead_letter_headers(d)) for d in dead))
        box.add(
            "judge_requests",
            self.topics.judge_requests,
            (((r.get("conversation_id") or r["event_id"]).encode(), orjson.dumps(r), None) for r in judge),
        )
        box.add(
            "partials",
            self.topics.partials,
            (
                (key, value, None)
                for group, partition, watermark in partials
                if group
                for key, value in partial_messages(group, scopes, partition, watermark, sketches)
            ),
        )
        box.add(
            "alerts",
            self.topics.alerts,
            ((e.dedup_key.encode(), orjson.dumps(dataclasses.asdict(e), default=str), None) for e in alerts),
        )
        return box

    def block_outbox(
        self, batches: Sequence[ProcessedCalls], scopes: Sequence[tuple[str, ...]], sketches: tuple[bool, bool, bool]
    ) -> Outbox:
        """What a durable block of calls produced: dead letters, judge requests, window partials."""
        return self.outbox(
            dead=(d for b in batches for d in b.dead),
            judge=(judge_request(b, s.index, s.reason) for b in batches for s in b.samples),
            partials=[(b.partials, b.source.partition, b.watermark) for b in batches],
            scopes=scopes,
            sketches=sketches,
        )

    async def watermarks(self, marks: dict[int, float]) -> None:
        """A heartbeat per source partition to every partials partition: stage 2 must hear from all."""
        partitions = await self.producer.partitions_for(self.topics.partials)
        futures = []
        for source, watermark in marks.items():
            body = orjson.dumps({"type": "watermark", "partition": source, "watermark": watermark})
            for target in partitions:
                futures.append(await self.producer.send(self.topics.partials, body, partition=target))
        if futures:
            await asyncio.gather(*futures)
        self.sent["watermarks"] += len(futures)
