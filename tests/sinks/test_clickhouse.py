"""The sink against the real ClickHouse engine (chDB through clickhouse-connect)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from clickhouse_connect.driver.exceptions import OperationalError, ProgrammingError

import sinks.clickhouse as ch
from ingest.synthetic import Scenario, generate
from llmpulse.runtime import EmbeddedRuntime
from processors.chain import CallPipeline
from processors.records import Source
from schemas.prices import builtin_price_table
from sinks.clickhouse import ClickHouseSink, RetryPolicy, SinkError, _within
from sinks.lock import DataDirBusy, DataDirLock
from sinks.migrations import migrate
from tests.conftest import NOW, batch, iso, payload, scalar

SCENARIO = Scenario(events=30_000, days=1, seed=11, end=NOW - 3600)


def run_scenario(settings: Any, conn: Any) -> EmbeddedRuntime:
    runtime = EmbeddedRuntime(settings, conn)
    offset = 0
    for payloads in generate(SCENARIO, 5_000):
        runtime.ingest(batch(payloads, Source("demo", "test"), offset, digest="run-1"), now=NOW, mixed=False)
        offset += len(payloads)
    runtime.finish()
    runtime.close()
    return runtime


def rollup_vs_raw(conn: Any) -> list[tuple]:
    """Rows where the minute rollup disagrees with a recomputation from FINAL raw rows."""
    sql = """
    SELECT r.minute, r.feature, r.model, r.calls, x.calls, r.cost, x.cost, r.errors, x.errors,
           r.refusals, x.refusals, r.out_tokens, x.out_tokens
    FROM (
        SELECT minute, feature, model, sum(calls) calls, round(sum(cost_usd), 9) cost, sum(errors) errors,
               sum(refusals) refusals, sum(output_tokens) out_tokens
        FROM llm_calls_1m GROUP BY minute, feature, model) AS r
    FULL OUTER JOIN (
        SELECT toStartOfMinute(ts) minute, feature, model, count() calls, round(sum(ifNull(cost_usd, 0)), 9) cost,
               countIf(status != 'ok') errors, countIf(refusal) refusals, sum(output_tokens) out_tokens
        FROM llm_calls FINAL GROUP BY minute, feature, model) AS x
    USING (minute, feature, model)
    WHERE r.calls != x.calls OR abs(r.cost - x.cost) > 1e-6 OR r.errors != x.errors
          OR r.refusals != x.refusals OR r.out_tokens != x.out_tokens
    """
    return conn.client.query(sql).result_rows


def test_rollups_equal_recomputation_from_raw(settings: Any, conn: Any) -> None:
    runtime = run_scenario(settings, conn)
    c = runtime.stats.counters
    assert scalar(conn, "SELECT count() FROM llm_calls FINAL") == c.accepted
    assert scalar(conn, "SELECT sum(calls) FROM llm_calls_1m") == c.accepted
    assert scalar(conn, "SELECT count() FROM dlq") == c.rejected > 0
    assert rollup_vs_raw(conn) == []
    # percentiles from the rollup's t-digest states within 2% of quantileExact on raw
    rows = conn.client.query(
        """
        SELECT feature, q, e FROM
          (SELECT feature, quantilesTDigestMerge(0.5, 0.9, 0.95, 0.99)(latency_ms_q) q
           FROM llm_calls_1m GROUP BY feature) AS a
        JOIN (SELECT feature, quantilesExact(0.5, 0.9, 0.95, 0.99)(latency_ms) e
              FROM llm_calls FINAL GROUP BY feature) AS b USING feature
        """
    ).result_rows
    assert len(rows) == 6
    for feature, q, e in rows:
        for got, want in zip(q, e, strict=True):
            assert abs(got - want) / want < 0.02, (feature, q, e)


def test_replaying_a_block_does_not_count_twice(settings: Any, conn: Any) -> None:
    pipeline = CallPipeline(builtin_price_table())
    processed = pipeline.process(batch([payload(event_id=f"r{i}") for i in range(500)], digest="d1"), NOW)
    sink = ClickHouseSink(conn)
    sink.write([processed], processed.block_id)
    sink.write([processed], processed.block_id)  # a retry after a lost acknowledgement
    assert scalar(conn, "SELECT count() FROM llm_calls") == 500  # not even before merges
    assert scalar(conn, "SELECT sum(calls) FROM llm_calls_1m") == 500
    other = CallPipeline(builtin_price_table()).process(
        batch([payload(event_id=f"s{i}") for i in range(10)], digest="d2"), NOW
    )
    sink.write([other], other.block_id)
    assert scalar(conn, "SELECT sum(calls) FROM llm_calls_1m") == 510


@pytest.mark.parametrize("first_run_in_one_piece", [False, True])
@pytest.mark.parametrize("kind", ["http", "file"])
def test_a_batch_bigger_than_a_part_is_written_whole_and_replays_without_counting_twice(
    settings: Any, conn: Any, monkeypatch: Any, first_run_in_one_piece: bool, kind: str
) -> None:
    """The runtime processes a big batch in parts of PROCESS_PART payloads, which carry the
    batch's block id and go into one insert: a replay dedupes whether it is cut into parts or
    not (a file ingested before parts existed), and whatever the buffer size. A file's calls
    ClickHouse holds are dropped as duplicates before that (``EmbeddedRuntime._skip_written``);
    another source's replay rests on the insert token alone."""
    import llmpulse.runtime as rt

    n = 2 * rt.PROCESS_PART + 500
    payloads = [payload(event_id=f"part-{i}", request_id=f"rq-{i}") for i in range(n)]
    payloads[100] = b'{"kind":"feedback","request_id":"rq-7","ts":"' + iso(NOW - 60).encode() + b'","thumbs":"up"}'
    payloads[3000] = b'{"event_id": "broken'
    small_buffer = settings.model_copy(
        update={"pipeline": settings.pipeline.model_copy(update={"batch_max_events": 1000})}
    )
    runs = [
        ("one piece" if first_run_in_one_piece else "parts", settings),
        ("parts", settings),
        ("parts", small_buffer),
    ]
    for run, (how, run_settings) in enumerate(runs):  # each replay by a fresh runtime (empty in-memory dedup)
        monkeypatch.setattr(rt, "PROCESS_PART", n if how == "one piece" else 2_048)
        runtime = EmbeddedRuntime(run_settings, conn)
        runtime.ingest(batch(payloads, Source(kind, "big.jsonl"), digest="big"), now=NOW)
        runtime.finish()
        runtime.close()
        c = runtime.stats.counters
        accepted, duplicates = (0, n - 2) if run and kind == "file" else (n - 2, 0)
        assert (c.received, c.accepted, c.rejected, c.duplicates) == (n - 1, accepted, 1, duplicates)
        assert scalar(conn, "SELECT count() FROM llm_calls") == n - 2, how  # no FINAL: the replay's insert deduped
        assert scalar(conn, "SELECT sum(calls) FROM llm_calls_1m") == n - 2
        assert scalar(conn, "SELECT count() FROM dlq") == 1
        assert scalar(conn, "SELECT count() FROM feedback") == 1
    offsets = conn.client.query("SELECT min(kafka_offset), max(kafka_offset) FROM llm_calls").result_rows
    assert offsets == [(-1, -1)]  # a file: positions are not Kafka offsets


