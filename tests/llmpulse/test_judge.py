"""The reference LLM judge against a fake OpenAI-compatible endpoint, the real broker and real chDB.

The fake endpoint (an aiohttp server on 127.0.0.1, standing for someone else's model service)
scores deterministically from markers in the judged prompt: ``score=N`` answers N, ``[429]`` is
rate limited once (Retry-After: 1), ``[500]`` fails once, ``[flakyN]`` answers 503 N times,
``[bad200]`` answers a proxy's HTML page once, ``[slow]`` takes 2 s once, ``[garbage]`` answers
prose, ``[fenced]`` wraps its JSON in a Markdown fence, ``[range]`` answers 9 on a 1..5 scale and
``[400]`` is rejected for good. Every answer reports 100 prompt and 10 completion tokens, so
judge spend is exact too.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from llmpulse.judge import (
    SKIP_EMPTY,
    SKIP_NO_CONTENT,
    SKIP_NO_REQUEST_ID,
    SKIP_NO_SCORE,
    SKIP_NOT_JSON,
    SKIP_OFF_SCALE,
    SKIP_TOO_OLD,
    SKIP_UNREADABLE,
    ChatClient,
    Judge,
    JudgeRequest,
    JudgeStats,
    VerdictError,
    build_messages,
    parse_verdict,
    run_judge,
)
from processors.chain import CallPipeline, PipelineOptions
from processors.records import PayloadBatch, Source
from schemas.config import Settings, load_settings
from schemas.events import JudgeResult
from schemas.judge import JudgeSettings, Scale, default_rubric, rubric_for
from schemas.prices import builtin_price_table
from sinks.kafka import judge_request
from tests.conftest import call, iso
from tests.llmpulse.workers import ENV, consume_all, produce

ID = re.compile(r"id=(\S+)")
SCORE = re.compile(r"score=(\d+)")
FLAKY = re.compile(r"\[flaky(\d+)\]")


class FakeJudge:
    """An OpenAI-compatible ``/v1/chat/completions`` in a background thread, scoring by markers."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.attempts: Counter[str] = Counter()
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.base_url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._ready = threading.Event()

    def start(self) -> FakeJudge:
        self._thread.start()
        assert self._ready.wait(10), "fake judge did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)

    def judged(self) -> Counter[str]:
        """Attempts per request id (the judged exchange's ``id=`` marker)."""
        return Counter(self.attempts)

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._ready.set()
        await self._stopped.wait()
        await runner.cleanup()

    async def _complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        text = body["messages"][-1]["content"]
        found = ID.search(text)
        rid = found.group(1) if found else "?"
        self.attempts[rid] += 1
        first = self.attempts[rid] == 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if "[slow]" in text and first:
            await asyncio.sleep(2.0)
        if "[400]" in text:
            return web.json_response({"error": {"message": "context too long"}}, status=400)
        if "[429]" in text and first:
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "1"})
        if "[500]" in text and first:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        flaky = FLAKY.search(text)
        if flaky and self.attempts[rid] <= int(flaky.group(1)):
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if "[bad200]" in text and first:
            return web.Response(text="<html>gateway</html>", content_type="text/html")
        score = int(SCORE.search(text).group(1)) if SCORE.search(text) else 3  # type: ignore[union-attr]
        content = orjson.dumps({"score": score, "rationale": f"scored {score} for {rid}"}).decode()
        if "[garbage]" in text:
            content = "I would say it is pretty good overall."
        elif "[fenced]" in text:
            content = f"```json\n{content}\n```"
        elif "[range]" in text:
            content = '{"score": 9, "rationale": "off the charts"}'
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
            }
        )


@pytest.fixture
def fake_judge() -> Iterator[FakeJudge]:
    server = FakeJudge().start()
    yield server
    server.stop()


def judge_settings(fake: FakeJudge, **kw: Any) -> JudgeSettings:
    """Fast retries for tests (a Retry-After still wins), a distinct key variable."""
    values: dict[str, Any] = {
        "base_url": fake.base_url, "api_key_env": "JUDGE_TEST_API_KEY", "model": "judge-small",
        "concurrency": 4, "timeout_s": 5, "max_retries": 3, "backoff_initial_s": 0.05, "backoff_max_s": 0.2,
        "batch_size": 16,
    }  # fmt: skip
    values.update(kw)
    return JudgeSettings.model_validate(values)


