"""``llmpulse report weekly`` on demo data: every section present, every number equal to a direct
query on the raw tables (counts exactly, costs to the cent, percentiles within the stated
tolerance of ``quantileExact``), the CLI's files, and the page rendered by headless Chromium
without console errors (a screenshot kept as a test artifact)."""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from click.testing import CliRunner

from ingest.synthetic import Scenario
from llmpulse.commands import cli
from llmpulse.demo import run_demo
from llmpulse.report import (
    PERCENTILE_RANK_TOLERANCE,
    PERCENTILE_TOLERANCE,
    SECTIONS,
    UNKNOWN,
    ReportError,
    Week,
    WeeklyReport,
    build_weekly,
    choose_week,
    render_html,
    render_markdown,
    write,
)
from llmpulse.runtime import open_clickhouse
from processors.alerts.events import AlertEvent, AlertState
from processors.chain import CallPipeline, FeedbackPipeline
from schemas.config import Settings, load_settings
from schemas.prices import builtin_price_table
from schemas.rules import load_rules, register_metric
from sinks import queries
from sinks.alert_store import AlertStore
from sinks.clickhouse import ClickHouseSink
from tests.conftest import batch

ROOT = Path(__file__).resolve().parents[2]
BOOSTED = ("error", "refusal", "thumbs_down")

# the demo ends at a Monday 00:00 UTC, so the week before it is complete and the one before that partial
_now = datetime.now(UTC)
_monday = datetime(_now.year, _now.month, _now.day, tzinfo=UTC) - timedelta(days=_now.weekday())
SCENARIO = Scenario(events=30_000, days=10, seed=11, end=_monday.timestamp())
WEEK = Week.containing(SCENARIO.end - 1)


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in rules plus two budgets and a latency limit, so those parts of the report have data."""
    doc = yaml.safe_load(resources.files("schemas").joinpath("data/default_rules.yaml").read_text())
    doc["budgets"] = [
        {"name": "devex-monthly", "scope": {"team": "devex"}, "period": "month", "limit_usd": 150},
        {"name": "search-daily", "scope": {"feature": "search-summarize"}, "period": "day", "limit_usd": 2.5},
    ]
    doc["rules"].append({"name": "support-chat-p95", "metric": "latency_p95_ms", "window": "15m", "max": 15000,
                         "scope": {"where": {"feature": "support-chat"}}, "severity": "warning"})  # fmt: skip
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def demo(chdb_dir: Path, rules_file: Path) -> Settings:
    """Ten days of demo traffic (30k calls, alerts and budgets evaluated) in a database of its own."""
    settings = load_settings(None, {
        "data_dir": chdb_dir, "clickhouse": {"database": f"report_{os.getpid()}"},
        "alerting": {"rules_path": rules_file},
    })  # fmt: skip
    run_demo(settings, SCENARIO)
    return settings


@pytest.fixture
def conn(demo: Settings) -> Iterator[Any]:
    c = open_clickhouse(demo, purpose="pytest report")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def built(demo: Settings, rules_file: Path) -> WeeklyReport:
    c = open_clickhouse(demo, purpose="pytest report")
    try:
        return build_weekly(c, WEEK, load_rules(rules_file), reason="test")
    finally:
        c.close()


def rows(conn: Any, sql: str, **params: Any) -> list[dict[str, Any]]:
    r = conn.client.query(sql, parameters={"s": WEEK.start, "e": WEEK.end, "p": WEEK.previous.start, **params})
    return [dict(zip(r.column_names, row, strict=True)) for row in r.result_rows]


def cents(x: float) -> int:
    return round(x * 100)


def test_week_parsing_and_choice(conn: Any) -> None:
    assert Week.parse("2026-W47").start == datetime(2026, 11, 16, tzinfo=UTC)
    assert Week.parse("2026w01").start == datetime(2025, 12, 29, tzinfo=UTC)  # ISO week 1 starts in December
    assert Week.parse("2026-W47").previous.label == "2026-W46"
    for bad in ("2026-47", "W47", "2026-W54"):
        with pytest.raises(ReportError):
            Week.parse(bad)
    # a few hours into the next week: the last complete week, which holds the data
    assert choose_week(conn, now=WEEK.end.timestamp() + 5 * 3600)[0] == WEEK
    # weeks later the last complete week is empty: the newest data's week instead, and it says so
    week, why = choose_week(conn, now=WEEK.end.timestamp() + 15 * 86400)
    assert week == WEEK and "newest data" in why


def test_spend_matches_raw_to_the_cent(built: WeeklyReport, conn: Any) -> None:
    sp = built.data["spend"]
    for dim in ("feature", "team", "model"):
        raw = {r["k"]: r for r in rows(conn, f"""
            SELECT {dim} AS k, countIf(ts >= {{s:DateTime64(3)}}) AS calls,
                   sumIf(ifNull(cost_usd, 0), ts >= {{s:DateTime64(3)}}) AS cost,
                   countIf(price_missing AND ts >= {{s:DateTime64(3)}}) AS unpriced,
                   countIf(ts < {{s:DateTime64(3)}}) AS prev_calls,
                   sumIf(ifNull(cost_usd, 0), ts < {{s:DateTime64(3)}}) AS prev_cost,
                   countIf(price_missing AND ts < {{s:DateTime64(3)}}) AS prev_unpriced
            FROM llm_calls FINAL WHERE ts >= {{p:DateTime64(3)}} AND ts < {{e:DateTime64(3)}}
            GROUP BY k""")}  # fmt: skip
        got = {i["key"]: i for i in sp[dim]}
        assert set(got) == {k for k, r in raw.items() if r["calls"]} | {k for k, r in raw.items() if r["prev_calls"]}
        for k, r in raw.items():
            assert (got[k]["calls"], got[k]["prev_calls"], got[k]["unpriced_calls"]) == (
                r["calls"], r["prev_calls"], r["unpriced"]), (dim, k)  # fmt: skip
            if r["calls"] and r["unpriced"] == r["calls"]:  # no call priced: spend unknown, not $0
                assert got[k]["cost_usd"] is None and got[k]["change"] == UNKNOWN, (dim, k)
            else:
                assert cents(got[k]["cost_usd"]) == cents(r["cost"]) and got[k]["cost_usd"] == pytest.approx(r["cost"])
            if r["prev_calls"] and r["prev_unpriced"] == r["prev_calls"]:
                assert got[k]["prev_cost_usd"] is None, (dim, k)
            else:
                assert cents(got[k]["prev_cost_usd"]) == cents(r["prev_cost"])
        unknown = {k for k, r in raw.items() if r["calls"] and r["unpriced"] == r["calls"]}
        assert unknown == ({"acme-llm-1"} if dim == "model" else set()), dim  # the demo's one unpriced model
    total = rows(conn, "SELECT count() AS n, sum(ifNull(cost_usd, 0)) AS cost, countIf(price_missing) AS unpriced "
                       "FROM llm_calls FINAL WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)}")[0]  # fmt: skip
    assert sp["total"]["calls"] == total["n"] > 15_000
    assert cents(sp["total"]["cost_usd"]) == cents(total["cost"])
    assert sp["total"]["unpriced_calls"] == total["unpriced"] > 0
    assert sp["total"]["prev_calls"] > 0  # three days of the week before: week-over-week has something to say
    movers = sp["movers"]
    assert movers and abs(movers[0]["change_usd"]) == max(abs(i["change_usd"]) for d in ("feature", "team", "model")
                                                          for i in sp[d] if i["change_usd"] is not None)  # fmt: skip
    daily = rows(conn, "SELECT toString(toDate(ts)) AS day, feature, count() AS calls FROM llm_calls FINAL "
                       "WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)} GROUP BY day, feature")  # fmt: skip
    assert {(r["day"], r["feature"]): r["calls"] for r in daily} == {(r["day"], r["feature"]): r["calls"]
                                                                     for r in sp["daily"]}  # fmt: skip


FLOAT32 = 1e-6
"""t-digest centroids are Float32: a bucket of a few calls gives back one of its own latencies, rounded to
7 significant digits (3451.9 ms as 3451.8999), which may sit a hair outside the exact band."""


def _within(value: float, exact: dict[str, float], p: str) -> bool:
    """The README's tolerance: 5% of quantileExact, or within one percentile rank of it."""
    if abs(value - exact[p]) <= PERCENTILE_TOLERANCE * abs(exact[p]):
        return True
    return exact[f"{p}_lo"] * (1 - FLOAT32) <= value <= exact[f"{p}_hi"] * (1 + FLOAT32)


