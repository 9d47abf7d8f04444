"""The alert rules file: what to watch, at which scope, when to page, and who hears it.

YAML, validated with pydantic; every error names the file, the rule (by name, else its
position) and the key, because a rules file is edited at 3 a.m. too. Budgets live in the
same file: a budget is a rule about cumulative spend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from schemas.channels import AlertAction, AlertSeverity
from schemas.durations import Duration
from schemas.files import read_yaml

SCOPE_DIMENSIONS = ("feature", "team", "model", "provider", "prompt_version", "variant")
"""What a rule may group by and filter on (the stream keeps partials at this grain)."""

METRICS: dict[str, str] = {
    "calls": "calls in the window",
    "cost_usd": "spend in the window (USD)",
    "cost_per_call_usd": "average cost per call with a cost (USD; min_calls counts those calls)",
    "error_rate": "share of calls with status != ok",
    "timeout_rate": "share of calls that timed out",
    "rate_limited_rate": "share of calls that were rate limited",
    "refusal_rate": "share of calls the model refused",
    "price_missing": "calls that could not be priced (unknown model)",
    "input_tokens": "input tokens in the window",
    "output_tokens": "output tokens in the window",
    "output_tokens_avg": "average output tokens per call",
    "cached_input_share": "share of input tokens read from a prompt cache",
    "output_chars_avg": "average output length (characters)",
    "schema_valid_rate": "share of structured outputs that validated",
    "tool_call_rate": "share of calls that used tools",
    "latency_avg_ms": "mean latency (ms)",
    "latency_p50_ms": "median latency (ms)",
    "latency_p95_ms": "95th percentile latency (ms)",
    "latency_p99_ms": "99th percentile latency (ms)",
    "ttft_p50_ms": "median time to first token (ms)",
    "ttft_p95_ms": "95th percentile time to first token (ms)",
    "ttft_p99_ms": "99th percentile time to first token (ms)",
    "output_tokens_p50": "median output tokens per call",
    "output_tokens_p95": "95th percentile output tokens per call",
    "output_tokens_psi": "PSI of the window's output-length distribution against the scope's trailing 24 windows",
    "response_models_new": "snapshots (response_model) answering that the scope's trailing 24 windows did not see",
    "unpinned_model_share": "share of calls that named a model alias (gpt-4o) rather than a pinned snapshot",
    "flows": "multi-call flows (agent runs by trace_id, conversation turns) that finished in the window",
    "flow_calls_avg": "calls per finished flow",
    "flow_tokens_avg": "tokens (input + output) per finished flow",
    "flow_cost_usd_avg": "cost per finished flow whose every call had a cost (USD; min_calls counts those flows)",
    "flow_perceived_avg_ms": "mean perceived latency of finished flows: first call's start to last call's end (ms)",
    "flow_perceived_p50_ms": "median perceived latency of finished flows (ms)",
    "flow_perceived_p95_ms": "95th percentile perceived latency of finished flows (ms)",
    "pipeline_lag_s": "how far the pipeline's watermark trails the wall clock (s)",
    "eval_score": "mean LLM-judge score (0..1) of the judge results that arrived in the window",
    "thumbs_down_rate": "share of thumbs given that were down",
    "rating_avg": "mean user rating (1-5)",
}
"""Metrics the stream computes per window. Processors may register more (eval score, drift):
``register_metric`` adds them, and rules can use any registered name."""

QUALITY_METRICS_PREFIXES = ("eval_", "thumbs_down", "rating", "schema_valid", "drift_", "psi_")
"""A breach of these is a quality problem: the default action is to pause the release for review."""


def is_rate(metric: str) -> bool:
    """Rates are proportions of calls (0 to 1): their noise is binomial, and their baseline is pooled."""
    return metric.endswith(("_rate", "_share"))


def register_metric(name: str, description: str) -> None:
    METRICS.setdefault(name, description)


def default_action(metric: str) -> AlertAction:
    """Quality-only breaches pause for review; latency, errors and refusals roll back; the rest notify."""
    if metric.startswith(QUALITY_METRICS_PREFIXES):
        return "pause_for_review"
    if metric.startswith(("latency_", "ttft_")) or metric in {
        "error_rate", "timeout_rate", "rate_limited_rate", "refusal_rate",
    }:  # fmt: skip
        return "rollback"
    if metric in {"calls", "pipeline_lag_s"}:
        return "page"
    return "notify"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Scope(_Model):
    """Group by some dimensions, optionally only where others have given values."""

    by: list[str] = Field(default_factory=list)
    where: dict[str, str] = Field(default_factory=dict)

    @field_validator("by")
    @classmethod
    def _known_dims(cls, v: list[str]) -> list[str]:
        for d in v:
            if d not in SCOPE_DIMENSIONS:
                raise ValueError(f"unknown dimension {d!r}; expected some of {', '.join(SCOPE_DIMENSIONS)}")
        if len(set(v)) != len(v):
            raise ValueError("a dimension is listed twice")
        return v

    @field_validator("where")
    @classmethod
    def _known_filter_dims(cls, v: dict[str, str]) -> dict[str, str]:
        for d in v:
            if d not in SCOPE_DIMENSIONS:
                raise ValueError(f"unknown dimension {d!r}; expected some of {', '.join(SCOPE_DIMENSIONS)}")
        return v

    @property
    def dims(self) -> tuple[str, ...]:
        """The grain partials must be projected to: grouped and filtered dimensions together."""
        return tuple(d for d in SCOPE_DIMENSIONS if d in self.by or d in self.where)


class Spike(_Model):
    """Compare the window with a trailing baseline of ``baseline`` windows of the same scope.

    With both ``ratio`` and ``zscore`` a window must pass both: big and unlikely to be noise.
    """

    ratio: Annotated[float, Field(gt=1)] | None = None
    """Breach when value > ratio × baseline (median or EWMA; the pooled rate for ``*_rate``)."""
    zscore: Annotated[float, Field(gt=0)] | None = None
    """Breach when the window is this many standard errors above the baseline (binomial for
    rates: a refusal rate over 40 calls is noisier than over 4,000)."""
    baseline: Annotated[int, Field(ge=3, le=10_000)] = 24
    method: Literal["median", "ewma"] = "median"
    min_baseline: Annotated[int, Field(ge=1)] | None = None
    """Windows of history needed before the rule can breach (default: half of ``baseline``)."""
    direction: Literal["up", "down", "both"] = "up"
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    """The value must also differ from the baseline by at least this much (absolute): a refusal
    rate going from 0.1% to 0.3% is a 3× ratio but nothing to page about."""

    @model_validator(mode="after")
    def _one_test(self) -> Spike:
        if self.ratio is None and self.zscore is None:
            raise ValueError("a spike needs `ratio` and/or `zscore`")
        return self


class Absent(_Model):
    """Calls dropped to zero for a scope that had traffic in the trailing baseline."""

    baseline: Annotated[int, Field(ge=1, le=10_000)] = 12
    min_baseline_calls: Annotated[int, Field(ge=1)] = 10
    """Calls the scope must have had over the baseline windows for silence to mean something."""
    min_active_windows: Annotated[int, Field(ge=1)] | None = None
    """Of the last windows, how many in a row must have had calls for silence to page [all
    ``baseline`` windows]: bursty scopes are silent between bursts and must not flap."""
    max_silence_probability: Annotated[float, Field(gt=0, le=1)] = 0.001
    """Page only when a silent window was this improbable given those windows' counts (Poisson,
    or negative binomial where traffic is burstier than Poisson)."""

    @model_validator(mode="after")
    def _active_within_baseline(self) -> Absent:
        if self.min_active_windows is not None and self.min_active_windows > self.baseline:
            raise ValueError(
                f"min_active_windows ({self.min_active_windows}) must be at most baseline ({self.baseline}): "
                "only that many windows are kept"
            )
        return self


class Rule(_Model):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
    metric: str
    scope: Scope = Field(default_factory=Scope)
    window: Duration = 60.0
    max: float | None = None
    min: float | None = None
    spike: Spike | None = None
    absent: Absent | None = None
    for_: Annotated[int, Field(ge=1, le=1000, alias="for")] = 1
    """Consecutive breaching windows before firing."""
    clear_for: Annotated[int, Field(ge=1, le=1000)] = 1
    """Consecutive clear windows before resolving."""
    hysteresis: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """A threshold alert resolves only once the value is this fraction back inside the limit."""
    cooldown: Duration = 0.0
    """After a resolve, the same scope cannot fire again for this long."""
    min_calls: Annotated[int, Field(ge=0)] = 20
    """Windows with fewer calls carry no evidence either way (for eval_score: judged calls; for
    thumbs_down_rate and rating_avg: feedback received)."""
    severity: AlertSeverity = "warning"
    action: AlertAction | None = None
    """Default: by metric (quality → pause_for_review, latency/errors/refusals → rollback, ...)."""
    channels: list[str] = Field(default_factory=list)
    runbook_url: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    description: str = ""

    @field_validator("scope", mode="before")
    @classmethod
    def _scope_shorthand(cls, v: Any) -> Any:
        """``scope: [feature, model]`` is ``scope: {by: [feature, model]}``."""
        if isinstance(v, list):
            return {"by": v}
        if isinstance(v, str):
            return {"by": [v]}
        return v

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; known: {', '.join(sorted(METRICS))}")
        return v

    @field_validator("window")
    @classmethod
    def _whole_minutes(cls, v: float) -> float:
        if v < 60 or v % 60:
            raise ValueError("window must be a whole number of minutes (the stream closes 1-minute windows)")
        return v

    @model_validator(mode="after")
    def _one_condition(self) -> Rule:
        given = [k for k in ("max", "min", "spike", "absent") if getattr(self, k) is not None]
        if len(given) != 1 and not (set(given) == {"max", "min"}):
            raise ValueError(f"a rule needs exactly one condition: max, min, spike or absent (got {given or 'none'})")
        if self.absent is not None and self.metric != "calls":
            raise ValueError("`absent` watches calls; use metric: calls")
        return self

    @field_validator("max", "min")
    @classmethod
    def _reachable_for_a_fraction(cls, v: float | None, info: ValidationInfo) -> float | None:
        """A rate is a fraction of calls: ``max: 10`` meant 10% and would never trip."""
        metric = info.data.get("metric", "")
        if v is None or not is_rate(metric):
            return v
        if info.field_name == "max" and v > 1:  # max 1: "never", harmless; 10 meant 10%
            raise ValueError(
                f"{metric} is a fraction from 0 to 1, so it never exceeds {v:g} (for {v:g}% write {v / 100:g})"
            )
        if info.field_name == "min" and v <= 0:
            raise ValueError(f"{metric} is a fraction from 0 to 1, so it is never under {v:g}")
        return v

    @property
    def effective_action(self) -> AlertAction:
        return self.action or default_action(self.metric)

    def describe(self) -> str:
        if self.absent is not None:
            return f"no calls for a scope that had traffic over the last {self.absent.baseline} windows"
        if self.spike is not None:
            parts = []
            if self.spike.ratio is not None:
                parts.append(f"> {self.spike.ratio:g}× the {self.spike.method} of the last {self.spike.baseline}")
            if self.spike.zscore is not None:
                parts.append(f"z-score > {self.spike.zscore:g}")
            cond = f"{self.metric} {' and '.join(parts)}"
        else:
            bounds = []
            if self.max is not None:
                bounds.append(f"> {self.max:g}")
            if self.min is not None:
                bounds.append(f"< {self.min:g}")
            cond = f"{self.metric} {' or '.join(bounds)}"
        suffix = f" for {self.for_} windows" if self.for_ > 1 else ""
        return f"{cond}{suffix} ({int(self.window // 60)}m windows)"


class Budget(_Model):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
    scope: dict[str, str]
    """Which spend counts, e.g. ``{team: search}`` or ``{feature: support-chat}``."""
    period: Literal["day", "month"] = "month"
    limit_usd: Annotated[float, Field(gt=0)]
    warn_at: list[Annotated[float, Field(gt=0, le=2)]] = Field(default_factory=lambda: [0.5, 0.8, 1.0])
    severity: AlertSeverity = "warning"
    channels: list[str] = Field(default_factory=list)
    runbook_url: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("scope")
    @classmethod
    def _scope_dims(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("a budget needs a scope, e.g. {team: search}")
        for d in v:
            if d not in SCOPE_DIMENSIONS:
                raise ValueError(f"unknown dimension {d!r}; expected some of {', '.join(SCOPE_DIMENSIONS)}")
        return v

    @field_validator("warn_at")
    @classmethod
    def _sorted(cls, v: list[float]) -> list[float]:
        return sorted(set(v))


class RulesFile(_Model):
    rules: list[Rule] = Field(default_factory=list)
    budgets: list[Budget] = Field(default_factory=list)

    @property
    def scope_dims(self) -> set[tuple[str, ...]]:
        """The grains stage 1 must publish partials at: what the rules and budgets group by."""
        dims = {r.scope.dims for r in self.rules}
        dims |= {tuple(d for d in SCOPE_DIMENSIONS if d in b.scope) for b in self.budgets}
        return dims

    @model_validator(mode="after")
    def _unique_names(self) -> RulesFile:
        seen: dict[str, str] = {}
        entries = [(r.name, f"rules #{i + 1}") for i, r in enumerate(self.rules)]
        entries += [(b.name, f"budgets #{i + 1}") for i, b in enumerate(self.budgets)]
        for name, where in entries:
            if name in seen:
                raise ValueError(f"rule/budget name {name!r} is used twice ({seen[name]} and {where})")
            seen[name] = where
        return self


class RulesError(ValueError):
    """A rules file that cannot be used; the message names file, rule and key."""


def parse_rules(data: Any, source: str) -> RulesFile:
    try:
        return RulesFile.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise RulesError(_describe(exc, data, source)) from exc


def check_channels(rules: RulesFile, configured: Collection[str], source: str) -> None:
    """Every channel a rule or budget names must be configured: naming channels replaces the
    defaults, so a typo sent that alert nowhere, with one log line when it first fired."""
    problems = [
        f"{source}: {kind} {entry.name!r}: key `channels`: {name!r} is not a configured channel "
        f"(alerting.channels has: {', '.join(sorted(configured)) or 'none'})"
        for kind, entries in (("rule", rules.rules), ("budget", rules.budgets))
        for entry in entries
        for name in entry.channels
        if name not in configured
    ]
    if problems:
        raise RulesError("\n".join(problems))


def load_rules(path: Path) -> RulesFile:
    return parse_rules(read_yaml(path, "rules file", RulesError), str(path))


def default_rules() -> RulesFile:
    from importlib import resources

    text = resources.files("schemas").joinpath("data/default_rules.yaml").read_text(encoding="utf-8")
    return parse_rules(yaml.safe_load(text), "schemas/data/default_rules.yaml (built-in)")


def _describe(exc: ValidationError, data: Any, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = ""
        if len(loc) >= 2 and loc[0] in ("rules", "budgets") and isinstance(loc[1], int):
            section, index = loc[0], loc[1]
            name = None
            with contextlib.suppress(KeyError, IndexError, TypeError, AttributeError):
                name = data[section][index].get("name")
            kind = "rule" if section == "rules" else "budget"
            where = f"{kind} {name!r}" if isinstance(name, str) else f"{kind} #{index + 1}"
            loc = loc[2:]
        key = ".".join(str(p) for p in loc if not str(p).startswith("function-")) or "(the entry)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] != "missing" and "input" in err and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{source}: {where + ': ' if where else ''}key `{key}`: {msg}")
    return "\n".join(lines)
