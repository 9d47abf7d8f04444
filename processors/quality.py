"""Quality signals joined to their calls: judge scores and user feedback as window partials.

A judge score or a thumbs-down says something about one call, so it must land on that call's
scope (feature, team, model, provider, prompt version, variant) and release. ``Lineage`` is what
the runtime looks up for a request id (from the judge sample or the raw call); the functions
here turn scored or rated events into partials that stage 2 merges like any other, windowed by
when the verdict arrived, so ``eval_score`` and ``thumbs_down_rate`` rules work like the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from processors.sampling import BOOSTED_REASONS
from processors.windows import WindowPartial
from schemas.wire import WireFeedback, WireJudgeResult


@dataclass(frozen=True, slots=True)
class Lineage:
    """Where a call came from and which release served it."""

    event_id: str
    call_ts: datetime | None
    feature: str
    team: str
    model: str
    provider: str
    prompt_version: str
    variant: str
    release_id: str
    sample_reason: str = ""
    """Why the judge saw this call (``sampling.REASON_*``); empty when llmpulse did not sample it."""

    @property
    def key(self) -> tuple[str, ...]:
        """The stream's finest scope key (``windows.SCOPE_DIMS`` order)."""
        return (self.feature, self.team, self.model, self.provider, self.prompt_version, self.variant)


def _partial(cells: dict[tuple[int, tuple[str, ...]], WindowPartial], ts: float, key: tuple[str, ...],
             window_s: int) -> WindowPartial:  # fmt: skip
    start = int(ts // window_s) * window_s
    cell = cells.get((start, key))
    if cell is None:
        cell = cells[(start, key)] = WindowPartial(start, window_s, key)
    return cell


def judge_partials(
    results: Iterable[WireJudgeResult], lineage: Mapping[str, Lineage], window_s: int = 60
) -> list[WindowPartial]:
    cells: dict[tuple[int, tuple[str, ...]], WindowPartial] = {}
    for r in results:
        known = lineage.get(r.request_id)
        if known is None:
            continue  # a score for a call we never saw: stored, but it has no scope to count toward
        if known.sample_reason in BOOSTED_REASONS:
            continue  # judged because it looked bad: kept for inspection, not for the quality average
        p = _partial(cells, r.ts.timestamp(), known.key, window_s)
        p.eval_count += 1
        p.eval_sum += r.score
        p.eval_sumsq += r.score * r.score
    return list(cells.values())


def feedback_partials(
    events: Iterable[WireFeedback], lineage: Mapping[str, Lineage], window_s: int = 60
) -> list[WindowPartial]:
    cells: dict[tuple[int, tuple[str, ...]], WindowPartial] = {}
    for e in events:
        known = lineage.get(e.request_id)
        if known is None:
            continue
        p = _partial(cells, e.ts.timestamp(), known.key, window_s)
        p.feedback_count += 1
        if e.thumbs == "up":
            p.thumbs_up += 1
        elif e.thumbs == "down":
            p.thumbs_down += 1
        if e.rating is not None:
            p.rated += 1
            p.rating_sum += e.rating
    return list(cells.values())


def thumbs_down_requests(events: Iterable[WireFeedback]) -> list[str]:
    """Request ids a user flagged: each asks for its call to be judged (if it was not already)."""
    return [e.request_id for e in events if e.thumbs == "down" or (e.rating is not None and e.rating <= 2)]
