"""``llmpulse judge``: the reference LLM judge, scoring sampled calls against a rubric.

Both runtimes sample calls for a judge; this is the judge. It asks any OpenAI-compatible chat
completions API for a JSON verdict (``{"score": <points>, "rationale": "..."}``), maps the points
onto 0..1 and hands back ``JudgeResult`` events, so its scores land in ``judge_scores`` joined to
their calls exactly like those of a judge a team runs itself.

* Kafka: consumes ``llm.judge.requests`` (``sinks.kafka.judge_request``) in its own consumer
  group, scores each fetched batch concurrently, publishes the verdicts keyed by request id to
  ``llm.judge.results`` (idempotent producer, acks=all) and commits offsets only once every
  verdict of the batch is acknowledged: at least once, and the results pipeline dedupes
  re-published verdicts by (request, rubric, judge model).
* Embedded: scores the ``judge_samples`` rows that have no score for this rubric and judge model
  yet (an anti-join, so a second run judges nothing twice) and ingests the verdicts through
  ``EmbeddedRuntime`` like any other result.

What is never sent to a model: hashes. A call whose prompt and output were not captured
(``content.capture`` off) cannot be judged by text, and is skipped with a counted reason.
A verdict that cannot be read (not JSON, no score, off the scale) is a counted skip too, never
a crash. The judge's own token usage rides in each result's ``attributes`` so judge spend is
visible beside the spend it judges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp
import orjson
import xxhash
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import OffsetAndMetadata
from pydantic import ValidationError

from ingest.kafka import client_options, producer_options, stop_consumer, stop_producer
from schemas import limits
from schemas.config import Settings
from schemas.events import JudgeResult
from schemas.judge import JudgeSettings, Rubric, Scale, rubric_for
from sinks.alerts.retry import Backoff, classify_status, parse_retry_after

log = logging.getLogger("llmpulse.judge")

SKIP_NO_CONTENT = "no content: turn on content.capture, or judge in the service"
SKIP_NO_REQUEST_ID = "no request_id: a verdict could not be joined to its call"
SKIP_UNREADABLE = "unreadable judge request: not a JSON object"
SKIP_TOO_OLD = "call older than --since"
SKIP_EMPTY = "judge answer is empty"
SKIP_NOT_JSON = "judge answer is not a JSON object"
SKIP_NO_SCORE = "judge answer has no numeric score"
SKIP_OFF_SCALE = "judge score is not on the rubric's scale"
SKIP_INVALID = "verdict does not validate as a JudgeResult"

USER_AGENT = "llmpulse-judge"
STOP_CONSUMER_S = 5.0
"""At exit, how long leaving the consumer group may take (the broker may be gone)."""
STOP_PRODUCER_S = 5.0
"""At exit, how long verdicts the broker has not acknowledged are waited for. What is left is
judged again: the requests' offsets are committed only after their verdicts are acknowledged."""
MAX_POLL_INTERVAL_MS = 1_800_000
"""A batch may wait out long Retry-Afters; the group must not evict the judge meanwhile."""


