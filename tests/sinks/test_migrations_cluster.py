"""Cluster DDL and per-table retention.

No ClickHouse cluster (nor ZooKeeper) runs here, so the cluster DDL is checked the strongest way
available: every statement goes through the real ClickHouse parser in chDB (``formatQuery``
parses with the server's grammar and prints the normalized statement; it fails on anything the
server would not parse), and the assertions read that normalized text. The single-node path is
the one the rest of the suite runs for real; here it is also held byte-identical to what it was.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest

from schemas.config import ConfigError, RetentionSettings, load_settings
from sinks.migrations import (
    LOCAL_SUFFIX,
    SHARDING_KEYS,
    Layout,
    migrate,
    packaged_migrations,
    render_params,
    retention_sql,
    schema_sql,
    table_ttls,
)
from tests.conftest import scalar

DB = "llmpulse"
CLUSTER = "llm_cluster"
TABLES = sorted(RetentionSettings.default_classes())


def parse(conn: Any, statement: str) -> str:
    """The statement as ClickHouse's parser reads it (raises on a syntax error)."""
    return str(conn.client.query("SELECT formatQuery({q:String})", parameters={"q": statement}).result_rows[0][0])


def old_single_node_statements(params: dict[str, Any]) -> list[str]:
    """How migrations were rendered before cluster layouts and per-table retention existed."""
    out = []
    for migration in packaged_migrations():
        for chunk in re.split(r";\s*$", migration.template.format(**params), flags=re.MULTILINE):
            body = "\n".join(line for line in chunk.splitlines() if not line.strip().startswith("--")).strip()
            if body:
                out.append(body)
    return out


def test_single_node_rendering_is_unchanged() -> None:
    params = render_params(DB, RetentionSettings())
    rendered = [s for m in packaged_migrations() for s in m.statements(params)]
    assert rendered == old_single_node_statements(params)
    assert schema_sql(DB, RetentionSettings())[3:] == rendered
    assert Layout(DB).bookkeeping()[0] == f"CREATE DATABASE IF NOT EXISTS {DB}"
    assert all("ON CLUSTER" not in s and "Replicated" not in s and "Distributed" not in s
               for s in schema_sql(DB, RetentionSettings()))  # fmt: skip


@pytest.fixture
def cluster_ddl(conn: Any) -> list[str]:
    """The full cluster DDL, each statement as ClickHouse's parser normalizes it."""
    return [parse(conn, s) for s in schema_sql(DB, RetentionSettings(), CLUSTER)]


def test_every_cluster_statement_parses_and_says_on_cluster(cluster_ddl: list[str]) -> None:
    assert len(cluster_ddl) > 30
    for statement in cluster_ddl:
        head = statement.split("\n", 1)[0]
        assert f"ON CLUSTER {CLUSTER}" in head, statement
    assert not [s for s in cluster_ddl if re.search(r"ENGINE = (?!Replicated|Distributed)\w*MergeTree", s)]


def _engine(statement: str) -> str:
    match = re.search(r"^ENGINE = (.*)$", statement, re.MULTILINE)
    assert match, statement
    return match.group(1)


def _created(ddl: list[str]) -> dict[str, str]:
    out = {}
    for s in ddl:
        match = re.match(rf"CREATE (?:TABLE|MATERIALIZED VIEW) IF NOT EXISTS {DB}\.(\w+) ", s)
        if match:
            out[match.group(1)] = s
    return out


