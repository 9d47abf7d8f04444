"""Drift: does a window of traffic still look like its baseline?

Pure functions over summaries the rollups can produce, so ``llmpulse drift`` (and the weekly
review) can compare any window with any baseline without reading raw rows: scalar metrics
compared with a noise-aware test, the output-length distribution compared with the population
stability index (PSI), and the model versions that actually served the traffic.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from processors.sketch import QuantileSketch
from processors.stats import clamped_rate

PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.2
"""The customary PSI reading: under 0.1 no shift, 0.1-0.2 a moderate one, above 0.2 significant."""
PSI_BINS = 10
PSI_EPSILON = 1e-4
"""Floor for an empty bin's share: PSI divides by it and takes its log."""
MID_QUANTILES = tuple((k + 0.5) / 100 for k in range(100))
"""The evenly spaced quantiles PSI reads from a sketch (drift_by_model.sql asks the rollups for the same)."""


def psi(baseline_quantiles: Sequence[float], window_quantiles: Sequence[float], bins: int = PSI_BINS) -> float | None:
    """PSI of the window against the baseline, both given as evenly spaced quantiles.

    Bins are the baseline's ``bins``-iles (duplicates merged: output lengths are integers and
    often tie). Each distribution's share of a bin is the share of its quantile points that
    fall in it, so the result needs no raw rows: 100 quantiles of a t-digest state resolve
    shares to about 1%, well inside what separates the 0.1 and 0.2 readings.
    """
    if not baseline_quantiles or not window_quantiles:
        return None
    base = sorted(baseline_quantiles)
    n = len(base)
    edges = sorted({base[min(n - 1, round(n * k / bins))] for k in range(1, bins)})

    def shares(points: Sequence[float]) -> list[float]:
        counts = [0] * (len(edges) + 1)
        for p in points:
            counts[bisect_right(edges, p)] += 1
        total = len(points)
        return [max(c / total, PSI_EPSILON) for c in counts]

    b, w = shares(base), shares(window_quantiles)
    return sum((wi - bi) * math.log(wi / bi) for bi, wi in zip(b, w, strict=True))


def psi_reading(value: float | None) -> str:
    if value is None:
        return "no data"
    return "significant" if value >= PSI_SIGNIFICANT else "moderate" if value >= PSI_MODERATE else "stable"


@dataclass(frozen=True)
class Change:
    metric: str
    baseline: float | None
    window: float | None
    drifted: bool
    detail: str


def relative_change(metric: str, baseline: float | None, window: float | None, limit: float) -> Change:
    """A level (mean or p95 length) drifts when it moves more than ``limit`` of its baseline."""
    if baseline is None or window is None or baseline == 0:
        return Change(metric, baseline, window, False, "no data")
    change = (window - baseline) / baseline
    return Change(metric, baseline, window, abs(change) > limit, f"{change:+.1%}")


def rate_change(
    metric: str,
    baseline: float | None,
    window: float | None,
    n: float,
    min_delta: float,
    z: float = 3.0,
    n_baseline: float | None = None,
) -> Change:
    """A rate drifts when it moves by at least ``min_delta`` and by more than ``z`` standard errors:
    2% → 4% over 50 calls is noise, over 5,000 it is not. With ``n_baseline`` the error is the
    two-proportion one (the baseline is a sample too, and a small one is noisy); without it the
    baseline is taken as known."""
    if baseline is None or window is None or n <= 0:
        return Change(metric, baseline, window, False, "no data")
    if n_baseline:
        p = clamped_rate((baseline * n_baseline + window * n) / (n_baseline + n), n_baseline + n)
        se = math.sqrt(p * (1 - p) * (1 / n + 1 / n_baseline))
    else:
        p = clamped_rate(baseline, n)
        se = math.sqrt(p * (1 - p) / n)
    delta = window - baseline
    drifted = abs(delta) >= min_delta and abs(delta) > z * se
    return Change(metric, baseline, window, drifted, f"{delta * 100:+.1f} pts")


PINNED_PATTERN = r"(-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8}|-\d{3}|-v\d+(:\d+)?|-\d{4})$"
"""2024-08-06, 20250929, @20240620 (Vertex), -002 (Gemini), -v1:0 (Bedrock), -0125 (OpenAI); the
alert backtest's SQL (``sinks.queries.metrics``) applies the same pattern with re2."""
_PINNED = re.compile(PINNED_PATTERN)


def is_pinned(model: str) -> bool:
    """A snapshot name rather than an alias the provider may re-point at a newer model."""
    return not model.endswith(("-latest", "-preview")) and bool(_PINNED.search(model))


