"""``llmpulse serve``: HTTP and OTLP ingest in front of the embedded pipeline or Kafka, plus reads.

Endpoints: ``POST /v1/events`` (a JSON array or NDJSON of call and feedback events, gzip
accepted), ``POST /v1/traces`` (OTLP/HTTP, protobuf or JSON), ``GET /healthz``, ``GET
/metrics`` (Prometheus), ``POST /v1/query`` (read-only SQL, admin keys), ``GET /v1/queries`` and
``POST /v1/queries/{name}`` (the named queries in ``sinks/queries``; a tenant key runs only those
that take ``{tenant:String}``, bound to its own tenant).

What a 2xx means: the events are durable. Embedded, they are written to ClickHouse (chDB or a
server); with ``--kafka``, every record is acknowledged by all in-sync replicas.

* **Group commit.** Every ClickHouse insert costs ~40-100 ms of fixed work here (a new part per
  table, the rollup view), whatever its size, so one insert per request would cap ingest at a few
  hundred requests per second. Requests queue up instead; a single committer takes everything
  queued (up to ``group_commit_max_events``), runs the processor chain once over the group, writes
  one insert, and answers every request of the group when that insert is durable. While one
  group is being written the next one gathers, so groups grow with load and an idle server waits
  at most ``group_commit_wait`` before writing. Inserts are written strictly in order, so a
  request is only answered once everything submitted before it is durable too.
* **Validation.** A body that is not a JSON array/NDJSON of objects answers 400 with the path of
  the first problem (``$[3]``) and nothing of it is kept. Well-formed events that fail the event
  schema are dead-lettered one by one (the dlq table; in Kafka mode the worker does it) and the
  200 answer lists them: ``{"accepted", "rejected", "duplicates", "errors": [{index, path, reason}]}``.
  Kafka mode validates up front as well, only to report the same per-event errors.
* **Idempotency-Key.** A retried batch is a no-op: its first answer is replayed (header
  ``Idempotent-Replayed: true``); a retry while the first attempt is still being written waits
  for it. Keys are remembered per tenant (the last ``idempotency_keys_per_tenant`` keys, for at
  most ``idempotency_ttl``); embedded, they are also journaled to the data directory, so the
  horizon survives a restart. Beyond the horizon the pipeline's event-id dedup still drops
  repeats within its own window. The same key with a different body answers 422.
* **Backpressure.** Accepted-but-not-durable events and bytes are bounded; beyond either bound,
  or while an insert (or Kafka acknowledgement) has been in progress for longer than
  ``stall_timeout``, new requests answer 503 with Retry-After. A request that waited
  ``commit_timeout`` answers 503 too; if its group was already being written it still lands,
  exactly once, and a retry with the same Idempotency-Key gets its answer.
* **Tenancy.** The tenant comes from the API key and overwrites whatever the payload says.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import signal
import sys
import threading
import time
import uuid
import zlib
from bisect import bisect_left, bisect_right
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click
import msgspec
import orjson
import xxhash

from llmpulse.commands import _data_options, _friendly_errors, _kafka_options, _kafka_settings
from llmpulse.logs import quiet_repeats
from processors.records import PayloadBatch, Source
from schemas.server import (
    KeysFileError,
    RateLimit,
    Role,
    ServerSettings,
    TenantKey,
    hash_api_key,
    is_key_hash,
    load_keys_file,
)

if TYPE_CHECKING:
    from aiohttp import web
    from clickhouse_connect.driver.client import Client

    from ingest.otlp import OtlpOptions
    from llmpulse.alerting import AlertPipeline
    from processors.chain import ProcessedCalls, ProcessedFeedback, ProcessedJudgeResults
    from processors.validate import ValidationLimits
    from schemas.config import KafkaSettings, Settings
    from sinks.batching import Block
    from sinks.clickhouse import Connection
    from sinks.metrics import PipelineMetrics
    from sinks.rollups import Recovery, WriteHorizon

log = logging.getLogger("llmpulse.server")

Mode = Literal["embedded", "kafka"]
Route = Literal["events", "otlp"]

TOKEN_FILE = "llmpulse.server-token"
"""In the data directory, mode 0600: the local admin token the CLI on this machine uses."""
IDEMPOTENCY_JOURNAL = "llmpulse.idempotency.jsonl"
WRITE_HORIZON = "llmpulse.serve.horizon.json"
"""In the data directory while the embedded server runs (``sinks.rollups.WriteHorizon``)."""
LOCAL_TENANT = "local"
"""Tenant of the local admin token (it is meant for reads; events sent with it are filed here)."""
MAX_ERRORS_REPORTED = 100
"""Per response: the first rejected events with their path and reason (the rest are counted)."""
MAX_IDEMPOTENCY_KEY_CHARS = 255
GROUP_QUIET_S = 0.005
"""A forming group closes once no request arrived for this long (or at ``group_commit_wait``)."""
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"})
_PARAM = re.compile(r"\{(\w+):([^}]+)\}")
_NAME = re.compile(r"^[a-z0-9_]{1,64}$")
REPORTS_DIR = "reports"
REPORT_LATEST = "latest.html"
"""``llmpulse report weekly`` writes ``<data_dir>/reports/latest.html``; ``GET /reports/latest`` serves it."""
_REPORT_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REPORT_TYPES = {".html": "text/html", ".pdf": "application/pdf", ".png": "image/png", ".svg": "image/svg+xml",
                 ".json": "application/json", ".csv": "text/csv", ".css": "text/css"}  # fmt: skip


def server_settings(settings: Settings) -> ServerSettings:
    """``settings.server`` once it is part of the main settings; the defaults until then."""
    found = getattr(settings, "server", None)
    return found if isinstance(found, ServerSettings) else ServerSettings()


# --------------------------------------------------------------------------------------------
# errors answered to the client


class Problem(Exception):
    """An answer other than 2xx, phrased for whoever reads the client's logs."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        path: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.path = path
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "code": self.code}
        if self.path is not None:
            out["path"] = self.path
        return out

    def all_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


# --------------------------------------------------------------------------------------------
# API keys


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, from the API key alone."""

    tenant: str
    role: Role
    key_id: str
    """The first 12 hex digits of the key's hash: safe to log, enough to tell keys apart."""
    name: str | None = None
    rate_limit: RateLimit | None = None

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def describe(self) -> str:
        return f"{self.name or 'key ' + self.key_id} (tenant {self.tenant}, {self.role})"


def _principal(key: TenantKey) -> Principal:
    return Principal(key.tenant, key.role, key.key_hash[7:19], key.name, key.rate_limit)


class KeyRing:
    """API keys by hash. A presented key is hashed, looked up, and compared in constant time.

    The dict lookup only finds the candidate; ``hmac.compare_digest`` then compares the whole
    hash, so answering never depends on how much of a guessed hash matched.
    """

    def __init__(self, server: ServerSettings, local_token: str | None = None) -> None:
        self.server = server
        self._by_hash: dict[str, tuple[str, Principal]] = {}
        self._local: tuple[str, Principal] | None = None
        if local_token is not None:
            self._local = (hash_api_key(local_token), Principal(LOCAL_TENANT, "admin", "local", "local CLI"))
        self._file_stamp: tuple[float, int] | None = None
        self.load()

    def __len__(self) -> int:
        return len(self._by_hash)

    def _stamp(self) -> tuple[float, int] | None:
        path = self.server.keys_file
        if path is None:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def load(self) -> None:
        """Raises ``KeysFileError`` (at start-up a bad keys file must stop the server)."""
        keys = list(self.server.keys)
        stamp = self._stamp()
        if self.server.keys_file is not None:
            keys += load_keys_file(self.server.keys_file)
        by_hash: dict[str, tuple[str, Principal]] = {}
        for k in keys:
            if k.key_hash in by_hash:
                log.warning("key %s is listed twice; the last entry wins", k.key_hash[7:19])
            by_hash[k.key_hash] = (k.key_hash, _principal(k))
        self._by_hash = by_hash
        self._file_stamp = stamp

    def reload_if_changed(self) -> bool:
        """Keys are added and revoked by editing the file; a broken edit keeps the previous keys."""
        if self.server.keys_file is None or self._stamp() == self._file_stamp:
            return False
        try:
            self.load()
        except KeysFileError as exc:
            log.error("keys file not reloaded, the previous keys stay in force: %s", exc)
            self._file_stamp = self._stamp()
            return False
        log.info("keys file reloaded: %d keys", len(self._by_hash))
        return True

    def authenticate(self, presented: str) -> Principal | None:
        digest = hash_api_key(presented)
        found = self._by_hash.get(digest)
        if found is not None and hmac.compare_digest(found[0], digest):
            return found[1]
        if self._local is not None and hmac.compare_digest(self._local[0], digest):
            return self._local[1]
        return None


def presented_key(headers: Any) -> str | None:
    """``Authorization: Bearer <key>`` or ``x-api-key: <key>``."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return str(value.strip())
    key = headers.get("x-api-key")
    return str(key.strip()) if key and key.strip() else None


# --------------------------------------------------------------------------------------------
# rate limits


class TokenBucket:
    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def take(self, cost: float, now: float) -> float:
        """0 when granted, else the seconds until ``cost`` tokens will be there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        cost = min(cost, self.capacity)  # a batch bigger than the burst passes once the bucket is full
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


