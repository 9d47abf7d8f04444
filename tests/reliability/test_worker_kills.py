"""SIGKILL the worker again and again while events flow (issue 8: 5 kills, 1M events).

A kill can land anywhere: mid-decode, between the ClickHouse insert and the offset commit, in
the middle of a rebalance. Whatever it hits, the raw table must end up holding exactly the
produced event ids (no loss, no duplicate) and every rollup must equal its recomputation from
raw — checked with ``llmpulse reconcile``, the command operators run.

Sizes: LLMPULSE_RELIABILITY_EVENTS (default 1,000,000, the issue's size: ~80 s here, since the
five worker lives, not the event count, set the duration) and LLMPULSE_RELIABILITY_KILLS (default 5).
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests.llmpulse.workers import Worker, write_config
from tests.reliability.support import (
    PacedProducer,
    assert_exactly_the_produced_ids,
    committed,
    cpu_s,
    end_offsets,
    reconcile,
    record,
    size,
    wait_for,
)

pytestmark = pytest.mark.kafka

ROUND_S = 12.0
"""About one life of a worker here: ~6 s for the killed member's session to expire and the new
one to be assigned, then a few seconds of work. The producer spreads the events over the rounds."""


def test_sigkill_while_events_flow_loses_and_duplicates_nothing(tmp_path: Path, topics: Any) -> None:
    n = size("EVENTS", 1_000_000)
    kills = size("KILLS", 5)
    topic = topics.topics.calls
    cfg = write_config(tmp_path / "w.yaml", topics, pipeline={"batch_max_seconds": "200ms", "batch_max_events": 10_000})
    data = tmp_path / "data"
    rng = random.Random(8)
    total = lambda: sum(committed(topics, topic).values())  # noqa: E731
    producer = PacedProducer(topics, topic, "kill", n, rate=n / (kills * ROUND_S), chunk=5000).start()
    lives: list[dict[str, float]] = []
    started = time.monotonic()
    seen = {"lag": 0}

    def burst() -> bool:
        """Events past the committed offsets, as of this poll (kept in ``seen``)."""
        seen["lag"] = sum(end_offsets(topics, topic).values()) - total()
        return seen["lag"] > 0

    for k in range(kills):
        worker = Worker(cfg, data, tmp_path / f"w{k}.log").start()
        launched = time.monotonic()
        before = total()
        # recovered = the new worker committed past where the killed one stopped
        recovery = wait_for(lambda b=before: total() > b, 120, f"progress after kill {k}", workers=[worker])
        c0, t0 = total(), time.monotonic()
        time.sleep(rng.uniform(1.0, 3.0))
        c1, t1 = total(), time.monotonic()
        # then kill it while it holds uncommitted events (reading, writing, or written but not committed):
        # a random moment, then the first poll that sees events past the committed offsets, and the
        # kill right after that poll (a worker that commits every 200 ms may have caught up again
        # by the end of a sleep taken after the poll, and the kill would find nothing in flight)
        seen["lag"] = 0
        time.sleep(rng.uniform(0.0, 0.6))  # somewhere in read → process → insert → commit
        with contextlib.suppress(AssertionError):
            wait_for(burst, 5, "a burst", interval=0.05)
        lag = seen["lag"]
        worker.kill()
        lives.append({"recovery_s": round(recovery, 1), "events_per_s": round((c1 - c0) / (t1 - t0)),
                      "uncommitted_at_kill": lag,
                      "produced_at_kill": producer.produced, "life_s": round(t1 - launched, 1)})  # fmt: skip
    producer.join()
    flowing = sum(1 for life in lives if life["produced_at_kill"] < n)
    worker = Worker(cfg, data, tmp_path / "final.log").start()
    before, launched = total(), time.monotonic()
    try:
        worker.wait_ready(120)
        assert worker.proc is not None
        assigned, cpu0 = time.monotonic(), cpu_s(worker.proc.pid)
        wait_for(lambda: committed(topics, topic) == end_offsets(topics, topic), 300, "catch-up", interval=0.5,
                 workers=[worker])  # fmt: skip
        drained, cpu1 = time.monotonic(), cpu_s(worker.proc.pid)
    finally:
        assert worker.stop() == 0, worker.log.read_text(errors="replace")[-3000:]
    backlog = sum(end_offsets(topics, topic).values()) - before
    assert_exactly_the_produced_ids(data, "kill", n)
    report = reconcile(data)
    assert report["raw"] == {"rows": n, "rows_final": n, "event_ids": n}
    assert flowing >= kills - 1, f"only {flowing} of {kills} kills landed while the producer was still sending"
    assert sum(1 for life in lives if life["uncommitted_at_kill"]) >= kills - 1, lives
    logs = [(tmp_path / f"w{k}.log").read_text(errors="replace") for k in range(1, kills)] + [worker.log.read_text()]
    # the next worker found rows of the killed one's last block in ClickHouse, offsets not committed: skipped them
    after_write = sum(1 for text in logs if "already in ClickHouse; skipping them" in text)
    # ...and, where the kill fell between the raw part and the view parts, rebuilt the rollup cells
    repaired = sum(1 for text in logs if "lacked rows written before the last owner died" in text)
    record("sigkill_while_events_flow", events=n, kills=kills, kills_while_producing=flowing,
           kills_between_write_and_commit=after_write, rollups_repaired=repaired, lives=lives,
           final_backlog=backlog, final_restart_to_assigned_s=round(assigned - launched, 1),
           final_backlog_events_per_s=round(backlog / max(drained - assigned, 1e-3)),
           final_worker_cpu_us_per_event=round((cpu1 - cpu0) / max(backlog, 1) * 1e6, 1),
           total_s=round(time.monotonic() - started, 1), reconcile_s=report["seconds"])  # fmt: skip