# ---- what is judged -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JudgeRequest:
    """One sampled call, from a Kafka judge request or a ``judge_samples`` row."""

    request_id: str | None
    event_id: str | None = None
    feature: str | None = None
    release_id: str | None = None
    ts: datetime | None = None
    reason: str | None = None
    status: str | None = None
    refusal: bool = False
    finish_reason: str | None = None
    prompt: str | None = None
    output: str | None = None

    @property
    def has_content(self) -> bool:
        return self.prompt is not None or self.output is not None

    @classmethod
    def from_message(cls, body: Mapping[str, Any]) -> JudgeRequest:
        """A ``sinks.kafka.judge_request`` message (fields a judge does not need are ignored)."""
        return cls(
            request_id=_text(body.get("request_id")),
            event_id=_text(body.get("event_id")),
            feature=_text(body.get("feature")),
            release_id=_text(body.get("release_id")),
            ts=_parse_ts(body.get("ts")),
            reason=_text(body.get("reason")),
            status=_text(body.get("status")),
            refusal=bool(body.get("refusal")),
            finish_reason=_text(body.get("finish_reason")),
            prompt=body["prompt"] if isinstance(body.get("prompt"), str) else None,
            output=body["output"] if isinstance(body.get("output"), str) else None,
        )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> JudgeRequest:
        """A ``judge_samples`` row (ClickHouse stores absent text as '' and NULL)."""
        ts = row.get("ts")
        return cls(
            request_id=_text(row.get("request_id")),
            event_id=_text(row.get("event_id")),
            feature=_text(row.get("feature")),
            release_id=_text(row.get("release_id")),
            ts=ts.replace(tzinfo=UTC) if isinstance(ts, datetime) and ts.tzinfo is None else ts,
            reason=_text(row.get("reason")),
            status=_text(row.get("status")),
            refusal=bool(row.get("refusal")),
            prompt=row.get("prompt"),
            output=row.get("output"),
        )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _parse_ts(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


# ---- the prompt ----------------------------------------------------------------------------


def _clip(text: str, limit: int) -> tuple[str, bool]:
    """Keep the head and the tail of an over-long text: openings and conclusions carry the most."""
    if len(text) <= limit:
        return text, False
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n[… {len(text) - limit:,} characters elided …]\n{text[-tail:]}", True


def system_prompt(rubric: Rubric) -> str:
    """The rubric as the judge's instructions, ending with the exact answer format."""
    parts = [rubric.instructions.strip()]
    if rubric.criteria:
        parts.append("Criteria:\n" + "\n".join(f"- {name}: {text.strip()}" for name, text in rubric.criteria.items()))
    scale = rubric.scale
    anchors = "".join(f"\n{point} = {text.strip()}" for point, text in sorted(scale.labels.items()))
    parts.append(f"Score on this scale: {scale.describe()}.{anchors}")
    parts.append(
        "Reply with a JSON object and nothing else, in this form:\n"
        f'{{"score": <{scale.describe()}>, "rationale": "<one to three sentences>"}}'
    )
    return "\n\n".join(parts)


def exchange_prompt(request: JudgeRequest, max_chars: int) -> tuple[str, bool]:
    """The call to grade, delimited so the judge reads it as data; returns (text, truncated)."""
    prompt, cut_p = _clip(request.prompt, max_chars) if request.prompt is not None else ("(not captured)", False)
    output, cut_o = _clip(request.output, max_chars) if request.output is not None else ("(no output)", False)
    facts = [f"status={request.status or 'ok'}"]
    if request.feature:
        facts.insert(0, f"feature={request.feature}")
    if request.finish_reason:
        facts.append(f"finish_reason={request.finish_reason}")
    if request.refusal:
        facts.append("the service flagged this answer as a refusal")
    text = (
        f"Grade this exchange ({'; '.join(facts)}).\n\n"
        f"<user_prompt>\n{prompt}\n</user_prompt>\n\n"
        f"<assistant_response>\n{output}\n</assistant_response>\n\n"
        "Answer with the JSON object only."
    )
    return text, cut_p or cut_o


def build_messages(request: JudgeRequest, rubric: Rubric, max_chars: int) -> tuple[list[dict[str, str]], bool]:
    """System: the rubric; few-shot turns: its examples; user: the exchange. Returns (messages, truncated)."""
    messages = [{"role": "system", "content": system_prompt(rubric)}]
    for example in rubric.examples:
        shown = JudgeRequest(None, prompt=example.prompt, output=example.output)
        messages.append({"role": "user", "content": exchange_prompt(shown, max_chars)[0]})
        answer = {"score": _number(example.score), "rationale": example.rationale}
        messages.append({"role": "assistant", "content": orjson.dumps(answer).decode()})
    text, truncated = exchange_prompt(request, max_chars)
    messages.append({"role": "user", "content": text})
    return messages, truncated


def request_body(request: JudgeRequest, rubric: Rubric, model: str, max_chars: int) -> tuple[dict[str, Any], bool]:
    """The chat completions request: JSON mode, the rubric's temperature and output cap."""
    messages, truncated = build_messages(request, rubric, max_chars)
    body = {
        "model": model,
        "messages": messages,
        "temperature": rubric.temperature,
        "max_tokens": rubric.max_output_tokens,
        "response_format": {"type": "json_object"},
    }
    return body, truncated


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


# ---- the verdict ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    raw_score: float
    """On the rubric's scale (e.g. 4 of 1..5)."""
    score: float
    """Normalised to 0..1."""
    rationale: str


class VerdictError(ValueError):
    """The judge answered, but not with a usable verdict. ``reason`` is stable (counted by it)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL | re.IGNORECASE)


def _json_object(text: str) -> Any:
    """The answer as JSON: as is, inside a Markdown fence, or the outermost ``{...}`` in prose."""
    candidates = [text.strip()]
    fenced = _FENCE.match(text)
    if fenced:
        candidates.append(fenced.group(1))
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            return orjson.loads(candidate)
        except orjson.JSONDecodeError:
            continue
    return None


def parse_verdict(text: str | None, scale: Scale) -> Verdict:
    """Read ``{"score": ..., "rationale": ...}``; raise ``VerdictError`` with a countable reason."""
    if text is None or not text.strip():
        raise VerdictError(SKIP_EMPTY)
    data = _json_object(text)
    if not isinstance(data, dict):
        raise VerdictError(SKIP_NOT_JSON, repr(text[:200]))
    raw = data.get("score")
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            raw = float(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise VerdictError(SKIP_NO_SCORE, f"score={data.get('score')!r}")
    problem = scale.problem(float(raw))
    if problem is not None:
        raise VerdictError(SKIP_OFF_SCALE, problem)
    rationale = data.get("rationale")
    if not isinstance(rationale, str):
        rationale = "" if rationale is None else orjson.dumps(rationale).decode()
    return Verdict(float(raw), scale.normalise(float(raw)), rationale.strip()[: limits.MAX_ERROR_MESSAGE_CHARS])


# ---- the client ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatReply:
    content: str | None
    input_tokens: int
    output_tokens: int
    model: str | None


class JudgeRejected(Exception):
    """The endpoint refused the request for good (a 4xx other than 429): retrying cannot help."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status} {detail}".strip())
        self.status = status


