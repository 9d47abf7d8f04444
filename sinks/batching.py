"""BufferedWriter: turn many small processed batches into few large, idempotent inserts.

ClickHouse wants big, infrequent inserts (every insert makes a part; thousands of tiny parts
make merges fall behind). The writer flushes when the buffer holds ``max_rows`` rows or its
oldest batch is ``max_seconds`` old. The insert's deduplication token is derived from the
ids of the blocks it contains, so the same blocks flushed again (a retry, a replay) dedupe.

Inserts run on one background thread: chDB and the HTTP client release the GIL while
ClickHouse parses and writes, so the next batch is decoded and aggregated on the other core
meanwhile. At most one insert is in flight and one buffer fills behind it — that is the
backpressure: a slow ClickHouse slows intake instead of growing memory. Blocks are written in
order, and ``written`` tells the caller (the Kafka worker) which blocks are durable, so it
commits only those.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import xxhash

from processors.chain import ProcessedCalls, ProcessedFeedback, ProcessedJudgeResults
from sinks.clickhouse import ClickHouseSink, SinkError


def insert_token(block_ids: list[str]) -> str:
    """The parts of one input batch carry the batch's id (``EmbeddedRuntime.ingest``), and count
    once: a batch processed in parts gets the token it got in one piece."""
    ids = [k for k, _ in itertools.groupby(block_ids)]
    if len(ids) == 1:
        return ids[0]
    return "blocks:" + xxhash.xxh3_128_hexdigest("\n".join(ids).encode())


@dataclass
class Block:
    """One insert's worth of batches."""

    calls: list[ProcessedCalls] = field(default_factory=list)
    feedback: list[ProcessedFeedback] = field(default_factory=list)
    judge_results: list[ProcessedJudgeResults] = field(default_factory=list)
    rows: int = 0

    def write(self, sink: ClickHouseSink) -> Block:
        """Calls first: feedback and judge scores look their calls up (a batch may carry both)."""
        if self.calls:
            sink.write(self.calls, insert_token([b.block_id for b in self.calls]))
        if self.feedback:
            sink.write_feedback(self.feedback, insert_token([b.block_id for b in self.feedback]))
        if self.judge_results:
            sink.write_judge_results(self.judge_results, insert_token([b.block_id for b in self.judge_results]))
        return self

    def __bool__(self) -> bool:
        return bool(self.calls or self.feedback or self.judge_results)


class BufferedWriter:
    def __init__(
        self,
        sink: ClickHouseSink,
        max_rows: int = 50_000,
        max_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
        on_written: Callable[[Block], None] | None = None,
    ) -> None:
        self.sink = sink
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self._clock = clock
        self._buffer = Block()
        self._since: float | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="llmpulse-insert") if background else None
        self._inflight: Future[Block] | None = None
        self._inflight_block: Block | None = None
        self._lock = threading.Lock()
        self._abandoned = False
        self.failed: Block | None = None
        """The block whose insert raised, kept so the caller can ``retry`` it."""
        self._on_written = on_written
        self._together = 0

    @property
    def pending_rows(self) -> int:
        return self._buffer.rows

    @property
    def unwritten_rows(self) -> int:
        """Rows held in memory until ClickHouse has them: the buffer, the insert in flight and a
        failed block. What an outage can grow, so the worker exports it."""
        held = self._buffer.rows
        if self._inflight_block is not None:
            held += self._inflight_block.rows
        if self.failed is not None:
            held += self.failed.rows
        return held

    def add_calls(self, batch: ProcessedCalls) -> None:
        if batch.events:
            self.sink.encode_calls(batch)  # now, while the batch is hot in cache, not at flush
        self._buffer.calls.append(batch)
        self._added(len(batch.events) + len(batch.dead))

    def add_feedback(self, batch: ProcessedFeedback) -> None:
        self._buffer.feedback.append(batch)
        self._added(len(batch.events) + len(batch.dead))

    def add_judge_results(self, batch: ProcessedJudgeResults) -> None:
        self._buffer.judge_results.append(batch)
        self._added(len(batch.events) + len(batch.dead))

    def _added(self, rows: int) -> None:
        """Adding never raises: a processed batch is always handed over whole.

        A full buffer starts the next insert once the one in flight is durable. If that one
        failed, it waits in ``failed`` and nothing newer is written before it (blocks stay in
        order, so a commit can never pass an unwritten block); the buffer keeps filling until
        the owner calls ``flush``, which retries the failed block first and raises while it
        still fails — that is where the owner backs off and stops reading.
        """
        self._buffer.rows += rows
        if self._since is None:
            self._since = self._clock()
        self._flush_if_full()

    def _flush_if_full(self) -> None:
        if self._buffer.rows >= self.max_rows and self.failed is None and not self._together:
            with contextlib.suppress(SinkError):
                self.flush(wait=False)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Batches added inside go into one insert: a full buffer waits for the end of the group.

        The parts of one input batch (``EmbeddedRuntime.ingest``) share its block id, so a flush
        between them would give two inserts one token, and ClickHouse would drop the second."""
        self._together += 1
        try:
            yield
        finally:
            self._together -= 1
            self._flush_if_full()

    def due(self) -> bool:
        return self._since is not None and self._clock() - self._since >= self.max_seconds

    def _collect(self) -> None:
        """Wait for the insert in flight; re-raises its SinkError (the block goes to ``failed``)."""
        inflight, self._inflight = self._inflight, None
        block, self._inflight_block = self._inflight_block, None
        if inflight is None:
            return
        try:
            inflight.result()
        except BaseException:
            self.failed = block
            raise
        self._done(block)

    def poll(self) -> None:
        """Collect a finished insert without waiting (so its block is reported durable promptly)."""
        if self._inflight is not None and self._inflight.done():
            self._collect()

    def _done(self, block: Block | None) -> None:
        if block is None:
            return
        for b in block.calls:
            b.columns = None  # durable: the encoded copy (~200 B a row) is not needed any more
        if self._on_written is not None:
            self._on_written(block)

    def flush(self, wait: bool = True) -> None:
        """Start writing the buffer; ``wait`` also waits until everything is durable.

        A block that failed earlier is written first (synchronously), so blocks land in order.
        """
        self._collect()
        if self.failed is not None:
            self.retry_failed()
        with self._lock:  # against ``abandon`` on another thread: take the buffer, or leave it
            if self._abandoned:
                return
            block, self._buffer, self._since = self._buffer, Block(), None
            if block and self._pool is not None:
                self._inflight_block = block
                self._inflight = self._pool.submit(block.write, self.sink)
        if block and self._pool is None:
            self._write_now(block)
        if wait:
            self._collect()

    def _write_now(self, block: Block) -> None:
        try:
            block.write(self.sink)
        except BaseException:
            self.failed = block
            raise
        self._done(block)

    def retry_failed(self) -> None:
        """Write the failed block again (same token: whatever part of it landed dedupes)."""
        with self._lock:
            if self._abandoned:
                return
            block, self.failed = self.failed, None
        if block is not None:
            self._write_now(block)

    def close(self) -> None:
        try:
            self.flush(wait=True)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def abandon(self) -> None:
        """Stop without writing what is buffered, now or later (a flush still running on another
        thread takes nothing more); an insert already under way ends. For a stop cut short: those
        rows' offsets are not committed, so the next owner reads them again and publishes their
        outputs; written here, it would skip them and their outputs with them."""
        with self._lock:
            self._abandoned = True
            self._buffer, self._since, self.failed = Block(), None, None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
