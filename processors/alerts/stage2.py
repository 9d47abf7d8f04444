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

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

from processors.alerts.engine import AlertEngine
from processors.alerts.events import AlertEvent
from processors.drift import BASELINE_WINDOWS, STREAM_DRIFT_METRICS, DriftMemory
from processors.sketch import QuantileSketch
from processors.windows import (
    CALL_BOUNDED,
    EVIDENCE,
    METRIC_FNS,
    SCOPE_DIMS,
    SKETCH_METRICS,
    WindowPartial,
    active_flows,
)
from schemas.rules import Rule

Dims = tuple[str, ...]
CellKey = tuple[Dims, tuple[str, ...]]
Minute = tuple[int, int]
"""(window start, window length): the open cells are grouped by it, since minutes are released whole."""
Owns = Callable[[Dims, tuple[str, ...]], bool]
"""Whether this stage 2 owns a scope, given as partials are keyed (dimensions, values). The
partials topic is keyed by scope, so after a rebalance a worker owns the scopes whose partials
partition it was assigned; the runtime knows the partitioner, stage 2 only asks."""


def scope_cell(labels: Mapping[str, str]) -> CellKey:
    """The partials key of a scope given by its labels (grouped and filtered dimensions together):
    the dimensions in ``SCOPE_DIMS`` order, as stage 1 projects and keys it."""
    dims = tuple(d for d in SCOPE_DIMS if d in labels)
    return dims, tuple(labels[d] for d in dims)


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
        """Per source partition, how far every input this stage 2 reads has carried it."""
        self._marks: dict[int, dict[int | None, float]] = {}
        """Per source partition, its watermark as last seen on each input (partials-topic partition;
        None where partials are handed over in process)."""
        self.inputs: frozenset[int] | None = None
        """The input partitions this stage 2 reads (``listen_on``); None: those heard from so far."""
        self._carried: dict[tuple[int, int], float] = {}
        """(source, input partition) → the watermark the partials last read there carry: it holds
        only once something after that whole batch is read there (``add``)."""
        self._cells: dict[Minute, dict[CellKey, WindowPartial]] = {}
        """Open cells by minute: a release pops whole minutes, without looking at each cell (it runs
        whenever the slowest watermark moves, and a minute of 10k scope keys holds ~12k cells)."""
        self.released_through = -math.inf
        self.restored_through = -math.inf
        """Evaluated by an earlier run (its saved progress): partials of those minutes read again
        after a restart (from the commit, pinned behind the open minutes) are replays, not late."""
        self.late_partials = 0
        self._positions: dict[Minute, dict[int, int]] = {}
        """Per open minute: the lowest input offset (per input partition) that contributed to it."""
        self._released: dict[Minute, dict[int, int]] = {}
        """The same for released minutes, kept while a rule window they count toward is open: a
        restart or a new owner must read them again to evaluate that window whole."""
        self._catch_up_through: dict[int, float] = {}
        """Per input partition newly assigned: minutes ending by this were released here before it
        was read (by this process). Its partials for them are minutes read again from the commit,
        the previous owner's or the previous run's: not late, and still due to the windows not
        evaluated yet."""
        self._catch_up: list[tuple[FinalCell, float]] = []
        """Replayed cells, each with the release point its partition was assigned at."""

    def add(
        self,
        dims: Dims,
        partial: WindowPartial,  # ownership passes to stage 2
        source: int,
        watermark: float | None = None,
        position: tuple[int, int] | None = None,
    ) -> None:
        """``position`` is (input partition, offset) of the message that carried the partial: stage 2
        commits only below the oldest one whose minute or rule window is not evaluated yet."""
        if partial.window_end <= self.released_through:
            if position is not None and partial.window_end <= (
                since := self._catch_up_through.get(position[0], -math.inf)
            ):
                self._catch_up.append((FinalCell(dims, partial.key, partial), since))
                self._lowest(self._released, (partial.window_start, partial.window_s), position)  # still pinned
            elif partial.window_end > self.restored_through:
                self.late_partials += 1  # its minute was already evaluated; counting it now would lie twice
            return
        minute = (partial.window_start, partial.window_s)
        cells = self._cells.get(minute)
        if cells is None:
            cells = self._cells[minute] = {}
        key = (dims, partial.key)
        cell = cells.get(key)
        if cell is None:
            cells[key] = partial  # stage 1 is done with it: adopted, not copied
        else:
            cell.merge(partial)
        if position is not None:
            self._lowest(self._positions, minute, position)
        if watermark is None:
            return
        if position is None:  # handed over in process, a whole batch at once
            self.heartbeat(source, watermark)
            return
        # Read from a partials partition: every partial of one batch carries that batch's watermark,
        # and a fetch may end halfway through the batch's messages there. A watermark therefore
        # holds once a message of a later batch (a higher watermark) or a heartbeat is read after
        # it on the same partition: the worker sends a batch's partials before anything later.
        via = position[0]
        carried = self._carried.get((source, via), -math.inf)
        if watermark > carried:
            self._carried[(source, via)] = watermark
            if carried > -math.inf:
                self.heartbeat(source, carried, via)

    @staticmethod
    def _lowest(positions: dict[Minute, dict[int, int]], minute: Minute, position: tuple[int, int]) -> None:
        lowest = positions.setdefault(minute, {})
        part, offset = position
        if offset < lowest.get(part, offset + 1):
            lowest[part] = offset

    def pinned_offsets(self) -> dict[int, int]:
        """Per input partition, the lowest offset still needed: by a minute not released, or by a
        released one whose rule window is still open (``hold_released``)."""
        out: dict[int, int] = {}
        for positions in (self._positions, self._released):
            for lowest in positions.values():
                for part, offset in lowest.items():
                    if offset < out.get(part, offset + 1):
                        out[part] = offset
        return out

    def hold_released(self, since: float) -> None:
        """Keep pinning released minutes from ``since`` on (the oldest open rule window's start,
        ``RuleWindows.open_since``); earlier ones are evaluated in every window they count toward."""
        for minute in [m for m in self._released if m[0] < since]:
            del self._released[minute]

    def heartbeat(self, source: int, watermark: float, via: int | None = None) -> None:
        """``source`` has sent everything up to ``watermark`` *through input partition* ``via``.

        A worker sends one source partition's partials to many partials partitions at once, and
        each arrives in its own order: a later batch's watermark read on one partition says
        nothing of an earlier batch's partial still on its way to another. Only order within a
        partition holds, so a source's watermark is the lowest it carries on the inputs read.
        """
        marks = self._marks.get(source)
        if marks is None:
            marks = self._marks[source] = {}
        if watermark > marks.get(via, -math.inf):
            marks[via] = watermark
            self._settle(source, marks)
            if via in self._catch_up_through:
                self._replayed(via)

    def _replayed(self, via: int) -> None:
        """Once every source's watermark read on ``via`` is past its catch-up point, the replay is
        over there (a minute's partials come before the watermark that passes it): from then on a
        partial for an evaluated minute is late again."""
        since = self._catch_up_through[via]
        sources = self.expected if self.expected is not None else self._marks.keys()
        if all(self._marks.get(s, {}).get(via, -math.inf) > since for s in sources):
            del self._catch_up_through[via]

    def listen_on(self, inputs: Iterable[int]) -> None:
        """The input partitions assigned to this stage 2 (after a rebalance: the new set). What
        was heard on a partition that left is forgotten: if it comes back, it is read again from
        its committed offset, behind what it said before. A partition newly assigned (a gained
        one, or every one after a restart) replays from its commit minutes released here already:
        the commit holds behind open rule windows (``hold_released``), whose earlier minutes these
        are (``add``)."""
        assigned = frozenset(inputs)
        if assigned == self.inputs:
            return
        before = self.inputs
        gone = (before or frozenset()) - assigned
        self.inputs = assigned
        for source, marks in self._marks.items():
            for via in gone:
                marks.pop(via, None)
            self._settle(source, marks)
        self._carried = {k: w for k, w in self._carried.items() if k[1] not in gone}
        for via in gone:
            self._catch_up_through.pop(via, None)
            for positions in (self._positions, self._released):
                for lowest in positions.values():
                    lowest.pop(via, None)  # not ours to commit any more
        for via in assigned - (before or frozenset()):  # read from its commit: what it replays, see ``add``
            self._catch_up_through[via] = self.released_through

    def keep_scopes(self, owns: Owns) -> int:
        """Drop the open cells of scopes this stage 2 no longer owns; returns how many.

        Their new owner reads the partials again from the commit (pinned behind the minutes not
        evaluated) and evaluates those minutes whole. Releasing them here too, with what was read
        before the rebalance, would evaluate part of a minute: a rate off, a count short, a page
        from a worker that can no longer resolve it."""
        dropped = 0
        for minute in list(self._cells):
            cells = self._cells[minute]
            gone = [key for key in cells if not owns(*key)]
            for key in gone:
                del cells[key]
            dropped += len(gone)
            if not cells:
                del self._cells[minute]
                self._positions.pop(minute, None)
        self._catch_up = [(c, since) for c, since in self._catch_up if owns(c.dims, c.values)]
        return dropped

    def take_catch_up(self) -> list[tuple[FinalCell, float]]:
        """Replayed cells of minutes released before their partition was read here (``listen_on``),
        each with that release point: windows ending by it were evaluated before (``RuleWindows.feed``)."""
        cells, self._catch_up = self._catch_up, []
        return cells

    def _settle(self, source: int, marks: dict[int | None, float]) -> None:
        if self.inputs is None and marks:
            self.watermarks[source] = min(marks.values())
        elif self.inputs and all(p in marks for p in self.inputs):
            self.watermarks[source] = min(marks[p] for p in self.inputs)
        else:  # not heard on every input yet: nothing is known of it
            self.watermarks.pop(source, None)

    def final_through(self) -> float:
        """Minutes ending at or before this are complete across all sources (every source expected,
        or without that list every source ever heard from)."""
        sources = self.expected if self.expected is not None else set(self._marks)
        if not sources or not sources <= self.watermarks.keys():
            return -math.inf
        return min(self.watermarks[s] for s in sources)

    def release(self) -> tuple[list[FinalCell], float]:
        """Pop every complete minute; returns them with the time they are complete through."""
        through = self.final_through()
        if through <= self.released_through:
            return [], self.released_through
        cells: list[FinalCell] = []
        for minute in sorted(m for m in self._cells if m[0] + m[1] <= through):
            popped = self._cells.pop(minute)
            cells.extend(FinalCell(dims, values, partial) for (dims, values), partial in popped.items())
            positions = self._positions.pop(minute, None)
            if positions:
                self._released[minute] = positions
        self.released_through = through
        return cells, through


