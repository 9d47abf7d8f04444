"""P4: ``llmpulse report weekly`` over 1M and 10M calls on the embedded engine.

The calls are generated inside ClickHouse (``INSERT … SELECT … FROM numbers()`` straight into
``llm_calls``; the materialized views fill the rollups as they would from the pipeline), so
making 10M rows takes seconds, not the pipeline's minutes. They span two ISO weeks: the report
week and the one before it (week-over-week and drift read both). Feedback (0.3%), judge scores
(1%) and some alert incidents are derived from them.

The figure is the CLI end to end (a fresh process: start-up, opening chDB, every query, writing
the files), best of three. The baseline, in the same run, is the same report with every rollup
read replaced by a plain view that recomputes it from the raw rows: what the report would cost
without the rollups.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from bench.common import Figure
from llmpulse.report import Week, build_weekly, write
from llmpulse.runtime import open_clickhouse
from schemas.config import Settings, load_settings
from schemas.rules import default_rules

CHUNK = 2_000_000
FEATURES = "['support-chat', 'search-summarize', 'code-review', 'agent-planner', 'email-draft', 'doc-extract']"
TEAMS = "['customer-experience', 'search', 'devex', 'devex', 'growth', 'platform']"
MODELS = "['gpt-4o', 'gpt-4o-mini', 'claude-haiku-4-5', 'claude-sonnet-4-5', 'gemini-2.5-flash']"
PROVIDERS = "['openai', 'openai', 'anthropic', 'anthropic', 'google']"

CALLS_SQL = f"""
INSERT INTO {{db}}.llm_calls (event_id, ts, source, service, feature, team, tenant, user_id, provider, model,
    response_model, prompt_version, variant, release_id, request_id, conversation_id, input_tokens, output_tokens,
    cached_input_tokens, latency_ms, ttft_ms, cost_usd, cost_source, price_version, price_missing, status, refusal,
    finish_reason, error_type, error_message, prompt_hash, output_chars)
WITH cityHash64(number) AS h, h % 6 AS fi, bitShiftRight(h, 8) % 5 AS mi,
     fromUnixTimestamp64Milli(toInt64({{t0_ms}} + intDiv(number * {{span_ms}}, {{n}})), 'UTC') AS t,
     {FEATURES}[fi + 1] AS feat, {MODELS}[mi + 1] AS mdl, if(t >= {{mid_ms}} / 1000, 'v2', 'v1') AS pv,
     toUInt32(200 + bitShiftRight(h, 16) % 3000) AS tin,
     toUInt32(if(pv = 'v2' AND fi = 1, 2, 1) * (20 + bitShiftRight(h, 28) % 800)) AS tout,
     (300 + tout * 8) * (0.5 - 0.3 * log(((bitShiftRight(h, 40) % 100000) + 1) / 100001.)) AS lat,
     h % 1000 AS roll, multiIf(roll < 8, 'error', roll < 11, 'timeout', roll < 13, 'rate_limited', 'ok') AS st,
     multiIf(st = 'error', 'server_error', st = 'timeout', 'timeout', st = 'rate_limited', 'rate_limit_exceeded', '')
         AS et
SELECT concat('b', toString(number)), t, 'bench', concat(feat, '-svc'), feat, {TEAMS}[fi + 1], '',
       concat('u', toString(h % 50000)), {PROVIDERS}[mi + 1], mdl, mdl, pv, 'control',
       substring(lower(hex(cityHash64(feat, pv, mdl))), 1, 12), concat('r', toString(number)),
       concat('c', toString(intDiv(number, 4))), tin, tout, toUInt32(0), lat,
       if(fi IN (0, 3, 4), lat * 0.12, NULL), (tin * 2.5 + tout * 10) / 1e6, 'computed', 'bench', false, st,
       bitShiftRight(h, 20) % 100 < 2, if(st = 'ok', 'stop', ''), et,
       if(st = 'ok', '', concat({PROVIDERS}[mi + 1], ' returned ', et, ' for request ', toString(number), ' after ',
                                toString(round(lat)), ' ms')),
       if(h % 20 = 0, concat('hot-', feat, '-', toString(intDiv(number, 2000))),
          concat('p', toString(bitShiftRight(h, 12) % 5000000))),
       tout * 4
