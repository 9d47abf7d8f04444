"""ClickHouseSink: one code path to chDB (embedded) and to a server over HTTP.

The only difference between the two is how the client is built (``connect``); every insert
and query below runs the same on both. The sink owns what writing needs: retries with
backoff on transient failures, deduplication tokens so a retried or replayed block is
written once (rollup views included: ``deduplicate_blocks_in_dependent_materialized_views``),
and the insert order that makes recovery safe (dead letters before raw rows, see
``write``).
"""

from __future__ import annotations

import logging
import math
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import clickhouse_connect
import orjson
import pyarrow as pa
import xxhash
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from processors.chain import (
    ProcessedCalls,
    ProcessedFeedback,
    ProcessedJudgeResults,
    drop_stored,
    feedback_key,
    verdict_key,
)
from processors.quality import Lineage
from processors.records import DeadLetter
from processors.sampling import REASON_FLAGGED, JudgeSampler, pick_sampler
from schemas.config import ClickHouseSettings, ConfigError
from schemas.wire import WireCall
from sinks import columns
from sinks.lock import DataDirLock

log = logging.getLogger("llmpulse.sink")

T = TypeVar("T")

# ClickHouse error codes worth retrying: overload, timeouts, network, keeper, read-only replica
RETRYABLE_CODES = frozenset({3, 159, 202, 209, 210, 241, 242, 252, 319, 425, 999})

INSERT_SETTINGS: dict[str, Any] = {
    "deduplicate_blocks_in_dependent_materialized_views": 1,
    "insert_deduplicate": 1,
    # one block per insert: a block is the unit of deduplication and of crash atomicity
    "max_insert_block_size": 10_000_000,
    "min_insert_block_size_rows": 0,
    "min_insert_block_size_bytes": 0,
    "input_format_null_as_default": 1,
    # ReplacingMergeTree would otherwise sort-and-collapse every inserted block on the way in:
    # 3.3 µs per raw row on chDB (8.8 → 5.5 µs). Repeats are rare within a block (each pipeline
    # drops repeats it has seen; a block can join several Kafka partitions' batches), they
    # were always possible across blocks until a merge, and readers of replacing tables use
    # FINAL or deduplicate on the sorting key; the rollup views saw the uncollapsed block anyway.
    "optimize_on_insert": 0,
}


LOOKUP_RECENT_S = 86_400.0
"""Feedback and verdicts come minutes to hours after their call, so request-id lookups read
``llm_calls`` for the day before the earliest of them first (``recent_span``). It is sorted by
(feature, day, event_id): ``request_id IN (...)`` alone reads the whole column, which grows with
the table: 200 ids cost 0.2 s of CPU at 5M calls over ten days and 0.8-1.0 s at 20M over forty,
against 0.05-0.1 s for either reading the recent day. Ids not found there get a second pass over
the whole table. ``judge_samples`` (a few percent of the calls) is read whole."""
LOOKUP_SKEW_S = 3_600.0
"""How far after the newest feedback or verdict its call may be stamped (clock skew between services)."""

Span = tuple[float, float]
"""(earliest, latest) epoch seconds of the events whose calls are looked up."""


def recent_span(ts: Iterable[float]) -> Span | None:
    """The span of a block's feedback or verdict times, or None when it has none."""
    times = list(ts)
    return (min(times), max(times)) if times else None


def _within(
    span: Span | None, before: float = LOOKUP_RECENT_S, after: float = LOOKUP_SKEW_S
) -> tuple[str, dict[str, int]]:
    """The condition (and its parameters) that keeps a lookup to the rows around ``span``: on the
    sorting key's day, so ClickHouse skips every other day's granules."""
    if span is None:
        return "", {}
    lo = math.floor(round((span[0] - before) * 1000, 3))  # whole milliseconds around the span
    hi = math.ceil(round((span[1] + after) * 1000, 3))
    cond = "ts >= fromUnixTimestamp64Milli({lo:Int64}) AND ts <= fromUnixTimestamp64Milli({hi:Int64}) AND "
    return cond, {"lo": lo, "hi": hi}


