"""``llmpulse demo``: a week of synthetic traffic through the embedded pipeline into chDB.

Traffic is generated in a child process (it stands for the services that publish, and uses
the second core), the pipeline and the inserts run here, and the summary is read back from
ClickHouse, so what it prints is what landed.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import queue as queue_mod
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ingest.synthetic import SWITCHED_SNAPSHOT, Scenario, produce_into, simulated_judge
from llmpulse.alerting import AlertPipeline
from llmpulse.gate import Policy, evaluate, measure
from llmpulse.runtime import EmbeddedRuntime, open_clickhouse
from processors.records import PayloadBatch, Source
from schemas.config import Settings
from sinks import queries
from sinks.clickhouse import Connection, connect

DEMO_SOURCE = "demo"


class DemoRefused(RuntimeError):
    pass


@dataclass
class DemoResult:
    summary: dict[str, Any]
    scenario: Scenario


def _prepare_database(settings: Settings) -> None:
    """Replace a previous demo's data; refuse to touch anything else."""
    conn = connect(settings.clickhouse, settings.data_dir, purpose="llmpulse demo")
    try:
        db = settings.clickhouse.database
        exists = conn.client.command(
            f"SELECT count() FROM system.tables WHERE database = '{db}' AND name = 'llm_calls'"
        )
        if int(exists):  # type: ignore[arg-type]
            foreign = conn.client.command(f"SELECT count() FROM {db}.llm_calls WHERE source != '{DEMO_SOURCE}'")
            if int(foreign):  # type: ignore[arg-type]
                raise DemoRefused(
                    f"{conn.description} database `{db}` holds {foreign} calls that are not demo data; "
                    "the demo replaces its database, so give it another one: --data-dir DIR "
                    "(embedded) or LLMPULSE_CLICKHOUSE__DATABASE=llmpulse_demo"
                )
            conn.client.command(f"DROP DATABASE IF EXISTS {db} SYNC")
    finally:
        conn.close()


def run_demo(
    settings: Settings,
    scenario: Scenario,
    on_progress: Callable[[int], None] | None = None,
) -> DemoResult:
    _prepare_database(settings)
    conn = open_clickhouse(settings, purpose="llmpulse demo")
    try:
        return _run(settings, conn, scenario, on_progress)
    finally:
        conn.close()


