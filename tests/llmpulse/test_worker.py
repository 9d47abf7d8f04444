"""The Kafka worker on the real broker, writing to real chDB: exact rows, DLQ, crash and restart, scale-out."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from ingest.kafka import create_topics
from processors.windows import WindowPartial, read_wire
from tests.conftest import call, iso
from tests.llmpulse.workers import (
    ENV,
    FIRST_PROGRESS_READ_FAILS,
    RAW_PART_ONLY,
    TERM_MID_BATCH,
    Worker,
    calls_outputs_fail_halfway,
    consume_all,
    crash_worker,
    crashing_cli,
    drain_with_worker,
    produce,
    quality_outputs_fail_once,
    query,
    wait_caught_up,
    write_config,
)

pytestmark = pytest.mark.kafka


def events(n: int, prefix: str, *, now: float | None = None, **kw: Any) -> list[tuple[bytes, bytes]]:
    now = time.time() if now is None else now
    out = []
    for i in range(n):
        feature = f"feature-{i % 7}"
        e = call(event_id=f"{prefix}-{i}", ts=iso(now - 900 + i * 900 / n), feature=feature, team=f"team-{i % 3}", **kw)
        out.append((feature.encode(), orjson.dumps(e)))
    return out


@pytest.fixture
def topics(kafka_settings: Any) -> Any:
    asyncio.run(create_topics(kafka_settings))
    return kafka_settings


def start_worker(tmp_path: Path, kafka: Any, name: str = "w") -> Worker:
    cfg = write_config(tmp_path / f"{name}.yaml", kafka, pipeline={"batch_max_seconds": "200ms"})
    return Worker(cfg, tmp_path / f"{name}-data", tmp_path / f"{name}.log").start()


def test_exact_rows_costs_and_dead_letters(tmp_path: Path, topics: Any) -> None:
    # 7,000 gpt-4o-mini calls, 1,000 input / 200 output tokens each:
    # 1,000 × $0.15 + 200 × $0.60 per 1M = $0.00027 per call → $1.89 in all
    good = events(7000, "e2e", model="gpt-4o-mini", input_tokens=1000, output_tokens=200)
    bad = [(b"feature-0", b"{not json"), (b"feature-1", orjson.dumps(call(event_id="neg", input_tokens=-1)))]
    asyncio.run(produce(topics, topics.topics.calls, good[:3500] + bad + good[3500:]))
    worker = start_worker(tmp_path, topics)
    try:
        wait_caught_up(topics, topics.topics.calls, workers=[worker])
    finally:
        assert worker.stop() == 0, worker.log.read_text()[-3000:]
    (row,) = query(
        worker.data_dir,
        "SELECT (SELECT count() FROM llm_calls) raw, (SELECT uniqExact(event_id) FROM llm_calls) ids, "
        "(SELECT sum(calls) FROM llm_calls_1m) rolled, (SELECT round(sum(cost_usd), 6) FROM llm_calls_1m) cost, "
        "(SELECT count() FROM dlq) dlq, (SELECT groupUniqArray(source) FROM llm_calls) sources",
    )
    assert row == {"raw": 7000, "ids": 7000, "rolled": 7000, "cost": 1.89, "dlq": 2, "sources": ["kafka"]}
    letters = query(worker.data_dir, "SELECT reason, path, source_name, source_offset FROM dlq ORDER BY source_offset")
    assert {(r["path"], r["source_name"]) for r in letters} == {
        ("$", topics.topics.calls),
        ("$.input_tokens", topics.topics.calls),
    }
    # the DLQ topic carries the raw bytes, with reason and position in headers
    dlq_msgs = asyncio.run(consume_all(topics, topics.topics.dlq))
    assert sorted(m.value for m in dlq_msgs) == sorted(v for _, v in bad)
    headers = {dict(m.headers)["llmpulse.path"].decode() for m in dlq_msgs}
    assert headers == {"$", "$.input_tokens"}
    # sampled calls were published for the judge, with their release id
    requests = [orjson.loads(m.value) for m in asyncio.run(consume_all(topics, topics.topics.judge_requests))]
    (judged,) = query(worker.data_dir, "SELECT count() n FROM judge_samples")
    assert len(requests) == judged["n"] > 0
    assert all(r["release_id"] and r["feature"].startswith("feature-") for r in requests)


def test_message_from_kcat_is_processed(tmp_path: Path, topics: Any) -> None:
    kcat = shutil.which("kcat") or shutil.which("kafkacat")
    if kcat is None:
        pytest.skip("kcat not installed (deploy/test.sh installs Debian's kcat)")
    payload = orjson.dumps(call(event_id="from-kcat", feature="cli", model="claude-haiku-4-5",
                                input_tokens=2000, output_tokens=100, ts=iso(time.time() - 60)))  # fmt: skip
    subprocess.run(
        [kcat, "-P", "-b", topics.bootstrap_servers, "-t", topics.topics.calls, "-k", "cli"],
        input=payload, check=True, capture_output=True,
    )  # fmt: skip
    worker = start_worker(tmp_path, topics)
    try:
        wait_caught_up(topics, topics.topics.calls, workers=[worker])
    finally:
        worker.stop()
    (row,) = query(worker.data_dir, "SELECT event_id, feature, cost_usd, provider FROM llm_calls")
    # claude-haiku-4-5: 2,000 × $1 + 100 × $5 per 1M = $0.0025
    assert row == {
        "event_id": "from-kcat",
        "feature": "cli",
        "cost_usd": pytest.approx(0.0025),
        "provider": "anthropic",
    }


CRASH_AFTER_WRITE = """
import os
import llmpulse.worker as w
original = w.CallsConsumer._publish_and_commit

