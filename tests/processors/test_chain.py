"""The chain over a batch processed in parts (``PayloadBatch.split``), as both runtimes do."""

from __future__ import annotations

import orjson

from processors.chain import CallPipeline, PipelineOptions
from processors.records import PayloadBatch, Source
from schemas.prices import builtin_price_table
from tests.conftest import NOW, call, iso


def _batch() -> PayloadBatch:
    """Six calls; the fourth is 200 s older than the first three, so past the 120 s lateness
    behind them but not behind anything before this batch."""
    times = [NOW, NOW + 1, NOW + 2, NOW - 200, NOW + 3, NOW + 4]
    payloads = [orjson.dumps(call(event_id=f"e{i}", ts=iso(t))) for i, t in enumerate(times)]
    return PayloadBatch(Source("kafka", "llm.calls", 0), payloads, list(range(6)), end_offset=6)


def _run(parts: list[PayloadBatch]) -> tuple[int, dict[float, int], float]:
    pipeline = CallPipeline(builtin_price_table(), PipelineOptions(window_s=60, lateness_s=120))
    late = 0
    closed = []
    for part in parts:
        out = pipeline.process(part, NOW)
        late += out.counters.late
        closed += out.partials
    calls: dict[float, int] = {}
    for p in closed + pipeline.flush_windows():
        calls[p.window_start] = calls.get(p.window_start, 0) + p.calls
    return late, calls, pipeline.windows.watermark


def test_a_batch_in_parts_is_windowed_as_the_batch_whole() -> None:
    """Each part used to move the watermark: the fourth call, in the second part, was late against
    windows the first part had closed, though nothing before its own batch was ahead of it.
    Now only the last part moves it, so the parts change nothing."""
    whole = _run([_batch()])
    parts = _batch().split(3)
    assert [len(p) for p in parts] == [3, 3]
    assert [p.closes_windows for p in parts] == [False, True]
    assert _run(parts) == whole
    late, calls, watermark = whole
    assert late == 0 and sum(calls.values()) == 6 and watermark == NOW + 4 - 120


def test_a_last_part_without_calls_still_moves_the_watermark() -> None:
    """The last part may hold only dead letters: it still closes what the batch's calls closed."""
    batch = _batch()
    batch.payloads[3:] = [b"not json", b"{}", b"[]"]
    first, last = batch.split(3)
    pipeline = CallPipeline(builtin_price_table(), PipelineOptions(window_s=60, lateness_s=120))
    pipeline.process(first, NOW)
    assert pipeline.windows.watermark == float("-inf")
    out = pipeline.process(last, NOW)
    assert out.counters.accepted == 0 and pipeline.windows.watermark == NOW + 2 - 120