def _exact_quantiles(column: str) -> str:
    """quantileExact at p50/p95/p99 and one percentile rank either side (the README's tolerance band)."""
    r = PERCENTILE_RANK_TOLERANCE
    return ", ".join(
        f"quantileExact({q})({column}) AS {p}, quantileExact({q - r})({column}) AS {p}_lo, "
        f"quantileExact({min(q + r, 1)})({column}) AS {p}_hi"
        for p, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
    )


GRAIN_BUCKETS = {"week": "toUnixTimestamp({s:DateTime64(3)})", "daily": "toUnixTimestamp(toStartOfDay(ts))",
                 "hourly": "toUnixTimestamp(toStartOfHour(ts))"}  # fmt: skip


@pytest.mark.parametrize("grain", ["week", "daily", "hourly"])
def test_latency_percentiles_within_the_stated_tolerance(built: WeeklyReport, conn: Any, grain: str) -> None:
    """Every feature's week, day and hour: counts and means exact, p50/p95/p99 of latency and TTFT within
    the README's tolerance of quantileExact on the raw rows."""
    checked = 0
    worst = 0.0
    got_rows = built.data["latency"][grain]
    for column, prefix in (("latency_ms", "latency"), ("ttft_ms", "ttft")):
        exact = {(x["b"], x["feature"]): x for x in rows(conn, f"""
            SELECT {GRAIN_BUCKETS[grain]} AS b, feature, count() AS n, avg(v) AS mean, {_exact_quantiles("v")}
            FROM (SELECT ts, feature, {column} AS v FROM llm_calls FINAL
                  WHERE ts >= {{s:DateTime64(3)}} AND ts < {{e:DateTime64(3)}} AND {column} IS NOT NULL)
            GROUP BY b, feature""")}  # fmt: skip
        with_values = {(int(g["bucket"]), g["feature"]) for g in got_rows if g[f"{prefix}_p50_ms"] is not None}
        assert with_values == set(exact), (grain, prefix)
        for got in got_rows:
            x = exact.get((int(got["bucket"]), got["feature"]))
            if x is None:
                assert got[f"{prefix}_p95_ms"] is None and got[f"{prefix}_avg_ms"] is None  # no streaming calls
                continue
            assert (got["calls"] if prefix == "latency" else got["ttft_calls"]) == x["n"]
            assert got[f"{prefix}_avg_ms"] == pytest.approx(x["mean"], rel=1e-9)
            for p in ("p50", "p95", "p99"):
                value = got[f"{prefix}_{p}_ms"]
                assert _within(value, x, p), (grain, got["feature"], got["bucket"], prefix, p, value, x)
                worst = max(worst, abs(value - x[p]) / x[p])
                checked += 1
    assert checked >= {"week": 30, "daily": 200, "hourly": 4000}[grain]
    # daily and hourly buckets partition the week's calls
    per: dict[str, int] = defaultdict(int)
    for b in got_rows:
        per[b["feature"]] += b["calls"]
    assert per == {g["feature"]: g["calls"] for g in built.data["latency"]["week"]}
    print(f"{grain}: worst relative percentile error over {checked} checks: {worst:.2%}")


def test_error_and_refusal_counts_match_raw(built: WeeklyReport, conn: Any) -> None:
    rt = built.data["rates"]
    for dim in ("feature", "model"):
        raw = rows(conn, f"""
            SELECT {dim} AS key, count() AS calls, countIf(status != 'ok') AS errors,
                   countIf(status = 'timeout') AS timeouts, countIf(status = 'rate_limited') AS rate_limited,
                   countIf(refusal) AS refusals
            FROM llm_calls FINAL WHERE ts >= {{s:DateTime64(3)}} AND ts < {{e:DateTime64(3)}}
            GROUP BY key""")  # fmt: skip
        got = {
            g["key"]: {k: g[k] for k in ("calls", "errors", "timeouts", "rate_limited", "refusals")} for g in rt[dim]
        }
        assert got == {x.pop("key"): x for x in raw}
    assert rt["total"]["errors"] == sum(g["errors"] for g in rt["feature"]) > 0
    # the daily error/refusal charts: per feature and day, counts exact and rates their ratio
    daily = rows(conn, """
        SELECT concat(feature, '|', toString(toDate(ts))) AS key, count() AS calls, countIf(status != 'ok') AS errors,
               countIf(status = 'timeout') AS timeouts, countIf(status = 'rate_limited') AS rate_limited,
               countIf(refusal) AS refusals
        FROM llm_calls FINAL WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)}
        GROUP BY key""")  # fmt: skip
    got_daily = {g["key"]: g for g in rt["daily"]}
    assert set(got_daily) == {x["key"] for x in daily} and len(daily) >= 6 * 7
    for x in daily:
        g = got_daily[x["key"]]
        assert {k: g[k] for k in ("calls", "errors", "timeouts", "rate_limited", "refusals")} == {
            k: x[k] for k in ("calls", "errors", "timeouts", "rate_limited", "refusals")
        }
        assert (g["error_rate"], g["refusal_rate"]) == (x["errors"] / x["calls"], x["refusals"] / x["calls"])
    assert any(r["rule"] == "refusal-regression" for r in rt["rules"])