async def crash_before_commit(self):
    if self._durable:  # the block is in ClickHouse; its offsets are not committed yet
        os._exit(9)
    return await original(self)

w.CallsConsumer._publish_and_commit = crash_before_commit
"""


def _exactly_once(data: Path, n: int) -> None:
    (row,) = query(
        data,
        "SELECT (SELECT count() FROM llm_calls) raw, (SELECT uniqExact(event_id) FROM llm_calls) ids, "
        "(SELECT sum(calls) FROM llm_calls_1m) rolled",
    )
    assert row == {"raw": n, "ids": n, "rolled": n}  # not even before merges
    mismatches = query(
        data,
        "SELECT r.minute, r.feature, r.calls, x.calls FROM "
        "(SELECT minute, feature, sum(calls) calls FROM llm_calls_1m GROUP BY minute, feature) r "
        "FULL OUTER JOIN (SELECT toStartOfMinute(ts) minute, feature, count() calls FROM llm_calls FINAL "
        "GROUP BY minute, feature) x USING (minute, feature) WHERE r.calls != x.calls",
    )
    assert mismatches == []


def _calls_per_grain(topics: Any) -> dict[tuple[str, ...], int]:
    """Calls counted by the window partials on the partials topic, per grain (scope dimensions)."""
    per_grain: dict[tuple[str, ...], int] = {}
    for m in asyncio.run(consume_all(topics, topics.topics.partials)):
        body, part = read_wire(m.value)
        if part is not None:
            grain = tuple(body["scope_dims"])
            per_grain[grain] = per_grain.get(grain, 0) + part.calls
    return per_grain


def test_crash_between_write_and_commit_is_not_written_twice(tmp_path: Path, topics: Any) -> None:
    asyncio.run(produce(topics, topics.topics.calls, events(20_000, "crash")))
    cfg = write_config(tmp_path / "w.yaml", topics, pipeline={"batch_max_seconds": "100ms", "batch_max_events": 4000})
    data = tmp_path / "data"
    crash_worker(cfg, data, CRASH_AFTER_WRITE, tmp_path / "crash.log")
    log = drain_with_worker(cfg, data, tmp_path / "w.log", topics)
    assert "already in ClickHouse; skipping them" in log  # progress was read back, not re-written
    assert "rebuilt" in log  # and the crashed worker's open windows were refilled from ClickHouse
    _exactly_once(data, 20_000)


def test_rows_whose_view_parts_were_lost_in_a_crash_are_rolled_up_by_the_next_worker(
    tmp_path: Path, topics: Any
) -> None:
    asyncio.run(produce(topics, topics.topics.calls, events(12_000, "views", response_model="served-1")))
    cfg = write_config(tmp_path / "w.yaml", topics, pipeline={"batch_max_seconds": "100ms", "batch_max_events": 4000})
    data = tmp_path / "data"
    crash_worker(cfg, data, RAW_PART_ONLY, tmp_path / "crash.log")
    (lost,) = query(data, "SELECT (SELECT count() FROM llm_calls) - (SELECT sum(calls) FROM llm_calls_1m) AS n")
    assert lost["n"] > 0  # the raw rows are there, the rollup lacks them
    log = drain_with_worker(cfg, data, tmp_path / "w.log", topics)
    assert "already in ClickHouse; skipping them" in log  # not written again...
    assert "llm_calls_1m, served_models_1m lacked rows written before the last owner died" in log  # ...but counted
    _exactly_once(data, 12_000)


def test_sigkill_while_events_flow_loses_and_duplicates_nothing(tmp_path: Path, topics: Any) -> None:
    produced = events(60_000, "kill")
    feeding = threading.Thread(
        target=lambda: [
            asyncio.run(produce(topics, topics.topics.calls, produced[i : i + 3000])) or time.sleep(0.5)
            for i in range(0, len(produced), 3000)
        ]
    )
    feeding.start()
    cfg = write_config(tmp_path / "w.yaml", topics, pipeline={"batch_max_seconds": "100ms", "batch_max_events": 5000})
    data = tmp_path / "data"
    kills = 0
    for round_ in range(3):
        worker = Worker(cfg, data, tmp_path / f"w{round_}.log").start()
        worker.wait_ready(120)
        time.sleep(2 + round_)  # mid-stream: the feeder keeps producing
        if not worker.alive():
            break
        worker.kill()
        kills += 1
    feeding.join()
    worker = Worker(cfg, data, tmp_path / "final.log").start()
    try:
        worker.wait_ready(120)  # the killed members' sessions must expire first
        wait_caught_up(topics, topics.topics.calls, workers=[worker], timeout=180)
    finally:
        assert worker.stop() == 0
    assert kills == 3
    _exactly_once(data, 60_000)


def test_sigterm_while_a_batch_is_processed_waits_for_it(tmp_path: Path, topics: Any) -> None:
    """SIGTERM lands while the processing thread is inside a batch: the stop (and a revoke, the same
    ``_release``) waits for that batch, then flushes its windows, writes, publishes and commits.
    Flushing first would leave the batch's rows uncommitted and its window partials nowhere,
    while the flushed-windows marker told the next owner the handoff was clean."""
    asyncio.run(produce(topics, topics.topics.calls, events(20_000, "term")))
    cfg = write_config(tmp_path / "w.yaml", topics.model_copy(update={"fetch_max_records": 2000}),
                       pipeline={"batch_max_seconds": "100ms", "batch_max_events": 4000})  # fmt: skip
    data = tmp_path / "data"
    with (tmp_path / "term.log").open("wb") as out:
        stopped = subprocess.run(
            [sys.executable, "-c", crashing_cli(TERM_MID_BATCH, "-v", "worker"), str(cfg), str(data)],
            stdout=out, stderr=subprocess.STDOUT, env=ENV, timeout=120, check=False,
        )  # fmt: skip
    log = (tmp_path / "term.log").read_text(errors="replace")
    assert stopped.returncode == 0, log[-3000:]
    accepted = re.search(r"worker stopped: .*?; ([\d,]+) accepted;", log)
    assert accepted is not None and 0 < int(accepted[1].replace(",", "")) < 20_000  # stopped mid-stream
    drain_with_worker(cfg, data, tmp_path / "w.log", topics)
    _exactly_once(data, 20_000)
    per_grain = _calls_per_grain(topics)
    assert per_grain and set(per_grain.values()) == {20_000}, per_grain  # each call in one partial per grain


def test_outputs_the_broker_did_not_take_are_sent_again_once(tmp_path: Path, topics: Any) -> None:
    """One in five of the calls path's output messages (window partials, judge requests, dead
    letters) is not acknowledged once, in rounds where the others are. The worker stays up, sends
    again only what failed, and commits a block only once all of it is out: every call is in one
    partial per grain, every sampled call in one judge request, every bad payload in one dead
    letter. Before, the first failed send stopped the worker (a restart re-read from the commit)."""
    good = events(10_000, "out")
    bad = [(b"feature-0", b'{"event_id": "bad-%d", "model": 7}' % i) for i in range(100)]
    asyncio.run(produce(topics, topics.topics.calls, good[:5000] + bad + good[5000:]))
    cfg = write_config(tmp_path / "w.yaml", topics, pipeline={"batch_max_seconds": "100ms", "batch_max_events": 2000},
                       sampling={"default_rate": 0.05})  # fmt: skip
    worker = Worker(cfg, tmp_path / "data", tmp_path / "w.log", hook=calls_outputs_fail_halfway(topics)).start()
    try:
        worker.wait_ready(120)
        wait_caught_up(topics, topics.topics.calls, workers=[worker], timeout=180)
    finally:
        assert worker.stop(timeout=60) == 0, worker.log.read_text()[-3000:]
    log = worker.log.read_text()
    assert "publishing a written block's outputs failed" in log and "worker stopped" in log
    _exactly_once(worker.data_dir, 10_000)
    per_grain = _calls_per_grain(topics)
    assert per_grain and set(per_grain.values()) == {10_000}, per_grain
    requested = [
        orjson.loads(m.value)["event_id"] for m in asyncio.run(consume_all(topics, topics.topics.judge_requests))
    ]
    (sampled,) = query(worker.data_dir, "SELECT count() n, uniqExact(event_id) ids FROM judge_samples")
    assert len(requested) == len(set(requested)) == sampled["n"] == sampled["ids"] > 100
    dead = [m.value for m in asyncio.run(consume_all(topics, topics.topics.dlq))]
    assert sorted(dead) == sorted(v for _, v in bad)


def test_a_failed_assignment_is_retried_and_the_stop_still_drains(tmp_path: Path, topics: Any) -> None:
    """Reading a partition's progress back fails once (ClickHouse unreachable at assignment): the
    partition is assigned again by the next consume step and read from its commit. Before, the
    consume step waited for that assignment for good, and a SIGTERM then waited for the step."""
    asyncio.run(produce(topics, topics.topics.calls, events(5_000, "assign")))
    cfg = write_config(tmp_path / "w.yaml", topics, pipeline={"batch_max_seconds": "100ms"})
    worker = Worker(cfg, tmp_path / "data", tmp_path / "w.log", hook=FIRST_PROGRESS_READ_FAILS).start()
    try:
        worker.wait_ready(120)
        wait_caught_up(topics, topics.topics.calls, workers=[worker], timeout=120)
    finally:
        assert worker.stop(timeout=60) == 0
    assert "reading its progress back failed; tried again by a later step" in worker.log.read_text()
    _exactly_once(worker.data_dir, 5_000)


def test_sasl_scram_to_the_local_broker(tmp_path: Path, topics: Any) -> None:
    if topics.bootstrap_servers != "127.0.0.1:19092":
        pytest.skip("SCRAM listener is the project's own broker (deploy/kafka) on 127.0.0.1:19093")
    asyncio.run(produce(topics, topics.topics.calls, events(500, "scram")))
    scram = topics.model_copy(
        update={
            "bootstrap_servers": "127.0.0.1:19093",
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_username": "llmpulse",
            "sasl_password": SecretStr("llmpulse-secret"),
        }
    )
    worker = start_worker(tmp_path, scram)
    try:
        wait_caught_up(topics, topics.topics.calls, workers=[worker])
    finally:
        worker.stop()
    (row,) = query(worker.data_dir, "SELECT count() n FROM llm_calls")
    assert row["n"] == 500
    log = worker.log.read_text()
    assert "llmpulse-secret" not in log


def _partials(kafka: Any) -> dict[tuple[Any, ...], WindowPartial]:
    merged: dict[tuple[Any, ...], WindowPartial] = {}
    for m in asyncio.run(consume_all(kafka, kafka.topics.partials)):
        body, part = read_wire(m.value)
        if part is None:
            continue
        key = (body["scope"], part.window_start)
        if key in merged:
            merged[key].merge(part)
        else:
            merged[key] = part
    return merged


def test_a_backlog_is_windowed_whole_even_with_partitions_waiting_their_turn(tmp_path: Path, topics: Any) -> None:
    """Two hours of backlog, read 500 events at a time: partitions wait seconds for their turn,
    longer than the 1 s idle timeout. Behind is not idle: no event counts late, every one is windowed."""
    asyncio.run(produce(topics, topics.topics.calls, events(40_000, "backlog", now=time.time() - 7200)))
    cfg = write_config(tmp_path / "w.yaml", topics.model_copy(update={"fetch_max_records": 500}),
                       pipeline={"idle_timeout": "1s", "allowed_lateness": "5s", "batch_max_events": 500})  # fmt: skip
    log = drain_with_worker(cfg, tmp_path / "data", tmp_path / "w.log", topics)
    stats = re.search(r"worker stopped: .*?; ([\d,]+) accepted; .*?; ([\d,]+) late;", log)
    assert stats is not None and (stats[1], stats[2]) == ("40,000", "0")


def test_two_workers_share_partitions_and_add_up_to_one(tmp_path: Path, topics: Any, kafka_settings: Any) -> None:
    produced = events(30_000, "scale")
    asyncio.run(produce(topics, topics.topics.calls, produced[:15_000]))
    a = start_worker(tmp_path, topics, "a")
    b = None
    try:
        wait_caught_up(topics, topics.topics.calls, workers=[a], timeout=180)
        b = start_worker(tmp_path, topics, "b")  # joins later: a rebalance hands partitions over, windows open
        deadline = time.time() + 60
        while "llm.calls partitions revoked" not in a.log.read_text() and time.time() < deadline:
            time.sleep(0.3)
        while "llm.calls partitions assigned" not in b.log.read_text() and time.time() < deadline:
            time.sleep(0.3)
        # b's stage 2 joins its own group a moment later: wait for that handover too, or a fast
        # catch-up stops a before it ever loses a partials partition
        while "stage 2 lost partials partitions" not in a.log.read_text() and time.time() < deadline:
            time.sleep(0.3)
        asyncio.run(produce(topics, topics.topics.calls, produced[15_000:]))
        wait_caught_up(topics, topics.topics.calls, workers=[a, b], timeout=180)
    finally:
        assert a.stop() == 0
        assert b is not None and b.stop() == 0
    assert "llm.calls partitions revoked" in a.log.read_text()
    for w in (a, b):  # stage 2 kept committing through the rebalance (a partition it lost is not committed)
        assert "alert evaluation failed" not in w.log.read_text()
    # and handed the scopes of the partials partitions it lost to b, which took them over
    assert "stage 2 lost partials partitions" in a.log.read_text()
    assert "stage 2 assigned partials partitions" in b.log.read_text()
    per_worker = [
        query(w.data_dir, "SELECT count() n, uniqExact(event_id) ids, sum(cost_usd) cost FROM llm_calls")[0]
        for w in (a, b)
    ]
    assert sum(r["n"] for r in per_worker) == 30_000
    assert sum(r["ids"] for r in per_worker) == 30_000
    assert all(r["n"] > 0 for r in per_worker), per_worker  # both did work
    rolled = sum(query(w.data_dir, "SELECT sum(calls) n FROM llm_calls_1m")[0]["n"] for w in (a, b))
    assert rolled == 30_000
    # stage 2: merging both workers' partials equals what one worker alone computes
    two = _partials(topics)
    solo_kafka = topics.model_copy(
        update={"consumer_group": topics.consumer_group + "-solo",
                "topics": topics.topics.model_copy(update={"partials": topics.topics.partials + ".solo"})}
    )  # fmt: skip
    asyncio.run(create_topics(solo_kafka))
    solo = start_worker(tmp_path, solo_kafka, "solo")
    try:
        wait_caught_up(solo_kafka, topics.topics.calls, workers=[solo], timeout=180)
    finally:
        solo.stop()
    one = _partials(solo_kafka)
    assert set(two) == set(one)
    for key, p in one.items():
        q = two[key]
        assert (q.calls, q.errors, q.refusals, q.input_tokens) == (p.calls, p.errors, p.refusals, p.input_tokens)
        assert q.cost_usd == pytest.approx(p.cost_usd)
        if p.calls >= 200:
            assert q.latency.quantile(0.95) == pytest.approx(p.latency.quantile(0.95), rel=0.02)


def test_dlq_replay_after_a_fix(tmp_path: Path, topics: Any) -> None:
    asyncio.run(
        produce(topics, topics.topics.calls, [(b"x", orjson.dumps(call(event_id="r1", cached_input_tokens=5000)))])
    )
    worker = start_worker(tmp_path, topics)
    try:
        wait_caught_up(topics, topics.topics.calls, workers=[worker])
    finally:
        worker.stop()
    # Nothing about that payload is fixable by config, so the replay reports it as still rejected...
    proc = subprocess.run(
        ["llmpulse", "dlq", "replay", "--data-dir", str(worker.data_dir)], capture_output=True, text=True, check=True
    )
    assert "1 dead letters considered: 0 were accepted, 1 still rejected" in proc.stdout
    # ...while a payload rejected for its timestamp horizon is accepted once the limit is raised.
    stale = orjson.dumps(call(event_id="future", ts=iso(time.time() + 3 * 3600)))
    asyncio.run(produce(topics, topics.topics.calls, [(b"x", stale)]))
    worker = Worker(worker.config, worker.data_dir, tmp_path / "w2.log").start()
    try:
        wait_caught_up(topics, topics.topics.calls, workers=[worker])
    finally:
        worker.stop(signal.SIGTERM)
    env_fix = {"LLMPULSE_PIPELINE__FUTURE_TOLERANCE": "6h"}
    import os

    proc = subprocess.run(
        ["llmpulse", "dlq", "replay", "--data-dir", str(worker.data_dir)],
        capture_output=True, text=True, check=True, env={**os.environ, **env_fix},
    )  # fmt: skip
    assert "2 dead letters considered: 1 were accepted, 1 still rejected" in proc.stdout
    again = subprocess.run(
        ["llmpulse", "dlq", "replay", "--data-dir", str(worker.data_dir)],
        capture_output=True, text=True, check=True, env={**os.environ, **env_fix},
    )  # fmt: skip
    assert "1 dead letters considered: 0 were accepted, 1 still rejected" in again.stdout
    (row,) = query(worker.data_dir, "SELECT count() n, groupArray(event_id) ids FROM llm_calls")
    assert row == {"n": 1, "ids": ["future"]}


def test_sdk_to_kafka_to_worker_to_clickhouse(tmp_path: Path, topics: Any) -> None:
    from ingest import Telemetry

    telemetry = Telemetry(topics.bootstrap_servers, topic=topics.topics.calls, service="checkout", team="payments")
    # 2,000 claude-sonnet-4-5 calls of 10,000 input tokens (6,000 read from cache) and 500 output:
    # 4,000 × $3 + 6,000 × $0.30 + 500 × $15 per 1M = 0.012 + 0.0018 + 0.0075 = $0.0213 per call → $42.60
    for i in range(2000):
        telemetry.record(
            feature="cart-assistant", model="claude-sonnet-4-5", input_tokens=10_000, cached_input_tokens=6_000,
            output_tokens=500, latency_ms=1200.0, status="ok", request_id=f"sdk-{i}",
        )  # fmt: skip
    with telemetry.call(feature="cart-assistant", model="claude-sonnet-4-5") as tracked:
        tracked.first_token()
        tracked.usage(input_tokens=100, output_tokens=10)
    assert telemetry.flush(30)
    stats = telemetry.stats()
    telemetry.close()
    assert stats["sent"] == 2001 and stats["dropped_buffer_full"] == 0
    worker = start_worker(tmp_path, topics)
    try:
        wait_caught_up(topics, topics.topics.calls, workers=[worker])
    finally:
        worker.stop()
    (row,) = query(
        worker.data_dir,
        "SELECT count() n, round(sum(cost_usd), 6) cost, any(service) service, any(team) team, "
        "countIf(ttft_ms IS NOT NULL) with_ttft FROM llm_calls",
    )
    # the timed call: 100 × $3 + 10 × $15 per 1M = $0.00045
    assert row == {
        "n": 2001,
        "cost": round(42.6 + 0.00045, 6),
        "service": "checkout",
        "team": "payments",
        "with_ttft": 1,
    }


class Receiver:
    """Someone else's webhook endpoint: records what it is sent."""

    def __init__(self) -> None:
        import http.server

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((time.time(), orjson.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_worker_alerts_reach_the_webhook_once_and_metrics_are_served(tmp_path: Path, topics: Any) -> None:
    import urllib.request

    receiver = Receiver()
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - {name: refusals-high, metric: refusal_rate, scope: [model], window: 1m, max: 0.2, min_calls: 10,"
        " severity: critical, runbook_url: https://runbooks.example/refusals}\n"
        "  - {name: pipeline-behind, metric: pipeline_lag_s, max: 86400}\n"  # checked every step, never breached
    )
    cfg = write_config(
        tmp_path / "w.yaml", topics,
        pipeline={"batch_max_seconds": "100ms", "allowed_lateness": "2s", "idle_timeout": "2s"},
        alerting={"rules_path": str(rules), "channels": {"hook": {"type": "webhook", "url": receiver.url}},
                  "lag_check_interval": "1s"},
    )  # fmt: skip
    now = time.time()
    start = now - now % 60 - 180  # three whole minutes in the past
    calls = [
        (f"f{i % 4}".encode(), orjson.dumps(call(event_id=f"a{i}", feature=f"f{i % 4}", model="gpt-4o",
                                                 ts=iso(start + i * 0.5), refusal=i % 3 == 0)))
        for i in range(240)
    ]  # fmt: skip
    asyncio.run(produce(topics, topics.topics.calls, calls))
    worker = Worker(cfg, tmp_path / "data", tmp_path / "w.log").start()
    try:
        worker.wait_ready(120)
        wait_caught_up(topics, topics.topics.calls, workers=[worker])
        deadline = time.time() + 60
        while not receiver.received and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(2.5)  # stage 2 has watermarks by now: the next lag checks (every 1 s) evaluate the rule
        metrics = urllib.request.urlopen(worker.metrics_url(), timeout=10).read().decode()
    finally:
        assert worker.stop() == 0
    firing = [body for _, body in receiver.received if body["state"] == "firing"]
    assert len(firing) == 1, receiver.received
    alert = firing[0]
    assert alert["rule"] == "refusals-high" and alert["scope"] == {"model": "gpt-4o"}
    assert alert["value"] == pytest.approx(1 / 3, abs=0.02)  # a third refused, across all four partitions
    assert alert["runbook_url"] == "https://runbooks.example/refusals" and "llm_calls_1m" in alert["query"]
    received_at = receiver.received[0][0]
    assert received_at - alert["extra"]["evaluated_at"] < 1.0  # window final in stage 2 → webhook
    assert "llmpulse_events_accepted_total 240.0" in metrics
    assert 'gen_ai_client_token_usage_count{gen_ai_operation_name="chat",gen_ai_provider_name="openai"' in metrics
    assert "gen_ai_client_operation_duration_seconds_bucket" in metrics
    # what alerting costs is measured and shown: stage 2's own CPU, and the partials it merged
    assert re.search(r"^llmpulse_alert_evaluation_cpu_seconds_total [0-9.e-]+$", metrics, re.MULTILINE)
    assert float(re.search(r"^llmpulse_alert_partials_total ([0-9.]+)$", metrics, re.MULTILINE)[1]) > 0  # type: ignore[index]
    assert re.search(r"stage 2 \(alert evaluation\): [0-9.]+ s CPU for [1-9]\d* partials", worker.log.read_text())
    # every partial was merged before its minute was evaluated, though four source partitions' partials
    # travel over several partials partitions at once (each partition is read in its own order)
    assert "rule windows, 0 late partials" in worker.log.read_text()
    assert "alert evaluation failed" not in worker.log.read_text()  # the lag check included
    assert re.search(r"^llmpulse_alert_late_partials_total 0\.0$", metrics, re.MULTILINE)
    # a restart does not page again for the incident that is still firing
    worker = Worker(cfg, tmp_path / "data", tmp_path / "w2.log").start()
    try:
        worker.wait_ready(120)
        time.sleep(6)
    finally:
        worker.stop()
    receiver.close()
    assert [b["state"] for _, b in receiver.received] == ["firing"]
    assert "stage 2 restored partials partitions [0, 1, 2, 3]: 1 firing alert(s) restored" in worker.log.read_text()
    (row,) = query(worker.data_dir, "SELECT rule, state, scope FROM alerts")
    assert row == {"rule": "refusals-high", "state": "firing", "scope": {"model": "gpt-4o"}}
    on_topic = [orjson.loads(m.value) for m in asyncio.run(consume_all(topics, topics.topics.alerts))]
    assert [(m["rule"], m["state"]) for m in on_topic] == [("refusals-high", "firing")]


@pytest.mark.parametrize("fault", [False, True], ids=["", "outputs-fail-once"])
def test_judge_verdicts_and_feedback_close_the_loop(tmp_path: Path, topics: Any, fault: bool) -> None:
    """Sampled calls go out as judge requests; verdicts and feedback come back on their topics,
    land joined to their calls, and feed an eval-score rule; a thumbs-down on a call nobody
    sampled sends that call to the judge. With ``fault``, the quality agent's first judge-request
    send and first quality-partials publish fail after the batch is durable: faust acks the batch
    however the agent ends, so those outputs are retried, not lost."""
    receiver = Receiver()
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - {name: eval-low, metric: eval_score, scope: [feature], window: 1m, min: 0.5, min_calls: 5}\n"
    )
    cfg = write_config(
        tmp_path / "w.yaml", topics,
        pipeline={"batch_max_seconds": "100ms", "allowed_lateness": "2s", "idle_timeout": "2s"},
        sampling={"default_rate": 0.0, "rates": {"chat": 1.0}},
        alerting={"rules_path": str(rules), "channels": {"hook": {"type": "webhook", "url": receiver.url}}},
    )  # fmt: skip
    now = time.time()
    chat = [call(event_id=f"c{i}", request_id=f"rc{i}", feature="chat", prompt_version="v2", ts=iso(now - 300 + i))
            for i in range(10)]  # fmt: skip
    mail = [call(event_id=f"m{i}", request_id=f"rm{i}", feature="mail", ts=iso(now - 300 + i)) for i in range(5)]
    asyncio.run(produce(topics, topics.topics.calls, [(e["feature"].encode(), orjson.dumps(e)) for e in chat + mail]))
    hook = quality_outputs_fail_once(topics) if fault else None
    worker = Worker(cfg, tmp_path / "data", tmp_path / "w.log", hook=hook).start()
    try:
        worker.wait_ready(120)
        wait_caught_up(topics, topics.topics.calls, workers=[worker])
        requests = [orjson.loads(m.value) for m in asyncio.run(consume_all(topics, topics.topics.judge_requests))]
        assert sorted(r["request_id"] for r in requests) == sorted(e["request_id"] for e in chat)
        assert {r["reason"] for r in requests} == {"rate"} and {r["feature"] for r in requests} == {"chat"}
        # the judge answers within the current minute: 0.2 on every call, far under the 0.5 floor
        at = time.time()
        at -= at % 60
        verdicts = [{"kind": "judge_result", "request_id": r["request_id"], "rubric": "helpfulness", "score": 0.2,
                     "judge_model": "judge-x", "ts": iso(at + 1)} for r in requests]  # fmt: skip
        asyncio.run(produce(topics, topics.topics.judge_results, [(v["request_id"].encode(), orjson.dumps(v))
                                                                  for v in verdicts]))  # fmt: skip
        flag = {"kind": "feedback", "request_id": "rm3", "ts": iso(time.time() - 5), "thumbs": "down",
                "comment": "wrong"}  # fmt: skip
        asyncio.run(produce(topics, topics.topics.feedback, [(b"rm3", orjson.dumps(flag))]))
        deadline = time.time() + 90
        while not receiver.received and time.time() < deadline:
            time.sleep(0.5)
        requests = [orjson.loads(m.value) for m in asyncio.run(consume_all(topics, topics.topics.judge_requests))]
    finally:
        assert worker.stop() == 0, worker.log.read_text()[-3000:]
    receiver.close()
    flagged = [r for r in requests if r["request_id"] == "rm3"]
    assert len(flagged) == 1 and flagged[0]["reason"] == "thumbs_down" and flagged[0]["feature"] == "mail"
    scores = query(worker.data_dir, "SELECT feature, release_id, sample_reason, count() n, round(avg(score), 6) s "
                                    "FROM judge_scores FINAL GROUP BY ALL")  # fmt: skip
    (release,) = {r["release_id"] for r in requests if r["feature"] == "chat"}
    assert scores == [{"feature": "chat", "release_id": release, "sample_reason": "rate", "n": 10, "s": 0.2}]
    (fb,) = query(worker.data_dir, "SELECT request_id, feature, event_id, thumbs FROM feedback")
    assert fb == {"request_id": "rm3", "feature": "mail", "event_id": "m3", "thumbs": "down"}
    firing = [body for _, body in receiver.received if body["state"] == "firing"]
    assert len(firing) == 1, receiver.received
    assert firing[0]["rule"] == "eval-low" and firing[0]["scope"] == {"feature": "chat"}
    assert firing[0]["value"] == pytest.approx(0.2)
    if fault:
        log = worker.log.read_text()
        assert "publishing judge requests of" in log and "publishing quality partials of" in log  # retried


def test_feedback_waiting_with_its_call_in_a_backlog_is_linked_to_it(tmp_path: Path, topics: Any) -> None:
    """After downtime, a call and the feedback on it both wait on the broker. The feedback agent
    starts first and is cheap, the calls consumer has a backlog to write: the lineage is copied
    when feedback is written, so feedback written first stayed linked to nothing for good."""
    cfg = write_config(tmp_path / "w.yaml", topics, pipeline={"batch_max_seconds": "1s"})
    now = time.time()
    calls = [call(event_id=f"b{i}", request_id=f"rb{i}", feature=f"f{i % 4}", ts=iso(now - 120 + i / 100))
             for i in range(4000)]  # fmt: skip
    asyncio.run(produce(topics, topics.topics.calls, [(e["feature"].encode(), orjson.dumps(e)) for e in calls]))
    thumbs = {"kind": "feedback", "request_id": "rb3999", "ts": iso(now - 60), "thumbs": "down"}
    asyncio.run(produce(topics, topics.topics.feedback, [(b"rb3999", orjson.dumps(thumbs))]))
    worker = Worker(cfg, tmp_path / "data", tmp_path / "w.log").start()
    try:
        worker.wait_ready(120)
        wait_caught_up(topics, topics.topics.calls, workers=[worker])
        time.sleep(4)  # the feedback agent's write (chDB cannot be read while the worker runs)
    finally:
        assert worker.stop() == 0, worker.log.read_text()[-3000:]
    (fb,) = query(worker.data_dir, "SELECT request_id, feature, event_id, thumbs FROM feedback")
    assert fb == {"request_id": "rb3999", "feature": "f3", "event_id": "b3999", "thumbs": "down"}


def test_a_worker_owning_no_calls_partition_still_budgets_flagged_calls() -> None:
    """More workers than llm.calls partitions (or a rebalance): a thumbs-down that is already durable
    is charged to a sampler of the worker's own, with the configured budgets, not dropped."""
    from llmpulse.worker import CallsConsumer
    from schemas.config import load_settings

    settings = load_settings(None, {"sampling": {"boost_cap_per_hour": 7}})
    consumer = CallsConsumer(settings)
    assert not consumer.partitions
    (sampler,) = consumer.judge_samplers()
    assert sampler.boost_cap_per_hour == 7
    assert consumer.judge_samplers() == [sampler]  # one budget for the process, not one per call


def test_the_worker_log_says_how_it_is_doing_and_sums_up_readably(caplog: pytest.LogCaptureFixture) -> None:
    """Between "Ready" and the stop the log said nothing, and the stop line was a dataclass repr."""
    import logging

    from llmpulse.worker import CallsConsumer
    from schemas.config import load_settings

    consumer = CallsConsumer(load_settings(None))
    consumer._progress = (1000.0, 0)
    consumer.stats.counters.received, consumer.stats.counters.accepted = 45_000, 44_988
    consumer.stats.counters.rejected, consumer.stats.counters.unknown_models = 12, {"acme-1": 7}
    with caplog.at_level(logging.INFO, logger="llmpulse.worker"):
        consumer._log_progress(1010.0, 5)  # under 30 s since the last line
        consumer._log_progress(1030.0, 2_500)
        consumer._log_progress(1075.0, 0)  # nothing new received
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress")]
    assert lines == ["progress: 45,000 calls received (1,500/s since the last line), 12 rejected, "
                     "2,500 waiting on the broker"]  # fmt: skip
    assert consumer.stats.summary() == (
        "45,000 calls received; 44,988 accepted; 12 rejected; 0 duplicates; 0 late; 0 without a cost; 0 sampled; "
        "0 skipped as written; 0 batches; 0 commits; 0.0 s processing; models without a price: acme-1 (7)"
    )


def test_only_failures_that_may_pass_are_retried_by_the_quality_agent() -> None:
    """The agent's outputs are retried while the broker or ClickHouse is unreachable, and given up
    (logged) on a failure no retry mends: looping on one would hold faust's rebalances and the
    stop, and send the messages before the failing one again on every attempt."""
    from aiokafka.errors import (
        KafkaConnectionError,
        KafkaTimeoutError,
        MessageSizeTooLargeError,
        TopicAuthorizationFailedError,
    )

    from llmpulse.worker import _passing
    from sinks.clickhouse import SinkError

    def sink_error(cause: Exception) -> SinkError:
        try:
            raise SinkError("insert failed after 3 attempt(s)") from cause
        except SinkError as exc:
            return exc

    assert all(map(_passing, [KafkaTimeoutError(), KafkaConnectionError(), ConnectionError(), TimeoutError(),
                              TopicAuthorizationFailedError(), sink_error(ConnectionError("refused"))]))  # fmt: skip
    assert not any(map(_passing, [MessageSizeTooLargeError(), TypeError("not serializable"), KeyError("x"),
                                  sink_error(ValueError("bad block"))]))  # fmt: skip


def test_a_commit_the_group_rebalanced_under_is_logged_not_fatal(kafka_bootstrap: str) -> None:
    """A restarted worker joins while the killed one's session runs out: the group rebalances
    under the survivor's step and its commit fails (UnknownMemberId → CommitFailedError). That
    crashed the whole worker (seen in CI); the rows are in ClickHouse and the next owner skips
    them, so the step logs it and goes on."""
    import asyncio
    import uuid

    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.structs import OffsetAndMetadata

    from llmpulse.worker import _commit

    async def run() -> tuple[bool, int]:
        topic = f"rebalance-{uuid.uuid4().hex[:8]}"
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(topic, 2, 1)])
        await admin.close()
        opts = {"bootstrap_servers": kafka_bootstrap, "group_id": f"{topic}-g", "enable_auto_commit": False,
                "session_timeout_ms": 6000, "heartbeat_interval_ms": 500}  # fmt: skip
        # the first stops polling past its max poll interval, as a worker stuck in a long step
        first = AIOKafkaConsumer(topic, **opts, max_poll_interval_ms=2000)
        second = AIOKafkaConsumer(topic, **opts)
        await first.start()
        await first.getmany(timeout_ms=3000)
        assert len(first.assignment()) == 2
        try:
            await second.start()
            joining = asyncio.create_task(second.getmany(timeout_ms=8000))  # the group rebalances
            offsets = {TopicPartition(topic, 0): OffsetAndMetadata(1, "")}
            committed = True
            for _ in range(8):
                await asyncio.sleep(1.5)
                committed = await _commit(first, offsets, "calls")
                if not committed:
                    break
            await joining
            return committed, len(second.assignment())
        finally:
            await first.stop()
            await second.stop()

    committed, owned = asyncio.run(run())
    assert not committed and owned == 2
