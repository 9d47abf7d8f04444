"""Shared fixtures: event builders, and a real chDB engine (one per test session, one database per test)."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
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


def run_embedded(settings: Any, conn: Any, calls: list[dict[str, Any]], later: list[dict[str, Any]],
                 first: int = 1000, **runtime: Any) -> Any:  # fmt: skip
    """The calls, durable first, then what refers to them (feedback, verdicts) through one embedded
    runtime, finished and closed; returned for its stats."""
    from llmpulse.runtime import EmbeddedRuntime

    rt = EmbeddedRuntime(settings, conn, **runtime)
    rt.ingest(batch([orjson.dumps(e) for e in calls]), now=NOW)
    rt.flush()
    rt.ingest(batch([orjson.dumps(e) for e in later], first=first), now=NOW)
    rt.finish()
    rt.close()
    return rt


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


ROOT = Path(__file__).resolve().parents[1]
KAFKA_SH = ROOT / "deploy" / "kafka" / "kafka.sh"


def _docker_engine_running() -> bool:
    import shutil
    import subprocess

    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "info"], capture_output=True, check=False).returncode == 0


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class PrivateBroker:
    """deploy/kafka/kafka.sh with its own ports, data and run directories: a broker a test may
    stop and start (the session broker is shared by the whole run)."""

    def __init__(self, root: Path) -> None:
        port, sasl, controller = _free_ports(3)
        self.bootstrap = f"127.0.0.1:{port}"
        self.env = {**os.environ, "KAFKA_PORT": str(port), "KAFKA_SASL_PORT": str(sasl),
                    "KAFKA_CONTROLLER_PORT": str(controller), "KAFKA_DATA_DIR": str(root / "data"),
                    "KAFKA_RUN_DIR": str(root / "run"), "KAFKA_HEAP_OPTS": "-Xmx384m -Xms128m"}  # fmt: skip

    def run(self, command: str) -> float:
        started = time.monotonic()
        proc = subprocess.run(["bash", str(KAFKA_SH), command], env=self.env, capture_output=True, text=True,
                              check=False, timeout=180)  # fmt: skip
        assert proc.returncode == 0, f"kafka.sh {command}:\n{proc.stdout}\n{proc.stderr}"
        return time.monotonic() - started


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    if not (shutil.which("java") and shutil.which("mvn")):
        pytest.skip("needs Java and Maven for a private broker (deploy/kafka/kafka.sh)")
    b = PrivateBroker(tmp_path / "kafka")
    try:
        b.run("start")
        yield b
    finally:
        b.run("stop")  # also after a start that failed halfway: no broker left running


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A real Kafka broker: LLMPULSE_KAFKA_BOOTSTRAP, else the project's own (deploy/kafka/kafka.sh),
    else testcontainers when a Docker engine runs. Never a mock."""
    import os
    import shutil
    import subprocess

    given = os.environ.get("LLMPULSE_KAFKA_BOOTSTRAP")
    if given:
        yield given
        return
    if shutil.which("java") and shutil.which("mvn"):
        was_running = (
            subprocess.run(["bash", str(KAFKA_SH), "status"], capture_output=True, check=False).returncode == 0
        )
        proc = subprocess.run(["bash", str(KAFKA_SH), "start"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.fail(f"deploy/kafka/kafka.sh start failed:\n{proc.stdout}\n{proc.stderr}")
        yield "127.0.0.1:19092"
        if not was_running:
            subprocess.run(["bash", str(KAFKA_SH), "stop"], capture_output=True, check=False)
        return
    if _docker_engine_running():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.1.0").with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    pytest.skip("no Kafka: set LLMPULSE_KAFKA_BOOTSTRAP, install Java+Maven for deploy/kafka, or run Docker")


@pytest.fixture
def kafka_settings(kafka_bootstrap: str) -> Any:
    """Kafka settings with topic names unique to the test, so tests never see each other's messages."""
    from schemas.config import KafkaSettings, TopicNames

    tag = f"t{next(_counter)}-{int(time.time() * 1000) % 10_000_000}"
    names = {name: f"{tag}.{default}" for name, default in TopicNames().model_dump().items()}
    return KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        topics=TopicNames(**names),
        consumer_group=f"{tag}-worker",
        partitions=4,
        fetch_max_wait=0.05,
        session_timeout=10.0,  # a SIGKILLed worker's partitions move on after 10 s
    )
