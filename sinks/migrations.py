"""Versioned ClickHouse migrations, applied idempotently at start-up.

The DDL lives in ``schemas/migrations/NNNN_name.sql`` (one obvious place, readable without
Python). Each file is rendered with the database, the cluster clause and retention, then its
statements run in order; ``schema_migrations`` records what ran. Every statement is idempotent
(``IF NOT EXISTS``, or a setting that ends the same however often it is set), so a start-up
that died half-way through a migration just runs it again.
Retention is configuration, not schema: when it changes, the TTLs are altered in place
(without rewriting existing parts).

On a cluster (``clickhouse.cluster``) the same files are rendered for a sharded, replicated
layout (:class:`Layout`), so queries keep using the plain table names everywhere:

* the rows live in ``<table>_local`` on every node (``ON CLUSTER``), with a Replicated engine at
  ``/clickhouse/tables/{shard}/<db>/<table>_local`` and replica ``{replica}``;
* ``<table>`` is a ``Distributed`` table over them: reads see every shard, inserts are spread
  by a sharding key that keeps all versions of a row on one shard (``FINAL`` merges per shard);
* materialized views read and write the local tables, so each shard rolls up its own rows and
  the Distributed rollup adds the shards' states together at query time;
* ``schema_migrations`` and ``llmpulse_meta`` are replicated to every node (one ZooKeeper path
  for the whole cluster), so whichever node a later start-up reaches knows what ran.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, timedelta
from functools import cache
from importlib import resources
from typing import Any

from schemas.config import RetentionSettings
from sinks.clickhouse import Connection

log = logging.getLogger("llmpulse.migrations")

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_STATEMENT_END = re.compile(r";\s*$", re.MULTILINE)
DEDUP_WINDOW = 10_000
"""Insert blocks remembered per table for deduplication (``non_replicated_deduplication_window``,
``replicated_deduplication_window`` on a cluster)."""

LOCAL_SUFFIX = "_local"
"""On a cluster, ``<table>`` is the Distributed table and ``<table>_local`` holds the rows."""
REPLICA_PATH = "/clickhouse/tables/{{shard}}/{db}/{table}"
"""ZooKeeper path of a sharded table. Explicit rather than the server's ``default_replica_path``
(``/clickhouse/tables/{uuid}/{shard}``): it works whatever that server setting says, and an
operator can find a table's replication state under a readable name. Needs the ``{shard}`` and
``{replica}`` macros on every node, as any ON CLUSTER deployment does."""
REPLICA_NAME = "{replica}"
GLOBAL_REPLICA_PATH = "/clickhouse/tables/all/{db}/{table}"
"""Bookkeeping tables: every node of every shard is a replica of one table, so the replica name
must be unique cluster-wide, hence ``{shard}-{replica}``."""
GLOBAL_REPLICA_NAME = "{shard}-{replica}"

SHARDING_KEYS: dict[str, str] = {
    "llm_calls": "cityHash64(event_id)",
    "judge_samples": "cityHash64(event_id)",
    "cost_history": "cityHash64(event_id)",
    "dlq": "cityHash64(dlq_id)",
    "dlq_replays": "cityHash64(dlq_id)",
    "feedback": "cityHash64(request_id)",
    "judge_scores": "cityHash64(request_id)",
    "alerts": "cityHash64(dedup_key)",
}
"""Distributed sharding key per table. Replacing tables shard by a column of their ORDER BY key,
so every version of a row lands on the shard that deduplicates it; feedback and judge scores of
one request stay together. Tables not listed (the rollups) are written by their views on each
shard, never through the Distributed table, and get ``rand()`` for manual backfills."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    template: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.template.encode()).hexdigest()[:16]

    def statements(self, params: dict[str, Any]) -> list[str]:
        """The template's statements, rendered for the single-node layout of ``params``.

        Rendered one statement at a time so a table's row TTL can follow its own retention
        (``retention.tables``): the statement that creates it sees its days in the TTL placeholder.
        """
        return [body.format(**_table_params(body, params)) for body in _template_statements(self.template)]


def _template_statements(template: str) -> list[str]:
    """The unrendered statements of a migration file, without their comment lines."""
    out = []
    for chunk in _STATEMENT_END.split(template):
        body = "\n".join(line for line in chunk.splitlines() if not line.strip().startswith("--")).strip()
        if body:
            out.append(body)
    return out