class JudgeUnavailable(Exception):
    """Retries ran out on a transient failure, or the judge is stopping: try again in a later run."""


Attempt = tuple[Literal["ok", "retry", "reject"], str, float | None, ChatReply | None, int]


class ChatClient:
    """OpenAI-compatible ``POST {base_url}/chat/completions`` with bounded concurrency and retries.

    Retries connection errors, timeouts, 429 and 5xx with exponential backoff and jitter,
    waiting at least what Retry-After asks; never other 4xx (a bad request stays bad). A slot of
    the concurrency bound is held only while a request is in flight, not while it backs off,
    so one rate-limited request does not idle the others. The policy is the alert channels'
    (``sinks.alerts.retry``).
    """

    def __init__(
        self,
        settings: JudgeSettings,
        session: aiohttp.ClientSession,
        *,
        stop: asyncio.Event | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.session = session
        self.url = f"{settings.base_url}/chat/completions"
        self.stop = stop
        self.rand = rand
        self.backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s, settings.retry_after_max_s)
        self.slots = asyncio.Semaphore(settings.concurrency)
        self.retries = 0
        self._key = settings.api_key()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    async def complete(self, body: Mapping[str, Any]) -> ChatReply:
        attempt = 0
        payload = orjson.dumps(body)
        while True:
            async with self.slots:
                verdict, reason, retry_after, reply, status = await self._attempt(payload)
            if verdict == "ok" and reply is not None:
                return reply
            if verdict == "reject":
                raise JudgeRejected(status, reason)
            if attempt >= self.settings.max_retries:
                raise JudgeUnavailable(f"gave up after {attempt + 1} attempt(s): {reason}")
            delay = self.backoff.delay(attempt, retry_after, self.rand)
            self.retries += 1
            log.warning("judge endpoint: %s; retry %d/%d in %.2f s", reason, attempt + 1, self.settings.max_retries,
                        delay)  # fmt: skip
            if await _stopped_within(self.stop, delay):
                raise JudgeUnavailable(f"stopping ({reason})")
            attempt += 1

    async def _attempt(self, payload: bytes) -> Attempt:
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        try:
            async with self.session.post(
                self.url, data=payload, headers=self._headers(), timeout=timeout, allow_redirects=False
            ) as response:
                status = response.status
                verdict = classify_status(status)
                if verdict != "ok":
                    snippet = (await response.content.read(300)).decode("utf-8", "replace").strip()
                    reason = self._redact(f"HTTP {status} {snippet!r}" if snippet else f"HTTP {status}")
                    return verdict, reason, parse_retry_after(response.headers.get("Retry-After")), None, status
                raw = await response.read()
        except TimeoutError:
            return "retry", f"no complete response within {self.settings.timeout_s:g} s", None, None, 0
        except aiohttp.InvalidURL:
            return "reject", f"invalid URL {self.url}", None, None, 0
        except (aiohttp.ClientError, OSError) as exc:
            return "retry", self._redact(f"{type(exc).__name__}: {exc}"), None, None, 0
        reply = _chat_reply(raw)
        if reply is None:  # a proxy's error page with a 200: may well pass on the next try
            return "retry", f"HTTP {status} without a chat completion in the body: {raw[:200]!r}", None, None, status
        return "ok", f"HTTP {status}", None, reply, status


