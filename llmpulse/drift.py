"""``llmpulse drift``: each feature and model's recent window against a baseline period.

The baseline is the trailing days before the window, or a pinned reference period (the week a
release was signed off, say). Scalar metrics and the output-length distribution come from the
rollups (``drift_by_model.sql``, ``drift_feedback.sql``); the snapshots that served each model
from the raw table (``response_models.sql``). Judgement is ``processors.drift``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from processors.drift import (
    Change,
    ServedBy,
    VersionFinding,
    psi,
    psi_reading,
    rate_change,
    relative_change,
    version_findings,
)
from sinks import queries
from sinks.clickhouse import Connection


@dataclass(frozen=True)
class Thresholds:
    length: float = 0.2
    """Relative change of mean or p95 output tokens that counts as drift."""
    rate_points: float = 0.02
    """Absolute change of a rate (refusal, schema-valid, tool-call, thumbs-down) that counts, if
    it is also beyond noise."""
    psi: float = 0.2
    min_calls: int = 50
    """Calls needed on both sides before a feature/model is judged at all."""


@dataclass
class ModelDrift:
    feature: str
    model: str
    calls: int
    baseline_calls: int
    changes: list[Change] = field(default_factory=list)
    psi: float | None = None

    @property
    def drifted(self) -> bool:
        return any(c.drifted for c in self.changes)


@dataclass
class DriftReport:
    window: tuple[datetime, datetime]
    baseline: tuple[datetime, datetime]
    thresholds: Thresholds
    models: list[ModelDrift]
    versions: dict[str, list[VersionFinding]] = field(default_factory=dict)
    """Per requested model: a snapshot switch in the window, or an alias (unpinned) called in it."""
    features: dict[str, list[str]] = field(default_factory=dict)
    """Per requested model: the features that call it."""
    thin: list[tuple[str, str, int, int]] = field(default_factory=list)
    """(feature, model, window calls, baseline calls) too small to judge."""

    @property
    def drifted(self) -> bool:
        return any(m.drifted for m in self.models) or any(
            v.kind == "switched" for found in self.versions.values() for v in found
        )


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def drift(
    conn: Connection,
    window: tuple[float, float],
    baseline: tuple[float, float],
    thresholds: Thresholds | None = None,
    feature: str | None = None,
) -> DriftReport:
    th = thresholds or Thresholds()
    # the rollups are per minute: bounds on minute boundaries keep a minute on one side only
    window = (window[0] - window[0] % 60, window[1] - window[1] % 60)
    baseline = (baseline[0] - baseline[0] % 60, baseline[1] - baseline[1] % 60)
    params = {"wstart": _dt(window[0]), "wend": _dt(window[1]), "bstart": _dt(baseline[0]), "bend": _dt(baseline[1])}
    sides: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in queries.run(conn.client, "drift_by_model", **params):
        sides.setdefault((r["feature"], r["model"]), {})[r["period"]] = r
    for r in queries.run(conn.client, "drift_feedback", **params):
        side = sides.get((r["feature"], r["model"]), {}).get(r["period"])
        if side is not None:
            side["thumbs"], side["thumbs_down"] = r["thumbs"], r["thumbs_down"]
    report = DriftReport((params["wstart"], params["wend"]), (params["bstart"], params["bend"]), th, [])
    served: dict[str, dict[str, ServedBy]] = {}
    for r in queries.run(conn.client, "response_models", **params):
        if feature is not None and r["feature"] != feature:
            continue
        report.features.setdefault(r["model"], []).append(r["feature"])
        seen = served.setdefault(r["model"], {})
        now = ServedBy(r["response_model"], int(r["calls"]), _ts(r["first_seen"]), _ts(r["last_seen"]))
        was = seen.get(now.response_model)
        if was is not None:  # the same snapshot under several features: one span
            now = ServedBy(now.response_model, was.calls + now.calls, min(was.first_seen, now.first_seen),
                           max(was.last_seen, now.last_seen))  # fmt: skip
        seen[now.response_model] = now
    # an alias is reported whether or not its provider named the snapshot that answered, so every
    # model called in the window counts, not only those with a response_model
    called: dict[str, list[str]] = {}
    for feat, model in sorted(sides):
        if (feature is None or feat == feature) and "window" in sides[(feat, model)]:
            called.setdefault(model, []).append(feat)
    for model, feats in called.items():
        known = report.features.setdefault(model, [])
        known.extend(f for f in feats if f not in known)
    for model in sorted(served.keys() | called.keys()):
        found = version_findings(model, list(served.get(model, {}).values()), window[0], baseline[1])
        if found:
            report.versions[model] = found
    for (feat, model), s in sorted(sides.items()):
        if feature is not None and feat != feature:
            continue
        w, b = s.get("window"), s.get("baseline")
        wn, bn = int(w["calls"]) if w else 0, int(b["calls"]) if b else 0
        if w is None or b is None or wn < th.min_calls or bn < th.min_calls:
            report.thin.append((feat, model, wn, bn))
            continue
        d = ModelDrift(feat, model, wn, bn)
        d.changes.append(relative_change("output_tokens_avg", b["output_tokens_avg"], w["output_tokens_avg"],
                                         th.length))  # fmt: skip
        d.changes.append(relative_change("output_tokens_p95", b["output_tokens_p95"], w["output_tokens_p95"],
                                         th.length))  # fmt: skip
        d.changes.append(rate_change("refusal_rate", b["refusal_rate"], w["refusal_rate"], wn, th.rate_points,
                                     n_baseline=bn))  # fmt: skip
        d.changes.append(rate_change("tool_call_rate", b["tool_call_rate"], w["tool_call_rate"], wn, th.rate_points,
                                     n_baseline=bn))  # fmt: skip
        if w["schema_checked"] and b["schema_checked"]:
            d.changes.append(rate_change("schema_valid_rate", b["schema_valid_rate"], w["schema_valid_rate"],
                                         w["schema_checked"], th.rate_points,
                                         n_baseline=b["schema_checked"]))  # fmt: skip
        if w.get("thumbs") and b.get("thumbs"):
            d.changes.append(rate_change("thumbs_down_rate", b["thumbs_down"] / b["thumbs"],
                                         w["thumbs_down"] / w["thumbs"], w["thumbs"], th.rate_points,
                                         n_baseline=b["thumbs"]))  # fmt: skip
        d.psi = psi(b["output_tokens_quantiles"], w["output_tokens_quantiles"])
        d.changes.append(Change("output_tokens_psi", None, d.psi, d.psi is not None and d.psi >= th.psi,
                                psi_reading(d.psi)))  # fmt: skip
        report.models.append(d)
    return report


def _ts(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
