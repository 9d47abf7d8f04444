"""Streaming percentiles within the sketch's stated error against exact ones."""

from __future__ import annotations

import random

import pytest

from processors.sketch import QuantileSketch


def exact(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[round(q * (len(s) - 1))]


def rel_err(got: float | None, want: float) -> float:
    assert got is not None
    return abs(got - want) / want


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quantiles_within_stated_error(seed: int) -> None:
    rng = random.Random(seed)
    values = [rng.lognormvariate(6.5, 0.8) for _ in range(20_000)]
    sketch = QuantileSketch()
    for v in values:
        sketch.add(v)
    assert sketch.count == 20_000
    assert rel_err(sketch.quantile(0.5), exact(values, 0.5)) <= 0.01
    assert rel_err(sketch.quantile(0.95), exact(values, 0.95)) <= 0.01
    assert rel_err(sketch.quantile(0.99), exact(values, 0.99)) <= 0.02


def test_merged_partials_stay_within_error() -> None:
    """Stage 2 merges partials of many partitions and windows: the error must not compound."""
    rng = random.Random(42)
    values: list[float] = []
    merged = QuantileSketch()
    for part in range(16):
        sketch = QuantileSketch()
        chunk = [rng.lognormvariate(6 + part % 3 * 0.2, 0.6) for _ in range(1_000)]
        sketch.extend(chunk)
        values.extend(chunk)
        merged.merge(QuantileSketch.from_bytes(sketch.to_bytes()))  # through the wire form
    assert merged.count == 16_000
    for q, tol in ((0.5, 0.01), (0.95, 0.01), (0.99, 0.02)):
        assert rel_err(merged.quantile(q), exact(values, q)) <= tol


def test_empty_sketch_has_no_quantile() -> None:
    assert QuantileSketch().quantile(0.5) is None
    empty = QuantileSketch()
    empty.merge(QuantileSketch())
    assert empty.count == 0


def test_small_sketches_merge_without_a_digest() -> None:
    a, b = QuantileSketch(), QuantileSketch()
    a.extend([1.0, 2.0])
    b.extend([3.0])
    a.merge(b)
    assert a.count == 3
    assert a.quantile(0.5) == pytest.approx(2.0)


def test_a_sketch_read_back_from_quantiles_weighs_by_its_calls() -> None:
    """A rollup's 100 quantiles of a window stand for its calls: merged, the busier window dominates."""
    points = [(k + 0.5) / 100 for k in range(100)]
    quiet = QuantileSketch.from_quantiles([100 * p for p in points], 100)  # 0..100
    busy = QuantileSketch.from_quantiles([1000 + 100 * p for p in points], 900)  # 1000..1100
    assert quiet.count == 100 and busy.count == 900
    assert abs(quiet.quantile(0.5) - 50) <= 1  # type: ignore[operator]
    quiet.merge(busy)
    assert quiet.count == 1000
    assert 1000 <= quiet.quantile(0.5) <= 1100  # type: ignore[operator]  # 90% of the calls are there
    assert quiet.quantile(0.05) < 100  # type: ignore[operator]
    assert QuantileSketch.from_quantiles([], 10).count == 0
