"""``llmpulse dlq replay`` into ClickHouse: letters of every kind go back through the pipeline."""

from __future__ import annotations

import time
from typing import Any

import orjson

from llmpulse.dlq import replay_into_clickhouse
from llmpulse.runtime import EmbeddedRuntime
from tests.conftest import iso, payload, scalar


def test_replay_routes_letters_by_kind_as_ingest_does(settings: Any, conn: Any) -> None:
    """Calls, feedback and a call whose unknown field mentions a kind (which the old byte-scan
    split sent to the feedback decoder, and the DLQ) are replayed where they belong; a letter
    still bad is recorded as rejected with its reason."""
    now = time.time()
    feedback = orjson.dumps({"kind": "feedback", "request_id": "r-1", "ts": iso(now), "thumbs": "up"})
    letters = [
        {"dlq_id": "a", "raw": payload(request_id="r-1", ts=iso(now - 60))},
        {"dlq_id": "b", "raw": feedback},
        {"dlq_id": "c", "raw": payload(latency_ms=-1, ts=iso(now - 60))},
        {"dlq_id": "d", "raw": payload(extra={"kind": "feedback"}, ts=iso(now - 60))},
    ]
    runtime = EmbeddedRuntime(settings, conn)
    outcome = replay_into_clickhouse(runtime, letters, dry_run=False)
    runtime.close()
    assert (outcome.considered, outcome.accepted, outcome.rejected) == (4, 3, 1)
    rows = conn.client.query("SELECT dlq_id, outcome, reason FROM dlq_replays ORDER BY dlq_id").result_rows
    assert [(r[0], r[1]) for r in rows] == [("a", "accepted"), ("b", "accepted"), ("c", "rejected"), ("d", "accepted")]
    assert rows[2][2] == "Expected `float` >= 0.0"
    assert scalar(conn, "SELECT count() FROM llm_calls FINAL") == 2
    assert scalar(conn, "SELECT count() FROM feedback FINAL WHERE event_id != ''") == 1  # with its call's lineage


def test_to_kafka_republishes_only_what_the_pipeline_now_accepts(tmp_path: Any, kafka_settings: Any) -> None:
    """Sent again, a letter the pipeline still rejects is rejected again and lands in the dead
    letters twice: --to-kafka checks first and sends the rest only with --all."""
    import asyncio

    from ingest.kafka import create_topics
    from tests.llmpulse.test_cli import llmpulse
    from tests.llmpulse.workers import consume_all, write_config

    asyncio.run(create_topics(kafka_settings))
    ahead = payload(event_id="ahead", ts=iso(time.time() + 2 * 3600))  # two hours ahead: over the 1 h default
    file = tmp_path / "calls.jsonl"
    file.write_bytes(ahead + b'\n{"event_id": "cut\n')
    data = str(tmp_path / "d")
    llmpulse("replay", str(file), "--data-dir", data)
    cfg = str(write_config(tmp_path / "llmpulse.yaml", kafka_settings))
    fixed = {"LLMPULSE_PIPELINE__FUTURE_TOLERANCE": "3h"}  # the fix: this config accepts the first now
    out = llmpulse("dlq", "replay", "--to-kafka", "--config", cfg, "--data-dir", data, **fixed).stdout
    calls = kafka_settings.topics.calls
    assert f"Republished 1 of 2 dead letters to {calls}." in out
    assert "The other 1, which this config's pipeline still rejects, stay in the dead letters (--all" in out
    sent = asyncio.run(consume_all(kafka_settings, calls))
    assert [m.value for m in sent] == [ahead]
    out = llmpulse("dlq", "replay", "--to-kafka", "--all", "--config", cfg, "--data-dir", data, **fixed).stdout
    assert f"Republished 1 of 1 dead letters to {calls}." in out  # the one left; the first is done
    # the topic's partitions come back in no set order: the unkeyed letter may sit on any of them
    assert sorted(m.value for m in asyncio.run(consume_all(kafka_settings, calls))) == sorted(
        [ahead, b'{"event_id": "cut']
    )


def test_show_counts_what_a_replay_took_care_of(tmp_path: Any) -> None:
    """The letters stay after a replay (their raw bytes are the record); ``pending`` says which
    reasons are still open, so a fixed cause does not read as a live problem."""
    from tests.llmpulse.test_cli import llmpulse

    ahead = [payload(event_id=f"ahead-{i}", ts=iso(time.time() + 2 * 3600)) for i in range(2)]  # over the 1 h limit
    file = tmp_path / "calls.jsonl"
    file.write_bytes(b"\n".join(ahead) + b'\n{"event_id": "cut\n')
    data = str(tmp_path / "d")
    llmpulse("replay", str(file), "--data-dir", data)

    def show() -> tuple[dict[str, tuple[int, int]], str]:
        groups = orjson.loads(llmpulse("dlq", "show", "--json", "--data-dir", data).stdout)
        by_path = {g["path"]: (g["letters"], g["pending"]) for g in groups}
        assert len(by_path) == len(groups)  # the two timestamps' reasons differ in their numbers only: one group
        return by_path, llmpulse("dlq", "show", "--data-dir", data).stdout

    groups, text = show()
    assert groups == {"$.ts": (2, 2), "$": (1, 1)}
    assert "3 of 3 not replayed yet" in text
    llmpulse("dlq", "replay", "--data-dir", data, LLMPULSE_PIPELINE__FUTURE_TOLERANCE="3h")  # the fix
    groups, text = show()
    assert groups == {"$.ts": (2, 0), "$": (1, 1)}
    assert "1 of 3 not replayed yet" in text