ScopeKey = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]
"""(group-by dimensions, where-filters): rules sharing it share one projection of the minutes."""


DriftHistory = Callable[
    [tuple[str, ...], dict[str, str], int, int], Mapping[tuple[str, ...], list[tuple[int, QuantileSketch, set[str]]]]
]
"""(by, where, window_s, windows) → per scope value, its last windows with calls: (start, output
lengths, response models), oldest first."""


Projected = dict[tuple[int, tuple[str, ...]], WindowPartial]
"""(minute start, scope values) → the minute's merged partial."""


def _project(
    cells: list[FinalCell],
    by: tuple[str, ...],
    where: dict[str, str],
    sketches: tuple[bool, bool, bool] = (True, True, True),
    full_grain: bool = True,
) -> Projected:
    """Cells onto a scope: filter by ``where``, merge by ``by``, within each minute. ``full_grain``:
    full-grain cells stand in for a grain with none (see ``RuleWindows.full_grain``)."""
    dims = tuple(d for d in SCOPE_DIMS if d in by or d in where)
    exact = [c for c in cells if c.dims == dims]
    source = exact or ([c for c in cells if c.dims == SCOPE_DIMS] if full_grain else [])
    out: Projected = {}
    if not source:  # none at this grain (a worker's stage 2 owns some scopes, not all)
        return out
    owned: set[tuple[int, tuple[str, ...]]] = set()
    index = {d: i for i, d in enumerate(source[0].dims)}
    by_i = [index[d] for d in by]
    where_i = [(index[d], v) for d, v in where.items()]
    for c in source:
        vals = c.values
        if any(vals[i] != v for i, v in where_i):
            continue
        values = tuple(vals[i] for i in by_i)
        k = (c.partial.window_start, values)
        acc = out.get(k)
        if acc is None:
            out[k] = c.partial  # shared until a second cell lands on the same key (copy on write)
        else:
            if k not in owned:
                acc = out[k] = acc.copy(values, *sketches)
                owned.add(k)
            acc.merge(c.partial, *sketches)
    return out


