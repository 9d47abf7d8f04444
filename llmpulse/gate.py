"""``llmpulse gate``: may the candidate release be promoted over the baseline?

Compares two releases over the same period on per-call averages (a canary's totals are always
smaller), with the sample sizes and a confidence interval for quality, and fails — exit code 1,
usable in CI before a deploy — when a policy does not hold. The seed's example: quality
0.84 → 0.87, tokens 620 → 790 (+27.4%), p95 970 ms, limits 15% and 1000 ms: refused on tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from sinks.clickhouse import Connection
from sinks.queries.metrics import sql_literal

SELECTABLE = ("release_id", "prompt_version", "variant", "model", "feature", "team", "provider")
_HEX12 = re.compile(r"^[0-9a-f]{12}$")


class GateUsageError(ValueError):
    pass


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
        out[key] = value
    return out


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


def _where(selector: dict[str, str], alias: str) -> str:
    return " AND ".join(f"{alias}.{k} = {sql_literal(v)}" for k, v in sorted(selector.items())) or "1"


def measure(conn: Connection, selector: dict[str, str], start: float, end: float, label: str) -> Side:
    client = conn.client
    span = f"BETWEEN toDateTime({int(start)}) AND toDateTime({int(end)})"
    calls_row = client.query(
        "SELECT sum(r.calls), sum(r.input_tokens + r.output_tokens) / sum(r.calls), "
        "sum(r.output_tokens) / sum(r.calls), sum(r.cost_usd) / sum(r.calls), "
        "quantilesTDigestMerge(0.5, 0.9, 0.95, 0.99)(r.latency_ms_q)[3], sum(r.refusals) / sum(r.calls), "
        f"sum(r.errors) / sum(r.calls) FROM llm_calls_1m AS r WHERE {_where(selector, 'r')} AND r.minute {span}"
    ).result_rows[0]
    eval_selector = {k: v for k, v in selector.items() if k in ("release_id", "prompt_version", "variant", "model",
                                                                 "feature")}  # fmt: skip
    q_row = client.query(
        "SELECT sum(e.n), sum(e.score_sum), sum(e.score_sumsq) FROM eval_1h AS e "
        # verdicts roll up per hour: the hour the period starts in counts whole
        f"WHERE {_where(eval_selector, 'e')} AND e.hour BETWEEN toStartOfHour(toDateTime({int(start)})) "
        f"AND toDateTime({int(end)})"
    ).result_rows[0]
    n = int(q_row[0] or 0)
    quality = ci = None
    if n:
        mean = q_row[1] / n
        var = max(q_row[2] / n - mean * mean, 0.0) * n / max(n - 1, 1)
        quality, ci = mean, 1.96 * math.sqrt(var / n)
    calls = int(calls_row[0] or 0)

    def num(v: Any) -> float | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) or not calls else float(v)

    return Side(label, calls, num(calls_row[1]), num(calls_row[2]), num(calls_row[3]), num(calls_row[4]),
                num(calls_row[5]), num(calls_row[6]), quality, n, ci)  # fmt: skip


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
    """pass | FAIL | no data"""


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

    def relative(name: str, b: float | None, c: float | None, limit: float | None, unit: str = "") -> None:
        change = _rel(b, c)
        if limit is None:
            verdict = "pass" if change is not None else "no data"
            shown = "—"
        else:
            verdict = "no data" if change is None or not enough else ("pass" if change <= limit else "FAIL")
            shown = f"<= {limit:+.0%}"
        r.checks.append(Check(name, _fmt(b, unit), _fmt(c, unit), f"{change:+.1%}" if change is not None else "—",
                              shown, verdict))  # fmt: skip

    relative("tokens per call", baseline.tokens_per_call, candidate.tokens_per_call, p.max_token_increase)
    relative("cost per call", baseline.cost_per_call, candidate.cost_per_call, p.max_cost_increase, "$")
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
        verdict = "pass"
        if limit is not None:
            verdict = "no data" if change is None or not enough else ("pass" if change <= limit else "FAIL")
        r.checks.append(Check(name, _fmt(b, "%"), _fmt(c, "%"), f"{change:+.1%}" if change is not None else "—",
                              f"<= {limit:+.1%}" if limit is not None else "—", verdict))  # fmt: skip
    bq, cq = baseline.quality, candidate.quality
    delta = None if bq is None or cq is None else cq - bq
    judged = baseline.quality_n >= p.min_judged and candidate.quality_n >= p.min_judged
    if p.min_quality_delta is None:
        verdict = "pass"
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
