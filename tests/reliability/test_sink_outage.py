"""ClickHouse refuses connections for a while (issue 8: 60 s) while events keep arriving.

The worker must back off (not spin, not crash), commit no offset it has not written, hold memory
flat (intake stops behind one full buffer: the rest waits in Kafka), and once ClickHouse is back
catch up with every event exactly once. The outage is the refused-connection error of
clickhouse-connect itself (``tests.reliability.faults``); where ``LLMPULSE_CLICKHOUSE_URL`` points
at a real server, a variant stops reaching that server instead.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from tests.llmpulse.workers import Worker, write_config
from tests.reliability.support import (
    FaultyWorker,
    PacedProducer,
    TcpProxy,
    assert_exactly_the_produced_ids,
    cli_query,
    committed,
    end_offsets,
    reconcile,
    record,
    rss_mb,
    size,
    wait_for,
)

pytestmark = pytest.mark.kafka


def run_outage(name: str, kafka: Any, worker: Worker, target: Path | list[str], down: Any, up: Any) -> None:
    """Healthy traffic, then ``down()`` for LLMPULSE_RELIABILITY_OUTAGE_S seconds while events keep coming,
    then ``up()``; the checks are the same whatever ``down`` breaks."""
    n = size("OUTAGE_EVENTS", 60_000)
    outage_s = size("OUTAGE_S", 30)
    topic = kafka.topics.calls
    worker.start().wait_ready(120)
    assert worker.proc is not None
    pid = worker.proc.pid
    healthy_s = 10.0
    # chunks of 5,000 over 4 partitions: a getmany during the outage fills the 1,000-row buffer several times
    producer = PacedProducer(kafka, topic, "outage", n, rate=n / (healthy_s + outage_s + 5), chunk=5000).start()
    try:
        wait_for(lambda: sum(committed(kafka, topic).values()) >= n // 10, 120, "progress before the outage",
                 workers=[worker])  # fmt: skip
        rss_before = rss_mb(pid)
        down()
        went_down = time.monotonic()
        time.sleep(3)  # an insert already past the client when the server went away may still land
        frozen = sum(committed(kafka, topic).values())
        samples: list[tuple[float, int, int, float]] = []
        unwritten: list[int] = []
        while time.monotonic() - went_down < outage_s:
            time.sleep(1)
            assert worker.alive(), worker.log.read_text(errors="replace")[-4000:]
            samples.append((round(time.monotonic() - went_down, 1), sum(committed(kafka, topic).values()),
                            sum(end_offsets(kafka, topic).values()), rss_mb(pid)))  # fmt: skip
            unwritten.append(unwritten_rows(worker))
        up()
        came_back = time.monotonic()
        producer.join()
        catch_up = wait_for(lambda: committed(kafka, topic) == end_offsets(kafka, topic), 180, "catch-up",
                            interval=0.5, workers=[worker])  # fmt: skip
        back_to_caught_up = time.monotonic() - came_back
    finally:
        up()
        code = worker.stop()
    log = worker.log.read_text(errors="replace")
    assert code == 0, log[-4000:]
    assert "Crashed" not in log, log[log.index("Crashed") - 2000 :][:6000]
    # nothing committed while down, though the topic kept growing
    assert all(c == frozen for _, c, _, _ in samples), samples
    assert samples[-1][2] > samples[0][2], "events kept arriving during the outage"
    # memory: intake stops behind one buffer and one fetch (the rows held never exceed a failed
    # block plus a buffer, each at most batch_max_events + fetch_max_records, and do not grow in
    # the outage's second half), while the backlog waits in Kafka
    half = len(unwritten) // 2
    assert max(unwritten[half:]) <= max(unwritten[:half]), unwritten
    assert 0 < max(unwritten) <= 2 * (BATCH_MAX_EVENTS + FETCH_MAX_RECORDS) < samples[-1][2] - frozen, unwritten
    rss = [r for *_, r in samples]
    half = len(rss) // 2
    assert max(rss[half:]) - max(rss[:half]) < 25, rss
    assert max(rss) - rss_before < 150, (rss_before, rss)
    # backed off: attempts 1, 2, 4, 8... s apart (capped at 30 s), not a busy loop or a fixed retry
    delays = [int(d) for d in re.findall(r"ClickHouse write failed, not committing; retrying in (\d+)s", log)]
    backoffs = len(delays)
    assert delays[:4] == [1, 2, 4, 8], delays
    assert all(b == min(a * 2, 30) for a, b in itertools.pairwise(delays)), delays
    assert backoffs <= outage_s, backoffs
    assert_exactly_the_produced_ids(target, "outage", n)
    reconcile(target)
    record(name, events=n, outage_s=outage_s, worker_backoffs=backoffs, rss_before_mb=round(rss_before, 1),
           rss_max_during_mb=round(max(rss), 1), rss_first_half_max_mb=round(max(rss[:half]), 1),
           rss_second_half_max_mb=round(max(rss[half:]), 1), committed_during_outage=frozen,
           unwritten_rows_max=max(unwritten),
           lag_at_end_of_outage=samples[-1][2] - samples[-1][1], back_to_caught_up_s=round(back_to_caught_up, 1),
           final_catch_up_wait_s=round(catch_up, 1))  # fmt: skip


BATCH_MAX_EVENTS, FETCH_MAX_RECORDS = 1000, 2000
CONFIG = {"pipeline": {"batch_max_seconds": "200ms", "batch_max_events": BATCH_MAX_EVENTS, "insert_retries": 2}}
"""Two sink retries (0.5 s + 1 s), so a long outage exercises the worker's own backoff, not only the sink's."""


def outage_kafka(kafka: Any) -> Any:
    """Small fetches, so the bound on rows held in memory is far below what arrives during the outage."""
    return kafka.model_copy(update={"fetch_max_records": FETCH_MAX_RECORDS})


def unwritten_rows(worker: Worker) -> int:
    """The worker's own gauge of rows held until ClickHouse has them (``llmpulse_unwritten_rows``)."""
    import urllib.request

    text = urllib.request.urlopen(worker.metrics_url(), timeout=10).read().decode()
    found = re.search(r"^llmpulse_unwritten_rows ([0-9.e+]+)$", text, re.MULTILINE)
    assert found, "the worker does not export llmpulse_unwritten_rows"
    return int(float(found[1]))