def sketches_read(rules: Iterable[Rule]) -> tuple[bool, bool, bool]:
    """Whether any of these rules reads a latency / a TTFT / an output-length sketch: stage 1
    publishes, and stage 2 decodes and merges, only those."""
    rules = list(rules)
    kinds = {SKETCH_METRICS.get(r.metric) for r in rules}
    # drift memory keeps the output-length distribution whichever drift metric is read
    drift = any(r.metric in STREAM_DRIFT_METRICS for r in rules)
    return "latency" in kinds, "ttft" in kinds, "output" in kinds or drift


class _Group:
    """Rules with the same scope and window: one set of window accumulators, evaluated together."""

    def __init__(self, by: tuple[str, ...], where: dict[str, str], window: int) -> None:
        self.by, self.where, self.window = by, where, window
        self.rules: list[Rule] = []
        self.open: dict[int, dict[tuple[str, ...], WindowPartial]] = {}
        self.seen: dict[tuple[str, ...], int] = {}
        """Scope values → the last window they had calls in (absence needs the silent ones)."""
        self.done: int | None = None
        """The end of the last evaluated window."""
        self.owned: set[tuple[int, tuple[str, ...]]] = set()
        """Accumulators this group created (the others still share a projected minute)."""
        self.drift: dict[tuple[str, ...], DriftMemory] = {}
        """Scope values → their trailing windows, where a rule reads a drift metric."""
        self.scopes: dict[tuple[str, ...], tuple[dict[str, str], tuple[tuple[str, str], ...]]] = {}
        """Scope values → (labels, sorted items): built once per scope, not once per window."""

    def scope(self, values: tuple[str, ...], keep: bool) -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
        """``keep`` only for scopes with calls: those are in ``seen``, which forgets them in time."""
        found = self.scopes.get(values)
        if found is None:
            labels = dict(zip(self.by, values, strict=True))
            found = (labels, tuple(sorted(labels.items())))
            if keep:
                self.scopes[values] = found
        return found

    def cell(self, values: tuple[str, ...]) -> CellKey:
        """The partials key of one of the group's scope values."""
        return scope_cell({**self.where, **dict(zip(self.by, values, strict=True))})

    @cached_property
    def watches_absence(self) -> bool:
        return any(r.absent is not None for r in self.rules)

    # cached: RuleWindows adds every rule before the first window, and these are asked per scope value
    @cached_property
    def sketches(self) -> tuple[bool, bool, bool]:
        return sketches_read(self.rules)

    @cached_property
    def watches_drift(self) -> bool:
        return any(r.metric in STREAM_DRIFT_METRICS for r in self.rules)

    @cached_property
    def metric_fns(self) -> tuple[tuple[str, Callable[[WindowPartial], float | None]], ...]:
        """The metrics the group's rules read (their own and what their ``min_calls`` counts):
        computed once per scope into a plain dict, whose lookups are what rules do most."""
        names = {"calls"} | {r.metric for r in self.rules} | {EVIDENCE.get(r.metric, "calls") for r in self.rules}
        fns = [(name, METRIC_FNS.get(name, _undefined)) for name in sorted(names)]
        if self.watches_absence:  # counted per absence-window length: this group's
            fns.append(("active_flows", functools.partial(active_flows, window_s=self.window)))
        return tuple(fns)

    @cached_property
    def floor(self) -> int:
        """Scopes with fewer calls than this give no rule of the group evidence: not evaluated at all.
        0 where a rule counts something else (judge scores, feedback, flows) or watches absence."""
        if self.watches_absence or any(EVIDENCE.get(r.metric, "calls") not in CALL_BOUNDED for r in self.rules):
            return 0
        return min(r.min_calls for r in self.rules)