_CREATE_TEMPLATE = re.compile(r"^CREATE TABLE IF NOT EXISTS \{db\}\.(\w+)")
_ROW_TTL_PLACEHOLDERS = ("raw_ttl_days", "rollup_ttl_days", "dlq_ttl_days")


def _table_params(template_statement: str, params: dict[str, Any]) -> dict[str, Any]:
    match = _CREATE_TEMPLATE.match(template_statement)
    days = params.get("table_ttl_days", {}).get(match.group(1)) if match else None
    if days is None:
        return params
    return {**params, **dict.fromkeys(_ROW_TTL_PLACEHOLDERS, days)}


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
        "table_ttl_days": dict(retention.tables),
    }


# --------------------------------------------------------------------------------------------
# where tables live: one node, or a cluster

_CREATE_TABLE = re.compile(r"^CREATE TABLE IF NOT EXISTS (?P<db>[^.\s]+)\.(?P<table>\w+)(?P<rest>\s.*)$", re.S)
_CREATE_VIEW = re.compile(
    r"^CREATE MATERIALIZED VIEW IF NOT EXISTS (?P<db>[^.\s]+)\.(?P<view>\w+)(?P<rest>\s.*)$", re.S
)
_ALTER_TABLE = re.compile(
    r"^ALTER TABLE (?P<db>[^.\s]+)\.(?P<table>\w+) (?P<on_cluster>ON CLUSTER `[^`]+` )?(?P<ops>.*)$", re.S
)
_ENGINE = re.compile(r"ENGINE = (?:Replicated)?(?P<kind>\w*MergeTree)\b(?:\((?P<args>[^()]*)\))?")
_COLUMN_OPS = re.compile(r"^(ADD|DROP|MODIFY|RENAME|COMMENT) COLUMN\b")


@dataclass(frozen=True)
class Layout:
    """Where the schema's tables live: all on one node, or spread over ``cluster`` (module docstring).

    The migrations are written once, for one node; :meth:`distribute` turns each rendered statement
    into what the cluster needs, and refuses a statement it does not know how to place rather than
    guess (a new migration shape fails the cluster DDL test, not a production rollout).
    """

    database: str
    cluster: str | None = None

    @property
    def on_cluster(self) -> str:
        return f"ON CLUSTER `{self.cluster}`" if self.cluster else ""

    def storage(self, table: str) -> str:
        """The table that holds ``table``'s rows (what TTLs, mutations and views address)."""
        return table + LOCAL_SUFFIX if self.cluster else table

    def bookkeeping(self) -> list[str]:
        """The database and the tables that record what ran, replicated to every node on a cluster."""
        db, on = self.database, f" {self.on_cluster}" if self.cluster else ""
        return [
            f"CREATE DATABASE IF NOT EXISTS {db}{on}",
            f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations{on} "
            "(version UInt32, name String, checksum String, applied_at DateTime DEFAULT now()) "
            f"ENGINE = {self._global_engine('ReplacingMergeTree', 'schema_migrations')} ORDER BY version",
            f"CREATE TABLE IF NOT EXISTS {db}.llmpulse_meta{on} "
            "(key String, value String, updated_at DateTime64(3) DEFAULT now64(3)) "
            f"ENGINE = {self._global_engine('ReplacingMergeTree', 'llmpulse_meta', 'updated_at')} ORDER BY key",
        ]

    def distribute(self, statement: str) -> list[str]:
        """One statement rendered for a single node → the statements that do the same on the cluster."""
        if not self.cluster:
            return [statement]
        if m := _CREATE_TABLE.match(statement):
            return self._create_table(m["table"], m["rest"])
        if m := _CREATE_VIEW.match(statement):
            return [self._create_view(m["view"], m["rest"])]
        if m := _ALTER_TABLE.match(statement):
            return self._alter(m["table"], m["ops"])
        raise ValueError(f"cannot place this statement on a cluster (teach sinks.migrations.Layout):\n{statement}")

    def _global_engine(self, kind: str, table: str, args: str = "") -> str:
        if not self.cluster:
            return f"{kind}({args})" if args else kind
        path = GLOBAL_REPLICA_PATH.format(db=self.database, table=table)
        return f"Replicated{kind}({_args(_quote(path), _quote(GLOBAL_REPLICA_NAME), args)})"

    def _create_table(self, table: str, rest: str) -> list[str]:
        assert self.cluster is not None
        local = self.storage(table)
        path = REPLICA_PATH.format(db=self.database, table=local)

        def replicated(m: re.Match[str]) -> str:
            return f"ENGINE = Replicated{m['kind']}({_args(_quote(path), _quote(REPLICA_NAME), m['args'] or '')})"

        rest, engines = _ENGINE.subn(replicated, rest, count=1)
        if engines != 1:
            raise ValueError(f"cannot place table {table} on a cluster: no *MergeTree engine in its DDL")
        rest = rest.replace("non_replicated_deduplication_window", "replicated_deduplication_window")
        key = SHARDING_KEYS.get(table, "rand()")
        db = self.database
        return [
            f"CREATE TABLE IF NOT EXISTS {db}.{local}{rest}",
            f"CREATE TABLE IF NOT EXISTS {db}.{table} {self.on_cluster} AS {db}.{local}\n"
            f"ENGINE = Distributed({_args(_quote(self.cluster), _quote(db), _quote(local), key)})",
        ]

    def _create_view(self, view: str, rest: str) -> str:
        """Views read and write the local tables: each shard rolls up the rows it holds."""
        tables = _table_names()
        db = re.escape(self.database)

        def local(m: re.Match[str]) -> str:
            name = m["name"]
            return f"{self.database}.{self.storage(name)}" if name in tables else m[0]

        return f"CREATE MATERIALIZED VIEW IF NOT EXISTS {self.database}.{view}" + re.sub(
            rf"(?<![\w.`]){db}\.(?P<name>\w+)\b", local, rest
        )

    def _alter(self, table: str, ops: str) -> list[str]:
        """Column changes go to both tables (a Distributed table has its own column list); storage
        changes (TTL, settings, indexes) only to the local one."""
        db, on = self.database, self.on_cluster
        local = f"ALTER TABLE {db}.{self.storage(table)} {on} {ops}"
        if not _COLUMN_OPS.match(ops) or " TTL " in ops:
            return [local]
        return [local, f"ALTER TABLE {db}.{table} {on} {ops}"]