class RateLimiter:
    """Per-key token buckets (events, and optionally requests); keys without a limit cost nothing."""

    def __init__(self, default: RateLimit | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.default = default
        self.clock = clock
        self._buckets: dict[str, tuple[RateLimit, TokenBucket, TokenBucket | None]] = {}

    def _for(self, p: Principal) -> tuple[RateLimit, TokenBucket, TokenBucket | None] | None:
        limit = p.rate_limit or self.default
        if limit is None:
            return None
        found = self._buckets.get(p.key_id)
        if found is None or found[0] != limit:  # new key, or its limit was edited
            now = self.clock()
            requests = None
            if limit.requests_per_second is not None:
                requests = TokenBucket(limit.requests_per_second, max(1.0, limit.requests_per_second), now)
            found = self._buckets[p.key_id] = (limit, TokenBucket(limit.events_per_second, limit.burst, now), requests)
        return found

    def check_request(self, p: Principal) -> float:
        found = self._for(p)
        if found is None or found[2] is None:
            return 0.0
        return found[2].take(1, self.clock())

    def check_events(self, p: Principal, events: int) -> float:
        found = self._for(p)
        if found is None or events <= 0:
            return 0.0
        return found[1].take(events, self.clock())


# --------------------------------------------------------------------------------------------
# request bodies


def decode_content(body: bytes, encoding: str | None, server: ServerSettings) -> bytes:
    """Undo ``Content-Encoding`` within the size limit (a gzip bomb answers 413, not OOM)."""
    enc = (encoding or "identity").strip().lower()
    if enc in ("identity", ""):
        return body
    if enc not in ("gzip", "x-gzip"):
        raise Problem(415, "unsupported_encoding", f"unsupported Content-Encoding {encoding!r}: send gzip or none")
    if not server.gzip:
        raise Problem(415, "unsupported_encoding", "gzip bodies are turned off on this server (server.gzip)")
    limit = server.max_decompressed_bytes
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise Problem(400, "malformed_body", f"the body is not valid gzip: {exc}", path="$") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise Problem(
            413,
            "body_too_large",
            f"the gzip body inflates beyond {limit} bytes (server.max_decompressed_bytes): send smaller batches",
        )
    if not inflater.eof:
        raise Problem(400, "malformed_body", "the gzip body is truncated", path="$")
    return out


_NO_VALUE = msgspec.Raw(b"")


class _Head(msgspec.Struct, gc=False):
    """The few top-level members routing needs, as raw JSON; every other member is skipped unparsed."""

    kind: msgspec.Raw = _NO_VALUE
    tenant: msgspec.Raw = _NO_VALUE
    feature: msgspec.Raw = _NO_VALUE
    request_id: msgspec.Raw = _NO_VALUE


_ARRAY: msgspec.json.Decoder[list[msgspec.Raw]] = msgspec.json.Decoder(list[msgspec.Raw])
_HEADS: msgspec.json.Decoder[list[_Head]] = msgspec.json.Decoder(list[_Head])
_HEAD: msgspec.json.Decoder[_Head] = msgspec.json.Decoder(_Head)
_AT_PATH = re.compile(r" - at `(\$[^`]*)`$")
_KINDS = {b'"call"': "call", b'"feedback"': "feedback", b'"judge_result"': "judge_result"}
_NOT_SPLICEABLE = frozenset(b" \t\r\n}")
"""Second bytes after which ``{"tenant":…,`` cannot simply be spliced in (an empty object, or whitespace)."""


@dataclass(slots=True)
class ParsedEvents:
    """One request's events by kind, with the tenant set, their position in the request and their Kafka key."""

    calls: list[bytes] = field(default_factory=list)
    call_index: list[int] = field(default_factory=list)
    call_keys: list[bytes | None] = field(default_factory=list)
    feedback: list[bytes] = field(default_factory=list)
    feedback_index: list[int] = field(default_factory=list)
    feedback_keys: list[bytes | None] = field(default_factory=list)
    judge: list[bytes] = field(default_factory=list)
    judge_index: list[int] = field(default_factory=list)
    judge_keys: list[bytes | None] = field(default_factory=list)
    nbytes: int = 0

    @property
    def count(self) -> int:
        return len(self.calls) + len(self.feedback) + len(self.judge)

    def kinds(self) -> Iterable[tuple[str, list[bytes], list[int], list[bytes | None]]]:
        yield "call", self.calls, self.call_index, self.call_keys
        yield "feedback", self.feedback, self.feedback_index, self.feedback_keys
        yield "judge_result", self.judge, self.judge_index, self.judge_keys


def split_body(body: bytes, content_type: str | None) -> tuple[list[bytes], list[_Head]]:
    """A JSON array, a single object, or NDJSON → each event's bytes and routing members.

    Both passes are msgspec's C decoder: the array is split into raw elements, and each element's
    ``kind``/``tenant``/``feature``/``request_id`` are read without materialising anything else.
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    start = body.lstrip()[:1]
    if not start:
        raise Problem(400, "malformed_body", "the body is empty: send a JSON array of events or NDJSON", path="$")
    if media not in NDJSON_TYPES:
        if start == b"[":
            try:
                raws = _ARRAY.decode(body)
                heads = _HEADS.decode(body)
            except msgspec.ValidationError as exc:  # a subclass of DecodeError: first
                match = _AT_PATH.search(str(exc))
                path = match.group(1) if match else "$"
                reason = str(exc)[: match.start()] if match else str(exc)
                raise Problem(
                    400, "malformed_body", f"expected an array of event objects: {reason}", path=path
                ) from None
            except msgspec.DecodeError as exc:
                raise Problem(400, "malformed_body", f"not valid JSON: {exc}", path="$") from None
            return [bytes(r) for r in raws], heads
        if start == b"{":
            try:
                return [body.strip()], [_HEAD.decode(body)]
            except msgspec.DecodeError:
                pass  # more than one object: NDJSON sent as application/json
        else:
            raise Problem(
                400,
                "malformed_body",
                "expected a JSON array of event objects, or NDJSON (one event object per line)",
                path="$",
            )
    raws_out: list[bytes] = []
    heads_out: list[_Head] = []
    for number, raw_line in enumerate(body.split(b"\n"), 1):
        line = raw_line.strip()
        if not line:
            continue
        where = f"$[{len(raws_out)}]"
        if not line.startswith(b"{"):
            raise Problem(400, "malformed_body", f"line {number}: expected one JSON object per line", path=where)
        try:
            heads_out.append(_HEAD.decode(line))
        except msgspec.DecodeError as exc:
            raise Problem(400, "malformed_body", f"line {number}: not valid JSON: {exc}", path=where) from None
        raws_out.append(line)
    return raws_out, heads_out


def _decoded_str(raw: msgspec.Raw) -> str | None:
    if not raw:
        return None
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, str) else None


def _key(raw: msgspec.Raw) -> bytes | None:
    """A string member as bytes (the Kafka key); the slice is enough unless it has escapes."""
    data = bytes(raw)
    if len(data) >= 2 and data[:1] == b'"' and b"\\" not in data:
        return data[1:-1] or None
    text = _decoded_str(raw)
    return text.encode() if text else None


def _with_tenant(raw: bytes, current: msgspec.Raw, tenant: str, tenant_json: bytes, index: int) -> bytes:
    """Set ``tenant`` to the caller's, byte-splicing where the payload has none (the common case)."""
    if not current:
        if raw[1:2] in b" \t\r\n}" and raw[1:].lstrip().startswith(b"}"):  # an empty object
            return b'{"tenant":' + tenant_json + b"}"
        return b'{"tenant":' + tenant_json + b"," + raw[1:]
    if bytes(current) == tenant_json:
        return raw
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:  # e.g. an integer beyond 64 bits, which orjson refuses
        raise Problem(
            400, "malformed_body", f"event {index}: cannot set its tenant: {exc}", path=f"$[{index}]"
        ) from None
    obj["tenant"] = tenant
    return orjson.dumps(obj)


def parse_events(
    body: bytes, content_type: str | None, principal: Principal, max_events: int, *, keys: bool = True
) -> ParsedEvents:
    """Split, route by ``kind``, stamp the tenant, and (``keys``) take the Kafka key: feature / request id."""
    raws, heads = split_body(body, content_type)
    if len(raws) > max_events:
        raise Problem(
            413,
            "too_many_events",
            f"{len(raws)} events in one request, over the limit of {max_events} "
            "(server.max_events_per_request): split the batch",
        )
    tenant = principal.tenant
    tenant_json = orjson.dumps(tenant)
    prefix = b'{"tenant":' + tenant_json + b","
    out = ParsedEvents()
    calls, call_index, call_keys = out.calls, out.call_index, out.call_keys
    nbytes = 0
    for i, raw in enumerate(raws):
        head = heads[i]
        nbytes += len(raw)
        k = head.kind
        kind = (_KINDS.get(bytes(k)) or _decoded_str(k)) if k else "call"
        if kind == "judge_result":
            if not principal.admin:
                raise Problem(
                    403,
                    "forbidden",
                    "judge results are accepted from admin keys only (they score other calls)",
                    path=f"$[{i}].kind",
                )
            out.judge.append(raw)
            out.judge_index.append(i)
            out.judge_keys.append(_key(head.request_id) if keys else None)
            continue
        current = head.tenant
        if not current and raw[1] not in _NOT_SPLICEABLE:  # the common case: no tenant in the payload
            payload = prefix + raw[1:]
        else:
            payload = _with_tenant(raw, current, tenant, tenant_json, i)
        if kind == "feedback":
            out.feedback.append(payload)
            out.feedback_index.append(i)
            out.feedback_keys.append(_key(head.request_id) if keys else None)
        else:  # calls, and unknown kinds (the call decoder rejects those with a proper reason)
            calls.append(payload)
            call_index.append(i)
            call_keys.append(_key(head.feature) if keys else None)
    out.nbytes = nbytes
    return out


# --------------------------------------------------------------------------------------------
# outcomes


@dataclass(slots=True)
class Outcome:
    """What became of one request's events."""

    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    """(index in the request, JSON path, reason) of the first rejected events."""

    def reject(self, index: int, path: str, reason: str) -> None:
        self.rejected += 1
        if len(self.errors) < MAX_ERRORS_REPORTED:
            self.errors.append((index, path, reason))

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "rejected": self.rejected,
            "duplicates": self.duplicates,
            "errors": [{"index": i, "path": p, "reason": r} for i, p, r in sorted(self.errors)],
        }


class EventValidator:
    """The pipeline's own decoders, run up front where the pipeline runs elsewhere (Kafka mode)."""

    def __init__(self, limits: ValidationLimits) -> None:
        from processors.validate import decode_calls, decode_feedback, decode_judge_results

        self._decoders: dict[str, Any] = {
            "call": decode_calls(limits),
            "feedback": decode_feedback(limits),
            "judge_result": decode_judge_results(limits),
        }

    def __call__(self, parsed: ParsedEvents, now: float) -> Outcome:
        outcome = Outcome()
        source = Source("http", "validate")
        for kind, payloads, index, _ in parsed.kinds():
            if not payloads:
                continue
            decoded = self._decoders[kind](PayloadBatch(source, payloads, list(range(len(payloads)))), now)
            outcome.accepted += len(decoded.events)
            for d in decoded.dead:
                outcome.reject(index[d.offset], d.path, d.reason)
        return outcome


# --------------------------------------------------------------------------------------------
# idempotency


@dataclass(slots=True)
class Remembered:
    body_hash: str
    expires: float
    response: tuple[int, bytes, str] | None = None
    """(status, body, content type) once the first attempt was answered."""
    future: asyncio.Future[Any] | None = None
    """The first attempt, while it is still being written."""