def _chat_reply(raw: bytes) -> ChatReply | None:
    try:
        data = orjson.loads(raw)
        message = data["choices"][0]["message"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(message, dict):
        return None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    content = message.get("content")
    return ChatReply(
        content if isinstance(content, str) else None,
        _count(usage.get("prompt_tokens")),
        _count(usage.get("completion_tokens")),
        data.get("model") if isinstance(data.get("model"), str) else None,
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


async def _stopped_within(stop: asyncio.Event | None, seconds: float) -> bool:
    """Sleep ``seconds``, waking early (True) when the judge is told to stop."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


# ---- scoring -------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """What became of one request: a result, a skip, a failure, or deferred to a later run."""

    request: JudgeRequest | None
    result: JudgeResult | None = None
    skipped: str | None = None
    failed: str | None = None
    deferred: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class JudgeStats:
    """What a run did; ``judge_*_tokens`` is the judge's own spend."""

    requests: int = 0
    """Requests that reached an outcome (scored, skipped or failed)."""
    scored: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    """Failed requests by cause (the endpoint rejected them, e.g. ``HTTP 400``): never retried."""
    deferred: int = 0
    """Times a request was put off because the endpoint stayed unavailable (or the judge was stopping):
    Kafka tries it again after a backoff, embedded leaves it to the next run."""
    retries: int = 0
    published: int = 0
    """Results acknowledged by Kafka, or written to ClickHouse (embedded)."""
    judge_input_tokens: int = 0
    judge_output_tokens: int = 0
    score_sum: float = 0.0
    seconds: float = 0.0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def mean_score(self) -> float | None:
        return self.score_sum / self.scored if self.scored else None

    def record(self, outcome: Outcome) -> None:
        self.judge_input_tokens += outcome.input_tokens
        self.judge_output_tokens += outcome.output_tokens
        if outcome.deferred is not None:
            self.deferred += 1
            return
        self.requests += 1
        if outcome.result is not None:
            self.scored += 1
            self.score_sum += outcome.result.score
        elif outcome.failed is not None:
            self.failed += 1
            self.failures[outcome.failed] = self.failures.get(outcome.failed, 0) + 1
        elif outcome.skipped is not None:
            self.skipped[outcome.skipped] = self.skipped.get(outcome.skipped, 0) + 1

    def skip(self, reason: str, n: int = 1) -> None:
        """Requests skipped without being looked at one by one (counted in SQL, embedded)."""
        if n:
            self.requests += n
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "scored": self.scored, "skipped": dict(self.skipped),
            "failed": self.failed, "failures": dict(self.failures), "deferred": self.deferred,
            "retries": self.retries, "published": self.published,
            "judge_input_tokens": self.judge_input_tokens, "judge_output_tokens": self.judge_output_tokens,
            "mean_score": self.mean_score, "seconds": round(self.seconds, 3),
        }  # fmt: skip


class Judge:
    """Scores requests against one rubric with one model: the code both runtimes share."""

    def __init__(self, rubric: Rubric, settings: JudgeSettings, client: ChatClient) -> None:
        self.rubric = rubric
        self.settings = settings
        self.client = client
        self.model = settings.model or rubric.judge_model

    def precheck(self, request: JudgeRequest, oldest: datetime | None = None) -> str | None:
        """Why a request cannot be judged at all (checked before any model is asked)."""
        if not request.request_id:
            return SKIP_NO_REQUEST_ID
        if oldest is not None and request.ts is not None and request.ts < oldest:
            return SKIP_TOO_OLD
        if not request.has_content:
            return SKIP_NO_CONTENT
        return None

    async def score(self, request: JudgeRequest, oldest: datetime | None = None) -> Outcome:
        reason = self.precheck(request, oldest)
        if reason is not None:
            return Outcome(request, skipped=reason)
        body, truncated = request_body(request, self.rubric, self.model, self.settings.max_content_chars)
        try:
            reply = await self.client.complete(body)
        except JudgeRejected as exc:
            log.error("judge endpoint rejected request %s: %s (not retried)", request.request_id, exc)
            return Outcome(request, failed=f"HTTP {exc.status}" if exc.status else str(exc))
        except JudgeUnavailable as exc:
            return Outcome(request, deferred=str(exc))
        spent_in, spent_out = reply.input_tokens, reply.output_tokens
        try:
            verdict = parse_verdict(reply.content, self.rubric.scale)
        except VerdictError as exc:
            log.warning("request %s: %s", request.request_id, exc)
            return Outcome(request, skipped=exc.reason, input_tokens=spent_in, output_tokens=spent_out)
        attributes: dict[str, str | int | float | bool | None] = {
            "judge_input_tokens": reply.input_tokens,
            "judge_output_tokens": reply.output_tokens,
            "judge_raw_score": _number(verdict.raw_score),
            "judge_scale": self.rubric.scale.range_text,
        }
        if reply.model and reply.model != self.model:
            attributes["judge_response_model"] = reply.model
        if truncated:
            attributes["judge_truncated"] = True
        try:
            result = JudgeResult(
                request_id=request.request_id or "",
                rubric=self.rubric.name,
                score=verdict.score,
                judge_model=self.model,
                ts=datetime.now(UTC),
                rationale=verdict.rationale or None,
                feature=request.feature,
                release_id=request.release_id,
                attributes=attributes,
            )
        except ValidationError as exc:
            log.warning("request %s: %s: %s", request.request_id, SKIP_INVALID, exc.errors()[0]["msg"])
            return Outcome(request, skipped=SKIP_INVALID, input_tokens=spent_in, output_tokens=spent_out)
        return Outcome(request, result=result, input_tokens=spent_in, output_tokens=spent_out)


def result_payload(result: JudgeResult) -> bytes:
    """A result as the JSON event ``llm.judge.results`` and the mixed ingest paths read."""
    return orjson.dumps(result.model_dump(mode="json", exclude_none=True))


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGTERM/SIGINT: finish the batch in hand (publish, commit) and leave. A second one cancels
    the run at once: nothing more is committed, so a later run judges the rest again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_signal(signum: int) -> None:
        if stop.is_set() and task is not None:
            log.warning("second %s: abandoning the batch in hand", signal.Signals(signum).name)
            task.cancel()
            return
        log.info("%s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        stop.set()

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _session(judge: JudgeSettings) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=judge.concurrency))


