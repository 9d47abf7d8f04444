"""``llmpulse report weekly`` on demo data: every section present, every number equal to a direct
query on the raw tables (counts exactly, costs to the cent, percentiles within the stated
tolerance of ``quantileExact``), the CLI's files, and the page rendered by headless Chromium
without console errors (a screenshot kept as a test artifact)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

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
from schemas.config import Settings, load_settings
from schemas.rules import load_rules
from sinks import queries

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
                   countIf(ts < {{s:DateTime64(3)}}) AS prev_calls,
                   sumIf(ifNull(cost_usd, 0), ts < {{s:DateTime64(3)}}) AS prev_cost
            FROM llm_calls FINAL WHERE ts >= {{p:DateTime64(3)}} AND ts < {{e:DateTime64(3)}}
            GROUP BY k""")}  # fmt: skip
        got = {i["key"]: i for i in sp[dim]}
        assert set(got) == {k for k, r in raw.items() if r["calls"]} | {k for k, r in raw.items() if r["prev_calls"]}
        for k, r in raw.items():
            assert (got[k]["calls"], got[k]["prev_calls"]) == (r["calls"], r["prev_calls"]), (dim, k)
            assert cents(got[k]["cost_usd"]) == cents(r["cost"]) and got[k]["cost_usd"] == pytest.approx(r["cost"])
            assert cents(got[k]["prev_cost_usd"]) == cents(r["prev_cost"])
    total = rows(conn, "SELECT count() AS n, sum(ifNull(cost_usd, 0)) AS cost, countIf(price_missing) AS unpriced "
                       "FROM llm_calls FINAL WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)}")[0]  # fmt: skip
    assert sp["total"]["calls"] == total["n"] > 15_000
    assert cents(sp["total"]["cost_usd"]) == cents(total["cost"])
    assert sp["total"]["unpriced_calls"] == total["unpriced"] > 0
    assert sp["total"]["prev_calls"] > 0  # three days of the week before: week-over-week has something to say
    movers = sp["movers"]
    assert movers and abs(movers[0]["change_usd"]) == max(abs(i["change_usd"]) for d in ("feature", "team", "model")
                                                          for i in sp[d])  # fmt: skip
    daily = rows(conn, "SELECT toString(toDate(ts)) AS day, feature, count() AS calls FROM llm_calls FINAL "
                       "WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)} GROUP BY day, feature")  # fmt: skip
    assert {(r["day"], r["feature"]): r["calls"] for r in daily} == {(r["day"], r["feature"]): r["calls"]
                                                                     for r in sp["daily"]}  # fmt: skip


def _within(value: float, exact: dict[str, float], p: str) -> bool:
    """The README's tolerance: 5% of quantileExact, or within one percentile rank of it."""
    if abs(value - exact[p]) <= PERCENTILE_TOLERANCE * abs(exact[p]):
        return True
    return exact[f"{p}_lo"] <= value <= exact[f"{p}_hi"]


def test_latency_percentiles_within_the_stated_tolerance(built: WeeklyReport, conn: Any) -> None:
    r = PERCENTILE_RANK_TOLERANCE
    exprs = ", ".join(
        f"quantileExact({q})(v) AS {p}, quantileExact({q - r})(v) AS {p}_lo, "
        f"quantileExact({min(q + r, 1)})(v) AS {p}_hi"
        for p, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
    )
    checked = 0
    worst = 0.0
    for column, prefix in (("latency_ms", "latency"), ("ttft_ms", "ttft")):
        exact = {x["feature"]: x for x in rows(conn, f"""
            SELECT feature, count() AS n, {exprs} FROM (SELECT feature, {column} AS v FROM llm_calls FINAL
            WHERE ts >= {{s:DateTime64(3)}} AND ts < {{e:DateTime64(3)}} AND {column} IS NOT NULL)
            GROUP BY feature""")}  # fmt: skip
        for got in built.data["latency"]["week"]:
            x = exact.get(got["feature"])
            if x is None:
                assert got[f"{prefix}_p95_ms"] is None  # no streaming calls: no TTFT
                continue
            assert (got["calls"] if prefix == "latency" else got["ttft_calls"]) == x["n"]
            for p in ("p50", "p95", "p99"):
                value = got[f"{prefix}_{p}_ms"]
                assert _within(value, x, p), (got["feature"], prefix, p, value, x[p])
                worst = max(worst, abs(value - x[p]) / x[p])
                checked += 1
    assert checked >= 30
    # daily and hourly buckets partition the week's calls
    for grain in ("daily", "hourly"):
        per = defaultdict(int)
        for b in built.data["latency"][grain]:
            per[b["feature"]] += b["calls"]
        assert per == {g["feature"]: g["calls"] for g in built.data["latency"]["week"]}
    print(f"worst relative percentile error over {checked} checks: {worst:.2%}")


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
    # the demo's incidents: the prompt change doubles search-summarize output, gpt-4o-mini switches snapshot
    assert any(d["feature"] == "search-summarize" and d["drifted"] for d in ql["drift"])
    assert [s["model"] for s in ql["switches"]] == ["gpt-4o-mini"]


def test_alerts_and_durations_match_the_alerts_table(built: WeeklyReport, conn: Any) -> None:
    al = built.data["alerts"]
    raw = rows(conn, """
        SELECT dedup_key, started_at, any(rule) AS rule, any(metric) AS metric,
               maxIf(ended_at, state = 'resolved') AS resolved
        FROM alerts FINAL WHERE started_at >= {s:DateTime64(3)} AND started_at < {e:DateTime64(3)}
        GROUP BY dedup_key, started_at""")  # fmt: skip
    assert len(al["incidents"]) == len(raw) > 0
    end = WEEK.end.timestamp()
    expected = sorted(
        (x["rule"], 0 if x["metric"] == "budget_spend_usd" else  # budget notices are one-off
         int((x["resolved"] or WEEK.end.replace(tzinfo=None)).replace(tzinfo=UTC).timestamp()
              - x["started_at"].replace(tzinfo=UTC).timestamp()))
        for x in raw
    )  # fmt: skip
    assert sorted((i["rule"], i["duration_s"]) for i in al["incidents"]) == expected
    assert all(0 <= i["duration_s"] <= end - i["started_at"] for i in al["incidents"])
    by_rule = {r["rule"]: r["incidents"] for r in al["rules"]}
    assert sum(by_rule.values()) == len(raw)
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
    teams = {t["team"]: t for t in built.data["budgets"]["teams"]}
    assert cents(teams["devex"]["mtd_cost_usd"]) == cents(spent)
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
