"""``llmpulse worker``: the distributed runtime, a faust-streaming app around the same processors.

faust provides the app, its lifecycle and signals (SIGTERM drains), topic management and the
low-volume agents (feedback, judge verdicts). The hot ``llm.calls`` topic is consumed by ``CallsConsumer``
with aiokafka ``getmany`` under the worker's own control, because faust's per-message stream
path drains ~15k msgs/s here against ~450k/s for ``getmany`` (DESIGN.md).

Delivery: at least once from Kafka, exactly once into ClickHouse. Offsets are committed only
after the ClickHouse write of everything below them succeeded, and on assignment the worker
asks ClickHouse which offsets of the partition it already holds and skips them. Open windows
are flushed to the partials topic on revoke and on shutdown; after a crash they are rebuilt
from the rows ClickHouse already holds, so alerts see the whole window either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import faust
import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaTimeoutError,
    ProducerClosed,
    TopicAuthorizationFailedError,
)
from aiokafka.structs import OffsetAndMetadata
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

from ingest.kafka import client_options, producer_options, stop_consumer, stop_producer
from llmpulse.alerting import QUALITY_SOURCE, AlertPipeline, rules_for
from llmpulse.runtime import (
    PROCESS_PART,
    open_clickhouse,
    pipeline_options,
    price_table,
    tune_gc,
    validation_limits,
)
from processors.alerts.stage2 import Stage2, sketches_read
from processors.chain import CallPipeline, FeedbackPipeline, JudgeResultPipeline
from processors.pricing import COST_CLIENT, Costs
from processors.quality import feedback_partials, judge_partials, thumbs_down_requests
from processors.records import PayloadBatch, Source, StepCounters
from processors.sampling import JudgeSampler
from processors.windows import WindowPartial
from schemas.config import Settings
from schemas.rules import RulesFile
from schemas.wire import WireCall
from sinks.batching import Block, BufferedWriter
from sinks.clickhouse import ClickHouseSink, Connection, RetryPolicy, SinkError, is_retryable, recent_span
from sinks.kafka import DEFAULT_SCOPES, KafkaPublisher, Outbox, partition_of
from sinks.metrics import PipelineMetrics
from sinks.relink import relink_feedback
from sinks.rollups import repair, written_scope

log = logging.getLogger("llmpulse.worker")

T = TypeVar("T")

FLUSHED_MARKER = "windows_flushed:{topic}:{partition}"
"""llmpulse_meta key: the offset up to which a partition's windows were flushed at a clean handoff."""


@dataclass
class PartitionState:
    """What the worker holds for one assigned partition of llm.calls."""

    partition: int
    pipeline: CallPipeline
    skip: set[int] = field(default_factory=set)
    """Offsets ClickHouse already holds (read back on assignment)."""
    skip_below: int = -1
    """Skipping stops once past this offset (the highest written one)."""
    next_offset: int = 0
    """One past the last offset handed to the pipeline."""


@dataclass
class WorkerStats:
    counters: StepCounters = field(default_factory=StepCounters)
    batches: int = 0
    skipped_written: int = 0
    commits: int = 0
    sink_failures: int = 0
    publish_failures: int = 0
    process_s: float = 0.0
    rebuilt_rows: int = 0
    rollups_repaired: int = 0
    """Rollup tables rebuilt for rows a killed worker wrote whose view parts never landed."""

    def summary(self) -> str:
        """For people reading the log: the stop line was a dataclass repr three lines wide."""
        c = self.counters
        parts = [
            f"{c.received:,} calls received", f"{c.accepted:,} accepted", f"{c.rejected:,} rejected",
            f"{c.duplicates:,} duplicates", f"{c.late:,} late", f"{c.price_missing:,} without a cost",
            f"{c.sampled:,} sampled", f"{self.skipped_written:,} skipped as written",
            f"{self.batches:,} batches", f"{self.commits:,} commits", f"{self.process_s:.1f} s processing",
        ]  # fmt: skip
        if self.sink_failures or self.publish_failures:
            parts.append(f"{self.sink_failures:,} insert and {self.publish_failures:,} publish failures")
        if c.unknown_models:
            top = sorted(c.unknown_models.items(), key=lambda kv: -kv[1])[:5]
            parts.append("models without a price: " + ", ".join(f"{m} ({n:,})" for m, n in top))
        return "; ".join(parts)


def _rows_to_events(rows: list[dict[str, Any]]) -> tuple[list[WireCall], list[float], Costs]:
    """ClickHouse rows back into the shapes the window aggregator folds (crash recovery only)."""
    events: list[WireCall] = []
    costs: list[float | None] = []
    for r in rows:
        ts: datetime = r["ts"]
        events.append(
            WireCall(
                event_id=r["event_id"],
                ts=ts,
                feature=r["feature"],
                model=r["model"],
                input_tokens=r["input_tokens"],
                output_tokens=r["output_tokens"],
                latency_ms=r["latency_ms"],
                status=r["status"],
                team=r["team"] or None,
                provider=r["provider"] or None,
                prompt_version=r["prompt_version"] or None,
                variant=r["variant"] or None,
                refusal=bool(r["refusal"]),
                cached_input_tokens=r["cached_input_tokens"],
                cache_write_tokens=r["cache_write_tokens"],
                output_chars=r["output_chars"],
                schema_valid=r["schema_valid"],
                tool_calls=tuple(r["tool_calls"]),
                ttft_ms=r["ttft_ms"],
                # what the windows read besides the counts: snapshots served (drift) and the
                # flows (absence rules' active flows, flow metrics)
                response_model=r["response_model"] or None,
                trace_id=r["trace_id"] or None,
                conversation_id=r["conversation_id"] or None,
            )
        )
        costs.append(r["cost_usd"])
    ts_list = [e.ts.timestamp() for e in events]
    missing = [c is None for c in costs]
    return events, ts_list, Costs(costs, [COST_CLIENT] * len(costs), missing, sum(missing), 0, {})


