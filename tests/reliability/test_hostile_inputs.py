"""100k malformed and hostile payloads (property-based): no crash, each rejected into the DLQ with
the reason DESIGN.md's rules give, unknown models and unknown fields accepted and flagged, and
the valid traffic among them accepted exactly as if it had arrived alone.

Most of it runs at the processor level (the whole call chain: validate, dedup, price, content,
release, windows, sampling), where 100k cases take seconds; one smaller sample goes through the
real broker and worker into chDB, to prove the DLQ rows and raw rows come out exact there too.
Sizes: LLMPULSE_RELIABILITY_HOSTILE (default 100,000), LLMPULSE_RELIABILITY_HOSTILE_KAFKA (2,000).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from processors.chain import CallPipeline, PipelineOptions
from processors.validate import ValidationLimits
from schemas.prices import builtin_price_table
from tests.conftest import NOW, batch
from tests.llmpulse.workers import Worker, query, wait_caught_up, write_config
from tests.reliability.hostile import Case, cases
from tests.reliability.support import record, size

LIMITS = ValidationLimits()
BATCH = 500
"""Cases per hypothesis example: one processed batch, as the runtimes hand them over."""
TOTAL = size("HOSTILE", 100_000)

_seen: Counter[str] = Counter()
_totals = {"inputs": 0, "rejected": 0, "accepted": 0, "flagged": 0, "seconds": 0.0}


def hostile_batches(now: float) -> st.SearchStrategy[list[Case]]:
    return st.lists(cases(now, LIMITS.max_event_bytes, LIMITS.max_depth, LIMITS.max_age_s),
                    min_size=BATCH, max_size=BATCH)  # fmt: skip


def check(pipeline: CallPipeline, found: list[Case], now: float, first: int = 0) -> None:
    """Process one batch and hold every payload to its expected fate."""
    started = time.perf_counter()
    out = pipeline.process(batch([c.payload for c in found], first=first), now)
    _totals["seconds"] += time.perf_counter() - started
    dead = {d.offset: d for d in out.dead}
    accepted = dict(zip(out.offsets, out.events, strict=True))
    assert len(dead) + len(accepted) == len(found)  # every payload has exactly one fate
    for offset, case in enumerate(found, start=first):
        _seen[case.category] += 1
        if case.accepted:
            assert offset in accepted, (
                case.category,
                dead[offset].reason if offset in dead else None,
                case.payload[:300],
            )
            event = accepted[offset]
            if case.flag and case.flag != "price_missing":
                assert case.flag in event.attributes, (case.flag, event.attributes)
        else:
            assert offset in dead, (case.category, case.payload[:300])
            letter = dead[offset]
            assert letter.raw == case.payload  # byte for byte, for re-drive
            case.check(letter.reason, letter.path)
    flagged_models = sum(1 for c in found if c.flag == "price_missing")
    assert out.counters.price_missing == flagged_models
    _totals["inputs"] += len(found)
    _totals["rejected"] += len(dead)
    _totals["accepted"] += len(accepted)
    _totals["flagged"] += sum(1 for c in found if c.flag)


def test_hostile_payloads_are_rejected_with_their_reason_and_valid_ones_pass() -> None:
    now = NOW
    pipeline = CallPipeline(builtin_price_table(), PipelineOptions(limits=LIMITS))
    examples = max(1, TOTAL // BATCH)

    # no shrinking: a 500-case batch shrinks for minutes; the assertion names the offending payload instead
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(found=hostile_batches(now))
    def run(found: list[Case]) -> None:
        check(pipeline, found, now, first=_totals["inputs"])

    started = time.perf_counter()
    run()
    assert _totals["inputs"] >= TOTAL * 0.9, _totals  # hypothesis ran (about) every example asked for
    categories = set(_seen)
    assert {"valid", "wrong type", "invalid UTF-8", "nesting beyond the depth limit", "future", "too old",
            "missing required field", "over the size limit", "NaN", "negative int", "unknown model",
            "unknown field"} <= categories, categories  # fmt: skip
    record("hostile_inputs_processor_level", inputs=_totals["inputs"], rejected=_totals["rejected"],
           accepted=_totals["accepted"], flagged_accepted=_totals["flagged"], categories=dict(_seen),
           pipeline_s=round(_totals["seconds"], 2),
           wall_incl_generation_s=round(time.perf_counter() - started, 1))  # fmt: skip


def sample(now: float, n: int) -> list[Case]:
    """``n`` cases from the same strategies, outside a test (hypothesis draws, derandomized)."""
    drawn: list[Case] = []

    @settings(max_examples=max(1, n // BATCH), deadline=None, database=None, derandomize=True,
              phases=(Phase.generate,), suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(found=hostile_batches(now))
    def collect(found: list[Case]) -> None:
        drawn.extend(found)

    collect()
    return drawn[:n]


@pytest.mark.kafka
def test_hostile_payloads_through_the_broker_and_worker(tmp_path: Path, topics: Any) -> None:
    from aiokafka import AIOKafkaProducer

    from ingest.kafka import client_options

    now = time.time()
    # the broker refuses messages over its own limit (message.max.bytes, ~1 MiB) at produce time
    found = [c for c in sample(now, size("HOSTILE_KAFKA", 2_000)) if c.category != "over the size limit"]

    async def send() -> None:
        producer = AIOKafkaProducer(acks="all", enable_idempotence=True, max_batch_size=1 << 20,
                                    **client_options(topics))  # fmt: skip
        await producer.start()
        try:
            for c in found:  # one partition: offsets are positions in ``found``
                await producer.send(topics.topics.calls, c.payload, partition=0)
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(send())
    cfg = write_config(tmp_path / "w.yaml", topics, pipeline={"batch_max_seconds": "200ms"})
    worker = Worker(cfg, tmp_path / "data", tmp_path / "w.log").start()
    try:
        wait_caught_up(topics, topics.topics.calls, workers=[worker])
    finally:
        assert worker.stop() == 0, worker.log.read_text(errors="replace")[-3000:]
    letters = query(worker.data_dir, "SELECT source_offset, reason, path, hex(raw) AS raw_hex, raw_bytes FROM dlq "
                                     "ORDER BY source_offset")  # fmt: skip
    raw = query(worker.data_dir, "SELECT kafka_offset, price_missing, mapKeys(attributes) AS keys FROM llm_calls "
                                 "ORDER BY kafka_offset")  # fmt: skip
    rejected = [i for i, c in enumerate(found) if not c.accepted]
    in_raw = {r["kafka_offset"] for r in raw}
    odd = sorted(set(rejected) ^ {r["source_offset"] for r in letters})
    assert not odd, [(i, found[i].category, found[i].reason, i in in_raw, found[i].payload[:200]) for i in odd]
    assert [r["source_offset"] for r in letters] == rejected
    for r in letters:
        case = found[r["source_offset"]]
        case.check(r["reason"], r["path"])
        # the payload is kept byte for byte, invalid UTF-8 and all, so a fix can re-drive it
        assert (r["raw_hex"].lower(), r["raw_bytes"]) == (case.payload.hex(), len(case.payload)), case.category
    assert [r["kafka_offset"] for r in raw] == [i for i, c in enumerate(found) if c.accepted]
    # price_missing: an unknown model, or an ok call that reported no usage (its cost unknown too)
    assert sum(r["price_missing"] for r in raw) == sum(1 for c in found if c.accepted and (
        c.flag == "price_missing" or _no_usage(c.payload)))  # fmt: skip
    unknown_fields = 0
    for r in raw:  # unknown fields are accepted and kept, not rejected
        case = found[r["kafka_offset"]]
        if case.flag and case.flag != "price_missing":
            assert case.flag in r["keys"], (case.flag, r["keys"])
            unknown_fields += 1
    assert unknown_fields > 0
    record("hostile_inputs_through_kafka", inputs=len(found), dlq_rows=len(letters), raw_rows=len(raw),
           expected_rejected=len(rejected), unknown_fields_kept=unknown_fields)  # fmt: skip


def _no_usage(payload: bytes) -> bool:
    """``processors.pricing.usage_unknown`` for an accepted payload."""
    e = orjson.loads(payload)
    return e.get("status") == "ok" and e.get("input_tokens") == 0 and e.get("output_tokens") == 0