class IdempotencyStore:
    """Idempotency-Keys per tenant: bounded LRU with a time horizon, optionally journaled to a file.

    The journal makes the horizon survive a restart. A line is appended after the insert is
    durable and before the answer is sent; a crash in between means a retry after the restart
    is written again (at least once, never lost).
    """

    def __init__(self, per_tenant: int, ttl: float, journal: Path | None = None) -> None:
        self.per_tenant = per_tenant
        self.ttl = ttl
        self.journal = journal
        self._tenants: dict[str, OrderedDict[str, Remembered]] = {}
        self._journal_lines = 0
        self._file: Any = None
        if journal is not None and per_tenant > 0:
            self._load(journal)
            self._file = journal.open("ab")

    def _load(self, path: Path) -> None:
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            return
        now = time.time()
        for line in lines:
            try:
                r = orjson.loads(line)
                if r["x"] > now:
                    self._put(r["t"], r["k"], Remembered(r["h"], r["x"], (r["s"], base64.b64decode(r["b"]), r["c"])))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a torn last line after a crash
        self._journal_lines = len(lines)
        if self._journal_lines > 2 * self.remembered() + 1000:
            self._rewrite(path)

    def remembered(self) -> int:
        return sum(len(d) for d in self._tenants.values())

    def _put(self, tenant: str, key: str, entry: Remembered) -> None:
        keys = self._tenants.setdefault(tenant, OrderedDict())
        keys[key] = entry
        keys.move_to_end(key)
        while len(keys) > self.per_tenant:
            keys.popitem(last=False)

    def get(self, tenant: str, key: str) -> Remembered | None:
        if self.per_tenant <= 0:
            return None
        keys = self._tenants.get(tenant)
        entry = keys.get(key) if keys is not None else None
        if entry is None:
            return None
        if entry.response is not None and entry.expires < time.time():
            del keys[key]  # type: ignore[union-attr]
            return None
        return entry

    def begin(self, tenant: str, key: str, body_hash: str, future: asyncio.Future[Any]) -> None:
        if self.per_tenant > 0:
            self._put(tenant, key, Remembered(body_hash, time.time() + self.ttl, None, future))

    def complete(self, tenant: str, key: str, status: int, body: bytes, content_type: str) -> None:
        keys = self._tenants.get(tenant)
        entry = keys.get(key) if keys is not None else None
        if entry is None:
            return
        entry.response = (status, body, content_type)
        entry.future = None
        entry.expires = time.time() + self.ttl
        if self._file is not None:
            record = {"t": tenant, "k": key, "h": entry.body_hash, "x": entry.expires, "s": status, "c": content_type,
                      "b": base64.b64encode(body).decode()}  # fmt: skip
            self._file.write(orjson.dumps(record) + b"\n")
            self._file.flush()
            self._journal_lines += 1
            if self.journal is not None and self._journal_lines > 2 * self.remembered() + 1000:
                self._rewrite(self.journal)

    def forget(self, tenant: str, key: str) -> None:
        keys = self._tenants.get(tenant)
        if keys is not None:
            keys.pop(key, None)

    def _rewrite(self, path: Path) -> None:
        """Compact the journal to what is remembered (atomic rename)."""
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as out:
            for tenant, keys in self._tenants.items():
                for key, e in keys.items():
                    if e.response is None:
                        continue
                    status, body, ctype = e.response
                    record = {"t": tenant, "k": key, "h": e.body_hash, "x": e.expires, "s": status, "c": ctype,
                              "b": base64.b64encode(body).decode()}  # fmt: skip
                    out.write(orjson.dumps(record) + b"\n")
        os.replace(tmp, path)
        if self._file is not None:
            self._file.close()
            self._file = path.open("ab")
        self._journal_lines = self.remembered()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --------------------------------------------------------------------------------------------
# metrics


class HttpMetrics:
    """HTTP counters and latency with bounded labels, on the pipeline's registry (one /metrics)."""

    ROUTES = frozenset(
        {"/v1/events", "/v1/traces", "/v1/query", "/v1/queries", "/v1/queries/{name}", "/healthz", "/metrics",
         "/reports/latest", "/reports/{name}"}
    )  # fmt: skip

    def __init__(self, pipeline: PipelineMetrics) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        from sinks.metrics import BoundedLabel

        r = pipeline.registry
        self.pipeline = pipeline
        self.requests = Counter("llmpulse_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)  # fmt: skip
        self.duration = Histogram(
            "llmpulse_http_request_duration_seconds", "Time to answer, by route (ingest: until durable)", ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )  # fmt: skip
        self.events = Counter("llmpulse_http_events", "Events received over HTTP, by route and tenant",
                              ["route", "tenant"], registry=r)  # fmt: skip
        self.refused = Counter("llmpulse_http_refused", "Requests refused, by reason", ["reason"], registry=r)
        self.otlp_spans = Counter("llmpulse_otlp_spans", "OTLP spans by outcome", ["outcome"], registry=r)
        self.group_events = Histogram(
            "llmpulse_http_group_commit_events", "Events per group commit",
            buckets=(1, 10, 100, 1000, 2500, 5000, 10000, 20000, 50000), registry=r,
        )  # fmt: skip
        self.pending_events = Gauge("llmpulse_http_pending_events", "Accepted, not yet durable", registry=r)
        self.pending_bytes = Gauge("llmpulse_http_pending_bytes", "Accepted, not yet durable (bytes)", registry=r)
        self.tenant = BoundedLabel()

    def route(self, canonical: str | None) -> str:
        return canonical if canonical in self.ROUTES else "other"


# --------------------------------------------------------------------------------------------
# group commit


@dataclass(eq=False, slots=True)
class Submission:
    """One request's events waiting to be durable."""

    route: Route
    events: ParsedEvents
    future: asyncio.Future[Outcome]
    enqueued: float
    outcome: Outcome = field(default_factory=Outcome)
    taken: bool = False
    """In a group being written: from here on it lands, even if its request gives up waiting."""
    released: bool = False
    """Its events no longer count as pending (answered, failed or cancelled)."""


class Unavailable(Exception):
    """The group could not be made durable (Kafka refused to acknowledge it); the request answers 503."""


class Committer:
    """The queue, the group former and the backpressure bounds; subclasses write a group."""

    def __init__(self, server: ServerSettings, metrics: HttpMetrics) -> None:
        self.server = server
        self.metrics = metrics
        self.queue: deque[Submission] = deque()
        self.queued_events = 0
        self.pending_events = 0
        self.pending_bytes = 0
        self.inflight: deque[float] = deque()
        """Start times (monotonic) of groups taken and not yet durable, oldest first."""
        self.failing: str | None = None
        """The last write error while it is being retried (for /healthz and 503 answers)."""
        self.committed_events = 0
        self.groups = 0
        self._rate = 0.0
        self._rate_stamp = time.monotonic()
        self._wake: asyncio.Event | None = None
        self._last_submit = 0.0
        self._last_done = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="llmpulse-committer")

    # -- admission ----------------------------------------------------------------------------

    def stalled_for(self) -> float:
        return time.monotonic() - self.inflight[0] if self.inflight else 0.0

    def overloaded(self, events: int = 0, nbytes: int = 0) -> Problem | None:
        """Why a new request must wait (503 + Retry-After), or None."""
        s = self.server
        stalled = self.stalled_for()
        if stalled > s.stall_timeout:
            why = f": {self.failing}" if self.failing else ""
            return Problem(
                503, "overloaded",
                f"the {self.target} has not confirmed a write for {stalled:.0f} s{why}; retry later",
                retry_after=5,
            )  # fmt: skip
        if self.pending_events + events > s.max_pending_events or self.pending_bytes + nbytes > s.max_pending_bytes:
            drain = self.pending_events / self._rate if self._rate > 0 else 1.0
            return Problem(
                503, "overloaded",
                f"{self.pending_events} events are waiting to be written (limit {s.max_pending_events}); retry later",
                retry_after=min(30.0, max(1.0, drain)),
            )  # fmt: skip
        return None

    @property
    def target(self) -> str:
        return "ClickHouse"

    def submit(self, sub: Submission) -> None:
        assert self._wake is not None
        n, b = sub.events.count, sub.events.nbytes
        self.queue.append(sub)
        self._last_submit = sub.enqueued
        self.queued_events += n
        self.pending_events += n
        self.pending_bytes += b
        self._gauges()
        self._wake.set()

    def cancel(self, sub: Submission) -> bool:
        """Drop a request that gave up before its group was taken (as if it never came)."""
        if sub.taken:
            return False
        with contextlib.suppress(ValueError):
            self.queue.remove(sub)
            self.queued_events -= sub.events.count
            self._release(sub)
        if not sub.future.done():
            sub.future.cancel()
        return True

    def _release(self, sub: Submission) -> None:
        if sub.released:
            return
        sub.released = True
        self.pending_events -= sub.events.count
        self.pending_bytes -= sub.events.nbytes
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.pending_events.set(self.pending_events)
        self.metrics.pending_bytes.set(self.pending_bytes)

    def resolve(self, group: list[Submission], started: float, error: BaseException | None = None) -> None:
        """On the event loop: a group is durable (or failed); answer its requests."""
        with contextlib.suppress(ValueError):
            self.inflight.remove(started)
        events = 0
        for sub in group:
            self._release(sub)
            events += sub.events.count
            if sub.future.done():
                continue
            if error is not None:
                sub.future.set_exception(error)
            else:
                sub.future.set_result(sub.outcome)
        self._last_done = time.monotonic()
        if error is None:
            self.committed_events += events
            now = time.monotonic()
            dt = max(now - self._rate_stamp, 1e-3)
            self._rate = 0.8 * self._rate + 0.2 * (events / dt) if self._rate else events / dt
            self._rate_stamp = now

    # -- the committer ------------------------------------------------------------------------

    async def _next_group(self) -> list[Submission] | None:
        assert self._wake is not None
        s = self.server
        while not self.queue:
            if self._closing:
                return None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except TimeoutError:
                await self.idle()
        # An idle server waits a little for company; a busy one has a queue already. The wait ends
        # early once requests stop arriving. It also starts over when a group was just answered: its
        # clients' next requests are on their way, and without the wait they would form a group of
        # their own every time (two cohorts alternating, each paying the fixed cost of an insert).
        deadline = max(self.queue[0].enqueued, self._last_done) + s.group_commit_wait
        quiet = min(GROUP_QUIET_S, s.group_commit_wait)
        while self.queued_events < s.group_commit_max_events and not self._closing:
            now = time.monotonic()
            left = min(deadline, max(self._last_submit, self._last_done) + quiet) - now
            if left <= 0:
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=left)
        group: list[Submission] = []
        events = 0
        while self.queue and (not group or events + self.queue[0].events.count <= s.group_commit_max_events):
            sub = self.queue.popleft()
            if sub.future.done():  # cancelled meanwhile
                continue
            sub.taken = True
            group.append(sub)
            events += sub.events.count
        self.queued_events -= events
        return group

    async def _run(self) -> None:
        while True:
            group = await self._next_group()
            if group is None:
                return
            if not group:
                continue
            started = time.monotonic()
            self.inflight.append(started)
            self.groups += 1
            self.metrics.group_events.observe(sum(s.events.count for s in group))
            try:
                await self.commit(group, started)
            except Exception as exc:
                log.exception("writing a group of %d requests failed", len(group))
                self.resolve(group, started, self.failure(exc))

    async def idle(self) -> None:
        """Called about once a second while nothing is queued."""

    def failure(self, exc: Exception) -> Exception:
        """What the requests of a group that raised are answered with (500 unless ``Unavailable``)."""
        return exc

    async def commit(self, group: list[Submission], started: float) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Write what is queued, then stop."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task