def test_clickhouse_refusing_connections(tmp_path: Path, topics: Any) -> None:
    flag = tmp_path / "clickhouse-down"
    cfg = write_config(tmp_path / "w.yaml", outage_kafka(topics), **CONFIG)
    worker = FaultyWorker(cfg, tmp_path / "data", tmp_path / "w.log", flag)
    run_outage("clickhouse_refusing_connections", topics, worker, tmp_path / "data",
               down=flag.touch, up=lambda: flag.unlink(missing_ok=True))  # fmt: skip


@pytest.mark.server
@pytest.mark.skipif(
    not os.environ.get("LLMPULSE_CLICKHOUSE_URL"),
    reason="needs a ClickHouse server: set LLMPULSE_CLICKHOUSE_URL=http://user:password@host:8123 "
    "(no server can run on this machine)",
)
def test_real_clickhouse_server_unreachable(tmp_path: Path, topics: Any) -> None:
    """The same outage against a real server: the worker reaches it through a loopback proxy that is
    switched off for the outage, so the refusals are the real client's against a real port."""
    url = urllib.parse.urlsplit(os.environ["LLMPULSE_CLICKHOUSE_URL"])
    proxy = TcpProxy((url.hostname or "127.0.0.1", url.port or 8123)).start()
    database = f"reliability_{int(time.time())}"
    auth = f"{url.username}:{url.password}@" if url.username else ""
    proxied = write_config(tmp_path / "w.yaml", outage_kafka(topics), clickhouse={"url": f"{url.scheme}://{auth}127.0.0.1:{proxy.port}",
                                                                    "database": database}, **CONFIG)  # fmt: skip
    direct = write_config(tmp_path / "direct.yaml", topics, clickhouse={"url": os.environ["LLMPULSE_CLICKHOUSE_URL"],
                                                                       "database": database})  # fmt: skip
    worker = Worker(proxied, tmp_path / "data", tmp_path / "w.log")
    try:
        run_outage("real_clickhouse_server_unreachable", topics, worker, ["--config", str(direct)],
                   down=proxy.stop, up=lambda: proxy._listener is None and proxy.start())  # fmt: skip
    finally:
        proxy.stop()
        with contextlib.suppress(AssertionError):  # best effort: leave the server as we found it
            cli_query(["--config", str(direct)], f"DROP DATABASE IF EXISTS {database}")


def test_writer_keeps_blocks_in_order_and_adding_never_raises_while_the_sink_fails() -> None:
    """The bug the outage test found: a full buffer collecting a failed insert raised out of
    ``add_calls`` and crashed the worker's consume task; and a later flush could write a newer
    block before the failed one, whose offsets a commit would then pass."""
    import threading

    from sinks.batching import BufferedWriter
    from sinks.clickhouse import SinkError

    written: list[str] = []
    down = threading.Event()
    down.set()

    class Sink:
        def encode_calls(self, batch: Any) -> None:
            pass

        def write(self, batches: list[Any], token: str | None) -> None:
            time.sleep(0.05)
            if down.is_set():
                raise SinkError("refused")
            written.extend(b.block_id for b in batches)

    class Batch:
        def __init__(self, block_id: str) -> None:
            self.events, self.dead, self.samples, self.block_id = [0] * 600, [], [], block_id

    writer = BufferedWriter(Sink(), max_rows=1000, max_seconds=60)  # type: ignore[arg-type]
    for i in range(6):  # the 2nd add starts insert A; the 4th collects its failure; none raises
        writer.add_calls(Batch(f"b{i}"))  # type: ignore[arg-type]
    assert writer.failed is not None and [b.block_id for b in writer.failed.calls] == ["b0", "b1"]
    assert writer.pending_rows == 4 * 600  # held, not written past the failed block
    with pytest.raises(SinkError):
        writer.flush(wait=True)
    down.clear()
    writer.flush(wait=True)
    assert written == [f"b{i}" for i in range(6)]
    writer.close()