# ---- Kafka ---------------------------------------------------------------------------------


async def judge_kafka(
    settings: Settings,
    judge: JudgeSettings,
    rubric: Rubric,
    *,
    since: float | None = None,
    max_requests: int | None = None,
    idle_exit: float | None = None,
    on_progress: Callable[[JudgeStats], None] | None = None,
    stop: asyncio.Event | None = None,
) -> JudgeStats:
    """Consume judge requests, publish verdicts, commit after they are acknowledged.

    A batch whose requests the endpoint kept failing (retries exhausted) is committed only up
    to its first deferred request per partition; the consumer seeks back there and tries again
    after a backoff, skipping the verdicts it already published in this run.
    """
    stop = stop or asyncio.Event()
    stats = JudgeStats()
    started = time.perf_counter()
    opts = client_options(settings.kafka)
    topic = settings.kafka.topics.judge_requests
    consumer = AIOKafkaConsumer(
        group_id=judge.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=int(settings.kafka.session_timeout * 1000),
        heartbeat_interval_ms=max(1000, int(settings.kafka.session_timeout * 1000 / 10)),
        max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
        # a revoke waits for the batch under way (``_KafkaLoop.busy``): the group must wait as long,
        # not the session timeout (aiokafka's default), or it drops this member mid-batch and its
        # partitions are judged again elsewhere
        rebalance_timeout_ms=MAX_POLL_INTERVAL_MS,
        **opts,
    )
    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, linger_ms=10, **producer_options(settings.kafka))
    loop = _KafkaLoop(settings, judge, consumer, producer, stats, stop)
    with _stop_on_signals(stop):
        await producer.start()
        try:
            await consumer.start()
            try:
                consumer.subscribe([topic], listener=loop.listener())
                async with _session(judge) as session:
                    loop.judge = Judge(rubric, judge, ChatClient(judge, session, stop=stop))
                    await loop.run(since, max_requests, idle_exit, on_progress)
            finally:
                await stop_consumer(consumer, STOP_CONSUMER_S)
        finally:
            await stop_producer(producer, STOP_PRODUCER_S)
    stats.seconds = time.perf_counter() - started
    return stats


