"""``llmpulse report weekly``: the weekly LLMOps review as one self-contained HTML page and a chat summary.

Every number comes from a named query in ``sinks/queries`` (``report_*.sql`` plus the shared
ones the CLI and Grafana run), so the report, ``llmpulse query`` and a dashboard agree. The
rollups answer everything they can (spend, latency, rates, eval, feedback); the raw table is
read only for what it alone holds (error messages, the calls users flagged, repeated prompts),
bounded to the week, so the report stays fast on a large table.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from html import escape
from pathlib import Path
from typing import Any

import orjson

from llmpulse import report_charts as charts
from llmpulse.drift import drift
from processors.alerts.budgets import forecast, period_bounds, period_label
from schemas.rules import SCOPE_DIMENSIONS, RulesFile
from sinks import queries
from sinks.clickhouse import Connection

WEEK = timedelta(days=7)
BURN_WINDOW = timedelta(days=7)
"""Budget forecasts extrapolate the last 7 days' average burn: a weekly review wants the trend,
not the last few hours the live budget alert reacts to."""
PERCENTILE_TOLERANCE = 0.05
"""Documented accuracy of the rollup percentiles (t-digest) against ``quantileExact`` on raw rows:
within 5% relative, or, where the tail is sparse, between the exact quantiles one percentile
rank either side (``PERCENTILE_RANK_TOLERANCE``)."""
PERCENTILE_RANK_TOLERANCE = 0.01
MIN_RELEASE_CALLS = 20
"""Releases with fewer calls this week (stray unpriced models, a release retired on Monday) clutter
the page's release table; report.json keeps them all."""
MIN_RATE_CALLS = 20
"""A model with fewer calls this week is not named for "most refusals": one refusal in two calls is
noise, not the model to look at. The same floor as a rule's default ``min_calls``."""
LATENCY_METRICS = (
    "latency_avg_ms", "latency_p50_ms", "latency_p90_ms", "latency_p95_ms", "latency_p99_ms",
    "ttft_avg_ms", "ttft_p50_ms", "ttft_p90_ms", "ttft_p95_ms", "ttft_p99_ms",
)  # fmt: skip
"""The latency statistics report_latency computes per week, day and hour: a latency/TTFT rule on one
of these is checked against it; a rule on any other metric is listed as not in the report."""


class ReportError(ValueError):
    """A report cannot be made as asked (a malformed --week); the message says what to pass."""