def _undefined(_: WindowPartial) -> None:
    """Metrics no single window defines (drift, pipeline lag): supplied by whoever has them, or None."""


class RuleWindows:
    """Groups final minutes into each rule's windows and evaluates a window once it is complete.

    Rules that share a scope and a window share the work: the minutes are projected once per
    scope, accumulated once per window, and each window's metrics are computed once, lazily,
    whatever number of rules read them.
    """

    def __init__(self, engine: AlertEngine, *, forget_after_windows: int = 48) -> None:
        self.engine = engine
        self._forget = forget_after_windows
        self._groups: dict[tuple[ScopeKey, int], _Group] = {}
        for rule in engine.rules.values():
            key = self._key(rule)
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(tuple(rule.scope.by), dict(rule.scope.where), int(rule.window))
            group.rules.append(rule)
        by_scope: dict[ScopeKey, list[Rule]] = {}
        for (scope_key, _), group in self._groups.items():
            by_scope.setdefault(scope_key, []).extend(group.rules)
        self._scope_sketches = {scope_key: sketches_read(rules) for scope_key, rules in by_scope.items()}
        """Per scope, the sketches its projection merges: those any of its windows' rules read."""
        self.sketches = sketches_read(engine.rules.values())
        """Whether any rule reads a latency / TTFT / output sketch: the worker's stage 2 decodes
        only those from the partials topic."""
        self.evaluated_windows = 0
        """(rule, scope) windows evaluated; scopes under every rule's ``min_calls`` are not."""
        self.full_grain = True
        """Whether full-grain cells stand in for a grain with none: in process, where stage 1 hands
        over full-grain partials only. Not in the worker (``AlertPipeline.assign``): there every
        scope comes at its own grain, and the full-grain cells a worker holds are its partitions'
        share, not a scope's whole traffic."""
        self.late_windows = 0

    def saw(self, rule: Rule, values: tuple[str, ...], window_start: int) -> None:
        """After a restart: this scope had calls in this window (from the rollups), so its silence
        from then on still gets the empty windows absence rules need."""
        group = self._groups.get(self._key(rule))
        if group is not None and window_start > group.seen.get(values, -1):
            group.seen[values] = window_start

    def drift_scopes(self) -> list[tuple[tuple[str, ...], dict[str, str], int]]:
        """(by, where, window) of every drift-watching group: what ``seed_drift`` asks ``history`` for."""
        return [(g.by, g.where, g.window) for g in self._groups.values() if g.watches_drift]

    def seed_drift(self, history: DriftHistory, owns: Owns | None = None) -> int:
        """After a restart: every drift-watching group's memories refilled with its scopes' trailing
        windows (``history(by, where, window_s, windows)`` reads them from the rollups, oldest first),
        so a snapshot switch or a reshaped output length right after a restart still pages.
        ``owns``: only those scopes (a rebalance handed them over). Returns the scopes seeded."""
        seeded = 0
        for group in self._groups.values():
            if not group.watches_drift:
                continue
            for values, windows in history(group.by, group.where, group.window, BASELINE_WINDOWS).items():
                if owns is not None and not owns(*group.cell(values)):
                    continue
                memory = group.drift.get(values)
                if memory is None:
                    memory = group.drift[values] = DriftMemory()
                for window_start, output, served in windows:
                    memory.remember(output, served)
                    if window_start > group.seen.get(values, -1):
                        group.seen[values] = window_start  # so the memory is forgotten in time, like a live one
                seeded += 1
        return seeded

    def resume_after(self, through: float) -> None:
        """After a restart: windows ending by ``through`` were evaluated by the previous run."""
        for group in self._groups.values():
            group.done = int(through) - int(through) % group.window

    def keep_scopes(self, owns: Owns) -> int:
        """Forget every scope this stage 2 no longer owns (``Stage2.keep_scopes``); returns how many.

        Its open windows, its last-seen window, drift memory and labels go, and so does each rule's
        state for it: kept, its silence here would page "traffic stopped", and a firing alert
        would stay firing in a worker that can no longer resolve it. Its new owner restores it
        (``AlertPipeline.assign``)."""
        dropped = 0
        for group in self._groups.values():
            values = set(group.seen) | set(group.drift) | set(group.scopes)
            for bucket in group.open.values():
                values.update(bucket)
            gone = {v for v in values if not owns(*group.cell(v))}
            if not gone:
                continue
            dropped += len(gone)
            for bucket in group.open.values():
                for v in gone:
                    bucket.pop(v, None)
            group.owned = {k for k in group.owned if k[1] not in gone}
            for v in gone:
                group.seen.pop(v, None)
                group.drift.pop(v, None)
                group.scopes.pop(v, None)
        states = self.engine.states
        for name, items in list(states):
            rule = self.engine.rules.get(name)
            if rule is not None and not self.owns_rule_scope(rule, dict(items), owns):
                del states[(name, items)]
        return dropped

    def owns_rule_scope(self, rule: Rule, scope: Mapping[str, str], owns: Owns) -> bool:
        """Whether a stored alert's scope (its ``by`` labels) is one this stage 2 owns. Every rule
        has a group, pipeline-lag rules too: evaluated with no labels, one of those belongs to the
        stage 2 owning its group's cell with empty values (without ``by``/``where``: the group-wide
        scope's), so exactly one stage 2 of a group evaluates it (``AlertPipeline.check_lag``)."""
        group = self._groups.get(self._key(rule))
        return group is None or owns(*group.cell(tuple(scope.get(d, "") for d in group.by)))

    def open_since(self) -> float:
        """The start of the oldest rule window holding minutes and not evaluated yet (inf: none)."""
        return min((min(g.open) for g in self._groups.values() if g.open), default=math.inf)

    @staticmethod
    def _key(rule: Rule) -> tuple[ScopeKey, int]:
        return (tuple(rule.scope.by), tuple(sorted(rule.scope.where.items()))), int(rule.window)

    def feed(
        self, cells: list[FinalCell], through: float, catch_up: list[tuple[FinalCell, float]] | None = None
    ) -> list[AlertEvent]:
        """``catch_up``: minutes read again from a commit (``Stage2.take_catch_up``), each with the
        release point at which its partition was assigned here. They count toward the windows
        ending after that point; a window ending by it was evaluated before (by the scope's
        previous owner, or the previous run), whatever this group evaluated since."""
        projections: dict[ScopeKey, Projected] = {}
        events: list[AlertEvent] = []
        for (scope_key, w), group in self._groups.items():
            needs = self._scope_sketches[scope_key]
            projected = projections.get(scope_key)
            if projected is None:
                projected = projections[scope_key] = (
                    _project(cells, group.by, group.where, needs, self.full_grain) if cells else {}
                )
            if catch_up:  # rare (a restart, a rebalance): projected per group, as windows differ
                due = [c for c, since in catch_up if (ws := c.partial.window_start) - ws % w + w > since]
                self._accumulate(group, _project(due, group.by, group.where, needs, self.full_grain) if due else {})
            self._accumulate(group, projected)
            events.extend(self._close(group, through))
        return events

    @staticmethod
    def _accumulate(group: _Group, projected: Projected) -> None:
        w, sketches = group.window, group.sketches
        for (minute, values), partial in projected.items():
            start = minute - minute % w
            bucket = group.open.setdefault(start, {})
            acc = bucket.get(values)
            if acc is None:
                bucket[values] = partial  # shared (read-only) until the window's next minute
            else:
                if (start, values) not in group.owned:
                    acc = bucket[values] = acc.copy(values, *sketches)
                    group.owned.add((start, values))
                acc.merge(partial, *sketches)

    def _close(self, group: _Group, through: float) -> list[AlertEvent]:
        w = group.window
        starts = {s for s in group.open if s + w <= through}
        if group.watches_absence and group.done is not None and math.isfinite(through):
            # time passed even where nothing arrived: silent scopes still get their (empty) windows
            starts.update(range(group.done, int(through) - w + 1, w))
        events: list[AlertEvent] = []
        seen = group.seen
        for start in sorted(starts):
            bucket = group.open.pop(start, {})
            group.owned = {k for k in group.owned if k[0] != start}
            if group.done is not None and start < group.done:
                self.late_windows += 1  # a window already evaluated: do not evaluate it twice
                continue
            if group.watches_absence:
                for values, last in seen.items():
                    if values not in bucket and start > last:
                        bucket[values] = WindowPartial(start, w, values)  # a scope that went silent
            fired: list[tuple[tuple[str, ...], int, AlertEvent]] = []
            evaluate, rules, end, scopes = self.engine.evaluate, group.rules, start + w, group.scopes
            fns, floor, drift = group.metric_fns, group.floor, group.watches_drift
            evaluated = 0
            for values, partial in bucket.items():
                calls = partial.calls
                if calls:
                    seen[values] = start
                if drift and calls:  # quality-only partials carry no outputs
                    memory = group.drift.get(values)
                    if memory is None:
                        memory = group.drift[values] = DriftMemory()
                    observed = memory.observe(partial.output, partial.served, calls)
                if calls < floor:
                    continue  # no rule would see evidence: skipping is what evaluating would conclude
                evaluated += 1
                scope, key = scopes.get(values) or group.scope(values, calls > 0)
                metrics = {name: fn(partial) for name, fn in fns}
                if drift and calls:
                    metrics.update(observed)
                for i, rule in enumerate(rules):
                    event = evaluate(rule, scope, start, end, metrics, key)
                    if event is not None:
                        fired.append((values, i, event))
            self.evaluated_windows += evaluated * len(rules)
            # in scope order, then rule order: the same order every run (only the few that fired are sorted)
            events.extend(e for _, _, e in sorted(fired, key=lambda f: (f[0], f[1])))
            for values, last in list(seen.items()):
                if start - last > self._forget * w:
                    del seen[values]
                    group.drift.pop(values, None)
                    group.scopes.pop(values, None)
            group.done = start + w
        return events