IDS = "JSONExtract($ids$, 'Array(String)')"
"""A lookup's request ids in its SQL: one heredoc of JSON spliced in by clickhouse-connect (``id_lists``)."""
ID_SET = f"(SELECT arrayJoin({IDS}))"
"""``IDS`` as the right side of ``IN``: a subquery, so ClickHouse builds one hash set. ``IN`` an
array expression tested each row against the array: 49k ids against 200k stored calls took 9.2 s
(37 s with ``has``), the subquery 0.12 s."""
IDS_MAX_BYTES = 131_072
"""ClickHouse parses at most ``max_query_size`` (256 KiB by default) of a query: longer id lists are split."""


def ids_json(ids: Sequence[str]) -> bytes:
    """Ids as one JSON array for the ``IDS`` heredoc: a ``$`` is written ``\\u0024``, so none closes it."""
    return orjson.dumps(list(ids)).replace(b"$", b"\\u0024")


def id_lists(ids: Sequence[str]) -> Iterator[bytes]:
    """Request ids as JSON arrays for ``IDS``, each at most ``IDS_MAX_BYTES``.

    Not a bound ``Array(String)`` parameter: clickhouse-connect escapes every bound string one
    character at a time in Python (9 ms for 2,000 ids), and chDB then parses the array
    literal. A heredoc needs no escaping (a ``$`` in an id is written ``\\u0024``, so nothing can
    close it early) and ClickHouse's JSON parser reads it: a lookup of 2,000 ids in a 200k-call
    table costs 6.0 ms of CPU this way against 11.7 ms bound (1.8 ms of it the scan).
    """
    data = ids_json(ids)
    if len(data) <= IDS_MAX_BYTES or len(ids) <= 1:
        yield data
        return
    half = len(ids) // 2
    yield from id_lists(ids[:half])
    yield from id_lists(ids[half:])


class SinkError(RuntimeError):
    """Writing failed after every retry; the caller must not commit the batch."""


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError):
        return True
    if isinstance(exc, DatabaseError):
        code = getattr(exc, "code", None)
        return code in RETRYABLE_CODES
    return isinstance(exc, ConnectionError | TimeoutError)


def chdb_path(data_dir: Path) -> Path:
    return data_dir / "chdb"


def _server_client(settings: ClickHouseSettings) -> Client:
    url = urllib.parse.urlsplit(settings.url or "")
    if url.scheme not in {"http", "https"} or not url.hostname:
        raise ConfigError(f"clickhouse.url: expected http(s)://host:port of a ClickHouse server, got {settings.url!r}")
    secure = url.scheme == "https"
    try:
        return _get_server_client(settings, url, secure)
    except DatabaseError as exc:
        where = f"{url.scheme}://{url.hostname}:{url.port or (8443 if secure else 8123)}"  # never the credentials
        raise SinkError(f"cannot connect to the ClickHouse server at {where}: {_root_cause(exc)}") from None


