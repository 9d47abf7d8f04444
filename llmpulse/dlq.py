"""``llmpulse dlq replay``: re-drive dead letters after the cause was fixed.

A dead letter keeps its raw bytes, so once the producer, the price table or the limits are
fixed it can go through the same pipeline again. Accepted payloads are written with an
insert token derived from their DLQ ids (replaying twice writes once) and every outcome is
recorded in ``dlq_replays``, so an accepted letter is never re-driven again and a still-bad
one shows its new reason. ``--to-kafka`` republishes the raw bytes to the calls topic instead,
for deployments where the worker should do the writing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import xxhash

from llmpulse.runtime import EmbeddedRuntime
from processors.chain import own_offsets
from processors.records import PayloadBatch, Source
from sinks.clickhouse import Connection

REPLAY_SOURCE = Source("dlq-replay", "dlq")
REPUBLISH_ACK_S = 60.0
"""How long ``dlq replay --to-kafka`` waits for the broker to acknowledge what it sent."""
REPUBLISH_STOP_S = 1.0
"""Then how long its producer's stop waits (everything was acknowledged, or the replay failed)."""


@dataclass
class ReplayOutcome:
    considered: int = 0
    accepted: int = 0
    rejected: int = 0
    republished: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    accepted_ids: set[str] = field(default_factory=set)
    """The ``dlq_id`` of each letter accepted (or, in a dry run, that would be)."""


_REPLAYED = "SELECT dlq_id FROM dlq_replays FINAL WHERE outcome IN ('accepted', 'republished')"
"""Letters a replay accepted or republished: done with, never re-driven again."""


def letters_by_reason(conn: Connection, since_s: float) -> list[dict[str, Any]]:
    """Dead letters grouped by path and reason, with how many a replay has already taken care of:
    after a fix and a replay the same reasons are still listed (the letters are kept), and without
    ``pending`` they read as a problem still open.

    Reasons quote the values at fault ("timestamp … is 3.0 h in the future", "cached_input_tokens
    (1565) …"), so a group is the reason with its numbers left out and ``reason`` is one example.
    """
    result = conn.client.query(
        "SELECT any(d.reason) AS reason, d.path AS path, count() AS letters, "
        f"countIf(d.dlq_id NOT IN ({_REPLAYED})) AS pending, any(d.source) AS source, "
        "any(d.source_name) AS example_source, any(d.source_offset) AS example_offset, "
        "max(d.received_at) AS last_seen FROM dlq AS d FINAL "
        "WHERE d.received_at >= now64(3) - toIntervalSecond({s:UInt64}) "
        "GROUP BY path, replaceRegexpAll(d.reason, '[0-9]+', '#') "
        "ORDER BY pending DESC, letters DESC, reason",
        parameters={"s": int(since_s)},
    )
    return [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]


def pending_letters(conn: Connection, since_s: float, reason_like: str | None, limit: int) -> list[dict[str, Any]]:
    sql = (
        "SELECT dlq_id, kind, source, source_name, source_partition, source_offset, reason, raw "
        "FROM dlq FINAL WHERE received_at >= now64(3) - toIntervalSecond({since:UInt64}) "
        f"AND dlq_id NOT IN ({_REPLAYED}) "
        + ("AND reason ILIKE {reason:String} " if reason_like else "")
        + "ORDER BY received_at, source_partition, source_offset LIMIT {limit:UInt64}"
    )
    params: dict[str, Any] = {"since": int(since_s), "limit": limit}
    if reason_like:
        params["reason"] = f"%{reason_like}%"
    result = conn.client.query(sql, parameters=params, column_formats={"raw": "bytes"})
    cols = result.column_names
    return [dict(zip(cols, row, strict=True)) for row in result.result_rows]


def replay_into_clickhouse(runtime: EmbeddedRuntime, letters: list[dict[str, Any]], dry_run: bool) -> ReplayOutcome:
    outcome = ReplayOutcome(considered=len(letters))
    if not letters:
        return outcome
    ids = [str(r["dlq_id"]) for r in letters]
    digest = xxhash.xxh3_128_hexdigest("\n".join(ids).encode())
    batch = PayloadBatch(REPLAY_SOURCE, [bytes(r["raw"]) for r in letters], list(range(len(letters))), digest=digest)
    now = time.time()
    kinds: dict[str, PayloadBatch] = {}  # routed as the runtime routes a mixed batch (DecodeEvents' others)
    processed = runtime.calls.process(batch, now, kinds)
    feedback = kinds.get("feedback")
    results: list[tuple[str, str, str]] = []
    if processed.counters.received:
        rejected = {d.offset: d.reason for d in processed.dead}
        processed.dead = []  # still-bad letters stay in the DLQ once; their new reason goes to dlq_replays
        if not dry_run:
            runtime.writer.add_calls(processed)
        for offset in own_offsets(batch, kinds):
            results.append((ids[offset], "rejected" if offset in rejected else "accepted", rejected.get(offset, "")))
    if feedback is not None:
        processed_fb = runtime.feedback.process(feedback, now)
        rejected = {d.offset: d.reason for d in processed_fb.dead}
        processed_fb.dead = []
        if not dry_run:
            runtime.writer.add_feedback(processed_fb)
        for offset in feedback.offsets:
            results.append((ids[offset], "rejected" if offset in rejected else "accepted", rejected.get(offset, "")))
    if not dry_run:
        runtime.flush()
        record(runtime.sink.conn, results)
    for dlq_id, what, reason in results:
        if what == "accepted":
            outcome.accepted += 1
            outcome.accepted_ids.add(dlq_id)
        else:
            outcome.rejected += 1
            outcome.reasons[reason] = outcome.reasons.get(reason, 0) + 1
    return outcome


def record(conn: Connection, results: list[tuple[str, str, str]]) -> None:
    if results:
        conn.client.insert(
            f"{conn.database}.dlq_replays", [list(r) for r in results], column_names=["dlq_id", "outcome", "reason"]
        )


async def republish(settings: Any, letters: list[dict[str, Any]]) -> int:
    """Send raw payloads back to the calls topic, keyed by feature when the payload names one.

    Bounded by ``REPUBLISH_ACK_S``: an idempotent producer never gives up on a batch, so with the
    broker gone mid-way the command would otherwise wait forever. A timeout marks nothing
    republished; what did reach the topic is dropped as a duplicate (``event_id``) when the
    replay is run again."""
    import orjson
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaTimeoutError

    from ingest.kafka import producer_options, stop_producer

    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **producer_options(settings))
    await producer.start()
    try:
        for r in letters:
            raw = bytes(r["raw"])
            key = None
            try:
                obj = orjson.loads(raw)
                if isinstance(obj, dict) and isinstance(obj.get("feature"), str):
                    key = obj["feature"].encode()
            except orjson.JSONDecodeError:
                pass
            topic = settings.topics.feedback if r["kind"] == "feedback" else settings.topics.calls
            await producer.send(topic, raw, key=key)
        try:
            await asyncio.wait_for(producer.flush(), REPUBLISH_ACK_S)
        except TimeoutError:
            raise KafkaTimeoutError(
                f"Kafka did not acknowledge the re-driven payloads within {REPUBLISH_ACK_S:g} s, so none is "
                "marked republished; run the replay again once the broker is back (copies that did get "
                "through are dropped as duplicates)"
            ) from None
    finally:
        await stop_producer(producer, REPUBLISH_STOP_S)
    return len(letters)