class CallsConsumer(mode.Service):
    """Batch consumer of llm.calls: getmany → process → ClickHouse → publish → commit."""

    def __init__(self, settings: Settings, rules: RulesFile | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.settings = settings
        self.kafka = settings.kafka
        self.topic = settings.kafka.topics.calls
        self.rules = rules or rules_for(settings)
        self.scopes = tuple(sorted(self.rules.scope_dims)) or DEFAULT_SCOPES
        """The grains partials are published at: exactly what the rules and budgets group by."""
        self.sketches = sketches_read(self.rules.rules)
        """The sketches partials carry: those the rules read (a rules change takes effect on restart;
        partials published before it lack a newly read sketch, and such a rule sees no evidence
        in those minutes)."""
        self.stats = WorkerStats()
        self.partitions: dict[int, PartitionState] = {}
        self.prices = price_table(settings)
        self.options = pipeline_options(settings, self.rules)
        self._fallback_sampler: JudgeSampler | None = None
        self.conn: Connection | None = None
        self.sink: ClickHouseSink | None = None
        self.writer: BufferedWriter | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.publisher: KafkaPublisher | None = None
        self._durable: deque[Block] = deque()
        self._written_ts: dict[int, float] = {}
        """Per partition, the newest event time written (feedback waits for its call: ``_quality_agent``)."""
        self._written_end: dict[int, int] = {}
        """Per partition, one past the last offset written."""
        self._progress: tuple[float, int] = (time.time(), 0)
        """When the last progress line was logged, and the calls received then."""
        """Blocks the insert thread finished, waiting for their outputs and offset commits."""
        self._block_box: Outbox | None = None
        """The outputs of ``_durable``'s first block the broker has not taken yet."""
        self._unblocked: list[tuple[int, list[WindowPartial], float]] = []
        """Partials closed without a write behind them (idle ticks, revoke flushes), with the watermark."""
        self._unblocked_box: Outbox | None = None
        """The same for ``_unblocked``'s first entry."""
        self.published_watermark: dict[int, float] = {}
        """Per partition: every window ending before this has its partials on the partials topic."""
        self._last_heartbeat = 0.0
        self.ready = asyncio.Event()
        self.assigned = asyncio.Event()
        """Set once the group has given this worker its partitions (perhaps none) the first time."""
        self.metrics = PipelineMetrics()
        self._assigning: dict[int, asyncio.Event] = {}
        self._failed: set[int] = set()
        """Partitions assigned here whose progress could not be read back (``assign``)."""
        self._retry_failed_at = 0.0
        self._retry_delay = RETRY_ASSIGN_S / 2
        self._consuming: asyncio.Task[None] | None = None
        """The consume loop's task (``on_stop`` cancels it before the clients close)."""
        self._cut_short = False
        """The stop gave up on its release: no release may run after it (a revoke queued on ``_busy``)."""
        self._busy = asyncio.Lock()
        """Held by each consume step (process, tick, publish, commit) and by ``_release``: a revoke
        or a SIGTERM runs in another task (aiokafka's coordinator, mode's stop) and must not flush
        windows, commit and hand a partition over while a step is halfway through a batch of it."""

    # ---- lifecycle -------------------------------------------------------------------------

    async def on_start(self) -> None:
        tune_gc()
        if self.settings.metrics.enabled:
            server, _ = self.metrics.serve(self.settings.metrics.port, self.settings.metrics.addr)
            log.info("metrics at http://%s:%d/metrics", self.settings.metrics.addr, server.server_port)
        self.conn = await asyncio.to_thread(open_clickhouse, self.settings, "llmpulse worker")
        self.sink = ClickHouseSink(self.conn, RetryPolicy(retries=self.settings.pipeline.insert_retries))
        self.writer = BufferedWriter(
            self.sink,
            self.settings.pipeline.batch_max_events,
            self.settings.pipeline.batch_max_seconds,
            on_written=self._on_written,
        )
        self.producer = AIOKafkaProducer(
            acks="all", enable_idempotence=True, linger_ms=20, max_batch_size=1 << 20, **producer_options(self.kafka)
        )
        await self.producer.start()
        self.publisher = KafkaPublisher(self.kafka, self.producer)
        self.consumer = AIOKafkaConsumer(
            group_id=self.kafka.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=64 << 20,
            session_timeout_ms=int(self.kafka.session_timeout * 1000),
            heartbeat_interval_ms=max(1000, int(self.kafka.session_timeout * 1000 / 10)),
            max_poll_interval_ms=600_000,
            isolation_level="read_committed",
            **client_options(self.kafka),
        )
        await self.consumer.start()
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        self.ready.set()

    async def on_stop(self) -> None:
        """SIGTERM: stop reading, flush windows, write, publish, commit — then leave the group.

        Each step that needs the broker is bounded: aiokafka waits for an unreachable broker
        without end (a commit for its coordinator, a send for its acknowledgement), and a stop
        that outlasts the supervisor's grace period ends in SIGKILL anyway. A release cut short
        ends as a crash there would: the consume step still under way is cancelled before the
        clients close (so nothing publishes, drops or commits behind the stop), and the buffered
        rows are not written (written, the next owner would skip them without their outputs:
        unwritten, it reads them again whole).
        """
        released = False
        try:
            await asyncio.wait_for(self._release(list(self.partitions)), STOP_RELEASE_S)
            released = True
        except TimeoutError:
            log.warning("stopping: the last flush, publish and commit did not finish within %g s (is the broker "
                        "reachable?); what is left stays uncommitted", STOP_RELEASE_S)  # fmt: skip
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the stop itself is being cancelled
            log.warning("stopping: the last flush, publish and commit were cut short inside aiokafka; what is "
                        "left stays uncommitted")  # fmt: skip
        except Exception as exc:
            log.warning("stopping: the last flush, publish and commit failed (%s); what is left stays uncommitted",
                        exc)  # fmt: skip
        self._cut_short = not released  # a revoke's release queued on ``_busy`` must not run after this
        await _cancel_loop(self._consuming, STOP_CLIENT_S)
        if self.consumer is not None:
            await stop_consumer(self.consumer, STOP_CLIENT_S)
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await stop_producer(self.producer, STOP_CLIENT_S)
        closed = self.writer is None or await _within(
            asyncio.to_thread(self.writer.close if released else self.writer.abandon), STOP_WRITER_S,
            "writing the last rows" if released else "the insert under way")  # fmt: skip
        if self.conn is not None and closed:
            await _within(asyncio.to_thread(self.conn.close), STOP_CLIENT_S, "closing ClickHouse")
        log.info("worker stopped: %s", self.stats.summary())

    @mode.Service.task
    async def _consume(self) -> None:
        assert self.consumer is not None
        self._consuming = asyncio.current_task()
        max_records = self.kafka.fetch_max_records
        timeout_ms = int(self.kafka.fetch_max_wait * 1000)
        idle = self.settings.pipeline.idle_timeout
        while not self.should_stop:
            records = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
            log.debug("getmany: %s", {tp.partition: len(m) for tp, m in records.items()})
            async with self._busy:
                if self.should_stop:
                    break  # stopped while fetching: the stop has released every partition
                if records:
                    await self._handle(records)
                await self._tick(idle)
                await self._publish_and_commit()

    # ---- the hot path ----------------------------------------------------------------------

    async def _handle(self, records: dict[TopicPartition, list[Any]]) -> None:
        batches: list[tuple[int, PayloadBatch]] = []
        for tp, messages in records.items():
            state = self.partitions.get(tp.partition)
            if state is None and tp.partition in self._assigning:
                # aiokafka starts fetching before our assignment callback has read ClickHouse back
                await self._assigning[tp.partition].wait()
                state = self.partitions.get(tp.partition)
            if state is None:
                # revoked while the fetch was in flight (the next owner reads them), or its
                # assignment failed (``_retry_failed`` reads them again from the commit)
                continue
            skip = state.skip
            if skip:  # re-reading what ClickHouse already holds (after a crash): drop those
                kept = [m for m in messages if m.offset not in skip]
                self.stats.skipped_written += len(messages) - len(kept)
            else:
                kept = messages
            payloads = [b"" if m.value is None else m.value for m in kept]
            offsets = [m.offset for m in kept]
            state.next_offset = messages[-1].offset + 1
            if skip and messages[-1].offset >= state.skip_below:
                state.skip = set()  # past everything ClickHouse held: stop checking
            source = Source("kafka", tp.topic, tp.partition)
            batches.append((tp.partition, PayloadBatch(source, payloads, offsets, end_offset=state.next_offset)))
        # CPU-bound work off the event loop, so heartbeats and faust's agents keep running. A thread
        # cannot be cancelled: if this task is, the step still ends (and ``_busy`` is held) only
        # once the thread is done with the batch.
        work = asyncio.ensure_future(asyncio.to_thread(self._process, batches))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait([work])
            raise

    def _process(self, batches: list[tuple[int, PayloadBatch]]) -> None:
        """Process and buffer; a batch with nothing left to write still goes through, carrying its offsets."""
        assert self.writer is not None
        started = time.perf_counter()
        now = time.time()
        for partition, batch in batches:
            pipeline = self.partitions[partition].pipeline
            # each part keeps its own block id: Kafka progress is read back from ClickHouse, not
            # found by insert token, and a revoke may flush between two parts of a batch
            began = time.perf_counter()
            for part in batch.split(PROCESS_PART):
                out = pipeline.process(part, now)
                self.stats.counters.add(out.counters)
                self.metrics.observe(out)
                self.writer.add_calls(out)
            self.metrics.batch_seconds.observe(time.perf_counter() - began)  # the partition's batch, not a part
        self.stats.batches += 1
        self.stats.process_s += time.perf_counter() - started

    def judge_samplers(self) -> list[JudgeSampler]:
        """The samplers whose budgets a call flagged after the fact is charged to (``sample_flagged``).

        Each owned partition's; with none (more workers than partitions, or mid-rebalance) a
        sampler of this process's own, built with the same settings, so a thumbs-down that is
        already durable is still judged within a budget rather than dropped.
        """
        owned = [s.pipeline.sampler for s in self.partitions.values()]
        if owned:
            return owned
        if self._fallback_sampler is None:
            self._fallback_sampler = CallPipeline(self.prices, self.options).sampler
        return [self._fallback_sampler]

    def _highwater(self, partition: int) -> int | None:
        """The partition's end on the broker as of the last fetch (no round trip); None before one."""
        return self.consumer.highwater(TopicPartition(self.topic, partition)) if self.consumer is not None else None

    def _log_progress(self, now: float, behind: int) -> None:
        """A line every ``PROGRESS_S`` while calls arrive: between "Ready" and the stop the log
        said nothing, and whether the worker was keeping up took a metrics scrape to tell."""
        c = self.stats.counters
        last_at, last_received = self._progress
        if now - last_at < PROGRESS_S or c.received == last_received:
            return
        rate = (c.received - last_received) / (now - last_at)
        log.info("progress: %s calls received (%s/s since the last line), %s rejected, %s waiting on the broker",
                 f"{c.received:,}", f"{rate:,.0f}", f"{c.rejected:,}", f"{behind:,}")  # fmt: skip
        self._progress = (now, c.received)

    def calls_written_through(self, t: float) -> bool:
        """Whether this worker's calls up to event time ``t`` are durable: on each of its partitions
        a call at or after ``t`` is written, or everything read is written and nothing is left on
        the broker. (Calls of partitions other workers own are theirs to write.)"""
        if not self.assigned.is_set():
            return False  # the partitions (and the calls on them) are not known yet
        for state in self.partitions.values():
            p = state.partition
            if self._written_ts.get(p, -math.inf) >= t:
                continue
            high = self._highwater(p)
            if not (high is not None and self._written_end.get(p, -1) >= state.next_offset >= high):
                return False
        return True

    def _on_written(self, block: Block) -> None:
        """Runs in whichever thread collected the insert; the event loop picks the block up."""
        self._durable.append(block)
        for b in block.calls:
            p = b.source.partition
            if b.ts:
                self._written_ts[p] = max(self._written_ts.get(p, -math.inf), *b.ts)
            self._written_end[p] = max(self._written_end.get(p, -1), b.end_offset)
        self.metrics.inserts.inc()
        self.metrics.rows.inc(sum(len(b.events) + len(b.dead) for b in block.calls))

    async def _tick(self, idle_timeout: float) -> None:
        assert self.writer is not None
        await self._retry_failed()
        now = time.time()
        lag: dict[int, int] = {}
        for state in self.partitions.values():
            windows = state.pipeline.windows
            high = self._highwater(state.partition)
            if high is not None:
                lag[state.partition] = max(0, high - state.next_offset)
            if lag.get(state.partition):
                # a partition waiting its turn in a backlog is not idle: moving it to the wall
                # clock would count the backlog late, and its windows would miss the alerts
                windows.behind(now)
                continue
            before = windows.watermark
            partials = windows.tick(now, idle_timeout)
            if partials or windows.watermark > before:
                self._unblocked.append((state.partition, partials, windows.watermark))
        for state in self.partitions.values():
            wm = state.pipeline.windows.watermark
            if math.isfinite(wm):
                self.metrics.watermark_delay.labels(str(state.partition)).set(now - wm)
            if state.partition in lag:
                self.metrics.lag.labels(str(state.partition)).set(lag[state.partition])
        self.metrics.unwritten.set(self.writer.unwritten_rows)
        self._log_progress(now, sum(lag.values()))
        if self.writer.due() or self.writer.failed is not None:
            await self._flush(wait=False)  # while a block fails this backs off, and intake waits in Kafka
        try:
            self.writer.poll()
        except SinkError:
            await self._flush(wait=False)  # retries the failed block with backoff

    async def _flush(self, wait: bool) -> None:
        """Hand the buffer to the insert thread; on failure keep retrying the same block (never skip)."""
        assert self.writer is not None
        writer = self.writer
        delay = 1.0
        while True:
            try:
                if writer.failed is not None:
                    await asyncio.to_thread(writer.retry_failed)
                await asyncio.to_thread(writer.flush, wait)
                return
            except SinkError as exc:
                self.stats.sink_failures += 1
                self.metrics.insert_errors.inc()
                self.metrics.unwritten.set(writer.unwritten_rows)  # intake waits here: this must stay flat
                log.error("ClickHouse write failed, not committing; retrying in %.0fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                if self.should_stop and delay >= 30.0:
                    raise

    async def _publish_and_commit(self) -> None:
        """For blocks now durable: publish what they produced, then commit their offsets.

        Outputs wait for durability so a crash can never publish window partials, judge
        requests or dead letters for rows that will be processed (and published) again. A block
        leaves the queue only once the broker has all of its outputs (``_deliver``), and the
        commit covers only such blocks.
        """
        assert self.publisher is not None and self.consumer is not None
        commit: dict[int, int] = {}
        try:
            while self._durable:
                block = self._durable[0]
                # a block's outputs go in one round of sends, awaited together: every wait lasts
                # at least the producer's linger (20 ms), and a block holds dozens of batches
                if self._block_box is None:
                    self._block_box = self.publisher.block_outbox(block.calls, self.scopes, self.sketches)
                await self._deliver(self._block_box, "a written block's outputs")
                self._durable.popleft()
                self._block_box = None
                for b in block.calls:
                    self._published(b.source.partition, b.watermark)
                    if b.end_offset >= 0:
                        commit[b.source.partition] = max(commit.get(b.source.partition, 0), b.end_offset)
            while self._unblocked:
                partition, partials, watermark = self._unblocked[0]
                if self._unblocked_box is None:
                    self._unblocked_box = self.publisher.outbox(
                        partials=[(partials, partition, watermark)], scopes=self.scopes, sketches=self.sketches
                    )
                await self._deliver(self._unblocked_box, "closed windows' partials")
                self._unblocked.pop(0)
                self._unblocked_box = None
                self._published(partition, watermark)
            await self._heartbeat()
        finally:  # stopping while the broker is unreachable (``_deliver`` raised): keep what is done
            offsets = {
                TopicPartition(self.topic, p): OffsetAndMetadata(o, "")
                for p, o in commit.items()
                if p in self.partitions
            }
            if offsets:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # a stop cut this step short; the commit must not wait for an unreachable
                    # coordinator (aiokafka's does, without end): uncommitted is as after a crash
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self.consumer.commit(offsets), STOP_CLIENT_S / 2)
                        self.stats.commits += 1
                # the rows are in ClickHouse: whoever owns these partitions next reads the
                # written offsets back and skips them
                elif await _commit(self.consumer, offsets, "calls"):
                    self.stats.commits += 1

    async def _deliver(self, box: Outbox, what: str) -> None:
        """Send ``box`` until the broker has all of it, sending again only what failed (a partial
        sent twice would count twice in stage 2). Meanwhile this step holds ``_busy`` and nothing
        new is read: intake waits in Kafka, as it does for a failing insert, and the worker stays
        up (it used to stop on the first failed send and rely on a restart). A message retrying
        cannot mend (over the size limit) is dropped, logged and counted. Once the worker is
        stopping, the retries end after 1 + 2 + 4 s and this raises: what is left stays
        uncommitted (windows unflushed) and the next owner reads it again (rebuilds them)."""
        assert self.publisher is not None
        delay = 1.0
        while (failure := await _send_round(self.publisher, box, self.metrics, what)) is not None:
            self.stats.publish_failures += 1
            if self.should_stop and delay > STOPPING_RETRY_S:
                raise failure
            log.error(
                "publishing %s failed (%d message(s) left); retrying in %.0fs: %s", what, len(box), delay, failure
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def _published(self, partition: int, watermark: float) -> None:
        """Stage 2 has every partial of ``partition`` up to ``watermark`` (heartbeats may say so)."""
        if watermark > self.published_watermark.get(partition, -math.inf):
            self.published_watermark[partition] = watermark

    async def _heartbeat(self, force: bool = False) -> None:
        """Tell every stage-2 consumer how far each of our partitions is (quiet ones included)."""
        now = time.monotonic()
        if not force and now - self._last_heartbeat < 1.0:
            return
        self._last_heartbeat = now
        assert self.publisher is not None
        marks = {p: w for p, w in self.published_watermark.items() if p in self.partitions and math.isfinite(w)}
        if marks:
            try:
                await self.publisher.watermarks(marks)
            except Exception as exc:  # the next heartbeat, a second later, carries the same or more
                self.metrics.publish_errors.inc()
                log.warning("watermark heartbeat not sent: %s", exc)

    # ---- rebalance ---------------------------------------------------------------------------

    async def assign(self, partitions: list[int]) -> None:
        """Read each partition's progress back before its records are processed (``_handle`` waits).

        A partition whose read fails (ClickHouse or the broker unreachable) is left without state,
        its records dropped, and tried again by ``_retry_failed``; its waiters are released either
        way, or the consume step would wait for good, holding ``_busy`` against every revoke and
        the stop."""
        for p in partitions:
            self._assigning[p] = asyncio.Event()
        for p in partitions:
            try:
                await self._assign_one(p)
                self._failed.discard(p)
            except Exception:
                self._failed.add(p)
                log.exception("partition %d: reading its progress back failed; tried again by a later step", p)
            finally:
                event = self._assigning.pop(p, None)
                if event is not None:
                    event.set()

    async def _retry_failed(self) -> None:
        """Assign again the partitions whose assignment failed, then read them from their commit
        (what was fetched for them meanwhile was dropped). From every step, not on their records:
        a quiet partition without state sends no watermark, and stage 2 would wait for it."""
        if not self._failed or time.monotonic() < self._retry_failed_at:
            return
        assert self.consumer is not None
        self._failed &= {tp.partition for tp in self.consumer.assignment() if tp.topic == self.topic}
        retry = sorted(self._failed)
        await self.assign(retry)
        for p in retry:
            state = self.partitions.get(p)
            if state is not None:
                with contextlib.suppress(IllegalStateError):  # revoked meanwhile: its release drops the state
                    self.consumer.seek(TopicPartition(self.topic, p), state.next_offset)
        # backing off while they keep failing: each try is a full assignment, under ``_busy``
        self._retry_delay = min(self._retry_delay * 2, 60.0) if self._failed else RETRY_ASSIGN_S / 2
        self._retry_failed_at = time.monotonic() + self._retry_delay

    async def _assign_one(self, p: int) -> None:
        assert self.consumer is not None and self.sink is not None
        tp = TopicPartition(self.topic, p)
        committed = await self.consumer.committed(tp)
        if committed is None:
            beginning = await self.consumer.beginning_offsets([tp])
            committed = beginning[tp]
        pipeline = CallPipeline(self.prices, self.options, partition=p)
        state = PartitionState(p, pipeline, next_offset=committed)
        progress = await asyncio.to_thread(self.sink.kafka_progress, self.topic, p, committed)
        if progress.written:
            state.skip = progress.written
            state.skip_below = progress.max_written or -1
            log.info(
                "partition %d: %d offsets >= %d already in ClickHouse; skipping them",
                p, len(progress.written), committed,
            )  # fmt: skip
            await self._repair_rollups(p, committed)
        await self._rebuild_windows(state, committed)
        state.pipeline.windows.touch(time.time())  # a partition with no traffic still goes idle
        self.partitions[p] = state

    async def _repair_rollups(self, partition: int, committed: int) -> None:
        """Count the rows a killed owner wrote but never committed in the rollups, if its kill left them out.

        They are skipped, not written again, so a view part lost between the raw part and the
        kill would stay lost; the check is one small query, the rebuild happens only on a miss.
        """
        assert self.conn is not None
        scope = await asyncio.to_thread(
            written_scope, self.conn, "llm_calls",
            "source = 'kafka' AND kafka_partition = {p:Int32} AND kafka_offset >= {o:Int64}",
            {"p": partition, "o": committed},
        )  # fmt: skip
        if scope is None:
            return
        first, last, features = scope
        rebuilt = await asyncio.to_thread(repair, self.conn, "llm_calls", first, last + 1, features)
        if rebuilt:
            self.stats.rollups_repaired += len(rebuilt)
            log.warning(
                "partition %d: %s lacked rows written before the last owner died; rebuilt from raw for %d feature(s)",
                partition, ", ".join(rebuilt), len(features),
            )  # fmt: skip

    async def _rebuild_windows(self, state: PartitionState, committed: int) -> None:
        """After a crash, refill the partition's open windows from the rows ClickHouse holds."""
        assert self.sink is not None
        marker = await asyncio.to_thread(
            self.sink.get_meta, FLUSHED_MARKER.format(topic=self.topic, partition=state.partition)
        )
        if marker is not None and int(marker) >= committed:
            return  # a clean handoff: the previous owner flushed its windows to the partials topic
        windows = state.pipeline.windows
        recent = await asyncio.to_thread(self.sink.window_rows, state.partition, time.time() - 86400 * 2)
        if not recent:
            return
        newest = max(r["ts"].timestamp() for r in recent)
        watermark = newest - windows.lateness_s
        since = math.floor(watermark / windows.window_s) * windows.window_s
        rows = [r for r in recent if r["ts"].timestamp() >= since]
        events, ts, costs = _rows_to_events(rows)
        windows.advance(watermark)  # windows below this were emitted before the crash
        windows.add(events, ts, costs)
        self.stats.rebuilt_rows += len(rows)
        log.info("partition %d: rebuilt %d open-window rows from ClickHouse", state.partition, len(rows))

    async def _release(self, partitions: Sequence[int]) -> None:
        """Revoke or shutdown: flush windows early, make everything durable, publish, commit
        (after the consume step under way, if any: ``_busy``). Which of ``partitions`` hold state
        is read once the step is done: it may have assigned one again (``_retry_failed``)."""
        async with self._busy:
            if self._cut_short:
                return  # the stop gave up on releasing: what is left stays uncommitted, as after a crash
            self._failed.difference_update(partitions)
            mine = [p for p in partitions if p in self.partitions]
            if mine:
                await self._release_now(mine)

    async def _release_now(self, partitions: Sequence[int]) -> None:
        assert self.sink is not None
        await self._flush(wait=True)
        for p in partitions:
            state = self.partitions.get(p)
            if state is not None:
                self._unblocked.append((p, state.pipeline.flush_windows(), state.pipeline.windows.watermark))
        await self._publish_and_commit()
        for p in partitions:
            state = self.partitions.pop(p, None)
            if state is not None:
                key = FLUSHED_MARKER.format(topic=self.topic, partition=p)
                await asyncio.to_thread(self.sink.set_meta, key, str(state.next_offset))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: CallsConsumer) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        partitions = sorted(tp.partition for tp in revoked if tp.topic == self.service.topic)
        if partitions:
            log.info("%s partitions revoked %s: flushing windows and writes", self.service.topic, partitions)
            await self.service._release(partitions)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("%s partitions assigned %s", self.service.topic, sorted(tp.partition for tp in assigned))
        await self.service.assign([tp.partition for tp in assigned if tp.partition not in self.service.partitions])
        self.service.assigned.set()


async def _send_round(publisher: KafkaPublisher, box: Outbox, metrics: PipelineMetrics, what: str) -> Exception | None:
    """One round of ``box``'s sends, counted: a failed round in ``publish_errors``, messages given
    up in ``dropped``. Returns the failure (something is left to send again), None once all is out;
    each caller decides when to try again."""
    given_up = box.given_up
    try:
        await publisher.deliver(box, keep=_passing)
        failure: Exception | None = None
    except Exception as exc:
        metrics.publish_errors.inc()
        failure = exc
    if box.given_up > given_up:
        metrics.dropped.labels("kafka_outputs").inc(box.given_up - given_up)
        log.error(
            "%s: %d message(s) dropped, retrying cannot mend: %s", what, box.given_up - given_up, box.last_given_up
        )
    return failure


def _passing(exc: BaseException) -> bool:
    """Whether trying again may succeed: the broker or ClickHouse unreachable, a timeout, a topic
    ACL an operator has yet to grant; not a message over the size limit, a value that cannot be
    encoded, a bug."""
    if isinstance(exc, SinkError):  # raised once RetryPolicy gave up: on what, says its cause
        return exc.__cause__ is None or is_retryable(exc.__cause__)
    if isinstance(exc, OSError | KafkaTimeoutError | KafkaConnectionError | TopicAuthorizationFailedError):
        return True
    if isinstance(exc, ProducerClosed):  # the worker is stopping: kept, never counted as unmendable
        return True
    return is_retryable(exc) or bool(getattr(exc, "retriable", False))


async def _cancel_loop(task: asyncio.Task[None] | None, seconds: float) -> None:
    """A service's consume loop, cancelled and waited for (bounded) before its clients close:
    mode cancels service tasks only after ``on_stop``, and a step still running would publish,
    commit or write with clients the stop is closing."""
    if task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=seconds)