def _root_cause(exc: BaseException) -> str:
    """The innermost reason (``Connection refused``, ``Name or service not known``): the driver's own
    message wraps it in three layers of pool and retry wording that tell a user nothing."""
    seen: set[int] = set()
    inner: BaseException = exc
    while (nxt := inner.__cause__ or inner.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        inner = nxt
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    return str(inner).strip().split("\n")[0] or type(inner).__name__


def _get_server_client(settings: ClickHouseSettings, url: urllib.parse.SplitResult, secure: bool) -> Client:
    return clickhouse_connect.get_client(
        host=url.hostname,
        port=url.port or (8443 if secure else 8123),
        username=urllib.parse.unquote(url.username) if url.username else settings.username,
        password=urllib.parse.unquote(url.password) if url.password else settings.secret_password(),
        secure=secure,
        verify=settings.verify_tls,
        ca_cert=str(settings.ca_cert) if settings.ca_cert else None,
        connect_timeout=settings.connect_timeout_s,
        send_receive_timeout=settings.send_receive_timeout_s,
        autogenerate_session_id=False,
    )


@dataclass
class Connection:
    """A client plus what owning it implies (the data-dir lock for chDB)."""

    client: Client
    database: str
    embedded: bool
    lock: DataDirLock | None = None
    description: str = ""

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.lock is not None:
                self.lock.release()


def connect(settings: ClickHouseSettings, data_dir: Path, *, purpose: str = "llmpulse") -> Connection:
    """The client for the configured target; embedded chDB takes the data directory's lock.

    chDB allows one process per data directory. Taking our own lock first turns the
    engine's cryptic lock failure into a message naming the process that holds it.
    """
    if settings.url:
        client = _server_client(settings)
        url = urllib.parse.urlsplit(settings.url)
        where = f"{url.scheme}://{url.hostname}:{url.port or ''}"  # never the credentials
        return Connection(client, settings.database, embedded=False, description=f"server {where}")
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock(data_dir)
    lock.acquire(purpose)
    try:
        client = clickhouse_connect.get_client(interface="chdb", path=str(chdb_path(data_dir)))
    except Exception:
        lock.release()
        raise
    return Connection(client, settings.database, embedded=True, lock=lock, description=f"embedded chDB {data_dir}")


@dataclass
class RetryPolicy:
    retries: int = 8
    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def run(self, what: str, fn: Callable[[], T]) -> T:
        delay = self.first_delay_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:
                if not is_retryable(exc) or attempt == self.retries:
                    raise SinkError(f"{what} failed after {attempt + 1} attempt(s): {exc}") from exc
                log.warning("%s failed (attempt %d), retrying in %.1fs: %s", what, attempt + 1, delay, exc)
                self.sleep(delay)
                delay = min(delay * 2, self.max_delay_s)
        raise AssertionError("unreachable")


@dataclass
class KafkaProgress:
    partition: int
    from_offset: int
    written: set[int]

    @property
    def max_written(self) -> int | None:
        return max(self.written) if self.written else None


@dataclass
class WriteStats:
    inserts: int = 0
    rows: int = 0
    seconds: float = 0.0
    failures: int = 0


class ClickHouseSink:
    """Writes processed batches; ``token`` makes a block idempotent (same token, written once)."""

    def __init__(self, conn: Connection, retry: RetryPolicy | None = None) -> None:
        self.conn = conn
        self.client = conn.client
        self.db = conn.database
        self.retry = retry or RetryPolicy()
        self.stats = WriteStats()

    def _insert(self, table: str, data: pa.Table, token: str | None) -> None:
        if data.num_rows == 0:
            return
        settings = dict(INSERT_SETTINGS)
        if token:
            settings["insert_deduplication_token"] = token
        started = time.perf_counter()
        try:
            self.retry.run(
                f"insert into {self.db}.{table}",
                lambda: self.client.insert_arrow(table, data, database=self.db, settings=settings),
            )
        except SinkError:
            self.stats.failures += 1
            raise
        self.stats.inserts += 1
        self.stats.rows += data.num_rows
        self.stats.seconds += time.perf_counter() - started

    def _lookup(
        self, what: str, sql: str, ids: Sequence[str], parameters: Mapping[str, Any] | None = None
    ) -> tuple[list[str], list[Sequence[Any]]]:
        """Runs ``sql`` (which names the ids as ``IDS``, once) for every list ``id_lists`` makes,
        retried; returns the column names and every list's rows. A query must not group across
        request ids: each list is answered on its own."""
        names: list[str] = []
        rows: list[Sequence[Any]] = []
        for chunk in id_lists(ids):
            params = {**(parameters or {}), "$ids$": chunk}
            result = self.retry.run(what, partial(self.client.query, sql, parameters=params))
            names = list(result.column_names)
            rows += result.result_rows
        return names, rows

    def _recent_first(
        self, what: str, sql: Callable[[str], str], ids: Sequence[str], span: Span | None
    ) -> tuple[list[str], list[Sequence[Any]]]:
        """``sql(where)`` over the calls around ``span`` (``_within``), then over the whole table
        for the ids that pass did not find; each row names its ``request_id``."""
        names: list[str] = []
        rows: list[Sequence[Any]] = []
        missing = list(ids)
        for window in (span, None) if span is not None else (None,):
            if not missing:
                break
            where, bounds = _within(window)
            names, found = self._lookup(what, sql(where), missing, bounds)
            rows += found
            seen = {r[names.index("request_id")] for r in found}
            missing = [i for i in missing if i not in seen]
        return names, rows

    def write(self, batches: Sequence[ProcessedCalls], token: str | None) -> None:
        """Dead letters, then raw calls (rollups follow by view), then judge samples.

        The order matters for the Kafka path: progress is read back from the raw table, so
        anything a crash could leave unwritten must come before the raw block, and is keyed
        so that writing it again deduplicates.
        """
        dead = [d for b in batches for d in b.dead]
        if dead:
            self.write_dead_letters(dead, f"{token}:dlq" if token else None)
        if any(b.events for b in batches):
            self._insert("llm_calls", columns.concat([columns.batch_columns(b) for b in batches if b.events]), token)
        if any(b.samples for b in batches):
            self._insert("judge_samples", columns.samples_table(batches), f"{token}:samples" if token else None)

    @staticmethod
    def encode_calls(batch: ProcessedCalls) -> pa.Table:
        """The writer hands each batch here as it is added, so its columns are built hot."""
        return columns.batch_columns(batch)

    def write_dead_letters(self, letters: list[DeadLetter], token: str | None) -> None:
        self._insert("dlq", columns.dlq_table(letters), token)

    def write_feedback(self, batches: Sequence[ProcessedFeedback], token: str | None) -> None:
        """Feedback with its call's lineage copied in (per-release feedback needs no join later)."""
        dead = [d for b in batches for d in b.dead]
        if dead:
            self.write_dead_letters(dead, f"{token}:dlq" if token else None)
        fresh = [b for b in batches if b.events and not b.checked_stored]
        if fresh:
            stored = self.stored_keys("feedback", ("request_id", "feedback_id"),
                                      {e.request_id for b in fresh for e in b.events})  # fmt: skip
            for b in fresh:
                drop_stored(b, stored, feedback_key)
        if any(b.events for b in batches):
            span = recent_span(t for b in batches for t in b.ts)
            known = self.lineage({e.request_id for b in batches for e in b.events}, span)
            self._insert("feedback", columns.feedback_table(batches, known), token)
            for b in batches:
                b.lineage = {e.request_id: known[e.request_id] for e in b.events if e.request_id in known}

    def write_relinked_feedback(self, rows: list[dict[str, Any]], known: Mapping[str, Lineage]) -> None:
        """Feedback rows read back unlinked, written again with their calls' lineage
        (``sinks.relink``). The token is the rows' keys: a retried or repeated relink of the
        same rows is one insert, so the rollup view counts them once."""
        keys = sorted(f"{r['request_id']}\x00{r['feedback_id']}" for r in rows)
        token = "relink:" + xxhash.xxh3_128_hexdigest("\n".join(keys).encode())
        self._insert("feedback", columns.relinked_feedback_table(rows, known), token)

    def write_judge_results(
        self, batches: Sequence[ProcessedJudgeResults], token: str | None, known: Mapping[str, Lineage] | None = None
    ) -> None:
        dead = [d for b in batches for d in b.dead]
        if dead:
            self.write_dead_letters(dead, f"{token}:dlq" if token else None)
        fresh = [b for b in batches if b.events and not b.checked_stored]
        if fresh:
            stored = self.stored_keys("judge_scores", ("request_id", "rubric", "judge_model"),
                                      {r.request_id for b in fresh for r in b.events})  # fmt: skip
            for b in fresh:
                drop_stored(b, stored, verdict_key)
        if any(b.events for b in batches):
            if known is None:
                span = recent_span(r.ts.timestamp() for b in batches for r in b.events)
                known = self.lineage({r.request_id for b in batches for r in b.events}, span)
            self._insert("judge_scores", columns.judge_scores_table(batches, known), token)
            for b in batches:
                b.lineage = {r.request_id: known[r.request_id] for r in b.events if r.request_id in known}

    def written_ids(self, table: str, column: str, ids: Sequence[str], span: Span) -> list[str]:
        """The ids among these that ``table`` already holds in ``column``, read around ``span`` (the
        rows' times, to the second). One query however many ids: a replayed chunk of 50k calls
        is ~2 MB of JSON, over ClickHouse's 256 KiB ``max_query_size``, which the query raises
        for itself rather than splitting into lookups that would each scan the span again."""
        if not ids:
            return []
        where, bounds = _within(span, before=1.0, after=1.0)
        data = ids_json(ids)
        sql = f"SELECT DISTINCT {column} FROM {self.db}.{table} WHERE {where}{column} IN {ID_SET}"
        result = self.retry.run(
            f"written {table} lookup",
            partial(self.client.query, sql, parameters={**bounds, "$ids$": data},
                    settings={"max_query_size": len(sql) + len(data) + 65_536}),
        )  # fmt: skip
        return [str(r[0]) for r in result.result_rows]

    def stored_keys(self, table: str, key: tuple[str, ...], request_ids: Iterable[str]) -> set[tuple[str, ...]]:
        """The sorting keys ``table`` already holds for these requests (``drop_stored`` skips them)."""
        ids = sorted(set(request_ids))
        _, rows = self._lookup(
            f"stored {table} lookup",
            f"SELECT DISTINCT {', '.join(key)} FROM {self.db}.{table} WHERE request_id IN {ID_SET}",
            ids,
        )
        return {tuple(str(v) for v in r) for r in rows}

    def lineage(self, request_ids: Iterable[str], span: Span | None = None) -> dict[str, Lineage]:
        """The calls behind these request ids: judge samples first (small), then raw calls.

        ``judge_samples`` (a few percent of the calls) is read whole, as before, so a verdict on a
        call flagged days after it was made still finds its sample. With ``span`` (the feedback's
        or verdicts' times) ``llm_calls`` is read first for the day before it
        (``LOOKUP_RECENT_S``), where nearly every call is, and only the ids not found there are
        looked for in the whole table: the common lookup costs a day of calls, however long the
        history.

        A request id that two tenants' calls share has no lineage: a verdict or a thumb on it
        cannot be told apart, and attributing it to either call would show one tenant's verdict
        (rationale included) to the other through the tenant-bound queries. The check covers the
        rows a pass reads, so a request id reused by another tenant more than a day before the
        call found in the recent pass goes unnoticed."""
        wanted = sorted(set(request_ids))
        if not wanted:
            return {}
        select = (
            "SELECT request_id, any(event_id), any(ts), any(feature), any(team), any(model), any(provider), "
            "any(prompt_version), any(variant), any(release_id), "
        )
        group = "GROUP BY request_id HAVING uniqExact(tenant) = 1"
        _, rows = self._lookup(
            "lineage lookup",
            f"{select}any(reason) FROM {self.db}.judge_samples WHERE request_id IN {ID_SET} {group}",
            wanted,
        )
        found = {r[0]: Lineage(*r[1:]) for r in rows}
        missing = [r for r in wanted if r not in found]
        if missing:
            _, rows = self._recent_first(
                "lineage lookup",
                lambda where: f"{select}'' FROM {self.db}.llm_calls WHERE {where}request_id IN {ID_SET} {group}",
                missing,
                span,
            )
            found.update((r[0], Lineage(*r[1:])) for r in rows)
        return found

    def sample_flagged(
        self,
        request_ids: Iterable[str],
        samplers: Sequence[JudgeSampler],
        reason: str = REASON_FLAGGED,
        span: Span | None = None,
    ) -> list[str]:
        """Users flagged these calls: sample each for the judge unless it was sampled already.

        The stream's sampler decides, not this method: flagged calls take the same per-feature
        boost cap and judge budgets (calls/hour, estimated USD/day) as the errors and refusals it
        boosts, so a flood of thumbs-downs cannot buy unlimited judging; refusals are counted in
        the sampler's ``capped``. ``samplers`` are the ones this process runs (one per owned
        partition of llm.calls); a call goes to the one already counting its feature
        (``pick_sampler``). With none, nothing is sampled: no budget, no judging.

        ``span`` (the flagging feedback's times) reads ``llm_calls`` for the recent day first, as
        ``lineage`` does; each request's earliest call there is the one sampled, and only ids not
        found there are looked for in the whole table. Whether a request was sampled already is
        read from all of ``judge_samples``. The calls chosen are copied by event id, so the sample
        is the call the budget was charged for.

        Returns the request ids newly sampled, so the caller can send exactly those to the judge.
        """
        ids = sorted(set(request_ids))
        if not ids:
            return []
        if not samplers:
            log.warning("%d flagged calls not sent to the judge: this process runs no judge sampler", len(ids))
            return []
        _, rows = self._recent_first(
            "flagged call lookup",
            lambda where: (
                f"WITH {IDS} AS wanted SELECT event_id, ts, request_id, conversation_id, feature, model, "
                "input_tokens, output_tokens, latency_ms, status, refusal, request_id IN (SELECT request_id "
                f"FROM {self.db}.judge_samples WHERE request_id IN wanted) AS sampled "
                f"FROM {self.db}.llm_calls WHERE {where}request_id IN wanted "
                "ORDER BY ts, request_id LIMIT 1 BY request_id"
            ),
            ids,
            span,
        )
        rows = sorted((r for r in rows if not r[-1]), key=lambda r: (r[1], r[2]))  # budgets go oldest first
        by_sampler: dict[int, tuple[JudgeSampler, list[WireCall], list[float]]] = {}
        flagged_at = time.time()  # the judging is spent now: this hour's and day's budgets pay for it
        for r in rows:
            ts = r[1] if r[1].tzinfo else r[1].replace(tzinfo=UTC)
            e = WireCall(
                event_id=r[0], ts=ts, request_id=r[2], conversation_id=r[3] or None, feature=r[4], model=r[5],
                input_tokens=r[6], output_tokens=r[7], latency_ms=r[8], status=r[9], refusal=bool(r[10]),
            )  # fmt: skip
            sampler = pick_sampler(samplers, e.feature)
            _, events, times = by_sampler.setdefault(id(sampler), (sampler, [], []))
            events.append(e)
            times.append(flagged_at)
        fresh = [
            str(events[s.index].request_id)
            for sampler, events, times in by_sampler.values()
            for s in sampler.flagged(events, times)
        ]
        if fresh:
            picked = set(fresh)
            chosen = [r for r in rows if r[2] in picked]
            made = (t.timestamp() for t in (r[1] if r[1].tzinfo else r[1].replace(tzinfo=UTC) for r in chosen))
            where, bounds = _within(recent_span(made), before=0.0, after=0.0)
            self.retry.run(
                "sample flagged calls",
                lambda: self.client.command(
                    f"INSERT INTO {self.db}.judge_samples (event_id, ts, reason, feature, team, tenant, model, "
                    "provider, prompt_version, variant, release_id, request_id, conversation_id, status, refusal, "
                    "prompt_hash, prompt, output) "
                    f"SELECT event_id, ts, {{reason:String}}, feature, team, tenant, model, provider, prompt_version, "
                    "variant, release_id, request_id, conversation_id, status, refusal, prompt_hash, prompt, output "
                    f"FROM {self.db}.llm_calls WHERE {where}event_id IN {{events:Array(String)}} "
                    "AND request_id IN {ids:Array(String)} LIMIT 1 BY event_id",
                    parameters={"events": [r[0] for r in chosen], "ids": fresh, "reason": reason, **bounds},
                ),
            )
        return fresh

    def sampled_requests(self, request_ids: Iterable[str], span: Span | None = None) -> list[dict[str, Any]]:
        """Judge requests for calls already in ``judge_samples``, in the shape the stream sends
        (``sinks.kafka.judge_request``): the release tuple and the fields ``judge_samples`` does
        not keep are read from the raw call, so a call flagged after the fact is judged and filed
        exactly like one sampled in the stream. ``span`` as in ``sample_flagged``."""
        names, rows = self._recent_first(
            "judge request lookup",
            lambda where: (
                f"WITH {IDS} AS wanted SELECT s.event_id AS event_id, s.request_id AS request_id, "
                "s.conversation_id AS conversation_id, "
                "s.ts AS ts, s.reason AS reason, s.feature AS feature, s.team AS team, s.tenant AS tenant, "
                "c.service AS service, s.release_id AS release_id, s.prompt_version AS prompt_version, "
                "s.model AS model, c.response_model AS response_model, c.adapter AS adapter, "
                "c.feature_view AS feature_view, c.guardrail_version AS guardrail_version, c.release AS extra, "
                "s.variant AS variant, s.provider AS provider, s.status AS status, s.refusal AS refusal, "
                "c.finish_reason AS finish_reason, s.prompt_hash AS prompt_hash, s.prompt AS prompt, "
                "s.output AS output, c.output_chars AS output_chars "
                f"FROM (SELECT * FROM {self.db}.judge_samples WHERE {where}request_id IN wanted "
                "LIMIT 1 BY request_id) AS s "
                "LEFT JOIN (SELECT event_id, service, response_model, adapter, feature_view, guardrail_version, "
                f"release, finish_reason, output_chars FROM {self.db}.llm_calls "
                f"WHERE {where}request_id IN wanted LIMIT 1 BY event_id) AS c "
                "ON c.event_id = s.event_id"
            ),
            sorted(set(request_ids)),
            span,
        )
        found = [dict(zip(names, row, strict=True)) for row in rows]
        out = []
        for r in found:
            for k in ("conversation_id", "team", "tenant", "service", "variant", "provider", "finish_reason",
                      "prompt_hash", "prompt_version", "response_model", "adapter", "feature_view",
                      "guardrail_version"):  # fmt: skip
                r[k] = r[k] or None  # ClickHouse keeps an absent field as '': the stream sends null
            ts = r["ts"] if r["ts"].tzinfo else r["ts"].replace(tzinfo=UTC)
            r["ts"] = ts.isoformat()
            r["release"] = {
                "prompt_version": r.pop("prompt_version"),
                "model": r["model"],
                "response_model": r.pop("response_model"),
                "adapter": r.pop("adapter"),
                "feature_view": r.pop("feature_view"),
                "guardrail_version": r.pop("guardrail_version"),
                **r.pop("extra"),
            }
            r["refusal"] = bool(r["refusal"])
            out.append(r)
        return out

    def kafka_progress(self, topic: str, partition: int, from_offset: int) -> KafkaProgress:
        """Offsets at or above ``from_offset`` already written for a partition (raw rows and DLQ).

        The worker skips exactly these when it re-reads after a crash: a block written to
        ClickHouse but never committed to Kafka is not written again (nor counted twice by the
        rollup views). A set rather than a maximum, because one insert block spanning two
        monthly partitions is not atomic.
        """
        params = {"p": partition, "o": from_offset, "t": topic}
        rows = self.client.query(
            "SELECT kafka_offset FROM llm_calls WHERE source = 'kafka' AND kafka_partition = {p:Int32} "
            "AND kafka_offset >= {o:Int64} "
            "UNION ALL SELECT source_offset FROM dlq WHERE source = 'kafka' AND source_name = {t:String} "
            "AND source_partition = {p:Int32} AND source_offset >= {o:Int64}",
            parameters=params,
        ).result_rows
        offsets = {int(r[0]) for r in rows}
        return KafkaProgress(partition, from_offset, offsets)

    def window_rows(self, partition: int, since: float) -> list[dict[str, Any]]:
        """Rows of one Kafka partition from ``since`` on: what rebuilds its open windows after a crash."""
        sql = (
            "SELECT event_id, ts, feature, team, model, provider, prompt_version, variant, status, refusal, "
            "cost_usd, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, output_chars, "
            "schema_valid, tool_calls, latency_ms, ttft_ms, response_model, trace_id, conversation_id "
            "FROM llm_calls FINAL "
            "WHERE source = 'kafka' AND kafka_partition = {p:Int32} AND ts >= fromUnixTimestamp64Milli({s:Int64})"
        )
        return self.query_rows(sql, {"p": partition, "s": int(since * 1000)})

    def get_meta(self, key: str) -> str | None:
        rows = self.client.query(
            "SELECT value FROM llmpulse_meta FINAL WHERE key = {k:String}", parameters={"k": key}
        ).result_rows
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self.retry.run(
            "write llmpulse_meta",
            lambda: self.client.insert(f"{self.db}.llmpulse_meta", [[key, value]], column_names=["key", "value"]),
        )

    def query_rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        result = self.retry.run("query", lambda: self.client.query(sql, parameters=parameters))
        names = result.column_names
        return [dict(zip(names, row, strict=True)) for row in result.result_rows]