def test_eval_feedback_and_drift(built: WeeklyReport, conn: Any) -> None:
    ql = built.data["quality"]
    raw = {(x["feature"], x["release_id"]): x for x in rows(conn, """
        SELECT feature, release_id, count() AS n, avg(score) AS score FROM judge_scores FINAL
        WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)} AND sample_reason NOT IN {b:Array(String)}
        GROUP BY feature, release_id""", b=list(BOOSTED))}  # fmt: skip
    got = {(x["feature"], x["release_id"]): x for x in ql["eval"]}
    assert set(got) == set(raw) and len(got) > 5
    for k, x in raw.items():
        assert got[k]["judged"] == x["n"] and got[k]["eval_score"] == pytest.approx(x["score"])
    thumbs = rows(conn, """SELECT toString(toDate(ts)) AS day, feature, countIf(thumbs IN ('up', 'down')) AS n,
                                  countIf(thumbs = 'down') AS down FROM feedback FINAL
                           WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)}
                           GROUP BY day, feature""")  # fmt: skip
    daily = {(x["day"], x["feature"]): (x["thumbs"], x["thumbs_down"]) for x in ql["daily"] if x["thumbs"]}
    assert daily == {(x["day"], x["feature"]): (x["n"], x["down"]) for x in thumbs if x["n"]}
    assert sum(x["judged"] for x in ql["daily"]) == sum(x["n"] for x in raw.values())
    calls = {(x["feature"], x["release_id"]): x["n"] for x in rows(conn, """
        SELECT feature, release_id, count() AS n FROM llm_calls FINAL
        WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)} GROUP BY feature, release_id""")}  # fmt: skip
    assert {(x["feature"], x["release_id"]): x["calls"] for x in ql["releases"]} == calls
    # per release: cost per call, refusal rate and thumbs-down rate exact (as rounded by release_metrics),
    # p95 within the stated tolerance, judge score as eval_by_release
    rel = {(x["feature"], x["release_id"]): x for x in rows(conn, f"""
        SELECT feature, release_id, count() AS n, sum(ifNull(cost_usd, 0)) AS cost, countIf(refusal) AS refusals,
               countIf(NOT price_missing) AS priced,
               {_exact_quantiles("latency_ms")}
        FROM llm_calls FINAL WHERE ts >= {{s:DateTime64(3)}} AND ts < {{e:DateTime64(3)}}
        GROUP BY feature, release_id""")}  # fmt: skip
    fb = {(x["feature"], x["release_id"]): x for x in rows(conn, """
        SELECT feature, release_id, countIf(thumbs IN ('up', 'down')) AS n, countIf(thumbs = 'down') AS down
        FROM feedback FINAL WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)}
        GROUP BY feature, release_id""")}  # fmt: skip
    for r in ql["releases"]:
        k = (r["feature"], r["release_id"])
        x = rel[k]
        # over the calls with a cost: an unpriced call is not a free one
        expected = round(x["cost"] / x["priced"], 6) if x["priced"] else None
        assert r["cost_per_call_usd"] == (pytest.approx(expected, abs=1.01e-6) if expected is not None else None), k
        assert r["refusal_rate"] == round(x["refusals"] / x["n"], 4), k
        assert _within(r["latency_p95_ms"], x, "p95"), (k, r["latency_p95_ms"], x)
        f = fb.get(k)
        assert r["thumbs_down_rate"] == (round(f["down"] / f["n"], 4) if f and f["n"] else None), k
        if k in raw:
            assert (r["judged"], r["eval_score"]) == (raw[k]["n"], round(raw[k]["score"], 4)), k
        else:
            assert r["eval_score"] is None, k
    assert sum(1 for r in ql["releases"] if r["thumbs_down_rate"] is not None) > 3
    # daily judge score per feature
    daily_eval = {(x["day"], x["feature"]): x for x in rows(conn, """
        SELECT toString(toDate(ts)) AS day, feature, count() AS n, avg(score) AS score FROM judge_scores FINAL
        WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)} AND sample_reason NOT IN {b:Array(String)}
        GROUP BY day, feature""", b=list(BOOSTED))}  # fmt: skip
    got_eval = {(x["day"], x["feature"]): x for x in ql["daily"] if x["judged"]}
    assert set(got_eval) == set(daily_eval) and len(got_eval) > 20
    for k, x in daily_eval.items():
        assert got_eval[k]["judged"] == x["n"] and got_eval[k]["eval_score"] == pytest.approx(x["score"], rel=1e-9)
    # the demo's incidents: the prompt change doubles search-summarize output, gpt-4o-mini switches snapshot
    assert any(d["feature"] == "search-summarize" and d["drifted"] for d in ql["drift"])
    assert [s["model"] for s in ql["switches"]] == ["gpt-4o-mini"]


