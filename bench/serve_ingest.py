"""``llmpulse serve`` ingest, measured from another process.

The server runs pinned to core 0 (``taskset``), the load generator (aiohttp, keep-alive, N
concurrent requests, every request retried on 429/503 with the same Idempotency-Key until it is
answered 200) pinned to core 1, so the figure is what one server core sustains. Server CPU time
comes from /proc (chDB's insert threads included): ``events per server CPU-second`` is the honest
per-core cost even where the wall-clock figure is limited by the client.

Figures:
1. ``POST /v1/events`` events/s, batches of 100 and of 1000, embedded (chDB) and Kafka mode;
2. ``POST /v1/traces``: latency of a 1000-span OTLP/HTTP protobuf request (built with the
   OpenTelemetry SDK's own encoder), sequential requests, p50/p95;
3. backpressure: a small ``max_pending_events`` and a flood of concurrent requests: how many 503s
   with which Retry-After, and whether every event answered 200 is in ClickHouse exactly once.

Run: ``python -m bench.serve_ingest [--kafka 127.0.0.1:19092] [--events 200000] [--no-alerting]``.
The server runs with the default configuration, alerting included (the stream's window aggregates
and rules cost CPU on every batch); ``--no-alerting`` measures without them, and every result says
which. Every run is exact-checked afterwards, and the benchmark fails (exit 1) on any difference:
embedded, ``count()`` of ``llm_calls FINAL`` and of its raw rows through the server's read API;
Kafka mode, the messages the run added to the calls topic (the sum of its end offsets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench.common import pin_prefix, proc_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("LLMPULSE_")}, "PYTHONUNBUFFERED": "1"}
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "gemini-2.5-flash")
FEATURES = ("chat", "search", "summarize", "extract", "code", "support", "triage", "translate")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def bodies(run: str, requests: int, batch: int) -> list[bytes]:
    """Realistic calls (~600 bytes each), distinct ids, timestamps within the last two minutes."""
    now = time.time()
    out = []
    n = 0
    for _ in range(requests):
        events = []
        for _ in range(batch):
            events.append({
                "event_id": f"{run}-{n}", "ts": _iso(now - 100 + (n % 60) + (n % 1000) / 1000), "service": run,
                "feature": FEATURES[n % len(FEATURES)], "team": "load", "model": MODELS[n % len(MODELS)],
                "provider": "openai", "input_tokens": 1000 + n % 500, "output_tokens": 200 + n % 100,
                "cached_input_tokens": 100, "latency_ms": 800.0 + n % 300, "ttft_ms": 150.0, "status": "ok",
                "request_id": f"{run}-r{n}", "prompt_version": "v3", "user_id": f"u{n % 997}",
                "trace_id": uuid.uuid4().hex, "params": {"temperature": 0.2, "max_tokens": 512},
            })  # fmt: skip
            n += 1
        out.append(orjson.dumps(events))
    return out


def wait_listening(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    """The URL `llmpulse serve` announces in its log once it listens; raises with the log's end if it exits
    or does not come up in time."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"llmpulse serve did not start:\n{log.read_text(errors='replace')[-4000:]}")


async def load(url: str, key: str, run: str, payloads: list[bytes], concurrency: int) -> dict[str, Any]:
    import aiohttp

    statuses: dict[int, int] = {}
    retry_after: dict[str, int] = {}
    latencies: list[float] = []
    todo = list(range(len(payloads)))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        while todo:
            i = todo.pop()
            while True:
                t0 = time.perf_counter()
                async with session.post(f"{url}/v1/events", data=payloads[i],
                                        headers={**headers, "Idempotency-Key": f"{run}-{i}"}) as resp:  # fmt: skip
                    await resp.read()
                latencies.append(time.perf_counter() - t0)
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if resp.status == 200:
                    break
                if resp.status not in (429, 503):
                    raise RuntimeError(f"request {i}: HTTP {resp.status}")
                ra = resp.headers.get("Retry-After", "1")
                retry_after[ra] = retry_after.get(ra, 0) + 1
                await asyncio.sleep(min(float(ra), 1.0))

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "seconds": seconds, "statuses": statuses, "retry_after": retry_after,
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
    }  # fmt: skip


def _load_main(argv: list[str]) -> None:
    url, key, run, requests, batch, concurrency = argv
    payloads = bodies(run, int(requests), int(batch))
    out = asyncio.run(load(url, key, run, payloads, int(concurrency)))
    out["events"] = int(requests) * int(batch)
    sys.stdout.write(json.dumps(out) + "\n")


# ------------------------------------------------------------------------------------------------


