"""The embedded runtime: the processor chain in-process, writing to ClickHouse (chDB by default).

Thin on purpose: it wires settings into the pure processors and the sink, owns batching and
the clock, and hands closed windows to whoever listens (alert evaluation plugs in here).
The Kafka worker wires the same pieces around a consumer.
"""

from __future__ import annotations

import gc
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from processors.chain import (
    CallPipeline,
    FeedbackPipeline,
    JudgeResultPipeline,
    PipelineOptions,
    ProcessedCalls,
    calls_block_id,
    feedback_id,
)
from processors.quality import feedback_partials, judge_partials, thumbs_down_requests
from processors.records import PayloadBatch, Source, StepCounters
from processors.sampling import JudgeBudget
from processors.validate import ValidationLimits
from processors.windows import FLOW_METRICS, WindowPartial
from schemas.config import Settings
from schemas.prices import PriceTable, builtin_price_table, load_price_table
from sinks.batching import Block, BufferedWriter
from sinks.clickhouse import ClickHouseSink, Connection, RetryPolicy, connect, recent_span
from sinks.kafka import judge_request
from sinks.migrations import migrate

if TYPE_CHECKING:
    from llmpulse.alerting import AlertPipeline
    from schemas.rules import RulesFile

log = logging.getLogger("llmpulse.runtime")


class _Ident(msgspec.Struct):
    """What ``EmbeddedRuntime._skip_written`` reads of a replayed line: its kind, a call's id and time."""

    kind: str = "call"
    event_id: str | None = None
    ts: datetime | None = None


_IDENT = msgspec.json.Decoder(_Ident).decode

GC_THRESHOLD = (50_000, 50, 100)
"""Batches hold tens of thousands of short-lived objects; with the default gen-0 threshold
(700) the collector rescans them constantly, which cost 25-30% of pipeline CPU here."""


PROCESS_PART = 2_048
"""Payloads the chain processes at a time, whatever size of batch a source delivers. Each step
and the Arrow columns pass over the batch's events again; 2k events (~3 MB of decoded structs)
stay in the CPU's cache between passes where 10k do not: chain + columns 9.0 against 10.3 µs an
event (medians of seven alternating repeats in one process; 1k: 9.4, 5k: 9.5), the embedded
runtime 15.5 against 16.5 µs (four alternating P1-sized runs).

The windows see each part as a batch: an event more than the allowed lateness behind an earlier
part's newest event is late for them (counted; its raw row and the rollups still have it), as
it would be had the source delivered smaller batches. In ``EmbeddedRuntime.ingest`` the parts
carry the whole batch's block id and go into one insert, so a file replayed finds the insert
token it had in one piece (``sinks.batching.insert_token``)."""


def tune_gc() -> None:
    gc.set_threshold(*GC_THRESHOLD)


def price_table(settings: Settings) -> PriceTable:
    """pricing.path, else data_dir/prices.json (written by `llmpulse prices import`), else built-in."""
    if settings.pricing.path is not None:
        return load_price_table(settings.pricing.path)
    imported = settings.data_dir / "prices.json"
    if imported.is_file():
        return load_price_table(imported)
    return builtin_price_table()


def pipeline_options(settings: Settings, rules: RulesFile | None = None) -> PipelineOptions:
    """``rules``: the alert rules that will read this pipeline's partials (None: none)."""
    p = settings.pipeline
    reads_flows = rules is not None and any(r.metric in FLOW_METRICS for r in rules.rules)
    return PipelineOptions(
        window_s=int(p.window),
        lateness_s=p.allowed_lateness,
        flow_idle_s=p.flow_idle if reads_flows else None,
        flow_windows=tuple(sorted({int(r.window) for r in rules.rules if r.absent})) if rules else (),
        limits=validation_limits(settings),
        capture_content=settings.content.capture,
        redact_content=settings.content.redact,
        sample_rate=settings.sampling.default_rate,
        sample_rates=dict(settings.sampling.rates),
        sample_boost_cap_per_hour=settings.sampling.boost_cap_per_hour,
        judge_budget=JudgeBudget(settings.sampling.max_per_hour, settings.sampling.judge_usd_per_day),
        judge_budgets={f: JudgeBudget(b.max_per_hour, b.usd_per_day) for f, b in settings.sampling.budgets.items()},
        judge_model=settings.sampling.judge_model,
        judge_extra_tokens=(settings.sampling.rubric_tokens, settings.sampling.judge_output_tokens),
        dedup_capacity=p.dedup_capacity,
    )


