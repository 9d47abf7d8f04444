"""`llmpulse serve` end to end: a real server process on its own chDB data directory, the real
OpenTelemetry SDKs (Python: protobuf, JavaScript: JSON) as clients, and the real Kafka broker.

chDB allows one data directory per process, so the server runs in a subprocess and everything is
checked through it: its read API (/v1/query with an admin key, named queries with a tenant key),
or `llmpulse query`, which finds the server from the data directory's lock file.

Run as a module (`python -m tests.llmpulse.test_server load ...`) it is the load generator the
50k-event test starts in a separate process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from bench.serve_ingest import bodies as load_bodies
from bench.serve_ingest import load, wait_listening
from schemas.config import Settings
from schemas.server import hash_api_key
from tests.conftest import call, iso
from tests.llmpulse.workers import RAW_PART_ONLY, crashing_cli

ROOT = Path(__file__).resolve().parents[2]
JS_DIR = Path(__file__).resolve().parent / "otel_js"
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("LLMPULSE_")}, "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.skipif(
    "server" not in Settings.model_fields,
    reason="ServerSettings is not wired into Settings yet (schemas/config.py: `server: ServerSettings`)",
)


# ------------------------------------------------------------------------------------------------
# helpers


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str, body: bytes | None = None, *, key: str | None = None, method: str | None = None,
    headers: dict[str, str] | None = None, timeout: float = 60,
) -> Reply:  # fmt: skip
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"))
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, dict(exc.headers), exc.read())


def post_events(url: str, events: list[dict[str, Any]], key: str | None, **headers: str) -> Reply:
    return request(f"{url}/v1/events", orjson.dumps(events), key=key,
                   headers={"Content-Type": "application/json", **headers})  # fmt: skip


@dataclass
class Keys:
    admin: str
    acme: str
    beta: str
    limited: str
    file: Path

    @staticmethod
    def create(folder: Path) -> Keys:
        keys = {name: f"lpk_test_{name}_{secrets.token_urlsafe(16)}" for name in ("admin", "acme", "beta", "limited")}
        entries = [
            {"key_hash": hash_api_key(keys["admin"]), "tenant": "ops", "role": "admin", "name": "ops"},
            {"key_hash": hash_api_key(keys["acme"]), "tenant": "acme", "name": "acme-checkout"},
            {"key_hash": hash_api_key(keys["beta"]), "tenant": "beta"},
            {"key_hash": hash_api_key(keys["limited"]), "tenant": "gamma",
             "rate_limit": {"events_per_second": 20, "burst_events": 100}},
        ]  # fmt: skip
        file = folder / "keys.yaml"
        file.write_text(yaml.safe_dump(entries))
        return Keys(file=file, **keys)


@dataclass
class Server:
    """One `llmpulse serve` subprocess."""

    config: Path
    data_dir: Path
    log: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    hook: str | None = None
    """Code run in the server process before it starts (``workers.crashing_cli``), e.g. to stall writes."""
    env: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 90) -> Server:
        self.log.write_text("")
        out = self.log.open("ab")
        command = [sys.executable, "-m", "llmpulse.cli", "serve", "--config", str(self.config),
                   "--data-dir", str(self.data_dir), *self.args]  # fmt: skip
        if self.hook is not None:
            command = [sys.executable, "-c", crashing_cli(self.hook, "serve", *self.args), str(self.config),
                       str(self.data_dir)]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**ENV, **self.env}, cwd=ROOT)
        self.url = wait_listening(self.proc, self.log, timeout)
        return self

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def sql(self, key: str, query: str, **params: Any) -> list[dict[str, Any]]:
        reply = request(f"{self.url}/v1/query", orjson.dumps({"sql": query, "params": params}), key=key)
        assert reply.status == 200, reply.body
        out = reply.json()
        return [dict(zip(out["columns"], row, strict=True)) for row in out["rows"]]

    def scalar(self, key: str, query: str, **params: Any) -> Any:
        return next(iter(self.sql(key, query, **params)[0].values()))


def write_config(path: Path, keys: Keys, server: dict[str, Any], **extra: Any) -> Path:
    data = {"alerting": {"enabled": False}, "server": {"port": 0, "keys_file": str(keys.file), **server}, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def recent(seconds_ago: float = 120) -> str:
    return iso(time.time() - seconds_ago)


# ------------------------------------------------------------------------------------------------
# the embedded server (one per module)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys.create(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("serve")
    config = write_config(
        folder / "llmpulse.yaml", keys,
        {"max_body_bytes": 1 << 20, "max_decompressed_bytes": 4 << 20, "max_events_per_request": 2000},
    )  # fmt: skip
    srv = Server(config, folder / "data", folder / "serve.log").start()
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def test_requests_without_a_valid_key_answer_401(server: Server, keys: Keys) -> None:
    missing = post_events(server.url, [call()], key=None)
    assert missing.status == 401
    assert "missing API key" in missing.json()["error"] and "llmpulse keys create" in missing.json()["error"]
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = post_events(server.url, [call()], key="lpk_not_a_key")
    assert wrong.status == 401 and "invalid API key" in wrong.json()["error"]
    traces = request(f"{server.url}/v1/traces", b"{}", headers={"Content-Type": "application/json"})
    assert traces.status == 401 and traces.json()["code"] == 16  # google.rpc UNAUTHENTICATED, OTLP style
    header = request(f"{server.url}/v1/events", orjson.dumps([]), headers={"x-api-key": keys.acme})
    assert header.status == 200


def test_events_take_the_tenant_from_the_key_and_dead_letter_bad_ones(server: Server, keys: Keys) -> None:
    run = uuid.uuid4().hex[:10]
    events = [
        call(event_id=f"{run}-1", service=run, tenant="beta", ts=recent()),  # a forged tenant
        call(event_id=f"{run}-2", service=run, ts=recent(), request_id=f"{run}-r1"),
        call(event_id=f"{run}-3", service=run, ts=recent(), input_tokens=-5),
        {"kind": "feedback", "request_id": f"{run}-r1", "ts": recent(60), "thumbs": "down", "tenant": "beta"},
    ]
    reply = post_events(server.url, events, keys.acme)
    assert reply.status == 200, reply.body
    body = reply.json()
    assert (body["accepted"], body["rejected"], body["duplicates"]) == (3, 1, 0)
    assert body["errors"] == [{"index": 2, "path": "$.input_tokens", "reason": "Expected `int` >= 0"}]
    calls = server.sql(keys.admin, "SELECT event_id, tenant, source FROM llm_calls FINAL WHERE service = {s:String} "
                       "ORDER BY event_id", s=run)  # fmt: skip
    assert calls == [{"event_id": f"{run}-1", "tenant": "acme", "source": "http"},
                     {"event_id": f"{run}-2", "tenant": "acme", "source": "http"}]  # fmt: skip
    feedback = server.sql(keys.admin, "SELECT tenant, thumbs FROM feedback FINAL WHERE request_id = {r:String}",
                          r=f"{run}-r1")  # fmt: skip
    assert feedback == [{"tenant": "acme", "thumbs": "down"}]
    (letter,) = server.sql(keys.admin, "SELECT path, source, raw FROM dlq FINAL WHERE raw LIKE {p:String}",
                           p=f"%{run}-3%")  # fmt: skip
    assert letter["path"] == "$.input_tokens" and letter["source"] == "http"
    assert orjson.loads(letter["raw"])["tenant"] == "acme"  # the raw bytes kept for re-drive carry the key's tenant


def test_ndjson_and_gzip_bodies(server: Server, keys: Keys) -> None:
    run = uuid.uuid4().hex[:10]
    lines = [orjson.dumps(call(event_id=f"{run}-{i}", service=run, ts=recent())) for i in range(50)]
    lines += [orjson.dumps({"kind": "feedback", "request_id": f"{run}-{i}", "ts": recent(30), "rating": 4})
              for i in range(5)]  # fmt: skip
    body = gzip.compress(b"\n".join(lines) + b"\n")
    reply = request(f"{server.url}/v1/events", body, key=keys.beta,
                    headers={"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"})  # fmt: skip
    assert reply.status == 200, reply.body
    assert reply.json()["accepted"] == 55
    # NDJSON sent as application/json is recognised too
    more = [orjson.dumps(call(event_id=f"{run}-x{i}", service=run, ts=recent())) for i in range(3)]
    reply = request(f"{server.url}/v1/events", b"\n".join(more), key=keys.beta,
                    headers={"Content-Type": "application/json"})  # fmt: skip
    assert reply.status == 200 and reply.json()["accepted"] == 3
    assert server.scalar(keys.admin, "SELECT count() FROM llm_calls FINAL WHERE service = {s:String} AND "
                         "tenant = 'beta'", s=run) == 53  # fmt: skip
    assert server.scalar(keys.admin, "SELECT count() FROM feedback FINAL WHERE startsWith(request_id, {s:String}) "
                         "AND tenant = 'beta'", s=run) == 5  # fmt: skip


@pytest.mark.parametrize(
    ("body", "headers", "status", "path", "words"),
    [
        (b'[{"event_id": "a"}, 3]', {}, 400, "$[1]", "array of event objects"),
        (b'[{"event_id": "a"}, {"event_id": ', {}, 400, "$", "not valid JSON"),
        (b'{"event_id": "a"}\n{"event_id": "b"}\n{"event_id": \n', {"Content-Type": "application/x-ndjson"},
         400, "$[2]", "line 3"),
        (b'"just a string"', {}, 400, "$", "JSON array"),
        (b"", {}, 400, "$", "empty"),
        (b"not gzip at all", {"Content-Encoding": "gzip"}, 400, "$", "gzip"),
        (b"[]", {"Content-Encoding": "br"}, 415, None, "Content-Encoding"),
    ],
)  # fmt: skip
def test_malformed_bodies_answer_400_with_the_first_path(
    server: Server, keys: Keys, body: bytes, headers: dict[str, str], status: int, path: str | None, words: str
) -> None:
    reply = request(f"{server.url}/v1/events", body, key=keys.acme, headers={"Content-Type": "application/json",
                                                                             **headers})  # fmt: skip
    assert reply.status == status, reply.body
    out = reply.json()
    assert out.get("path") == path and words in out["error"]


def test_a_malformed_body_keeps_nothing(server: Server, keys: Keys) -> None:
    run = uuid.uuid4().hex[:10]
    good = orjson.dumps(call(event_id=f"{run}-ok", service=run, ts=recent()))
    reply = request(f"{server.url}/v1/events", b"[" + good + b", 7]", key=keys.acme)
    assert reply.status == 400
    assert server.scalar(keys.admin, "SELECT count() FROM llm_calls WHERE service = {s:String}", s=run) == 0


def test_malformed_otlp_answers_400_and_unknown_media_types_415(server: Server, keys: Keys) -> None:
    garbage = request(f"{server.url}/v1/traces", b"\x0a\xff\xff\xff", key=keys.acme,
                      headers={"Content-Type": "application/x-protobuf"})  # fmt: skip
    assert garbage.status == 400 and garbage.headers["Content-Type"] == "application/x-protobuf"
    from google.rpc.status_pb2 import Status  # what an OTLP exporter decodes the body with

    status = Status.FromString(garbage.body)
    assert status.code == 3 and "protobuf" in status.message.lower(), status  # INVALID_ARGUMENT
    wrong = request(f"{server.url}/v1/traces", b'{"resourceSpans": [{"scopeSpans": 5}]}', key=keys.acme,
                    headers={"Content-Type": "application/json"})  # fmt: skip
    assert wrong.status == 400 and "$.resourceSpans[0].scopeSpans" in wrong.json()["message"]
    text = request(f"{server.url}/v1/traces", b"hello", key=keys.acme, headers={"Content-Type": "text/plain"})
    assert text.status == 415


def test_payload_limits_answer_413(server: Server, keys: Keys) -> None:
    big = b"[" + b" " * (1 << 20) + b"]"
    reply = request(f"{server.url}/v1/events", big, key=keys.acme, headers={"Content-Type": "application/json"})
    assert reply.status == 413 and "server.max_body_bytes" in reply.json()["error"]
    many = [call(ts=recent()) for _ in range(2001)]
    reply = post_events(server.url, many, keys.acme)
    assert reply.status == 413 and "2001 events" in reply.json()["error"] and reply.json()["code"] == "too_many_events"
    bomb = gzip.compress(b"[" + b" " * (5 << 20) + b"]")
    assert len(bomb) < 1 << 20
    reply = request(f"{server.url}/v1/events", bomb, key=keys.acme, headers={"Content-Encoding": "gzip"})
    assert reply.status == 413 and "max_decompressed_bytes" in reply.json()["error"]


def test_rate_limit_per_key_answers_429_with_retry_after(server: Server, keys: Keys) -> None:
    run = uuid.uuid4().hex[:10]
    batch = [call(event_id=f"{run}-{i}", service=run, ts=recent()) for i in range(100)]
    first = post_events(server.url, batch, keys.limited)
    assert first.status == 200, first.body
    second = post_events(server.url, [call(event_id=f"{run}-{i}", service=run, ts=recent()) for i in range(100, 200)],
                         keys.limited)  # fmt: skip
    assert second.status == 429, second.body
    assert 1 <= int(second.headers["Retry-After"]) <= 6  # 100 events at 20/s
    assert "rate limit" in second.json()["error"]
    other = post_events(server.url, [call(ts=recent(), service=run)], keys.acme)  # other keys are unaffected
    assert other.status == 200
    assert server.scalar(keys.admin, "SELECT count() FROM llm_calls FINAL WHERE service = {s:String} AND "
                         "tenant = 'gamma'", s=run) == 100  # fmt: skip


def test_an_idempotency_key_makes_a_retry_a_no_op(server: Server, keys: Keys) -> None:
    run = uuid.uuid4().hex[:10]
    batch = [call(event_id=f"{run}-{i}", service=run, ts=recent()) for i in range(40)]
    first = post_events(server.url, batch, keys.acme, **{"Idempotency-Key": f"{run}-k1"})
    assert first.status == 200 and first.json()["accepted"] == 40
    again = post_events(server.url, batch, keys.acme, **{"Idempotency-Key": f"{run}-k1"})
    assert again.status == 200 and again.body == first.body
    assert again.headers.get("Idempotent-Replayed") == "true"
    changed = post_events(server.url, batch[:10], keys.acme, **{"Idempotency-Key": f"{run}-k1"})
    assert changed.status == 422 and "different body" in changed.json()["error"]
    # two attempts at once: one is written, both get the same answer
    second = [call(event_id=f"{run}-b{i}", service=run, ts=recent()) for i in range(30)]
    replies: list[Reply] = []
    threads = [threading.Thread(target=lambda: replies.append(
        post_events(server.url, second, keys.acme, **{"Idempotency-Key": f"{run}-k2"}))) for _ in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status for r in replies] == [200, 200] and replies[0].body == replies[1].body
    assert replies[0].json()["accepted"] == 30
    sums = server.sql(keys.admin, "SELECT (SELECT count() FROM llm_calls WHERE service = {s:String}) AS raw, "
                      "(SELECT sum(calls) FROM llm_calls_1m WHERE service = {s:String}) AS rolled", s=run)  # fmt: skip
    assert sums == [{"raw": 70, "rolled": 70}]  # not FINAL: nothing was inserted twice, rollups included


def test_read_only_sql_for_admins_and_tenant_bound_named_queries(server: Server, keys: Keys) -> None:
    run = uuid.uuid4().hex[:10]
    for key in (keys.acme, keys.beta):
        assert post_events(server.url, [call(service=run, ts=recent(), feature=f"f-{run}")], key).status == 200
    refused = request(f"{server.url}/v1/query", orjson.dumps({"sql": "DROP TABLE llm_calls"}), key=keys.admin)
    assert refused.status == 400 and "readonly" in refused.json()["error"].lower()
    files = request(
        f"{server.url}/v1/query",
        orjson.dumps({"sql": "SELECT * FROM file('/etc/passwd', 'LineAsString')"}),
        key=keys.admin,
    )
    assert files.status == 400  # readonly=1 also refuses table functions; readonly=2 would not
    setting = request(f"{server.url}/v1/query", orjson.dumps({"sql": "SELECT 1 SETTINGS readonly = 0"}), key=keys.admin)
    assert setting.status == 400
    tenant_sql = request(f"{server.url}/v1/query", orjson.dumps({"sql": "SELECT 1"}), key=keys.acme)
    assert tenant_sql.status == 403 and "admin key" in tenant_sql.json()["error"]

    window = {"start": recent(3600), "end": iso(time.time() + 60)}
    mine = request(f"{server.url}/v1/queries/usage_by_tenant", orjson.dumps(window), key=keys.acme).json()
    rows = [dict(zip(mine["columns"], r, strict=True)) for r in mine["rows"]]
    assert {r["tenant"] for r in rows} == {"acme"}
    assert any(r["feature"] == f"f-{run}" for r in rows)
    other = request(f"{server.url}/v1/queries/usage_by_tenant", orjson.dumps({**window, "tenant": "beta"}),
                    key=keys.acme)  # fmt: skip
    assert other.status == 403 and "'acme'" in other.json()["error"]
    unscoped = request(f"{server.url}/v1/queries/cost_by_feature", orjson.dumps(window), key=keys.acme)
    assert unscoped.status == 403 and "not filtered by tenant" in unscoped.json()["error"]
    everyone = request(f"{server.url}/v1/queries/usage_by_tenant", orjson.dumps(window), key=keys.admin).json()
    tenants = {r[0] for r in everyone["rows"] if r[1] == f"f-{run}"}
    assert tenants == {"acme", "beta"}
    listed = request(f"{server.url}/v1/queries", key=keys.acme).json()["queries"]
    assert listed and all(q["tenant_scoped"] for q in listed)
    missing = request(f"{server.url}/v1/queries/usage_by_tenant", b"{}", key=keys.acme)
    assert missing.status == 400 and "missing: end, start" in missing.json()["error"]


def _expected_cost(model: str, inp: int, out: int, cached: int) -> float:
    from processors.pricing import CostAttribution
    from schemas.prices import builtin_price_table

    rates = CostAttribution(builtin_price_table()).rates(model)
    assert rates is not None
    return rates.cost(inp, out, cached, 0)


def test_python_otel_sdk_spans_become_priced_calls(server: Server, keys: Keys) -> None:
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "py-support", "llmpulse.team": "cx"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("llmpulse-test")
    t0 = time.time_ns() - 300 * 10**9
    with tracer.start_as_current_span("GET /ticket", kind=SpanKind.SERVER, start_time=t0) as root:
        for i in range(4):
            span = tracer.start_span("chat gpt-4o-mini", kind=SpanKind.CLIENT, start_time=t0 + i * 10**9, attributes={
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 2000 + i,
                "gen_ai.usage.output_tokens": 150 + i, "gen_ai.usage.cache_read.input_tokens": 1000,
                "gen_ai.response.finish_reasons": ["stop"], "app.feature": "ticket-summary",
                "gen_ai.response.time_to_first_chunk": 0.25,
            })  # fmt: skip
            span.end(end_time=t0 + i * 10**9 + 1_200_000_000)
        tracer.start_span("SELECT tickets", kind=SpanKind.CLIENT, start_time=t0).end(end_time=t0 + 10**7)
    trace_id = format(root.get_span_context().trace_id, "032x")
    provider.shutdown()
    spans = memory.get_finished_spans()
    assert len(spans) == 6
    exporter = OTLPSpanExporter(endpoint=f"{server.url}/v1/traces", headers={"Authorization": f"Bearer {keys.acme}"},
                                compression=Compression.Gzip)  # fmt: skip
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    refused = OTLPSpanExporter(endpoint=f"{server.url}/v1/traces", headers={"Authorization": "Bearer nope"})
    assert refused.export(spans) == SpanExportResult.FAILURE

    reply = request(f"{server.url}/v1/queries/trace_calls", orjson.dumps({"trace_id": trace_id}), key=keys.acme)
    out = reply.json()
    rows = sorted((dict(zip(out["columns"], r, strict=True)) for r in out["rows"]), key=lambda r: r["input_tokens"])
    assert len(rows) == 4  # the HTTP and DB spans are not model calls
    for i, row in enumerate(rows):
        assert (row["input_tokens"], row["cached_input_tokens"], row["output_tokens"]) == (2000 + i, 1000, 150 + i)
        assert row["cost_usd"] == pytest.approx(_expected_cost("gpt-4o-mini", 2000 + i, 150 + i, 1000), rel=1e-9)
        assert (row["tenant"], row["service"], row["feature"], row["provider"]) == (
            "acme", "py-support", "ticket-summary", "openai")  # fmt: skip
        assert row["latency_ms"] == 1200.0 and row["ttft_ms"] == 250.0
    # 1000 uncached + 1000 cached input and 150 output tokens of gpt-4o-mini (USD per 1M: 0.15 / 0.075 / 0.60)
    assert rows[0]["cost_usd"] == pytest.approx((1000 * 0.15 + 1000 * 0.075 + 150 * 0.60) / 1e6)
    metrics = request(f"{server.url}/metrics").body.decode()
    assert re.search(r'llmpulse_otlp_spans_total\{outcome="ignored_non_genai"\} [1-9]', metrics)


def otlp_json(service: str, spans: int, non_genai: int = 0) -> bytes:
    """An OTLP/JSON export of ``spans`` GenAI chat spans (and ``non_genai`` others), built by hand, gzipped."""
    t0 = time.time_ns() - 120 * 10**9
    trace_id = secrets.token_hex(16)

    def span(i: int, genai: bool) -> dict[str, Any]:
        attrs = [
            ("gen_ai.operation.name", {"stringValue": "chat"}),
            ("gen_ai.provider.name", {"stringValue": "openai"}),
            ("gen_ai.request.model", {"stringValue": "gpt-4o-mini"}),
            ("gen_ai.usage.input_tokens", {"intValue": "100"}),
            ("gen_ai.usage.output_tokens", {"intValue": "10"}),
        ]
        return {"traceId": trace_id, "spanId": f"{i + 1:016x}", "name": "chat gpt-4o-mini" if genai else "SELECT",
                "kind": 3, "startTimeUnixNano": str(t0 + i * 10**6), "endTimeUnixNano": str(t0 + i * 10**6 + 5 * 10**8),
                "attributes": [{"key": k, "value": v} for k, v in attrs] if genai else []}  # fmt: skip

    every = [span(i, True) for i in range(spans)] + [span(spans + i, False) for i in range(non_genai)]
    return gzip.compress(orjson.dumps({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"scope": {"name": "test"}, "spans": every}],
    }]}))  # fmt: skip


def test_otlp_limits_answer_413_and_429_in_the_otlp_encoding(server: Server, keys: Keys) -> None:
    run = uuid.uuid4().hex[:10]
    json_type = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    # 2,001 GenAI spans against max_events_per_request 2,000; the 500 other spans do not count
    many = request(f"{server.url}/v1/traces", otlp_json(f"{run}-many", 2001), key=keys.acme, headers=json_type)
    assert many.status == 413 and many.json()["code"] == 8  # google.rpc.Code RESOURCE_EXHAUSTED
    assert "2001 GenAI call spans in one request" in many.json()["message"]
    fits = request(f"{server.url}/v1/traces", otlp_json(f"{run}-fits", 2000, 500), key=keys.acme, headers=json_type)
    assert fits.status == 200, fits.body
    # the rate-limited key (20 events/s, burst 100): 100 spans drain the bucket, the next 100 wait for it
    body = otlp_json(f"{run}-limited", 100)
    first = request(f"{server.url}/v1/traces", body, key=keys.limited, headers=json_type)
    while first.status == 429:  # an earlier test may have left the bucket part-empty
        time.sleep(int(first.headers["Retry-After"]))
        first = request(f"{server.url}/v1/traces", body, key=keys.limited, headers=json_type)
    assert first.status == 200, first.body
    second = request(f"{server.url}/v1/traces", otlp_json(f"{run}-limited-2", 100), key=keys.limited,
                     headers=json_type)  # fmt: skip
    assert second.status == 429 and second.json()["code"] == 8
    assert 1 <= int(second.headers["Retry-After"]) <= 6 and "rate limit" in second.json()["message"]
    counts = server.sql(keys.admin, "SELECT service, count() AS n FROM llm_calls FINAL WHERE startsWith(service, "
                        "{r:String}) GROUP BY service ORDER BY service", r=run)  # fmt: skip
    assert counts == [{"service": f"{run}-fits", "n": 2000}, {"service": f"{run}-limited", "n": 100}]


def test_js_otel_sdk_json_spans_become_priced_calls(server: Server, keys: Keys) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the JavaScript OpenTelemetry SDK cannot run here")
    if not (JS_DIR / "node_modules" / "@opentelemetry" / "exporter-trace-otlp-http").is_dir():
        npm = shutil.which("npm")
        assert npm, "node without npm: run `npm ci --prefix tests/llmpulse/otel_js` (deploy/test.sh does)"
        installed = subprocess.run([npm, "ci", "--prefix", str(JS_DIR), "--no-audit", "--no-fund"],
                                   capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        assert installed.returncode == 0, f"npm ci in {JS_DIR} failed:\n{installed.stderr[-2000:]}"
    proc = subprocess.run([node, str(JS_DIR / "send_spans.mjs"), server.url, keys.beta, "3"],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    sent = json.loads(proc.stdout)
    assert sent["failed"] == [] and sent["exports"] >= 1
    reply = request(f"{server.url}/v1/queries/trace_calls", orjson.dumps({"trace_id": sent["trace_id"]}), key=keys.beta)
    out = reply.json()
    rows = {r[0]: dict(zip(out["columns"], r, strict=True)) for r in out["rows"]}
    assert len(rows) == len(sent["spans"]) == 4
    for span in sent["spans"]:
        row = rows[f"otel-{sent['trace_id']}-{span['span_id']}"]
        assert (row["model"], row["input_tokens"], row["output_tokens"], row["cached_input_tokens"]) == (
            span["model"], span["input"], span["output"], span["cached"])  # fmt: skip
        assert row["cost_usd"] == pytest.approx(
            _expected_cost(span["model"], span["input"], span["output"], span["cached"]), rel=1e-9)  # fmt: skip
        assert (row["tenant"], row["service"], row["feature"]) == ("beta", "js-checkout", "checkout-assistant")
        assert row["latency_ms"] == span["latency_ms"]
    assert rows[f"otel-{sent['trace_id']}-{sent['spans'][-1]['span_id']}"]["provider"] == "anthropic"  # gen_ai.system


def test_llmpulse_query_goes_through_the_running_server(server: Server, keys: Keys) -> None:
    run = uuid.uuid4().hex[:10]
    assert post_events(server.url, [call(service=run, ts=recent()) for _ in range(3)], keys.acme).status == 200
    proc = subprocess.run(
        [sys.executable, "-m", "llmpulse.cli", "query",
         f"SELECT tenant, count() AS n FROM llm_calls WHERE service = '{run}' GROUP BY tenant",
         "--format", "json", "--data-dir", str(server.data_dir)],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"tenant": "acme", "n": 3}]
    assert f"through llmpulse serve at {server.url}" in proc.stderr
    explicit = subprocess.run(
        [sys.executable, "-m", "llmpulse.cli", "query", "SELECT 1 AS one", "--format", "json", "--server", server.url,
         "--data-dir", str(server.data_dir / "elsewhere")],
        capture_output=True, text=True, env={**ENV, "LLMPULSE_API_KEY": keys.acme}, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert explicit.returncode == 2 and "admin key" in explicit.stderr
    busy = subprocess.run([sys.executable, "-m", "llmpulse.cli", "migrate", "--data-dir", str(server.data_dir)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120, check=False)  # fmt: skip
    assert busy.returncode == 2 and f"It serves queries at {server.url}" in busy.stderr


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmpulse.cli", *args], capture_output=True, text=True,
                          env=env or ENV, cwd=ROOT, timeout=120, check=False)  # fmt: skip


def test_trace_and_gate_read_through_the_running_server(server: Server, keys: Keys) -> None:
    """`trace` and `gate` run named queries through the server, types restored: with the local admin
    token over every tenant, with a tenant key over that tenant's calls only."""
    run = uuid.uuid4().hex[:10]
    feature = f"gate-{run}"
    t0 = time.time() - 1800

    def calls(tag: str, n: int, prompt: str, inp: int, at: float, **extra: Any) -> list[dict[str, Any]]:
        return [call(event_id=f"{run}-{tag}{i}", feature=feature, prompt_version=prompt, ts=iso(at + i),
                     input_tokens=inp, output_tokens=200, request_id=f"{run}-r{tag}{i}", **extra)
                for i in range(n)]  # fmt: skip

    # acme: 6 baseline calls of 1,200 tokens (one agent trace), 4 candidate calls of 1,500
    acme = [*calls("a", 6, "v1", 1000, t0, trace_id=f"{run}-t"), *calls("b", 4, "v2", 1300, t0 + 600)]
    feedback = {"kind": "feedback", "request_id": f"{run}-ra2", "ts": iso(t0 + 30), "thumbs": "down"}
    assert post_events(server.url, [*acme, feedback], keys.acme).json()["accepted"] == 11
    # beta, same feature and prompts: 2 baseline calls of 2,000 tokens, 4 candidate calls of 2,500
    beta = [*calls("x", 2, "v1", 1800, t0 + 10), *calls("y", 4, "v2", 2300, t0 + 610)]
    assert post_events(server.url, beta, keys.beta).json()["accepted"] == 6
    # the judge (admin key): acme's candidate calls score 0.8, beta's 0.2
    verdicts = [{"kind": "judge_result", "request_id": f"{run}-r{tag}{i}", "rubric": "helpfulness", "score": score,
                 "judge_model": "j", "ts": iso(t0 + 900)}
                for tag, score in (("b", 0.8), ("y", 0.2)) for i in range(4)]  # fmt: skip
    assert post_events(server.url, verdicts, keys.admin).json()["accepted"] == 8

    traced = cli("trace", f"{run}-ra2", "--json", "--data-dir", str(server.data_dir))
    assert traced.returncode == 0, traced.stderr
    assert f"through llmpulse serve at {server.url}" in traced.stderr
    t = json.loads(traced.stdout)
    assert (t["call"]["request_id"], t["call"]["input_tokens"], t["call"]["tenant"]) == (f"{run}-ra2", 1000, "acme")
    assert t["call"]["ts"].startswith(iso(t0 + 2)[:19])  # a datetime again (rendered by the CLI), not a string
    assert [f["thumbs"] for f in t["feedback"]] == ["down"]
    assert t["flow"]["calls"] == 6 and t["flow"]["position"] == 3  # the DateTime64 parameter went through
    assert t["this_release"]["calls"] == 8  # the local token is an admin's: every tenant's calls of the release

    gate = ("gate", "--candidate", "prompt_version=v2", "--baseline", "prompt_version=v1", "--feature", feature,
            "--since", "2h", "--min-calls", "1", "--max-token-increase", "0.1", "--json")  # fmt: skip
    gated = cli(*gate, "--data-dir", str(server.data_dir))
    assert gated.returncode == 1, gated.stderr
    g = json.loads(gated.stdout)
    assert (g["baseline"]["calls"], g["candidate"]["calls"]) == (8, 8)
    assert (g["baseline"]["tokens_per_call"], g["candidate"]["tokens_per_call"]) == (1400, 2000)
    assert (g["candidate"]["quality_n"], g["candidate"]["quality"]) == (8, pytest.approx(0.5))

    # a tenant key: the same commands, bound to acme on the server
    as_acme = ("--server", server.url, "--api-key", keys.acme, "--data-dir", str(server.data_dir / "elsewhere"))
    gated = cli(*gate, *as_acme)
    assert gated.returncode == 1, gated.stderr  # +25% tokens per call against a 10% policy
    g = json.loads(gated.stdout)
    assert (g["baseline"]["calls"], g["candidate"]["calls"]) == (6, 4)
    assert (g["baseline"]["tokens_per_call"], g["candidate"]["tokens_per_call"]) == (1200, 1500)
    assert (g["candidate"]["quality_n"], g["candidate"]["quality"]) == (4, pytest.approx(0.8))
    assert [c["verdict"] for c in g["checks"] if c["metric"] == "tokens per call"] == ["FAIL"]
    traced = cli("trace", f"{run}-rb1", "--json", *as_acme)
    assert traced.returncode == 0, traced.stderr
    t = json.loads(traced.stdout)
    assert (t["call"]["tenant"], t["this_release"]["calls"], t["previous_release"]["calls"]) == ("acme", 4, 6)
    assert [(v["rubric"], v["score"]) for v in t["verdicts"]] == [("helpfulness", 0.8)]
    tokens = next(c for c in t["comparison"]["checks"] if c["metric"] == "tokens per call")
    assert (tokens["baseline"], tokens["candidate"], tokens["change"]) == ("1,200", "1,500", "+25.0%")
    others = cli("trace", f"{run}-ra2", "--server", server.url, "--api-key", keys.beta,
                 "--data-dir", str(server.data_dir / "elsewhere"))  # fmt: skip
    assert others.returncode == 1 and f"no call with request_id '{run}-ra2'" in others.stderr
    # what reads tables without a tenant column says it needs an admin key
    drift = cli("drift", "--feature", feature, *as_acme)
    assert drift.returncode == 2 and "not filtered by tenant" in drift.stderr and "admin key" in drift.stderr
    nowhere = cli("trace", "x", "--server", "http://127.0.0.1:9", "--api-key", "k")
    assert nowhere.returncode == 2 and "cannot reach llmpulse serve at http://127.0.0.1:9" in nowhere.stderr