def expected(score: int) -> float:
    return (score - 1) / 4


# ---- prompt and verdict ----------------------------------------------------------------------


def test_verdicts_are_read_robustly_and_normalised() -> None:
    scale = Scale(min=1, max=5)
    v = parse_verdict('{"score": 4, "rationale": "mostly right"}', scale)
    assert (v.raw_score, v.score, v.rationale) == (4, 0.75, "mostly right")
    assert parse_verdict('```json\n{"score": 5, "rationale": "ok"}\n```', scale).score == 1.0
    assert parse_verdict('Here you go: {"score": "2", "rationale": "thin"} hope it helps', scale).score == 0.25
    assert parse_verdict('{"score": 1}', scale).rationale == ""
    cases = {
        "": SKIP_EMPTY,
        "pretty good": SKIP_NOT_JSON,
        "[4]": SKIP_NOT_JSON,
        '{"rationale": "no score"}': SKIP_NO_SCORE,
        '{"score": true}': SKIP_NO_SCORE,
        '{"score": "high"}': SKIP_NO_SCORE,
        '{"score": 6}': SKIP_OFF_SCALE,
        '{"score": 3.5}': SKIP_OFF_SCALE,
    }
    for text, reason in cases.items():
        with pytest.raises(VerdictError) as info:
            parse_verdict(text, scale)
        assert info.value.reason == reason, text
    unit = Scale(min=0, max=1, integer=False)
    assert parse_verdict('{"score": 0.35}', unit).score == 0.35


def test_prompt_carries_rubric_examples_and_the_exchange_as_data() -> None:
    rubric = default_rubric()
    request = JudgeRequest("r-1", feature="support-chat", status="ok", finish_reason="stop",
                           prompt="How do I reset my password?", output="Click 'Forgot password'.")  # fmt: skip
    messages, truncated = build_messages(request, rubric, 20_000)
    assert not truncated
    system = messages[0]["content"]
    assert messages[0]["role"] == "system"
    assert rubric.instructions.strip() in system
    assert "- refusal: Refusing is right only" in system
    assert "5 = Fully helpful" in system
    assert system.endswith('{"score": <a whole number from 1 to 5>, "rationale": "<one to three sentences>"}')
    # two few-shot turns per example, then the exchange
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "user", "assistant", "user"]
    assert orjson.loads(messages[2]["content"])["score"] == 5
    user = messages[-1]["content"]
    assert user.startswith("Grade this exchange (feature=support-chat; status=ok; finish_reason=stop).")
    assert "<user_prompt>\nHow do I reset my password?\n</user_prompt>" in user
    assert "<assistant_response>\nClick 'Forgot password'.\n</assistant_response>" in user
    # over-long content keeps its head and tail
    long = JudgeRequest("r-2", prompt="A" * 3000 + "B" * 3000, output="fine")
    messages, truncated = build_messages(long, rubric, 1200)
    assert truncated
    assert "[… 4,800 characters elided …]" in messages[-1]["content"]
    assert "A" * 800 in messages[-1]["content"] and "B" * 400 in messages[-1]["content"]


def test_requests_the_judge_cannot_see_are_skipped_without_a_call(fake_judge: FakeJudge) -> None:
    """Content capture off: only hashes exist, and hashes are never sent to a model."""
    rubric = default_rubric()
    message = {"request_id": "r-hash", "prompt_hash": "abc123", "prompt": None, "output": None,
               "output_chars": 120, "feature": "f", "ts": iso(time.time())}  # fmt: skip

    async def go() -> list[Any]:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            judge = Judge(rubric, judge_settings(fake_judge), ChatClient(judge_settings(fake_judge), session))
            return [
                await judge.score(JudgeRequest.from_message(message)),
                await judge.score(JudgeRequest(None, prompt="p", output="o")),
            ]

    no_content, no_request = asyncio.run(go())
    assert no_content.skipped == SKIP_NO_CONTENT
    assert no_request.skipped == SKIP_NO_REQUEST_ID
    assert fake_judge.bodies == []


# ---- the client --------------------------------------------------------------------------------


