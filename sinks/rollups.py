"""Rollups recomputed from raw rows: for re-pricing, reconciliation and repair.

The recomputation is the materialized view's own SELECT, read back from the server
(``system.tables.as_select``) with its source swapped for a deduplicated, time-bounded read of
the raw table. So there is one definition of every rollup — the migration's — and a rebuilt
minute is exactly what the view would have produced from the rows as they are now.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from sinks.clickhouse import Connection


@dataclass(frozen=True)
class Rollup:
    table: str
    view: str
    source: str
    bucket: str
    """The rollup's time column (minute or hour)."""
    seconds: int
    keys: tuple[str, ...]
    """Dimension columns, to compare a stored rollup with its recomputation cell by cell."""
    sums: tuple[str, ...]


ROLLUPS = {
    r.table: r
    for r in (
        Rollup("llm_calls_1m", "llm_calls_1m_mv", "llm_calls", "minute", 60,
               ("minute", "tenant", "service", "feature", "team", "provider", "model", "prompt_version", "variant",
                "release_id"),
               ("calls", "errors", "timeouts", "rate_limited", "refusals", "price_missing", "input_tokens",
                "output_tokens", "cached_input_tokens", "cache_write_tokens", "output_chars", "schema_checked",
                "schema_valid", "tool_call_calls", "ttft_calls", "cost_usd", "latency_ms_sum", "ttft_ms_sum")),
        Rollup("served_models_1m", "served_models_1m_mv", "llm_calls", "minute", 60,
               ("minute", "feature", "model", "response_model"), ("calls",)),
        Rollup("eval_1h", "eval_1h_mv", "judge_scores", "hour", 3600,
               ("hour", "feature", "release_id", "prompt_version", "variant", "model", "rubric"),
               ("n", "score_sum", "score_sumsq")),
        Rollup("feedback_1h", "feedback_1h_mv", "feedback", "hour", 3600,
               ("hour", "feature", "release_id", "prompt_version", "variant", "model"),
               ("n", "thumbs_up", "thumbs_down", "rated", "rating_sum")),
    )
}  # fmt: skip
FLOAT_SUMS = frozenset({"cost_usd", "latency_ms_sum", "ttft_ms_sum", "score_sum", "score_sumsq", "rating_sum"})
"""Sums of floats: compared with a relative tolerance (summation order differs between paths)."""


class RollupError(RuntimeError):
    pass