def test_the_server_url_comes_from_llmpulse_server_url(server: Server, keys: Keys) -> None:
    """LLMPULSE_SERVER_URL, not LLMPULSE_SERVER: pydantic-settings reads LLMPULSE_SERVER as the config's
    `server` section, so that name broke every command; on this machine neither is needed."""
    elsewhere = ("--data-dir", str(server.data_dir / "elsewhere"))
    env = {**ENV, "LLMPULSE_SERVER_URL": server.url, "LLMPULSE_API_KEY": keys.admin}
    proc = cli("query", "SELECT 41 + 1 AS answer", "--format", "json", *elsewhere, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"answer": 42}]
    assert f"through llmpulse serve at {server.url} (found via --server)" in proc.stderr
    found = cli("query", "SELECT 42 AS answer", "--format", "json", "--data-dir", str(server.data_dir))
    assert found.returncode == 0 and json.loads(found.stdout) == [{"answer": 42}], found.stderr
    assert f"through llmpulse serve at {server.url} (found via the lock file of" in found.stderr


def test_client_helpers_read_through_the_server(server: Server, keys: Keys) -> None:
    """What `llmpulse report` (and any read-only command) calls: local ClickHouse or the server holding it."""
    from datetime import datetime

    from llmpulse.client import RemoteConnection, open_for_reading, run_named_query, run_query
    from schemas.config import load_settings

    run = uuid.uuid4().hex[:10]
    assert post_events(server.url, [call(service=run, feature=f"f-{run}", ts=recent())], keys.beta).status == 200
    settings = load_settings(server.config, {"data_dir": server.data_dir})
    conn = open_for_reading(settings, "test", announce=False)
    assert isinstance(conn, RemoteConnection) and conn.ref.url == server.url
    result = conn.client.query("SELECT max(ts) AS t, count() AS n FROM llm_calls WHERE service = {s:String}",
                               parameters={"s": run})  # fmt: skip
    assert isinstance(result.result_rows[0][0], datetime) and result.result_rows[0][1] == 1
    assert run_query(settings, "SELECT 1 AS one").rows == [[1]]
    window = {"start": datetime.fromtimestamp(time.time() - 3600), "end": datetime.fromtimestamp(time.time() + 60)}
    rows = run_named_query(settings, "usage_by_tenant", window)
    assert [(r["tenant"], r["calls"]) for r in rows if r["feature"] == f"f-{run}"] == [("beta", 1)]
    mine = run_named_query(settings, "usage_by_tenant", window, server=server.url, api_key=keys.acme)
    assert {r["tenant"] for r in mine} == {"acme"}  # a tenant key is bound to its tenant


