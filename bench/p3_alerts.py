"""P3: what alerting costs the stream, and how fast an alert reaches a webhook.

* overhead: the embedded runtime (chain and chDB writes) with and without stage-2 evaluation of
  50 rules over 10k live scope keys, same events, fresh pinned processes alternated;
* worker overhead: the same with ``llmpulse worker`` draining Kafka (what the issue measures:
  alert evaluation's share of worker throughput);
* latency: the time from stage 2 finding a window final (its watermark passed the window's end
  plus allowed lateness) to a local webhook receiving the alert, for a burst of alerts; and the
  same through ``llmpulse worker``, from sending the event that closes the window.
"""

from __future__ import annotations

import asyncio
import http.server
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import Figure, pin_prefix
from ingest.kafka import create_topics
from ingest.sdk import DEFAULT_COMPRESSION
from llmpulse.alerting import AlertPipeline
from llmpulse.runtime import EmbeddedRuntime, open_clickhouse, pipeline_options, tune_gc
from processors.alerts.engine import history_len
from processors.chain import CallPipeline
from processors.records import PayloadBatch, Source
from schemas.config import load_settings
from schemas.prices import builtin_price_table
from schemas.rules import is_rate, parse_rules

METRICS = ("error_rate", "refusal_rate", "latency_p95_ms", "ttft_p95_ms", "cost_usd", "output_tokens_avg",
           "latency_p50_ms", "calls", "cost_per_call_usd", "timeout_rate")  # fmt: skip
SCOPES = (["feature"], ["model"], ["feature", "model"], ["team"], ["provider"])


WINDOWS = ("1m", "5m", "15m", "1h")
"""A rule set's usual mix; ``windows=("1m",)`` is the worst case (every rule evaluated every minute)."""


def fifty_rules(windows: tuple[str, ...] = WINDOWS) -> Any:
    return parse_rules(fifty_rule_dicts(windows), "bench")


def fifty_rule_dicts(windows: tuple[str, ...] = WINDOWS) -> dict[str, Any]:
    """The rules file P3 evaluates: 10 metrics × 5 scopes, half thresholds, half spikes, none firing."""
    rules = []
    for i, metric in enumerate(METRICS):
        for j, scope in enumerate(SCOPES):
            rule: dict[str, Any] = {
                "name": f"r{i}-{j}", "metric": metric, "scope": scope, "min_calls": 5,
                "window": windows[(i + j) % len(windows)],
            }  # fmt: skip
            if (i + j) % 2:
                rule["spike"] = {"ratio": 3.0, "baseline": 12, "min_baseline": 6}
            else:
                # evaluated every window, never fires: pure evaluation cost (a rate is at most 1)
                rule["max"] = 1.0 if is_rate(metric) else 1e9
            rules.append(rule)
    return {"rules": rules}


def events(n: int, keys: int, start: float, span_s: float) -> list[bytes]:
    out = []
    for i in range(n):
        k = i % keys
        out.append(orjson.dumps({
            "event_id": f"b{i}", "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + i * span_s / n)) + "Z",
            "feature": f"f{k // 5}", "team": f"t{k % 40}", "model": ("gpt-4o", "gpt-4o-mini", "claude-haiku-4-5",
            "claude-sonnet-4-5", "gemini-2.5-flash")[k % 5], "input_tokens": 800, "output_tokens": 120,
            "latency_ms": 900.0 + (i % 97), "ttft_ms": 300.0, "status": "ok", "refusal": i % 50 == 0,
        }))  # fmt: skip
    return out