def test_dead_letters_keep_raw_bytes_reason_and_position(settings: Any, conn: Any) -> None:
    pipeline = CallPipeline(builtin_price_table())
    bad = b'{"event_id": "x", "ts'
    processed = pipeline.process(batch([payload(), bad, payload(input_tokens=-4)], Source("file", "f.jsonl"), 10), NOW)
    ClickHouseSink(conn).write([processed], "t1")
    rows = conn.client.query(
        "SELECT source, source_name, source_offset, reason, path, raw FROM dlq ORDER BY source_offset"
    ).result_rows
    assert rows[0] == ("file", "f.jsonl", 11, "not valid JSON: Input data was truncated", "$", bad.decode())
    assert rows[1][:5] == ("file", "f.jsonl", 12, "Expected `int` >= 0", "$.input_tokens")
    assert '"input_tokens":-4' in rows[1][5]
    assert len(rows) == 2


def test_migrations_are_idempotent_and_retention_is_applied(settings: Any, conn: Any) -> None:
    assert migrate(conn, settings.retention) == []
    ddl = scalar(
        conn,
        f"SELECT create_table_query FROM system.tables WHERE database = '{conn.database}' AND name = 'llm_calls'",
    )
    assert "toIntervalDay(90)" in ddl
    changed = settings.retention.model_copy(update={"raw_days": 30})
    migrate(conn, changed)
    ddl = scalar(
        conn,
        f"SELECT create_table_query FROM system.tables WHERE database = '{conn.database}' AND name = 'llm_calls'",
    )
    assert "toIntervalDay(30)" in ddl
    versions = conn.client.query("SELECT version FROM schema_migrations FINAL ORDER BY version").result_rows
    from sinks.migrations import packaged_migrations

    assert versions == [(m.version,) for m in packaged_migrations()]


