"""Shared fixtures: event builders, and a real chDB engine (one per test session, one database per test)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from processors.records import PayloadBatch, Source

NOW = 1_795_000_000.0  # 2026-11-18T11:06:40Z: a fixed "now" so timestamps are deterministic
_counter = itertools.count()


def iso(t: float) -> str:
    ms = round((t - int(t)) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(t))) + f".{ms:03d}Z"


def call(**overrides: Any) -> dict[str, Any]:
    """A valid call event as a dict; override any field, or pass None to drop it."""
    event: dict[str, Any] = {
        "event_id": f"e-{next(_counter)}",
        "ts": iso(NOW - 600),
        "feature": "support-chat",
        "team": "cx",
        "model": "gpt-4o",
        "input_tokens": 1000,
        "output_tokens": 200,
        "latency_ms": 850.0,
        "status": "ok",
    }
    event.update(overrides)
    return {k: v for k, v in event.items() if v is not None}


def payload(**overrides: Any) -> bytes:
    return orjson.dumps(call(**overrides))


def batch(payloads: list[bytes], source: Source | None = None, first: int = 0, digest: str = "") -> PayloadBatch:
    return PayloadBatch(source or Source("test", "unit"), payloads, list(range(first, first + len(payloads))), digest)


@pytest.fixture(scope="session")
def chdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """chDB hosts one engine per process: every in-process test shares this data directory."""
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture
def settings(chdb_dir: Path) -> Any:
    from schemas.config import load_settings

    db = f"t{next(_counter)}_{int(time.time() * 1000) % 100000}"
    return load_settings(None, {"data_dir": chdb_dir, "clickhouse": {"database": db}})


@pytest.fixture
def conn(settings: Any) -> Iterator[Any]:
    """A migrated, empty database on the real ClickHouse engine (chDB via clickhouse-connect)."""
    from llmpulse.runtime import open_clickhouse

    c = open_clickhouse(settings, purpose="pytest")
    yield c
    try:
        c.client.command(f"DROP DATABASE IF EXISTS {settings.clickhouse.database} SYNC")
    finally:
        c.close()


def scalar(conn: Any, sql: str) -> Any:
    return conn.client.query(sql).result_rows[0][0]