async def _within(step: Awaitable[object], seconds: float, what: str) -> bool:
    """A stop's step that runs on a thread, waited for at most ``seconds`` (the thread is left to
    finish: the process's exit joins it). Whether it ended in time and without error."""
    running = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({running}, timeout=seconds)
    if not done:
        log.warning("stopping: %s did not end within %g s (is ClickHouse answering?); going on", what, seconds)
        return False
    if running.exception() is not None:
        log.warning("stopping: %s failed: %s", what, running.exception())
        return False
    return True


STOP_RELEASE_S = 12.0
"""SIGTERM: how long the last flush, publish and commit may take. With every other step at its
bound a stop takes ~55 s (ClickHouse answering), typically 22-27 s against a dead broker and a
second or two against a live one: docker-compose.yml gives the worker 60 s (README, "A SIGTERM
while the broker ...")."""
STOP_CLIENT_S = 4.0
"""SIGTERM: how long leaving a consumer group, or waiting for a producer's acknowledgements, may take."""
STOP_WRITER_S = 8.0
"""SIGTERM: how long writing the last rows (or finishing the insert under way) may take. Past it
the thread is left running, and the process's exit waits for it: against a ClickHouse server that
does not answer, that is the insert's retries (~91 s)."""
STOPPING_RETRY_S = 4.0
"""The last back-off a stopping worker still waits before giving up a failing send (``_deliver``):
a SIGTERM's grace period is short (30 s by default in Kubernetes)."""