def _args(*args: str) -> str:
    return ", ".join(a.strip() for a in args if a.strip())


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@cache
def _table_names() -> frozenset[str]:
    """Every table the packaged migrations create (not views)."""
    return frozenset(
        m.group(1) for mig in packaged_migrations() for body in _template_statements(mig.template)
        if (m := _CREATE_TEMPLATE.match(body))
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# what runs


def migration_sql(migration: Migration, params: dict[str, Any], layout: Layout) -> list[str]:
    """One migration's statements as they run on ``layout`` (what ``migrate`` sends, in order)."""
    return [placed for statement in migration.statements(params) for placed in layout.distribute(statement)]


def schema_sql(database: str, retention: RetentionSettings, cluster: str | None = None) -> list[str]:
    """Every statement ``migrate`` runs on an empty server, in order (``llmpulse migrate --print-sql``)."""
    layout = Layout(database, cluster)
    params = render_params(database, retention, cluster)
    return layout.bookkeeping() + [s for m in packaged_migrations() for s in migration_sql(m, params, layout)]


@dataclass(frozen=True)
class TableTTL:
    """A table's TTLs as the migrations declare them; retention changes re-apply exactly these."""

    time: str
    """The row TTL's time expression (``toDateTime(ts)``)."""
    content_columns: tuple[tuple[str, str, str], ...]
    """(column, type, time expression) of the text columns that expire after ``content_days``."""


_ROW_TTL = re.compile(r"^TTL (?P<time>.+?) \+ INTERVAL \{(?:raw|rollup|dlq)_ttl_days\} DAY\s*$", re.MULTILINE)
_CONTENT_TTL = re.compile(
    r"^\s+(?P<column>\w+)\s+(?P<type>\S+)\s+TTL (?P<time>.+?) \+ INTERVAL \{content_ttl_days\} DAY,?\s*$",
    re.MULTILINE,
)


@cache
def table_ttls() -> dict[str, TableTTL]:
    """Read from the SQL files, so the TTL a retention change alters is the one the table was made with."""
    found: dict[str, TableTTL] = {}
    for migration in packaged_migrations():
        for body in _template_statements(migration.template):
            create = _CREATE_TEMPLATE.match(body)
            row = _ROW_TTL.search(body)
            if create and row:
                content = tuple((c["column"], c["type"], c["time"]) for c in _CONTENT_TTL.finditer(body))
                found[create.group(1)] = TableTTL(row["time"], content)
    return found


def retention_sql(database: str, retention: RetentionSettings, cluster: str | None = None) -> list[str]:
    """The ALTERs that move every table's TTLs to ``retention`` (run when it changes)."""
    layout = Layout(database, cluster)
    out = []
    for table, ttl in table_ttls().items():
        target = f"ALTER TABLE {database}.{layout.storage(table)} {layout.on_cluster}".rstrip()
        out.append(f"{target} MODIFY TTL {ttl.time} + INTERVAL {retention.days_for(table)} DAY")
        for column, type_, time in ttl.content_columns:
            out.append(f"{target} MODIFY COLUMN {column} {type_} TTL {time} + INTERVAL {retention.content_days} DAY")
    return out


def migrate(conn: Connection, retention: RetentionSettings, cluster: str | None = None) -> list[str]:
    """Bring the database up to date; returns the names of the migrations it applied."""
    client = conn.client
    db = conn.database
    layout = Layout(db, cluster)
    params = render_params(db, retention, cluster)
    for statement in layout.bookkeeping():
        client.command(statement)
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
        for statement in migration_sql(migration, params, layout):
            client.command(statement)
        for table in BACKFILLS.get(migration.version, ()):
            if cluster:
                # rebuild() deletes with ALTER on the table itself, which a Distributed table refuses
                log.warning("%s starts empty on cluster %s: its history before migration %04d is not backfilled "
                            "(INSERT INTO %s.%s SELECT the view's query over %s.llm_calls to add it)",
                            table, cluster, migration.version, db, table, db)  # fmt: skip
            else:
                _backfill(conn, table)
        client.insert(
            f"{db}.schema_migrations",
            [[migration.version, migration.name, migration.checksum]],
            column_names=["version", "name", "checksum"],
        )
        done.append(f"{migration.version:04d}_{migration.name}")
        log.info("applied migration %04d_%s", migration.version, migration.name)
    _apply_retention(conn, retention, cluster)
    client.database = db
    return done


BACKFILLS: dict[int, tuple[str, ...]] = {5: ("served_models_1m",)}
"""Rollups a migration adds over existing raw rows: rebuilt from raw (delete, then insert the view's
own SELECT), month by month, so a migration interrupted and run again does not count twice."""


def _backfill(conn: Connection, table: str) -> None:
    from sinks.rollups import ROLLUPS, rebuild

    source = ROLLUPS[table].source
    row = conn.client.query(f"SELECT min(ts), max(ts), count() FROM {conn.database}.{source}").result_rows[0]
    if not row[2]:
        return
    first, last = (t.replace(tzinfo=UTC) if t.tzinfo is None else t for t in row[:2])
    month = first.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    while month <= last:
        following = (month + timedelta(days=32)).replace(day=1)
        rebuild(conn, table, month.timestamp(), following.timestamp())
        month = following
    log.info("backfilled %s from %s (%d rows, %s to %s)", table, source, row[2], first, last)


def _retention_key(retention: RetentionSettings) -> str:
    """What ``llmpulse_meta`` remembers; without per-table overrides it is what it was before they
    existed, so upgrading does not re-alter every table's TTL once."""
    return retention.model_dump_json(exclude=None if retention.tables else {"tables"})


def _apply_retention(conn: Connection, retention: RetentionSettings, cluster: str | None) -> None:
    client = conn.client
    db = conn.database
    wanted = _retention_key(retention)
    rows = client.query(f"SELECT value FROM {db}.llmpulse_meta FINAL WHERE key = 'retention'").result_rows
    current = rows[0][0] if rows else None
    if current == wanted:
        return
    if current is not None:  # fresh tables were created with these TTLs already
        for statement in retention_sql(db, retention, cluster):
            client.command(statement, settings={"materialize_ttl_after_modify": 0})
        log.info("retention changed to %s", wanted)
    client.insert(f"{db}.llmpulse_meta", [["retention", wanted]], column_names=["key", "value"])
