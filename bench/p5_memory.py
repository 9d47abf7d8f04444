"""P5: pipeline RSS with 10k live scope keys, and over a long soak (flat, not growing).

What could grow without bound in a long-running pipeline: open windows (one aggregate per scope
key per window), the dedup horizon, sketches, the write buffer, the sampler's per-feature state.
Each is bounded by design; this measures it. A child process (pinned to one core) runs the same
processors and writer the worker runs, over traffic with 10,000 distinct scope keys live in every
window, writing to chDB; it reports RSS and CPU time every ``SAMPLE`` events. Event time advances
so windows open and close all along, as they would for days of traffic.

Figures: RSS once 10k keys are live (after warm-up), the RSS growth over the second half of the
soak (the "not growing" claim: a slope of about 0 MB per million events once the dedup horizon
is full), and CPU µs per event. Size: LLMPULSE_P5_EVENTS (default 3,000,000, ~90 s; the issue's
soak is 10,000,000).

The Kafka worker adds aiokafka fetch buffers (bounded by ``fetch_max_bytes``) on top of this; its
behaviour under a stalled sink (intake stops, RSS flat) is in tests/reliability/test_sink_outage.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import Figure, pin_prefix

KEYS = 10_000
"""Distinct (feature, team, model, prompt_version) scope keys, all live in every window."""
SAMPLE = 100_000
EVENTS_PER_MINUTE = 40_000
"""Event time advances one minute per this many events: every minute sees all 10k keys."""
BATCH = 10_000


MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "claude-haiku-4-5")


def payload(i: int, start_ts: float) -> bytes:
    """Event ``i`` of the soak: scope key ``i % KEYS``, event time one minute per EVENTS_PER_MINUTE."""
    import time

    import orjson

    key = i % KEYS
    ts = start_ts + (i / EVENTS_PER_MINUTE) * 60
    return orjson.dumps({
        "event_id": f"p5-{i}", "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + "Z",
        "feature": f"feature-{key % 2500}", "team": f"team-{key % 25}", "model": MODELS[key // 2500],
        "prompt_version": f"v{key % 4}", "input_tokens": 400 + i % 700, "output_tokens": 80 + i % 300,
        "latency_ms": 200.0 + i % 3000, "status": "ok",
    })  # fmt: skip


def _child(data_dir: str, events: int) -> None:
    """Runs in the pinned child: the embedded pipeline over synthetic traffic, RSS/CPU samples on stdout."""
    import gc
    import time

    from bench.common import proc_cpu_seconds, proc_rss_mb
    from llmpulse.runtime import EmbeddedRuntime, open_clickhouse
    from processors.records import PayloadBatch, Source
    from schemas.config import load_settings

    settings = load_settings(None, {"data_dir": data_dir})
    conn = open_clickhouse(settings, purpose="bench p5")
    runtime = EmbeddedRuntime(settings, conn)
    pid = os.getpid()
    start_ts = time.time() - 86_400 * 3  # three days ago onwards: inside retention, never in the future
    source = Source("bench", "p5")
    offset = 0
    started = time.perf_counter()
    cpu0 = proc_cpu_seconds(pid)
    while offset < events:
        payloads = [payload(i, start_ts) for i in range(offset, min(events, offset + BATCH))]
        ts = start_ts + (offset + len(payloads)) / EVENTS_PER_MINUTE * 60
        runtime.ingest(PayloadBatch(source, payloads, list(range(offset, offset + len(payloads)))), now=ts + 60)
        runtime.tick()
        offset += len(payloads)
        if offset % SAMPLE == 0 or offset >= events:
            gc.collect()
            sample = {"events": offset, "rss_mb": proc_rss_mb(pid), "cpu_s": proc_cpu_seconds(pid) - cpu0,
                      "wall_s": time.perf_counter() - started,
                      "live_keys": sum(len(k) for k in runtime.calls.windows._open.values())}  # fmt: skip
            print(json.dumps(sample), flush=True)
    runtime.finish()
    runtime.close()
    conn.close()


def run(tmp: Path, events: int | None = None, pin_core: int | None = 1) -> list[Figure]:
    events = events or int(os.environ.get("LLMPULSE_P5_EVENTS", "3000000"))
    tmp.mkdir(parents=True, exist_ok=True)
    code = f"from bench.p5_memory import _child; _child({str(tmp / 'p5')!r}, {events})"
    proc = subprocess.run(
        [*pin_prefix(pin_core), sys.executable, "-c", code],
        capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"P5 child failed:\n{proc.stderr[-3000:]}")
    samples: list[dict[str, Any]] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return figures(samples, events)


DEDUP_HORIZON = 1_000_000
"""pipeline.dedup_capacity: the dedup step remembers this many event ids, so RSS rises until that
many events have passed; only after it may the soak be flat."""


def figures(samples: list[dict[str, Any]], events: int) -> list[Figure]:
    """Steady state starts once the dedup horizon is full (or at half the run, if shorter); the
    "not growing" figure is the least-squares RSS slope over the steady samples (chDB's own caches
    make single samples jump by tens of MB either way, so end-minus-start would be noise)."""
    steady_from = DEDUP_HORIZON if events >= 2 * DEDUP_HORIZON else events // 2
    steady = [s for s in samples if s["events"] >= steady_from] or samples[-2:]
    xs = [s["events"] / 1e6 for s in steady]
    ys = [s["rss_mb"] for s in steady]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    median = sorted(ys)[len(ys) // 2]
    last = samples[-1]
    cpu_us = last["cpu_s"] / last["events"] * 1e6
    live = max(s["live_keys"] for s in samples)
    return [
        Figure("P5 pipeline RSS, 10k live scope keys (steady, median)", median, "MB", cpu_us_per_event=cpu_us,
               notes=f"{min(ys):,.0f}–{max(ys):,.0f} MB from {steady_from:,} to {events:,} events; up to {live:,} "
                     f"live (window, key) aggregates; {last['events'] / last['wall_s']:,.0f} events/s, one core",
               extra={"rss_mb_trace": [round(s["rss_mb"]) for s in samples], "samples": samples}),
        Figure("P5 RSS slope over the soak (steady state)", slope, "MB per 1M events",
               notes=f"least squares over {len(steady)} samples, {steady_from:,} → {events:,} events; "
                     f"before: {samples[0]['rss_mb']:,.0f} MB at {samples[0]['events']:,} events"),
    ]  # fmt: skip


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llmpulse-p5-") as d:
        for f in run(Path(d), int(sys.argv[1]) if len(sys.argv) > 1 else None):
            print(f.name, round(f.value, 1), f.unit, f.notes)