class _KafkaLoop:
    """getmany → score concurrently → publish (acks=all) → commit, until told to stop."""

    def __init__(self, settings: Settings, judge_settings: JudgeSettings, consumer: Any, producer: Any,
                 stats: JudgeStats, stop: asyncio.Event) -> None:  # fmt: skip
        self.settings = settings
        self.judge_settings = judge_settings
        self.consumer = consumer
        self.producer = producer
        self.stats = stats
        self.stop = stop
        self.judge: Judge | None = None
        self.results_topic = settings.kafka.topics.judge_results
        self.published: dict[Any, set[int]] = {}
        """Per partition: offsets done (verdict published, or skipped) but not committed yet, because an
        earlier offset was deferred; a re-fetch after the seek back passes over them."""
        self.backoff = Backoff(judge_settings.backoff_initial_s, judge_settings.backoff_max_s,
                               judge_settings.retry_after_max_s)  # fmt: skip
        self.outages = 0
        self.busy = asyncio.Lock()
        """Held by each batch from scoring to commit, and by a revoke: a rebalance in the middle of
        a batch (aiokafka's coordinator runs it in another task) would otherwise hand the
        partitions over before the batch's commit, so their next owner, this judge again in an
        eager rebalance, judged the whole batch a second time (a second LLM bill), and a commit
        after a partition went away and came back could move its offset backwards."""

    def listener(self) -> ConsumerRebalanceListener:
        return _ForgetRevoked(self.published, self.busy)

    async def run(
        self,
        since: float | None,
        max_requests: int | None,
        idle_exit: float | None,
        on_progress: Callable[[JudgeStats], None] | None,
    ) -> None:
        batch_size = self.judge_settings.batch_size
        started = time.monotonic()
        last_activity: float | None = None
        while not self.stop.is_set():
            if max_requests is not None and self.stats.requests >= max_requests:
                break
            want = batch_size if max_requests is None else min(batch_size, max_requests - self.stats.requests)
            records = await self.consumer.getmany(timeout_ms=500, max_records=want)
            now = time.monotonic()
            if records:
                oldest = datetime.fromtimestamp(time.time() - since, UTC) if since is not None else None
                async with self.busy:
                    progressed, pause = await self._batch(records, oldest)
                if pause:  # the endpoint is down: back off outside the batch, so a rebalance need not wait
                    await _stopped_within(self.stop, pause)
                if progressed or last_activity is None:
                    last_activity = now  # an endpoint outage is no progress: --idle-exit ends it too
                if on_progress is not None:
                    on_progress(self.stats)
            if idle_exit is None:
                continue
            if last_activity is None and self.consumer.assignment():
                last_activity = now  # the idle clock starts once the group has handed out partitions
            if last_activity is not None and now - last_activity >= idle_exit:
                log.info("no judge requests for %.1f s: done", idle_exit)
                break
            if last_activity is None and now - started >= idle_exit + self.settings.kafka.session_timeout * 3:
                log.warning(
                    "no partitions of %s assigned to this judge; leaving", self.settings.kafka.topics.judge_requests
                )
                break

    async def _batch(self, records: Mapping[Any, Sequence[Any]], oldest: datetime | None) -> tuple[bool, float]:
        """Score, publish, commit one fetched batch; whether any request reached an outcome, and
        how long to back off before the deferred ones are tried again (0: none deferred)."""
        assert self.judge is not None
        pending: list[tuple[Any, int, JudgeRequest]] = []
        outcomes: dict[tuple[Any, int], Outcome] = {}
        for tp, messages in records.items():
            done_before = self.published.get(tp, set())
            for m in messages:
                if m.offset in done_before:
                    continue  # published in this run before a deferral sent us back
                request = _decode(m.value)
                if request is None:
                    outcomes[(tp, m.offset)] = Outcome(None, skipped=SKIP_UNREADABLE)
                else:
                    pending.append((tp, m.offset, request))
        scored = await asyncio.gather(*(self.judge.score(r, oldest) for _, _, r in pending))
        for (tp, offset, _), outcome in zip(pending, scored, strict=True):
            outcomes[(tp, offset)] = outcome
        self.stats.retries = self.judge.client.retries
        # publish every verdict, and wait until the broker has all of them (acks=all)
        futures = []
        for outcome in outcomes.values():
            if outcome.result is not None:
                value, key = result_payload(outcome.result), outcome.result.request_id.encode()
                futures.append(await self.producer.send(self.results_topic, value, key=key))
        await asyncio.gather(*futures)
        self.stats.published += len(futures)
        for outcome in outcomes.values():
            self.stats.record(outcome)
        pause = await self._commit(records, outcomes)
        return any(o.deferred is None for o in outcomes.values()), pause

    async def _commit(self, records: Mapping[Any, Sequence[Any]], outcomes: Mapping[tuple[Any, int], Outcome]) -> float:
        """Commit each partition up to its first deferred request; seek back there to retry it.
        Returns the back-off before that retry (0: nothing deferred)."""
        commit: dict[Any, Any] = {}
        retry_from: dict[Any, int] = {}
        for tp, messages in records.items():
            deferred = [m.offset for m in messages if (o := outcomes.get((tp, m.offset))) is not None and o.deferred]
            end = min(deferred) if deferred else messages[-1].offset + 1
            commit[tp] = OffsetAndMetadata(end, "")
            published = {o for o in self.published.pop(tp, set()) if o >= end}
            if deferred:
                retry_from[tp] = end
                published |= {
                    m.offset
                    for m in messages
                    if m.offset > end and (o := outcomes.get((tp, m.offset))) is not None and o.deferred is None
                }
            if published:
                self.published[tp] = published
        try:
            await self.consumer.commit(commit)
        except (CommitFailedError, IllegalStateError) as exc:
            # a rebalance took the partitions: their next owner re-judges from the last commit
            log.warning("offset commit failed (%s); the next owner of those partitions re-judges them", exc)
            return 0.0
        if retry_from:
            for tp, offset in retry_from.items():
                self.consumer.seek(tp, offset)
            delay = self.backoff.delay(self.outages)
            self.outages += 1
            log.warning("judge endpoint unavailable for %d request(s); trying them again in %.1f s",
                        sum(1 for o in outcomes.values() if o.deferred), delay)  # fmt: skip
            return delay
        self.outages = 0
        return 0.0