class Mismatch(AssertionError):
    """What was stored or published differs from what the server answered 200 for."""


def expect(what: str, got: Any, want: Any) -> None:
    if got != want:
        raise Mismatch(f"{what}: {got} stored, {want} sent and answered 200")


def published(bootstrap: str) -> int:
    """Messages in the calls topic so far (sum of its partitions' end offsets)."""
    from ingest.kafka import end_offsets
    from schemas.config import KafkaSettings, TopicNames

    return sum(asyncio.run(end_offsets(KafkaSettings(bootstrap_servers=bootstrap), TopicNames().calls)).values())


class Serve:
    def __init__(self, folder: Path, server: dict[str, Any], alerting: bool = True, **extra: Any) -> None:
        self.key = "lpk_bench_" + secrets.token_urlsafe(16)
        keys = folder / "keys.yaml"
        from schemas.server import hash_api_key

        keys.write_text(yaml.safe_dump([{"key_hash": hash_api_key(self.key), "tenant": "bench", "role": "admin"}]))
        self.config = folder / "llmpulse.yaml"
        self.alerting = alerting
        config: dict[str, Any] = {"server": {"port": 0, "keys_file": str(keys), **server}, **extra}
        if not alerting:  # else the default configuration's (on)
            config["alerting"] = {"enabled": False}
        self.config.write_text(yaml.safe_dump(config))
        self.folder = folder
        self.log = folder / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> Serve:
        cmd = [*pin_prefix(0), sys.executable, "-m", "llmpulse.cli", "serve", "--config", str(self.config),
               "--data-dir", str(self.folder / "data")]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        self.url = wait_listening(self.proc, self.log, 120)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)

    def sql(self, query: str) -> Any:
        req = urllib.request.Request(f"{self.url}/v1/query", data=orjson.dumps({"sql": query}), method="POST",
                                     headers={"Authorization": f"Bearer {self.key}"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=120) as resp:
            return orjson.loads(resp.read())["rows"]

    def cpu(self) -> float:
        assert self.proc is not None
        return proc_cpu_seconds(self.proc.pid)


def drive(srv: Serve, run: str, events: int, batch: int, concurrency: int) -> dict[str, Any]:
    requests = events // batch
    cpu0 = srv.cpu()
    proc = subprocess.run(
        [*pin_prefix(1), sys.executable, "-m", "bench.serve_ingest", "load", srv.url, srv.key, run, str(requests),
         str(batch), str(concurrency)],
        capture_output=True, text=True, env=ENV, cwd=ROOT, check=True,
    )  # fmt: skip
    out: dict[str, Any] = json.loads(proc.stdout)
    out["server_cpu_s"] = srv.cpu() - cpu0
    out["events_per_s"] = round(out["events"] / out["seconds"])
    out["events_per_server_cpu_s"] = round(out["events"] / max(out["server_cpu_s"], 1e-9))
    return out


def ingest(folder: Path, events: int, kafka: str | None, alerting: bool) -> list[dict[str, Any]]:
    results = []
    for mode in ("embedded", "kafka") if kafka else ("embedded",):
        bootstrap = kafka if mode == "kafka" else None  # the broker this mode publishes to
        extra: dict[str, Any] = {"kafka": {"bootstrap_servers": bootstrap}} if bootstrap else {}
        sub = folder / mode
        sub.mkdir()
        if bootstrap is not None:
            from ingest.kafka import create_topics
            from schemas.config import KafkaSettings

            asyncio.run(create_topics(KafkaSettings(bootstrap_servers=bootstrap)))
        with Serve(sub, {"mode": mode}, alerting, **extra) as srv:
            # the first run warms up (imports, first parts): checked like the others, not reported
            for i, (batch, concurrency, n) in enumerate(((100, 8, 5000), (100, 64, events), (1000, 16, events))):
                warm_up = i == 0
                run = f"{'warm' if warm_up else 'b'}{batch}-{uuid.uuid4().hex[:6]}"
                before = published(bootstrap) if bootstrap is not None else 0
                r = drive(srv, run, n, batch, concurrency)
                r.update(mode=mode, batch=batch, concurrency=concurrency, alerting=alerting)
                if bootstrap is not None:
                    r["published"] = published(bootstrap) - before
                    expect(f"{run}: messages added to the calls topic", r["published"], r["events"])
                else:
                    (stored,) = srv.sql(f"SELECT (SELECT count() FROM llm_calls FINAL WHERE service = '{run}'), "
                                        f"(SELECT count() FROM llm_calls WHERE service = '{run}')")  # fmt: skip
                    r["stored"], r["stored_rows"] = stored
                    expect(f"{run}: calls in llm_calls FINAL", r["stored"], r["events"])
                    expect(f"{run}: raw rows (nothing written twice)", r["stored_rows"], r["events"])
                if not warm_up:
                    results.append(r)
                print(json.dumps(r), flush=True)
    return results


def otlp_latency(folder: Path, alerting: bool, spans: int = 1000, repeats: int = 20) -> dict[str, Any]:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    (folder / "otlp").mkdir()
    with Serve(folder / "otlp", {"mode": "embedded"}, alerting) as srv:
        times = []
        for r in range(repeats + 2):
            memory = InMemorySpanExporter()
            provider = TracerProvider(resource=Resource.create({"service.name": f"otlp-bench-{r}"}))
            provider.add_span_processor(SimpleSpanProcessor(memory))
            tracer = provider.get_tracer("bench")
            t0 = time.time_ns() - 60 * 10**9
            for i in range(spans):
                tracer.start_span("chat gpt-4o-mini", start_time=t0 + i * 10**6, attributes={
                    "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 1000 + i,
                    "gen_ai.usage.output_tokens": 100, "gen_ai.response.finish_reasons": ["stop"],
                    "app.feature": "bench",
                }).end(end_time=t0 + i * 10**6 + 900_000_000)  # fmt: skip
            body = encode_spans(memory.get_finished_spans()).SerializeToString()
            req = urllib.request.Request(f"{srv.url}/v1/traces", data=body, method="POST", headers={
                "Authorization": f"Bearer {srv.key}", "Content-Type": "application/x-protobuf"})  # fmt: skip
            started = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60) as resp:
                resp.read()
            if r >= 2:  # two warm-up requests
                times.append((time.perf_counter() - started) * 1000)
        (stored,) = srv.sql("SELECT count() FROM llm_calls FINAL WHERE startsWith(service, 'otlp-bench-')")
    times.sort()
    out = {"spans": spans, "bytes": len(body), "requests": repeats, "p50_ms": round(times[len(times) // 2], 1),
           "p95_ms": round(times[int(len(times) * 0.95)], 1), "stored": stored[0],
           "expected": (repeats + 2) * spans, "alerting": alerting}  # fmt: skip
    print(json.dumps(out), flush=True)
    expect("OTLP spans as calls in llm_calls FINAL", out["stored"], out["expected"])
    return out


def backpressure(folder: Path, alerting: bool) -> dict[str, Any]:
    (folder / "bp").mkdir()
    with Serve(folder / "bp", {"mode": "embedded", "max_pending_events": 2000, "max_events_per_request": 1000,
                               "group_commit_max_events": 1000}, alerting) as srv:  # fmt: skip
        run = f"bp-{uuid.uuid4().hex[:6]}"
        r = drive(srv, run, 40_000, 500, 32)
        (stored,) = srv.sql(f"SELECT count(), uniqExact(event_id) FROM llm_calls WHERE service = '{run}'")
        r["stored_rows"], r["stored_ids"] = stored
        r["alerting"] = alerting
    print(json.dumps(r), flush=True)
    expect(f"{run}: raw rows under backpressure", r["stored_rows"], r["events"])
    expect(f"{run}: distinct calls under backpressure", r["stored_ids"], r["events"])
    return r


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_ingest", description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--kafka", default=None, metavar="HOST:PORT", help="also Kafka mode against this broker")
    parser.add_argument("--only", default="ingest,otlp,backpressure", help="ingest, otlp, backpressure")
    parser.add_argument("--no-alerting", dest="alerting", action="store_false",
                        help="run the server with alerting off (default: on, as configured)")  # fmt: skip
    args = parser.parse_args()
    only = {x.strip() for x in args.only.split(",")}
    unknown = only - {"ingest", "otlp", "backpressure"}
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from ingest, otlp, backpressure")
    print(f"llmpulse serve with alerting {'on (the default)' if args.alerting else 'off (--no-alerting)'}",
          file=sys.stderr, flush=True)  # fmt: skip
    out: dict[str, Any] = {"alerting": args.alerting}
    try:
        with tempfile.TemporaryDirectory(prefix="llmpulse-p5-") as tmp:
            if "ingest" in only:
                out["ingest"] = ingest(Path(tmp), args.events, args.kafka, args.alerting)
            if "otlp" in only:
                out["otlp"] = otlp_latency(Path(tmp), args.alerting)
            if "backpressure" in only:
                out["backpressure"] = backpressure(Path(tmp), args.alerting)
    except Mismatch as exc:
        sys.exit(f"FAILED, counts differ: {exc}")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["load"]:
        _load_main(sys.argv[2:])
    else:
        main()
