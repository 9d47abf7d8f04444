"""P5 for the Kafka worker: its RSS while it consumes a long soak with 10k live scope keys.

The same traffic as ``bench.p5_memory`` (10,000 scope keys live in every window, event time
advancing one minute per 40,000 events) is produced to a fresh ``llm.calls`` topic on the real
broker; ``llmpulse worker`` (pinned to one core, writing chDB) then drains it while its RSS and
CPU time are sampled against the events it has committed. Figures: the median RSS once the dedup
horizon is full, and the least-squares RSS slope over the second half of the soak, in MB per
million events (flat: about 0).

Run: ``python -m bench --only p5w`` (``--p5-events``, default LLMPULSE_P5_EVENTS or 3M; the
issue's soak is 10M: producing takes ~2 min, draining ~6 min here).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaProducer

from bench.common import Figure, pin_prefix, proc_cpu_seconds, proc_rss_mb
from bench.p2_kafka import ENV, _lag, _settings
from bench.p5_memory import KEYS, payload
from ingest.kafka import create_topics
from ingest.sdk import DEFAULT_COMPRESSION
from schemas.config import KafkaSettings


async def _produce(kafka: KafkaSettings, events: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all", linger_ms=50,
                                max_batch_size=1 << 20, compression_type=DEFAULT_COMPRESSION)  # fmt: skip
    await producer.start()
    start_ts = time.time() - 86_400 * 3
    try:
        for first in range(0, events, 10_000):
            futures = [await producer.send(kafka.topics.calls, payload(i, start_ts))
                       for i in range(first, min(events, first + 10_000))]  # fmt: skip
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


def slope_mb_per_million(samples: list[dict[str, float]]) -> float:
    """Least-squares RSS slope over the second half of the samples, MB per million events."""
    half = samples[len(samples) // 2 :]
    if len(half) < 2:
        return 0.0
    xs, ys = [s["events"] / 1e6 for s in half], [s["rss_mb"] for s in half]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def run(
    workdir: Path, events: int | None = None, bootstrap: str | None = None, pin_core: int | None = 1
) -> list[Figure]:
    events = events or int(os.environ.get("LLMPULSE_P5_EVENTS", "3000000"))
    bootstrap = bootstrap or os.environ.get("LLMPULSE_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"bench-p5w-{int(time.time())}"
    kafka = _settings(bootstrap, tag, f"{tag}-worker")
    asyncio.run(create_topics(kafka))
    asyncio.run(_produce(kafka, events))
    cfg = workdir / "p5w.yaml"
    cfg.write_text(
        yaml.safe_dump({"kafka": json.loads(kafka.model_dump_json(exclude_none=True)), "metrics": {"port": 0}})
    )
    log = workdir / "p5w.log"
    cmd = [*pin_prefix(pin_core), sys.executable, "-m", "llmpulse.cli", "-v", "worker", "--config", str(cfg),
           "--data-dir", str(workdir / "p5w-data")]  # fmt: skip
    samples: list[dict[str, Any]] = []
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV)
        try:
            deadline = time.time() + 120
            while "llm.calls partitions assigned" not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the worker did not start:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.05)
            t0, c0 = time.perf_counter(), proc_cpu_seconds(proc.pid)
            deadline = time.time() + 3600
            while True:
                lag = asyncio.run(_lag(kafka, kafka.consumer_group))
                cpu, wall = proc_cpu_seconds(proc.pid) - c0, time.perf_counter() - t0
                samples.append({"events": events - lag, "rss_mb": proc_rss_mb(proc.pid), "cpu_s": cpu, "wall_s": wall})
                if lag == 0:
                    break
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the worker stopped or timed out; see {log}")
                time.sleep(2.0)
        finally:
            proc.terminate()
            proc.wait(60)
    steady = [s["rss_mb"] for s in samples[len(samples) // 2 :]]
    last = samples[-1]
    cpu_us = last["cpu_s"] / events * 1e6
    return [
        Figure(f"P5 worker RSS over {events / 1e6:g}M events, {KEYS:,} live scope keys (steady, median)",
               statistics.median(steady), "MB", None, None, cpu_us,
               f"min {min(steady):.0f} / max {max(steady):.0f} MB over the second half; "
               f"{events / last['wall_s']:,.0f} events/s wall", {"samples": samples}),
        Figure("P5 worker RSS slope over the second half of the soak", slope_mb_per_million(samples),
               "MB per 1M events", None, None, cpu_us, f"{len(samples)} samples, every 2 s"),
    ]  # fmt: skip
