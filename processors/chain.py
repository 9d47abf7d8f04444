"""The processor chain both runtimes run: validate → dedup → price → content → release → window → sample.

``CallPipeline.process`` takes one batch of raw payloads and returns everything the runtime
needs to write: accepted events with their derived columns, dead letters, closed window
partials and judge samples. It holds only in-memory state (windows, dedup horizon, sampling
caps); offsets, batching and commits belong to the runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from processors.content import ContentPolicy
from processors.dedup import DropDuplicateEvents
from processors.pricing import CostAttribution, Costs
from processors.quality import Lineage
from processors.records import DeadLetter, PayloadBatch, Source, StepCounters, block_id
from processors.release import ReleaseFingerprint
from processors.sampling import JudgeBudget, JudgeSample, JudgeSampler
from processors.validate import ValidationLimits, decode_calls, decode_feedback, decode_judge_results
from processors.windows import WindowAggregator, WindowPartial
from schemas.prices import PriceTable
from schemas.wire import WireCall, WireFeedback, WireJudgeResult


@dataclass(slots=True)
class ProcessedCalls:
    """Accepted calls with their derived columns, aligned by index."""

    source: Source
    events: list[WireCall]
    offsets: list[int]
    ts: list[float]
    costs: Costs
    price_version: str
    release_ids: list[str]
    dead: list[DeadLetter]
    partials: list[WindowPartial]
    samples: list[JudgeSample]
    counters: StepCounters
    block_id: str = ""
    """The input block these rows came from (``PayloadBatch.block_id``)."""
    end_offset: int = -1
    """``PayloadBatch.end_offset``: committable once this batch is durable."""
    watermark: float = float("-inf")
    """The partition's watermark after this batch: every window ending before it is in ``partials``
    of this batch or an earlier one (stage 2 may trust it once those are published)."""
    late: int = 0
    columns: object = None
    """Opaque to the processors: the sink's encoding of these rows (``sinks.columns.batch_columns``)."""

    def __len__(self) -> int:
        return len(self.events)


@dataclass(slots=True)
class ProcessedFeedback:
    source: Source
    events: list[WireFeedback]
    offsets: list[int]
    ts: list[float]
    dead: list[DeadLetter]
    counters: StepCounters = field(default_factory=StepCounters)
    block_id: str = ""
    lineage: dict[str, Lineage] = field(default_factory=dict)
    """Filled by the sink when it looked the calls up (so the runtime need not ask twice)."""
    checked_stored: bool = False
    """``drop_stored`` ran: a retried write sends the same rows (its insert token dedupes what
    landed) instead of finding its own rows stored and dropping them."""


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    window_s: int = 60
    lateness_s: float = 120.0
    flow_idle_s: float | None = None
    """Track flows (agent runs, conversation turns) with this idle gap; None: no rule reads them."""
    flow_windows: tuple[int, ...] = ()
    """The absence rules' window lengths (s): flows are counted for those (``WindowPartial.new_flows``)."""
    limits: ValidationLimits = field(default_factory=ValidationLimits)
    capture_content: bool = False
    redact_content: bool = True
    sample_rate: float = 0.02
    sample_rates: dict[str, float] = field(default_factory=dict)
    sample_boost_cap_per_hour: int = 200
    judge_budget: JudgeBudget = field(default_factory=JudgeBudget)
    judge_budgets: dict[str, JudgeBudget] = field(default_factory=dict)
    judge_model: str = "gpt-4o-mini"
    judge_extra_tokens: tuple[int, int] = (600, 150)
    """(rubric prompt tokens, judge output tokens) added to a call's text when estimating cost."""
    dedup_capacity: int = 1_000_000


def own_offsets(batch: PayloadBatch, others: dict[str, PayloadBatch]) -> list[int]:
    """The offsets of a mixed batch's payloads that stayed with the calls. ``others`` holds only
    what this batch's decode moved there (offsets are unique in a batch)."""
    moved = {o for b in others.values() for o in b.offsets}
    return [o for o in batch.offsets if o not in moved]


