"""P2: Kafka → worker → ClickHouse, per worker core, against its two baselines in the same run.

1. the raw consume rate of aiokafka ``getmany`` alone (the ceiling: no decode, no write);
2. ``llmpulse worker`` pinned to one core (process CPU includes chDB's insert threads);
3. an idiomatic per-event faust agent doing the same job (``bench/faust_baseline.py``), pinned
   the same way.

All three read the same N messages from the same topic on the real broker. Timing starts when
the consumer is assigned (start-up excluded) and ends when the consumer group has committed
the last offset.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.common import Figure, pin_prefix, proc_cpu_seconds, proc_rss_mb
from ingest.kafka import consumer_lag, create_topics
from ingest.sdk import DEFAULT_COMPRESSION
from ingest.synthetic import Scenario, generate
from schemas.config import KafkaSettings, TopicNames

ENV = {k: v for k, v in os.environ.items() if not k.startswith("LLMPULSE_")}


def _settings(bootstrap: str, tag: str, group: str) -> KafkaSettings:
    names = {n: f"{tag}.{d}" for n, d in TopicNames().model_dump().items()}
    return KafkaSettings(bootstrap_servers=bootstrap, topics=TopicNames(**names), consumer_group=group, partitions=4)


async def _produce(kafka: KafkaSettings, events: int) -> int:
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers, acks="all", linger_ms=50, max_batch_size=1 << 20,
        compression_type=DEFAULT_COMPRESSION,  # what the SDK sends
    )  # fmt: skip
    await producer.start()
    n = 0
    try:
        # live-like: the whole run spans ten minutes of event time, so windows close at the
        # rate they would in production rather than once per event (a historical backfill)
        scenario = Scenario(events=events, days=10 / 1440, seed=99, malformed_rate=0.0005)
        for batch in generate(scenario, 10_000):
            futures = [await producer.send(kafka.topics.calls, p) for p in batch]
            n += len(futures)
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return n


async def _raw_consume(kafka: KafkaSettings, expected: int) -> tuple[float, float]:
    consumer = AIOKafkaConsumer(
        kafka.topics.calls, bootstrap_servers=kafka.bootstrap_servers, group_id=None,
        auto_offset_reset="earliest", enable_auto_commit=False, max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )  # fmt: skip
    await consumer.start()
    try:
        first = await consumer.getmany(timeout_ms=10_000, max_records=20_000)
        got = sum(len(v) for v in first.values())
        t0, c0 = time.perf_counter(), time.process_time()
        while got < expected:
            batch = await consumer.getmany(timeout_ms=2_000, max_records=20_000)
            if not batch:
                break
            got += sum(len(v) for v in batch.values())
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        await consumer.stop()
    measured = got - sum(len(v) for v in first.values())
    return measured / wall, cpu / max(measured, 1) * 1e6


async def _lag(kafka: KafkaSettings, group: str, topic: str | None = None) -> int:
    return sum((await consumer_lag(kafka, group, topic or kafka.topics.calls)).values())


def _run_consumer(cmd: list[str], env: dict[str, str], log: Path, marker: str, kafka: KafkaSettings, group: str,
                  events: int, timeout: float, then: tuple[float, str, str] | None = None,
                  profile: tuple[Path, int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run a consumer until ``group`` has drained the calls topic; its CPU over that time.

    ``then`` = (seconds, group, topic): after the calls are drained, wait that long (windows
    closing on idle) and until that group has drained that topic too, twice in a row (stage 2
    working off the partials): the work that follows the calls is counted. ``profile`` = (path,
    rate): py-spy samples the consumer over the same span (``bench.profile``).
    """
    recorder: subprocess.Popen[bytes] | None = None
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.time() + 120
            while marker not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{cmd} did not start:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.05)
            if profile is not None:
                from bench.profile import record_command

                recorder = subprocess.Popen(record_command(profile[0], profile[1], pid=proc.pid),
                                            stdout=subprocess.DEVNULL, stderr=out)  # fmt: skip
            t0, c0 = time.perf_counter(), proc_cpu_seconds(proc.pid)
            deadline = time.time() + timeout
            peak_rss = 0.0
            while True:
                peak_rss = max(peak_rss, proc_rss_mb(proc.pid))
                if asyncio.run(_lag(kafka, group)) == 0:
                    break
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{cmd} stopped or timed out; see {log}")
                time.sleep(0.2)
            if then is not None:
                pause, then_group, then_topic = then
                time.sleep(pause)
                clear = 0
                while clear < 2:
                    clear = clear + 1 if asyncio.run(_lag(kafka, then_group, then_topic)) == 0 else 0
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"{cmd} stopped or timed out; see {log}")
                    time.sleep(0.5)
            wall, cpu = time.perf_counter() - t0, proc_cpu_seconds(proc.pid) - c0
        finally:
            try:
                if recorder is not None:
                    from bench.profile import stop_recording

                    stop_recording(recorder)
            finally:
                proc.terminate()
                proc.wait(60)
    return {"events_per_s": events / wall, "events_per_cpu_s": events / cpu, "cpu_us_per_event": cpu / events * 1e6,
            "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak_rss}  # fmt: skip


def _consumer(name: str, base: KafkaSettings, group: str, workdir: Path, pin_core: int | None
              ) -> tuple[KafkaSettings, list[str], str, dict[str, str]]:  # fmt: skip
    """The consumer's settings, command line, ready marker and environment."""
    kafka = base.model_copy(update={"consumer_group": group})
    cfg = workdir / f"{group}.yaml"
    cfg.write_text(
        yaml.safe_dump({"kafka": json.loads(kafka.model_dump_json(exclude_none=True)), "metrics": {"port": 0}})
    )
    data = workdir / f"{group}-data"
    if name == "llmpulse worker":
        cmd = [*pin_prefix(pin_core), sys.executable, "-m", "llmpulse.cli", "-v", "worker", "--config", str(cfg),
               "--data-dir", str(data)]  # fmt: skip
        return kafka, cmd, "llm.calls partitions assigned", ENV
    cmd = [*pin_prefix(pin_core), sys.executable, "-m", "bench.faust_baseline", "worker", "-l", "warn"]
    return kafka, cmd, "baseline ready", {**ENV, "BENCH_CONFIG": str(cfg), "BENCH_DATA_DIR": str(data)}


def worker_run(bootstrap: str, events: int, workdir: Path, pin_core: int | None = 1,
               profile: tuple[Path, int] | None = None) -> dict[str, Any]:  # fmt: skip
    """``llmpulse worker`` alone over a fresh topic (for ``bench.profile``)."""
    tag = f"bench-{int(time.time())}"
    base = _settings(bootstrap, tag, f"{tag}-worker")
    asyncio.run(create_topics(base))
    produced = asyncio.run(_produce(base, events))
    kafka, cmd, marker, env = _consumer("llmpulse worker", base, f"{tag}-worker", workdir, pin_core)
    return _run_consumer(cmd, env, workdir / "worker.log", marker, kafka, kafka.consumer_group, produced,
                         timeout=1800, profile=profile)  # fmt: skip


def run(bootstrap: str, events: int, workdir: Path, pin_core: int | None = 1) -> list[Figure]:
    tag = f"bench-{int(time.time())}"
    base = _settings(bootstrap, tag, f"{tag}-worker")
    asyncio.run(create_topics(base))
    produced = asyncio.run(_produce(base, events))

    # the ceiling, on the core the consumers get (the harness otherwise runs unpinned)
    pinned = pin_core is not None and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1
    affinity = os.sched_getaffinity(0) if pinned else None
    if pinned:
        os.sched_setaffinity(0, {pin_core})
    try:
        raw_rate, raw_cpu = asyncio.run(_raw_consume(base, produced))
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)

    results: dict[str, dict[str, Any]] = {}
    for name, group in (("llmpulse worker", f"{tag}-worker"), ("per-event faust agent", f"{tag}-faust-baseline")):
        kafka, cmd, marker, env = _consumer(name, base, group, workdir, pin_core)
        results[name] = _run_consumer(cmd, env, workdir / f"{group}.log", marker, kafka, group, produced,
                                      timeout=1800)  # fmt: skip

    w, f = results["llmpulse worker"], results["per-event faust agent"]
    return [
        Figure("P2 Kafka→worker→ClickHouse, events/s per worker CPU-second", w["events_per_cpu_s"], "events/s",
               "per-event faust agent", f["events_per_cpu_s"], w["cpu_us_per_event"],
               f"{produced:,} events; wall {w['events_per_s']:,.0f}/s vs {f['events_per_s']:,.0f}/s",
               {"worker": w, "faust_agent": f}),
        Figure("P2 raw aiokafka getmany consume (ceiling)", raw_rate, "events/s", None, None, raw_cpu,
               "decode-free drain of the same topic"),
        Figure("P2 worker wall rate vs raw consume", w["events_per_s"], "events/s", "raw getmany", raw_rate,
               w["cpu_us_per_event"]),
    ]  # fmt: skip
