"""JudgeSampler: choose which calls an LLM judge scores, deterministically.

The decision is a pure function of the call: xxh3-64 of the conversation id (else request
id, else event id) compared with the feature's rate. So every turn of a sampled conversation
is sampled (a judge needs the whole exchange), and the same call is chosen again in any
process, on any replay. Errors and refusals are the calls most worth judging, so they are
kept regardless of the rate, up to a cap per feature per hour so an outage cannot flood the
judge; so are calls a user flags later (``JudgeSampler.flagged``), under the same cap and budgets.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import xxhash

from schemas.wire import WireCall

_SPACE = 2**64

REASON_RATE = "rate"
REASON_ERROR = "error"
REASON_REFUSAL = "refusal"
REASON_FLAGGED = "thumbs_down"
BOOSTED_REASONS = frozenset({REASON_ERROR, REASON_REFUSAL, REASON_FLAGGED})
"""Samples taken because the call looked bad. Worth judging, but a score averaged over them
says nothing about a release's quality, so the rolling eval score leaves them out (the
``eval_1h`` view filters the same list)."""


@dataclass(frozen=True, slots=True)
class JudgeSample:
    """One sampled call; the runtime stores it and (Kafka path) publishes it for the judge."""

    index: int
    """Position in the batch the sample was taken from."""
    reason: str


def sample_key(e: WireCall) -> str:
    """Sticky unit of sampling: the conversation, else the request, else the event."""
    return e.conversation_id or e.request_id or e.event_id


@dataclass(frozen=True, slots=True)
class JudgeBudget:
    """What a feature may spend on judging: judged calls per hour, estimated judge USD per day."""

    max_per_hour: int | None = None
    usd_per_day: float | None = None


class JudgeSampler:
    """Sticky, stratified (a rate per feature), boosted for errors and refusals, and capped.

    The caps bound cost: a feature's judged calls per hour and its estimated judge spend per
    day (``judge_cost`` estimates what judging one call costs). A sticky conversation that hits
    a cap simply stops being judged for the rest of that hour or day; the skips are counted.
    Thread-safe: the worker samples a batch in one thread while flagged calls arrive in another.
    """

    def __init__(
        self,
        default_rate: float = 0.02,
        rates: dict[str, float] | None = None,
        boost_cap_per_hour: int = 200,
        budget: JudgeBudget | None = None,
        budgets: dict[str, JudgeBudget] | None = None,
        judge_cost: Callable[[WireCall], float] | None = None,
    ) -> None:
        for name, r in {"default": default_rate, **(rates or {})}.items():
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"sampling rate for {name} must be within 0..1, got {r}")
        self.default_rate = default_rate
        self.rates = dict(rates or {})
        self.boost_cap_per_hour = boost_cap_per_hour
        self.budget = budget or JudgeBudget()
        self.budgets = dict(budgets or {})
        self.judge_cost = judge_cost
        self._thresholds: dict[str, float] = {}
        self._boosted: dict[tuple[str, int], int] = {}
        self._hourly: dict[tuple[str, int], int] = {}
        self._daily_usd: dict[tuple[str, int], float] = {}
        self.capped = 0
        """Calls that would have been judged but for a budget."""
        self._lock = threading.Lock()

    def has_seen(self, feature: str) -> bool:
        """Whether this sampler has counted calls of ``feature`` (its partition carries them)."""
        return feature in self._thresholds

    def _threshold(self, feature: str) -> float:
        t = self._thresholds.get(feature)
        if t is None:
            t = self.rates.get(feature, self.default_rate) * _SPACE
            self._thresholds[feature] = t
        return t

    def _within_budget(self, e: WireCall, t: float) -> bool:
        budget = self.budgets.get(e.feature, self.budget)
        if budget.max_per_hour is None and budget.usd_per_day is None:
            return True
        hour = (e.feature, int(t // 3600))
        if budget.max_per_hour is not None and self._hourly.get(hour, 0) >= budget.max_per_hour:
            return False
        if budget.usd_per_day is not None and self.judge_cost is not None:
            day = (e.feature, int(t // 86400))
            spent = self._daily_usd.get(day, 0.0) + self.judge_cost(e)
            if spent > budget.usd_per_day:
                return False
            self._daily_usd[day] = spent
        self._hourly[hour] = self._hourly.get(hour, 0) + 1
        return True

    def _boost(self, e: WireCall, t: float) -> bool:
        """A call worth judging because it looked bad: within the feature's boost cap and budget.

        The boost slot is taken only once the budget said yes, so calls the budget refused do
        not use up the hour's boost cap."""
        hour = (e.feature, int(t // 3600))
        n = self._boosted.get(hour, 0)
        if n >= self.boost_cap_per_hour:
            return False
        if not self._within_budget(e, t):
            self.capped += 1
            return False
        self._boosted[hour] = n + 1
        return True

    def __call__(self, events: list[WireCall], ts: list[float]) -> list[JudgeSample]:
        with self._lock:
            return self._sample(events, ts)

    def _sample(self, events: list[WireCall], ts: list[float]) -> list[JudgeSample]:
        h = xxhash.xxh3_64_intdigest
        threshold = self._threshold
        out: list[JudgeSample] = []
        for i, e in enumerate(events):
            if h(sample_key(e).encode()) < threshold(e.feature):
                if self._within_budget(e, ts[i]):
                    out.append(JudgeSample(i, REASON_RATE))
                else:
                    self.capped += 1
            elif (e.status != "ok" or e.refusal) and self._boost(e, ts[i]):
                out.append(JudgeSample(i, REASON_REFUSAL if e.refusal else REASON_ERROR))
        self._forget_old_hours()
        return out

    def flagged(self, events: list[WireCall], ts: list[float]) -> list[JudgeSample]:
        """Calls a user flagged after the fact (thumbs-down, low rating) that the stream did not sample.

        They are boosted samples like errors and refusals, so the same boost cap and budgets
        bound them: a flood of thumbs-downs cannot buy unlimited judging. ``ts`` is when each was
        flagged (now), not when the call was served: the judging happens now, so it is this hour's
        and this day's budget it spends. Charged to the calls' own hours, thumbs-downs on calls
        spread over many past hours would each find a fresh cap.
        """
        with self._lock:
            out = [JudgeSample(i, REASON_FLAGGED) for i, e in enumerate(events) if self._boost(e, ts[i])]
            self._forget_old_hours()
        return out

    def _forget_old_hours(self) -> None:
        if len(self._boosted) + len(self._hourly) > 50_000:  # old hours are done with; keep memory bounded
            newest = max(hour for _, hour in [*self._boosted, *self._hourly])
            self._boosted = {k: v for k, v in self._boosted.items() if k[1] >= newest - 2}
            self._hourly = {k: v for k, v in self._hourly.items() if k[1] >= newest - 2}
            self._daily_usd = {k: v for k, v in self._daily_usd.items() if k[1] >= newest // 24 - 1}


def pick_sampler(samplers: Sequence[JudgeSampler], feature: str) -> JudgeSampler:
    """The sampler whose budgets a flagged call of ``feature`` counts against.

    llm.calls is keyed by feature, so one partition's sampler holds a feature's hourly and daily
    counts: the one that has seen it. A feature none has seen yet goes to the first, always the
    same one, so its flagged calls still share one budget.
    """
    return next((s for s in samplers if s.has_seen(feature)), samplers[0])