def _overhead_child(data_dir: str, with_alerts: bool, n: int, keys: int, span_s: float, windows: str,
                    start: float, now: float) -> None:  # fmt: skip
    """One measured run in a fresh process (fresh chDB: no background merges of another run's
    data on the clock); prints {"cpu_s", "evaluated"}."""
    tune_gc()
    settings = load_settings(None, {"data_dir": data_dir, "pipeline": {"allowed_lateness": "5s"}})
    payloads = events(n, keys, start, span_s)
    rules = fifty_rules(tuple(windows.split(",")))
    assert len(rules.rules) == 50
    conn = open_clickhouse(settings, purpose="bench p3")
    alerts = AlertPipeline(settings, conn, rules=rules, channels=[]) if with_alerts else None
    runtime = EmbeddedRuntime(settings, conn, alerts=alerts)
    t0 = time.process_time()
    for i in range(0, n, 10_000):
        batch = PayloadBatch(Source("bench", "p3"), payloads[i : i + 10_000], list(range(i, i + 10_000)))
        runtime.ingest(batch, now=now, mixed=False)
    runtime.finish()
    runtime.close()
    spent = time.process_time() - t0
    evaluated = alerts.windows.evaluated_windows if alerts else 0
    if alerts is not None:
        alerts.close()
    conn.close()
    print(orjson.dumps({"cpu_s": spent, "evaluated": evaluated}).decode())


def overhead(
    data_dir: Path, n: int = 600_000, keys: int = 10_000, span_s: float = 30.0, windows: tuple[str, ...] = WINDOWS,
    repeat: int = 3, pin_core: int | None = 1,
) -> Figure:  # fmt: skip
    """The embedded runtime (processing and ClickHouse writes: the worker's work minus Kafka) with
    and without stage-2 evaluation, each run in a fresh process pinned to one core, alternated
    ``repeat`` times; the medians are compared. Events arrive at ``n / span_s`` per second of event
    time (20k/s by default: what one worker core sustains here), so rule windows close as often per
    event as they would live."""
    now = time.time()
    # the same alignment every run: the span starts 15 s before minute 11 of an hour two hours ago,
    # so it crosses one 1m boundary and no 5m/15m/1h one (which windows close decides how many
    # rule windows are evaluated, and so the figure)
    start = (now - 7200) // 3600 * 3600 + 11 * 60 - 15
    runs: dict[bool, list[float]] = {False: [], True: []}
    evaluated = 0
    for i in range(repeat):
        for with_alerts in (False, True):
            folder = data_dir / f"run-{i}-{int(with_alerts)}"
            code = (f"from bench.p3_alerts import _overhead_child; _overhead_child({str(folder)!r}, {with_alerts}, "
                    f"{n}, {keys}, {span_s}, {','.join(windows)!r}, {start}, {now})")  # fmt: skip
            proc = subprocess.run([*pin_prefix(pin_core), sys.executable, "-c", code], capture_output=True, text=True,
                                  check=False)  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"P3 run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            out = orjson.loads(proc.stdout.strip().splitlines()[-1])
            runs[with_alerts].append(out["cpu_s"])
            evaluated = max(evaluated, out["evaluated"])
    base, with_alerts_cpu = statistics.median(runs[False]), statistics.median(runs[True])
    pct = (with_alerts_cpu - base) / base * 100
    return Figure(
        f"P3 alert evaluation overhead (50 rules over {'/'.join(windows)} windows, 10k scope keys)", pct,
        "% of embedded runtime CPU",
        None, None, with_alerts_cpu / n * 1e6,
        f"{n:,} events over {span_s:.0f} s of event time, {evaluated:,} rule windows evaluated; "
        f"median CPU µs/event of {repeat} fresh pinned processes each: {base / n * 1e6:.2f} without, "
        f"{with_alerts_cpu / n * 1e6:.2f} with alerting (chDB's insert threads included)",
        {"without_cpu_s": runs[False], "with_cpu_s": runs[True]},
    )  # fmt: skip


