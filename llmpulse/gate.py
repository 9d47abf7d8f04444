"""``llmpulse gate``: may the candidate release be promoted over the baseline?

Compares two releases over the same period on per-call averages (a canary's totals are always
smaller), with the sample sizes and a confidence interval for quality, and fails — exit code 1,
usable in CI before a deploy — when a policy does not hold. The seed's example: quality
0.84 → 0.87, tokens 620 → 790 (+27.4%), p95 970 ms, limits 15% and 1000 ms: refused on tokens.

Each side is read through named queries (``sinks/queries/gate_calls.sql``, ``gate_quality.sql``)
that take ``{tenant:String}``: through ``llmpulse serve`` a tenant key gates its own traffic only.
Judge scores come from ``judge_scores``, which carries the call's team and provider, so every
selector narrows quality as it narrows calls. A metric without a limit is shown for information
and never decides the gate, nor makes it inconclusive.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from schemas.durations import parse_duration
from sinks import queries
from sinks.clickhouse import Connection

SELECTABLE = ("release_id", "prompt_version", "variant", "model", "feature", "team", "provider")
_HEX12 = re.compile(r"^[0-9a-f]{12}$")


NO_LIMIT = "—"
"""The verdict of a check no policy limits."""


class GateUsageError(ValueError):
    pass


def parse_time(text: str, now: float) -> float:
    """``--since``/``--until``: a duration back from now (``24h``, ``0s``) or an ISO 8601 time (UTC unless it says)."""
    try:
        return now - parse_duration(text)
    except (ValueError, TypeError):
        pass
    try:
        at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise GateUsageError(f"{text!r}: expected a duration back from now (24h, 30m) or an ISO 8601 time") from None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def describe_period(since: str, until: str | None) -> str:
    """The table's title as the user put it: ``over the last 24h``, ``from 24h ago to 1h ago``."""

    def point(text: str) -> str:
        try:
            parse_duration(text)
        except ValueError:
            return text
        return f"{text} ago"

    if until is None and point(since) != since:
        return f"over the last {since}"
    return f"from {point(since)} to {'now' if until is None else point(until)}"


def parse_selector(text: str) -> dict[str, str]:
    """``5f3a...`` (a release id) or ``variant=canary,prompt_version=v13``."""
    text = text.strip()
    if _HEX12.match(text):
        return {"release_id": text}
    out: dict[str, str] = {}
    for part in text.split(","):
        if "=" not in part:
            raise GateUsageError(f"{text!r}: expected a release id or key=value pairs over {', '.join(SELECTABLE)}")
        key, value = (x.strip() for x in part.split("=", 1))
        if key not in SELECTABLE:
            raise GateUsageError(f"{text!r}: cannot select on {key!r}; use {', '.join(SELECTABLE)}")
        if not value:  # '' means "any value" in the gate's queries
            raise GateUsageError(f"{text!r}: {key} needs a value; leave the key out to take any")
        out[key] = value
    return out


UNPRICED_TOLERANCE = 0.01
"""Share of a side's calls that may lack a cost (unknown model or usage) for the cost check to decide."""


@dataclass
class Side:
    label: str
    calls: int
    tokens_per_call: float | None
    output_tokens_per_call: float | None
    cost_per_call: float | None
    latency_p95_ms: float | None
    refusal_rate: float | None
    error_rate: float | None
    quality: float | None
    quality_n: int
    quality_ci: float | None
    """Half-width of the 95% confidence interval of the mean judge score."""
    unpriced: int = 0
    """Calls without a cost (unknown model or usage): ``cost_per_call`` is over the others."""


def _bound(selector: dict[str, str], start: float, end: float, tenant: str) -> dict[str, Any]:
    """The parameters of ``gate_calls``/``gate_quality``: every selectable key ('' = any), the period
    in whole seconds (both ends included), and the tenant ('' = every tenant; a tenant key's own
    tenant replaces it on the server)."""
    return {
        **dict.fromkeys(SELECTABLE, ""),
        **selector,
        "start": datetime.fromtimestamp(int(start), UTC),
        "end": datetime.fromtimestamp(int(end), UTC),
        "tenant": tenant,
    }


def measure(conn: Connection, selector: dict[str, str], start: float, end: float, label: str,
            tenant: str = "") -> Side:  # fmt: skip
    """One side over ``[start, end]``, through named queries so a tenant key can gate through the server."""
    params = _bound(selector, start, end, tenant)
    (calls_row,) = queries.run(conn.client, "gate_calls", **params)
    (q_row,) = queries.run(conn.client, "gate_quality", **params)
    n = int(q_row["n"] or 0)
    quality = ci = None
    if n:
        mean = q_row["score_sum"] / n
        var = max(q_row["score_sumsq"] / n - mean * mean, 0.0) * n / max(n - 1, 1)
        quality, ci = mean, 1.96 * math.sqrt(var / n)
    calls = int(calls_row["calls"] or 0)

    def num(key: str) -> float | None:
        v = calls_row[key]
        return None if v is None or (isinstance(v, float) and math.isnan(v)) or not calls else float(v)

    return Side(label, calls, num("tokens_per_call"), num("output_tokens_per_call"), num("cost_per_call"),
                num("latency_p95_ms"), num("refusal_rate"), num("error_rate"), quality, n, ci,
                int(calls_row.get("unpriced") or 0))  # fmt: skip