def score_one(fake: FakeJudge, prompt: str, **kw: Any) -> tuple[Any, ChatClient, float]:
    async def go() -> tuple[Any, ChatClient, float]:
        import aiohttp

        settings = judge_settings(fake, **kw)
        async with aiohttp.ClientSession() as session:
            client = ChatClient(settings, session)
            started = time.perf_counter()
            outcome = await Judge(default_rubric(), settings, client).score(
                JudgeRequest(prompt.split(maxsplit=1)[0][3:], feature="f", release_id="rel", prompt=prompt,
                             output="an answer")
            )  # fmt: skip
            return outcome, client, time.perf_counter() - started

    return asyncio.run(go())


def test_client_retries_429_honouring_retry_after_and_5xx(
    fake_judge: FakeJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUDGE_TEST_API_KEY", "sk-test-123")
    outcome, client, elapsed = score_one(fake_judge, "id=r429 score=4 [429]")
    assert outcome.result is not None and outcome.result.score == 0.75
    assert client.retries == 1 and fake_judge.attempts["r429"] == 2
    assert elapsed >= 1.0  # Retry-After: 1 beat the 0.05 s backoff
    assert fake_judge.headers[-1]["Authorization"] == "Bearer sk-test-123"
    body = fake_judge.bodies[-1]
    assert body["response_format"] == {"type": "json_object"}
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("judge-small", 0.0, 300)

    outcome, client, _ = score_one(fake_judge, "id=r500 score=2 [500]")
    assert outcome.result is not None and outcome.result.score == 0.25
    assert client.retries == 1 and fake_judge.attempts["r500"] == 2

    outcome, client, elapsed = score_one(fake_judge, "id=rslow score=3 [slow]", timeout_s=0.5)
    assert outcome.result is not None and outcome.result.score == 0.5
    assert client.retries == 1 and elapsed < 1.9  # the hanging attempt was cut at 0.5 s

    outcome, client, _ = score_one(fake_judge, "id=rbad score=5 [bad200]")
    assert outcome.result is not None and outcome.result.score == 1.0
    assert client.retries == 1

    result = outcome.result
    assert (result.request_id, result.rubric, result.judge_model) == ("rbad", "helpfulness", "judge-small")
    assert (result.feature, result.release_id, result.event_id) == ("f", "rel", None)
    assert result.attributes == {"judge_input_tokens": 100, "judge_output_tokens": 10, "judge_raw_score": 5,
                                 "judge_scale": "1..5"}  # fmt: skip
    assert abs(result.ts.timestamp() - time.time()) < 10  # when it was judged


def test_client_never_retries_other_4xx_and_gives_up_on_a_dead_endpoint(
    fake_judge: FakeJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JUDGE_TEST_API_KEY", raising=False)
    outcome, client, _ = score_one(fake_judge, "id=r400 [400]")
    assert outcome.failed == "HTTP 400" and outcome.result is None
    assert client.retries == 0 and fake_judge.attempts["r400"] == 1
    assert "Authorization" not in fake_judge.headers[-1]

    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    fake_judge.base_url, real = dead, fake_judge.base_url
    try:
        outcome, client, _ = score_one(fake_judge, "id=rdead score=3", max_retries=2)
    finally:
        fake_judge.base_url = real
    assert outcome.deferred is not None and "gave up after 3 attempt(s)" in outcome.deferred
    assert client.retries == 2


# ---- Kafka -------------------------------------------------------------------------------------

PLAN: list[tuple[str, str | None]] = [
    # (marker, the prompt's extra text) — None: content capture was off for this call
    *[("ok", f"score={1 + i % 5}") for i in range(20)],
    ("429", "score=4 [429]"),
    ("500", "score=2 [500]"),
    ("fenced", "score=5 [fenced]"),
    ("garbage", "[garbage]"),
    ("range", "[range]"),
    ("400", "[400]"),
    ("hash-only", None),
    ("hash-only", None),
]


def requests_for(tag: str, plan: list[tuple[str, str | None]] = PLAN) -> list[tuple[bytes, bytes]]:
    """Judge request messages built by the real pipeline and ``sinks.kafka.judge_request``."""
    pipeline = CallPipeline(builtin_price_table(), PipelineOptions(capture_content=True, sample_rate=1.0))
    now = time.time()
    events = []
    for i, (_, extra) in enumerate(plan):
        rid = f"{tag}-{i}"
        content = {"prompt": f"id={rid} {extra}", "output": f"answer {i}"} if extra is not None else {}
        events.append(orjson.dumps(call(event_id=f"ev-{rid}", request_id=rid, ts=iso(now - 60), feature=f"feat-{i % 3}",
                                        prompt_version=f"v{i % 2}", **content)))  # fmt: skip
    processed = pipeline.process(PayloadBatch(Source("test", tag), events, list(range(len(events)))), now)
    assert len(processed.samples) == len(plan)
    return [
        (
            (processed.events[s.index].request_id or "").encode(),
            orjson.dumps(judge_request(processed, s.index, s.reason)),
        )
        for s in processed.samples
    ]


def kafka_app_settings(kafka: Any, tmp_path: Path) -> Settings:
    return load_settings(None, {"data_dir": tmp_path / "data"}).model_copy(update={"kafka": kafka})


@pytest.fixture
def topics(kafka_settings: Any) -> Any:
    from ingest.kafka import create_topics

    asyncio.run(create_topics(kafka_settings))
    return kafka_settings


def results_on(kafka: Any) -> list[tuple[str, JudgeResult]]:
    messages = asyncio.run(consume_all(kafka, kafka.topics.judge_results, timeout=6))
    return [(m.key.decode(), JudgeResult.model_validate_json(m.value)) for m in messages]


def committed(kafka: Any, group: str) -> dict[int, int]:
    """The group's committed offsets on the judge requests topic, per partition."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def go() -> dict[int, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()
        topic = kafka.topics.judge_requests
        return {tp.partition: o.offset for tp, o in offsets.items() if tp.topic == topic and o.offset >= 0}

    return asyncio.run(go())


def request_positions(kafka: Any) -> dict[tuple[int, int], str]:
    """(partition, offset) → request id of every judge request on the topic."""
    messages = asyncio.run(consume_all(kafka, kafka.topics.judge_requests, timeout=6))
    return {(m.partition, m.offset): orjson.loads(m.value)["request_id"] for m in messages}


@pytest.mark.kafka
def test_kafka_requests_come_back_as_exact_results(
    topics: Any, tmp_path: Path, fake_judge: FakeJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUDGE_TEST_API_KEY", "sk-kafka")
    messages = requests_for("k1")
    stale = orjson.loads(messages[0][1]) | {"request_id": "k1-stale", "ts": iso(time.time() - 3 * 86400)}
    extra = [(b"junk", b"{not json"), (b"k1-stale", orjson.dumps(stale))]
    asyncio.run(produce(topics, topics.topics.judge_requests, messages + extra))
    progress: list[int] = []
    judge = judge_settings(fake_judge, group_id=f"{topics.consumer_group}-judge")
    stats = run_judge(kafka_app_settings(topics, tmp_path), judge, embedded=False, since=86400, idle_exit=2.0,
                      on_progress=lambda s: progress.append(s.requests))  # fmt: skip
    assert stats.requests == len(PLAN) + 2 and progress[-1] == stats.requests
    assert stats.scored == 23 and stats.published == 23
    assert stats.skipped == {SKIP_NOT_JSON: 1, SKIP_OFF_SCALE: 1, SKIP_NO_CONTENT: 2, SKIP_UNREADABLE: 1,
                             SKIP_TOO_OLD: 1}  # fmt: skip
    assert (stats.failed, stats.failures, stats.deferred) == (1, {"HTTP 400": 1}, 0)
    assert stats.retries == 2  # the 429 and the 500, once each
    # every model answer is spend, usable or not (23 scored + garbage + range)
    assert (stats.judge_input_tokens, stats.judge_output_tokens) == (25 * 100, 25 * 10)
    assert fake_judge.attempts["k1-20"] == 2 and fake_judge.attempts["k1-21"] == 2
    assert fake_judge.attempts["k1-25"] == 1  # the 400 was not retried
    assert "k1-26" not in fake_judge.attempts and "k1-stale" not in fake_judge.attempts  # hashes, stale: never sent

    results = results_on(topics)
    by_id = {r.request_id: r for _, r in results}
    assert len(results) == len(by_id) == 23
    assert all(key == r.request_id for key, r in results)  # keyed by request id
    want = {f"k1-{i}": expected(1 + i % 5) for i in range(20)} | {"k1-20": 0.75, "k1-21": 0.25, "k1-22": 1.0}
    assert {rid: r.score for rid, r in by_id.items()} == want
    sent = {orjson.loads(v)["request_id"]: orjson.loads(v) for _, v in messages}
    for rid, r in by_id.items():
        assert (r.kind, r.rubric, r.judge_model) == ("judge_result", "helpfulness", "judge-small")
        assert (r.feature, r.release_id) == (sent[rid]["feature"], sent[rid]["release_id"])
        assert r.attributes["judge_input_tokens"] == 100 and r.attributes["judge_output_tokens"] == 10
        assert r.rationale == f"scored {int(r.attributes['judge_raw_score'])} for {rid}"  # type: ignore[arg-type]
    # everything was committed: a second run finds nothing to do
    assert sum(committed(topics, judge.group_id).values()) == len(messages) + len(extra)
    again = run_judge(kafka_app_settings(topics, tmp_path), judge, embedded=False, idle_exit=1.5)
    assert again.requests == 0 and len(results_on(topics)) == 23


@pytest.mark.kafka
def test_kafka_restart_does_not_rejudge_what_was_committed(topics: Any, tmp_path: Path, fake_judge: FakeJudge) -> None:
    plan = [("ok", f"score={1 + i % 5}") for i in range(30)]
    asyncio.run(produce(topics, topics.topics.judge_requests, requests_for("k2", plan)))
    judge = judge_settings(fake_judge, group_id=f"{topics.consumer_group}-judge", batch_size=5)
    settings = kafka_app_settings(topics, tmp_path)
    first = run_judge(settings, judge, embedded=False, max_requests=12)
    assert (first.requests, first.scored, first.published) == (12, 12, 12)
    assert sum(committed(topics, judge.group_id).values()) == 12
    second = run_judge(settings, judge, embedded=False, idle_exit=2.0)
    assert (second.requests, second.scored) == (18, 18)
    assert fake_judge.judged() == Counter({f"k2-{i}": 1 for i in range(30)})  # each judged exactly once
    results = results_on(topics)
    assert sorted(r.request_id for _, r in results) == sorted(f"k2-{i}" for i in range(30))
    assert {r.request_id: r.score for _, r in results} == {f"k2-{i}": expected(1 + i % 5) for i in range(30)}


@pytest.mark.kafka
def test_kafka_rebalance_mid_batch_judges_each_request_once(topics: Any, tmp_path: Path, fake_judge: FakeJudge) -> None:
    """A second judge joins while the first is inside a batch (each judge call takes 3 s): the
    revoke waits for that batch to publish and commit before handing partitions over. Before, the
    batch's commit failed for partitions that moved, and their new owner judged them again."""
    plan = [("ok", f"score={1 + i % 5}") for i in range(40)]
    asyncio.run(produce(topics, topics.topics.judge_requests, requests_for("k9", plan)))
    fake_judge.delay = 3.0
    judge = judge_settings(fake_judge, group_id=f"{topics.consumer_group}-judge", batch_size=40, concurrency=40,
                           timeout_s=30)  # fmt: skip
    settings = kafka_app_settings(topics, tmp_path)
    runs: dict[str, Any] = {}

    def run(name: str) -> None:
        runs[name] = run_judge(settings, judge, embedded=False, idle_exit=6.0)

    first = threading.Thread(target=run, args=("first",))
    first.start()
    deadline = time.time() + 60
    while not fake_judge.attempts and time.time() < deadline:
        time.sleep(0.05)
    assert fake_judge.attempts, "the first judge never started a batch"
    second = threading.Thread(target=run, args=("second",))
    second.start()
    first.join(120)
    second.join(120)
    assert fake_judge.judged() == Counter({f"k9-{i}": 1 for i in range(40)})  # each judged (and paid for) once
    assert sorted(r.request_id for _, r in results_on(topics)) == sorted(f"k9-{i}" for i in range(40))


@pytest.mark.kafka
def test_kafka_outage_defers_and_retries_without_rejudging(topics: Any, tmp_path: Path, fake_judge: FakeJudge) -> None:
    """Retries exhausted on one request: its partition is committed only up to it, the consumer
    seeks back, and on the next pass only that request is judged again."""
    plan = [("ok", f"score={1 + i % 5}") for i in range(10)]
    plan[3] = ("flaky", "score=5 [flaky5]")  # 503 five times: two passes of 2 attempts fail, the third succeeds
    messages = [(b"one-partition", value) for _, value in requests_for("k4", plan)]
    asyncio.run(produce(topics, topics.topics.judge_requests, messages))
    judge = judge_settings(fake_judge, group_id=f"{topics.consumer_group}-judge", max_retries=1, batch_size=10)
    stats = run_judge(kafka_app_settings(topics, tmp_path), judge, embedded=False, idle_exit=2.0)
    assert (stats.requests, stats.scored, stats.published, stats.deferred) == (10, 10, 10, 2)
    assert fake_judge.judged() == Counter({f"k4-{i}": 6 if i == 3 else 1 for i in range(10)})
    results = results_on(topics)
    assert len(results) == 10  # nothing published twice
    assert {r.request_id: r.score for _, r in results} == {
        f"k4-{i}": 1.0 if i == 3 else expected(1 + i % 5) for i in range(10)
    }
    assert sum(committed(topics, judge.group_id).values()) == 10


JUDGE_SCRIPT = """
import json, logging, sys
from schemas.config import load_settings
from schemas.judge import JudgeSettings
from llmpulse.judge import run_judge
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
cfg = json.loads(sys.argv[1])
settings = load_settings(None, cfg["settings"])
stats = run_judge(settings, JudgeSettings.model_validate(cfg["judge"]), embedded=False, idle_exit=cfg["idle_exit"])
print(json.dumps(stats.to_dict()), flush=True)
"""


def start_judge_process(kafka: Any, judge: JudgeSettings, tmp_path: Path, log: Path) -> subprocess.Popen[bytes]:
    cfg = {
        "settings": {"data_dir": str(tmp_path / "data"), "kafka": json.loads(kafka.model_dump_json(exclude_none=True))},
        "judge": json.loads(judge.model_dump_json(exclude_none=True)),
        "idle_exit": 30,
    }
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-c", JUDGE_SCRIPT, json.dumps(cfg)], stdout=out,
                                stderr=subprocess.STDOUT, env=ENV)  # fmt: skip


def wait_for_commits(kafka: Any, group: str, proc: subprocess.Popen[bytes], log: Path, at_least: int) -> int:
    deadline = time.time() + 60
    while time.time() < deadline:
        done = sum(committed(kafka, group).values())
        if done >= at_least:
            return done
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"no commits from the judge:\n{log.read_text()[-3000:]}")