def test_rows_live_in_replicated_local_tables_read_through_distributed_ones(cluster_ddl: list[str]) -> None:
    created = _created(cluster_ddl)
    for table in TABLES:
        local = created[table + LOCAL_SUFFIX]
        engine = _engine(local)
        path = f"'/clickhouse/tables/{{shard}}/{DB}/{table}{LOCAL_SUFFIX}', '{{replica}}'"
        assert re.fullmatch(rf"Replicated\w*MergeTree\({re.escape(path)}(, \w+)?\)", engine), engine
        if "deduplication_window" in local:
            assert "SETTINGS replicated_deduplication_window = 10000" in local
            assert "non_replicated_deduplication_window" not in local
        key = SHARDING_KEYS.get(table, "rand()")
        assert _engine(created[table]) == f"Distributed('{CLUSTER}', '{DB}', '{table}{LOCAL_SUFFIX}', {key})"
        assert f"AS {DB}.{table}{LOCAL_SUFFIX}" in created[table]
    for name in ("schema_migrations", "llmpulse_meta"):  # replicated everywhere, no shards
        assert (
            f"ReplicatedReplacingMergeTree('/clickhouse/tables/all/{DB}/{name}', '{{shard}}-{{replica}}'"
            in (created[name])
        )


def test_sharding_keeps_every_version_of_a_row_on_one_shard(cluster_ddl: list[str]) -> None:
    """FINAL merges per shard: a Replacing table must shard by a column of its sorting key."""
    created = _created(cluster_ddl)
    for table in TABLES:
        local = created[table + LOCAL_SUFFIX]
        if "Replacing" not in _engine(local):
            continue
        order_by = re.search(r"^ORDER BY (.*)$", local, re.MULTILINE)
        assert order_by, local
        (column,) = re.fullmatch(r"cityHash64\((\w+)\)", SHARDING_KEYS[table]).groups()  # type: ignore[union-attr]
        assert re.search(rf"\b{column}\b", order_by.group(1)), (table, order_by.group(1))


def test_materialized_views_read_and_write_local_tables(cluster_ddl: list[str]) -> None:
    views = {name: s for name, s in _created(cluster_ddl).items() if name.endswith("_mv")}
    assert set(views) == {"llm_calls_1m_mv", "served_models_1m_mv", "eval_1h_mv", "feedback_1h_mv"}
    for statement in views.values():
        refs = re.findall(rf"\b{DB}\.(\w+)", statement)[1:]  # the first is the view itself
        assert refs and all(r.endswith(LOCAL_SUFFIX) for r in refs), refs


def test_column_changes_reach_both_tables_and_storage_changes_only_the_local_one(cluster_ddl: list[str]) -> None:
    added = [s for s in cluster_ddl if s.startswith(f"ALTER TABLE {DB}.feedback")]
    assert {s.split()[2] for s in added} == {f"{DB}.feedback", f"{DB}.feedback{LOCAL_SUFFIX}"}
    assert len(added) % 2 == 0
    ttl = retention_sql(DB, RetentionSettings(), CLUSTER)
    assert all(s.split()[2].endswith(LOCAL_SUFFIX) and f"ON CLUSTER `{CLUSTER}`" in s for s in ttl)


def test_a_statement_the_layout_does_not_know_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot place this statement on a cluster"):
        Layout(DB, CLUSTER).distribute(f"RENAME TABLE {DB}.a TO {DB}.b")
    assert Layout(DB).distribute(f"RENAME TABLE {DB}.a TO {DB}.b") == [f"RENAME TABLE {DB}.a TO {DB}.b"]


def test_retention_ddl_parses_for_both_layouts(conn: Any) -> None:
    retention = RetentionSettings(tables={"judge_scores": 30, "llm_calls_1m": 7})
    for cluster in (None, CLUSTER):
        statements = retention_sql(DB, retention, cluster)
        assert {s.split()[2].removeprefix(f"{DB}.").removesuffix(LOCAL_SUFFIX) for s in statements} == set(TABLES)
        for statement in statements:
            parse(conn, statement)


# ---- retention per table ---------------------------------------------------------------------


def test_retention_classes_match_the_migrations_and_the_config_keys() -> None:
    """One list of tables in three places: the SQL files, default_classes() and the `tables` key type."""
    assert set(table_ttls()) == set(TABLES)
    key_type = typing.get_args(RetentionSettings.model_fields["tables"].annotation)[0]
    assert set(typing.get_args(key_type)) == set(TABLES)
    for migration in packaged_migrations():
        for table, placeholder in re.findall(
            r"CREATE TABLE IF NOT EXISTS \{db\}\.(\w+).*?^TTL .*?\{(\w+)_ttl_days\}", migration.template, re.S | re.M
        ):
            assert RetentionSettings.default_classes()[table] == f"{placeholder}_days", table