@dataclass(frozen=True)
class Week:
    """An ISO week (Monday 00:00 UTC to the next Monday)."""

    year: int
    number: int

    @classmethod
    def parse(cls, text: str) -> Week:
        m = re.fullmatch(r"(\d{4})-?W(\d{1,2})", text.strip(), flags=re.IGNORECASE)
        if not m:
            raise ReportError(f"--week {text!r}: expected an ISO week such as 2026-W47")
        try:
            date.fromisocalendar(int(m[1]), int(m[2]), 1)
        except ValueError:
            raise ReportError(f"--week {text!r}: {m[1]} has no week {int(m[2])}") from None
        return cls(int(m[1]), int(m[2]))

    @classmethod
    def containing(cls, t: float) -> Week:
        y, w, _ = datetime.fromtimestamp(t, UTC).isocalendar()
        return cls(y, w)

    @property
    def label(self) -> str:
        return f"{self.year}-W{self.number:02d}"

    @property
    def start(self) -> datetime:
        d = date.fromisocalendar(self.year, self.number, 1)
        return datetime(d.year, d.month, d.day, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        return self.start + WEEK

    @property
    def previous(self) -> Week:
        return Week.containing((self.start - WEEK).timestamp())


def choose_week(conn: Connection, now: float | None = None) -> tuple[Week, str]:
    """The last complete ISO week if it holds calls, else the week of the newest calls (a demo
    that ran this morning), and why: the report says which week it shows and why that one."""
    now = time.time() if now is None else now
    last_complete = Week.containing(now).previous
    start, end = last_complete.start, last_complete.end
    calls, newest = conn.client.query(
        "SELECT sumIf(calls, minute >= {s:DateTime} AND minute < {e:DateTime}), max(minute) FROM llm_calls_1m",
        parameters={"s": start, "e": end},
    ).result_rows[0]
    if calls or not newest or newest.year < 2000:
        return last_complete, "the last complete ISO week"
    newest_t = (newest if newest.tzinfo else newest.replace(tzinfo=UTC)).timestamp()
    week = Week.containing(newest_t)
    return week, "the week of the newest data (the last complete week has none)"


@dataclass
class WeeklyReport:
    week: Week
    reason: str
    """Why this week (when it was chosen, not given)."""
    generated_at: datetime
    as_of: datetime
    """The end of the data the report can see: the week's end, or now for the current week."""
    source: str
    data: dict[str, Any] = field(default_factory=dict)
    """Section key → the figures shown (what report.json holds and the tests check)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per named query, and in all."""

    @property
    def partial(self) -> bool:
        return self.as_of < self.week.end


def _dt(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime(value.year, value.month, value.day, tzinfo=UTC)


def build_weekly(
    conn: Connection,
    week: Week,
    rules: RulesFile,
    *,
    now: float | None = None,
    reason: str = "",
    source: str = "",
) -> WeeklyReport:
    """Run every section's queries and shape the figures; rendering is separate (HTML, Markdown, JSON)."""
    started = time.perf_counter()
    now = time.time() if now is None else now
    as_of = min(week.end, datetime.fromtimestamp(now, UTC).replace(microsecond=0))
    report = WeeklyReport(week, reason, datetime.now(UTC), as_of, source or conn.description)
    timings: dict[str, float] = defaultdict(float)

    def q(name: str, **params: Any) -> list[dict[str, Any]]:
        t = time.perf_counter()
        rows = queries.run(conn.client, name, **params)
        timings[name] += time.perf_counter() - t
        return rows

    period = {"start": week.start, "end": week.end}
    d = report.data
    d["spend"] = _spend(q, week)
    d["budgets"] = _budgets(q, rules, as_of)
    d["latency"] = _latency(q, period, rules)
    d["rates"] = _rates(q, period, rules)
    d["quality"] = _quality(q, conn, week, timings)
    d["alerts"] = _alerts(q, week, as_of)
    d["errors"] = {"patterns": q("report_error_patterns", **period), "failed_calls": d["rates"]["total"]["errors"]}
    d["flagged"] = q("report_flagged_outputs", **period)
    cache = q("report_cache_opportunity", **period)
    d["cache"] = {
        "features": cache,
        "repeats": sum(int(r["repeats"]) for r in cache),
        "repeat_cost_usd": round(sum(float(r["repeat_cost_usd"]) for r in cache), 4),
    }
    report.timings = {k: round(v, 4) for k, v in timings.items()}
    report.timings["total"] = round(time.perf_counter() - started, 4)
    return report


Query = Callable[..., list[dict[str, Any]]]


UNKNOWN = "unknown"
"""A week-over-week change where either week's spend is unknown (all its calls unpriced): not "new"."""


def _change(now: float, before: float) -> float | None:
    return (now - before) / before if before else None


def _usd_or_none(value: Any) -> float | None:
    """None is spend nobody knows (every call unpriced); a 0.0 in its place would read as free."""
    return None if value is None else float(value)


def _spend(q: Query, week: Week) -> dict[str, Any]:
    out: dict[str, Any] = {"total": None, "feature": [], "team": [], "model": []}
    for r in q("report_spend", start=week.start, end=week.end, pstart=week.previous.start):
        item: dict[str, Any] = {
            "key": r["key"], "calls": int(r["calls"]), "cost_usd": _usd_or_none(r["cost_usd"]),
            "prev_calls": int(r["prev_calls"]), "prev_cost_usd": _usd_or_none(r["prev_cost_usd"]),
            "unpriced_calls": int(r["unpriced_calls"]),
        }  # fmt: skip
        now, before = item["cost_usd"], item["prev_cost_usd"]
        item["change_usd"] = None if now is None or before is None else now - before
        item["change"] = UNKNOWN if now is None or before is None else _change(now, before)
        if r["dimension"] == "total":
            out["total"] = item
        else:
            out[r["dimension"]].append(item)
    if out["total"] is None:
        out["total"] = {"key": "", "calls": 0, "cost_usd": 0.0, "prev_calls": 0, "prev_cost_usd": 0.0,
                        "unpriced_calls": 0, "change_usd": 0.0, "change": None}  # fmt: skip
    movers = [{"dimension": dim, **i} for dim in ("feature", "team", "model") for i in out[dim] if i["change_usd"]]
    out["movers"] = sorted(movers, key=lambda i: (-abs(i["change_usd"]), i["dimension"], i["key"]))[:6]
    out["daily"] = [
        {
            "day": r["day"].isoformat(),
            "feature": r["feature"],
            "calls": int(r["calls"]),
            "cost_usd": float(r["cost_usd"]),
        }
        for r in q("report_spend_daily", start=week.start, end=week.end)
    ]
    return out


def _budgets(q: Query, rules: RulesFile, as_of: datetime) -> dict[str, Any]:
    """Each configured budget's period to date and forecast, and every team's month to date."""
    now = as_of.timestamp() - 0.001  # the last instant the report sees, inside its period
    budgets = []
    for b in rules.budgets:
        p_start, p_end = period_bounds(b.period, now)
        since = min(p_start, (as_of - BURN_WINDOW).timestamp())
        scope = {dim: b.scope.get(dim, "") for dim in SCOPE_DIMENSIONS}
        hours = q("report_budget_spend", start=datetime.fromtimestamp(since, UTC), end=as_of, **scope)
        spent = sum(float(h["cost_usd"]) for h in hours if _dt(h["hour"]).timestamp() >= p_start)
        burn_since = (as_of - BURN_WINDOW).timestamp()
        burn = sum(float(h["cost_usd"]) for h in hours if _dt(h["hour"]).timestamp() >= burn_since) / (
            BURN_WINDOW.total_seconds() / 3600
        )
        s = forecast(b.name, b.period, b.limit_usd, spent, burn, now)
        cumulative, running = [], 0.0
        for h in hours:
            t = _dt(h["hour"]).timestamp()
            if t >= p_start:
                running += float(h["cost_usd"])
                cumulative.append((t + 3600, running))
        budgets.append({
            "name": b.name, "scope": dict(b.scope), "period": b.period, "period_label": period_label(b.period, p_start),
            "period_start": p_start, "period_end": p_end, "limit_usd": b.limit_usd, "spent_usd": spent,
            "used": s.used, "burn_usd_per_hour": burn, "projected_usd": s.projected_usd,
            "exhausted_at": s.exhausted_at, "warn_at": list(b.warn_at), "cumulative": cumulative,
        })  # fmt: skip
    month_end = period_bounds("month", now)[1]
    hours_left = max(0.0, month_end - as_of.timestamp()) / 3600
    burn_hours = BURN_WINDOW.total_seconds() / 3600
    teams = []
    for r in q("report_month_to_date", end=as_of):
        # a period whose calls all lack a price has no known spend (None), unlike one that spent $0
        mtd = None if r["mtd_calls"] and not r["mtd_priced_calls"] else float(r["mtd_cost_usd"])
        burn_known = not r["last_7d_calls"] or r["last_7d_priced_calls"]
        burn = float(r["last_7d_cost_usd"]) / burn_hours if burn_known else None
        teams.append({"team": r["team"], "mtd_cost_usd": mtd, "burn_usd_per_hour": burn,
                      "projected_month_usd": None if mtd is None or burn is None else mtd + burn * hours_left,
                      "mtd_unpriced_calls": int(r["mtd_calls"]) - int(r["mtd_priced_calls"])})  # fmt: skip
    return {"budgets": budgets, "teams": teams, "month": period_label("month", now)}


def _latency_rules(rules: RulesFile) -> list[dict[str, Any]]:
    out = []
    for r in rules.rules:
        if r.metric.startswith(("latency_", "ttft_")):
            out.append({"rule": r.name, "metric": r.metric, "feature": r.scope.where.get("feature"),
                        "max": r.max, "condition": r.describe(), "action": r.effective_action,
                        "in_report": r.metric in LATENCY_METRICS})  # fmt: skip
    return out


def _over(row: dict[str, Any], limits: list[dict[str, Any]]) -> list[str]:
    """The rules whose limit this feature's bucket exceeds (no value, e.g. no streaming calls: not over)."""
    return [
        b["rule"]
        for b in limits
        if b["feature"] in (None, row["feature"]) and row[b["metric"]] is not None and row[b["metric"]] > b["max"]
    ]


def _q(value: Any) -> float | None:
    """A quantile, or None: t-digest merges of no values (no streaming calls) come back as NaN."""
    return None if value is None or math.isnan(value) else float(value)


def _latency(q: Query, period: dict[str, datetime], rules: RulesFile) -> dict[str, Any]:
    """Percentiles per week, day and hour, each bucket checked against every latency/TTFT rule with a
    ``max`` (the week's rows also count the hours over each limit). A rule on a statistic the rollups
    cannot give is named in ``not_in_report`` instead of passing silently as 0."""
    grains: dict[str, list[dict[str, Any]]] = {"week": [], "day": [], "hour": []}
    for r in q("report_latency", **period):
        grains[r["grain"]].append({
            "bucket": _dt(r["bucket"]).timestamp(), "feature": r["feature"], "calls": int(r["calls"]),
            "ttft_calls": int(r["ttft_calls"]), **{k: _q(r[k]) for k in LATENCY_METRICS},
        })  # fmt: skip
    budget_rules = _latency_rules(rules)
    limits = [b for b in budget_rules if b["max"] is not None and b["in_report"]]
    for rows in grains.values():
        for r in rows:
            r["over_budget"] = _over(r, limits)
    for r in grains["week"]:
        r["rules"] = [b["rule"] for b in budget_rules if b["feature"] in (None, r["feature"])]
        r["hours_over_budget"] = {
            b["rule"]: n
            for b in limits
            if (n := sum(1 for h in grains["hour"] if h["feature"] == r["feature"] and b["rule"] in h["over_budget"]))
        }
    return {
        "week": grains["week"], "daily": grains["day"], "hourly": grains["hour"], "rules": budget_rules,
        "not_in_report": [b["rule"] for b in budget_rules if not b["in_report"]],
    }  # fmt: skip


RATE_KEYS = ("calls", "errors", "timeouts", "rate_limited", "refusals")


def _rates(q: Query, period: dict[str, datetime], rules: RulesFile) -> dict[str, Any]:
    by: dict[str, dict[str, dict[str, int]]] = {"feature": {}, "model": {}, "day": {}, "feature_day": {}}
    total = dict.fromkeys(RATE_KEYS, 0)
    for r in q("report_rates", **period):
        day = r["day"].isoformat()
        for dim, key in (("feature", r["feature"]), ("model", r["model"]), ("day", day),
                         ("feature_day", f"{r['feature']}|{day}")):  # fmt: skip
            acc = by[dim].setdefault(key, dict.fromkeys(RATE_KEYS, 0))
            for k in RATE_KEYS:
                acc[k] += int(r[k])
        for k in RATE_KEYS:
            total[k] += int(r[k])

    def rated(key: str, c: dict[str, int]) -> dict[str, Any]:
        n = c["calls"] or 1
        return {"key": key, **c, "error_rate": c["errors"] / n, "refusal_rate": c["refusals"] / n}

    rule_rows = [
        {"rule": r.name, "metric": r.metric, "scope": ",".join(r.scope.by) or "all", "condition": r.describe(),
         "action": r.effective_action}
        for r in rules.rules
        if r.metric in {"error_rate", "refusal_rate", "timeout_rate", "rate_limited_rate"}
    ]  # fmt: skip
    return {
        "total": rated("", total),
        "feature": sorted((rated(k, v) for k, v in by["feature"].items()), key=lambda r: -r["error_rate"]),
        "model": sorted((rated(k, v) for k, v in by["model"].items()), key=lambda r: -r["refusal_rate"]),
        "min_calls": MIN_RATE_CALLS,
        "daily": [rated(k, v) for k, v in sorted(by["feature_day"].items())],
        "rules": rule_rows,
    }


def _quality(q: Query, conn: Connection, week: Week, timings: dict[str, float]) -> dict[str, Any]:
    period = {"start": week.start, "end": week.end}
    t = time.perf_counter()
    found = drift(conn, (week.start.timestamp(), week.end.timestamp()),
                  (week.previous.start.timestamp(), week.start.timestamp()))  # fmt: skip
    timings["drift (drift_by_model, drift_feedback, response_models)"] += time.perf_counter() - t
    drifted = [
        {"feature": m.feature, "model": m.model, "calls": m.calls, "baseline_calls": m.baseline_calls,
         "psi": m.psi, "drifted": m.drifted,
         "changes": [f"{c.metric} {c.detail}" for c in m.changes if c.drifted]}
        for m in found.models
    ]  # fmt: skip
    switches = [
        {"model": model, "detail": v.detail, "features": sorted(set(found.features.get(model, [])))}
        for model, vs in sorted(found.versions.items())
        for v in vs
        if v.kind == "switched"
    ]
    return {
        "eval": q("eval_by_release", **period),
        "releases": q("release_metrics", **period),
        "daily": [{**r, "day": r["day"].isoformat()} for r in q("report_quality_daily", **period)],
        "drift": drifted,
        "switches": switches,
        "thin": len(found.thin),
    }


def _alerts(q: Query, week: Week, as_of: datetime) -> dict[str, Any]:
    incidents = []
    for r in q("report_alerts", start=week.start, end=as_of):
        incidents.append({
            "rule": r["rule"], "severity": r["severity"], "metric": r["metric"], "action": r["action"],
            "scope": dict(r["scope"]), "value": r["value"], "summary": r["summary"],
            "started_at": _dt(r["started_at"]).timestamp(), "started_before": bool(r["started_before"]),
            "resolved_at": _dt(r["resolved_at"]).timestamp() if r["resolved_at"] is not None else None,
            "duration_s": int(r["duration_s"]), "notice": r["metric"] == "budget_spend_usd",
        })  # fmt: skip
    by_rule: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in incidents:
        by_rule[i["rule"]].append(i)
    rules = []
    for rule, items in by_rule.items():
        timed = [i["duration_s"] for i in items if not i["notice"]]
        rules.append({
            "rule": rule, "severity": items[0]["severity"], "incidents": len(items),
            "still_firing": sum(1 for i in items if i["resolved_at"] is None and not i["notice"]),
            "scopes": len({tuple(sorted(i["scope"].items())) for i in items}),
            "total_s": sum(timed), "median_s": statistics.median(timed) if timed else None,
            "longest_s": max(timed) if timed else None,
        })  # fmt: skip
    rules.sort(key=lambda r: (-r["incidents"], r["rule"]))
    return {"incidents": incidents, "rules": rules}


# ---- rendering ----------------------------------------------------------------------------------


def _change_pct(change: float | str | None) -> str:
    return "—" if change == UNKNOWN else pct(change if isinstance(change, float) else None, True)


def usd(x: float | None) -> str:
    if x is None:
        return "—"
    return f"${x:,.2f}" if abs(x) >= 1 or x == 0 else f"${x:,.4f}"


def pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "new" if signed else "—"
    return f"{x:+.1%}" if signed else f"{x:.2%}"


def ms(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:,.0f} ms" if x < 10_000 else f"{x / 1000:,.1f} s"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    h, rem = divmod(int(seconds), 3600)
    d, h = divmod(h, 24)
    if d:
        return f"{d}d{h:02d}h"
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m"


def when(t: float | None) -> str:
    return "—" if t is None else datetime.fromtimestamp(t, UTC).strftime("%a %d %b %H:%M")


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, Callable[[Any], str]]], cls: str = "") -> str:
    """Columns: (key, header, formatter). Numbers right-aligned by the ``num`` class."""
    if not rows:
        return '<p class="empty">Nothing this week.</p>'
    head = "".join(f"<th>{escape(h)}</th>" for _, h, _ in columns)
    body = []
    for r in rows:
        cells = []
        for key, _, f in columns:
            v = r.get(key)
            num = isinstance(v, int | float) and not isinstance(v, bool)
            cells.append(f"<td{' class=num' if num else ''}>{escape(f(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _s(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, list | tuple):
        return ", ".join(_s(x) for x in v if x != "")
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    if isinstance(v, datetime):
        return _dt(v).strftime("%a %d %b %H:%M")
    return str(v)


def _section(key: str, title: str, intro: str, *body: str) -> str:
    return f'<section id="{key}"><h2>{escape(title)}</h2><p class="intro">{intro}</p>{"".join(body)}</section>'


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9cfdb}nav{padding:8px 28px;background:#fff;border-bottom:1px solid #e3e6eb}
nav a{margin-right:14px;color:#3a5a8c;text-decoration:none;font-size:13px}main{padding:0 28px 40px;max-width:1000px}
section{background:#fff;border:1px solid #e3e6eb;border-radius:6px;margin:18px 0;padding:6px 18px 14px}
h2{font-size:17px;margin:12px 0 4px}h3{font-size:14px;margin:14px 0 4px}.intro{color:#5b6474;margin:2px 0 10px}
table{border-collapse:collapse;width:100%;margin:6px 0 10px;font-size:13px}
th{text-align:left;color:#5b6474;font-weight:600;border-bottom:2px solid #e3e6eb;padding:4px 6px}
td{border-bottom:1px solid #eef0f3;padding:3px 6px;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.kpis{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.kpi{background:#f6f7f9;border-radius:6px;padding:8px 12px;min-width:130px}
.kpi b{display:block;font-size:19px}.kpi span{color:#5b6474;font-size:12px}.up{color:#b23b3b}.down{color:#2f7d46}
svg.chart{width:100%;height:auto;display:block;margin:6px 0}svg .grid{stroke:#eef0f3}
svg .threshold{stroke:#b23b3b;stroke-dasharray:5 4;stroke-width:1.4}
svg text{font-size:11px;fill:#5b6474}svg .ytick,svg .ylabel{text-anchor:end}svg .mid{text-anchor:middle}
svg .val{fill:#1d2330}
.legend{font-size:12px;color:#5b6474;margin:0 0 8px}.key{margin-right:12px;white-space:nowrap}
.key i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px;vertical-align:-1px}
.empty{color:#8a93a3;font-style:italic}table.small{font-size:12px}.warn{color:#b23b3b;font-weight:600}
footer{color:#8a93a3;font-size:12px;padding:0 28px 28px}
"""

SECTIONS = (
    ("spend", "Spend"), ("budgets", "Budgets and forecast"), ("latency", "Latency and TTFT"),
    ("rates", "Errors and refusals"), ("quality", "Eval score and drift"), ("alerts", "Alerts"),
    ("errors", "Top error patterns"), ("flagged", "User-flagged outputs"), ("cache", "Cache opportunity"),
)  # fmt: skip
"""Section ids and titles, in page order (the tests check each is present)."""


STAT_LABELS = {"avg": "mean", "p50": "p50", "p90": "p90", "p95": "p95", "p99": "p99"}


def _latency_section(lat: dict[str, Any], t0: float, t1: float) -> str:
    """Hourly charts of p95 and of every other statistic a rule limits, each with its rules' limit
    lines; daily p50/p95/p99 tables with the cells over a limit marked."""
    limited = [b for b in lat["rules"] if b["max"] is not None and b["in_report"]]
    charts_html = []
    for kind, noun in (("latency", "latency"), ("ttft", "time to first token (streaming features)")):
        for stat, label in STAT_LABELS.items():
            metric = f"{kind}_{stat}_ms"
            mine = [b for b in limited if b["metric"] == metric]
            if stat != "p95" and not mine:
                continue
            series: dict[str, list[tuple[float, float | None]]] = {}
            for r in lat["hourly"]:
                if r[metric] is not None:
                    series.setdefault(r["feature"], []).append((r["bucket"], r[metric]))
            limits = [(f"{b['rule']} ({b['feature'] or 'all'})", b["max"]) for b in mine]
            over = sorted({(h["feature"], rule) for h in lat["hourly"] for rule in h["over_budget"]
                           if any(b["rule"] == rule for b in mine)})  # fmt: skip
            note = (" — <span class=warn>over the limit: " + escape(", ".join(f"{f} ({r})" for f, r in over))
                    + "</span>" if over else "")  # fmt: skip
            charts_html.append(f"<h3>Hourly {label} {noun} per feature{note}</h3>")
            charts_html.append(charts.line_chart(series, t0, t1, y_fmt=ms, thresholds=limits,
                                                 title=f"hourly {label} {kind}"))  # fmt: skip
    day_labels = sorted({r["bucket"] for r in lat["daily"]})
    day_cols = [(str(t), datetime.fromtimestamp(t, UTC).strftime("%a %d"), _s) for t in day_labels]
    tables = []
    for kind, noun in (("latency", "latency"), ("ttft", "TTFT (streaming features)")):
        keys = [f"{kind}_{p}_ms" for p in ("p50", "p95", "p99")]
        pivot: dict[str, dict[str, Any]] = {}
        for r in lat["daily"]:
            if r[keys[0]] is None:
                continue
            flag = [rule for rule in r["over_budget"] if any(b["rule"] == rule and b["metric"].startswith(kind + "_")
                                                             for b in limited)]  # fmt: skip
            cell = " / ".join(ms(r[k]) for k in keys) + (" ⚠ " + ", ".join(flag) if flag else "")
            pivot.setdefault(r["feature"], {"feature": r["feature"]})[str(r["bucket"])] = cell
        tables.append(f"<h3>Daily p50 / p95 / p99 {noun} (⚠: over a rule's limit that day)</h3>")
        tables.append(_table(list(pivot.values()), [("feature", "feature", _s), *day_cols], cls="small"))
    rule_text = "; ".join(f"{b['rule']}: {b['condition']} → {b['action']}" for b in lat["rules"]) or "none"
    missing = [b for b in lat["rules"] if not b["in_report"]]
    missing_text = (
        " <span class=warn>Not in report (the rollups do not give this statistic): "
        + escape(", ".join(f"{b['rule']} ({b['metric']})" for b in missing))
        + ".</span>"
        if missing
        else ""
    )
    lat_cols = [("feature", "feature", _s), ("calls", "calls", _s), ("latency_p50_ms", "p50", ms),
                ("latency_p95_ms", "p95", ms), ("latency_p99_ms", "p99", ms), ("ttft_p50_ms", "TTFT p50", ms),
                ("ttft_p95_ms", "TTFT p95", ms), ("ttft_p99_ms", "TTFT p99", ms),
                ("over_budget", "over a limit (week)", _s),
                ("hours_over_budget", "hours over a limit", _s)]  # fmt: skip
    return _section(
        "latency", "Latency and TTFT",
        f"Percentiles merged from the minute rollups' t-digests (within {PERCENTILE_TOLERANCE:.0%} of exact). "
        f"Latency alert rules: {escape(rule_text)}.{missing_text}",
        _table(lat["week"], lat_cols), *charts_html, *tables,
    )  # fmt: skip


def render_html(report: WeeklyReport) -> str:
    d, w = report.data, report.week
    t0, t1 = w.start.timestamp(), w.end.timestamp()
    sp = d["spend"]
    tot = sp["total"]
    ch = tot["change"]
    arrow = (
        "" if ch is None or ch == UNKNOWN
        else ('<span class="up">▲ ' if ch > 0 else '<span class="down">▼ ') + pct(ch, True) + "</span>"
    )  # fmt: skip
    rates = d["rates"]["total"]
    kpis = [
        (usd(tot["cost_usd"]), f"spend {arrow or ('(change unknown)' if ch == UNKNOWN else '(no previous week)')}"),
        (f"{tot['calls']:,}", "calls"),
        (pct(rates["error_rate"]), "error rate"),
        (pct(rates["refusal_rate"]), "refusal rate"),
        (str(len(d["alerts"]["incidents"])), "alert incidents"),
        (usd(d["cache"]["repeat_cost_usd"]), "spent on repeated prompts"),
    ]
    kpi_html = '<div class="kpis">' + "".join(f"<div class=kpi><b>{v}</b><span>{label}</span></div>"
                                             for v, label in kpis) + "</div>"  # fmt: skip
    body = [kpi_html]

    # spend
    feats = sp["feature"][:12]
    days = sorted({r["day"] for r in sp["daily"]})
    by_feat: dict[str, list[float]] = {}
    for r in sp["daily"]:
        by_feat.setdefault(r["feature"], [0.0] * len(days))[days.index(r["day"])] = r["cost_usd"]
    change_cols = [("key", "", _s), ("calls", "calls", _s), ("cost_usd", "spend", usd),
                   ("prev_cost_usd", "previous week", usd), ("change_usd", "change", usd),
                   ("change", "change %", _change_pct),
                   ("unpriced_calls", "without a price", _s)]  # fmt: skip
    body.append(_section(
        "spend", "Spend", f"{usd(tot['cost_usd'])} over {tot['calls']:,} calls; previous week "
        f"{usd(tot['prev_cost_usd'])} ({_change_pct(ch)}). {tot['unpriced_calls']:,} calls had no price: spend "
        "counts priced calls only, and — marks a row none of whose calls had one.",
        "<h3>Top movers (week over week)</h3>",
        _table(sp["movers"], [("dimension", "", _s), ("key", "", _s), ("prev_cost_usd", "previous week", usd),
                              ("cost_usd", "this week", usd), ("change_usd", "change", usd),
                              ("change", "change %", _change_pct)]),
        "<h3>Per feature</h3>",
        charts.grouped_bars([(r["key"], r["cost_usd"], r["prev_cost_usd"]) for r in feats]),
        charts.stacked_columns([date.fromisoformat(x).strftime("%a %d") for x in days], by_feat),
        _table(sp["feature"], change_cols),
        "<h3>Per team</h3>", _table(sp["team"], change_cols),
        "<h3>Per model</h3>", _table(sp["model"], change_cols),
    ))  # fmt: skip

    # budgets
    bd = d["budgets"]
    parts = []
    if bd["budgets"]:
        for b in bd["budgets"]:
            ex = b["exhausted_at"]
            state = ("exhausted" if ex is not None and ex <= report.as_of.timestamp()
                     else f"runs out {when(ex)} at this burn" if ex is not None else "stays within it")  # fmt: skip
            cls = "warn" if ex is not None else ""
            parts.append(f"<h3>{escape(b['name'])} ({escape(_s(b['scope']))}, {b['period']}ly {usd(b['limit_usd'])}, "
                         f"{b['period_label']})</h3><p>{usd(b['spent_usd'])} spent ({b['used']:.0%}); burn "
                         f"{usd(b['burn_usd_per_hour'])}/h over the last 7 days; projected {usd(b['projected_usd'])} "
                         f'by the period\'s end: <span class="{cls}">{state}</span>.</p>')  # fmt: skip
            pts: list[tuple[float, float | None]] = list(b["cumulative"])
            proj: list[tuple[float, float | None]] = []
            if pts:
                proj = [pts[-1], (b["period_end"], b["projected_usd"])]
            parts.append(charts.line_chart({"spent": pts, "projected": proj}, b["period_start"], b["period_end"],
                                           y_fmt=usd, thresholds=[("limit", b["limit_usd"])],
                                           title=b["name"]))  # fmt: skip
    else:
        parts.append(
            '<p class="empty">No budgets configured (add <code>budgets:</code> to the rules file named by '
            "alerting.rules_path). Month-to-date spend per team and its projection follow.</p>"
        )
    parts.append(f"<h3>Month to date per team ({bd['month']})</h3>")
    parts.append(_table(bd["teams"], [("team", "team", _s), ("mtd_cost_usd", "month to date", usd),
                                      ("burn_usd_per_hour", "burn per hour (7 days)", usd),
                                      ("projected_month_usd", "projected month", usd),
                                      ("mtd_unpriced_calls", "calls without a price", _s)]))  # fmt: skip
    body.append(
        _section(
            "budgets",
            "Budgets and forecast",
            "Spend to date in each budget's period and where the last 7 days' burn takes it.",
            *parts,
        )
    )

    # latency
    body.append(_latency_section(d["latency"], t0, t1))

    # rates
    rt = d["rates"]
    err_series: dict[str, list[tuple[float, float | None]]] = {}
    ref_series: dict[str, list[tuple[float, float | None]]] = {}
    for r in rt["daily"]:
        feat, day = r["key"].split("|")
        t = datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() + 43200
        err_series.setdefault(feat, []).append((t, r["error_rate"] * 100))
        ref_series.setdefault(feat, []).append((t, r["refusal_rate"] * 100))
    rate_cols: list[tuple[str, str, Callable[[Any], str]]] = [
                 ("key", "", _s), ("calls", "calls", _s), ("errors", "errors", _s), ("timeouts", "timeouts", _s),
                 ("rate_limited", "rate limited", _s), ("error_rate", "error rate", pct),
                 ("refusals", "refusals", _s), ("refusal_rate", "refusal rate", pct)]  # fmt: skip
    body.append(_section(
        "rates", "Errors and refusals",
        f"{rt['total']['errors']:,} failed calls ({pct(rt['total']['error_rate'])}) and {rt['total']['refusals']:,} "
        f"refusals ({pct(rt['total']['refusal_rate'])}). Alert rules: "
        + escape("; ".join(f"{r['rule']}: {r['condition']}" for r in rt["rules"]) or "none") + ".",
        "<h3>Daily error rate per feature (%)</h3>",
        charts.line_chart(err_series, t0, t1, y_fmt=lambda v: f"{v:.1f}%", title="error rate"),
        "<h3>Daily refusal rate per feature (%)</h3>",
        charts.line_chart(ref_series, t0, t1, y_fmt=lambda v: f"{v:.1f}%", title="refusal rate"),
        "<h3>Per feature</h3>", _table(rt["feature"], rate_cols),
        "<h3>Per model</h3>", _table(rt["model"], rate_cols),
    ))  # fmt: skip

    # quality
    ql = d["quality"]
    ev_series: dict[str, list[tuple[float, float | None]]] = {}
    for r in ql["daily"]:
        t = datetime.fromisoformat(r["day"]).replace(tzinfo=UTC).timestamp() + 43200
        ev_series.setdefault(r["feature"], []).append((t, r["eval_score"]))
    drifted = [r for r in ql["drift"] if r["drifted"]]
    releases = [r for r in ql["releases"] if r["calls"] >= MIN_RELEASE_CALLS]
    switches = "".join(f"<p class=warn>Model switched: {escape(s['detail'])} "
                       f"(used by {escape(', '.join(s['features']))})</p>" for s in ql["switches"])  # fmt: skip
    body.append(_section(
        "quality", "Eval score and drift",
        "Judge score of the representative sample (boosted error/refusal/flagged samples left out) per release, "
        f"and this week against the previous one per feature and model. {len(drifted)} of {len(ql['drift'])} "
        f"feature/models drifted; {ql['thin']} had too few calls to judge.",
        switches,
        "<h3>Daily judge score per feature</h3>",
        charts.line_chart(ev_series, t0, t1, y_fmt=lambda v: f"{v:.2f}", title="eval score"),
        "<h3>Drift (this week vs the previous)</h3>",
        _table(drifted, [("feature", "feature", _s), ("model", "model", _s), ("calls", "calls", _s),
                         ("baseline_calls", "previous week", _s), ("psi", "PSI (output length)", _s),
                         ("changes", "what moved", "; ".join)]),
        f"<h3>Per release ({MIN_RELEASE_CALLS}+ calls; every release is in report.json)</h3>",
        _table(releases, [("feature", "feature", _s), ("release_id", "release", _s),
                                ("prompt_version", "prompt", _s), ("variant", "variant", _s), ("model", "model", _s),
                                ("calls", "calls", _s), ("cost_per_call_usd", "cost/call", usd),
                                ("latency_p95_ms", "p95", ms), ("refusal_rate", "refusals", pct),
                                ("eval_score", "judge", _s), ("judged", "judged", _s),
                                ("thumbs_down_rate", "thumbs down", pct)]),
        "<h3>Judge score per release and rubric (95% CI)</h3>",
        _table(ql["eval"], [("feature", "feature", _s), ("release_id", "release", _s), ("rubric", "rubric", _s),
                            ("judged", "judged", _s), ("eval_score", "score", _s), ("ci95", "± 95% CI", _s)]),
    ))  # fmt: skip

    # alerts
    al = d["alerts"]
    lanes = [r["rule"] for r in al["rules"]]
    items = [(lanes.index(i["rule"]), i["started_at"], i["resolved_at"] or report.as_of.timestamp(),
              f"{i['rule']} {_s(i['scope'])}: {when(i['started_at'])}, {duration(i['duration_s'])}")
             for i in al["incidents"]]  # fmt: skip
    longest = sorted((i for i in al["incidents"] if not i["notice"]), key=lambda i: -i["duration_s"])[:10]
    longest = [{**i, "fired": when(i["started_at"]) + (" (before the week)" if i["started_before"] else "")}
               for i in longest]  # fmt: skip
    before = sum(1 for i in al["incidents"] if i["started_before"])
    body.append(_section(
        "alerts", "Alerts",
        f"{len(al['incidents'])} incidents fired during this week (a firing and its resolution count once), "
        f"{before} of them still firing from before it; durations count the time within the week, up to the "
        "resolution, or to the end of the report for alerts still firing.",
        charts.timeline(lanes, items, t0, t1),
        _table(al["rules"], [("rule", "rule", _s), ("severity", "severity", _s), ("incidents", "incidents", _s),
                             ("scopes", "scopes", _s), ("still_firing", "still firing", _s),
                             ("median_s", "median duration", duration), ("longest_s", "longest", duration),
                             ("total_s", "total firing", duration)]),
        "<h3>Longest incidents</h3>",
        _table(longest, [("rule", "rule", _s), ("scope", "scope", _s), ("fired", "fired", _s),
                         ("resolved_at", "resolved", lambda v: when(v) if v else "still firing"),
                         ("duration_s", "duration in the week", duration), ("summary", "summary", _s)]),
    ))  # fmt: skip

    # errors
    er = d["errors"]
    failed = er["failed_calls"] or 1
    pats = [{**p, "share": p["calls"] / failed} for p in er["patterns"]]
    body.append(_section(
        "errors", "Top error patterns",
        f"Failed calls grouped by error type and message (numbers and ids masked), of {er['failed_calls']:,} in all.",
        _table(pats, [("error_type", "error type", _s), ("pattern", "message pattern", _s), ("calls", "calls", _s),
                      ("share", "share", pct), ("features", "features", _s), ("models", "models", _s),
                      ("first_seen", "first", _s), ("last_seen", "last", _s)]),
    ))  # fmt: skip

    # flagged
    body.append(_section(
        "flagged", "User-flagged outputs",
        "Calls users gave a thumbs down or a rating of 2 or less this week, grouped by prompt; output text shows "
        "only where content capture is on.",
        _table(d["flagged"], [("feature", "feature", _s), ("release_id", "release", _s), ("model", "model", _s),
                              ("prompt_hash", "prompt", _s), ("flags", "flags", _s), ("users", "users", _s),
                              ("comments", "comments", _s), ("example_output", "output", lambda v: _s(v)[:300]),
                              ("last_flagged", "last flagged", _s)]),
    ))  # fmt: skip

    # cache
    ca = d["cache"]
    body.append(_section(
        "cache", "Cache opportunity",
        f"{ca['repeats']:,} calls re-sent a prompt the same feature had sent within the hour: "
        f"{usd(ca['repeat_cost_usd'])} a response cache would have saved.",
        _table(ca["features"], [("feature", "feature", _s), ("calls", "calls", _s), ("repeats", "repeats", _s),
                                ("repeat_share", "share", pct), ("repeat_cost_usd", "repeat cost", usd),
                                ("cost_usd", "feature spend", usd)]),
    ))  # fmt: skip

    nav = "".join(f'<a href="#{k}">{escape(t)}</a>' for k, t in SECTIONS)
    partial = f" (partial: data through {report.as_of:%a %d %b %H:%M} UTC)" if report.partial else ""
    why = f" — {escape(report.reason)}" if report.reason else ""
    title = f"LLMOps weekly review {w.label}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>'
        f"<header><h1>{title}</h1><p>{w.start:%a %d %b %Y} → {w.end - timedelta(seconds=1):%a %d %b %Y} UTC"
        f"{partial}{why}. Source: {escape(report.source)}.</p></header><nav>{nav}</nav><main>{''.join(body)}</main>"
        f"<footer>Generated {report.generated_at:%Y-%m-%d %H:%M} UTC by llmpulse report weekly in "
        f"{report.timings.get('total', 0):.2f} s. Queries: sinks/queries/report_*.sql and the named queries they "
        "reuse (llmpulse query --list).</footer></body></html>"
    )


def render_markdown(report: WeeklyReport, html_path: Path | None = None) -> str:
    """A few lines for chat: the headline numbers and what to look at."""
    d, w = report.data, report.week
    tot = d["spend"]["total"]
    lines = [f"**LLMOps weekly {w.label}** ({w.start:%d %b} – {w.end - timedelta(seconds=1):%d %b} UTC"
             + (f", data through {report.as_of:%a %H:%M}" if report.partial else "") + ")"]  # fmt: skip
    versus = (f"{_change_pct(tot['change'])} vs {w.previous.label}: {usd(tot['prev_cost_usd'])}"
              if tot["prev_cost_usd"] or tot["change"] == UNKNOWN else f"no spend in {w.previous.label}")  # fmt: skip
    unpriced = f", {tot['unpriced_calls']:,} of them without a price" if tot["unpriced_calls"] else ""
    lines.append(f"- Spend {usd(tot['cost_usd'])} over {tot['calls']:,} calls{unpriced} ({versus})")
    movers = ", ".join(f"{m['key']} {'+' if m['change_usd'] >= 0 else '−'}{usd(abs(m['change_usd']))}"
                       for m in d["spend"]["movers"][:3])  # fmt: skip
    if movers:
        lines.append(f"- Top movers: {movers}")
    bs = d["budgets"]["budgets"]
    if bs:
        lines.append("- Budgets: " + "; ".join(
            f"{b['name']} {b['used']:.0%} of {usd(b['limit_usd'])}"
            + (f", runs out {when(b['exhausted_at'])}" if b["exhausted_at"]
               else f", projected {usd(b['projected_usd'])}")
            for b in bs))  # fmt: skip
    else:
        proj = sum(t["projected_month_usd"] or 0.0 for t in d["budgets"]["teams"])
        unknown = [t["team"] for t in d["budgets"]["teams"] if t["projected_month_usd"] is None]
        lines.append(f"- No budgets configured; {d['budgets']['month']} projects to {usd(proj)}"
                     + (f" (without {', '.join(unknown)}: spend unknown)" if unknown else ""))  # fmt: skip
    worst = sorted((r for r in d["latency"]["week"] if r["latency_p95_ms"] is not None),
                   key=lambda r: -(r["latency_p95_ms"] or 0))[:3]  # fmt: skip
    if worst:
        lines.append("- Slowest p95: " + ", ".join(f"{r['feature']} {ms(r['latency_p95_ms'])}" for r in worst))
    rt = d["rates"]
    top_ref = next((m for m in rt["model"] if m["calls"] >= rt["min_calls"] and m["refusals"]), None)
    lines.append(f"- Errors {pct(rt['total']['error_rate'])}, refusals {pct(rt['total']['refusal_rate'])}"
                 + (f" (most refusals: {top_ref['key']} {pct(top_ref['refusal_rate'])})"
                    if top_ref else ""))  # fmt: skip
    drifted = [r for r in d["quality"]["drift"] if r["drifted"]]
    if drifted or d["quality"]["switches"]:
        what = [f"{r['feature']}/{r['model']} ({r['changes'][0] if r['changes'] else 'drift'})" for r in drifted[:3]]
        what += [f"model switch {s['detail']}" for s in d["quality"]["switches"][:2]]
        lines.append("- Drift: " + "; ".join(what))
    al = d["alerts"]
    if al["rules"]:
        lines.append(f"- Alerts: {len(al['incidents'])} incidents (" + ", ".join(
            f"{r['rule']} ×{r['incidents']}" for r in al["rules"][:4]) + ")")  # fmt: skip
    if d["errors"]["patterns"]:
        p = d["errors"]["patterns"][0]
        lines.append(f"- Top error: {p['error_type']} “{p['pattern']}” ×{p['calls']:,}")
    if d["flagged"]:
        f = d["flagged"][0]
        lines.append(f"- {sum(int(x['flags']) for x in d['flagged']):,} flags on the top prompts; most: "
                     f"{f['feature']} {f['prompt_hash']} ×{f['flags']}")  # fmt: skip
    lines.append(
        f"- Cache opportunity: {usd(d['cache']['repeat_cost_usd'])} on {d['cache']['repeats']:,} repeated prompts"
    )
    if html_path is not None:
        lines.append(f"Full report: {html_path}")
    return "\n".join(lines) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _dt(value).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def to_json(report: WeeklyReport) -> bytes:
    doc = {"week": report.week.label, "start": report.week.start, "end": report.week.end, "as_of": report.as_of,
           "reason": report.reason, "source": report.source, "generated_at": report.generated_at,
           "timings": report.timings, **report.data}  # fmt: skip
    return orjson.dumps(doc, default=_json_default, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


@dataclass
class Written:
    html: Path
    markdown: Path
    json: Path
    latest: Path | None


def write(report: WeeklyReport, out_dir: Path, latest: Path | None = None) -> Written:
    """report.html, summary.md and report.json in ``out_dir``; ``latest`` (the page ``llmpulse serve``
    shows) is overwritten with the same HTML, atomically, so a reader never sees half a page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, md_path, json_path = out_dir / "report.html", out_dir / "summary.md", out_dir / "report.json"
    page = render_html(report)
    html_path.write_text(page, encoding="utf-8")
    md_path.write_text(render_markdown(report, html_path.resolve()), encoding="utf-8")
    json_path.write_bytes(to_json(report))
    if latest is not None:
        latest.parent.mkdir(parents=True, exist_ok=True)
        tmp = latest.with_suffix(".html.tmp")
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(latest)
    return Written(html_path, md_path, json_path, latest)