RETRY_ASSIGN_S = 5.0
"""A partition whose assignment failed is tried again at once, then after this long, doubling up to
a minute while it keeps failing (``CallsConsumer._retry_failed``)."""

RELINK_EVERY_S = 600.0
"""How often the worker links feedback written before its call (``_relink_timer``)."""
RELINK_LOOKBACK_S = 2 * 86_400.0
"""How far back it looks: a call more than two days behind its feedback is not waited for."""
COMMIT_INTERVAL_S = 1.0
"""Stage 2 commits its partials offsets (after saving progress) at most this often."""
PROGRESS_S = 30.0
"""How often the worker logs a progress line while calls arrive."""
LINK_WAIT_S = 60.0
"""How long feedback waits for its call while this worker's calls up to the feedback's time are
not all written (``_quality_agent``): a restart's backlog, at ~50k calls/s, drains a few million."""


class AlertsConsumer(mode.Service):
    """Stage 2 in the worker: merge every partition's partials per scope, evaluate, deliver.

    The partials topic is keyed by scope, so each worker's stage 2 owns whole scopes; watermark
    heartbeats reach every partition of it. Offsets are committed only below the oldest partial
    of a minute not yet evaluated, and how far evaluation got is stored in ClickHouse, so a
    restart neither double counts a minute nor skips one.
    """

    def __init__(self, settings: Settings, calls: CallsConsumer, **kw: Any) -> None:
        super().__init__(**kw)
        self.settings = settings
        self.calls = calls
        self.kafka = settings.kafka
        self.pipeline: AlertPipeline | None = None
        self._consuming: asyncio.Task[None] | None = None
        """The consume loop's task (``on_stop`` cancels it before the consumer closes)."""
        self.consumer: AIOKafkaConsumer | None = None
        self._last_lag_check = 0.0
        self._last_commit = 0.0
        self._committed: dict[int, int] = {}
        self._pending_publish: list[Any] = []
        self._alerts_box = Outbox()
        """Alert state changes for ``llm.alerts`` the broker has not taken yet (a failed step's)."""
        self.errors = 0
        self.cpu_s = 0.0
        """This thread's CPU in stage 2's own work (the awaits excluded, so stage 1 is not counted)."""
        self.partials_read = 0

    async def on_start(self) -> None:
        await self.calls.ready.wait()
        assert self.calls.conn is not None
        opts = client_options(self.kafka)
        self.consumer = AIOKafkaConsumer(
            self.kafka.topics.partials,
            group_id=f"{self.kafka.consumer_group}-alerts",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **opts,
        )
        await self.consumer.start()
        assert self.calls.producer is not None
        sources = await self.calls.producer.partitions_for(self.kafka.topics.calls)
        self.pipeline = AlertPipeline(
            self.settings,
            self.calls.conn,
            rules=self.calls.rules,
            sources=sorted(sources),
            publish=self._pending_publish.extend,
            progress_key=self.kafka.consumer_group,
            metrics=self.calls.metrics,
        )
        # restored at the first assignment (``AlertPipeline.assign``): only the scopes this worker owns

    async def on_stop(self) -> None:
        await _cancel_loop(self._consuming, STOP_CLIENT_S)
        if self.consumer is not None:
            await stop_consumer(self.consumer, STOP_CLIENT_S)
        if self.pipeline is not None:
            log.info(
                "stage 2 (alert evaluation): %.3f s CPU for %d partials, %d rule windows, %d late partials",
                self.cpu_s, self.partials_read, self.pipeline.windows.evaluated_windows,
                self.pipeline.stage2.late_partials,
            )  # fmt: skip
            self.pipeline.close()

    @mode.Service.task
    async def _consume(self) -> None:
        self._consuming = asyncio.current_task()
        while not self.should_stop and (self.consumer is None or self.pipeline is None):
            await asyncio.sleep(0.05)
        assert self.consumer is not None and self.pipeline is not None
        stage2 = self.pipeline.stage2
        last_offsets: dict[int, int] = {}
        while not self.should_stop:
            try:
                await self._step(stage2, last_offsets)
            except Exception:  # alerting must never take ingestion down with it
                self.errors += 1
                log.exception("alert evaluation failed; continuing")
                await asyncio.sleep(1.0)

    def _save_progress(self) -> float:
        """On the insert thread: saves how far evaluation got; returns that thread's CPU for it."""
        assert self.pipeline is not None
        began = time.thread_time()
        self.pipeline.save_progress()
        return time.thread_time() - began

    async def _step(self, stage2: Stage2, last_offsets: dict[int, int]) -> None:
        assert self.consumer is not None and self.pipeline is not None
        records = await self.consumer.getmany(timeout_ms=100, max_records=5000)
        began = time.thread_time()
        assigned = {tp.partition for tp in self.consumer.assignment()}
        if stage2.inputs != assigned:  # started, or rebalanced: the scopes this worker owns changed
            assert self.calls.producer is not None
            try:
                partitions = len(await self.calls.producer.partitions_for(self.kafka.topics.partials))
                began_assign = time.perf_counter()
                await asyncio.to_thread(
                    self.pipeline.assign, assigned, functools.partial(partition_of, partitions=partitions)
                )
            except Exception:
                # nothing changed (assign reads before it changes anything); what this step fetched
                # is read again after the retry, not skipped
                for tp, messages in records.items():
                    if messages and tp in self.consumer.assignment():
                        self.consumer.seek(tp, messages[0].offset)
                raise
            log.info(
                "stage 2 assigned partials partitions %s in %.3f s",
                sorted(assigned),
                time.perf_counter() - began_assign,
            )
            began = time.thread_time()
        for gone in [p for p in last_offsets if p not in assigned]:
            del last_offsets[gone]  # committing a partition no longer assigned fails the whole commit
            self._committed.pop(gone, None)
        late = stage2.late_partials
        records = {tp: ms for tp, ms in records.items() if tp.partition in assigned}
        read = self.pipeline.on_wire((tp.partition, m.offset, m.value) for tp, ms in records.items() for m in ms)
        for tp, messages in records.items():
            last_offsets[tp.partition] = messages[-1].offset + 1
        self.pipeline.evaluate()
        now = time.time()
        if now - self._last_lag_check >= self.settings.alerting.lag_check_interval:
            self._last_lag_check = now
            self.pipeline.check_lag(now)
        spent = time.thread_time() - began
        self.cpu_s += spent
        self.partials_read += read
        self.calls.metrics.alert_cpu.inc(spent)
        self.calls.metrics.alert_partials.inc(read)
        if stage2.late_partials > late:
            self.calls.metrics.alert_late_partials.inc(stage2.late_partials - late)
        publisher = self.calls.publisher
        if self._pending_publish and publisher is not None:
            events, self._pending_publish[:] = list(self._pending_publish), []
            publisher.outbox(alerts=events, into=self._alerts_box)
        if self._alerts_box and publisher is not None:  # what failed before goes first, and only that
            failure = await _send_round(publisher, self._alerts_box, self.calls.metrics, "alert records")
            if failure is not None:  # kept for the next step: evaluation, progress and commits go on
                log.warning(
                    "%d alert record(s) not published yet; sent again next step: %s", len(self._alerts_box), failure
                )
        began = time.thread_time()
        pinned = stage2.pinned_offsets()
        target = {p: min(o, pinned.get(p, o)) for p, o in last_offsets.items()}
        spent = time.thread_time() - began
        self.cpu_s += spent
        self.calls.metrics.alert_cpu.inc(spent)
        due = self.pipeline.progress_due()
        # compared as committed: the pins (open rule windows) hold a commit still for minutes, and
        # an idle stage 2 would otherwise commit the same offsets on every empty fetch
        if (target != self._committed or due) and (
            not records or time.monotonic() - self._last_commit >= COMMIT_INTERVAL_S
        ):
            # progress first, then offsets: a commit never passes partials of a minute whose
            # evaluation is not on record. Busy, at most once a second (a commit per getmany was a
            # broker round trip each); idle, at once, so a caught-up stage 2 shows no lag.
            self._last_commit = time.monotonic()
            saving = await asyncio.to_thread(self._save_progress) if due else 0.0
            self.cpu_s += saving
            self.calls.metrics.alert_cpu.inc(saving)
            if target != self._committed:
                commit = {
                    TopicPartition(self.kafka.topics.partials, p): OffsetAndMetadata(o, "") for p, o in target.items()
                }
                # a rebalance under this step: the next owner reads from the last commit, and the
                # saved progress keeps its evaluations from repeating
                if await _commit(self.consumer, commit, "partials"):
                    self._committed = target