def validation_limits(settings: Settings) -> ValidationLimits:
    p = settings.pipeline
    return ValidationLimits(
        max_event_bytes=p.max_event_bytes,
        max_depth=p.max_depth,
        future_tolerance_s=p.future_tolerance,
        max_age_s=settings.retention.raw_days * 86400.0,
    )


def open_clickhouse(settings: Settings, purpose: str, *, data_dir: Path | None = None) -> Connection:
    """Connect and migrate: every command that touches data starts here."""
    conn = connect(settings.clickhouse, data_dir or settings.data_dir, purpose=purpose)
    try:
        migrate(conn, settings.retention, settings.clickhouse.cluster)
    except Exception:
        conn.close()
        raise
    return conn


@dataclass
class RuntimeStats:
    counters: StepCounters = field(default_factory=StepCounters)
    """Calls."""
    feedback: StepCounters = field(default_factory=StepCounters)
    verdicts: StepCounters = field(default_factory=StepCounters)
    """Judge results."""
    batches: int = 0
    process_s: float = 0.0
    partials: int = 0
    flagged_for_judge: int = 0
    judge_requests: int = 0
    judge_results: int = 0


InProcessJudge = Callable[[list[dict[str, Any]]], list[bytes]]
"""Scores judge requests (the ``llm.judge.requests`` message shape) and returns ``judge_result``
payloads: the embedded stand-in for a judge service reading the requests topic."""