def test_alerts_and_durations_match_the_alerts_table(built: WeeklyReport, conn: Any) -> None:
    """Incidents that overlap the week (still firing from before it too), durations clipped to the week,
    and each rule's count, median, longest and total duration, recomputed from the alerts table."""
    al = built.data["alerts"]
    raw = rows(conn, """
        SELECT dedup_key, started_at, any(rule) AS rule, any(metric) AS metric,
               maxIf(ended_at, state = 'resolved') AS resolved
        FROM alerts FINAL WHERE started_at < {e:DateTime64(3)}
        GROUP BY dedup_key, started_at""")  # fmt: skip
    start, end = WEEK.start.timestamp(), WEEK.end.timestamp()
    expected = []
    for x in raw:
        fired = x["started_at"].replace(tzinfo=UTC).timestamp()
        resolved = x["resolved"].replace(tzinfo=UTC).timestamp() if x["resolved"] else None
        if x["metric"] == "budget_spend_usd":  # budget notices are one-off: counted the week they were sent
            if fired >= start:
                expected.append((x["rule"], 0, False))
        elif resolved is None or resolved > start:
            expected.append((x["rule"], int(min(resolved or end, end) - max(fired, start)), fired < start))
    assert sorted((i["rule"], i["duration_s"], i["started_before"]) for i in al["incidents"]) == sorted(expected)
    assert len(expected) > 0 and any(before for _, _, before in expected)  # one still firing from the week before
    assert all(0 <= i["duration_s"] <= end - max(i["started_at"], start) for i in al["incidents"])
    by_rule: dict[str, list[tuple[int, bool]]] = defaultdict(list)
    for rule, seconds, _ in expected:
        by_rule[rule].append((seconds, rule in {i["rule"] for i in al["incidents"] if i["notice"]}))
    got = {r["rule"]: r for r in al["rules"]}
    assert set(got) == set(by_rule)
    for rule, items in by_rule.items():
        timed = [sec for sec, notice in items if not notice]
        assert got[rule]["incidents"] == len(items)
        assert (got[rule]["median_s"], got[rule]["longest_s"], got[rule]["total_s"]) == (
            (statistics.median(timed), max(timed), sum(timed)) if timed else (None, None, 0)
        ), rule
    assert any(i["notice"] for i in al["incidents"])  # devex spends past 50% of its $150 budget in the week
    assert all(i["duration_s"] == 0 for i in al["incidents"] if i["notice"])


def test_budgets_match_raw_spend(built: WeeklyReport, conn: Any) -> None:
    bd = {b["name"]: b for b in built.data["budgets"]["budgets"]}
    as_of = WEEK.end
    month = datetime(as_of.year, as_of.month, 1, tzinfo=UTC) if as_of.day > 1 else (
        datetime((as_of - timedelta(days=1)).year, (as_of - timedelta(days=1)).month, 1, tzinfo=UTC))  # fmt: skip
    spent = rows(conn, "SELECT sum(ifNull(cost_usd, 0)) AS c FROM llm_calls FINAL WHERE team = 'devex' "
                       "AND ts >= {m:DateTime64(3)} AND ts < {e:DateTime64(3)}", m=month)[0]["c"]  # fmt: skip
    dev = bd["devex-monthly"]
    assert cents(dev["spent_usd"]) == cents(spent) and dev["used"] == pytest.approx(spent / 150)
    burn = rows(conn, "SELECT sum(ifNull(cost_usd, 0)) AS c FROM llm_calls FINAL WHERE team = 'devex' "
                      "AND ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)}")[0]["c"]  # fmt: skip
    assert dev["burn_usd_per_hour"] == pytest.approx(burn / 168)
    assert dev["projected_usd"] >= dev["spent_usd"]
    day = rows(conn, "SELECT sum(ifNull(cost_usd, 0)) AS c FROM llm_calls FINAL WHERE feature = 'search-summarize' "
                     "AND ts >= {e:DateTime64(3)} - INTERVAL 1 DAY AND ts < {e:DateTime64(3)}")[0]["c"]  # fmt: skip
    assert cents(bd["search-daily"]["spent_usd"]) == cents(day)
    # projection to the period's end and run-out: forecast's arithmetic on the raw spend and 7-day burn
    now = as_of.timestamp() - 0.001
    for b, b_spent, b_burn, p_end in (
        (dev, spent, burn, datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)),
        (bd["search-daily"], day, rows(conn, "SELECT sum(ifNull(cost_usd, 0)) AS c FROM llm_calls FINAL WHERE "
                                             "feature = 'search-summarize' AND ts >= {s:DateTime64(3)} "
                                             "AND ts < {e:DateTime64(3)}")[0]["c"], as_of),
    ):  # fmt: skip
        hourly = b_burn / 168
        assert b["burn_usd_per_hour"] == pytest.approx(hourly, rel=1e-9)
        assert b["projected_usd"] == pytest.approx(b_spent + hourly * (p_end.timestamp() - now) / 3600, rel=1e-9)
        run_out = now if b_spent >= b["limit_usd"] else now + (b["limit_usd"] - b_spent) / hourly * 3600
        assert b["exhausted_at"] == (pytest.approx(run_out) if run_out < p_end.timestamp() else None), b["name"]
    # every team's month to date, 7-day burn and month projection
    teams = {t["team"]: t for t in built.data["budgets"]["teams"]}
    assert cents(teams["devex"]["mtd_cost_usd"]) == cents(spent)
    month_end = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
    raw_teams = rows(conn, """
        SELECT team, sumIf(ifNull(cost_usd, 0), ts >= {m:DateTime64(3)}) AS mtd,
               sumIf(ifNull(cost_usd, 0), ts >= {e:DateTime64(3)} - INTERVAL 7 DAY) AS last7
        FROM llm_calls FINAL WHERE ts >= least({m:DateTime64(3)}, {e:DateTime64(3)} - INTERVAL 7 DAY)
          AND ts < {e:DateTime64(3)}
        GROUP BY team""", m=month)  # fmt: skip
    assert set(teams) == {x["team"] for x in raw_teams} and len(teams) >= 3
    for x in raw_teams:
        t = teams[x["team"]]
        assert cents(t["mtd_cost_usd"]) == cents(x["mtd"]), x["team"]
        assert t["burn_usd_per_hour"] == pytest.approx(x["last7"] / 168, rel=1e-9)
        projected = x["mtd"] + x["last7"] / 168 * (month_end - as_of).total_seconds() / 3600
        assert cents(t["projected_month_usd"]) == cents(projected), x["team"]
    lat_rules = {r["rule"]: r for r in built.data["latency"]["rules"]}
    assert lat_rules["support-chat-p95"]["max"] == 15000 and lat_rules["support-chat-p95"]["feature"] == "support-chat"


