"""JudgeSampler: choose which calls an LLM judge scores, deterministically.

The decision is a pure function of the call: xxh3-64 of the conversation id (else request
id, else event id) compared with the feature's rate. So every turn of a sampled conversation
is sampled (a judge needs the whole exchange), and the same call is chosen again in any
process, on any replay. Errors and refusals are the calls most worth judging, so they are
kept regardless of the rate, up to a cap per feature per hour so an outage cannot flood the
judge.
"""

from __future__ import annotations

from collections.abc import Callable
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

    def __call__(self, events: list[WireCall], ts: list[float]) -> list[JudgeSample]:
        h = xxhash.xxh3_64_intdigest
        threshold = self._threshold
        boosted = self._boosted
        cap = self.boost_cap_per_hour
        out: list[JudgeSample] = []
        for i, e in enumerate(events):
            if h(sample_key(e).encode()) < threshold(e.feature):
                reason = REASON_RATE
            elif e.status != "ok" or e.refusal:
                hour = (e.feature, int(ts[i] // 3600))
                n = boosted.get(hour, 0)
                if n >= cap:
                    continue
                boosted[hour] = n + 1
                reason = REASON_REFUSAL if e.refusal else REASON_ERROR
            else:
                continue
            if self._within_budget(e, ts[i]):
                out.append(JudgeSample(i, reason))
            else:
                self.capped += 1
        if len(boosted) + len(self._hourly) > 50_000:  # old hours are done with; keep memory bounded
            newest = max(hour for _, hour in [*boosted, *self._hourly])
            self._boosted = {k: v for k, v in boosted.items() if k[1] >= newest - 2}
            self._hourly = {k: v for k, v in self._hourly.items() if k[1] >= newest - 2}
            self._daily_usd = {k: v for k, v in self._daily_usd.items() if k[1] >= newest // 24 - 1}
        return out