@dataclass(frozen=True)
class ServedBy:
    response_model: str
    calls: int
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class VersionFinding:
    kind: str
    """``switched`` (a snapshot that did not serve the baseline serves the window) or ``unpinned``."""
    detail: str


def version_findings(
    model: str, served: Sequence[ServedBy], window_start: float, baseline_end: float | None = None
) -> list[VersionFinding]:
    """What the response_model column says about the model behind a model name.

    ``served`` spans the baseline's start to the window's end. With a pinned reference period
    (``baseline_end`` before ``window_start``) a snapshot first seen in the gap between them and
    still answering in the window is a switch too: the reference never saw it."""
    out: list[VersionFinding] = []
    end = window_start if baseline_end is None else baseline_end
    before = {s.response_model for s in served if s.first_seen < end}
    new = [s for s in served if s.response_model not in before and s.last_seen >= window_start]
    if before and new:
        for s in new:
            was = ", ".join(sorted(before))
            out.append(VersionFinding("switched", f"{model} is now served by {s.response_model} (before: {was}); "
                                                  f"{s.calls:,} calls"))  # fmt: skip
    if not is_pinned(model):
        out.append(unpinned_finding(model, {s.response_model for s in served} - {model}))
    return out


def unpinned_finding(model: str, resolved: set[str]) -> VersionFinding:
    """Calls name an alias, not a snapshot: the provider may re-point it at a newer model any day.

    Reported whether or not the provider says what it resolved to: many providers (and
    proxies) return no response_model, or echo the alias back, and the risk is the same."""
    if resolved:
        how = f"an alias the provider resolves (to {', '.join(sorted(resolved))})"
    else:
        how = "an alias with no pinned snapshot (the provider did not say which snapshot answered)"
    return VersionFinding("unpinned", f"{model} is {how}: pin a snapshot to control when the model changes")


STREAM_DRIFT_METRICS = ("output_tokens_psi", "response_models_new")
"""Stream metrics a window cannot compute alone: they compare it with its scope's trailing windows."""


BASELINE_WINDOWS = 24
"""Trailing windows (with calls) a stream drift memory compares a window with, and a restart refills."""


class DriftMemory:
    """One alert scope's trailing windows, so rules can watch drift in the stream.

    ``output_tokens_psi`` compares a window's output-length distribution with the merged
    trailing ``baseline`` windows that had calls; ``response_models_new`` counts snapshots
    answering in this window that none of the trailing windows saw. Both stay None (no evidence:
    a rule neither fires nor clears) until ``warmup`` windows were seen, so a restart, which
    starts the memory empty, learns instead of calling every snapshot new.
    """

    __slots__ = ("_served", "_sketches", "warmup", "windows")

    def __init__(self, baseline: int = BASELINE_WINDOWS, warmup: int = 3) -> None:
        self._sketches: deque[QuantileSketch] = deque(maxlen=baseline)
        self._served: dict[str, int] = {}
        """response_model → the last window index it answered in (forgotten after ``baseline``)."""
        self.warmup = warmup
        self.windows = 0

    def observe(self, output: QuantileSketch, served: set[str], calls: int) -> dict[str, float | None]:
        """This window's drift metrics against the history, then the window joins the history."""
        if not calls:
            return dict.fromkeys(STREAM_DRIFT_METRICS)
        ready = self.windows >= self.warmup
        value: float | None = None
        if ready and self._sketches:
            base = QuantileSketch()
            for sk in self._sketches:
                base.merge(sk)
            quantiles = base.quantiles(MID_QUANTILES)
            current = output.quantiles(MID_QUANTILES)
            if None not in quantiles and None not in current:
                value = psi([q for q in quantiles if q is not None], [q for q in current if q is not None])
        new = float(sum(1 for m in served if m not in self._served)) if ready else None
        self.remember(output, served)
        return {"output_tokens_psi": value, "response_models_new": new}

    @property
    def baseline(self) -> int:
        return self._sketches.maxlen or 0

    def remember(self, output: QuantileSketch, served: set[str]) -> None:
        """A window (with calls) joins the history. Also how a restarted worker refills it from the
        rollups, so drift rules compare from the first window instead of learning for ``warmup``."""
        self.windows += 1
        keep = QuantileSketch()
        keep.merge(output)  # a copy: the window's own sketch belongs to the window
        keep.compact()  # 300 centroids, not up to 4k raw values, for each of the 24 windows kept
        self._sketches.append(keep)
        horizon = self.windows - self.baseline
        for m in served:
            self._served[m] = self.windows
        for m in [m for m, last in self._served.items() if last < horizon]:
            del self._served[m]