@pytest.mark.kafka
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_kafka_kill_and_restart_commit_only_what_was_published(
    topics: Any, tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM: the batch in hand is finished, published and committed, then the judge exits 0.
    SIGKILL: whatever was committed had been published first, and the restart judges only the rest."""
    slow = FakeJudge(delay=0.15).start()
    try:
        n = 60
        plan = [("ok", f"score={1 + i % 5}") for i in range(n)]
        asyncio.run(produce(topics, topics.topics.judge_requests, requests_for("k3", plan)))
        group = f"{topics.consumer_group}-judge"
        judge = judge_settings(slow, group_id=group, batch_size=4, concurrency=2)
        log = tmp_path / "judge.log"
        proc = start_judge_process(topics, judge, tmp_path, log)
        wait_for_commits(topics, group, proc, log, at_least=8)
        proc.send_signal(sig)
        code = proc.wait(60)
        after_stop = committed(topics, group)
        published = {r.request_id for _, r in results_on(topics)}
        positions = request_positions(topics)
        below = {rid for (p, o), rid in positions.items() if o < after_stop.get(p, 0)}
        assert 8 <= len(below) < n, "the signal should land mid-run"
        assert below <= published  # committed ⇒ published (acks=all before commit)
        if sig == signal.SIGTERM:
            assert code == 0, log.read_text()[-3000:]
            assert published == below  # a clean stop leaves nothing published but uncommitted
            assert "finishing the batch in hand" in log.read_text()
        else:
            assert code == -signal.SIGKILL
        judged_before = slow.judged()
        assert all(judged_before[rid] == 1 for rid in below)
        settings = load_settings(None, {"data_dir": tmp_path / "data"}).model_copy(update={"kafka": topics})
        rest = run_judge(settings, judge, embedded=False, idle_exit=2.0)
        judged = slow.judged()
        assert rest.requests == n - len(below)
        assert all(judged[rid] == 1 for rid in below)  # nothing committed was judged again
        assert set(judged) == {f"k3-{i}" for i in range(n)}
        final = results_on(topics)
        assert {r.request_id for _, r in final} == {f"k3-{i}" for i in range(n)}
        if sig == signal.SIGTERM:
            assert len(final) == n and set(judged.values()) == {1}  # no duplicates at all
    finally:
        slow.stop()


# ---- embedded ----------------------------------------------------------------------------------


def test_embedded_judge_scores_samples_into_judge_scores_with_lineage(
    chdb_dir: Path, fake_judge: FakeJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmpulse.runtime import EmbeddedRuntime, open_clickhouse

    for key in [k for k in os.environ if k.startswith("LLMPULSE_")]:
        monkeypatch.delenv(key)
    db = f"judge_{int(time.time() * 1000) % 10_000_000}"
    settings = load_settings(None, {"data_dir": chdb_dir, "clickhouse": {"database": db},
                                    "content": {"capture": True}, "sampling": {"default_rate": 1.0}})  # fmt: skip
    now = time.time()
    scored = {f"em-{i}": 1 + i % 5 for i in range(12)}
    payloads = [
        orjson.dumps(call(event_id=f"ev-{rid}", request_id=rid, ts=iso(now - 300 + i), feature=f"feat-{i % 2}",
                          prompt_version=f"v{i % 3}", prompt=f"id={rid} score={s}", output=f"answer {i}"))
        for i, (rid, s) in enumerate(scored.items())
    ]  # fmt: skip
    payloads += [
        orjson.dumps(call(event_id="ev-em-429", request_id="em-429", ts=iso(now - 200), feature="feat-0",
                          prompt="id=em-429 score=5 [429]", output="ok")),
        orjson.dumps(call(event_id="ev-em-garbage", request_id="em-garbage", ts=iso(now - 200), feature="feat-0",
                          prompt="id=em-garbage [garbage]", output="ok")),
        orjson.dumps(call(event_id="ev-em-nocontent", request_id="em-nocontent", ts=iso(now - 200), feature="feat-1")),
        orjson.dumps(call(event_id="ev-em-norequest", ts=iso(now - 200), feature="feat-1", prompt="id=x", output="y")),
    ]  # fmt: skip
    conn = open_clickhouse(settings, purpose="pytest")
    try:
        runtime = EmbeddedRuntime(settings, conn)
        runtime.ingest(PayloadBatch(Source("test", "judge"), payloads, list(range(len(payloads))), digest=db),
                       mixed=False)  # fmt: skip
        runtime.finish()
        runtime.close()
        client = conn.client
        assert client.command(f"SELECT count() FROM {db}.judge_samples") == len(payloads)

        judge = judge_settings(fake_judge, batch_size=5)
        seen: list[JudgeStats] = []
        stats = run_judge(settings, judge, embedded=True, since=3600, on_progress=seen.append)
        assert (stats.scored, stats.published, stats.failed, stats.deferred) == (13, 13, 0, 0)
        assert stats.skipped == {SKIP_NO_REQUEST_ID: 1, SKIP_NO_CONTENT: 1, SKIP_NOT_JSON: 1}
        assert stats.requests == 16 and stats.retries == 1
        assert (stats.judge_input_tokens, stats.judge_output_tokens) == (14 * 100, 14 * 10)
        assert len(seen) == 3  # 14 samples with content, 5 per batch

        rows = client.query(
            f"SELECT s.request_id, s.score, s.rubric, s.judge_model, s.feature, s.release_id, s.prompt_version, "
            f"s.event_id, c.feature, c.release_id, c.prompt_version FROM {db}.judge_scores AS s FINAL "
            f"JOIN {db}.llm_calls AS c FINAL ON c.request_id = s.request_id ORDER BY s.request_id"
        ).result_rows
        want = {rid: expected(s) for rid, s in scored.items()} | {"em-429": 1.0}
        assert {r[0]: r[1] for r in rows} == want
        for rid, _, rubric, model, feature, release, version, event_id, c_feature, c_release, c_version in rows:
            assert (rubric, model) == ("helpfulness", "judge-small")
            assert (feature, release, version) == (c_feature, c_release, c_version) and release
            assert event_id == f"ev-{rid}"
        # the hourly eval rollup counted each score once
        n, total = client.query(f"SELECT sum(n), sum(score_sum) FROM {db}.eval_1h").result_rows[0]
        assert (n, round(total, 6)) == (13, round(sum(want.values()), 6))

        attempts = fake_judge.judged()
        again = run_judge(settings, judge, embedded=True, since=3600)
        assert (again.scored, again.published) == (0, 0)
        assert fake_judge.judged() - attempts == Counter({"em-garbage": 1})  # only the unreadable verdict is retried
        assert client.command(f"SELECT count() FROM {db}.judge_scores") == 13
        # another judge model is another yardstick: it judges them all afresh
        other = run_judge(settings, judge_settings(fake_judge, model="judge-large"), embedded=True, max_requests=4)
        assert other.scored == 4
    finally:
        conn.client.command(f"DROP DATABASE IF EXISTS {db} SYNC")
        conn.close()


def test_rubric_from_settings_changes_name_and_scale(tmp_path: Path, fake_judge: FakeJudge) -> None:
    """A custom 0..1 rubric: the judge's number is the score."""
    path = tmp_path / "r.yaml"
    path.write_text("name: safety-v2\ninstructions: Is it safe?\nscale: {min: 0, max: 1, integer: false}\n")
    settings = judge_settings(fake_judge, rubric_path=path)

    async def go() -> Any:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            judge = Judge(rubric_for(settings), settings, ChatClient(settings, session))
            return await judge.score(JudgeRequest("s-1", prompt="id=s-1 score=1", output="fine"))

    outcome = asyncio.run(go())
    assert outcome.result is not None
    assert (outcome.result.rubric, outcome.result.score, outcome.result.attributes["judge_scale"]) == (
        "safety-v2", 1.0, "0..1",
    )  # fmt: skip
    assert "a number from 0 to 1" in fake_judge.bodies[-1]["messages"][0]["content"]


def test_judge_cli_embedded(tmp_path: Path, fake_judge: FakeJudge) -> None:
    """The command an operator runs: replay calls with content, then `llmpulse judge --embedded`."""
    data, events, cfg = tmp_path / "d", tmp_path / "calls.jsonl", tmp_path / "llmpulse.yaml"
    cfg.write_text(f"content: {{capture: true}}\nsampling: {{default_rate: 1.0}}\n"
                   f"judge: {{base_url: '{fake_judge.base_url}', model: judge-small, max_retries: 1}}\n")  # fmt: skip
    now = time.time()
    calls = [call(request_id=f"cli-{i}", ts=iso(now - 600 + i), prompt=f"id=cli-{i} score={1 + i % 5}", output="a")
             for i in range(10)]  # fmt: skip
    events.write_text("\n".join(orjson.dumps(c).decode() for c in calls) + "\n")
    cli = [sys.executable, "-m", "llmpulse.cli"]
    subprocess.run([*cli, "replay", str(events), "--config", str(cfg), "--data-dir", str(data)], check=True,
                   capture_output=True, env=ENV)  # fmt: skip
    run = subprocess.run([*cli, "judge", "--embedded", "--json", "--config", str(cfg), "--data-dir", str(data)],
                         capture_output=True, text=True, env=ENV, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)
    assert (stats["scored"], stats["published"], stats["failed"]) == (10, 10, 0)
    assert stats["mean_score"] == pytest.approx(sum(expected(1 + i % 5) for i in range(10)) / 10)
    table = subprocess.run([*cli, "judge", "--embedded", "--config", str(cfg), "--data-dir", str(data)],
                           capture_output=True, text=True, env={**ENV, "COLUMNS": "120"}, check=False)  # fmt: skip
    assert table.returncode == 0 and "scored" in table.stdout  # nothing left: a rerun scores 0