async def _commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata], what: str) -> bool:
    """Commit, or log that the group rebalanced under the step (a member joined or left: a worker
    restarted while the killed one's session runs out) and carry on; the rebalance hands the
    partitions out again. Raising here crashed the whole worker."""
    try:
        await consumer.commit(offsets)
    except (CommitFailedError, IllegalStateError) as exc:  # IllegalState: no longer assigned
        log.warning("%s offsets %s not committed: the group rebalanced (%s)", what,
                    {tp.partition: m.offset for tp, m in offsets.items()}, type(exc).__name__)  # fmt: skip
        return False
    return True


def log_thread_crashes() -> None:
    """A thread's uncaught exception as one log record. mode hands stderr to the log one write at
    a time, so the default hook's traceback became a hundred one-character lines (faust's consumer
    thread ends that way when the broker is gone at a stop)."""

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        log.warning("thread %s ended with %r", name, args.exc_value,
                    exc_info=(args.exc_type, args.exc_value, args.exc_traceback))  # fmt: skip

    threading.excepthook = hook


def build_app(settings: Settings, *, app_id: str = "llmpulse") -> tuple[faust.App, CallsConsumer]:
    """The faust app: the batch consumer and stage-2 alerting as services, the feedback agent, topics."""
    k = settings.kafka
    credentials: Any = None
    if k.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        credentials = faust.SASLCredentials(
            username=k.sasl_username,
            password=k.secret_sasl_password(),
            mechanism=k.sasl_mechanism or "PLAIN",
            ssl_context=client_options(k).get("ssl_context"),
        )
    elif k.security_protocol == "SSL":
        credentials = faust.SSLCredentials(client_options(k)["ssl_context"])
    app = faust.App(
        f"{app_id}-{k.consumer_group}",
        broker=[f"kafka://{host}" for host in k.bootstrap_servers.split(",")],
        broker_credentials=credentials,
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        topic_disable_leader=True,
        datadir=str(settings.data_dir / "faust"),
        consumer_auto_offset_reset="earliest",
        # a SIGKILLed worker's membership must expire as fast in faust's group as in ours, or a
        # restart waits on faust (its default is 60 s) before the hot consumer even starts
        broker_session_timeout=k.session_timeout,
        broker_heartbeat_interval=max(1.0, k.session_timeout / 10),
    )
    # faust's own consumer (the quality agents') runs in a mode ServiceThread; with the broker
    # unreachable its aiokafka consumer is slow to stop (a fetch retrying, a group to leave), and
    # mode waits up to the class's 60 s for the thread: docker-compose's whole grace period
    AIOKafkaConsumerThread.shutdown_timeout = 2 * STOP_CLIENT_S
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    rules = rules_for(settings)
    consumer = CallsConsumer(settings, rules=rules)
    services: list[mode.Service] = [consumer]
    if settings.alerting.enabled:
        services.append(AlertsConsumer(settings, consumer))

    class WorkerServices(mode.Service):
        """faust instantiates @app.service classes itself; this hands it our configured instances."""

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            for service in services:
                self.add_dependency(service)

    app.service(WorkerServices)
    _quality_agent(app, settings, consumer, "feedback")
    _quality_agent(app, settings, consumer, "judge_result")
    _relink_timer(app, consumer)
    return app, consumer


