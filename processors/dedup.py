"""DropDuplicateEvents: the same event_id twice within a bounded horizon counts once.

Raw rows deduplicate by event_id in ClickHouse (ReplacingMergeTree), but the rollup views
fire on insert, so a client that re-sends an event would be counted twice there. This step
remembers 64-bit hashes of recent ids in two generations of bounded sets: memory stays
fixed, and an id is remembered for at least ``capacity`` further events.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import xxhash

from processors.validate import Decoded
from schemas.wire import WireCall, WireFeedback, WireJudgeResult

T = TypeVar("T", WireCall, WireFeedback, WireJudgeResult)


class DropDuplicateEvents:
    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self._current: set[int] = set()
        self._previous: set[int] = set()

    def remember(self, ids: Iterable[str]) -> int:
        """Ids already written (read back after a crash): a client re-sending them is deduplicated."""
        h = xxhash.xxh3_64_intdigest
        n = 0
        for eid in ids:
            self._current.add(h(eid.encode()))
            n += 1
            if len(self._current) >= self.capacity:
                self._previous, self._current = self._current, set()
        return n

    def __call__(self, decoded: Decoded[T]) -> int:
        """Removes repeats from ``decoded`` in place and returns how many there were."""
        h = xxhash.xxh3_64_intdigest
        current, previous = self._current, self._previous
        keep: list[int] = []
        for i, e in enumerate(decoded.events):
            eid = e.event_id
            if eid is None:
                keep.append(i)
                continue
            key = h(eid.encode())
            if key in current or key in previous:
                continue
            current.add(key)
            keep.append(i)
        dropped = len(decoded.events) - len(keep)
        if dropped:
            decoded.events = [decoded.events[i] for i in keep]
            decoded.offsets = [decoded.offsets[i] for i in keep]
            decoded.ts = [decoded.ts[i] for i in keep]
        if len(current) >= self.capacity:
            self._previous, self._current = current, set()
        return dropped