class _ForgetRevoked(ConsumerRebalanceListener):
    """A revoked partition's uncommitted verdicts are its next owner's to redo (the results
    pipeline dedupes the repeats), so this judge forgets which it published: after the batch
    under way, if any, has committed (``_KafkaLoop.busy``)."""

    def __init__(self, published: dict[Any, set[int]], busy: asyncio.Lock) -> None:
        self.published = published
        self.busy = busy

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.busy:
            for tp in revoked:
                self.published.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("judge requests partitions assigned: %s", sorted(tp.partition for tp in assigned))


def _decode(value: bytes | None) -> JudgeRequest | None:
    if not value:
        return None
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return JudgeRequest.from_message(body) if isinstance(body, dict) else None


# ---- embedded ------------------------------------------------------------------------------

_UNJUDGED = """
    FROM {db}.judge_samples
    WHERE request_id != '' AND sampled_at >= {{since:DateTime64(3, 'UTC')}}
      AND request_id NOT IN (
          SELECT request_id FROM {db}.judge_scores
          WHERE rubric = {{rubric:String}} AND judge_model = {{model:String}})
"""


async def judge_embedded(
    settings: Settings,
    judge: JudgeSettings,
    rubric: Rubric,
    conn: Any,
    *,
    since: float | None = None,
    max_requests: int | None = None,
    on_progress: Callable[[JudgeStats], None] | None = None,
    stop: asyncio.Event | None = None,
) -> JudgeStats:
    """Score the samples that have no verdict for this rubric and judge model yet.

    Pages through candidates by request id (keyset), so a request skipped in this run is not
    fetched again by it; verdicts go through ``EmbeddedRuntime`` (lineage from the sample) and
    are durable page by page, so a stopped run loses at most the page in hand.
    """
    from llmpulse.runtime import EmbeddedRuntime
    from processors.records import PayloadBatch, Source

    stop = stop or asyncio.Event()
    stats = JudgeStats()
    started = time.perf_counter()
    model = judge.model or rubric.judge_model
    db = conn.database
    params: dict[str, Any] = {
        "since": datetime.fromtimestamp(time.time() - since if since is not None else 0, UTC),
        "rubric": rubric.name,
        "model": model,
    }
    unjudged = _UNJUDGED.format(db=db)
    no_request_id, no_content = conn.client.query(
        f"SELECT (SELECT count() FROM {db}.judge_samples WHERE request_id = '' "
        "AND sampled_at >= {since:DateTime64(3, 'UTC')}), "
        f"(SELECT count() FROM (SELECT request_id {unjudged} GROUP BY request_id "
        "HAVING countIf(prompt IS NOT NULL OR output IS NOT NULL) = 0))",
        parameters=params,
    ).result_rows[0]
    stats.skip(SKIP_NO_REQUEST_ID, int(no_request_id))
    stats.skip(SKIP_NO_CONTENT, int(no_content))
    runtime = EmbeddedRuntime(settings, conn)
    source = Source("judge", f"{rubric.name}:{model}")
    after = ""
    try:
        with _stop_on_signals(stop):
            async with _session(judge) as session:
                scorer = Judge(rubric, judge, ChatClient(judge, session, stop=stop))
                sent = 0
                while not stop.is_set():
                    want = judge.batch_size if max_requests is None else min(judge.batch_size, max_requests - sent)
                    if want <= 0:
                        break
                    rows = _candidates(conn, unjudged, {**params, "after": after, "limit": want})
                    if not rows:
                        break
                    after = rows[-1]["request_id"]
                    sent += len(rows)
                    outcomes = await asyncio.gather(*(scorer.score(JudgeRequest.from_row(r)) for r in rows))
                    stats.retries = scorer.client.retries
                    payloads = [result_payload(o.result) for o in outcomes if o.result is not None]
                    if payloads:
                        digest = xxhash.xxh3_64_hexdigest(b"\n".join(payloads))
                        batch = PayloadBatch(source, payloads, list(range(len(payloads))), digest=digest)
                        await asyncio.to_thread(_ingest, runtime, batch)
                        stats.published += len(payloads)
                    for outcome in outcomes:
                        stats.record(outcome)
                    if on_progress is not None:
                        on_progress(stats)
                    if any(o.deferred for o in outcomes):
                        log.warning("judge endpoint unavailable; the rest waits for the next run")
                        break
    finally:
        await asyncio.to_thread(runtime.close)
    stats.seconds = time.perf_counter() - started
    return stats