def _run(
    settings: Settings,
    conn: Connection,
    scenario: Scenario,
    on_progress: Callable[[int], None] | None,
) -> DemoResult:
    alerts = AlertPipeline(settings, conn, channels=[]) if settings.alerting.enabled else None
    runtime = EmbeddedRuntime(settings, conn, alerts=alerts, judge=simulated_judge)
    run_id = uuid.uuid4().hex[:12]
    source = Source(DEMO_SOURCE, f"run-{run_id}")
    ctx = multiprocessing.get_context("spawn")  # never fork a process that holds chDB
    channel: Any = ctx.Queue(maxsize=8)
    producer = ctx.Process(target=produce_into, args=(channel, scenario), daemon=True)
    wall_started = time.perf_counter()
    producer.start()
    offset = 0
    try:
        while True:
            try:
                payloads = channel.get(timeout=120)
            except queue_mod.Empty:
                raise RuntimeError("the traffic generator stopped producing (see its error above)") from None
            if payloads is None:
                break
            offsets = list(range(offset, offset + len(payloads)))
            offset += len(payloads)
            # replay-time pipeline: "now" is the scenario's end, so the week is in range
            runtime.ingest(PayloadBatch(source, payloads, offsets, digest=run_id), now=scenario.end)
            runtime.tick()
            if on_progress:
                on_progress(len(payloads))
        runtime.finish()
    finally:
        runtime.close()
        if alerts is not None:
            alerts.close()
        producer.join(timeout=10)
        if producer.is_alive():
            producer.terminate()
    wall = time.perf_counter() - wall_started
    summary = summarize(conn, scenario.start, scenario.end + 3600)
    c = runtime.stats.counters
    summary.update(
        received=c.received,
        rejected=c.rejected,
        duplicates=c.duplicates,
        late=c.late,
        unknown_fields=c.unknown_fields,
        events_per_second=round(c.received / runtime.stats.process_s, 1) if runtime.stats.process_s else None,
        pipeline_seconds=round(runtime.stats.process_s, 3),
        wall_seconds=round(wall, 3),
        inserts=runtime.sink.stats.inserts,
        window_partials=runtime.stats.partials,
        feedback=runtime.stats.feedback.accepted,
        judged=runtime.stats.verdicts.accepted,
        flagged_for_judge=runtime.stats.flagged_for_judge,
        alerts=[
            {"rule": e.rule, "state": e.state, "severity": e.severity, "action": e.action,
             "scope": e.scope, "value": e.value, "at": e.window_end.isoformat(timespec="minutes")}
            for e in (alerts.delivered if alerts else [])
        ],
        data=conn.description,
        period={"start": _iso(scenario.start), "end": _iso(scenario.end)},
        incidents={
            "prompt_change": {"feature": "search-summarize", "from": "v7", "to": "v8",
                              "at": _iso(scenario.prompt_change_at)},
            "refusal_regression": {"model": "claude-haiku-4-5", "at": _iso(scenario.refusal_regression_at)},
            "snapshot_switch": {"model": "gpt-4o-mini", "to": SWITCHED_SNAPSHOT,
                                "at": _iso(scenario.snapshot_switch_at)},
            "canary": {"feature": "support-chat", "prompt_version": "v13", "variant": "canary"},
        },
    )  # fmt: skip
    return DemoResult(summary, scenario)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def summarize(conn: Connection, start: float, end: float) -> dict[str, Any]:
    """The demo's summary, read back from ClickHouse (rollups for the numbers, DLQ for rejects)."""
    client = conn.client
    period = {"start": datetime.fromtimestamp(start, UTC), "end": datetime.fromtimestamp(end, UTC)}
    totals = queries.run(client, "summary_totals", **period)[0]
    by_feature = queries.run(client, "cost_by_feature", **period)
    by_team = queries.run(client, "cost_by_team", **period)
    latency = queries.run(client, "latency_by_feature", **period)
    refusals = queries.run(client, "refusal_by_model", **period)
    return {
        "events": int(totals["calls"] or 0),
        "dlq": int(totals["dlq"] or 0),
        "price_missing": int(totals["price_missing"] or 0),
        "cost_usd": None
        if totals["calls"] and totals["price_missing"] == totals["calls"]
        else _usd(totals["cost_usd"] or 0.0),
        "cost_by_feature": {r["feature"]: _usd(r["cost_usd"]) for r in by_feature},
        "cost_by_team": {r["team"]: _usd(r["cost_usd"]) for r in by_team},
        "unpriced_by_feature": {r["feature"]: int(r["unpriced_calls"]) for r in by_feature if r["unpriced_calls"]},
        "unpriced_by_team": {r["team"]: int(r["unpriced_calls"]) for r in by_team if r["unpriced_calls"]},
        "latency_ms_by_feature": {
            r["feature"]: {"p50": r["p50_ms"], "p95": r["p95_ms"], "p99": r["p99_ms"]} for r in latency
        },
        "ttft_p95_ms_by_feature": {r["feature"]: r["ttft_p95_ms"] for r in latency},
        "refusal_rate_by_model": {r["model"]: round(float(r["refusal_rate"]), 4) for r in refusals},
        "error_rate_by_model": {r["model"]: round(float(r["error_rate"]), 4) for r in refusals},
        "judge_samples": int(totals["judge_samples"] or 0),
        "canary": canary_report(conn, start, end),
    }


def _usd(cost: Any) -> float | None:
    """To the micro-dollar, as the queries round: at cents a feature spending $0.004 read as free.
    None where no call had a price: the spend is unknown, and a 0.0 would read as free too."""
    return None if cost is None else round(float(cost), 6)


CANARY = {"feature": "support-chat", "variant": "canary"}
CONTROL = {"feature": "support-chat", "variant": "control"}
CANARY_POLICY = Policy(max_token_increase=0.15, max_refusal_increase=0.02, min_quality_delta=0.0)
"""What the demo's gate demands of the support-chat canary: no more than 15% more tokens per
call, at most 2 points more refusals, and a judge score no worse than control's."""


def canary_report(conn: Connection, start: float, end: float) -> dict[str, Any]:
    """The support-chat canary against its control: per-release figures and the gate's verdict."""
    period = {"start": datetime.fromtimestamp(start, UTC), "end": datetime.fromtimestamp(end, UTC)}
    releases = [r for r in queries.run(conn.client, "release_metrics", **period) if r["feature"] == "support-chat"]
    gate = evaluate(measure(conn, CONTROL, start, end, "control"), measure(conn, CANARY, start, end, "canary"),
                    CANARY_POLICY)  # fmt: skip
    return {
        "releases": releases,
        "gate": {"passed": gate.passed, "checks": [dataclasses.asdict(c) for c in gate.checks]},
    }