def test_error_patterns_flagged_outputs_and_cache_match_raw(built: WeeklyReport, conn: Any) -> None:
    pats = built.data["errors"]["patterns"]
    raw = rows(conn, """SELECT error_type, error_message, count() AS n FROM llm_calls FINAL
                        WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)} AND status != 'ok'
                        GROUP BY error_type, error_message""")  # fmt: skip
    # demo messages carry no numbers or ids: each pattern is one message
    assert {(p["error_type"], p["pattern"]): p["calls"] for p in pats} == {
        (x["error_type"], x["error_message"]): x["n"] for x in raw
    }
    assert built.data["errors"]["failed_calls"] == sum(x["n"] for x in raw)
    period = {"start": WEEK.start, "end": WEEK.end}
    reference = queries.run(conn.client, "top_flagged_outputs", **period)
    key = ("feature", "release_id", "model", "prompt_hash", "flags", "users")
    assert [tuple(r[k] for k in key) for r in built.data["flagged"]] == [tuple(r[k] for k in key) for r in reference]
    assert built.data["flagged"]
    # cache opportunity recomputed in Python from the raw rows: a repeat is the same feature and prompt
    # within an hour of the previous send
    calls = rows(conn, """SELECT feature, prompt_hash, toUnixTimestamp64Milli(ts) AS t, ifNull(cost_usd, 0) AS c
                          FROM llm_calls WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)}""")  # fmt: skip
    last: dict[tuple[str, str], int] = {}
    repeats, cost = 0, 0.0
    for c in sorted(calls, key=lambda c: (c["feature"], c["prompt_hash"], c["t"])):
        k = (c["feature"], c["prompt_hash"])
        if c["prompt_hash"] and k in last and c["t"] - last[k] <= 3_600_000:
            repeats, cost = repeats + 1, cost + c["c"]
        last[k] = c["t"]
    assert built.data["cache"]["repeats"] == repeats > 0
    # the same answer as the shared cache_opportunity query (which sorts the week's rows instead)
    shared = {r["feature"]: r for r in queries.run(conn.client, "cache_opportunity", **period)}
    for r in built.data["cache"]["features"]:
        assert (r["calls"], r["repeats"]) == (shared[r["feature"]]["calls"], shared[r["feature"]]["repeats"])
        assert r["repeat_cost_usd"] == pytest.approx(shared[r["feature"]]["repeat_cost_usd"], abs=1e-4)
    assert built.data["cache"]["repeat_cost_usd"] == pytest.approx(
        cost, abs=0.0005 * len(built.data["cache"]["features"])
    )


def test_every_section_rendered(built: WeeklyReport, tmp_path: Path) -> None:
    page = render_html(built)
    for key, title in SECTIONS:
        assert f'<section id="{key}">' in page and f"<h2>{title}</h2>" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page  # opens offline
    assert page.count("<svg") >= 8
    assert page.count("<th>without a price</th>") == 3  # spend per feature, team and model
    summary = render_markdown(built)
    assert summary.startswith(f"**LLMOps weekly {WEEK.label}**") and len(summary.splitlines()) <= 14
    written = write(built, tmp_path / "out", tmp_path / "latest.html")
    assert written.html.read_text() == (tmp_path / "latest.html").read_text()