def _own_part(batch: PayloadBatch, others: dict[str, PayloadBatch]) -> tuple[int, str]:
    """How many of a mixed batch's payloads were calls, and the block id of those alone: what
    splitting by kind first gave the call pipeline, so a block's insert token is unchanged."""
    own = own_offsets(batch, others)
    return len(own), block_id(batch.source, own, batch.digest)


def calls_block_id(batch: PayloadBatch, others: dict[str, PayloadBatch] | None) -> str:
    """The block id ``CallPipeline.process`` gives the calls of ``batch`` processed in one piece
    (``others``: what its decode moved to other kinds)."""
    return _own_part(batch, others)[1] if others else batch.block_id


class CallPipeline:
    """One instance per source partition (its windows and dedup horizon are that partition's)."""

    def __init__(self, prices: PriceTable, options: PipelineOptions | None = None, partition: int = -1) -> None:
        self.options = o = options or PipelineOptions()
        self.decode = decode_calls(o.limits)
        self.dedup = DropDuplicateEvents(o.dedup_capacity)
        self.price = CostAttribution(prices)
        self.content = ContentPolicy(capture=o.capture_content, redact_pii=o.redact_content)
        self.release = ReleaseFingerprint()
        self.windows = WindowAggregator(o.window_s, o.lateness_s, partition, o.flow_idle_s, o.flow_windows)
        judge_rates = self.price.rates(o.judge_model)
        rubric, answer = o.judge_extra_tokens

        def judge_cost(e: WireCall) -> float:
            """The judge reads the call's prompt and output plus the rubric, and writes a short verdict."""
            if judge_rates is None:
                return 0.0
            return judge_rates.cost(e.input_tokens + e.output_tokens + rubric, answer, 0, 0)

        self.sampler = JudgeSampler(
            o.sample_rate, o.sample_rates, o.sample_boost_cap_per_hour, o.judge_budget, o.judge_budgets, judge_cost
        )

    def process(self, batch: PayloadBatch, now: float, others: dict[str, PayloadBatch] | None = None) -> ProcessedCalls:
        """``others``: ``batch`` may mix kinds; the payloads of other kinds are moved there
        (``DecodeEvents``), and these calls keep the block identity of the calls alone."""
        decoded = self.decode(batch, now, others)
        received, block = _own_part(batch, others) if others else (len(batch), batch.block_id)
        duplicates = self.dedup(decoded)
        events, ts = decoded.events, decoded.ts
        costs = self.price(events)
        self.content(events)
        release_ids = self.release(events)
        late_before = self.windows.late_events
        partials = self.windows.add(events, ts, costs, now, close=batch.closes_windows)
        samples = self.sampler(events, ts)
        counters = StepCounters(
            received=received,
            accepted=len(events),
            rejected=len(decoded.dead),
            duplicates=duplicates,
            late=self.windows.late_events - late_before,
            price_missing=costs.missing,
            usage_unknown=costs.usage_unknown,
            client_cost=costs.client,
            unknown_fields=decoded.unknown_fields,
            sampled=len(samples),
            unknown_models=costs.unknown_models,
        )
        return ProcessedCalls(
            source=batch.source,
            events=events,
            offsets=decoded.offsets,
            ts=ts,
            costs=costs,
            price_version=self.price.price_version,
            release_ids=release_ids,
            dead=decoded.dead,
            partials=partials,
            samples=samples,
            counters=counters,
            block_id=block,
            end_offset=batch.end_offset,
            watermark=self.windows.watermark,
            late=counters.late,
        )

    def flush_windows(self) -> list[WindowPartial]:
        return self.windows.flush()


def judge_result_id(r: WireJudgeResult) -> str:
    """The same verdict re-published dedupes: one score per (request, rubric, judge)."""
    return xxhash.xxh3_128_hexdigest(f"{r.request_id}\x1f{r.rubric}\x1f{r.judge_model}".encode())


VerdictKey = tuple[str, str, str]
"""(request_id, rubric, judge_model): what ``judge_scores`` keeps one row of (its sorting key, read FINAL)."""


def verdict_key(r: WireJudgeResult) -> VerdictKey:
    return (r.request_id, r.rubric, r.judge_model)