def test_reports_latest_serves_the_weekly_report(server: Server, keys: Keys) -> None:
    folder = server.data_dir / "reports"
    latest = folder / "latest.html"
    if latest.exists():
        latest.unlink()
    anonymous = request(f"{server.url}/reports/latest")
    assert anonymous.status == 401 and "server.reports_public" in anonymous.json()["error"]
    assert request(f"{server.url}/reports/latest", key=keys.acme).status == 403
    missing = request(f"{server.url}/reports/latest", key=keys.admin)
    assert missing.status == 404 and "llmpulse report weekly" in missing.json()["error"]
    folder.mkdir(exist_ok=True)
    latest.write_text("<html><body>placeholder page</body></html>")
    (folder / "cost.png").write_bytes(b"\x89PNG fake")
    page = request(f"{server.url}/reports/latest", key=keys.admin)
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b"placeholder page" in page.body
    asset = request(f"{server.url}/reports/cost.png", key=keys.admin)
    assert asset.status == 200 and asset.headers["Content-Type"] == "image/png"
    assert request(f"{server.url}/reports/..%2Fllmpulse.lock", key=keys.admin).status == 404

    # `llmpulse report weekly` reads through the server (which holds the data) and writes the page it serves
    made = cli("report", "weekly", "--data-dir", str(server.data_dir), "--out", str(server.data_dir.parent / "week"))
    assert made.returncode == 0, made.stderr
    assert f"through llmpulse serve at {server.url}" in made.stderr
    written = json.loads((server.data_dir.parent / "week" / "report.json").read_text())
    assert written["source"] == f"llmpulse serve at {server.url}"
    page = request(f"{server.url}/reports/latest", key=keys.admin)
    assert page.status == 200 and page.body == latest.read_bytes() and b"placeholder page" not in page.body


