"""JudgeSampler: choose which calls an LLM judge scores, deterministically.

The decision is a pure function of the call: xxh3-64 of the conversation id (else request
id, else event id) compared with the feature's rate. So every turn of a sampled conversation
is sampled (a judge needs the whole exchange), and the same call is chosen again in any
process, on any replay. Errors and refusals are the calls most worth judging, so they are
kept regardless of the rate, up to a cap per feature per hour so an outage cannot flood the
judge.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from schemas.wire import WireCall

_SPACE = 2**64

REASON_RATE = "rate"
REASON_ERROR = "error"
REASON_REFUSAL = "refusal"


@dataclass(frozen=True, slots=True)
class JudgeSample:
    """One sampled call; the runtime stores it and (Kafka path) publishes it for the judge."""

    index: int
    """Position in the batch the sample was taken from."""
    reason: str


def sample_key(e: WireCall) -> str:
    """Sticky unit of sampling: the conversation, else the request, else the event."""
    return e.conversation_id or e.request_id or e.event_id


class JudgeSampler:
    def __init__(
        self,
        default_rate: float = 0.02,
        rates: dict[str, float] | None = None,
        boost_cap_per_hour: int = 200,
    ) -> None:
        for name, r in {"default": default_rate, **(rates or {})}.items():
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"sampling rate for {name} must be within 0..1, got {r}")
        self.default_rate = default_rate
        self.rates = dict(rates or {})
        self.boost_cap_per_hour = boost_cap_per_hour
        self._thresholds: dict[str, float] = {}
        self._boosted: dict[tuple[str, int], int] = {}

    def _threshold(self, feature: str) -> float:
        t = self._thresholds.get(feature)
        if t is None:
            t = self.rates.get(feature, self.default_rate) * _SPACE
            self._thresholds[feature] = t
        return t

    def __call__(self, events: list[WireCall], ts: list[float]) -> list[JudgeSample]:
        h = xxhash.xxh3_64_intdigest
        threshold = self._threshold
        boosted = self._boosted
        cap = self.boost_cap_per_hour
        out: list[JudgeSample] = []
        for i, e in enumerate(events):
            if h(sample_key(e).encode()) < threshold(e.feature):
                out.append(JudgeSample(i, REASON_RATE))
                continue
            if e.status != "ok" or e.refusal:
                hour = (e.feature, int(ts[i] // 3600))
                n = boosted.get(hour, 0)
                if n < cap:
                    boosted[hour] = n + 1
                    out.append(JudgeSample(i, REASON_REFUSAL if e.refusal else REASON_ERROR))
        if len(boosted) > 50_000:  # old hours are done with; keep memory bounded
            newest = max(hour for _, hour in boosted)
            self._boosted = {k: v for k, v in boosted.items() if k[1] >= newest - 2}
        return out
