"""P1: the embedded pipeline, events/s per core, against the raw decode+aggregate loop in the same run.

Three measurements over the same pre-generated synthetic payloads (realistic traffic: prompt
caching, tool calls, feedback events mixed in, unknown fields and models, a few malformed):

1. **raw loop** (the baseline, the lower bound on Python work per event): msgspec decode of
   each payload into a minimal struct, dict sums per (minute, feature, model) and one t-digest
   per key fed per batch. No validation beyond types, no pricing, no output columns, no I/O;
2. **chain only**: ``CallPipeline``/``FeedbackPipeline`` exactly as the runtimes run them
   (validate → dedup → price → content → release → windows → sampling, in parts of
   ``PROCESS_PART`` payloads), no ClickHouse;
3. **embedded runtime**: ``EmbeddedRuntime.ingest`` including the Arrow conversion and the
   chDB inserts (the headline P1 figure).

Everything runs in one child process pinned to one core with ``os.sched_setaffinity`` before
chDB starts, so its insert threads share that core and process CPU time
(``time.process_time``: all threads) is the honest per-core cost.
Run alone: ``python -m bench.p1_embedded --events 200000``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import Figure

BATCH = 10_000


def _payloads(events: int, seed: int = 11) -> tuple[list[list[bytes]], float]:
    """Synthetic traffic spanning ten minutes of event time (live-like window closes), batched."""
    from ingest.synthetic import Scenario, generate

    scenario = Scenario(events=events, days=10 / 1440, seed=seed)
    return list(generate(scenario, BATCH)), scenario.end


def raw_loop(batches: list[list[bytes]]) -> dict[str, float]:
    """The baseline: decode, sum per (minute, feature, model), t-digest per key. Nothing else."""
    import fastdigest
    import msgspec

    class Minimal(msgspec.Struct, gc=False):
        ts: str = ""
        feature: str = ""
        model: str = ""
        input_tokens: int = 0
        output_tokens: int = 0
        latency_ms: float = 0.0
        kind: str = "call"

    decode = msgspec.json.Decoder(Minimal).decode
    sums: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
    digests: dict[tuple[str, str, str], Any] = {}
    n = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for batch in batches:
        pending: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        for raw in batch:
            try:
                e = decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
                continue
            if e.kind != "call":
                continue
            key = (e.ts[:16], e.feature, e.model)
            s = sums[key]
            s[0] += 1
            s[1] += e.input_tokens
            s[2] += e.output_tokens
            s[3] += e.latency_ms
            pending[key].append(e.latency_ms)
            n += 1
        for key, values in pending.items():
            d = digests.get(key)
            if d is None:
                d = digests[key] = fastdigest.TDigest(max_centroids=300)
            d.batch_update(values)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"events": sum(len(b) for b in batches), "calls": n, "cpu_s": cpu, "wall_s": wall, "keys": len(sums)}


def chain_only(batches: list[list[bytes]], now: float) -> dict[str, float]:
    """The processor chain as the runtime drives it, minus the writes."""
    from llmpulse.runtime import PROCESS_PART, pipeline_options, validation_limits
    from processors.chain import CallPipeline, FeedbackPipeline
    from processors.records import PayloadBatch, Source
    from schemas.config import load_settings
    from schemas.prices import builtin_price_table

    settings = load_settings(None, {})
    calls = CallPipeline(builtin_price_table(), pipeline_options(settings))
    feedback = FeedbackPipeline(validation_limits(settings))
    source = Source("bench", "p1-chain")
    offset = accepted = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for payloads in batches:
        batch = PayloadBatch(source, payloads, list(range(offset, offset + len(payloads))))
        offset += len(payloads)
        kinds: dict[str, PayloadBatch] = {}  # as EmbeddedRuntime.ingest: other kinds move aside while calls decode
        for part in batch.split(PROCESS_PART):
            accepted += len(calls.process(part, now, kinds).events)
        if "feedback" in kinds:
            feedback.process(kinds["feedback"], now)
    calls.flush_windows()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"events": offset, "accepted": accepted, "cpu_s": cpu, "wall_s": wall}


def embedded(batches: list[list[bytes]], now: float, data_dir: Path) -> dict[str, float]:
    """``EmbeddedRuntime`` into chDB: what ``llmpulse replay``/``demo`` run, minus the generator."""
    from llmpulse.runtime import EmbeddedRuntime, open_clickhouse
    from processors.records import PayloadBatch, Source
    from schemas.config import load_settings

    settings = load_settings(None, {"data_dir": data_dir, "alerting": {"enabled": False}})
    conn = open_clickhouse(settings, purpose="bench p1")
    runtime = EmbeddedRuntime(settings, conn)
    source = Source("bench", "p1")
    offset = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for payloads in batches:
        runtime.ingest(PayloadBatch(source, payloads, list(range(offset, offset + len(payloads)))), now=now)
        runtime.tick()
        offset += len(payloads)
    runtime.finish()
    runtime.close()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    rows = int(conn.client.command("SELECT count() FROM llm_calls"))  # type: ignore[arg-type]
    conn.close()
    return {"events": offset, "rows": rows, "cpu_s": cpu, "wall_s": wall,
            "accepted": runtime.stats.counters.accepted}  # fmt: skip


def measure(events: int, core: int | None, data_dir: Path) -> dict[str, Any]:
    """In this process: generate, pin, warm up, then the three measurements (best of ``repeat``)."""
    from llmpulse.runtime import tune_gc

    batches, now = _payloads(events)
    warm, _ = _payloads(20_000, seed=5)
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    tune_gc()
    gc.collect()
    gc.freeze()  # the pre-generated payload lists are not the pipeline's garbage to scan
    raw_loop(warm)
    chain_only(warm, now)
    out = {"raw": raw_loop(batches), "chain": chain_only(batches, now)}
    out["embedded"] = embedded(batches, now, data_dir)
    out["pinned_core"] = core
    return out


def run(events: int, workdir: Path, pin_core: int | None = 0) -> list[Figure]:
    """Run ``measure`` in a fresh child process (chDB hosts one engine per process) and report."""
    out = workdir / "p1.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.p1_embedded", "--events", str(events), "--data-dir", str(workdir / "p1-data"),
         "--json-out", str(out), *([] if pin_core is None else ["--core", str(pin_core)])],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"bench.p1_embedded failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return figures(json.loads(out.read_text()))


def figures(r: dict[str, Any]) -> list[Figure]:
    raw, chain, emb = r["raw"], r["chain"], r["embedded"]
    n = emb["events"]
    per_core = n / emb["cpu_s"]
    chain_rate = chain["events"] / chain["cpu_s"]
    raw_rate = raw["events"] / raw["cpu_s"]
    pinned = f"pinned to core {r['pinned_core']}" if r["pinned_core"] is not None else "not pinned"
    return [
        Figure("P1 embedded runtime → chDB, events/s per core", per_core, "events/s", "raw decode+aggregate loop",
               raw_rate, emb["cpu_s"] / n * 1e6,
               f"{n:,} events ({emb['rows']:,} rows written), wall {n / emb['wall_s']:,.0f}/s, {pinned}; "
               "process CPU incl. chDB insert threads", {"embedded": emb, "raw": raw}),
        Figure("P1 processor chain only (no ClickHouse), events/s per core", chain_rate, "events/s",
               "raw decode+aggregate loop", raw_rate, chain["cpu_s"] / chain["events"] * 1e6,
               "validate→dedup→price→content→release→windows→sampling; raw loop "
               f"{raw['cpu_s'] / raw['events'] * 1e6:.2f} µs/event", {"chain": chain}),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.p1_embedded", description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--core", type=int, default=None, help="pin to this core (os.sched_setaffinity)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmpulse-p1-") as tmp:
        result = measure(args.events, args.core, args.data_dir or Path(tmp))
    text = json.dumps(result, indent=2)
    if args.json_out:
        args.json_out.write_text(text)
    else:
        print(text)
        for f in figures(result):
            base = f"baseline {f.baseline_value:,.0f}"
            print(f"{f.name}: {f.value:,.0f} {f.unit} ({base}); {f.cpu_us_per_event:.2f} µs/event")


if __name__ == "__main__":
    main()
