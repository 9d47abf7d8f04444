"""QuantileSketch: the mergeable latency/TTFT sketch behind every streaming percentile.

A t-digest (fastdigest, Rust, ~11M updates/s here) with 300 centroids: measured on
lognormal latencies it stays within 1% relative of the exact p50/p95 and 2% of p99 at 10k+
samples, also after merging partials from many partitions (``tests/processors/test_sketch.py``
asserts it). Values are buffered and folded in per batch, because one ``batch_update`` call
costs a fraction of per-value calls.
"""

from __future__ import annotations

import array
import struct
import sys

import fastdigest

CENTROIDS = 300
"""Stated error: ≤1% relative at p50/p95, ≤2% at p99, for ≥10k samples."""


_RAW_MAX = 256
"""Up to this many values a sketch is serialized as the values themselves."""

_LITTLE = sys.byteorder == "little"
"""The wire form is little-endian doubles: the machine's own on every platform llmpulse runs on."""

_FOLD_AT = 4096
"""Buffered values are folded into the digest at this many (bounds memory per hot key)."""


class QuantileSketch:
    __slots__ = ("_digest", "_pending")

    def __init__(self, digest: fastdigest.TDigest | None = None) -> None:
        self._digest = digest
        """Created on first fold: most (window, key) cells are small and short-lived."""
        self._pending: list[float] = []

    def add(self, value: float) -> None:
        pending = self._pending
        pending.append(value)
        if len(pending) >= _FOLD_AT:
            self._fold()

    def extend(self, values: list[float]) -> None:
        self._pending.extend(values)
        if len(self._pending) >= _FOLD_AT:
            self._fold()

    def _fold(self) -> fastdigest.TDigest:
        digest = self._digest
        if digest is None:
            digest = self._digest = fastdigest.TDigest(max_centroids=CENTROIDS)
        if self._pending:
            digest.batch_update(self._pending)
            self._pending = []
        return digest

    def compact(self) -> None:
        """Fold buffered values into the digest now (a sketch kept for long, not a hot cell)."""
        if self._pending:
            self._fold()

    @property
    def count(self) -> int:
        folded = 0 if self._digest is None else int(self._digest.n_values)
        return folded + len(self._pending)

    def quantile(self, q: float) -> float | None:
        if self._digest is None and len(self._pending) <= _RAW_MAX:
            # a small cell is answered exactly from its values: cheaper than building a digest
            if not self._pending:
                return None
            values = self._pending
            values.sort()  # in place: the next quantile of this window sorts a sorted list, in one pass
            pos = q * (len(values) - 1)
            lo = int(pos)
            hi = min(lo + 1, len(values) - 1)
            return values[lo] + (values[hi] - values[lo]) * (pos - lo)
        digest = self._fold()
        if digest.is_empty():
            return None
        return float(digest.quantile(q))

    def quantiles(self, qs: tuple[float, ...]) -> list[float | None]:
        return [self.quantile(q) for q in qs]

    def merge(self, other: QuantileSketch) -> None:
        if other._digest is None:
            self._pending.extend(other._pending)  # still raw values: no digest needed yet
            if len(self._pending) >= _FOLD_AT:
                self._fold()
            return
        other_digest = other._fold()
        if not other_digest.is_empty():
            self._fold().merge_inplace(other_digest)

    def to_bytes(self) -> bytes:
        """Compact wire form: a small cell travels as its raw values, a big one as its digest.

        Most (window, scope) cells of a quiet minute hold a handful of calls; a 300-centroid
        digest is several KB, eight bytes a value is not.
        """
        if self._digest is None and len(self._pending) <= _RAW_MAX:
            if _LITTLE:
                return b"v" + array.array("d", self._pending).tobytes()
            return b"v" + struct.pack(f"<{len(self._pending)}d", *self._pending)
        return b"t" + self._fold().to_bytes()

    @classmethod
    def from_quantiles(cls, points: list[float], count: float) -> QuantileSketch:
        """A sketch standing for ``count`` values known only by evenly spaced quantiles (a rollup's
        t-digest state read back): each point a centroid of equal weight, so windows merged from
        such sketches weigh by their calls, as live ones do."""
        if not points or count <= 0:
            return cls()
        weight = count / len(points)
        centroids = [{"m": float(p), "c": weight} for p in sorted(points)]
        return cls(fastdigest.TDigest.from_dict({"max_centroids": CENTROIDS, "centroids": centroids}))

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> QuantileSketch:
        """``data`` may be a memoryview into a larger message: raw values are read in place."""
        tag, body = bytes(data[:1]), data[1:]
        if tag == b"v":
            sketch = cls()
            # stage 2 decodes three sketches per partial: a cast is a third cheaper than unpack
            if _LITTLE:
                sketch._pending = memoryview(body).cast("d").tolist()  # type: ignore[assignment]  # floats: "d"
            else:
                sketch._pending = list(struct.unpack(f"<{len(body) // 8}d", body))
            return sketch
        if tag == b"t":
            return cls(fastdigest.TDigest.from_bytes(bytes(body)))
        raise ValueError(f"not a serialized QuantileSketch (tag {tag!r})")