# ---- embedded: the in-process pipeline and ClickHouse


def _server_runtime_class() -> type[Any]:
    """``EmbeddedRuntime`` with per-batch results and a durability callback (imported lazily: heavy)."""
    from llmpulse.runtime import EmbeddedRuntime

    class ServerRuntime(EmbeddedRuntime):
        """The embedded runtime, returning what each batch became, and telling when a block is durable."""

        def __init__(
            self,
            settings: Settings,
            conn: Connection,
            on_durable: Callable[[Block], None],
            alerts: AlertPipeline | None = None,
            metrics: PipelineMetrics | None = None,
        ) -> None:
            self._on_durable = on_durable
            self.metrics = metrics
            super().__init__(settings, conn, alerts=alerts)

        def process_calls(self, batch: PayloadBatch, now: float) -> ProcessedCalls:
            started = time.perf_counter()
            processed = self.calls.process(batch, now)
            self.stats.counters.add(processed.counters)
            self._emit(processed.partials, self.calls.windows.watermark)
            elapsed = time.perf_counter() - started
            self.stats.process_s += elapsed
            if self.metrics is not None:
                self.metrics.observe(processed, elapsed)
            return processed

        def process_feedback(self, batch: PayloadBatch, now: float) -> ProcessedFeedback:
            done = self.feedback.process(batch, now)
            self.stats.counters.add(done.counters)
            return done

        def process_judge_results(self, batch: PayloadBatch, now: float) -> ProcessedJudgeResults:
            scored = self.judge_results.process(batch, now)
            self.stats.counters.add(scored.counters)
            return scored

        def tick_idle(self, now: float) -> None:
            """Quiet traffic still closes windows (and can page on silence)."""
            windows = self.calls.windows
            partials = windows.tick(now, self.settings.pipeline.idle_timeout)
            if partials:
                self._emit(partials, windows.watermark)

        def _after_write(self, block: Block) -> None:
            try:
                super()._after_write(block)
            except Exception:
                log.exception("a post-write step (judge sampling of flagged calls, quality alerts) failed")
            finally:
                self._on_durable(block)

    return ServerRuntime


@dataclass(eq=False)
class _Group:
    subs: list[Submission]
    started: float
    pending: set[str] = field(default_factory=set)
    """Block ids of this group not yet durable."""