FROM numbers({{offset}}, {{count}})
"""

FEEDBACK_SQL = """
INSERT INTO {db}.feedback (feedback_id, request_id, ts, thumbs, rating, comment, user_id, feature, event_id, call_ts,
    team, model, prompt_version, variant, release_id)
SELECT concat('f', event_id), request_id, ts + INTERVAL 30 SECOND, if(cityHash64(event_id) % 3 = 0, 'up', 'down'),
       CAST(NULL AS Nullable(UInt8)), if(cityHash64(event_id) % 7 = 0, 'wrong answer', ''), user_id, feature,
       event_id, ts, team, model, prompt_version, variant, release_id
FROM {db}.llm_calls WHERE cityHash64(event_id) % 1000 < 3
"""

JUDGE_SQL = """
INSERT INTO {db}.judge_scores (request_id, event_id, rubric, score, judge_model, ts, call_ts, feature, team, model,
    provider, prompt_version, variant, release_id, sample_reason, rationale)
SELECT request_id, event_id, 'helpfulness', (cityHash64(event_id, 1) % 1000) / 1000., 'judge', ts + INTERVAL 1 MINUTE,
       ts, feature, team, model, provider, prompt_version, variant, release_id, 'rate', ''
FROM {db}.llm_calls WHERE cityHash64(event_id) % 1000 >= 990
"""


def _settings(data_dir: Path, database: str) -> Settings:
    return load_settings(None, {"data_dir": data_dir, "clickhouse": {"database": database}})


def generate(settings: Settings, week: Week, n: int) -> float:
    """``n`` calls over the report week and the one before it; returns seconds taken."""
    started = time.perf_counter()
    conn = open_clickhouse(settings, purpose="bench p4 generate")
    db = settings.clickhouse.database
    try:
        t0 = week.previous.start.timestamp()
        span = (week.end - week.previous.start).total_seconds()
        params = {"db": db, "t0_ms": int(t0 * 1000), "span_ms": int(span * 1000), "n": n,
                  "mid_ms": int((week.start.timestamp() + 3.5 * 86400) * 1000)}  # fmt: skip
        for offset in range(0, n, CHUNK):
            sql = CALLS_SQL.format(**params, offset=offset, count=min(CHUNK, n - offset))
            conn.client.command(sql, settings={"insert_deduplicate": 0, "max_insert_block_size": CHUNK})
        conn.client.command(FEEDBACK_SQL.format(db=db))
        conn.client.command(JUDGE_SQL.format(db=db))
        conn.client.command(_alerts_sql(db, int(week.start.timestamp())))
        conn.client.command(f"OPTIMIZE TABLE {db}.llm_calls_1m FINAL")  # merged parts, as a settled table is
    finally:
        conn.close()
    return time.perf_counter() - started


def _alerts_sql(db: str, start: int) -> str:
    return f"""
INSERT INTO {db}.alerts (dedup_key, rule, state, severity, action, metric, value, condition, scope, labels,
    window_start, window_end, started_at, ended_at, summary, runbook_url, query, extra)
SELECT concat('k', toString(number % 6)), 'latency-p95-spike', s, 'warning', 'rollback', 'latency_p95_ms', 9000.,
       '> 2x', map('feature', {FEATURES}[number % 6 + 1]), map(), at, at + INTERVAL 15 MINUTE, at,
       if(s = 'resolved', at + toIntervalMinute(15 + number % 90), NULL), 'latency spike', '', '', '{{}}'