def test_health_and_metrics(server: Server) -> None:
    health = request(f"{server.url}/healthz").json()
    assert health["status"] == "ok" and health["mode"] == "embedded" and health["committed_events"] > 0
    text = request(f"{server.url}/metrics").body.decode()
    assert re.search(r'llmpulse_http_requests_total\{route="/v1/events",status="200"\} \d', text)
    assert re.search(r'llmpulse_http_requests_total\{route="/v1/events",status="401"\} \d', text)
    assert "llmpulse_http_request_duration_seconds_bucket" in text and "llmpulse_events_accepted_total" in text
    assert 'gen_ai_client_token_usage_bucket{gen_ai_operation_name="chat"' in text
    routes = set(re.findall(r'llmpulse_http_requests_total\{route="([^"]+)"', text))
    assert routes <= {"/v1/events", "/v1/traces", "/v1/query", "/v1/queries", "/v1/queries/{name}", "/healthz",
                      "/metrics", "/reports/latest", "/reports/{name}", "other"}  # fmt: skip


def test_load_of_50k_events_over_http_is_exact(server: Server, keys: Keys) -> None:
    run = f"load-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.llmpulse.test_server", "load", server.url, keys.acme, run, "500", "100", "8"],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["answered_200"] == 500, report
    counts = server.sql(
        keys.admin,
        "SELECT (SELECT count() FROM llm_calls FINAL WHERE service = {s:String}) AS raw, "
        "(SELECT count() FROM llm_calls WHERE service = {s:String}) AS rows, "
        "(SELECT sum(calls) FROM llm_calls_1m WHERE service = {s:String}) AS rolled, "
        "(SELECT count() FROM dlq WHERE positionCaseInsensitive(raw, {s:String}) > 0) AS dead",
        s=run,
    )
    assert counts == [{"raw": 50_000, "rows": 50_000, "rolled": 50_000, "dead": 0}]
    print(f"\n50k events over HTTP (100/request, 8 concurrent): {report['events_per_s']:,} events/s, "
          f"p50 {report['p50_ms']} ms, p99 {report['p99_ms']} ms")  # fmt: skip