def align(rollup: Rollup, start: float, end: float) -> tuple[int, int]:
    """Whole buckets covering [start, end): a rollup row is rebuilt entirely or not at all."""
    s = int(start // rollup.seconds * rollup.seconds)
    e = int(-(-end // rollup.seconds) * rollup.seconds)
    return s, e


def _range(start: int, end: int, features: Collection[str] | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"start": datetime.fromtimestamp(start, UTC), "end": datetime.fromtimestamp(end, UTC)}
    if features is not None:
        params["features"] = sorted(features)
    return params


def _only(features: Collection[str] | None) -> str:
    """The filter narrowing a check or a rebuild to some features (every rollup has the column)."""
    return "" if features is None else " AND feature IN {features:Array(String)}"


def recompute_sql(conn: Connection, rollup: Rollup, features: Collection[str] | None = None) -> str:
    """The view's SELECT over ``{start:DateTime}``..``{end:DateTime}`` of the raw table, FINAL.

    With ``features``, only those features' rows are read (``{features:Array(String)}``).
    """
    rows = conn.client.query(
        "SELECT as_select FROM system.tables WHERE database = {db:String} AND name = {v:String}",
        parameters={"db": conn.database, "v": rollup.view},
    ).result_rows
    if not rows:
        raise RollupError(f"materialized view {conn.database}.{rollup.view} not found: run `llmpulse migrate`")
    select = str(rows[0][0])
    source = re.compile(rf"FROM\s+`?{re.escape(conn.database)}`?\.`?{rollup.source}`?\s+AS\s+(\w+)", re.IGNORECASE)
    found = source.search(select)
    if found is None:
        raise RollupError(f"cannot find the source table {rollup.source} in the definition of {rollup.view}")
    bounded = (
        f"FROM (SELECT * FROM {conn.database}.{rollup.source} FINAL "
        "WHERE ts >= {start:DateTime} AND ts < {end:DateTime}" + _only(features) + ") AS " + found.group(1)
    )
    return select[: found.start()] + bounded + select[found.end() :]


def rebuild(
    conn: Connection, table: str, start: float, end: float, features: Collection[str] | None = None
) -> tuple[int, int]:
    """Replace the rollup's rows in [start, end) (whole buckets) with their recomputation.

    Returns the aligned range. Not atomic: a reader may see the range empty for the moment
    between the delete and the insert, and rows a live pipeline adds to these buckets in that
    moment would be lost — repair closed periods, not the current minute, or (``features``) only
    cells no one else is writing.
    """
    rollup = ROLLUPS[table]
    s, e = align(rollup, start, end)
    params = _range(s, e, features)
    conn.client.command(
        f"ALTER TABLE {conn.database}.{table} DELETE WHERE {rollup.bucket} >= {{start:DateTime}} "
        f"AND {rollup.bucket} < {{end:DateTime}}{_only(features)}",
        parameters=params,
        settings={"mutations_sync": 2},
    )
    # insert_deduplicate off: a rebuild of unchanged rows must not be dropped as a repeat of the last one
    conn.client.command(
        f"INSERT INTO {conn.database}.{table} {recompute_sql(conn, rollup, features)}",
        parameters=params,
        settings={"insert_deduplicate": 0},
    )
    return s, e


@dataclass
class Difference:
    table: str
    key: dict[str, Any]
    column: str
    stored: float | None
    recomputed: float | None


def compare(
    conn: Connection,
    table: str,
    start: float,
    end: float,
    limit: int = 1000,
    features: Collection[str] | None = None,
) -> list[Difference]:
    """Cells whose stored sums differ from the recomputation (counts exactly, floats to 1e-9 relative)."""
    rollup = ROLLUPS[table]
    s, e = align(rollup, start, end)
    keys = ", ".join(rollup.keys)
    sums = ", ".join(f"sum({c}) AS {c}" for c in rollup.sums)
    differs = " OR ".join(
        f"abs(ifNull(a.{c}, 0) - ifNull(b.{c}, 0)) > 1e-9 * greatest(abs(ifNull(a.{c}, 0)), abs(ifNull(b.{c}, 0)), 1)"
        if c in FLOAT_SUMS
        else f"ifNull(a.{c}, 0) != ifNull(b.{c}, 0)"
        for c in rollup.sums
    )
    stored = (
        f"SELECT {keys}, {sums} FROM {conn.database}.{table} WHERE {rollup.bucket} >= {{start:DateTime}} "
        f"AND {rollup.bucket} < {{end:DateTime}}{_only(features)} GROUP BY {keys}"
    )
    fresh = f"SELECT {keys}, {sums} FROM ({recompute_sql(conn, rollup, features)}) GROUP BY {keys}"
    using = ", ".join(rollup.keys)
    result = conn.client.query(
        f"SELECT {keys}, {', '.join(f'a.{c}, b.{c}' for c in rollup.sums)} "
        f"FROM ({stored}) AS a FULL OUTER JOIN ({fresh}) AS b USING ({using}) WHERE {differs} "
        f"LIMIT {int(limit)} SETTINGS join_use_nulls = 1",
        parameters=_range(s, e, features),
    )
    out = []
    n = len(rollup.keys)
    for row in result.result_rows:
        key = dict(zip(rollup.keys, row[:n], strict=True))
        for i, c in enumerate(rollup.sums):
            a, b = row[n + 2 * i], row[n + 2 * i + 1]
            if (a or 0) != (b or 0) and (
                c not in FLOAT_SUMS or abs((a or 0) - (b or 0)) > 1e-9 * max(abs(a or 0), abs(b or 0), 1)
            ):
                out.append(Difference(table, key, c, a, b))
    return out


def written_scope(
    conn: Connection, source: str, condition: str, parameters: dict[str, Any]
) -> tuple[float, float, set[str]] | None:
    """Time span and features of the ``source`` rows matching ``condition``: what to ``repair``.

    The rows are those a writer that died may have left uncounted by the views (written in the
    insert it was in, or not yet known to be whole). None when there are none.
    """
    (row,) = conn.client.query(
        "SELECT count(), toUnixTimestamp64Milli(min(ts)), toUnixTimestamp64Milli(max(ts)), groupUniqArray(feature) "
        f"FROM {conn.database}.{source} WHERE {condition}",
        parameters=parameters,
    ).result_rows
    if not row[0]:
        return None
    return row[1] / 1000, row[2] / 1000, set(row[3])


def repair(conn: Connection, source: str, start: float, end: float, features: Collection[str]) -> list[str]:
    """Check the rollups fed by ``source`` for these features over [start, end); rebuild those that differ.

    For a writer recovering from a crash: ClickHouse commits an insert's raw part and each view's
    part separately, so a kill between them leaves raw rows the views never counted, and the
    restarted writer, seeing the rows, rightly does not write them again. The writer owns these
    features (Kafka keys calls by feature), so rebuilding their cells races with no one.
    Returns the tables rebuilt.
    """
    rebuilt = []
    for rollup in ROLLUPS.values():
        if rollup.source == source and compare(conn, rollup.table, start, end, limit=1, features=features):
            rebuild(conn, rollup.table, start, end, features)
            rebuilt.append(rollup.table)
    return rebuilt


@dataclass
class Recovery:
    """What ``WriteHorizon.recover`` found after an unclean stop."""

    since: float
    """The last time every insert before it was known whole."""
    rebuilt: dict[str, list[str]] = field(default_factory=dict)
    """Source table → rollups rebuilt from raw (empty: the views had every row)."""
    ids: dict[str, list[str]] = field(default_factory=dict)
    """Table → ids written shortly before the stop: to deduplicate a client's retry of them."""


class WriteHorizon:
    """A file in a single writer's data directory while it runs: every row ingested before the
    time it holds is whole (raw part and view parts). Found at start-up, it means the last run
    died; rows ingested since may lack their view parts (or, retried by a client that never got
    its answer, be counted twice), so their rollup cells are checked and rebuilt from raw.

    Only for a writer no one else writes beside (embedded chDB): the rebuild is not atomic.
    """

    SLACK_S = 2.0
    """Clock slack between the writer's time and the engine's ``now64()`` in ``ingested_at``."""

    def __init__(self, path: Path, every_s: float = 5.0) -> None:
        self.path = path
        self.every_s = every_s
        self._written = 0.0

    RETRY_WINDOW_S = 120.0
    """How far before the last whole insert a client may still be waiting for an answer it never got."""

    def recover(self, conn: Connection) -> Recovery | None:
        """None after a clean stop; else what was checked and rebuilt, and the ids a retry may repeat."""
        try:
            since = float(orjson.loads(self.path.read_bytes())["since"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            since = 0.0  # unreadable (torn write): check everything
        out = Recovery(since)
        cutoff = {"since": datetime.fromtimestamp(max(since - self.SLACK_S, 0.0), UTC)}
        for source in sorted({r.source for r in ROLLUPS.values()}):
            scope = written_scope(conn, source, "ingested_at >= {since:DateTime64(3, 'UTC')}", cutoff)
            out.rebuilt[source] = [] if scope is None else repair(conn, source, scope[0], scope[1] + 1, scope[2])
        # an insert is whole before its answer is sent: the last ones' clients may retry
        answered = {"since": datetime.fromtimestamp(max(since - self.RETRY_WINDOW_S, 0.0), UTC)}
        for table, column in (("llm_calls", "event_id"), ("feedback", "feedback_id")):
            out.ids[table] = [
                str(r[0])
                for r in conn.client.query(
                    f"SELECT {column} FROM {conn.database}.{table} "
                    "WHERE ingested_at >= {since:DateTime64(3, 'UTC')} AND " + column + " != ''",
                    parameters=answered,
                ).result_rows
            ]
        return out

    def advance(self, now: float, force: bool = False) -> None:
        """After an insert completed (all inserts before it too): rows ingested from now on are the
        uncertain ones. Written at most every ``every_s`` (atomically), so it lags by that much."""
        if not force and now - self._written < self.every_s:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps({"since": now, "pid": os.getpid()}))
        os.replace(tmp, self.path)
        self._written = now

    def close(self) -> None:
        """A clean stop: everything written is whole."""
        self.path.unlink(missing_ok=True)