@dataclass(frozen=True)
class Policy:
    max_token_increase: float | None = None
    max_cost_increase: float | None = None
    max_p95_ms: float | None = None
    max_p95_increase: float | None = None
    min_quality_delta: float | None = None
    max_refusal_increase: float | None = None
    max_error_increase: float | None = None
    min_calls: int = 50
    min_judged: int = 30


@dataclass
class Check:
    metric: str
    baseline: str
    candidate: str
    change: str
    limit: str
    verdict: str
    """pass | FAIL | no data | — (no limit set: shown for information, never decides the gate)"""


@dataclass
class GateResult:
    baseline: Side
    candidate: Side
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.verdict != "FAIL" for c in self.checks)

    @property
    def conclusive(self) -> bool:
        return all(c.verdict != "no data" for c in self.checks)


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    if unit == "%":
        return f"{v:.1%}"
    if unit == "$":
        return f"${v:.5f}"
    return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"


def _rel(b: float | None, c: float | None) -> float | None:
    return None if b in (None, 0) or c is None else (c - b) / b  # type: ignore[operator]


def evaluate(baseline: Side, candidate: Side, p: Policy) -> GateResult:
    r = GateResult(baseline, candidate)
    enough = baseline.calls >= p.min_calls and candidate.calls >= p.min_calls
    r.checks.append(Check("calls (sample size)", f"{baseline.calls:,}", f"{candidate.calls:,}", "",
                          f">= {p.min_calls:,} each", "pass" if enough else "no data"))  # fmt: skip

    def relative(name: str, b: float | None, c: float | None, limit: float | None, unit: str = "",
                 trusted: bool = True) -> Check:  # fmt: skip
        change = _rel(b, c)
        if limit is None:  # nothing asked of it: a baseline of 0 cannot stall the gate
            verdict = shown = NO_LIMIT
        else:
            verdict = (
                "no data" if change is None or not enough or not trusted else ("pass" if change <= limit else "FAIL")
            )
            shown = f"<= {limit:+.0%}"
        check = Check(name, _fmt(b, unit), _fmt(c, unit), f"{change:+.1%}" if change is not None else "—", shown,
                      verdict)  # fmt: skip
        r.checks.append(check)
        return check

    relative("tokens per call", baseline.tokens_per_call, candidate.tokens_per_call, p.max_token_increase)
    # A side with calls of unknown cost compares only if they are a sliver of it: counted as $0, an
    # unpriced model passed any cost limit (-100%); left out, they may be where the cost went.
    trusted = all(s.unpriced <= UNPRICED_TOLERANCE * s.calls for s in (baseline, candidate))
    cost = relative("cost per call", baseline.cost_per_call, candidate.cost_per_call, p.max_cost_increase, "$",
                    trusted)  # fmt: skip
    for side, attr in ((baseline, "baseline"), (candidate, "candidate")):
        if side.unpriced:
            setattr(cost, attr, f"{getattr(cost, attr)} ({side.unpriced:,} without a cost)")
    if p.max_cost_increase is not None and enough and candidate.unpriced > UNPRICED_TOLERANCE * candidate.calls:
        cost.verdict = "FAIL"  # a candidate whose cost cannot be shown within the limit: not promoted, even
        # with --allow-inconclusive (a baseline without costs stays "no data": the candidate is not to blame)
    relative("p95 latency (ms)", baseline.latency_p95_ms, candidate.latency_p95_ms, p.max_p95_increase)
    if p.max_p95_ms is not None:
        v = candidate.latency_p95_ms
        verdict = "no data" if v is None or not enough else ("pass" if v <= p.max_p95_ms else "FAIL")
        r.checks.append(Check("p95 latency, candidate (ms)", "", _fmt(v), "", f"<= {p.max_p95_ms:,.0f}", verdict))
    for name, b, c, limit in (
        ("refusal rate", baseline.refusal_rate, candidate.refusal_rate, p.max_refusal_increase),
        ("error rate", baseline.error_rate, candidate.error_rate, p.max_error_increase),
    ):
        change = None if b is None or c is None else c - b
        verdict = NO_LIMIT
        if limit is not None:
            verdict = "no data" if change is None or not enough else ("pass" if change <= limit else "FAIL")
        r.checks.append(Check(name, _fmt(b, "%"), _fmt(c, "%"), f"{change:+.1%}" if change is not None else "—",
                              f"<= {limit:+.1%}" if limit is not None else "—", verdict))  # fmt: skip
    bq, cq = baseline.quality, candidate.quality
    delta = None if bq is None or cq is None else cq - bq
    judged = baseline.quality_n >= p.min_judged and candidate.quality_n >= p.min_judged
    if p.min_quality_delta is None:
        verdict = NO_LIMIT
    else:
        verdict = "no data" if delta is None or not judged else ("pass" if delta >= p.min_quality_delta else "FAIL")

    def q(side: Side) -> str:
        if side.quality is None:
            return "— (0 judged)"
        return f"{side.quality:.3f} ±{side.quality_ci or 0:.3f} (n={side.quality_n:,})"

    r.checks.append(Check("quality (judge score)", q(baseline), q(candidate),
                          f"{delta:+.3f}" if delta is not None else "—",
                          f">= {p.min_quality_delta:+.3f}" if p.min_quality_delta is not None else "—",
                          verdict))  # fmt: skip
    return r