def _candidates(conn: Any, unjudged: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    result = conn.client.query(
        "SELECT request_id, any(event_id) AS event_id, min(ts) AS ts, any(reason) AS reason, "
        "any(feature) AS feature, any(release_id) AS release_id, any(status) AS status, "
        f"any(refusal) AS refusal, any(prompt) AS prompt_text, any(output) AS output_text {unjudged} "
        "AND request_id > {after:String} GROUP BY request_id "
        "HAVING countIf(prompt IS NOT NULL OR output IS NOT NULL) > 0 "
        "ORDER BY request_id LIMIT {limit:UInt32}",
        parameters=dict(params),
    )
    rows = [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]
    for row in rows:
        row["prompt"], row["output"] = row.pop("prompt_text"), row.pop("output_text")
    return rows


def _ingest(runtime: Any, batch: Any) -> None:
    runtime.ingest(batch, mixed=True)
    runtime.flush()


# ---- the entry point -----------------------------------------------------------------------


def run_judge(
    settings: Settings,
    judge: JudgeSettings,
    *,
    embedded: bool,
    since: float | None = None,
    max_requests: int | None = None,
    idle_exit: float | None = None,
    on_progress: Callable[[JudgeStats], None] | None = None,
    rubric: Rubric | None = None,
) -> JudgeStats:
    """Judge sampled calls until done (embedded), ``max_requests``, ``idle_exit`` or SIGTERM (Kafka).

    ``since`` is seconds back from now: embedded, the samples taken within it; Kafka, calls older
    than it are skipped (catching up after an outage without paying for stale calls).
    """
    rubric = rubric or rubric_for(judge)
    if embedded:
        from llmpulse.runtime import open_clickhouse

        conn = open_clickhouse(settings, purpose="llmpulse judge")
        try:
            return asyncio.run(
                judge_embedded(settings, judge, rubric, conn, since=since, max_requests=max_requests,
                               on_progress=on_progress)
            )  # fmt: skip
        finally:
            conn.close()
    return asyncio.run(
        judge_kafka(settings, judge, rubric, since=since, max_requests=max_requests, idle_exit=idle_exit,
                    on_progress=on_progress)
    )  # fmt: skip
