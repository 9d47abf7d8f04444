"""The small typed records that travel between steps and out to the runtimes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class Source:
    """Where a batch came from. ``partition`` is -1 outside Kafka."""

    kind: str
    """kafka | file | http | otlp | demo | sdk"""
    name: str
    """topic, file path, endpoint..."""
    partition: int = -1


@dataclass(slots=True)
class PayloadBatch:
    """Raw payloads with their positions in the source (Kafka offsets, file line numbers)."""

    source: Source
    payloads: list[bytes]
    offsets: list[int]
    digest: str = ""
    """Identifies the content where offsets alone do not (a file chunk's hash, a run id, an
    HTTP Idempotency-Key); part of the block id that deduplicates inserts."""
    end_offset: int = -1
    """One past the last source position this batch covers, including messages dropped before
    processing (already written ones): what may be committed once the batch is durable."""
    closes_windows: bool = True
    """False for every part of a split batch but the last (``split``): the windows move their
    watermark once per batch, so an event is late by the same rule whatever part it fell in."""

    def __post_init__(self) -> None:
        if len(self.payloads) != len(self.offsets):
            raise ValueError("every payload needs an offset")

    def __len__(self) -> int:
        return len(self.payloads)

    @property
    def block_id(self) -> str:
        return block_id(self.source, self.offsets, self.digest)

    def split(self, size: int) -> list[PayloadBatch]:
        """Consecutive parts of at most ``size`` payloads, as equal as can be (no small remainder
        paying a part's fixed costs), cut at the same places every time (so their block ids,
        hence insert tokens, are the same on a replay).

        Each part may be committed once durable: it covers up to the next part's first offset,
        the last part up to the batch's own ``end_offset`` (-1 stays -1: not a committable source).
        """
        if size < 1:
            raise ValueError("size must be positive")
        n = len(self.payloads)
        if n <= size:
            return [self]
        count = -(-n // size)
        bounds = [k * n // count for k in range(count + 1)]
        parts = []
        for start, stop in itertools.pairwise(bounds):
            end = self.end_offset if stop == n or self.end_offset < 0 else self.offsets[stop]
            parts.append(
                PayloadBatch(
                    self.source,
                    self.payloads[start:stop],
                    self.offsets[start:stop],
                    self.digest,
                    end,
                    closes_windows=self.closes_windows and stop == n,
                )
            )
        return parts


def block_id(source: Source, offsets: list[int], digest: str = "") -> str:
    """Deterministic identity of a block of input: same input, same id, in any process."""
    span = f"{offsets[0]}-{offsets[-1]}" if offsets else "empty"
    return f"{source.kind}:{source.name}:{source.partition}:{span}:{digest}"


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """A rejected payload, kept byte for byte with the reason it was rejected, for re-drive."""

    raw: bytes
    reason: str
    path: str
    """JSON path of the offending field (``$.input_tokens``), or ``$`` for the whole payload."""
    source: Source
    offset: int
    kind: str = "call"


@dataclass(slots=True)
class StepCounters:
    """Counts the runtimes export as metrics; additive so batches and workers can be summed."""

    received: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    late: int = 0
    price_missing: int = 0
    usage_unknown: int = 0
    client_cost: int = 0
    unknown_fields: int = 0
    sampled: int = 0
    unknown_models: dict[str, int] = field(default_factory=dict)

    def add(self, other: StepCounters) -> None:
        self.received += other.received
        self.accepted += other.accepted
        self.rejected += other.rejected
        self.duplicates += other.duplicates
        self.late += other.late
        self.price_missing += other.price_missing
        self.usage_unknown += other.usage_unknown
        self.client_cost += other.client_cost
        self.unknown_fields += other.unknown_fields
        self.sampled += other.sampled
        for model, n in other.unknown_models.items():
            self.unknown_models[model] = self.unknown_models.get(model, 0) + n