def _relink_timer(app: faust.App, calls: CallsConsumer) -> None:
    """Feedback written before its call (``wait_for_calls`` waits a minute at most; another worker's
    partition is not waited for at all) is linked once the call is there (``sinks.relink``). One
    worker of the group does it, the one holding partition 0 of the calls topic: two rebuilding
    the same rollup cells at once could count rows twice."""

    async def relink() -> None:
        if 0 not in calls.partitions or calls.conn is None or calls.should_stop:
            return
        now = time.time()
        try:
            outcome = await asyncio.to_thread(relink_feedback, calls.conn, now - RELINK_LOOKBACK_S, now)
        except Exception:
            log.exception("linking feedback written before its calls failed; tried again in %.0f s", RELINK_EVERY_S)
            return
        if outcome.linked:
            log.info("linked %d feedback row(s) written before their calls (%d still without one)",
                     outcome.linked, outcome.unlinked - outcome.linked)  # fmt: skip

    app.timer(interval=RELINK_EVERY_S, name="llmpulse.relink_feedback")(relink)


def _quality_agent(app: faust.App, settings: Settings, calls: CallsConsumer, kind: str) -> None:
    """Feedback and judge verdicts are low-volume: idiomatic faust agents, batched, through the
    same sink. Once a batch is durable it feeds the alert rules (eval score, thumbs-down rate)
    and, for a thumbs-down on a call nobody sampled, asks the judge to look at that call."""
    topics = settings.kafka.topics
    name = topics.feedback if kind == "feedback" else topics.judge_results
    topic = app.topic(name, value_type=bytes, key_type=bytes)
    limits = validation_limits(settings)
    pipeline = FeedbackPipeline(limits) if kind == "feedback" else JudgeResultPipeline(limits)
    window_s = int(settings.pipeline.window)

    async def until_done(what: str, step: Callable[[], Awaitable[T]], given_up: T, durable: bool = False) -> T:
        """Each step of a batch, retried with backoff while it fails for a passing reason (ClickHouse
        or the broker unreachable): faust's ``take_events`` acks the batch however ``handle`` ends,
        so a step that raised would lose its outputs for good. A retried step runs alone, after
        the steps before it succeeded, and a send retries only the messages the broker did not
        take (``send``), so nothing is sent twice.
        A failure retrying cannot mend (a message over the broker's size limit, a bug), or any
        failure once the worker is stopping, is logged and the step given up (``given_up``): a
        loop here would hold faust's rebalances and the stop, and resend the same messages.
        ``durable``: the batch's own rows, retried on every ``SinkError`` until they are written
        (anything else raises): faust acks the messages only once they are."""
        delay = 0.5
        while True:
            try:
                return await step()
            except Exception as exc:
                if isinstance(exc, SinkError):
                    calls.metrics.insert_errors.inc()
                if durable:
                    if not isinstance(exc, SinkError):
                        raise
                elif not _passing(exc) or calls.should_stop:
                    log.exception("%s of %s failed; given up (its outputs are lost): %s", what, name, exc)
                    return given_up
                log.error("%s of %s failed; retrying in %.1fs: %s", what, name, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def write(processed: list[Any], token: str) -> None:
        sink = calls.sink
        assert sink is not None
        writer = sink.write_feedback if kind == "feedback" else sink.write_judge_results
        await until_done("ClickHouse write", lambda: asyncio.to_thread(writer, processed, token), None, durable=True)

    async def send(what: str, box: Outbox) -> None:
        publisher = calls.publisher
        assert publisher is not None

        async def step() -> None:
            failure = await _send_round(publisher, box, calls.metrics, f"{what} of {name}")
            if failure is not None:
                raise failure

        await until_done(what, step, None)
        if box:  # given up when the worker stopped
            calls.metrics.dropped.labels("kafka_outputs").inc(len(box))

    async def wait_for_calls(processed: list[Any]) -> None:
        """Feedback names its call by request id, and the call's lineage (feature, model, release)
        is copied in when the feedback is written: written before its call, it stayed linked to
        nothing for good. After downtime both wait on the broker, and this agent, starting first
        with little to do, wrote first. So while some calls are unknown and this worker's calls
        up to the feedback's time are not all written, wait (at most ``LINK_WAIT_S``). A call
        that never came costs one look; live, the wait is the calls' batch interval."""
        sink = calls.sink
        ids = {e.request_id for b in processed for e in b.events if e.request_id}
        if sink is None or not ids:
            return
        stamps = [t for b in processed for t in b.ts]
        span, newest = recent_span(stamps), max(stamps)
        deadline = time.monotonic() + LINK_WAIT_S
        known: dict[str, Any] = {}
        while not calls.should_stop and time.monotonic() < deadline:
            try:
                known = await asyncio.to_thread(sink.lineage, ids, span)
            except Exception:  # the write reports (and retries) ClickHouse failures
                return
            if len(known) == len(ids) or calls.calls_written_through(newest):
                return
            await asyncio.sleep(0.5)
        log.warning("feedback on %d call(s) not written yet after %.0f s: written without their lineage",
                    len(ids - set(known)), LINK_WAIT_S)  # fmt: skip

    async def handle(events: list[Any]) -> None:
        await calls.ready.wait()
        by_partition: dict[int, PayloadBatch] = {}
        for event in events:
            m = event.message
            batch = by_partition.setdefault(m.partition, PayloadBatch(Source("kafka", name, m.partition), [], []))
            batch.payloads.append(event.value if isinstance(event.value, bytes) else bytes(event.value or b""))
            batch.offsets.append(m.offset)
        processed = [pipeline.process(b, time.time()) for b in by_partition.values()]
        token = ";".join(f"{b.source.partition}:{b.offsets[0]}-{b.offsets[-1]}" for b in by_partition.values())
        if kind == "feedback":  # verdicts come from judge requests, sent once their calls were written
            await wait_for_calls(processed)
        await write(processed, f"{kind}:{name}:{token}")
        publisher, sink = calls.publisher, calls.sink
        assert publisher is not None and sink is not None
        dead = [d for b in processed for d in b.dead]
        if dead:
            await send("publishing dead letters", publisher.outbox(dead=dead))
        if isinstance(pipeline, FeedbackPipeline):
            flagged = [r for b in processed for r in thumbs_down_requests(b.events)]
            if flagged:
                span = recent_span(t for b in processed for t in b.ts)
                try:  # once: it charges the judge budgets before it writes, so a retry would charge again
                    fresh = await asyncio.to_thread(sink.sample_flagged, flagged, calls.judge_samplers(), span=span)
                except Exception:
                    log.exception("sampling %d flagged call(s) failed; they are not sent to the judge", len(flagged))
                    fresh = []
                requests = await until_done("reading flagged calls", lambda: asyncio.to_thread(
                    sink.sampled_requests, fresh, span), [])  # fmt: skip
                if requests:
                    await send("publishing judge requests", publisher.outbox(judge=requests))
            quality = [p for b in processed for p in feedback_partials(b.events, b.lineage, window_s)]
        else:
            quality = [p for b in processed for p in judge_partials(b.events, b.lineage, window_s)]
        box = publisher.outbox(partials=[(quality, QUALITY_SOURCE, None)], scopes=calls.scopes)
        await send("publishing quality partials", box)

    async def agent(stream: Any) -> None:
        async for events in stream.take_events(2000, within=1.0):
            await handle(events)

    agent.__name__ = f"{kind}_agent"
    app.agent(topic, name=f"llmpulse.{kind}")(agent)