class EmbeddedCommitter(Committer):
    """Groups → the processor chain (on one thread) → one insert per group → answers when durable.

    The chain runs on a dedicated thread; the insert runs on the writer's own thread, so the next
    group is processed while the previous one is written (chDB releases the GIL while it parses
    and writes). When the queue is empty the thread waits for the insert, so no answer lingers.
    """

    def __init__(
        self,
        server: ServerSettings,
        metrics: HttpMetrics,
        settings: Settings,
        conn: Connection,
        alerts: AlertPipeline | None = None,
        horizon: WriteHorizon | None = None,
    ) -> None:
        super().__init__(server, metrics)
        self.settings = settings
        self.horizon = horizon
        self.runtime = _server_runtime_class()(settings, conn, self._durable, alerts=alerts, metrics=metrics.pipeline)
        self.run_id = uuid.uuid4().hex[:12]
        """Part of every block id: unique per server process, so insert tokens never collide across runs."""
        self._seq = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="llmpulse-commit")
        self._awaiting: dict[str, _Group] = {}
        self._awaiting_lock = threading.Lock()

    def _durable(self, block: Block) -> None:
        """Writer thread: the block is in ClickHouse; a group whose blocks all are is answered."""
        done: list[_Group] = []
        batches: list[Any] = [*block.calls, *block.feedback, *block.judge_results]
        with self._awaiting_lock:
            for b in batches:
                grp = self._awaiting.pop(b.block_id, None)
                if grp is None:
                    continue
                grp.pending.discard(b.block_id)
                if not grp.pending:
                    done.append(grp)
        if self.horizon is not None:
            self.horizon.advance(time.time())  # inserts run one at a time: everything before is whole
        pm = self.metrics.pipeline
        pm.inserts.inc()
        pm.rows.inc(sum(len(b.events) + len(b.dead) for b in batches))
        assert self.loop is not None
        for grp in done:
            self.loop.call_soon_threadsafe(self.resolve, grp.subs, grp.started)

    async def commit(self, group: list[Submission], started: float) -> None:
        assert self.loop is not None
        self._seq += 1
        grp = _Group(group, started)
        await self.loop.run_in_executor(self._pool, self._process_and_write, grp, self._seq)

    def _process_and_write(self, grp: _Group, seq: int) -> None:
        """Commit thread: one pass of the chain per (route, kind) over the whole group, then write."""
        rt = self.runtime
        now = time.time()
        processed: list[tuple[str, Any]] = []
        for route in ("events", "otlp"):
            source = Source("http", "/v1/events") if route == "events" else Source("otlp", "/v1/traces")
            for kind in ("call", "feedback", "judge_result"):
                part = _Part()
                for sub in grp.subs:
                    if sub.route == route:
                        part.add(sub, kind)
                if not part.payloads:
                    continue
                offsets = list(range(len(part.payloads)))
                batch = PayloadBatch(source, part.payloads, offsets, digest=f"{self.run_id}.{seq}.{kind}")
                if kind == "call":
                    out: Any = rt.process_calls(batch, now)
                elif kind == "feedback":
                    out = rt.process_feedback(batch, now)
                else:
                    out = rt.process_judge_results(batch, now)
                part.tally(out)
                processed.append((kind, out))
        with self._awaiting_lock:
            for _, out in processed:
                grp.pending.add(out.block_id)
                self._awaiting[out.block_id] = grp
        for kind, out in processed:
            if kind == "call":
                rt.writer.add_calls(out)
            elif kind == "feedback":
                rt.writer.add_feedback(out)
            else:
                rt.writer.add_judge_results(out)
        # Start this insert (once the previous one is durable). With a long queue behind it, return at
        # once so the next group is processed while this one is written (chDB releases the GIL);
        # with a short one, wait: the requests arriving meanwhile then join one larger next group
        # instead of splitting into small ones, and every insert costs ~50 ms of fixed engine work.
        self._write(wait=self.queued_events < self.server.group_commit_max_events // 4)

    def _write(self, wait: bool) -> None:
        """Flush; a failed insert is retried with the same token until it succeeds (never skipped)."""
        from sinks.clickhouse import SinkError

        writer = self.runtime.writer
        delay = 1.0
        while True:
            try:
                if writer.failed is not None:
                    writer.retry_failed()
                writer.flush(wait=wait)
                self.failing = None
                return
            except SinkError as exc:
                self.failing = str(exc)
                self.metrics.pipeline.insert_errors.inc()
                log.error("ClickHouse write failed; retrying the same block in %.0f s: %s", delay, exc)
                if self._closing and delay >= 30.0:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def idle(self) -> None:
        assert self.loop is not None
        await self.loop.run_in_executor(self._pool, self._tick)

    def _tick(self) -> None:
        self.runtime.tick_idle(time.time())
        if self.runtime.writer.pending_rows:
            self._write(wait=True)

    async def close(self) -> None:
        await super().close()
        if self.loop is None:  # never started (start-up failed further on): nothing was accepted
            self.runtime.close()
            self._pool.shutdown(wait=True)
            return
        await self.loop.run_in_executor(self._pool, self._write, True)
        await self.loop.run_in_executor(self._pool, self.runtime.close)
        self._pool.shutdown(wait=True)


class _Part:
    """The payloads of one kind from several requests, back to back, and who sent which."""

    __slots__ = ("indexes", "payloads", "starts", "subs")

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.subs: list[Submission] = []
        self.starts: list[int] = []
        self.indexes: list[list[int]] = []

    def add(self, sub: Submission, kind: str) -> None:
        for k, items, index, _ in sub.events.kinds():
            if k == kind and items:
                self.subs.append(sub)
                self.starts.append(len(self.payloads))
                self.indexes.append(index)
                self.payloads.extend(items)

    def tally(self, out: Any) -> None:
        """Per request: accepted (surviving offsets, sorted), rejected (dead letters), duplicates (the rest).

        Each request owns a contiguous offset range, so counting is a bisection per request,
        not a lookup per event.
        """
        offsets: list[int] = out.offsets
        starts = self.starts
        rejected = [0] * len(self.subs)
        for d in out.dead:
            j = bisect_right(starts, d.offset) - 1
            rejected[j] += 1
            self.subs[j].outcome.reject(self.indexes[j][d.offset - starts[j]], d.path, d.reason)
        total = len(self.payloads)
        for j, sub in enumerate(self.subs):
            lo = starts[j]
            hi = starts[j + 1] if j + 1 < len(starts) else total
            accepted = bisect_left(offsets, hi) - bisect_left(offsets, lo)
            sub.outcome.accepted += accepted
            sub.outcome.duplicates += (hi - lo) - accepted - rejected[j]


# ---- distributed: Kafka


class KafkaCommitter(Committer):
    """Groups → one idempotent acks=all produce per group (calls keyed by feature, feedback by request id)."""

    def __init__(self, server: ServerSettings, metrics: HttpMetrics, kafka: KafkaSettings) -> None:
        super().__init__(server, metrics)
        from ingest.kafka import producer_options
        from ingest.sdk import KafkaTransport

        self.kafka = kafka
        opts = producer_options(kafka)
        self.transport = KafkaTransport(
            opts.pop("bootstrap_servers"),
            client_id=f"{opts.pop('client_id')}-serve",
            request_timeout_ms=int(max(server.commit_timeout, 1.0) * 1000),
            max_batch_size=1 << 20,
            **opts,
        )

    @property
    def target(self) -> str:
        return "Kafka broker"

    def failure(self, exc: Exception) -> Exception:
        return Unavailable(f"publishing to Kafka failed: {exc}")

    async def start(self) -> None:
        try:
            await self.transport.start()
        except Exception as exc:
            raise click.ClickException(
                f"cannot reach Kafka at {self.kafka.bootstrap_servers}: {exc}. Start the broker "
                "(bash deploy/kafka/kafka.sh start) or fix kafka.bootstrap_servers / --bootstrap-servers."
            ) from exc
        await super().start()

    async def commit(self, group: list[Submission], started: float) -> None:
        from ingest.sdk import OutMessage

        t = self.kafka.topics
        topics = {"call": t.calls, "feedback": t.feedback, "judge_result": t.judge_results}
        messages: list[OutMessage] = []
        owners: dict[int, tuple[Submission, int, str]] = {}
        for sub in group:
            for kind, payloads, index, keys in sub.events.kinds():
                for payload, i, key in zip(payloads, index, keys, strict=True):
                    m = OutMessage(topics[kind], key, payload)
                    owners[id(m)] = (sub, i, kind)
                    messages.append(m)
        delivery = await self.transport.send(messages)
        failed: dict[int, int] = {}
        for m in delivery.retry:
            sub = owners[id(m)][0]
            failed[id(sub)] = failed.get(id(sub), 0) + 1
        for m in delivery.rejected:
            sub, i, _ = owners[id(m)]
            sub.outcome.accepted = max(0, sub.outcome.accepted - 1)
            sub.outcome.reject(i, "$", f"refused by Kafka: {delivery.error}")
        if delivery.restart:
            log.warning("restarting the Kafka producer after: %s", delivery.error)
            with contextlib.suppress(Exception):
                await self.transport.stop()
            try:
                await self.transport.start()
            except Exception as exc:
                self.failing = f"Kafka producer cannot restart: {exc}"
        self.failing = f"Kafka did not acknowledge: {delivery.error}" if failed else None
        ok = [s for s in group if id(s) not in failed]
        bad = [s for s in group if id(s) in failed]
        if bad:
            self.resolve(bad, started, Unavailable(f"Kafka did not acknowledge every event: {delivery.error}"))
        self.resolve(ok, started)

    async def close(self) -> None:
        await super().close()
        with contextlib.suppress(Exception):
            await self.transport.stop()


# --------------------------------------------------------------------------------------------
# reads: free SQL and named queries


@dataclass(frozen=True, slots=True)
class NamedQuery:
    name: str
    sql: str
    params: dict[str, str]
    """Parameter → ClickHouse type, as declared in the SQL (``{start:DateTime}``)."""
    description: str

    @property
    def tenant_scoped(self) -> bool:
        return self.params.get("tenant") == "String"


def named_queries() -> dict[str, NamedQuery]:
    from sinks import queries

    out: dict[str, NamedQuery] = {}
    for name in queries.names():
        text = queries.sql(name)
        out[name] = NamedQuery(name, text, declared_params(text), queries.describe(name))
    return out


def declared_params(sql: str) -> dict[str, str]:
    """``{name:Type}`` query parameters of a statement (comment lines are not part of it)."""
    code = "\n".join(ln for ln in sql.splitlines() if not ln.lstrip().startswith("--"))
    params: dict[str, str] = {}
    for p, t in _PARAM.findall(code):
        params.setdefault(p, t.strip())
    return params


def coerce_params(sql: str, params: dict[str, Any]) -> dict[str, Any]:
    """JSON parameter values → bindable values, by the type each parameter is declared with in ``sql``."""
    declared = declared_params(sql)
    return {k: coerce_param(k, declared[k], v) if k in declared else v for k, v in params.items()}


def coerce_param(name: str, ch_type: str, value: Any) -> Any:
    """JSON values → what clickhouse-connect binds: epoch seconds or ISO 8601 strings for DateTime params."""
    base = ch_type.split("(", 1)[0]
    if base in ("DateTime", "DateTime64", "Date", "Date32"):
        if isinstance(value, bool):
            raise Problem(400, "bad_parameter", f"parameter `{name}` ({ch_type}): expected a time, got a boolean")
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                raise Problem(
                    400,
                    "bad_parameter",
                    f"parameter `{name}` ({ch_type}): expected ISO 8601 or epoch seconds, got {value!r}",
                ) from None
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        raise Problem(400, "bad_parameter", f"parameter `{name}` ({ch_type}): expected ISO 8601 or epoch seconds")
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


class QueryService:
    """Read-only queries on their own ClickHouse client.

    On chDB the client is a separate engine handle set to ``readonly = 1`` once, after its
    limits: ClickHouse then refuses any write, DDL, table function (``file()``, ``url()``) and any
    attempt to change a setting (so the limits hold), whatever the SQL says. ``readonly = 2``
    would still allow ``file()``, so 1 it is. On a ClickHouse server (no sessions) every query
    carries ``readonly = 2`` plus the limits; give the server a read-only user as well.
    """

    def __init__(self, settings: Settings, server: ServerSettings) -> None:
        from sinks.clickhouse import connect

        self.server = server
        self.conn = connect(settings.clickhouse, settings.data_dir, purpose="llmpulse serve (queries)")
        self.client: Client = self.conn.client
        limits = {
            "max_execution_time": math.ceil(server.query_timeout),
            "max_result_rows": server.query_max_rows,
            "result_overflow_mode": "'throw'",
        }
        self.per_query: dict[str, Any] = {}
        self.client.database = self.conn.database
        if self.conn.embedded:
            self.client.command("SELECT 1")  # applies the database (USE) before the handle turns read-only
            for key, value in limits.items():
                self.client.command(f"SET {key} = {value}")
            self.client.command("SET readonly = 1")
        else:
            self.per_query = {k: str(v).strip("'") for k, v in limits.items()} | {"readonly": 2}
        self.catalog = named_queries()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="llmpulse-query")

    def _run(self, sql: str, params: dict[str, Any] | None) -> dict[str, Any]:
        started = time.perf_counter()
        result = self.client.query(sql, parameters=params or None, settings=self.per_query or None)
        return {
            "columns": list(result.column_names),
            "types": [t.name for t in result.column_types],
            "rows": [list(r) for r in result.result_rows],
            "row_count": len(result.result_rows),
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 2),
        }

    async def run(self, sql: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        from clickhouse_connect.driver.exceptions import ClickHouseError

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._run, sql, params)
        except ClickHouseError as exc:
            message = str(exc).strip().split("\n")[0]
            message = re.sub(r"^(Code: \d+\. )?(DB::Exception: )+", "", message)
            raise Problem(400, "query_failed", message) from None

    def resolve(self, name: str, principal: Principal, given: dict[str, Any]) -> tuple[NamedQuery, dict[str, Any]]:
        """Which query and with which bound parameters; the tenant comes from the key."""
        query = self.catalog.get(name)
        if query is None:
            raise Problem(404, "not_found", f"no named query {name!r}; GET /v1/queries lists them")
        params = dict(given)
        if not principal.admin:
            if not query.tenant_scoped:
                raise Problem(
                    403, "forbidden",
                    f"named query {name!r} is not filtered by tenant; tenant keys may run only the queries that "
                    "take {tenant:String} (GET /v1/queries marks them)",
                )  # fmt: skip
            asked = params.get("tenant")
            if asked not in (None, "", principal.tenant):  # '' (every tenant) narrows to the key's own
                raise Problem(403, "forbidden", f"this key belongs to tenant {principal.tenant!r}, not {asked!r}")
            params["tenant"] = principal.tenant
        elif query.tenant_scoped:
            params.setdefault("tenant", "")
        for key, value in _query_defaults().items():  # the same defaults `sinks.queries.run` applies
            if key in query.params:
                params.setdefault(key, value)
        params = {k: v for k, v in params.items() if k in query.params}  # extra ones are ignored, as locally
        missing = sorted(set(query.params) - set(params))
        if missing:
            raise Problem(
                400, "bad_parameter",
                f"named query {name!r} needs {_describe_params(query)}; missing: {', '.join(missing)}",
            )  # fmt: skip
        return query, {k: coerce_param(k, query.params[k], v) for k, v in params.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.conn.close()


def _query_defaults() -> dict[str, Any]:
    from sinks import queries

    return dict(getattr(queries, "DEFAULTS", {}))


def _describe_params(q: NamedQuery) -> str:
    return ", ".join(f"{k} ({t})" for k, t in q.params.items()) or "no parameters"


# --------------------------------------------------------------------------------------------
# the HTTP application


def response(**kwargs: Any) -> web.Response:
    """``aiohttp.web.Response`` (aiohttp is imported on first use: the CLI loads this module for every command)."""
    from aiohttp import web as aio

    return aio.Response(**kwargs)


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return response(
        status=status,
        body=orjson.dumps(body, default=_json_default, option=orjson.OPT_NON_STR_KEYS),
        content_type="application/json",
        headers=headers,
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def rpc_status(code: int, message: str) -> bytes:
    """``google.rpc.Status{code, message}`` in protobuf, by hand: its message class lives in
    googleapis-common-protos, which the server does not otherwise need."""
    text = message.encode()
    return (b"\x08" + _varint(code) if code else b"") + b"\x12" + _varint(len(text)) + text


def otlp_error(problem: Problem, content_type: str | None) -> web.Response:
    """OTLP/HTTP failures carry a ``google.rpc.Status`` in the request's encoding."""
    from ingest.otlp import OtlpDecodeError, media_type

    code = {400: 3, 401: 16, 403: 7, 413: 8, 415: 3, 422: 3, 429: 8, 503: 14}.get(problem.status, 13)
    message = problem.message if problem.path is None else f"{problem.message} (at {problem.path})"
    try:
        binary = media_type(content_type) == "protobuf"
    except OtlpDecodeError:
        binary = False
    if binary:
        body = rpc_status(code, message)
        return response(
            status=problem.status, body=body, content_type="application/x-protobuf", headers=problem.all_headers()
        )
    return json_response(problem.status, {"code": code, "message": message}, problem.all_headers())


class IngestServer:
    """The aiohttp application, its committer (embedded or Kafka) and its read side."""

    def __init__(self, settings: Settings, server: ServerSettings, mode: Mode) -> None:
        from sinks.metrics import PipelineMetrics

        self.settings = settings
        self.server = server
        self.mode = mode
        self.pipeline_metrics = PipelineMetrics()
        self.metrics = HttpMetrics(self.pipeline_metrics)
        self.limiter = RateLimiter(server.default_rate_limit)
        self.keys: KeyRing | None = None
        self.committer: Committer | None = None
        self.queries: QueryService | None = None
        self.conn: Connection | None = None
        self.alerts: AlertPipeline | None = None
        self.idempotency: IdempotencyStore | None = None
        self.horizon: WriteHorizon | None = None
        self.recovered: Recovery | None = None
        self.validator: EventValidator | None = None
        self.otlp_options: OtlpOptions | None = None
        self.url: str | None = None
        self.token_path: Path | None = None
        self._runner: web.AppRunner | None = None
        self._reloader: asyncio.Task[None] | None = None
        self.started_at = time.time()

    # -- lifecycle ------------------------------------------------------------------------------

    def _open_data(self) -> str | None:
        """Embedded: take the data directory (migrated) and start the pipeline; returns a local token."""
        from llmpulse.alerting import AlertPipeline
        from llmpulse.runtime import open_clickhouse
        from sinks.rollups import WriteHorizon

        self.conn = open_clickhouse(self.settings, purpose="llmpulse serve")
        if self.conn.lock is not None:  # the only writer of this chDB directory
            self.horizon = WriteHorizon(self.conn.lock.data_dir / WRITE_HORIZON)
            started = time.perf_counter()
            self.recovered = self.horizon.recover(self.conn)
            if self.recovered is not None:
                rebuilt = sorted({t for tables in self.recovered.rebuilt.values() for t in tables})
                log.warning(
                    "the last run of this data directory stopped without a clean shutdown: rollups of the rows "
                    "written since its last whole insert checked in %.1f s (%s); %d call and %d feedback ids "
                    "of its last inserts remembered, so a client retrying a request it got no answer for is "
                    "not counted twice",
                    time.perf_counter() - started,
                    f"rebuilt {', '.join(rebuilt)} from raw" if rebuilt else "all whole",
                    len(self.recovered.ids.get("llm_calls", ())), len(self.recovered.ids.get("feedback", ())),
                )  # fmt: skip
            self.horizon.advance(time.time(), force=True)
        if self.settings.alerting.enabled:
            self.alerts = AlertPipeline(self.settings, self.conn, metrics=self.pipeline_metrics)
        self.queries = QueryService(self.settings, self.server)
        journal = None
        token = None
        if self.conn.lock is not None:
            journal = self.conn.lock.data_dir / IDEMPOTENCY_JOURNAL
            if self.server.local_admin_token:
                token = "lpl_" + secrets.token_urlsafe(32)
                self.token_path = self.conn.lock.data_dir / TOKEN_FILE
                fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(token)
        self.idempotency = IdempotencyStore(
            self.server.idempotency_keys_per_tenant, self.server.idempotency_ttl, journal
        )
        return token

    async def start(self) -> str:
        from aiohttp import web as aio

        from ingest.otlp import OtlpOptions
        from llmpulse.runtime import validation_limits

        o = self.server.otlp
        defaults = OtlpOptions()
        self.otlp_options = OtlpOptions(
            feature_keys=tuple(o.feature_keys) if o.feature_keys is not None else defaults.feature_keys,
            team_keys=tuple(o.team_keys) if o.team_keys is not None else defaults.team_keys,
            prompt_version_keys=(
                tuple(o.prompt_version_keys) if o.prompt_version_keys is not None else defaults.prompt_version_keys
            ),
            variant_keys=tuple(o.variant_keys) if o.variant_keys is not None else defaults.variant_keys,
            user_id_keys=tuple(o.user_id_keys) if o.user_id_keys is not None else defaults.user_id_keys,
            default_feature=o.default_feature,
            include_content=o.include_content,
            max_extra_attributes=o.max_extra_attributes,
            max_attribute_chars=o.max_attribute_chars,
            input_excludes_cache_providers=frozenset(p.lower() for p in o.input_excludes_cache_providers),
        )
        token: str | None = None
        if self.mode == "embedded":
            token = await asyncio.to_thread(self._open_data)
            assert self.conn is not None
            self.committer = EmbeddedCommitter(
                self.server, self.metrics, self.settings, self.conn, self.alerts, self.horizon
            )
            if self.recovered is not None:
                runtime = self.committer.runtime
                runtime.calls.dedup.remember(self.recovered.ids.get("llm_calls", ()))
                runtime.feedback.dedup.remember(self.recovered.ids.get("feedback", ()))
                self.recovered.ids.clear()  # held by the dedup step now, as hashes
        else:
            self.validator = EventValidator(validation_limits(self.settings))
            self.idempotency = IdempotencyStore(self.server.idempotency_keys_per_tenant, self.server.idempotency_ttl)
            if self.settings.clickhouse.url:
                self.queries = await asyncio.to_thread(QueryService, self.settings, self.server)
            self.committer = KafkaCommitter(self.server, self.metrics, self.settings.kafka)
        self.keys = KeyRing(self.server, token)
        if not len(self.keys):
            log.warning(
                "no API keys configured: every request will answer 401. Create one with "
                "`llmpulse keys create --tenant NAME --keys-file keys.yaml` and set server.keys_file."
            )
        await self.committer.start()
        app = aio.Application(client_max_size=self.server.max_body_bytes, middlewares=[self._middleware])
        app.router.add_post("/v1/events", self.handle_events)
        app.router.add_post("/v1/traces", self.handle_traces)
        app.router.add_get("/healthz", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/reports/latest", self.handle_report)
        app.router.add_get("/reports/{name}", self.handle_report)
        app.router.add_post("/v1/query", self.handle_query)
        app.router.add_get("/v1/queries", self.handle_list_queries)
        app.router.add_post("/v1/queries/{name}", self.handle_named_query)
        # auto_decompress off: aiohttp would inflate gzip without a bound; decode_content enforces one
        self._runner = aio.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=30.0, auto_decompress=False
        )
        await self._runner.setup()
        site = aio.TCPSite(self._runner, self.server.host, self.server.port, backlog=1024, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise click.ClickException(
                f"cannot listen on {self.server.host}:{self.server.port}: {exc.strerror or exc}; "
                "choose another --port (server.port) or stop what holds it"
            ) from exc
        port = int(self._runner.addresses[0][1])
        host = self.server.host if self.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        if self.conn is not None and self.conn.lock is not None:
            self.conn.lock.update(server_url=self.url)
        self._reloader = asyncio.create_task(self._reload_keys())
        return self.url

    async def _reload_keys(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            if self.keys is not None:
                self.keys.reload_if_changed()

    async def stop(self) -> None:
        """Stop listening, answer what is in flight, write everything, release the data directory."""
        if self._reloader is not None:
            self._reloader.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.committer is not None:
            await self.committer.close()
        if self.horizon is not None:
            self.horizon.close()  # everything accepted is written, views included: nothing to check next time
        if self.idempotency is not None:
            self.idempotency.close()
        if self.queries is not None:
            await asyncio.to_thread(self.queries.close)
        if self.alerts is not None:
            self.alerts.close()
        if self.token_path is not None:
            with contextlib.suppress(OSError):
                self.token_path.unlink()
        if self.conn is not None:
            self.conn.close()

    # -- plumbing -------------------------------------------------------------------------------

    async def _middleware_impl(self, request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        from aiohttp import web as aio

        started = time.perf_counter()
        resource = request.match_info.route.resource
        route = self.metrics.route(resource.canonical if resource is not None else None)
        try:
            response = await handler(request)
        except Problem as problem:
            self.metrics.refused.labels(problem.code).inc()
            if route == "/v1/traces":
                response = otlp_error(problem, request.headers.get("Content-Type"))
            else:
                response = json_response(problem.status, problem.body(), problem.all_headers())
        except aio.HTTPException as exc:
            response = exc
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            response = json_response(500, {"error": "internal error; see the server log", "code": "internal"})
        self.metrics.requests.labels(route, str(response.status)).inc()
        self.metrics.duration.labels(route).observe(time.perf_counter() - started)
        return response

    @property
    def _middleware(self) -> Any:
        from aiohttp import web as aio

        @aio.middleware
        async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
            return await self._middleware_impl(request, handler)

        return middleware

    def authenticate(self, request: web.Request) -> Principal:
        key = presented_key(request.headers)
        hint = "create one with `llmpulse keys create --tenant NAME`"
        if key is None:
            raise Problem(
                401, "unauthorized",
                f"missing API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`); {hint}",
                headers={"WWW-Authenticate": 'Bearer realm="llmpulse"'},
            )  # fmt: skip
        assert self.keys is not None
        principal = self.keys.authenticate(key)
        if principal is None:
            raise Problem(
                401, "unauthorized", f"invalid API key (unknown or revoked); {hint}",
                headers={"WWW-Authenticate": 'Bearer realm="llmpulse", error="invalid_token"'},
            )  # fmt: skip
        return principal

    def _rate_limited(self, principal: Principal, wait: float, what: str) -> Problem:
        limit = principal.rate_limit or self.server.default_rate_limit
        rate = f" ({limit.events_per_second:g} events/s)" if limit is not None else ""
        return Problem(429, "rate_limited", f"rate limit of {principal.describe()}{rate} reached for {what}; "
                       "retry after the time in Retry-After", retry_after=wait)  # fmt: skip

    async def read_body(self, request: web.Request) -> bytes:
        from aiohttp import web as aio

        length = request.content_length
        limit = self.server.max_body_bytes
        if length is not None and length > limit:
            raise Problem(
                413, "body_too_large",
                f"the body is {length} bytes, over the {limit}-byte limit (server.max_body_bytes): "
                "send smaller batches",
            )  # fmt: skip
        try:
            body = await request.read()
        except aio.HTTPRequestEntityTooLarge:
            raise Problem(
                413, "body_too_large",
                f"the body is over the {limit}-byte limit (server.max_body_bytes): send smaller batches",
            ) from None  # fmt: skip
        return decode_content(body, request.headers.get("Content-Encoding"), self.server)

    def _idempotency_key(self, request: web.Request) -> str | None:
        key = request.headers.get("Idempotency-Key")
        if key is None:
            return None
        if not _IDEMPOTENCY_KEY.match(key):
            raise Problem(
                400, "bad_idempotency_key",
                f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters without spaces",
            )  # fmt: skip
        return key

    async def _ingest(
        self,
        request: web.Request,
        route: Route,
        parse: Callable[[bytes, Principal], tuple[ParsedEvents, Any]],
        respond: Callable[[Outcome, Any], tuple[int, bytes, str]],
    ) -> web.Response:
        """Auth → limits → parse → idempotency → group commit → the answer (also remembered for retries).

        Overload (503) is checked before the rate limit takes its tokens: a request the server had no
        room for has not used the key's budget, so its retry is not refused with 429 for it.
        """
        principal = self.authenticate(request)
        assert self.committer is not None and self.idempotency is not None
        key = self._idempotency_key(request)
        if key is None or self.idempotency.get(principal.tenant, key) is None:  # a replay is answered even so
            problem = self.committer.overloaded()
            if problem is not None:
                raise problem
        wait = self.limiter.check_request(principal)
        if wait:
            raise self._rate_limited(principal, wait, "requests")
        body = await self.read_body(request)
        tenant = principal.tenant
        digest = ""
        if key is not None:
            digest = xxhash.xxh3_128_hexdigest(body + b"\x00" + (request.headers.get("Content-Type") or "").encode())
            seen = self.idempotency.get(tenant, key)
            if seen is not None:
                if seen.body_hash != digest:
                    raise Problem(
                        422, "idempotency_key_reused",
                        "this Idempotency-Key was used with a different body; use a new key for a new batch",
                    )  # fmt: skip
                if seen.response is None and seen.future is not None:
                    await self._wait(seen.future, None)
                    seen = self.idempotency.get(tenant, key)
                if seen is not None and seen.response is not None:
                    status, data, ctype = seen.response
                    return response(
                        status=status, body=data, content_type=ctype, headers={"Idempotent-Replayed": "true"}
                    )
        parsed, context = parse(body, principal)
        self.metrics.events.labels(route, self.metrics.tenant(tenant)).inc(parsed.count)
        if parsed.count == 0:
            status, data, ctype = respond(Outcome(), context)
            return response(status=status, body=data, content_type=ctype)
        problem = self.committer.overloaded(parsed.count, parsed.nbytes)
        if problem is not None:
            raise problem
        wait = self.limiter.check_events(principal, parsed.count)
        if wait:
            raise self._rate_limited(principal, wait, f"{parsed.count} events")
        loop = asyncio.get_running_loop()
        sub = Submission(route, parsed, loop.create_future(), time.monotonic())
        if self.validator is not None:
            sub.outcome = self.validator(parsed, time.time())
        answer: dict[str, tuple[int, bytes, str]] = {}

        def finished(fut: asyncio.Future[Outcome]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                if key is not None:
                    self.idempotency.forget(tenant, key)  # type: ignore[union-attr]
                return
            answer["r"] = respond(fut.result(), context)
            if key is not None:
                self.idempotency.complete(tenant, key, *answer["r"])  # type: ignore[union-attr]

        sub.future.add_done_callback(finished)
        if key is not None:
            self.idempotency.begin(tenant, key, digest, sub.future)
        self.committer.submit(sub)
        await self._wait(sub.future, sub)
        await asyncio.sleep(0)  # let the done-callback run
        status, data, ctype = answer["r"]
        return response(status=status, body=data, content_type=ctype)

    async def _wait(self, future: asyncio.Future[Outcome], sub: Submission | None) -> Outcome:
        assert self.committer is not None
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=self.server.commit_timeout)
        except TimeoutError:
            landing = sub is None or not self.committer.cancel(sub)
            tail = (
                "its events are being written and will land exactly once; retry with the same Idempotency-Key "
                "to get the answer"
                if landing
                else "nothing was kept; retry later"
            )
            raise Problem(
                503, "timeout",
                f"not durable within {self.server.commit_timeout:g} s (server.commit_timeout): {tail}",
                retry_after=2,
            ) from None  # fmt: skip
        except Unavailable as exc:
            raise Problem(503, "unavailable", f"{exc}; retry later", retry_after=2) from None

    # -- handlers ---------------------------------------------------------------------------------

    async def handle_events(self, request: web.Request) -> web.Response:
        def parse(body: bytes, principal: Principal) -> tuple[ParsedEvents, None]:
            return parse_events(body, request.headers.get("Content-Type"), principal,
                                self.server.max_events_per_request, keys=self.mode == "kafka"), None  # fmt: skip

        def respond(outcome: Outcome, _: None) -> tuple[int, bytes, str]:
            return 200, orjson.dumps(outcome.to_json()), "application/json"

        return await self._ingest(request, "events", parse, respond)

    async def handle_traces(self, request: web.Request) -> web.Response:
        from ingest.otlp import OtlpDecodeError, OtlpResult, UnsupportedContentType, encode_response, map_request

        content_type = request.headers.get("Content-Type")

        def parse(body: bytes, principal: Principal) -> tuple[ParsedEvents, OtlpResult]:
            assert self.otlp_options is not None
            try:
                result = map_request(body, content_type, self.otlp_options, tenant=principal.tenant)
            except UnsupportedContentType as exc:
                raise Problem(415, "unsupported_media_type", exc.reason) from None
            except OtlpDecodeError as exc:
                raise Problem(400, "malformed_body", exc.reason, path=exc.path) from None
            spans = self.metrics.otlp_spans
            spans.labels("call").inc(len(result.events))
            spans.labels("ignored_non_genai").inc(result.ignored_non_genai)
            spans.labels("ignored_other").inc(result.ignored_other)
            spans.labels("invalid").inc(len(result.invalid))
            if len(result.events) > self.server.max_events_per_request:
                raise Problem(
                    413, "too_many_events",
                    f"{len(result.events)} GenAI call spans in one request, over the limit of "
                    f"{self.server.max_events_per_request} (server.max_events_per_request): export smaller batches",
                )  # fmt: skip
            parsed = ParsedEvents()
            parsed.calls = result.payloads()
            parsed.call_index = list(range(len(parsed.calls)))
            parsed.call_keys = [str(e.get("feature", "")).encode() or None for e in result.events]
            parsed.nbytes = sum(len(p) for p in parsed.calls)
            return parsed, result

        def respond(outcome: Outcome, result: OtlpResult) -> tuple[int, bytes, str]:
            for index, path, reason in outcome.errors:
                ident = result.events[index].get("event_id", "?") if index < len(result.events) else "?"
                result.invalid.append((f"{reason} ({path})", f"event {ident}"))
            body = encode_response(result, content_type)
            ctype = "application/json" if content_type and "json" in content_type.lower() else "application/x-protobuf"
            return 200, body, ctype

        return await self._ingest(request, "otlp", parse, respond)

    async def handle_health(self, request: web.Request) -> web.Response:
        c = self.committer
        assert c is not None
        stalled = c.stalled_for()
        healthy = stalled <= self.server.stall_timeout and c.failing is None
        body = {
            "status": "ok" if healthy else "degraded",
            "mode": self.mode,
            "pending_events": c.pending_events,
            "pending_bytes": c.pending_bytes,
            "committed_events": c.committed_events,
            "oldest_write_in_progress_s": round(stalled, 3),
            "error": c.failing,
            "uptime_s": round(time.time() - self.started_at, 1),
        }
        return json_response(200 if healthy else 503, body)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        data = generate_latest(self.pipeline_metrics.registry)
        return response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_report(self, request: web.Request) -> web.Response:
        """The weekly report ``llmpulse report weekly`` wrote (``<data_dir>/reports/latest.html``), and files beside it.

        It covers every tenant, so it needs an admin key unless ``server.reports_public`` (a
        server that only listens on localhost, say).
        """
        if not self.server.reports_public:
            if presented_key(request.headers) is None:
                raise Problem(
                    401, "unauthorized",
                    "the weekly report covers every tenant: send an admin key (`Authorization: Bearer <key>`), or "
                    "set server.reports_public: true to serve it without one (a server that listens on localhost)",
                    headers={"WWW-Authenticate": 'Bearer realm="llmpulse"'},
                )  # fmt: skip
            principal = self.authenticate(request)
            if not principal.admin:
                raise Problem(403, "forbidden", "the weekly report covers every tenant: it needs an admin key")
        folder = Path(self.settings.data_dir) / REPORTS_DIR
        name = request.match_info.get("name", "latest")
        if not _REPORT_FILE.match(name):
            raise Problem(404, "not_found", f"no report file {name!r}")
        path = folder / (REPORT_LATEST if name == "latest" else name)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            if name != "latest":
                raise Problem(404, "not_found", f"no report file {name!r} in {folder}") from None
            raise Problem(
                404, "no_report",
                f"no weekly report yet ({path} does not exist): run `llmpulse report weekly` "
                "(it writes reports/latest.html into the data directory), then reload this page",
            ) from None  # fmt: skip
        ctype = _REPORT_TYPES.get(path.suffix.lower(), "application/octet-stream")
        return response(body=data, content_type=ctype, headers={"Cache-Control": "no-cache"})

    def _queries(self) -> QueryService:
        if self.queries is None:
            raise Problem(
                501, "not_available",
                "this server publishes to Kafka and does not hold the data: query ClickHouse directly, "
                "or give the server clickhouse.url",
            )  # fmt: skip
        return self.queries

    async def _json_body(self, request: web.Request) -> Any:
        body = await self.read_body(request)
        if not body.strip():
            return {}
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise Problem(400, "malformed_body", f"not valid JSON: {exc}", path="$") from None

    async def handle_query(self, request: web.Request) -> web.Response:
        principal = self.authenticate(request)
        if not principal.admin:
            raise Problem(
                403, "forbidden",
                "free SQL needs an admin key; tenant keys run named queries: GET /v1/queries, POST /v1/queries/{name}",
            )  # fmt: skip
        queries = self._queries()
        if (request.headers.get("Content-Type") or "").startswith("text/plain"):
            sql, params = (await self.read_body(request)).decode("utf-8", "replace"), None
        else:
            payload = await self._json_body(request)
            if not isinstance(payload, dict) or not isinstance(payload.get("sql"), str):
                raise Problem(400, "malformed_body", 'expected {"sql": "SELECT ...", "params": {...}}', path="$.sql")
            sql, params = payload["sql"], payload.get("params")
            if params is not None and not isinstance(params, dict):
                raise Problem(400, "malformed_body", "params must be an object", path="$.params")
            if params:
                params = coerce_params(sql, params)
        return json_response(200, await queries.run(sql, params))

    async def handle_list_queries(self, request: web.Request) -> web.Response:
        principal = self.authenticate(request)
        catalog = self._queries().catalog
        rows = [
            {"name": q.name, "description": q.description, "params": q.params, "tenant_scoped": q.tenant_scoped}
            for q in catalog.values()
            if principal.admin or q.tenant_scoped
        ]
        return json_response(200, {"queries": rows})

    async def handle_named_query(self, request: web.Request) -> web.Response:
        principal = self.authenticate(request)
        queries = self._queries()
        name = request.match_info["name"]
        if not _NAME.match(name):
            raise Problem(404, "not_found", f"no named query {name!r}; GET /v1/queries lists them")
        payload = await self._json_body(request)
        if not isinstance(payload, dict):
            raise Problem(400, "malformed_body", "expected a JSON object of query parameters", path="$")
        params = payload.get("params", payload) if isinstance(payload.get("params"), dict) else payload
        query, bound = queries.resolve(name, principal, params)
        result = await queries.run(query.sql, bound)
        result["query"] = name
        return json_response(200, result)


# --------------------------------------------------------------------------------------------
# running it


async def _serve(settings: Settings, server: ServerSettings, mode: Mode, ready: Callable[[str], None]) -> None:
    app = IngestServer(settings, server, mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        url = await app.start()
        ready(url)
        await stop.wait()
        log.info("stopping: answering requests in flight and writing what is queued")
    finally:
        await app.stop()


def run_server(settings: Settings, server: ServerSettings, mode: Mode, ready: Callable[[str], None]) -> None:
    """Block until SIGTERM/SIGINT; then drain: every request answered 2xx is durable."""
    from llmpulse.runtime import tune_gc

    tune_gc()
    asyncio.run(_serve(settings, server, mode, ready))


# --------------------------------------------------------------------------------------------
# ClickHouse users and row policies per tenant (server deployments)


def tenant_tables(database: str = "llmpulse") -> list[str]:
    """Tables (not views) of the packaged migrations that have a ``tenant`` column."""
    from schemas.config import RetentionSettings
    from sinks.migrations import packaged_migrations, render_params

    params = render_params(database, RetentionSettings())
    found: list[str] = []
    for migration in packaged_migrations():
        for stmt in migration.statements(params):
            match = re.match(r"CREATE TABLE IF NOT EXISTS\s+[^.\s]+\.(\w+)", stmt)
            if match and re.search(r"^\s*tenant\s", stmt, re.MULTILINE) and match.group(1) not in found:
                found.append(match.group(1))
    return found


def _sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ident(value: str) -> str:
    return "`" + value.replace("`", "``") + "`"


def clickhouse_user(tenant: str, prefix: str = "llmpulse_t_") -> str:
    return f"{prefix}{tenant.replace('-', '_').replace('.', '_')}"


def tenant_sql(
    tenants: dict[str, str],
    *,
    database: str = "llmpulse",
    admin_users: Sequence[str] = ("default",),
    tables: Sequence[str] | None = None,
    query_timeout_s: int = 30,
    max_result_rows: int = 100_000,
) -> str:
    """CREATE USER/GRANT/ROW POLICY statements: each tenant's user reads only its own rows.

    ``tenants`` maps tenant → sha256 hex of its ClickHouse password (never the password). The
    admin users get an all-rows policy on the same tables, because once a table has row policies
    a user without one may see nothing (depending on ``users_without_row_policies_can_read_rows``).
    Row policies filter reads only: inserts (and the rollup views they feed) are unaffected.
    """
    chosen = list(tables) if tables is not None else tenant_tables(database)
    db = _ident(database)
    lines = [
        "-- llmpulse: per-tenant ClickHouse users with row policies (generated by `llmpulse tenant-sql`).",
        f"-- Tables with a tenant column: {', '.join(chosen)}. Tenant users get SELECT on those only.",
        "CREATE SETTINGS PROFILE IF NOT EXISTS llmpulse_tenant SETTINGS readonly = 1, "
        f"max_execution_time = {query_timeout_s}, max_result_rows = {max_result_rows}, result_overflow_mode = 'throw';",
    ]
    for admin in admin_users:
        for table in chosen:
            lines.append(
                f"CREATE ROW POLICY IF NOT EXISTS llmpulse_all_rows ON {db}.{_ident(table)} FOR SELECT USING 1 "
                f"TO {_ident(admin)};"
            )
    for tenant, password_sha256 in sorted(tenants.items()):
        user = _ident(clickhouse_user(tenant))
        lines.append(f"-- tenant {tenant}")
        lines.append(
            f"CREATE USER IF NOT EXISTS {user} IDENTIFIED WITH sha256_hash BY {_sql_string(password_sha256)} "
            f"DEFAULT DATABASE {db} SETTINGS PROFILE 'llmpulse_tenant';"
        )
        for table in chosen:
            lines.append(f"GRANT SELECT ON {db}.{_ident(table)} TO {user};")
            lines.append(
                f"CREATE ROW POLICY IF NOT EXISTS {_ident('tenant_' + tenant)} ON {db}.{_ident(table)} FOR SELECT "
                f"USING tenant = {_sql_string(tenant)} TO {user};"
            )
    return "\n".join(lines) + "\n"


def split_statements(sql: str) -> list[str]:
    return [s.strip() for s in re.split(r";\s*$", sql, flags=re.MULTILINE) if s.strip() and not _only_comments(s)]


def _only_comments(s: str) -> bool:
    return all(not ln.strip() or ln.strip().startswith("--") for ln in s.splitlines())


# --------------------------------------------------------------------------------------------
# commands: registered by the CLI entry point (llmpulse.cli), since this module imports llmpulse.commands


@click.command("serve")
@click.option("--host", default=None, help="Address to listen on [config server.host, default 127.0.0.1].")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="[config server.port, default 4318; 0: any]")
@click.option(
    "--kafka/--embedded",
    "use_kafka",
    default=None,
    help="Publish to Kafka, or run the pipeline in-process [config server.mode, default embedded].",
)
@click.option(
    "--keys-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="API keys (YAML/JSON of key_hash, tenant, role) [config server.keys_file].",
)
@_kafka_options
@_data_options
@_friendly_errors
def serve(
    host: str | None, port: int | None, use_kafka: bool | None, keys_file: Path | None,
    bootstrap_servers: str | None, config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None,
) -> None:  # fmt: skip
    """HTTP ingest (events, OTLP GenAI spans) and read API; 2xx means durable.

    Embedded (default): the server holds the data directory, runs the pipeline and answers queries
    for the CLI. --kafka: events go to the calls/feedback topics for `llmpulse worker`.
    """
    from pydantic import ValidationError

    from llmpulse import console

    settings = _kafka_settings(config_path, data_dir, clickhouse_url, bootstrap_servers)
    base = server_settings(settings)
    overrides: dict[str, Any] = {"host": host, "port": port, "keys_file": keys_file}
    if use_kafka is not None:
        overrides["mode"] = "kafka" if use_kafka else "embedded"
    try:
        server = ServerSettings.model_validate(
            {**base.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        )
        KeyRing(server)  # a broken keys file stops the start, with the file and entry named
    except (ValidationError, KeysFileError) as exc:
        console.error(str(exc), "Fix the keys file or the server settings named above.")
        raise SystemExit(2) from None

    def ready(url: str) -> None:
        where = f"data {settings.data_dir}" if server.mode == "embedded" and not settings.clickhouse.url else ""
        if server.mode == "kafka":
            where = f"Kafka {settings.kafka.bootstrap_servers} → {settings.kafka.topics.calls}"
        elif settings.clickhouse.url:
            where = "ClickHouse server"
        sys.stdout.write(f"llmpulse serve: listening on {url} ({server.mode}; {where})\n")
        sys.stdout.flush()

    run_server(settings, server, server.mode, ready)


@click.group("keys")
def keys() -> None:
    """API keys for `llmpulse serve`: create one, or hash one made elsewhere."""


@keys.command("create")
@click.option("--tenant", required=True, help="Events sent with the key are filed under this tenant.")
@click.option(
    "--role",
    type=click.Choice(["tenant", "admin"]),
    default="tenant",
    show_default=True,
    help="admin keys may also run free SQL (POST /v1/query) and send judge results.",
)
@click.option("--name", default=None, help="Who holds the key (shown in logs), e.g. checkout-service.")
@click.option(
    "--events-per-second",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Rate limit for this key (token bucket; burst 2 s worth).",
)
@click.option(
    "--keys-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append the entry to this keys file (created if missing); else print it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print {key, entry} as JSON.")
def keys_create(
    tenant: str, role: str, name: str | None, events_per_second: float | None, keys_file: Path | None, as_json: bool
) -> None:
    """Make a new API key: printed once, stored only as its hash."""
    from pydantic import ValidationError

    key = "lpk_" + secrets.token_urlsafe(32)
    limit = {"events_per_second": events_per_second} if events_per_second else None
    try:
        entry = TenantKey.model_validate(
            {"key_hash": hash_api_key(key), "tenant": tenant, "role": role, "name": name, "rate_limit": limit}
        )
    except ValidationError as exc:
        raise click.BadParameter(exc.errors()[0]["msg"], param_hint="--tenant") from None
    record = entry.model_dump(exclude_none=True)
    if keys_file is not None:
        _append_key(keys_file, record)
    if as_json:
        sys.stdout.write(json.dumps({"key": key, "entry": record, "keys_file": str(keys_file or "")}) + "\n")
        return
    import yaml

    click.echo(f"API key for tenant {tenant} ({role}); shown once, store it now:\n\n    {key}\n")
    if keys_file is not None:
        click.echo(f"Its hash was added to {keys_file}; a running server picks it up within seconds.")
    else:
        click.echo("Add this entry to the server's keys file (server.keys_file):\n")
        click.echo(yaml.safe_dump([record], sort_keys=False).rstrip())


def _append_key(path: Path, record: dict[str, Any]) -> None:
    import yaml

    existing: list[Any] = []
    if path.exists():
        data = yaml.safe_load(path.read_text()) or []
        existing = data.get("keys", []) if isinstance(data, dict) else list(data)
    existing.append(record)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(existing, sort_keys=False))
    os.replace(tmp, path)


@keys.command("hash")
@click.argument("key", required=False)
def keys_hash(key: str | None) -> None:
    """Print the at-rest hash of KEY (or of the key on stdin), for the keys file."""
    value = key if key is not None else sys.stdin.readline().strip()
    if not value:
        raise click.UsageError("give the key as an argument or on stdin")
    click.echo(hash_api_key(value))


@click.command("tenant-sql")
@click.option("--tenant", "tenants", multiple=True, help="Tenant to create a user for (repeatable).")
@click.option(
    "--keys-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Also every tenant that has a key in this file.",
)
@click.option(
    "--admin-user",
    "admin_users",
    multiple=True,
    default=("default",),
    show_default=True,
    help="ClickHouse users that must keep seeing every row (llmpulse's own).",
)
@click.option("--database", default=None, help="[config clickhouse.database]")
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None, envvar="LLMPULSE_CONFIG"
)
def tenant_sql_command(
    tenants: tuple[str, ...], keys_file: Path | None, admin_users: tuple[str, ...], database: str | None,
    config_path: Path | None,
) -> None:  # fmt: skip
    """SQL for a ClickHouse server: one read-only user per tenant, with row policies on every tenant table.

    Prints the SQL on stdout and each new user's password on stderr (once; only its hash is in the SQL).
    Run it with clickhouse-client --multiquery as an admin.
    """
    import hashlib

    from schemas.config import load_settings

    names = set(tenants)
    if keys_file is not None:
        names |= {k.tenant for k in load_keys_file(keys_file) if k.role == "tenant"}
    if not names:
        raise click.UsageError("name at least one --tenant, or a --keys-file with tenant keys")
    db = database or load_settings(config_path).clickhouse.database
    passwords = {t: secrets.token_urlsafe(24) for t in sorted(names)}
    sys.stdout.write(
        tenant_sql(
            {t: hashlib.sha256(p.encode()).hexdigest() for t, p in passwords.items()},
            database=db,
            admin_users=admin_users,
        )
    )
    for t, p in passwords.items():
        click.echo(f"{clickhouse_user(t)}\t{p}", err=True)


def main() -> None:
    """``python -m llmpulse.server``: the serve command on its own (the CLI registers the same one)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_repeats()
    serve(prog_name="llmpulse serve")


def _register() -> None:
    from llmpulse.commands import cli

    for command in (serve, keys, tenant_sql_command):
        cli.add_command(command)


_register()

if __name__ == "__main__":
    main()


__all__ = [
    "IngestServer",
    "KeyRing",
    "Principal",
    "RateLimiter",
    "clickhouse_user",
    "is_key_hash",
    "keys",
    "named_queries",
    "parse_events",
    "run_server",
    "serve",
    "server_settings",
    "tenant_sql",
    "tenant_sql_command",
    "tenant_tables",
]