class EmbeddedRuntime:
    def __init__(
        self,
        settings: Settings,
        conn: Connection,
        alerts: AlertPipeline | None = None,
        prices: PriceTable | None = None,
        judge: InProcessJudge | None = None,
    ) -> None:
        self.settings = settings
        self.conn = conn
        self.prices = prices or price_table(settings)
        self.calls = CallPipeline(self.prices, pipeline_options(settings, alerts.rules if alerts else None))
        self.feedback = FeedbackPipeline(validation_limits(settings))
        self.judge_results = JudgeResultPipeline(validation_limits(settings))
        self.sink = ClickHouseSink(conn, RetryPolicy(retries=settings.pipeline.insert_retries))
        self.writer = BufferedWriter(
            self.sink,
            settings.pipeline.batch_max_events,
            settings.pipeline.batch_max_seconds,
            on_written=self._after_write,
        )
        self.alerts = alerts
        self.judge = judge
        self._judge_queue: deque[dict[str, Any]] = deque()  # filled as calls turn durable, drained by tick()
        self._judge_source = Source("judge", f"in-process-{uuid.uuid4().hex[:12]}")
        self._judge_offset = 0
        self._now = time.time()
        self.stats = RuntimeStats()
        tune_gc()

    def ingest(self, batch: PayloadBatch, now: float | None = None, *, mixed: bool = True) -> None:
        """Process one batch of payloads; ``mixed`` routes feedback events by their ``kind``."""
        now = time.time() if now is None else now
        self._now = now
        started = time.perf_counter()
        if batch.source.kind == "file":
            self._skip_written(batch, now)
        kinds: dict[str, PayloadBatch] = {}
        parts: list[ProcessedCalls] = []
        with self.writer.together():
            for part in batch.split(PROCESS_PART):
                processed = self.calls.process(part, now, kinds if mixed else None)
                if processed.counters.received:
                    self.stats.counters.add(processed.counters)
                    self.writer.add_calls(processed)  # encoded now, while the part is in cache
                    self._emit(processed.partials, self.calls.windows.watermark)
                    parts.append(processed)
            if len(batch) > PROCESS_PART:  # one input block: a replay finds the token it had in one piece
                block = calls_block_id(batch, kinds)
                for processed in parts:
                    processed.block_id = block
        feedback = kinds.get("feedback")
        if feedback is not None:
            done = self.feedback.process(feedback, now)
            self.stats.feedback.add(done.counters)
            self.writer.add_feedback(done)
        results = kinds.get("judge_result")
        if results is not None:
            scored = self.judge_results.process(results, now)
            self.stats.verdicts.add(scored.counters)
            self.writer.add_judge_results(scored)
        self.stats.batches += 1
        self.stats.process_s += time.perf_counter() - started

    def _skip_written(self, batch: PayloadBatch, now: float) -> None:
        """A file has no position ClickHouse can check, as a Kafka offset has. Replayed under another
        name, or grown since it was last replayed, its events already written pass the chunk's
        insert token (path and content differ) and the dedup step (a new process), and the rollup
        views would count them again. So the ids ClickHouse holds among the chunk's, read around
        the chunk's times, are handed to the dedup steps first: they drop as duplicates."""
        calls: list[str] = []
        times: list[float] = []
        feedback: list[bytes] = []
        for raw in batch.payloads:
            try:
                ident = _IDENT(raw)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
                continue  # rejected by its pipeline in a moment, with a reason
            if ident.kind == "feedback":
                feedback.append(raw)
            elif ident.kind == "call" and ident.event_id and ident.ts is not None and ident.ts.tzinfo is not None:
                calls.append(ident.event_id)
                times.append(ident.ts.timestamp())
        if calls:
            self.calls.dedup.remember(self.sink.written_ids("llm_calls", "event_id", calls, (min(times), max(times))))
        if feedback:
            decoded = self.feedback.decode(PayloadBatch(batch.source, feedback, list(range(len(feedback)))), now)
            ids = [e.event_id or feedback_id(e) for e in decoded.events]
            if ids:
                span = (min(decoded.ts), max(decoded.ts))
                self.feedback.dedup.remember(self.sink.written_ids("feedback", "feedback_id", ids, span))

    def _emit(self, partials: list[WindowPartial], watermark: float) -> None:
        """Stage 2 in-process: this runtime is the only source of its windows."""
        self.stats.partials += len(partials)
        if self.alerts is not None and math.isfinite(watermark):
            self.alerts.on_partials(partials, self.calls.windows.partition, watermark)

    def _after_write(self, block: Block) -> None:
        """Once calls, feedback and scores are durable: flagged calls go to the judge, and verdicts
        count toward their calls' scopes (eval score and thumbs-down rules)."""
        flagged = [r for b in block.feedback for r in thumbs_down_requests(b.events)]
        span = recent_span(t for b in block.feedback for t in b.ts)
        fresh = self.sink.sample_flagged(flagged, [self.calls.sampler], span=span) if flagged else []
        self.stats.flagged_for_judge += len(fresh)
        if self.judge is not None:
            self._judge_queue.extend(judge_request(b, s.index, s.reason) for b in block.calls for s in b.samples)
            self._judge_queue.extend(self.sink.sampled_requests(fresh, span))
        if self.alerts is None:
            return
        w = self.calls.windows.window_s
        quality = [p for b in block.feedback for p in feedback_partials(b.events, b.lineage, w)]
        quality += [p for b in block.judge_results for p in judge_partials(b.events, b.lineage, w)]
        if quality:
            self.alerts.add_quality(quality)

    def tick(self) -> None:
        """Time-based duties between batches: start writing a due buffer, judge what was sampled."""
        self._judge_sampled()
        if self.writer.due():
            self.writer.flush(wait=False)

    def _judge_sampled(self) -> int:
        """Hand the calls sampled since last time to the in-process judge and ingest its verdicts
        like any judge_result events (joined to their calls, rolled up, fed to the alert rules)."""
        if self.judge is None or not self._judge_queue:
            return 0
        requests = [self._judge_queue.popleft() for _ in range(len(self._judge_queue))]
        payloads = self.judge(requests)
        self.stats.judge_requests += len(requests)
        self.stats.judge_results += len(payloads)
        if payloads:
            offsets = list(range(self._judge_offset, self._judge_offset + len(payloads)))
            self._judge_offset += len(payloads)
            self.ingest(PayloadBatch(self._judge_source, payloads, offsets), now=self._now)
        return len(payloads)

    def flush(self) -> None:
        """Write everything buffered and wait until it is durable."""
        started = time.perf_counter()
        self.writer.flush(wait=True)
        self.stats.process_s += time.perf_counter() - started

    def finish(self) -> None:
        """A finite source ended: close every window (complete minutes only count) and write everything."""
        windows = self.calls.windows
        if math.isfinite(windows.max_ts):  # no calls at all (a feedback-only file): no windows to close
            last_minute_end = math.ceil(windows.max_ts / windows.window_s) * windows.window_s
            self._emit(self.calls.flush_windows(), last_minute_end)
        self.flush()
        for _ in range(3):  # calls written -> judged -> verdicts written (flagged calls: one more round)
            if not self._judge_sampled():
                break
            self.flush()

    def close(self) -> None:
        self.writer.close()
