"""P3: what alerting costs the stream, and how fast an alert reaches a webhook.

* overhead: the embedded chain with and without stage-2 evaluation of 50 rules over 10k live
  scope keys, same events, same process (ClickHouse writes excluded: they do not change);
* latency: the time from stage 2 finding a window final (its watermark passed the window's end
  plus allowed lateness) to a local webhook receiving the alert, for a burst of alerts.
"""

from __future__ import annotations

import http.server
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import Figure, pin_prefix
from llmpulse.alerting import AlertPipeline
from llmpulse.runtime import EmbeddedRuntime, open_clickhouse, pipeline_options, tune_gc
from processors.chain import CallPipeline
from processors.records import PayloadBatch, Source
from schemas.config import load_settings
from schemas.prices import builtin_price_table
from schemas.rules import parse_rules

METRICS = ("error_rate", "refusal_rate", "latency_p95_ms", "ttft_p95_ms", "cost_usd", "output_tokens_avg",
           "latency_p50_ms", "calls", "cost_per_call_usd", "timeout_rate")  # fmt: skip
SCOPES = (["feature"], ["model"], ["feature", "model"], ["team"], ["provider"])


WINDOWS = ("1m", "5m", "15m", "1h")
"""A rule set's usual mix; ``windows=("1m",)`` is the worst case (every rule evaluated every minute)."""


def fifty_rules(windows: tuple[str, ...] = WINDOWS) -> Any:
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
                rule["max"] = 1e9  # evaluated every window, never fires: pure evaluation cost
            rules.append(rule)
    return parse_rules({"rules": rules}, "bench")


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
    alerts.on_partials(out.partials + pipeline.flush_windows(), -1, start + 60)  # the window is final now
    deadline = time.time() + 30
    while len(receiver.got) < alerts_n and time.time() < deadline:
        time.sleep(0.01)
    delays = sorted((t - body["extra"]["evaluated_at"]) * 1000 for t, body in receiver.got)
    alerts.close()
    receiver.server.shutdown()
    conn.close()
    p50 = statistics.median(delays)
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    return Figure(
        "P3 alert latency: window final in stage 2 → webhook received (p50)", p50, "ms", None, None, None,
        f"p99 {p99:.0f} ms over a burst of {len(delays)} alerts",
        {"p50_ms": p50, "p99_ms": p99, "alerts": len(delays)},
    )  # fmt: skip