def test_cli_writes_the_report_and_latest(demo: Settings, rules_file: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    result = CliRunner().invoke(
        cli,
        ["report", "weekly", "--week", WEEK.label, "--rules", str(rules_file), "--data-dir", str(demo.data_dir),
         "--out", str(tmp_path / "r")],
        env={"LLMPULSE_CLICKHOUSE__DATABASE": demo.clickhouse.database},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"Weekly report {WEEK.label}" in result.output
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.html", "summary.md", "report.json"}
    latest = demo.data_dir / "reports" / "latest.html"
    assert latest.read_text() == (tmp_path / "r" / "report.html").read_text()
    assert time.perf_counter() - started < 20
    bad = CliRunner().invoke(cli, ["report", "weekly", "--week", "2026-47", "--data-dir", str(demo.data_dir)])
    assert bad.exit_code == 2 and "expected an ISO week" in bad.output


# ---- hand-made data: month boundaries, alerts from before the week, duplicates, masked messages -----------


def _month_start() -> datetime:
    """The 1st of this month, or of the last one if this month is under two days old: the hand-made
    report's ``as_of`` (the 2nd, 12:00) must be in the past for the raw table's retention check."""
    now = datetime.now(UTC)
    first = datetime(now.year, now.month, 1, tzinfo=UTC)
    if now - first < timedelta(days=2):
        first = datetime(first.year - (first.month == 1), (first.month - 2) % 12 + 1, 1, tzinfo=UTC)
    return first


M = _month_start()
AS_OF = M + timedelta(hours=36)
"""The report is made on the 2nd at 12:00: its 7-day burn window starts on the 26th or so of the month
before, so it crosses the month's start whatever weekday the 1st is."""
TINY_WEEK = Week.containing(AS_OF.timestamp())
DAY2 = M + timedelta(days=1)
UUID1, UUID2 = "3f2a9c1e-0b7d-4e5f-9a8b-1c2d3e4f5a6b", "9d8c7b6a-5f4e-4d3c-2b1a-0f9e8d7c6b5a"


def _call(event_id: str, t: datetime, cost: float, feature: str = "f1", team: str = "alpha", latency: float = 100,
          **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {"event_id": event_id, "ts": t.isoformat().replace("+00:00", "Z"), "feature": feature, "team": team,
            "model": "gpt-4o", "input_tokens": 100, "output_tokens": 20, "latency_ms": latency, "status": "ok",
            "cost_usd": cost, **extra}  # fmt: skip


TINY_CALLS = [
    # feature f3 (and beta's f4): whether these fall in the report's week depends on the 1st's weekday
    _call("c1", M - timedelta(days=12) + timedelta(hours=10), 7.00, feature="f3"),  # before the burn window
    _call("c2", M - timedelta(days=4) + timedelta(hours=10), 2.00, feature="f3"),  # burn window, last month
    _call("c3", M - timedelta(minutes=30), 3.00, feature="f3"),  # burn window, last month
    _call("b1", M - timedelta(days=3) + timedelta(hours=10), 0.42, feature="f4", team="beta"),
    _call("c4", M + timedelta(minutes=30), 4.00, feature="f3"),  # month to date
    _call("w1", DAY2 + timedelta(hours=9, minutes=10), 1.00, latency=200, ttft_ms=50, prompt_hash="pA",
          request_id="r-w1"),
    _call("w2", DAY2 + timedelta(hours=9, minutes=40), 0.50, latency=300, ttft_ms=80, prompt_hash="pA",
          request_id="r-w2"),  # the same prompt half an hour later: a cache would have saved $0.50
    _call("w3", DAY2 + timedelta(hours=9, minutes=50), 0, latency=400),
    _call("w4", DAY2 + timedelta(hours=10, minutes=5), 0, latency=100),
    _call("w5", DAY2 + timedelta(hours=10, minutes=15), 0, latency=5000),
    _call("e1", DAY2 + timedelta(hours=10, minutes=20), 0, feature="f2", status="error", error_type="server_error",
          error_message=f"upstream 503 after 1234 ms (request {UUID1})"),
    _call("e2", DAY2 + timedelta(hours=10, minutes=25), 0, feature="f2", status="error", error_type="server_error",
          error_message=f"upstream 502 after 87.5 ms (request {UUID2})"),
    _call("e3", DAY2 + timedelta(hours=10, minutes=30), 0, feature="f2", status="rate_limited",
          error_type="rate_limit_exceeded", error_message="quota exceeded for key 0xdeadbeefcafe1234, retry in 20 s"),
    _call("e4", DAY2 + timedelta(hours=10, minutes=35), 0, feature="f2", status="rate_limited",
          error_type="rate_limit_exceeded", error_message="quota exceeded for key a1b2c3d4e5f60718, retry in 3 s"),
]  # fmt: skip
"""Team alpha: $5.50 this month (c4, w1, w2) and $10.50 in the 7 days to AS_OF (c2, c3 and those), so
$0.0625 an hour; team beta: $0.42 last month, all in the burn window ($0.0025 an hour)."""

TINY_RULES = {
    "rules": [
        {"name": "f1-mean", "metric": "latency_avg_ms", "max": 1000, "scope": {"where": {"feature": "f1"}}},
        {"name": "ttft-p99", "metric": "ttft_p99_ms", "max": 60},
        {"name": "f1-p50", "metric": "latency_p50_ms", "max": 10000, "scope": {"where": {"feature": "f1"}}},
        {"name": "f1-p999", "metric": "latency_p999_ms", "max": 1, "scope": {"where": {"feature": "f1"}}},
    ],
    "budgets": [{"name": "alpha-monthly", "scope": {"team": "alpha"}, "period": "month", "limit_usd": 40}],
}


def _tiny(chdb_dir: Path, name: str) -> Any:
    settings = load_settings(None, {"data_dir": chdb_dir, "clickhouse": {"database": f"{name}_{os.getpid()}"}})
    conn = open_clickhouse(settings, purpose="pytest report")
    _write_calls(conn, TINY_CALLS, f"{name}-base")
    return conn


def _write_calls(conn: Any, calls: list[dict[str, Any]], token: str) -> None:
    """Through the pipeline (pricing, release ids) and the sink, as the worker writes them; a fresh pipeline,
    so a call written again is not caught by its in-memory dedup (a restarted worker, a client retry)."""
    processed = CallPipeline(builtin_price_table()).process(batch([orjson.dumps(c) for c in calls]), time.time())
    assert len(processed.events) == len(calls), processed.dead
    ClickHouseSink(conn).write([processed], token)


def _tiny_rules(tmp_path: Path) -> Any:
    register_metric("latency_p999_ms", "99.9th percentile latency (ms); the report's rollups have no such quantile")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(TINY_RULES))
    return load_rules(path)


def _alert(
    key: str, rule: str, fired: datetime, resolved: datetime | None, metric: str = "latency_p95_ms"
) -> list[AlertEvent]:
    """An incident as the evaluator writes it: its firing row, and its resolution if it has one."""

    def event(state: AlertState, ended: datetime | None) -> AlertEvent:
        return AlertEvent(key, rule, state, "warning", "notify", metric, 1.0, f"{metric} > 0", {"feature": "f1"},
                          {}, fired, fired, fired, ended, f"[warning] {rule}")  # fmt: skip

    return [event("firing", None)] + ([event("resolved", resolved)] if resolved else [])


def test_month_crossing_burn_alerts_from_before_the_week_and_latency_limits(chdb_dir: Path, tmp_path: Path) -> None:
    """A report two days into a month: the 7-day burn reaches back into the previous month; incidents
    still firing from before the week count, clipped to it; every latency/TTFT rule with a max is checked
    on its own statistic and drawn on its chart, and a rule on a statistic the rollups lack is named."""
    conn = _tiny(chdb_dir, "month")
    w0, a = TINY_WEEK.start, AS_OF
    AlertStore(conn).write([
        *_alert("k1", "slow", w0 - timedelta(days=2), None),  # still firing from before the week
        *_alert("k2", "slow", w0 - timedelta(hours=4), w0 + timedelta(hours=3)),  # 3 h of it in the week
        *_alert("k3", "slow", w0 - timedelta(days=3), w0 - timedelta(days=2)),  # over before the week
        *_alert("k4", "errs", a - timedelta(hours=7), a - timedelta(hours=5, minutes=30)),
        *_alert("k5", "alpha-monthly", w0 - timedelta(days=1), None, "budget_spend_usd"),  # a notice last week
        *_alert("k6", "alpha-monthly", a - timedelta(hours=1), None, "budget_spend_usd"),
        *_alert("k7", "removed-rule", w0 - timedelta(days=40), None),  # never resolved: not every week's news
    ])  # fmt: skip
    try:
        report = build_weekly(conn, TINY_WEEK, _tiny_rules(tmp_path), now=AS_OF.timestamp())
    finally:
        conn.close()
    assert report.as_of == AS_OF
    # per team: month to date, burn over the 7 days to AS_OF (across the 1st) and the month's projection
    hours_left = (datetime(M.year + M.month // 12, M.month % 12 + 1, 1, tzinfo=UTC) - AS_OF).total_seconds() / 3600
    alpha, beta = report.data["budgets"]["teams"]
    assert (alpha["team"], alpha["mtd_cost_usd"], alpha["burn_usd_per_hour"]) == ("alpha", 5.50, 0.0625)
    assert alpha["projected_month_usd"] == 5.50 + 0.0625 * hours_left  # $48.25 in a 30-day month
    assert (beta["team"], beta["mtd_cost_usd"]) == ("beta", 0.0)
    assert beta["burn_usd_per_hour"] == pytest.approx(0.0025) and beta["projected_month_usd"] == pytest.approx(
        0.0025 * hours_left
    )
    (budget,) = report.data["budgets"]["budgets"]
    assert (budget["spent_usd"], budget["burn_usd_per_hour"]) == (5.50, 0.0625)
    assert budget["exhausted_at"] == pytest.approx(AS_OF.timestamp() + (40 - 5.50) / 0.0625 * 3600, abs=0.01)
    # alerts overlapping the week, durations within it
    incidents = {i["rule"] + ("*" if i["started_before"] else ""): i for i in report.data["alerts"]["incidents"]}
    in_week = (a - w0).total_seconds()
    assert sorted((i["rule"], i["duration_s"], i["started_before"], i["resolved_at"] is None)
                  for i in report.data["alerts"]["incidents"]) == sorted([
        ("slow", in_week, True, True), ("slow", 3 * 3600, True, False), ("errs", 5400, False, False),
        ("alpha-monthly", 0, False, True)])  # fmt: skip
    assert "slow*" in incidents
    slow = next(r for r in report.data["alerts"]["rules"] if r["rule"] == "slow")
    assert (slow["incidents"], slow["still_firing"], slow["longest_s"], slow["total_s"]) == (
        2, 1, in_week, in_week + 10800)  # fmt: skip
    assert slow["median_s"] == (in_week + 10800) / 2
    # latency: f1's mean is 1,200 ms (over f1-mean in the week, and in the hour of the 5 s call), its TTFT
    # p99 is about 80 ms (over ttft-p99); f2 streams nothing, so no TTFT and nothing over
    lat = report.data["latency"]
    week = {r["feature"]: r for r in lat["week"]}
    assert week["f1"]["latency_avg_ms"] == 1200 and week["f2"]["latency_avg_ms"] == 100
    assert week["f1"]["over_budget"] == ["f1-mean", "ttft-p99"] and week["f2"]["over_budget"] == []
    assert week["f1"]["hours_over_budget"] == {"f1-mean": 1, "ttft-p99": 1}
    assert week["f2"]["ttft_p99_ms"] is None and week["f2"]["hours_over_budget"] == {}
    assert lat["not_in_report"] == ["f1-p999"]
    (day,) = [r for r in lat["daily"] if r["feature"] == "f1"]
    assert day["over_budget"] == ["f1-mean", "ttft-p99"]
    page = render_html(report)
    charts_by_title = {c.split("</h3>")[0]: c for c in page.split("<h3>")[1:]}
    limits = {
        "Hourly mean latency per feature": "f1-mean (f1): 1,000 ms",
        "Hourly p50 latency per feature": "f1-p50 (f1): 10.0 s",
        "Hourly p99 time to first token (streaming features) per feature": "ttft-p99 (all): 60 ms",
    }
    for title, limit in limits.items():
        (chart,) = [c for t, c in charts_by_title.items() if t.startswith(title)]
        assert limit in chart and chart.count('class="threshold"') == 1, title
    p95 = [c for t, c in charts_by_title.items() if t.startswith("Hourly p95")]
    assert len(p95) == 2 and all('class="threshold"' not in c for c in p95)  # no rule limits a p95
    assert "over the limit: f1 (f1-mean)" in page and "over the limit: f1 (ttft-p99)" in page
    assert "Daily p50 / p95 / p99 TTFT" in page and "⚠ f1-mean" in page and "⚠ ttft-p99" in page
    assert "Not in report" in page and "f1-p999 (latency_p999_ms)" in page
    # error messages grouped with numbers, ids and hex strings masked
    assert {(p["error_type"], p["pattern"]): p["calls"] for p in report.data["errors"]["patterns"]} == {
        ("server_error", "upstream <n> after <n> ms (request <id>)"): 2,
        ("rate_limit_exceeded", "quota exceeded for key <hex>, retry in <n> s"): 2,
    }


def test_spend_of_calls_without_any_price_is_unknown_not_zero(chdb_dir: Path, tmp_path: Path) -> None:
    """Team gamma's feature f9 runs on a model the price table lacks, in both weeks: its spend, its
    week-over-week change and its month are unknown (—), not $0.00 and "new"."""
    conn = _tiny(chdb_dir, "unpriced")
    unpriced = [{"event_id": f"u{i}", "ts": (t + timedelta(minutes=i)).isoformat().replace("+00:00", "Z"),
                 "feature": "f9", "team": "gamma", "model": "acme-llm-1", "input_tokens": 100, "output_tokens": 20,
                 "latency_ms": 100, "status": "ok"}
                for i, t in enumerate([DAY2 + timedelta(hours=8)] * 3
                                      + [TINY_WEEK.start - timedelta(days=2)] * 2)]  # fmt: skip
    try:
        _write_calls(conn, unpriced, "unpriced")
        report = build_weekly(conn, TINY_WEEK, _tiny_rules(tmp_path), now=AS_OF.timestamp())
    finally:
        conn.close()
    sp = report.data["spend"]
    (f9,) = [i for i in sp["feature"] if i["key"] == "f9"]
    (gamma,) = [i for i in sp["team"] if i["key"] == "gamma"]
    (acme,) = [i for i in sp["model"] if i["key"] == "acme-llm-1"]
    for item in (f9, gamma, acme):
        assert (item["calls"], item["unpriced_calls"], item["prev_calls"]) == (3, 3, 2)
        assert (item["cost_usd"], item["prev_cost_usd"], item["change_usd"], item["change"]) == (None, None, None,
                                                                                                  UNKNOWN)  # fmt: skip
    assert all(m["key"] not in ("f9", "gamma", "acme-llm-1") for m in sp["movers"])
    (f1,) = [i for i in sp["feature"] if i["key"] == "f1"]
    assert f1["cost_usd"] == 1.50 and f1["unpriced_calls"] == 0  # priced features as before
    assert sp["total"]["unpriced_calls"] == 3 and sp["total"]["cost_usd"] is not None
    teams = {t["team"]: t for t in report.data["budgets"]["teams"]}
    assert (teams["gamma"]["mtd_cost_usd"], teams["gamma"]["projected_month_usd"]) == (None, None)
    assert teams["gamma"]["mtd_unpriced_calls"] == 3
    assert (teams["alpha"]["mtd_cost_usd"], teams["alpha"]["mtd_unpriced_calls"]) == (5.50, 0)
    page = render_html(report)
    assert (
        "<tr><td>f9</td><td class=num>3</td><td>—</td><td>—</td><td>—</td><td>—</td><td class=num>3</td></tr>" in page
    )
    assert "- Spend $1.50 over 12 calls, 3 of them without a price (" in render_markdown(report)
    unbudgeted = copy.deepcopy(report)
    unbudgeted.data["budgets"]["budgets"] = []
    assert "(without gamma: spend unknown)" in render_markdown(unbudgeted)
    bars = page.split("<h3>Per feature</h3>")[1]
    assert "<title>f9, this week: —</title>" in bars and "<title>f9, previous week: —</title>" in bars


def test_raw_sections_count_a_call_written_twice_once(chdb_dir: Path, tmp_path: Path) -> None:
    """Error patterns, flagged outputs and the cache opportunity read raw rows: a call written again in
    another block (merges stopped, so the duplicate stays unmerged) counts once."""
    conn = _tiny(chdb_dir, "dupes")
    try:
        conn.client.command("SYSTEM STOP MERGES llm_calls")
        _write_calls(conn, [c for c in TINY_CALLS if c["event_id"] in ("e1", "w1", "w2")], "dupes-again")
        feedback = FeedbackPipeline().process(batch([orjson.dumps({
            "kind": "feedback", "request_id": "r-w1", "ts": (DAY2 + timedelta(hours=11)).isoformat(),
            "thumbs": "down", "user_id": user}) for user in ("u1", "u2")]), time.time())  # fmt: skip
        ClickHouseSink(conn).write_feedback([feedback], "dupes-feedback")
        raw = conn.client.query("SELECT count() FROM llm_calls").result_rows[0][0]
        assert raw == len(TINY_CALLS) + 3  # the duplicates are there, unmerged
        report = build_weekly(conn, TINY_WEEK, _tiny_rules(tmp_path), now=AS_OF.timestamp())
    finally:
        conn.close()
    patterns = {(p["error_type"], p["pattern"]): p["calls"] for p in report.data["errors"]["patterns"]}
    assert patterns[("server_error", "upstream <n> after <n> ms (request <id>)")] == 2
    (f1,) = [r for r in report.data["cache"]["features"] if r["feature"] == "f1"]
    assert (f1["repeats"], f1["repeat_cost_usd"]) == (1, 0.5)
    assert [(r["feature"], r["prompt_hash"], r["flags"], r["users"]) for r in report.data["flagged"]] == [
        ("f1", "pA", 2, 2)
    ]


def test_most_refusals_needs_enough_calls(built: WeeklyReport) -> None:
    """A model with a couple of calls, all refused, is not "most refusals": the busiest-enough one is."""
    report = copy.deepcopy(built)
    models = report.data["rates"]["model"]
    expected = next(m for m in models if m["calls"] >= report.data["rates"]["min_calls"] and m["refusals"])
    models.insert(0, {"key": "tiny-model", "calls": 2, "errors": 0, "timeouts": 0, "rate_limited": 0,
                      "refusals": 2, "error_rate": 0.0, "refusal_rate": 1.0})  # fmt: skip
    summary = render_markdown(report)
    assert "tiny-model" not in summary and f"most refusals: {expected['key']} " in summary


# ---- headless Chromium --------------------------------------------------------------------------


def _artifacts() -> Path:
    path = Path(os.environ.get("LLMPULSE_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


async def _render(url: str, screenshot: Path, profile: Path, timeout: float) -> dict[str, list[str]]:
    """Load ``url`` in headless Chromium over the DevTools protocol: console errors, uncaught exceptions,
    log errors, every network request, and a full-page PNG."""
    import aiohttp

    args = [shutil.which("chromium") or "chromium", "--headless=new", "--disable-gpu", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank"]  # fmt: skip
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    found: dict[str, list[str]] = {"errors": [], "requests": []}
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise TimeoutError("chromium did not open its DevTools port")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with http.ws_connect(ws_url, max_msg_size=0) as ws:
                ids = iter(range(1, 10_000))
                pending: dict[int, asyncio.Future[dict[str, Any]]] = {}

                async def reader() -> None:
                    async for msg in ws:
                        m = msg.json()
                        if "id" in m and m["id"] in pending:
                            pending.pop(m["id"]).set_result(m)
                        method, p = m.get("method"), m.get("params", {})
                        if method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                            found["errors"].append("console: " + " ".join(str(a.get("value")) for a in p["args"]))
                        elif method == "Runtime.exceptionThrown":
                            found["errors"].append("exception: " + p["exceptionDetails"].get("text", ""))
                        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                            found["errors"].append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
                        elif method == "Network.requestWillBeSent":
                            found["requests"].append(p["request"]["url"])

                async def send(method: str, **params: Any) -> dict[str, Any]:
                    i = next(ids)
                    pending[i] = asyncio.get_running_loop().create_future()
                    await ws.send_json({"id": i, "method": method, "params": params})
                    return (await asyncio.wait_for(pending[i], timeout))["result"]  # type: ignore[no-any-return]

                task = asyncio.create_task(reader())
                for domain in ("Runtime", "Log", "Network", "Page"):
                    await send(f"{domain}.enable")
                await send("Page.navigate", url=url)
                # the load event of the initial about:blank can arrive late: wait for this document instead
                while True:
                    state = await send("Runtime.evaluate", expression="document.readyState + ' ' + location.href")
                    if state["result"].get("value") == f"complete {url}":
                        break
                    if time.monotonic() > deadline + timeout:
                        raise TimeoutError(f"{url} did not load: {state}")
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)  # late console messages
                size = (await send("Page.getLayoutMetrics"))["cssContentSize"]
                shot = await send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                  clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                                        "scale": 1})  # fmt: skip
                import base64

                screenshot.write_bytes(base64.b64decode(shot["data"]))
                task.cancel()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return found


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium (deploy/test.sh installs Debian's package)")
def test_report_renders_in_headless_chromium_without_console_errors(built: WeeklyReport, tmp_path: Path) -> None:
    written = write(built, tmp_path / "page")
    shot = _artifacts() / f"weekly-report-{WEEK.label}.png"
    with tempfile.TemporaryDirectory(prefix="llmpulse-chromium-") as profile:
        found = asyncio.run(_render(written.html.resolve().as_uri(), shot, Path(profile), timeout=60))
    assert found["errors"] == []
    assert found["requests"] and all(u.startswith("file:") for u in found["requests"]), found["requests"]
    assert shot.stat().st_size > 50_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")