@dataclass(slots=True)
class ProcessedJudgeResults:
    source: Source
    events: list[WireJudgeResult]
    offsets: list[int]
    dead: list[DeadLetter]
    counters: StepCounters = field(default_factory=StepCounters)
    block_id: str = ""
    lineage: dict[str, Lineage] = field(default_factory=dict)
    """Filled by the sink when it looked the calls up (so the runtime need not ask twice)."""
    checked_stored: bool = False
    """``drop_stored`` ran: a retried write sends the same rows (its insert token dedupes what
    landed) instead of finding its own rows stored and dropping them."""


class JudgeResultPipeline:
    def __init__(self, limits: ValidationLimits | None = None, dedup_capacity: int = 200_000) -> None:
        self.decode = decode_judge_results(limits or ValidationLimits())
        self.dedup = DropDuplicateEvents(dedup_capacity)

    def process(self, batch: PayloadBatch, now: float) -> ProcessedJudgeResults:
        decoded = self.decode(batch, now)
        for r in decoded.events:
            if r.event_id is None:
                r.event_id = judge_result_id(r)
        duplicates = self.dedup(decoded)
        counters = StepCounters(
            received=len(batch), accepted=len(decoded.events), rejected=len(decoded.dead), duplicates=duplicates
        )
        return ProcessedJudgeResults(
            batch.source, decoded.events, decoded.offsets, decoded.dead, counters, batch.block_id
        )


def drop_stored(batch: ProcessedJudgeResults | ProcessedFeedback, stored: set[Any],
                key: Callable[[Any], Any]) -> int:  # fmt: skip
    """Removes the events the table already holds, and repeats within the batch; returns how many.

    The pipelines' dedup is in memory and starts empty after a restart, so a verdict or a thumb
    redelivered then (Kafka re-reading an uncommitted batch of another shape, a judge or a client
    sending again) would be inserted again: the table read ``FINAL`` shows it once, but the
    ``eval_1h``/``feedback_1h`` views count every inserted row. ``stored`` comes from the table
    itself (``ClickHouseSink.stored_keys``), so no horizon or restart is involved; it gains this
    batch's keys. Once per batch: a retry of a write that partly landed must not take its own
    rows for old ones.
    """
    if batch.checked_stored:
        return 0
    batch.checked_stored = True
    keep: list[int] = []
    for i, e in enumerate(batch.events):
        k = key(e)
        if k not in stored:
            stored.add(k)
            keep.append(i)
    dropped = len(batch.events) - len(keep)
    if dropped:
        batch.events = [batch.events[i] for i in keep]  # type: ignore[assignment]  # same element type
        batch.offsets = [batch.offsets[i] for i in keep]
        if isinstance(batch, ProcessedFeedback):
            batch.ts = [batch.ts[i] for i in keep]
        batch.counters.accepted -= dropped
        batch.counters.duplicates += dropped
    return dropped


def feedback_id(e: WireFeedback) -> str:
    return xxhash.xxh3_128_hexdigest(f"{e.request_id}\x1f{e.ts.isoformat()}\x1f{e.user_id or ''}".encode())


def feedback_key(e: WireFeedback) -> tuple[str, str]:
    """(request_id, feedback_id): what the ``feedback`` table keeps one row of (its sorting key)."""
    return (e.request_id, e.event_id or feedback_id(e))


class FeedbackPipeline:
    def __init__(self, limits: ValidationLimits | None = None, dedup_capacity: int = 200_000) -> None:
        self.decode = decode_feedback(limits or ValidationLimits())
        self.dedup = DropDuplicateEvents(dedup_capacity)

    def process(self, batch: PayloadBatch, now: float) -> ProcessedFeedback:
        decoded = self.decode(batch, now)
        for e in decoded.events:
            if e.event_id is None:  # the same verdict re-sent must dedupe to the same id
                e.event_id = feedback_id(e)
        duplicates = self.dedup(decoded)
        counters = StepCounters(
            received=len(batch),
            accepted=len(decoded.events),
            rejected=len(decoded.dead),
            duplicates=duplicates,
            unknown_fields=decoded.unknown_fields,
        )
        return ProcessedFeedback(
            batch.source, decoded.events, decoded.offsets, decoded.ts, decoded.dead, counters, batch.block_id
        )