class _Receiver:
    def __init__(self) -> None:
        got = self.got = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                got.append((time.time(), orjson.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/alert"


def latency(data_dir: Path, alerts_n: int = 200) -> Figure:
    from schemas.channels import WebhookChannelConfig

    settings = load_settings(None, {"data_dir": data_dir})
    conn = open_clickhouse(settings, purpose="bench p3 latency")
    receiver = _Receiver()
    rules = parse_rules({"rules": [{"name": "calls-seen", "metric": "calls", "scope": ["feature"], "max": 0,
                                    "min_calls": 1}]}, "bench")  # fmt: skip
    hook = WebhookChannelConfig(name="hook", type="webhook", url=receiver.url)
    alerts = AlertPipeline(settings, conn, rules=rules, channels=[hook])
    pipeline = CallPipeline(builtin_price_table(), pipeline_options(settings))
    now = time.time()
    start = now - now % 60 - 120
    payloads = [
        orjson.dumps({"event_id": f"l{i}", "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + 1)) + "Z",
                      "feature": f"f{i}", "model": "gpt-4o", "input_tokens": 1, "output_tokens": 1,
                      "latency_ms": 1.0, "status": "ok"})
        for i in range(alerts_n)
    ]  # fmt: skip
    out = pipeline.process(PayloadBatch(Source("bench", "lat"), payloads, list(range(alerts_n))), now)
    partials = out.partials + pipeline.flush_windows()
    closed_at = time.time()  # the watermark passes the window's end here: evaluation and delivery both count
    alerts.on_partials(partials, -1, start + 60)
    deadline = time.time() + 30
    while len(receiver.got) < alerts_n and time.time() < deadline:
        time.sleep(0.01)
    delays = sorted((t - closed_at) * 1000 for t, _ in receiver.got)
    alerts.close()
    receiver.server.shutdown()
    conn.close()
    if len(delays) < alerts_n:
        raise RuntimeError(f"P3 latency: {len(delays)} of {alerts_n} alerts reached the webhook within 30 s")
    p50 = statistics.median(delays)
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    return Figure(
        "P3 alert latency: window closed in stage 2 → webhook received (p50)", p50, "ms", None, None, None,
        f"p99 {p99:.0f} ms over a burst of {len(delays)} alerts",
        {"p50_ms": p50, "p99_ms": p99, "alerts": len(delays)},
    )  # fmt: skip


def worker_latency(
    bootstrap: str, workdir: Path, alerts_n: int = 200, core: int | None = 1, batch_max_seconds: float | None = None
) -> Figure:
    """Window close → webhook through ``llmpulse worker``, the distributed path, with default timings.

    A burst of calls for one past minute, one feature each, is drained first; then one call per
    feature, timed past the minute's end plus allowed lateness, is produced (so every partition's
    watermark passes it) and the clock starts before that send. Counted until each feature's alert
    is received: the worker's fetch and batch interval, stage 1 closing the window and publishing
    its partials (after the batch's rows are durable, so at least once per ``batch_max_seconds``),
    the partials topic, stage 2's evaluation and the dispatcher's delivery.
    """
    import yaml

    from bench.p2_kafka import ENV, _lag, _settings

    tag = f"bench-p3l-{int(time.time())}"
    kafka = _settings(bootstrap, tag, f"{tag}-g")
    asyncio.run(create_topics(kafka))
    receiver = _Receiver()
    workdir.mkdir(parents=True, exist_ok=True)
    rules = workdir / "rules-latency.yaml"
    rules.write_text(yaml.safe_dump({"rules": [{"name": "calls-seen", "metric": "calls", "scope": ["feature"],
                                                "window": "1m", "max": 0, "min_calls": 1}]}))  # fmt: skip
    cfg = workdir / "worker-latency.yaml"
    cfg.write_text(yaml.safe_dump({
        "kafka": orjson.loads(kafka.model_dump_json(exclude_none=True)), "metrics": {"port": 0},
        "alerting": {"rules_path": str(rules), "channels": {"hook": {"type": "webhook", "url": receiver.url}}},
        **({} if batch_max_seconds is None else {"pipeline": {"batch_max_seconds": batch_max_seconds}}),
    }))  # fmt: skip
    pipeline = load_settings(cfg, {}).pipeline
    now = time.time()
    start = now - now % 60 - 600

    def calls(ts: float, prefix: str) -> list[bytes]:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + "Z"
        return [orjson.dumps({"event_id": f"{prefix}{i}", "ts": stamp, "feature": f"f{i}", "model": "gpt-4o",
                              "input_tokens": 1, "output_tokens": 1, "latency_ms": 1.0, "status": "ok"})
                for i in range(alerts_n)]  # fmt: skip

    asyncio.run(_produce_keyed(bootstrap, kafka.topics.calls, calls(start + 1, "burst-")))
    log = workdir / "worker-latency.log"
    cmd = [*pin_prefix(core), sys.executable, "-m", "llmpulse.cli", "-v", "worker", "--config", str(cfg),
           "--data-dir", str(workdir / "latency-data")]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV)
        try:
            deadline = time.time() + 120
            while "partitions assigned" not in log.read_text() or asyncio.run(_lag(kafka, kafka.consumer_group)) > 0:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the worker did not drain the burst; see {log}")
                time.sleep(0.2)
            closing = calls(start + 60 + pipeline.allowed_lateness + 1, "close-")
            closed_at = asyncio.run(_send_timed(bootstrap, kafka.topics.calls, closing))

            def fired() -> list[float]:
                return [t for t, body in list(receiver.got) if body.get("state") == "firing"]

            deadline = time.time() + 60
            while len(fired()) < alerts_n and time.time() < deadline:
                time.sleep(0.01)
        finally:
            proc.terminate()
            proc.wait(60)
            receiver.server.shutdown()
    got = fired()
    if len(got) < alerts_n:
        raise RuntimeError(f"P3 worker latency: {len(got)} of {alerts_n} alerts reached the webhook; see {log}")
    delays = sorted((t - closed_at) * 1000 for t in got)
    if delays[0] <= 0:  # the window closed before the closing events (e.g. an idle partition's wall clock)
        raise RuntimeError(f"P3 worker latency: an alert arrived {-delays[0]:.0f} ms before the window was closed")
    p50 = statistics.median(delays)
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    return Figure(
        f"P3 alert latency through llmpulse worker (batches of ≤ {pipeline.batch_max_seconds:g} s): "
        "window-closing event sent → webhook received (p50)", p50, "ms",
        None, None, None,
        f"p99 {p99:.0f} ms over a burst of {len(delays)} alerts; batch_max_seconds {pipeline.batch_max_seconds:g}",
        {"p50_ms": p50, "p99_ms": p99, "alerts": len(delays)},
    )  # fmt: skip


async def _send_timed(bootstrap: str, topic: str, payloads: list[bytes]) -> float:
    """Send keyed by feature with a producer already connected; the time just before the first send."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        started = time.time()
        futures = [await producer.send(topic, p, key=orjson.loads(p)["feature"].encode()) for p in payloads]
        await asyncio.gather(*futures)
        return started
    finally:
        await producer.stop()


async def _produce_keyed(bootstrap: str, topic: str, payloads: list[bytes]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=50, max_batch_size=1 << 20,
                                compression_type=DEFAULT_COMPRESSION)  # fmt: skip
    await producer.start()
    try:
        for i in range(0, len(payloads), 10_000):
            chunk = payloads[i : i + 10_000]
            futures = [await producer.send(topic, p, key=orjson.loads(p)["feature"].encode()) for p in chunk]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


def worker_overhead(
    bootstrap: str, workdir: Path, n: int = 2_400_000, keys: int = 10_000, rate: float = 20_000.0,
    repeat: int = 2,
) -> list[Figure]:  # fmt: skip
    """What the issue asks: alert evaluation's share of *worker* throughput.

    ``llmpulse worker`` drains one topic of P3's events (keyed by feature, 4 partitions; ``rate``
    events per second of event time over whole minutes, two by default: 20k/s is about what one
    worker core sustains, so minutes close as often per event as they would live) three ways:
    ``alerting.enabled`` false, and true with the 50 rules over mixed windows and over 1m windows
    only. The same rules file is loaded each time, so stage 1 publishes the same partials: the
    difference is stage 2 (reading the partials topic, merging, evaluating, keeping state).

    Runs are paired: a worker with alerting off and one with it on drain the topic at the same
    time, each pinned to one of the two cores, and swap cores on the next repeat. This machine's
    CPU time per event drifts by ±12% between runs minutes apart (23.6 to 29.1 µs/event for one
    configuration), more than the difference sought, and a drift hits both workers of a pair
    alike; so the on-against-off figure is the median of per-pair ratios. Each repeat runs the
    pairs (off, 1m) and (mixed, off). Each run gets its own consumer group and data directory
    and is counted until the calls are drained and stage 2 has drained the partials of the final
    idle flush. Stage 2's own CPU (the worker measures its thread time around stage 2's work and
    logs it at shutdown) against the rest of the same run's CPU is the second measure.

    The 1m-only figure is the faithful worst case (every minute closes one window per rule, as
    live). The mixed figure overstates: the final flush closes the 5m/15m/1h windows too, once
    each, where two live minutes close 0.4, 0.13 and 0.03 of them.
    """
    from concurrent.futures import ThreadPoolExecutor

    import yaml

    from bench.p2_kafka import ENV, _run_consumer, _settings

    tag = f"bench-p3w-{int(time.time())}"
    base = _settings(bootstrap, tag, f"{tag}-g")
    asyncio.run(create_topics(base))
    now = time.time()
    start = (now - 7200) // 3600 * 3600 + 11 * 60  # whole minutes from minute 11: no 5m boundary inside
    asyncio.run(_produce_keyed(bootstrap, base.topics.calls, events(n, keys, start, n / rate)))
    workdir.mkdir(parents=True, exist_ok=True)
    variants = {"off": WINDOWS, "mixed": WINDOWS, "1m": ("1m",)}
    for name, windows in variants.items():
        (workdir / f"rules-{name}.yaml").write_text(yaml.safe_dump(fifty_rule_dicts(windows)))

    def one(name: str, group: str, core: int) -> dict[str, Any]:
        # the calls topic is shared; every other topic is the run's own (a later run's stage 2
        # must not read an earlier run's partials)
        own = {k: f"{group}.{v}" for k, v in base.topics.model_dump().items() if k != "calls"}
        kafka = base.model_copy(update={"consumer_group": group, "topics": base.topics.model_copy(update=own)})
        asyncio.run(create_topics(kafka))
        cfg = workdir / f"{group}.yaml"
        cfg.write_text(yaml.safe_dump({
            "kafka": orjson.loads(kafka.model_dump_json(exclude_none=True)), "metrics": {"port": 0},
            # idle_timeout outlasts start-up (a partition whose first fetch came later would go
            # idle, jump to the wall clock and count its backlog late) and precedes the final flush
            "pipeline": {"allowed_lateness": "5s", "idle_timeout": f"{IDLE_S:.0f}s"},
            "alerting": {"enabled": name != "off", "rules_path": str(workdir / f"rules-{name}.yaml")},
        }))  # fmt: skip
        cmd = [*pin_prefix(core), sys.executable, "-m", "llmpulse.cli", "-v", "worker", "--config", str(cfg),
               "--data-dir", str(workdir / f"{group}-data")]  # fmt: skip
        drained = (group, base.topics.calls) if name == "off" else (f"{group}-alerts", kafka.topics.partials)
        log = workdir / f"{group}.log"
        run = _run_consumer(cmd, ENV, log, "llm.calls partitions assigned", kafka, group, n, timeout=1800,
                            then=(IDLE_S + 4.0, *drained))  # fmt: skip
        text = log.read_text(errors="replace")
        late = LATE_LOG.search(text)
        if late is None or int(late[1].replace(",", "")):
            raise RuntimeError(f"late events in a P3w run would leave windows out of the figure; see {log}")
        run["core"] = core
        if name != "off":
            found = STAGE2_LOG.search(text)
            if found is None:
                raise RuntimeError(f"the worker did not report its stage-2 CPU; see {log}")
            run["stage2_cpu_s"], run["partials"], run["rule_windows"] = (float(found[1]), int(found[2]),
                                                                          int(found[3]))  # fmt: skip
            # what stage 2 adds to the rest of the worker's work, both from this one run
            run["share_pct"] = run["stage2_cpu_s"] / (run["cpu_s"] - run["stage2_cpu_s"]) * 100
        return run

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    pairs: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {"1m": [], "mixed": []}
    with ThreadPoolExecutor(2) as pool:
        for i in range(repeat):
            for first, second in (("off", "1m"), ("mixed", "off")):
                cores = (i % 2, 1 - i % 2)
                futures = [pool.submit(one, name, f"{tag}-{i}-{name}-{first}{second}", core)
                           for name, core in zip((first, second), cores, strict=True)]  # fmt: skip
                done = dict(zip((first, second), (f.result() for f in futures), strict=True))
                for name, run in done.items():
                    runs[name].append(run)
                on = "1m" if "1m" in done else "mixed"
                pairs[on].append((done["off"], done[on]))
    off = statistics.median(r["cpu_us_per_event"] for r in runs["off"])

    def each(name: str) -> str:
        return ", ".join(f"{r['cpu_us_per_event']:.2f}" for r in runs[name])

    def paired(name: str) -> list[float]:
        return [(b["cpu_us_per_event"] / a["cpu_us_per_event"] - 1) * 100 for a, b in pairs[name]]

    added = paired("1m")
    on_1m = statistics.median(r["cpu_us_per_event"] for r in runs["1m"])
    figures = [Figure(
        f"P3 worker: alerting on adds to worker CPU per event (50 rules, 1m windows, {keys // 1000}k keys; "
        "paired with alerting off at the same time)",
        statistics.median(added), "%", "alerting off, the same events, same time, other core", off, on_1m,
        f"per pair: {', '.join(f'{x:+.1f}%' for x in added)} (median of {repeat}); off {each('off')}; "
        f"on {each('1m')} µs CPU/event. Everything alerting costs the worker: stage 2's own work, reading the "
        "partials topic, what sharing the process costs stage 1",
        {"pairs_pct": added, "alerting_off": runs["off"], "alerting_on": runs["1m"]},
    )]  # fmt: skip
    for name, label in (("mixed", "1m/5m/15m/1h"), ("1m", "1m only")):
        on = statistics.median(r["cpu_us_per_event"] for r in runs[name])
        share = statistics.median(r["share_pct"] for r in runs[name])
        stage2_us = statistics.median(r["stage2_cpu_s"] / n * 1e6 for r in runs[name])
        figures.append(Figure(
            f"P3 worker: stage 2's own CPU against the rest of the worker's (50 rules over {label}, "
            f"{keys // 1000}k scope keys)",
            share, "%", None, None, stage2_us,
            f"stage 2 {stage2_us:.2f} of {on:.2f} µs CPU/event, same run (medians of {repeat}; "
            f"{runs[name][0]['partials']:,} partials, {runs[name][0]['rule_windows']:,} rule windows); "
            f"{n:,} events through Kafka at {rate:,.0f}/s of event time; whole worker against alerting off "
            f"at the same time: {', '.join(f'{x:+.1f}%' for x in paired(name))}",
            {"alerting_on": runs[name], "pairs_pct": paired(name)},
        ))  # fmt: skip
    return figures


IDLE_S = 15.0
LATE_LOG = re.compile(r"worker stopped: .*?; ([\d,]+) late;")
STAGE2_LOG = re.compile(r"stage 2 \(alert evaluation\): ([0-9.]+) s CPU for (\d+) partials, (\d+) rule windows")


def stage2_messages(
    n: int, keys: int, rate: float, windows: tuple[str, ...], sources: int = 4
) -> tuple[Any, list[tuple[int, int, bytes]]]:
    """What the worker's stage 2 reads for P3w's events: stage 1 run in-process per source
    partition (keyed by feature, as the calls topic is), its partials encoded exactly as the
    worker publishes them, a watermark heartbeat after every batch, and a final advance past the
    last minute (the worker's idle flush). Returns (rules, [(partials partition, offset, value)])."""
    import zlib

    from llmpulse.runtime import price_table
    from processors.alerts.stage2 import sketches_read
    from sinks.kafka import partial_messages

    settings = load_settings(None, {"pipeline": {"allowed_lateness": "5s"}})
    rules = fifty_rules(windows)
    prices, options = price_table(settings), pipeline_options(settings, rules)
    scopes = tuple(sorted(rules.scope_dims))
    now = time.time()
    start = (now - 7200) // 3600 * 3600 + 11 * 60
    by_source: dict[int, list[bytes]] = {p: [] for p in range(sources)}
    for payload in events(n, keys, start, n / rate):
        by_source[zlib.crc32(orjson.loads(payload)["feature"].encode()) % sources].append(payload)
    pipes = {p: CallPipeline(prices, options, partition=p) for p in range(sources)}
    out: list[tuple[int, int, bytes]] = []

    def emit(p: int, partials: list[Any], watermark: float) -> None:
        for key, value in partial_messages(partials, scopes, p, watermark, sketches_read(rules.rules)):
            out.append((zlib.crc32(key) % sources, len(out), value))
        heartbeat = orjson.dumps({"type": "watermark", "partition": p, "watermark": watermark})
        out.extend((target, len(out), heartbeat) for target in range(sources))

    step = 5_000
    for i in range(0, max(len(b) for b in by_source.values()), step):
        for p, payloads in by_source.items():
            if chunk := payloads[i : i + step]:
                processed = pipes[p].process(PayloadBatch(Source("kafka", "p3s", p), chunk, list(range(len(chunk)))),
                                             now)  # fmt: skip
                emit(p, processed.partials, processed.watermark)
    end = start + n / rate + 60
    for p, pipe in pipes.items():
        emit(p, pipe.windows.advance(end), end)
    return rules, out


def _replay(pipeline: AlertPipeline, messages: list[tuple[int, int, bytes]]) -> float:
    """Stage 2's thread CPU over the messages, handed over as the worker's ``getmany`` does."""
    pipeline.stage2.listen_on({partition for partition, _, _ in messages})  # what the worker's assignment gives
    began = time.thread_time()
    for j in range(0, len(messages), 5_000):
        pipeline.on_wire(messages[j : j + 5_000])
        pipeline.evaluate()
        pipeline.stage2.pinned_offsets()
    return time.thread_time() - began


def _warm(engine: Any) -> dict[Any, Any]:
    """Every spike and absence baseline filled to its length (with its latest window): what a
    worker that ran for hours holds. A 2-minute run never fills one, so P3w's spike rules
    are all still learning and skip the baseline arithmetic."""
    for (name, _), st in engine.states.items():
        keep = history_len(engine.rules[name])
        if st.history and keep > 1:
            st.history.extend([st.history[-1]] * (keep - len(st.history)))
    return engine.states


def stage2_replay(data_dir: Path, n: int = 2_400_000, keys: int = 10_000, rate: float = 20_000.0,
                  repeat: int = 3) -> list[Figure]:  # fmt: skip
    """Stage 2 alone, in-process: the worker's own code path (``AlertPipeline.on_wire``, then
    ``evaluate``, per 5,000 messages as ``getmany`` hands them over) replayed over what stage 1
    publishes for P3w's events. No Kafka, no other process on the clock: the figure moves only
    with stage 2's code, so it shows what a change to it buys, where P3w's worker runs vary ±7%.

    Each repeat replays twice: cold (fresh engine, as in P3w) and warm (the same scopes again
    with every baseline full, as after hours of running): the warm/cold ratio is what P3w's
    short runs leave out.
    """
    tune_gc()
    figures = []
    for label, windows in (("1m only", ("1m",)), ("1m/5m/15m/1h", WINDOWS)):
        rules, messages = stage2_messages(n, keys, rate, windows)
        partials = sum(1 for m in messages if b'"type":"partial"' in m[2])
        cold: list[float] = []
        warm: list[float] = []
        evaluated = 0
        for i in range(repeat):
            settings = load_settings(None, {"data_dir": str(data_dir / f"s2-{i}"),
                                            "pipeline": {"allowed_lateness": "5s"}})  # fmt: skip
            conn = open_clickhouse(settings, purpose="bench p3 stage 2")
            first = AlertPipeline(settings, conn, rules=rules, sources=range(4), channels=[])
            cold.append(_replay(first, messages))
            evaluated = first.windows.evaluated_windows
            again = AlertPipeline(settings, conn, rules=rules, sources=range(4), channels=[])
            again.engine.states = _warm(first.engine)
            warm.append(_replay(again, messages))
            first.close()
            again.close()
            conn.close()
        c, w = min(cold), min(warm)
        figures.append(Figure(
            f"P3 stage 2 alone, warm baselines (replayed worker code; 50 rules over {label}, {keys // 1000}k keys)",
            w / n * 1e6, "µs CPU/event", "the same replay cold (every baseline learning, as in P3w)", c / n * 1e6,
            w / n * 1e6,
            f"{partials:,} partials, {evaluated:,} rule windows, {n:,} events at {rate:,.0f}/s of event time; "
            f"best of {repeat} in one process",
            {"cold_s": cold, "warm_s": warm, "partials": partials, "rule_windows": evaluated},
        ))  # fmt: skip
    return figures
