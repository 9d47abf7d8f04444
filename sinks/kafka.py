"""KafkaPublisher: what the worker sends on besides ClickHouse rows.

* dead letters to ``llm.calls.dlq``: the value is the payload byte for byte (so a fixed
  consumer can read it as it was), reason and position ride in headers;
* sampled calls to ``llm.judge.requests``, with the release tuple the judge's verdict must be
  tied to;
* stage-1 window partials to ``llm.window.partials``, projected onto each alert scope and
  keyed by scope value, so one stage-2 consumer sees every partition's share of a scope.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
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


class KafkaPublisher:
    def __init__(self, settings: KafkaSettings, producer: AIOKafkaProducer) -> None:
        self.topics = settings.topics
        self.producer = producer
        self.sent = {"dlq": 0, "judge_requests": 0, "partials": 0, "watermarks": 0, "alerts": 0}

    async def _send_all(self, topic: str, messages: Iterable[tuple[bytes | None, bytes, list[Any] | None]]) -> int:
        futures = [
            await self.producer.send(topic, value=value, key=key, headers=headers) for key, value, headers in messages
        ]
        if futures:
            await asyncio.gather(*futures)
        return len(futures)

    async def dead_letters(self, letters: Iterable[DeadLetter]) -> None:
        self.sent["dlq"] += await self._send_all(
            self.topics.dlq, ((None, d.raw, dead_letter_headers(d)) for d in letters)
        )

    async def judge_requests(self, batches: Iterable[ProcessedCalls]) -> None:
        await self.send_judge_requests(judge_request(b, s.index, s.reason) for b in batches for s in b.samples)

    async def send_judge_requests(self, requests: Iterable[dict[str, Any]]) -> None:
        """Keyed by conversation: a judge consumer sees a conversation's turns in order."""
        messages = (((r.get("conversation_id") or r["event_id"]).encode(), orjson.dumps(r), None) for r in requests)
        self.sent["judge_requests"] += await self._send_all(self.topics.judge_requests, messages)

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

    async def alerts(self, events: Iterable[Any]) -> None:
        """Alert state changes, keyed by dedup key on the compacted alerts topic."""
        from dataclasses import asdict

        futures = []
        for e in events:
            body = orjson.dumps(asdict(e), default=str)
            futures.append(await self.producer.send(self.topics.alerts, body, key=e.dedup_key.encode()))
        if futures:
            await asyncio.gather(*futures)
        self.sent["alerts"] += len(futures)

    async def partials(
        self,
        partials: list[WindowPartial],
        scopes: Sequence[tuple[str, ...]],
        source_partition: int,
        watermark: float | None,
        sketches: tuple[bool, bool, bool] = (True, True, True),
    ) -> None:
        """``watermark`` None: the partials add to their minutes without moving any watermark
        (judge scores and feedback arrive long after their calls' minutes)."""
        await self.partial_groups([(partials, source_partition, watermark)], scopes, sketches)

    async def partial_groups(
        self,
        groups: Iterable[tuple[list[WindowPartial], int, float | None]],
        scopes: Sequence[tuple[str, ...]],
        sketches: tuple[bool, bool, bool] = (True, True, True),
    ) -> None:
        """Several batches' (partials, source partition, watermark) in one round of sends, awaited
        once: each wait lasts at least the producer's linger. Every batch keeps its own watermark
        and the sends go in batch order, so each partials partition sees them in the order it did
        one batch at a time (across partitions stage 2 could never rely on order)."""
        messages = [
            m
            for partials, partition, watermark in groups
            if partials
            for m in partial_messages(partials, scopes, partition, watermark, sketches)
        ]
        if messages:
            self.sent["partials"] += await self._send_all(self.topics.partials, ((k, v, None) for k, v in messages))