FROM (SELECT number, toDateTime64({start}, 3, 'UTC') + toIntervalMinute(number * 160) AS at FROM numbers(60))
ARRAY JOIN ['firing', 'resolved'] AS s
"""


class _RawRollups:
    """A client whose queries read views recomputing the rollups from raw rows instead of the rollups."""

    TABLES: ClassVar[dict[str, str]] = {
        "llm_calls_1m": "llm_calls_1m_raw",
        "eval_1h": "eval_1h_raw",
        "feedback_1h": "feedback_1h_raw",
    }

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pattern = re.compile(r"\b(" + "|".join(self.TABLES) + r")\b")

    def query(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        return self.client.query(self.pattern.sub(lambda m: self.TABLES[m.group(1)], sql), *args, **kwargs)


def raw_report(settings: Settings, week: Week, out: Path) -> float:
    """The report with every rollup read answered from the raw rows (plain views over the views' SELECTs),
    written like the CLI writes it; returns the seconds the queries took."""
    conn = open_clickhouse(settings, purpose="bench p4 raw")
    db = settings.clickhouse.database
    try:
        for raw, view in (("llm_calls_1m_raw", "llm_calls_1m_mv"), ("eval_1h_raw", "eval_1h_mv"),
                          ("feedback_1h_raw", "feedback_1h_mv")):  # fmt: skip
            select = conn.client.query(
                "SELECT as_select FROM system.tables WHERE database = {db:String} AND name = {v:String}",
                parameters={"db": db, "v": view},
            ).result_rows[0][0]
            conn.client.command(f"CREATE VIEW IF NOT EXISTS {db}.{raw} AS {select}")
        rewired = replace(conn, client=_RawRollups(conn.client))  # type: ignore[arg-type]
        started = time.perf_counter()
        built = build_weekly(rewired, week, default_rules(), now=week.end.timestamp())
        seconds = time.perf_counter() - started
        write(built, out)
        return seconds
    finally:
        conn.close()


def raw_cli_seconds(settings: Settings, week: Week, out: Path) -> float:
    """The raw-rows variant in a fresh process too, so both sides pay the same start-up."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bench.p4_report", "--raw", str(settings.data_dir), settings.clickhouse.database,
         week.label, str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - started


def cli_seconds(settings: Settings, week: Week, out: Path, runs: int = 3) -> tuple[float, list[float]]:
    """``llmpulse report weekly`` in a fresh process, best of ``runs``."""
    env = {**os.environ, "LLMPULSE_CLICKHOUSE__DATABASE": settings.clickhouse.database}
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "llmpulse.cli", "report", "weekly", "--week", week.label,
             "--data-dir", str(settings.data_dir), "--out", str(out)],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        times.append(time.perf_counter() - started)
    return min(times), times


def in_process_seconds(settings: Settings, week: Week) -> tuple[float, dict[str, float]]:
    conn = open_clickhouse(settings, purpose="bench p4 in-process")
    try:
        started = time.perf_counter()
        built = build_weekly(conn, week, default_rules(), now=week.end.timestamp())
        return time.perf_counter() - started, built.timings
    finally:
        conn.close()


def run(tmp: Path, sizes: tuple[int, ...] = (1_000_000, 10_000_000)) -> list[Figure]:
    """One figure per size: the CLI end to end against the same report computed from raw rows."""
    now = datetime.now(UTC)
    week = Week.containing((now - timedelta(days=7)).timestamp())  # the last complete week
    data_dir = tmp / "p4"
    figures = []
    for n in sizes:
        settings = _settings(data_dir, f"p4_{n}")
        gen_s = generate(settings, week, n)
        cli_s, cli_runs = cli_seconds(settings, week, tmp / f"p4-out-{n}")
        inproc_s, timings = in_process_seconds(settings, week)
        raw_s = raw_cli_seconds(settings, week, tmp / f"p4-raw-{n}")
        slowest = sorted(((v, k) for k, v in timings.items() if k != "total"), reverse=True)[:3]
        figures.append(
            Figure(
                name=f"P4 report weekly, {n / 1e6:g}M calls (2 weeks)",
                value=cli_s,
                unit="s",
                baseline="same report from raw rows (fresh process too)",
                baseline_value=raw_s,
                notes=f"CLI end to end, best of {', '.join(f'{t:.2f}' for t in cli_runs)} s; "
                f"queries in-process {inproc_s:.2f} s; "
                f"slowest: {', '.join(f'{k} {v:.2f} s' for v, k in slowest)}; data generated in {gen_s:.0f} s",
                extra={
                    "cli_runs_s": cli_runs,
                    "in_process_s": inproc_s,
                    "timings": timings,
                    "generate_s": gen_s,
                    "week": week.label,
                },
            )
        )
    return figures


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:2] == ["--raw"]:  # the baseline's own process (see raw_cli_seconds)
        data_dir, database, label, out = sys.argv[2:6]
        raw_report(_settings(Path(data_dir), database), Week.parse(label), Path(out))
        raise SystemExit(0)
    sizes = tuple(int(float(x) * 1_000_000) for x in (sys.argv[1:] or ["1", "10"]))
    with tempfile.TemporaryDirectory(prefix="llmpulse-p4-") as d:
        for f in run(Path(d), sizes):
            print(f"{f.name}: {f.value:.2f} s (raw rows: {f.baseline_value:.2f} s, ratio {f.ratio:.3f}) — {f.notes}")
