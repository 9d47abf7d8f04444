"""PayloadBatch.split: the runtimes process big batches in cache-sized parts."""

from __future__ import annotations

import pytest

from processors.records import PayloadBatch, Source

SRC = Source("kafka", "llm.calls", 3)


def kafka_batch(offsets: list[int], end: int) -> PayloadBatch:
    return PayloadBatch(SRC, [f"p{o}".encode() for o in offsets], offsets, "d", end)


def test_parts_keep_order_and_cover_up_to_the_next_parts_first_offset() -> None:
    offsets = [10, 11, 13, 14, 15, 20, 21]  # gaps: messages skipped as already written
    parts = kafka_batch(offsets, end=25).split(3)  # 7 payloads, at most 3 a part: 2, 2, 3
    assert [p.offsets for p in parts] == [[10, 11], [13, 14], [15, 20, 21]]
    assert [p.payloads for p in parts] == [[b"p10", b"p11"], [b"p13", b"p14"], [b"p15", b"p20", b"p21"]]
    assert [p.end_offset for p in parts] == [13, 15, 25]  # the last part commits what the batch would
    assert [len(p) for p in kafka_batch(list(range(5000)), end=5000).split(2048)] == [1666, 1667, 1667]
    assert {(p.source, p.digest) for p in parts} == {(SRC, "d")}


def test_cut_at_the_same_places_every_time_so_block_ids_repeat() -> None:
    ids = [p.block_id for p in kafka_batch(list(range(100, 110)), end=110).split(4)]
    again = [p.block_id for p in kafka_batch(list(range(100, 110)), end=110).split(4)]
    assert ids == again
    assert len(set(ids)) == 3


def test_a_batch_that_fits_is_itself_and_an_uncommittable_source_stays_so() -> None:
    batch = kafka_batch([1, 2], end=3)
    assert batch.split(2) == [batch] and batch.split(2)[0] is batch
    file = PayloadBatch(Source("file", "x.jsonl"), [b"a", b"b", b"c"], [1, 2, 3])
    assert [p.end_offset for p in file.split(2)] == [-1, -1]
    with pytest.raises(ValueError):
        file.split(0)
