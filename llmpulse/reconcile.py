"""``llmpulse reconcile``: prove (or repair) that the rollups equal the raw rows.

The claim is exactly-once rows in ClickHouse. Two things can break it, and this checks both:

- a rollup cell counted twice (a block re-inserted past deduplication fires the view again), or
  missed (a view that failed): every rollup in ``sinks.rollups.ROLLUPS`` is recomputed from the
  raw table read ``FINAL`` with the view's own SELECT, and compared cell by cell;
- a raw event written twice. ``llm_calls`` is a ReplacingMergeTree ordered by
  ``(feature, toDate(ts), event_id)``, so a repeat is either *pending* (same sort key, still in
  two parts: a merge or ``FINAL`` hides it, but the view already counted it) or *distinct* (same
  event_id under another feature or day: it survives merges and counts twice everywhere).

``--fix`` rebuilds exactly the rollup buckets found wrong (``sinks.rollups.rebuild``), merges the
months holding pending repeats, and checks again. Distinct repeats are reported, never deleted:
which copy is right is the producer's call.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sinks.clickhouse import Connection
from sinks.rollups import ROLLUPS, Difference, align, compare, rebuild


@dataclass
class Repeat:
    """One event_id present more than once in the raw table."""

    event_id: str
    rows: int
    """Rows as stored (parts not merged yet included)."""
    rows_final: int
    """Rows after ``FINAL``: more than one means copies under different sort keys."""


@dataclass
class RawCounts:
    rows: int = 0
    rows_final: int = 0
    event_ids: int = 0


@dataclass
class ReconcileReport:
    start: float
    end: float
    raw: RawCounts = field(default_factory=RawCounts)
    differences: list[Difference] = field(default_factory=list)
    repeats: list[Repeat] = field(default_factory=list)
    repeated_ids: int = 0
    """All event_ids stored more than once (``repeats`` lists at most ``limit`` of them)."""
    rebuilt: dict[str, list[float]] = field(default_factory=dict)
    """--fix: table → bucket starts rebuilt from raw."""
    merged_months: list[int] = field(default_factory=list)
    """--fix: monthly partitions of llm_calls merged to collapse pending repeats."""
    remaining: int = 0
    """--fix: differences plus repeated ids still there after repairing."""
    seconds: float = 0.0

    @property
    def found(self) -> int:
        return len(self.differences) + self.repeated_ids

    @property
    def ok(self) -> bool:
        """Nothing wrong, or everything found was repaired and checked again."""
        return self.found == 0 or (bool(self.rebuilt or self.merged_months) and self.remaining == 0)


def _params(start: float, end: float) -> dict[str, datetime]:
    return {"s": datetime.fromtimestamp(start, UTC), "e": datetime.fromtimestamp(end, UTC)}


def raw_counts(conn: Connection, start: float, end: float) -> RawCounts:
    """Stored rows, rows after FINAL and distinct event ids: equal when nothing was written twice."""
    where = "WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)}"
    row = conn.client.query(
        f"SELECT (SELECT count() FROM {conn.database}.llm_calls {where}), "
        f"(SELECT count() FROM {conn.database}.llm_calls FINAL {where}), "
        f"(SELECT uniqExact(event_id) FROM {conn.database}.llm_calls {where})",
        parameters=_params(start, end),
    ).result_rows[0]
    return RawCounts(int(row[0]), int(row[1]), int(row[2]))


def repeated_events(conn: Connection, start: float, end: float, limit: int = 1000) -> tuple[int, list[Repeat]]:
    """Event ids stored more than once: how many in all, and up to ``limit`` of them with counts."""
    where = "WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)}"
    db = conn.database
    params = _params(start, end)
    total = int(
        conn.client.query(
            f"SELECT count() FROM (SELECT event_id FROM {db}.llm_calls {where} GROUP BY event_id HAVING count() > 1)",
            parameters=params,
        ).result_rows[0][0]
    )
    if not total:
        return 0, []
    rows = conn.client.query(
        f"SELECT s.event_id, s.n, f.n FROM "
        f"(SELECT event_id, count() n FROM {db}.llm_calls {where} GROUP BY event_id HAVING n > 1) s "
        f"LEFT JOIN (SELECT event_id, count() n FROM {db}.llm_calls FINAL {where} GROUP BY event_id) f "
        f"USING (event_id) ORDER BY s.n DESC, s.event_id LIMIT {int(limit)}",
        parameters=params,
    ).result_rows
    return total, [Repeat(str(r[0]), int(r[1]), int(r[2])) for r in rows]


def _bucket_starts(table: str, differences: Iterable[Difference]) -> list[float]:
    bucket = ROLLUPS[table].bucket
    starts = set()
    for d in differences:
        value = d.key[bucket]
        if isinstance(value, datetime):
            value = (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
        starts.add(float(value))
    return sorted(starts)


def _months_with_pending_repeats(conn: Connection, start: float, end: float) -> list[int]:
    rows = conn.client.query(
        f"SELECT DISTINCT toYYYYMM(ts) FROM {conn.database}.llm_calls "
        "WHERE ts >= {s:DateTime64(3)} AND ts < {e:DateTime64(3)} "
        "GROUP BY event_id, feature, toDate(ts), toYYYYMM(ts) HAVING count() > 1",
        parameters=_params(start, end),
    ).result_rows
    return sorted(int(r[0]) for r in rows)


def reconcile(
    conn: Connection,
    start: float,
    end: float,
    *,
    fix: bool = False,
    tables: Iterable[str] | None = None,
    limit: int = 1000,
) -> ReconcileReport:
    """Compare every rollup with its recomputation over [start, end) and look for repeated events.

    The range is widened to whole buckets of each rollup (``sinks.rollups.align``), so a cell is
    compared whole. ``limit`` caps the differences and repeats listed per check, not the check.
    """
    started = time.perf_counter()
    names = list(tables or ROLLUPS)
    report = ReconcileReport(start, end)
    hour_start, hour_end = align(ROLLUPS["eval_1h"], start, end)  # the widest buckets: raw checks cover them all
    report.raw = raw_counts(conn, hour_start, hour_end)
    for table in names:
        report.differences.extend(compare(conn, table, start, end, limit=limit))
    report.repeated_ids, report.repeats = repeated_events(conn, hour_start, hour_end, limit)
    if fix and report.found:
        _repair(conn, report, names, hour_start, hour_end, limit)
    report.seconds = time.perf_counter() - started
    return report


def _repair(conn: Connection, report: ReconcileReport, names: list[str], start: float, end: float, limit: int) -> None:
    """Merge pending repeats first (they change nothing FINAL reads), then rebuild the wrong buckets."""
    if report.repeated_ids:
        for month in _months_with_pending_repeats(conn, start, end):
            conn.client.command(f"OPTIMIZE TABLE {conn.database}.llm_calls PARTITION {month} FINAL")
            report.merged_months.append(month)
    for table in names:
        buckets = _bucket_starts(table, (d for d in report.differences if d.table == table))
        seconds = ROLLUPS[table].seconds
        for bucket in buckets:
            rebuild(conn, table, bucket, bucket + seconds)
        if buckets:
            report.rebuilt[table] = buckets
    remaining = sum(len(compare(conn, t, report.start, report.end, limit=limit)) for t in names)
    still, _ = repeated_events(conn, start, end, limit)
    report.remaining = remaining + still


def as_json(report: ReconcileReport) -> dict[str, Any]:
    """The report as plain JSON values (``--json``)."""

    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")

    def value(v: Any) -> Any:
        if isinstance(v, datetime):
            return (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat().replace("+00:00", "Z")
        return v

    return {
        "start": iso(report.start),
        "end": iso(report.end),
        "ok": report.ok,
        "raw": vars(report.raw),
        "differences": [
            {
                "table": d.table,
                "key": {k: value(v) for k, v in d.key.items()},
                "column": d.column,
                "stored": d.stored,
                "recomputed": d.recomputed,
            }
            for d in report.differences
        ],
        "repeated_ids": report.repeated_ids,
        "repeats": [vars(r) for r in report.repeats],
        "rebuilt": {t: [iso(b) for b in buckets] for t, buckets in report.rebuilt.items()},
        "merged_months": report.merged_months,
        "remaining": report.remaining,
        "seconds": round(report.seconds, 3),
    }