def test_inserted_blocks_become_compact_parts_even_over_ten_megabytes(settings: Any, conn: Any) -> None:
    """ClickHouse writes a part wide (files per column) from 10 MB on; llm_calls keeps inserted
    blocks compact (migration 0006): creating ~230 files per block was half of an insert's cost."""
    pipeline = CallPipeline(builtin_price_table())
    message = "x" * 4000
    processed = pipeline.process(batch([payload(event_id=f"w{i}", error_message=message) for i in range(4000)]), NOW)
    ClickHouseSink(conn).write([processed], "big-block")
    parts = conn.client.query(
        f"SELECT part_type, rows, data_uncompressed_bytes FROM system.parts "
        f"WHERE database = '{conn.database}' AND table = 'llm_calls' AND active"
    ).result_rows
    assert len(parts) == 1
    part_type, rows, size = parts[0]
    assert (part_type, rows) == ("Compact", 4000)
    assert size > 10 * 1024 * 1024  # over the size at which a part would otherwise be wide
    assert scalar(conn, "SELECT count() FROM llm_calls WHERE length(error_message) = 4000") == 4000


class FlakyClient:
    """Raises what clickhouse-connect raises on a refused connection, then recovers."""

    def __init__(self, real: Any, failures: int) -> None:
        self.real = real
        self.failures = failures
        self.calls = 0

    def insert_arrow(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise OperationalError("Error HTTPConnectionPool(host='ch', port=8123): Connection refused")
        return self.real.insert_arrow(*args, **kwargs)


def test_transient_failures_are_retried_with_backoff(settings: Any, conn: Any) -> None:
    sleeps: list[float] = []
    sink = ClickHouseSink(conn, RetryPolicy(retries=5, first_delay_s=0.5, sleep=sleeps.append))
    flaky = FlakyClient(conn.client, failures=3)
    sink.client = flaky  # type: ignore[assignment]
    processed = CallPipeline(builtin_price_table()).process(batch([payload()]), NOW)
    sink.write([processed], "flaky-1")
    assert sleeps == [0.5, 1.0, 2.0]
    assert scalar(conn, "SELECT count() FROM llm_calls") == 1


def test_permanent_failure_raises_sink_error_without_retrying(settings: Any, conn: Any) -> None:
    sleeps: list[float] = []
    sink = ClickHouseSink(conn, RetryPolicy(retries=5, sleep=sleeps.append))

    class Broken:
        def insert_arrow(self, *a: Any, **k: Any) -> Any:
            raise ProgrammingError("Code: 60. Table llmpulse.llm_calls does not exist")

    sink.client = Broken()  # type: ignore[assignment]
    processed = CallPipeline(builtin_price_table()).process(batch([payload()]), NOW)
    with pytest.raises(SinkError, match="failed after 1 attempt"):
        sink.write([processed], "x")
    assert sleeps == []


HOLDER = """
import sys, time
from pathlib import Path
from sinks.lock import DataDirLock
lock = DataDirLock(Path(sys.argv[1]))
lock.acquire("llmpulse serve")
lock.update(server_url="http://127.0.0.1:8420")
print("held", flush=True)
time.sleep(30)
"""


def test_second_process_is_told_who_holds_the_data_dir(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(DataDirBusy) as err:
            DataDirLock(tmp_path).acquire("llmpulse query")
        message = str(err.value)
        assert f"pid {proc.pid}" in message and "`llmpulse serve`" in message
        assert "--server http://127.0.0.1:8420" in message
    finally:
        proc.kill()
        proc.wait()
    lock = DataDirLock(tmp_path)  # the holder died: the kernel released its lock
    lock.acquire("llmpulse query")
    lock.release()


def test_lock_is_shared_within_a_process(tmp_path: Path) -> None:
    a, b = DataDirLock(tmp_path), DataDirLock(tmp_path)
    a.acquire("one")
    b.acquire("two")
    a.release()
    b.release()
    time.sleep(0)


def test_a_request_id_two_tenants_share_has_no_lineage(settings: Any, conn: Any) -> None:
    """A verdict or thumb on a request id two tenants used cannot be attributed to either call:
    attributing it would show one tenant's verdict to the other through the tenant-bound queries."""
    pipeline = CallPipeline(builtin_price_table())
    calls = [payload(request_id="shared", tenant="acme"), payload(request_id="shared", tenant="beta"),
             payload(request_id="own", tenant="acme")]  # fmt: skip
    processed = pipeline.process(batch(calls), NOW)
    sink = ClickHouseSink(conn)
    sink.write([processed], processed.block_id)
    found = sink.lineage(["shared", "own"])
    assert set(found) == {"own"}
    assert found["own"].event_id == processed.events[2].event_id


def test_lookups_read_the_recent_day_first_and_find_older_calls_in_a_second_pass(settings: Any, conn: Any) -> None:
    """Feedback names calls of minutes or hours before: the first pass over ``llm_calls`` reads
    only the day before it, and a call older than that is still found, by the second pass over
    the whole table. Request ids reused by older calls must not pull those calls in."""
    pipeline = CallPipeline(builtin_price_table())
    calls = [
        payload(request_id="recent", ts=iso(NOW - 600)),
        payload(request_id="old", ts=iso(NOW - 5 * 86_400)),
        payload(request_id="sampled", ts=iso(NOW - 300), status="error"),  # errors are always sampled
        payload(request_id="recent", ts=iso(NOW - 3 * 86_400)),  # an older call reusing the id
        payload(request_id="resampled", ts=iso(NOW - 4 * 86_400), status="error"),  # sampled days ago...
        payload(request_id="resampled", ts=iso(NOW - 200)),  # ...and its id used again now
    ]
    processed = pipeline.process(batch(calls), NOW)
    assert [processed.events[s.index].request_id for s in processed.samples] == ["sampled", "resampled"]
    event = [e.event_id for e in processed.events]
    sink = ClickHouseSink(conn)
    sink.write([processed], processed.block_id)
    span = (NOW - 60, NOW)  # the feedback's times

    assert sink.lineage(["old", "sampled", "unknown"], span) == sink.lineage(["old", "sampled"])
    found = sink.lineage(["recent", "old"], span)
    assert {r: x.event_id for r, x in found.items()} == {"recent": event[0], "old": event[1]}

    # flagged after the fact: the recent and the old call are sampled; the sampled ones are not
    # again, though "resampled" was sampled outside the recent day
    flagged = ["recent", "old", "sampled", "resampled", "unknown"]
    fresh = sink.sample_flagged(flagged, [pipeline.sampler], span=span)
    assert sorted(fresh) == ["old", "recent"]
    copied = conn.client.query("SELECT event_id FROM judge_samples WHERE reason = 'thumbs_down'").result_rows
    assert sorted(r[0] for r in copied) == sorted([event[0], event[1]])  # the calls chosen, not event[3]
    requests = sink.sampled_requests(fresh, span)
    assert {r["request_id"]: r["event_id"] for r in requests} == {"recent": event[0], "old": event[1]}
    assert all(r["release"]["model"] == "gpt-4o" and r["reason"] == "thumbs_down" for r in requests)


HOSTILE_IDS = ["a'b", "c\\d", "e\nf", "g\th", "`x`", "{ids:String}", "ü€", "%s", 'a"b', "'); DROP TABLE llm_calls; --",
               "$ids$", "x$ids$y", "$", "z\u0000", "\u2028", "r" * 256]  # fmt: skip


def test_id_lists_are_json_that_no_id_can_close_and_stay_under_the_query_limit(monkeypatch: Any) -> None:
    (whole,) = ch.id_lists(HOSTILE_IDS)
    assert b"$" not in whole and orjson.loads(whole) == HOSTILE_IDS
    monkeypatch.setattr(ch, "IDS_MAX_BYTES", 100)
    parts = list(ch.id_lists(HOSTILE_IDS))
    assert len(parts) > 3 and all(len(p) <= 100 for p in parts if len(orjson.loads(p)) > 1)
    assert [i for p in parts for i in orjson.loads(p)] == HOSTILE_IDS


def test_request_ids_of_any_text_are_looked_up_exactly_in_lists_split_or_not(
    settings: Any, conn: Any, monkeypatch: Any
) -> None:
    """Ids reach ClickHouse as one JSON heredoc, not as escaped bound strings: quotes, backslashes,
    the heredoc's own tag and control characters must all find their own call and nothing else."""
    pipeline = CallPipeline(builtin_price_table())
    processed = pipeline.process(batch([payload(request_id=r) for r in HOSTILE_IDS]), NOW)
    assert len(processed.events) == len(HOSTILE_IDS)
    sink = ClickHouseSink(conn)
    sink.write([processed], processed.block_id)
    expected = {e.request_id: e.event_id for e in processed.events}
    for limit in (ch.IDS_MAX_BYTES, 64):  # one list, then one query per id or two
        monkeypatch.setattr(ch, "IDS_MAX_BYTES", limit)
        found = sink.lineage([*HOSTILE_IDS, "unknown"], (NOW, NOW))
        assert {r: x.event_id for r, x in found.items()} == expected
        assert sink.stored_keys("llm_calls", ("request_id", "event_id"), HOSTILE_IDS) == set(expected.items())
    fresh = sink.sample_flagged(HOSTILE_IDS, [pipeline.sampler], span=(NOW, NOW))
    assert set(fresh) == set(HOSTILE_IDS) - {processed.events[s.index].request_id for s in processed.samples}
    assert {r["request_id"] for r in sink.sampled_requests(HOSTILE_IDS, (NOW, NOW))} == set(HOSTILE_IDS)


def test_the_recent_pass_skips_other_days_granules(settings: Any, conn: Any) -> None:
    """The bound is on the sorting key's day, so ClickHouse prunes by the primary index: 800k
    calls over ten days, and the recent pass selects a fraction of the granules."""
    conn.client.command(
        "INSERT INTO llm_calls (event_id, ts, source, feature, model, request_id, input_tokens, output_tokens, "
        "latency_ms, status) SELECT toString(number), "
        f"fromUnixTimestamp64Milli({int(NOW * 1000)}) - toIntervalSecond(number * 864000 / 800000), 'x', "
        "concat('f', toString(number % 7)), 'gpt-4o', concat('r-', toString(number)), 1, 1, 1, 'ok' "
        "FROM numbers(800000)"
    )

    def granules(span: Any) -> tuple[int, int]:
        where, bounds = _within(span)
        plan = conn.client.query(
            f"EXPLAIN indexes = 1 SELECT count() FROM llm_calls WHERE {where}request_id IN {{ids:Array(String)}}",
            parameters={"ids": ["r-1", "r-2"], **bounds},
        ).result_rows
        selected, total = (int(x) for x in [r[0] for r in plan if "Granules:" in r[0]][-1].split(":")[1].split("/"))
        return selected, total

    everything, total = granules(None)
    recent, _ = granules((NOW - 60, NOW))
    assert everything == total >= 98
    assert recent <= total / 4, (recent, total)


def test_the_writer_encodes_a_batch_as_it_is_added_and_drops_the_copy_once_durable(settings: Any, conn: Any) -> None:
    """Columns are built while the batch is hot (sinks.columns.batch_columns); after the insert
    the encoded copy is released, so a buffer of durable blocks costs no Arrow memory."""
    from sinks.batching import BufferedWriter

    processed = CallPipeline(builtin_price_table()).process(batch([payload(), payload(), payload()]), NOW)
    writer = BufferedWriter(ClickHouseSink(conn), max_rows=1000, max_seconds=60, background=False)
    writer.add_calls(processed)
    assert processed.columns is not None and processed.columns.num_rows == 3
    writer.flush(wait=True)
    assert processed.columns is None
    assert scalar(conn, "SELECT count() FROM llm_calls FINAL") == 3
    writer.close()


def test_batches_added_together_go_into_one_insert_even_past_the_buffer_size(settings: Any, conn: Any) -> None:
    """The parts of one input batch share its block id: a flush between them would give two
    inserts one token, and ClickHouse would drop the second."""
    from sinks.batching import BufferedWriter

    pipeline = CallPipeline(builtin_price_table())
    parts = [pipeline.process(batch([payload() for _ in range(8)], first=8 * i), NOW) for i in range(3)]
    writer = BufferedWriter(ClickHouseSink(conn), max_rows=10, max_seconds=60, background=False)
    with writer.together():
        for p in parts:
            writer.add_calls(p)
        assert writer.pending_rows == 24  # full since the second part, and still held
    assert writer.pending_rows == 0  # flushed once the group ended
    writer.close()
    blocks = conn.client.query(
        f"SELECT count(), sum(rows) FROM system.parts WHERE database = '{conn.database}' AND table = 'llm_calls'"
    ).result_rows
    assert blocks == [(1, 24)]


def test_an_abandoned_writer_finishes_the_insert_under_way_and_drops_the_buffer(settings: Any, conn: Any) -> None:
    """A worker stop cut short: the block in flight lands, the buffered rows do not (their offsets
    are uncommitted: the next owner reads them again, outputs and all)."""
    from sinks.batching import BufferedWriter

    pipeline = CallPipeline(builtin_price_table())
    writer = BufferedWriter(ClickHouseSink(conn), max_rows=1000, max_seconds=60)
    writer.add_calls(pipeline.process(batch([payload() for _ in range(5)]), NOW))
    writer.flush(wait=False)  # in flight on the insert thread
    writer.add_calls(pipeline.process(batch([payload() for _ in range(7)], first=5), NOW))
    writer.abandon()
    assert scalar(conn, "SELECT count() FROM llm_calls FINAL") == 5
    assert writer.pending_rows == 0
    writer.add_calls(pipeline.process(batch([payload() for _ in range(3)], first=12), NOW))
    writer.flush(wait=True)  # a flush still running elsewhere when the stop gave up takes nothing
    assert scalar(conn, "SELECT count() FROM llm_calls FINAL") == 5