def test_new_keys_are_picked_up_without_a_restart(server: Server, keys: Keys) -> None:
    proc = subprocess.run([sys.executable, "-m", "llmpulse.cli", "keys", "create", "--tenant", "delta",
                           "--keys-file", str(keys.file), "--json"],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    created = json.loads(proc.stdout)
    assert created["entry"]["key_hash"] == hash_api_key(created["key"]) and created["key"] not in keys.file.read_text()
    deadline = time.time() + 15
    status = 0
    while time.time() < deadline:
        status = post_events(server.url, [call(ts=recent())], created["key"]).status
        if status == 200:
            break
        time.sleep(0.5)
    assert status == 200


def test_idempotency_survives_a_restart_and_the_lock_is_released(server: Server, keys: Keys) -> None:
    run = uuid.uuid4().hex[:10]
    batch = [call(event_id=f"{run}-{i}", service=run, ts=recent()) for i in range(10)]
    first = post_events(server.url, batch, keys.acme, **{"Idempotency-Key": f"{run}-restart"})
    assert first.status == 200
    assert server.stop() == 0
    assert "server_url" not in (server.data_dir / "llmpulse.lock").read_text()
    server.start()
    again = post_events(server.url, batch, keys.acme, **{"Idempotency-Key": f"{run}-restart"})
    assert again.status == 200 and again.body == first.body and again.headers.get("Idempotent-Replayed") == "true"
    assert server.scalar(keys.admin, "SELECT sum(calls) FROM llm_calls_1m WHERE service = {s:String}", s=run) == 10


def test_embedded_backpressure_answers_503_and_loses_nothing(tmp_path: Path, keys: Keys) -> None:
    """A bound of 300 pending events against 24 concurrent requests of 100: the overflow answers 503
    with Retry-After instead of queueing; every request retried until 200 is in ClickHouse exactly once."""
    config = write_config(tmp_path / "llmpulse.yaml", keys, {"max_pending_events": 300, "max_events_per_request": 300,
                                                             "group_commit_max_events": 300})  # fmt: skip
    srv = Server(config, tmp_path / "data", tmp_path / "serve.log").start()
    try:
        run = uuid.uuid4().hex[:10]
        batches = [[call(event_id=f"{run}-{r}-{i}", service=run, ts=recent()) for i in range(100)] for r in range(24)]
        statuses: dict[int, int] = {}
        retry_after: list[int] = []
        lock = threading.Lock()

        def send(r: int) -> None:
            while True:
                reply = post_events(srv.url, batches[r], keys.acme, **{"Idempotency-Key": f"{run}-{r}"})
                with lock:
                    statuses[reply.status] = statuses.get(reply.status, 0) + 1
                if reply.status != 503:
                    assert reply.status == 200 and reply.json()["accepted"] == 100, reply.body
                    return
                assert reply.json()["code"] == "overloaded" and "retry later" in reply.json()["error"]
                retry_after.append(int(reply.headers["Retry-After"]))
                time.sleep(0.1)

        threads = [threading.Thread(target=send, args=(r,)) for r in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses.get(503, 0) >= 1 and statuses[200] == 24, statuses
        assert retry_after and all(1 <= v <= 30 for v in retry_after)
        assert srv.sql(keys.admin, "SELECT (SELECT count() FROM llm_calls WHERE service = {s:String}) AS raw, "
                       "(SELECT sum(calls) FROM llm_calls_1m WHERE service = {s:String}) AS rolled",
                       s=run) == [{"raw": 2400, "rolled": 2400}]  # fmt: skip
        metrics = request(f"{srv.url}/metrics").body.decode()
        assert re.search(r'llmpulse_http_refused_total\{reason="overloaded"\} [1-9]', metrics)
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


STALL_WRITES = """
import os
import time
import llmpulse.server as srv
original = srv.EmbeddedCommitter._process_and_write

def stalled(self, grp, seq):
    while os.path.exists(os.environ["STALL_WHILE"]):  # a slow ClickHouse, for as long as the test says
        time.sleep(0.05)
    original(self, grp, seq)

srv.EmbeddedCommitter._process_and_write = stalled
"""


def test_a_503_takes_no_rate_limit_tokens_and_health_shows_a_stalled_write(tmp_path: Path, keys: Keys) -> None:
    """A write held up: /healthz answers 503 degraded once it outlasts stall_timeout; meanwhile a
    rate-limited key's batch finds no room (503) and, once the write lands, its retry is accepted:
    the 503 spent none of its 100 tokens (it refills at 1 event/s, so a spent bucket would answer 429)."""
    slow = f"lpk_test_slow_{secrets.token_urlsafe(16)}"
    entries = [*yaml.safe_load(keys.file.read_text()),
               {"key_hash": hash_api_key(slow), "tenant": "slow", "rate_limit": {"events_per_second": 1,
                                                                                  "burst_events": 100}}]  # fmt: skip
    own_keys = tmp_path / "keys.yaml"
    own_keys.write_text(yaml.safe_dump(entries))
    limits = {"keys_file": str(own_keys), "max_pending_events": 150, "max_events_per_request": 150, "stall_timeout": 2}
    config = write_config(tmp_path / "llmpulse.yaml", keys, limits)
    gate = tmp_path / "stall"
    srv = Server(config, tmp_path / "data", tmp_path / "serve.log", hook=STALL_WRITES, env={"STALL_WHILE": str(gate)})
    srv.start()
    try:
        run = uuid.uuid4().hex[:10]
        gate.touch()
        held: list[Reply] = []
        first = [call(event_id=f"{run}-a{i}", service=run, ts=recent()) for i in range(100)]
        writer = threading.Thread(target=lambda: held.append(post_events(srv.url, first, keys.acme)))
        writer.start()

        def health() -> tuple[int, dict[str, Any]]:
            reply = request(f"{srv.url}/healthz")
            return reply.status, reply.json()

        deadline = time.time() + 30
        while health()[1]["pending_events"] != 100 and time.time() < deadline:
            time.sleep(0.05)
        status, body = health()
        assert (status, body["status"], body["pending_events"]) == (200, "ok", 100)  # held, not yet stalled
        batch = [call(event_id=f"{run}-b{i}", service=run, ts=recent()) for i in range(100)]
        full = post_events(srv.url, batch, slow)
        assert full.status == 503 and "100 events are waiting to be written (limit 150)" in full.json()["error"]
        while health()[0] != 503 and time.time() < deadline:
            time.sleep(0.1)
        status, body = health()
        assert (status, body["status"]) == (503, "degraded") and body["oldest_write_in_progress_s"] > 2, body
        assert post_events(srv.url, batch, slow).json()["code"] == "overloaded"  # stalled: refused up front
        gate.unlink()
        writer.join(60)
        assert [r.status for r in held] == [200]
        retry = post_events(srv.url, batch, slow)
        assert retry.status == 200 and retry.json()["accepted"] == 100, retry.body
        again = post_events(srv.url, [call(service=run, ts=recent())], slow)  # now the bucket is spent
        assert again.status == 429 and again.json()["code"] == "rate_limited"
        status, body = health()
        assert (status, body["status"], body["pending_events"]) == (200, "ok", 0)
        assert srv.scalar(keys.admin, "SELECT count() FROM llm_calls FINAL WHERE service = {s:String}", s=run) == 200
    finally:
        gate.unlink(missing_ok=True)
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


ANSWER_NEVER_SENT = """
import os
import llmpulse.server as srv
srv.EmbeddedCommitter.resolve = lambda self, subs, started: os._exit(9)  # in ClickHouse, views too; no answer
"""


@pytest.mark.parametrize("crash", [ANSWER_NEVER_SENT, RAW_PART_ONLY], ids=["before-answer", "views"])
def test_a_crash_mid_request_and_the_clients_retry_count_once(tmp_path: Path, keys: Keys, crash: str) -> None:
    """The server dies with the batch in raw (its views written or not) and no answer sent; the
    client retries with its Idempotency-Key against the restarted server: rows and rollups count
    each call once."""
    config = write_config(tmp_path / "llmpulse.yaml", keys, {})
    data, log = tmp_path / "data", tmp_path / "crash.log"
    run = uuid.uuid4().hex[:10]
    batch = [call(event_id=f"{run}-{i}", service=run, response_model="served-1", ts=recent()) for i in range(500)]
    with log.open("ab") as out:
        script = crashing_cli(crash, "serve")
        proc = subprocess.Popen([sys.executable, "-c", script, str(config), str(data)], stdout=out,
                                stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)  # fmt: skip
    url = wait_listening(proc, log, 90)
    with contextlib.suppress(OSError, http.client.HTTPException):  # the connection dies with the server
        post_events(url, batch, keys.acme, **{"Idempotency-Key": f"{run}-batch"})
    assert proc.wait(60) == 9, log.read_text()[-3000:]
    srv = Server(config, data, tmp_path / "serve.log").start()
    try:
        retry = post_events(srv.url, batch, keys.acme, **{"Idempotency-Key": f"{run}-batch"})
        assert retry.status == 200, retry.body
        assert retry.json()["duplicates"] == 500  # already written: remembered from ClickHouse, not added again
        assert srv.sql(keys.admin, "SELECT (SELECT count() FROM llm_calls FINAL WHERE service = {s:String}) AS raw, "
                       "(SELECT sum(calls) FROM llm_calls_1m WHERE service = {s:String}) AS rolled, "
                       "(SELECT sum(calls) FROM served_models_1m WHERE response_model = 'served-1') AS served",
                       s=run) == [{"raw": 500, "rolled": 500, "served": 500}]  # fmt: skip
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]
    text = srv.log.read_text()
    assert "stopped without a clean shutdown" in text
    assert ("rebuilt llm_calls_1m, served_models_1m from raw" in text) == (crash is RAW_PART_ONLY)
    # stopped cleanly this time: the next start has nothing to check
    again = Server(config, data, tmp_path / "again.log").start()
    assert again.stop() == 0
    assert "stopped without a clean shutdown" not in again.log.read_text()


# ------------------------------------------------------------------------------------------------
# per-tenant ClickHouse users for server deployments


def test_tenant_sql_parses_in_clickhouse_and_covers_every_tenant_table(conn: Any) -> None:
    """chDB runs no access control, so each statement is parsed by the engine (EXPLAIN AST) and each
    row policy's condition is run against its real table; the table list is checked against the schema."""
    import hashlib

    from llmpulse.server import split_statements, tenant_sql, tenant_tables

    db = conn.database
    schema = {
        r[0] for r in conn.client.query(
            "SELECT c.table FROM system.columns AS c INNER JOIN system.tables AS t "
            "ON t.database = c.database AND t.name = c.table "
            "WHERE c.database = {db:String} AND c.name = 'tenant' AND NOT t.engine LIKE '%View'",
            parameters={"db": db},
        ).result_rows
    }  # fmt: skip
    tables = tenant_tables(db)
    assert set(tables) == schema and {"llm_calls", "llm_calls_1m", "feedback", "judge_samples"} <= schema
    text = tenant_sql({"acme": hashlib.sha256(b"pw1").hexdigest(), "beta-2": hashlib.sha256(b"pw2").hexdigest()},
                      database=db, admin_users=["default", "llmpulse_ingest"])  # fmt: skip
    statements = split_statements(text)
    assert len(statements) == 1 + 2 * len(tables) + 2 * (1 + 2 * len(tables))
    for statement in statements:
        conn.client.query(f"EXPLAIN AST {statement}")
    for table in tables:
        assert f"ON `{db}`.`{table}` FOR SELECT USING tenant = 'acme' TO `llmpulse_t_acme`" in text
        conn.client.query(f"SELECT count() FROM `{db}`.`{table}` WHERE tenant = 'beta-2'")
    assert "GRANT SELECT ON" in text and "llmpulse_t_beta_2" in text and "pw1" not in text


def test_tenant_sql_command_prints_passwords_once_and_only_their_hashes_in_the_sql(keys: Keys) -> None:
    import hashlib

    proc = subprocess.run(
        [sys.executable, "-m", "llmpulse.cli", "tenant-sql", "--keys-file", str(keys.file), "--tenant", "extra"],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    passwords = dict(line.split("\t") for line in proc.stderr.strip().splitlines())
    assert {"llmpulse_t_acme", "llmpulse_t_beta", "llmpulse_t_gamma", "llmpulse_t_extra"} <= set(passwords)
    for user, password in passwords.items():
        assert password not in proc.stdout
        assert (
            f"`{user}` IDENTIFIED WITH sha256_hash BY '{hashlib.sha256(password.encode()).hexdigest()}'" in proc.stdout
        )
    assert "llmpulse_t_ops" not in proc.stdout  # admin keys get no tenant user


def test_keys_and_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Inline keys and any server setting come from LLMPULSE_SERVER__*; env beats the file, errors name the variable."""
    from llmpulse.server import KeyRing
    from schemas.config import ConfigError, load_settings

    config = tmp_path / "llmpulse.yaml"
    config.write_text(yaml.safe_dump({"server": {"port": 9000, "max_events_per_request": 500}}))
    monkeypatch.setenv("LLMPULSE_SERVER__KEYS", json.dumps([{"key_hash": hash_api_key("lpk_env"), "tenant": "envco"}]))
    monkeypatch.setenv("LLMPULSE_SERVER__PORT", "4400")
    s = load_settings(config).server
    assert (s.port, s.max_events_per_request) == (4400, 500)
    principal = KeyRing(s).authenticate("lpk_env")
    assert principal is not None and (principal.tenant, principal.role) == ("envco", "tenant")
    assert KeyRing(s).authenticate("lpk_other") is None
    monkeypatch.setenv("LLMPULSE_SERVER__KEYS", json.dumps([{"key_hash": "lpk_env", "tenant": "envco"}]))
    with pytest.raises(ConfigError, match="LLMPULSE_SERVER__KEYS"):
        load_settings(config)


def test_keys_hash_matches_what_the_server_compares() -> None:
    proc = subprocess.run([sys.executable, "-m", "llmpulse.cli", "keys", "hash"], input="lpk_example\n",
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == hash_api_key("lpk_example")


# ------------------------------------------------------------------------------------------------
# distributed mode: the real Kafka broker


@pytest.mark.kafka
def test_kafka_mode_publishes_exactly_and_pushes_back(tmp_path: Path, keys: Keys, kafka_settings: Any) -> None:
    from ingest.kafka import create_topics
    from tests.llmpulse.workers import consume_all

    asyncio.run(create_topics(kafka_settings))
    config = write_config(
        tmp_path / "llmpulse.yaml", keys,
        {"mode": "kafka", "max_pending_events": 500, "max_events_per_request": 400},
        kafka=json.loads(kafka_settings.model_dump_json(exclude_none=True)),
    )  # fmt: skip
    srv = Server(config, tmp_path / "data", tmp_path / "serve.log").start()
    try:
        run = uuid.uuid4().hex[:10]
        events: list[dict[str, Any]] = [
            call(event_id=f"{run}-{i}", feature=f"feature-{i % 5}", ts=recent(), tenant="forged" if i % 7 else None)
            for i in range(300)
        ]
        events += [{"kind": "feedback", "request_id": f"{run}-r{i}", "ts": recent(), "thumbs": "up"} for i in range(20)]
        events.append(call(event_id=f"{run}-bad", model=None, ts=recent()))
        first = post_events(srv.url, events, keys.acme, **{"Idempotency-Key": run})
        assert first.status == 200, first.body
        body = first.json()
        assert (body["accepted"], body["rejected"]) == (320, 1)
        assert body["errors"][0]["index"] == 320 and "model" in body["errors"][0]["reason"]
        again = post_events(srv.url, events, keys.acme, **{"Idempotency-Key": run})
        assert again.headers.get("Idempotent-Replayed") == "true" and again.body == first.body

        calls = asyncio.run(consume_all(kafka_settings, kafka_settings.topics.calls))
        assert len(calls) == 301  # exactly once each; the bad one too, for the worker's DLQ
        assert {orjson.loads(m.value)["tenant"] for m in calls} == {"acme"}
        by_feature: dict[bytes, set[int]] = {}
        for m in calls:
            value = orjson.loads(m.value)
            if "model" in value:
                assert m.key == value["feature"].encode()
                by_feature.setdefault(m.key, set()).add(m.partition)
        assert len(by_feature) == 5 and all(len(p) == 1 for p in by_feature.values())
        feedback = asyncio.run(consume_all(kafka_settings, kafka_settings.topics.feedback))
        assert sorted(m.key for m in feedback) == sorted(f"{run}-r{i}".encode() for i in range(20))
        assert request(f"{srv.url}/v1/query", orjson.dumps({"sql": "SELECT 1"}), key=keys.admin).status == 501

        # backpressure: 30 requests of 100 events at once against a bound of 500 pending events
        burst = uuid.uuid4().hex[:10]
        batches = [[call(event_id=f"{burst}-{r}-{i}", feature="burst", ts=recent()) for i in range(100)]
                   for r in range(30)]  # fmt: skip
        statuses: dict[int, int] = {}
        retry_after: list[str] = []

        def send(r: int) -> None:
            while True:
                reply = post_events(srv.url, batches[r], keys.acme, **{"Idempotency-Key": f"{burst}-{r}"})
                statuses[reply.status] = statuses.get(reply.status, 0) + 1
                if reply.status != 503:
                    assert reply.status == 200, reply.body
                    return
                retry_after.append(reply.headers["Retry-After"])
                time.sleep(0.2)

        threads = [threading.Thread(target=send, args=(r,)) for r in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses.get(503, 0) >= 1 and statuses[200] == 30, statuses
        assert all(int(v) >= 1 for v in retry_after)
        published = asyncio.run(consume_all(kafka_settings, kafka_settings.topics.calls))
        assert sum(1 for m in published if orjson.loads(m.value)["event_id"].startswith(burst)) == 3000
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


@pytest.mark.kafka
def test_a_request_that_times_out_still_lands_once_and_its_retry_gets_the_answer(
    tmp_path: Path, keys: Keys, kafka_settings: Any
) -> None:
    """commit_timeout of 1 ms: the broker's acknowledgement always comes later, so every first attempt
    answers 503 while its events are already being written."""
    from ingest.kafka import create_topics
    from tests.llmpulse.workers import consume_all

    asyncio.run(create_topics(kafka_settings))
    config = write_config(tmp_path / "llmpulse.yaml", keys,
                          {"mode": "kafka", "commit_timeout": 0.001, "group_commit_wait": 0},
                          kafka=json.loads(kafka_settings.model_dump_json(exclude_none=True)))  # fmt: skip
    srv = Server(config, tmp_path / "data", tmp_path / "serve.log").start()
    try:
        run = uuid.uuid4().hex[:10]
        batch = [call(event_id=f"{run}-{i}", ts=recent()) for i in range(50)]
        first = post_events(srv.url, batch, keys.acme, **{"Idempotency-Key": run})
        assert first.status == 503 and "will land exactly once" in first.json()["error"], first.body
        assert int(first.headers["Retry-After"]) >= 1
        deadline = time.time() + 10
        retry = first
        while retry.status != 200 and time.time() < deadline:
            time.sleep(0.1)
            retry = post_events(srv.url, batch, keys.acme, **{"Idempotency-Key": run})
        assert retry.status == 200 and retry.json()["accepted"] == 50
        assert retry.headers.get("Idempotent-Replayed") == "true"
        published = asyncio.run(consume_all(kafka_settings, kafka_settings.topics.calls))
        assert len(published) == 50
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


# ------------------------------------------------------------------------------------------------
# the load generator (a separate process: `python -m tests.llmpulse.test_server load ...`)


async def run_load(url: str, key: str, run: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    """Every batch until it is answered 200 (bench.serve_ingest's load generator), with its counts."""
    out = await load(url, key, run, bodies, concurrency)
    events = sum(len(orjson.loads(b)) for b in bodies)
    return {
        "run": run, "requests": len(bodies), "events": events, "seconds": round(out["seconds"], 3),
        "events_per_s": round(events / out["seconds"]), "statuses": out["statuses"],
        "answered_200": out["statuses"].get(200, 0), "p50_ms": out["p50_ms"], "p99_ms": out["p99_ms"],
    }  # fmt: skip


def _load_main(argv: list[str]) -> None:
    url, key, run, requests, batch, concurrency = argv
    bodies = load_bodies(run, int(requests), int(batch))  # the bench's generator
    sys.stdout.write(json.dumps(asyncio.run(run_load(url, key, run, bodies, int(concurrency)))) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] != ["load"] or len(sys.argv) != 8:
        sys.exit("usage: python -m tests.llmpulse.test_server load URL API_KEY RUN_ID REQUESTS BATCH CONCURRENCY")
    _load_main(sys.argv[2:])


def test_drift_dlq_and_backtest_read_through_the_running_server(server: Server, keys: Keys) -> None:
    """The other read commands find the server holding the data directory, like trace and gate."""
    run = uuid.uuid4().hex[:10]
    feature = f"drift-{run}"
    now = time.time()
    events = [call(event_id=f"{run}-{i}", feature=feature, output_tokens=100 + (50 if i >= 60 else 0),
                   ts=iso(now - (2 * 86400 if i < 60 else 3600) + i)) for i in range(120)]  # fmt: skip
    assert post_events(server.url, events, keys.acme).json()["accepted"] == 120
    data = ("--data-dir", str(server.data_dir))
    drifted = cli("drift", "--window", "24h", "--baseline", "3d", "--feature", feature, "--json", *data)
    assert drifted.returncode == 0, drifted.stderr
    assert f"through llmpulse serve at {server.url}" in drifted.stderr
    (model,) = json.loads(drifted.stdout)["models"]
    mean = next(c for c in model["changes"] if c["metric"] == "output_tokens_avg")
    assert (model["calls"], model["baseline_calls"], mean["baseline"], mean["window"]) == (60, 60, 100.0, 150.0)
    shown = cli("dlq", "show", *data)
    assert shown.returncode == 0, shown.stderr  # earlier tests of this module's server left dead letters, or none
    assert "Dead letters in the last 7d" in shown.stdout or "No dead letters in the last 7d" in shown.stdout
    backtest = cli("rules", "backtest", "--since", "1d", "--json", *data)
    assert backtest.returncode == 0 and isinstance(json.loads(backtest.stdout), list), backtest.stderr