def _row_ttl_days(create_statement: str) -> int:
    match = re.search(r"^TTL .* \+ INTERVAL (\d+) DAY$", create_statement, re.MULTILINE)
    assert match, create_statement
    return int(match.group(1))


@pytest.mark.parametrize("cluster", [None, CLUSTER])
def test_a_table_override_changes_only_that_tables_row_ttl(cluster: str | None) -> None:
    retention = RetentionSettings(raw_days=60, tables={"judge_scores": 30, "llm_calls_1m": 7})
    created = _created(schema_sql(DB, retention, cluster))
    suffix = LOCAL_SUFFIX if cluster else ""
    days = {table: _row_ttl_days(created[table + suffix]) for table in TABLES}
    assert days == {t: retention.days_for(t) for t in TABLES}
    assert (days["judge_scores"], days["llm_calls_1m"], days["llm_calls"], days["eval_1h"]) == (30, 7, 60, 400)
    assert "prompt              Nullable(String) TTL toDateTime(ts) + INTERVAL 30 DAY" in created["llm_calls" + suffix]


def _ttl_on_engine(conn: Any, table: str) -> str:
    query = f"SELECT create_table_query FROM system.tables WHERE database = '{conn.database}' AND name = '{table}'"
    match = re.search(r"TTL (.*?)(?: SETTINGS|$)", scalar(conn, query))
    assert match
    return match.group(1)


def test_overrides_are_applied_and_changed_in_place_on_the_engine(settings: Any, conn: Any) -> None:
    assert "toIntervalDay(90)" in _ttl_on_engine(conn, "judge_scores")
    migrate(conn, settings.retention.model_copy(update={"tables": {"judge_scores": 30}}))
    assert "toIntervalDay(30)" in _ttl_on_engine(conn, "judge_scores")
    assert "toIntervalDay(90)" in _ttl_on_engine(conn, "feedback")
    assert "toIntervalDay(30)" in _ttl_on_engine(conn, "dlq_replays")  # dlq_days, re-applied with the rest
    migrate(conn, settings.retention.model_copy(update={"tables": {"judge_scores": 14}, "dlq_days": 10}))
    assert "toIntervalDay(14)" in _ttl_on_engine(conn, "judge_scores")
    assert "toIntervalDay(10)" in _ttl_on_engine(conn, "dlq_replays")


def test_without_overrides_the_remembered_retention_is_what_it_was(settings: Any, conn: Any) -> None:
    """Upgrading must not see a retention change (and alter every TTL) just because the key is new."""
    stored = scalar(conn, f"SELECT value FROM {conn.database}.llmpulse_meta FINAL WHERE key = 'retention'")
    assert stored == '{"raw_days":90,"content_days":30,"rollup_days":400,"dlq_days":30}'


def test_a_misspelt_table_names_the_file_the_key_and_the_valid_tables(tmp_path: Path) -> None:
    config = tmp_path / "llmpulse.yaml"
    config.write_text("retention:\n  tables:\n    judge_scrores: 30\n")
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    message = str(err.value)
    assert message.startswith(f"{config}: key `retention.tables.judge_scrores")
    assert "'judge_scores'" in message and "'llm_calls_1m'" in message and "(got 'judge_scrores')" in message
    config.write_text("retention:\n  tables:\n    judge_scores: 0\n")
    with pytest.raises(ConfigError, match=r"key `retention.tables.judge_scores`: Input should be greater than"):
        load_settings(config)


def test_days_for_an_unknown_table_is_an_error() -> None:
    with pytest.raises(KeyError, match="no retention for table 'nope'"):
        RetentionSettings().days_for("nope")
