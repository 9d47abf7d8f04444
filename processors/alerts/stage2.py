"""Stage 2 of the two-stage aggregation: merge every partition's share of a scope, then evaluate.

``llm.calls`` is keyed by feature, but a rule may watch a team, a model or a provider, whose
calls span partitions. Stage 1 (per partition) emits minute partials; ``Stage2`` adds them up
per (scope, minute) and releases a minute only once *every* source partition's watermark has
passed its end — a quiet partition advances by wall clock (idle watermark), so quiet scopes still
close windows, and a scope that went silent shows up as a zero-call window, which is what
lets "traffic stopped" page. ``RuleWindows`` then groups final minutes into each rule's window
(5m, 1h...) and hands them to the engine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from processors.alerts.engine import AlertEngine
from processors.alerts.events import AlertEvent
from processors.windows import SCOPE_DIMS, WindowPartial
from schemas.rules import Rule

Dims = tuple[str, ...]
CellKey = tuple[Dims, tuple[str, ...], int]


@dataclass(frozen=True, slots=True)
class FinalCell:
    """One scope's complete minute: every source partition's contribution merged."""

    dims: Dims
    values: tuple[str, ...]
    partial: WindowPartial


class Stage2:
    def __init__(self, sources: Iterable[int] | None = None) -> None:
        self.expected: set[int] | None = set(sources) if sources else None
        """Source partitions that must report before a minute is final; None: whoever reported."""
        self.watermarks: dict[int, float] = {}
        self._cells: dict[CellKey, WindowPartial] = {}
        self.released_through = -math.inf
        self.late_partials = 0
        self._positions: dict[CellKey, dict[int, int]] = {}
        """Per open cell: the lowest input offset (per input partition) that contributed to it."""

    def add(
        self,
        dims: Dims,
        partial: WindowPartial,
        source: int,
        watermark: float | None = None,
        position: tuple[int, int] | None = None,
    ) -> None:
        """``position`` is (input partition, offset) of the message that carried the partial: stage 2
        commits only below the oldest one whose minute is not evaluated yet."""
        if partial.window_end <= self.released_through:
            self.late_partials += 1  # its minute was already evaluated; counting it now would lie twice
            return
        key = (dims, partial.key, partial.window_start)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = WindowPartial(partial.window_start, partial.window_s, partial.key)
        cell.merge(partial)
        if position is not None:
            lowest = self._positions.setdefault(key, {})
            part, offset = position
            if offset < lowest.get(part, offset + 1):
                lowest[part] = offset
        if watermark is not None:
            self.heartbeat(source, watermark)

    def pinned_offsets(self) -> dict[int, int]:
        """Per input partition, the lowest offset still needed by an unevaluated minute."""
        out: dict[int, int] = {}
        for lowest in self._positions.values():
            for part, offset in lowest.items():
                if offset < out.get(part, offset + 1):
                    out[part] = offset
        return out

    def heartbeat(self, source: int, watermark: float) -> None:
        if watermark > self.watermarks.get(source, -math.inf):
            self.watermarks[source] = watermark

    def final_through(self) -> float:
        """Minutes ending at or before this are complete across all sources."""
        if not self.watermarks:
            return -math.inf
        if self.expected is not None and not self.expected <= set(self.watermarks):
            return -math.inf
        sources = self.expected if self.expected is not None else set(self.watermarks)
        return min(self.watermarks[s] for s in sources)

    def release(self) -> tuple[list[FinalCell], float]:
        """Pop every complete minute; returns them with the time they are complete through."""
        through = self.final_through()
        if through <= self.released_through:
            return [], self.released_through
        ready = [k for k in self._cells if k[2] + self._cells[k].window_s <= through]
        cells = [FinalCell(k[0], k[1], self._cells.pop(k)) for k in ready]
        for k in ready:
            self._positions.pop(k, None)
        self.released_through = through
        return cells, through


def _project(cells: list[FinalCell], rule: Rule) -> dict[tuple[int, tuple[str, ...]], WindowPartial]:
    """Cells onto the rule's scope: filter by ``where``, merge by ``by``, within each minute."""
    dims = rule.scope.dims
    exact = [c for c in cells if c.dims == dims]
    source = exact or [c for c in cells if c.dims == SCOPE_DIMS]
    by = rule.scope.by
    where = rule.scope.where
    out: dict[tuple[int, tuple[str, ...]], WindowPartial] = {}
    for c in source:
        labels = dict(zip(c.dims, c.values, strict=True))
        if any(labels.get(d) != v for d, v in where.items()):
            continue
        values = tuple(labels[d] for d in by)
        k = (c.partial.window_start, values)
        acc = out.get(k)
        if acc is None:
            acc = out[k] = WindowPartial(c.partial.window_start, c.partial.window_s, values)
        acc.merge(c.partial)
    return out


class RuleWindows:
    """Groups final minutes into each rule's windows and evaluates a window once it is complete."""

    def __init__(self, engine: AlertEngine, *, forget_after_windows: int = 48) -> None:
        self.engine = engine
        self._open: dict[tuple[str, int], dict[tuple[str, ...], WindowPartial]] = {}
        self._seen: dict[str, dict[tuple[str, ...], int]] = {}
        """Per rule: scope values → last window start they had calls (absence needs the silent ones)."""
        self._forget = forget_after_windows
        self._done: dict[str, int] = {}
        """Per rule: the end of the last evaluated window."""
        self.evaluated_windows = 0
        self.late_windows = 0

    def resume_after(self, through: float) -> None:
        """After a restart: windows ending by ``through`` were evaluated by the previous run."""
        for rule in self.engine.rules.values():
            w = int(rule.window)
            self._done[rule.name] = int(through) - int(through) % w

    def feed(self, cells: list[FinalCell], through: float) -> list[AlertEvent]:
        events: list[AlertEvent] = []
        for rule in self.engine.rules.values():
            w = int(rule.window)
            for (minute, values), partial in _project(cells, rule).items():
                start = minute - minute % w
                bucket = self._open.setdefault((rule.name, start), {})
                acc = bucket.get(values)
                if acc is None:
                    acc = bucket[values] = WindowPartial(start, w, values)
                acc.merge(partial)
            events.extend(self._close(rule, through))
        return events

    def _close(self, rule: Rule, through: float) -> list[AlertEvent]:
        w = int(rule.window)
        done = self._done.get(rule.name)
        starts = {s for (name, s) in self._open if name == rule.name and s + w <= through}
        if rule.absent is not None and done is not None and math.isfinite(through):
            # time passed even where nothing arrived: silent scopes still get their (empty) windows
            starts.update(range(done, int(through) - w + 1, w))
        events: list[AlertEvent] = []
        seen = self._seen.setdefault(rule.name, {})
        for start in sorted(starts):
            bucket = self._open.pop((rule.name, start), {})
            if done is not None and start < done:
                self.late_windows += 1  # a window already evaluated: do not evaluate it twice
                continue
            if rule.absent is not None:
                for values, last in seen.items():
                    if values not in bucket and start > last:
                        bucket[values] = WindowPartial(start, w, values)  # a scope that went silent
            for values, partial in sorted(bucket.items()):
                scope = dict(zip(rule.scope.by, values, strict=True))
                event = self.engine.evaluate(rule, scope, start, start + w, partial.metrics())
                self.evaluated_windows += 1
                if partial.calls:
                    seen[values] = start
                if event is not None:
                    events.append(event)
            for values, last in list(seen.items()):
                if start - last > self._forget * w:
                    del seen[values]
            done = self._done[rule.name] = start + w
        return events
