"""Versioned ClickHouse migrations, applied idempotently at start-up.

The DDL lives in ``schemas/migrations/NNNN_name.sql`` (one obvious place, readable without
Python). Each file is rendered with the database, the cluster clause and retention, then its
statements run in order; ``schema_migrations`` records what ran. Every statement is
``IF NOT EXISTS``, so a start-up that died half-way through a migration just runs it again.
Retention is configuration, not schema: when it changes, the TTLs are altered in place
(without rewriting existing parts).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from schemas.config import RetentionSettings
from sinks.clickhouse import Connection

log = logging.getLogger("llmpulse.migrations")

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_STATEMENT_END = re.compile(r";\s*$", re.MULTILINE)
DEDUP_WINDOW = 10_000
"""Insert blocks remembered per table for deduplication (``non_replicated_deduplication_window``)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    template: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.template.encode()).hexdigest()[:16]

    def statements(self, params: dict[str, Any]) -> list[str]:
        sql = self.template.format(**params)
        out = []
        for chunk in _STATEMENT_END.split(sql):
            body = "\n".join(line for line in chunk.splitlines() if not line.strip().startswith("--")).strip()
            if body:
                out.append(body)
        return out


def packaged_migrations() -> list[Migration]:
    folder = resources.files("schemas").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def render_params(database: str, retention: RetentionSettings, cluster: str | None = None) -> dict[str, Any]:
    if cluster:
        on_cluster = f"ON CLUSTER `{cluster}`"
        replacing, aggregating = "ReplicatedReplacingMergeTree", "ReplicatedAggregatingMergeTree"
    else:
        on_cluster = ""
        replacing, aggregating = "ReplacingMergeTree", "AggregatingMergeTree"
    return {
        "db": database,
        "on_cluster": on_cluster,
        "replacing_merge_tree": replacing,
        "aggregating_merge_tree": aggregating,
        "raw_ttl_days": retention.raw_days,
        "content_ttl_days": retention.content_days,
        "rollup_ttl_days": retention.rollup_days,
        "dlq_ttl_days": retention.dlq_days,
        "dedup_window": DEDUP_WINDOW,
    }


def _retention_ddl(db: str, on_cluster: str, r: RetentionSettings) -> list[str]:
    content = f"TTL toDateTime(ts) + INTERVAL {r.content_days} DAY"
    return [
        f"ALTER TABLE {db}.llm_calls {on_cluster} MODIFY TTL toDateTime(ts) + INTERVAL {r.raw_days} DAY",
        f"ALTER TABLE {db}.llm_calls {on_cluster} MODIFY COLUMN prompt Nullable(String) {content}",
        f"ALTER TABLE {db}.llm_calls {on_cluster} MODIFY COLUMN output Nullable(String) {content}",
        f"ALTER TABLE {db}.llm_calls_1m {on_cluster} MODIFY TTL minute + INTERVAL {r.rollup_days} DAY",
        f"ALTER TABLE {db}.dlq {on_cluster} MODIFY TTL toDateTime(received_at) + INTERVAL {r.dlq_days} DAY",
        f"ALTER TABLE {db}.judge_samples {on_cluster} MODIFY TTL toDateTime(ts) + INTERVAL {r.raw_days} DAY",
        f"ALTER TABLE {db}.feedback {on_cluster} MODIFY TTL toDateTime(ts) + INTERVAL {r.raw_days} DAY",
        f"ALTER TABLE {db}.judge_scores {on_cluster} MODIFY TTL toDateTime(ts) + INTERVAL {r.raw_days} DAY",
        f"ALTER TABLE {db}.eval_1h {on_cluster} MODIFY TTL hour + INTERVAL {r.rollup_days} DAY",
        f"ALTER TABLE {db}.feedback_1h {on_cluster} MODIFY TTL hour + INTERVAL {r.rollup_days} DAY",
        f"ALTER TABLE {db}.cost_history {on_cluster} MODIFY TTL toDateTime(ts) + INTERVAL {r.raw_days} DAY",
        f"ALTER TABLE {db}.alerts {on_cluster} MODIFY TTL toDateTime(started_at) + INTERVAL {r.raw_days} DAY",
    ]


def migrate(conn: Connection, retention: RetentionSettings, cluster: str | None = None) -> list[str]:
    """Bring the database up to date; returns the names of the migrations it applied."""
    client = conn.client
    db = conn.database
    params = render_params(db, retention, cluster)
    on_cluster = params["on_cluster"]
    client.command(f"CREATE DATABASE IF NOT EXISTS {db} {on_cluster}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations {on_cluster} "
        "(version UInt32, name String, checksum String, applied_at DateTime DEFAULT now()) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    client.command(
        f"CREATE TABLE IF NOT EXISTS {db}.llmpulse_meta {on_cluster} "
        "(key String, value String, updated_at DateTime64(3) DEFAULT now64(3)) "
        "ENGINE = ReplacingMergeTree(updated_at) ORDER BY key"
    )
    applied = {
        int(row[0]): str(row[1])
        for row in client.query(f"SELECT version, checksum FROM {db}.schema_migrations FINAL").result_rows
    }
    done = []
    for migration in packaged_migrations():
        if migration.version in applied:
            if applied[migration.version] != migration.checksum:
                log.warning(
                    "migration %04d_%s changed after it was applied (checksum %s, now %s); "
                    "edit schemas by adding a new migration instead",
                    migration.version, migration.name, applied[migration.version], migration.checksum,
                )  # fmt: skip
            continue
        for statement in migration.statements(params):
            client.command(statement)
        client.insert(
            f"{db}.schema_migrations",
            [[migration.version, migration.name, migration.checksum]],
            column_names=["version", "name", "checksum"],
        )
        done.append(f"{migration.version:04d}_{migration.name}")
        log.info("applied migration %04d_%s", migration.version, migration.name)
    _apply_retention(conn, retention, on_cluster)
    client.database = db
    return done


def _apply_retention(conn: Connection, retention: RetentionSettings, on_cluster: str) -> None:
    client = conn.client
    db = conn.database
    wanted = retention.model_dump_json()
    rows = client.query(f"SELECT value FROM {db}.llmpulse_meta FINAL WHERE key = 'retention'").result_rows
    current = rows[0][0] if rows else None
    if current == wanted:
        return
    if current is not None:  # fresh tables were created with these TTLs already
        for statement in _retention_ddl(db, on_cluster, retention):
            client.command(statement, settings={"materialize_ttl_after_modify": 0})
        log.info("retention changed to %s", wanted)
    client.insert(f"{db}.llmpulse_meta", [["retention", wanted]], column_names=["key", "value"])
