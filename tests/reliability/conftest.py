"""Reliability suite fixtures: topics per test on the session broker, and the figures summary."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingest.kafka import create_topics
from tests.reliability.support import FIGURES


@pytest.fixture
def topics(kafka_settings: Any) -> Any:
    """The session broker with this test's own topics; 6 s sessions so a killed worker's partitions move fast."""
    kafka = kafka_settings.model_copy(update={"session_timeout": 6.0})
    asyncio.run(create_topics(kafka))
    return kafka


@pytest.fixture(autouse=True)
def _wall_time(request: pytest.FixtureRequest) -> Iterator[None]:
    import time

    started = time.monotonic()
    yield
    FIGURES.setdefault(request.node.name, {})["wall_s"] = round(time.monotonic() - started, 1)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    default = Path(tempfile.gettempdir()) / "llmpulse-reliability.json"
    path = Path(os.environ.get("LLMPULSE_RELIABILITY_REPORT", default))
    path.write_text(json.dumps(FIGURES, indent=2, default=str))
    terminalreporter.section("llmpulse reliability figures")
    for test, figures in FIGURES.items():
        terminalreporter.write_line(f"{test}: {json.dumps(figures, default=str)}")
    terminalreporter.write_line(f"(written to {path})")
