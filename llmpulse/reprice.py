"""``llmpulse reprice``: recompute the cost of past calls after a price change.

Costs are computed in Python by the same ``CostAttribution`` the stream uses (model aliases,
cached and cache-write rates, long-context tiers), never re-derived in SQL. Per day:

1. read the day's calls not priced by their client and not already at the target version;
2. price them; keep those whose cost or version changes;
3. record old and new figures in ``cost_history`` (which price version produced which number);
4. apply them to ``llm_calls`` with one mutation joined on event_id (a Join table);
5. rebuild the day's minute rollups from raw, since a mutation does not pass through the view.

Client-sent costs (``cost_source = client``) are the client's truth and are left alone, and so
are calls whose usage is unknown (``usage_unknown``): no price makes their zero tokens a cost.
A day already repriced is skipped on a rerun, so an interrupted run is simply started again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from processors.pricing import COST_COMPUTED, COST_MISSING, CostAttribution, usage_unknown
from schemas.prices import PriceTable
from sinks.clickhouse import Connection
from sinks.rollups import rebuild

DAY = 86_400


@dataclass
class RepriceStats:
    price_version: str
    start: float
    end: float
    scanned: int = 0
    changed: int = 0
    newly_priced: int = 0
    still_unpriced: int = 0
    """Calls without a cost before that this table cannot price either."""
    kept: int = 0
    """Calls with a cost whose model this table lacks: left at their old cost and version (a
    partial table is no reason to forget a price)."""
    old_cost_usd: float = 0.0
    """What the calls that had a cost cost before."""
    new_cost_usd: float = 0.0
    """What the same calls cost now (the newly priced ones are in ``fresh_cost_usd``)."""
    fresh_cost_usd: float = 0.0
    """The cost of the calls priced for the first time."""
    by_model: dict[str, tuple[int, float, float, int, float]] = field(default_factory=dict)
    """model → (calls changed, old cost, new cost of those that had one, calls priced for the first
    time, their cost): a change in percent compares like with like."""
    days: int = 0
    seconds: float = 0.0


def _day_rows(conn: Connection, start: float, end: float, version: str) -> list[tuple[object, ...]]:
    return conn.client.query(
        "SELECT event_id, ts, feature, model, response_model, status, input_tokens, output_tokens, "
        "cached_input_tokens, cache_write_tokens, cache_write_1h_tokens, cost_usd, price_version FROM llm_calls FINAL "
        "WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)} "
        "AND cost_source IN ({computed:String}, {missing:String}) AND price_version != {v:String}",
        parameters={
            "s": datetime.fromtimestamp(start, UTC),
            "e": datetime.fromtimestamp(end, UTC),
            "computed": COST_COMPUTED,
            "missing": COST_MISSING,
            "v": version,
        },
    ).result_rows


def reprice(
    conn: Connection,
    table: PriceTable,
    start: float,
    end: float,
    *,
    dry_run: bool = False,
    on_day: Callable[[int], None] | None = None,
) -> RepriceStats:
    started = time.perf_counter()
    pricing = CostAttribution(table)
    version = table.price_version
    stats = RepriceStats(version, start, end)
    join = f"{conn.database}.reprice_{uuid.uuid4().hex[:12]}"
    day = start
    while day < end:
        until = min(end, (day // DAY + 1) * DAY)
        rows = _day_rows(conn, day, until, version)
        stats.scanned += len(rows)
        changes = []
        for event_id, ts, feature, model, served, status, tin, tout, cached, write, write_1h, old, old_version in rows:
            rates = pricing.rates_for(str(model), str(served) or None)
            if rates is None or usage_unknown(str(status), int(tin), int(tout)):  # type: ignore[call-overload]
                if old is None:
                    stats.still_unpriced += 1
                else:
                    stats.kept += 1
                continue
            new = rates.cost(int(tin), int(tout), int(cached), int(write), int(write_1h))  # type: ignore[call-overload]
            changes.append((event_id, ts, feature, model, old_version, version, old, new))
            stats.changed += 1
            n, o, c, fresh, fresh_c = stats.by_model.get(str(model), (0, 0.0, 0.0, 0, 0.0))
            if old is None:
                stats.newly_priced += 1
                stats.fresh_cost_usd += new
                stats.by_model[str(model)] = (n + 1, o, c, fresh + 1, fresh_c + new)
            else:
                stats.old_cost_usd += old  # type: ignore[operator]
                stats.new_cost_usd += new
                stats.by_model[str(model)] = (n + 1, o + old, c + new, fresh, fresh_c)  # type: ignore[operator]
        if changes and not dry_run:
            _apply(conn, join, changes, day, until)
        stats.days += 1
        if on_day:
            on_day(1)
        day = until
    stats.seconds = time.perf_counter() - started
    return stats


def _apply(conn: Connection, join: str, changes: list[tuple[object, ...]], start: float, end: float) -> None:
    client = conn.client
    client.insert(
        f"{conn.database}.cost_history",
        [list(c) for c in changes],
        column_names=[
            "event_id",
            "ts",
            "feature",
            "model",
            "old_price_version",
            "new_price_version",
            "old_cost_usd",
            "new_cost_usd",
        ],
        settings={"insert_deduplicate": 0},
    )
    client.command(f"CREATE TABLE {join} (event_id String, cost Float64) ENGINE = Join(ANY, LEFT, event_id)")
    try:
        client.insert(join, [[c[0], c[7]] for c in changes], column_names=["event_id", "cost"])
        version = str(changes[0][5])
        client.command(
            f"ALTER TABLE {conn.database}.llm_calls UPDATE cost_usd = joinGet('{join}', 'cost', event_id), "
            "price_version = {v:String}, cost_source = {computed:String}, price_missing = false "
            "WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)} AND cost_source IN ({computed:String}, "
            f"{{missing:String}}) AND event_id IN (SELECT event_id FROM {join})",
            parameters={
                "v": version,
                "computed": COST_COMPUTED,
                "missing": COST_MISSING,
                "s": datetime.fromtimestamp(start, UTC),
                "e": datetime.fromtimestamp(end, UTC),
            },
            settings={"mutations_sync": 2},
        )
    finally:
        client.command(f"DROP TABLE IF EXISTS {join}")
    rebuild(conn, "llm_calls_1m", start, end)
