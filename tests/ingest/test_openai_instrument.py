"""The openai wrapper with the real ``openai`` client (sync and async) against a local
OpenAI-compatible HTTP server: usage and cached tokens, streams (TTFT, the usage chunk the
wrapper asks for), refusals, tool calls, and errors passed through unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer

from ingest.kafka import create_topics
from ingest.openai_instrument import instrument_openai, messages_text
from ingest.sdk import CallbackTransport, OutMessage, Telemetry, prompt_hash
from schemas.limits import SCHEMA_VERSION

SERVED_MODEL = "gpt-4o-2024-08-06"
USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 8,
    "total_tokens": 128,
    "prompt_tokens_details": {"cached_tokens": 100},
}
PIECES = ["Hel", "lo th", "ere!"]
FIRST_CONTENT_DELAY_S = 0.06
BETWEEN_CHUNKS_S = 0.02

MESSAGES = [
    {"role": "system", "content": "You are a support agent."},
    {"role": "user", "content": [{"type": "text", "text": "Where is my order?"}]},
]


class FakeOpenAI:
    """``POST /v1/chat/completions`` the way OpenAI answers it; the requested ``model`` picks the
    scenario. Every request body is kept so tests can see what the wrapper sent."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        self.port = 0

    def start(self) -> None:
        ready = threading.Event()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self.handle)
            self.runner = web.AppRunner(app, shutdown_timeout=0.1)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = self.runner.addresses[0][1]
            ready.set()

        def run() -> None:
            self.loop.run_until_complete(serve())
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        assert ready.wait(10)

    def stop(self) -> None:
        async def cleanup() -> None:
            if self.runner is not None:
                await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        n = len(self.requests)
        headers = {"x-request-id": f"req_{n}"}
        model = body["model"]
        if model == "rate-limited":
            error = {"error": {"message": "Rate limit reached for gpt-4o", "type": "requests", "code": "rate_limit"}}
            return web.json_response(error, status=429, headers={"x-request-id": "req_429"})
        if model == "broken":
            return web.json_response({"error": {"message": "The server had an error"}}, status=500, headers=headers)
        if model == "slow":
            await asyncio.sleep(2)
        if body.get("stream"):
            return await self._stream(request, body, n, headers)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(PIECES), "refusal": None}
        finish = "stop"
        if model == "refuser":
            message.update(content=None, refusal="I can't help with that.")
        elif model == "tool-user":
            message.update(content=None, tool_calls=_tool_calls())
            finish = "tool_calls"
        elif model == "filtered":
            message.update(content="")
            finish = "content_filter"
        return web.json_response(
            {
                "id": f"chatcmpl-{n}",
                "object": "chat.completion",
                "created": 1_795_000_000,
                "model": SERVED_MODEL,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": USAGE,
            },
            headers=headers,
        )

    async def _stream(self, request: web.Request, body: dict[str, Any], n: int, headers: dict[str, str]) -> Any:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(choices: list[dict[str, Any]] | None, usage: dict[str, Any] | None = None) -> None:
            if choices is None:
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return
            chunk: dict[str, Any] = {
                "id": f"chatcmpl-{n}",
                "object": "chat.completion.chunk",
                "created": 1_795_000_000,
                "model": SERVED_MODEL,
                "choices": choices,
            }
            if include_usage:
                chunk["usage"] = usage
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

        with contextlib.suppress(ConnectionResetError):  # a client may close the stream early
            await self._chunks(body, send)
        return response

    async def _chunks(self, body: dict[str, Any], send: Any) -> None:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        await asyncio.sleep(FIRST_CONTENT_DELAY_S)
        finish = "stop"
        if body["model"] == "refuser":
            for piece in ("I can't ", "help with that."):
                await send([{"index": 0, "delta": {"refusal": piece}, "finish_reason": None}])
        elif body["model"] == "tool-user":
            for i, call in enumerate(_tool_calls()):
                first = {
                    "index": i,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["function"]["name"]},
                }
                await send([{"index": 0, "delta": {"tool_calls": [first]}, "finish_reason": None}])
                arguments = {"index": i, "function": {"arguments": call["function"]["arguments"]}}
                await send([{"index": 0, "delta": {"tool_calls": [arguments]}, "finish_reason": None}])
            finish = "tool_calls"
        else:
            for i, piece in enumerate(PIECES):
                if i:
                    await asyncio.sleep(BETWEEN_CHUNKS_S)
                await send([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        await send([{"index": 0, "delta": {}, "finish_reason": finish}])
        if include_usage:
            await send([], USAGE)
        await send(None)


def _tool_calls() -> list[dict[str, Any]]:
    return [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}},
    ]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    fake.start()
    yield fake
    fake.stop()


class Recorded:
    """A Telemetry whose deliveries land in a list (the in-process transport), decoded on demand."""

    def __init__(self, **options: Any) -> None:
        self.messages: list[OutMessage] = []
        self.telemetry = Telemetry(transport=CallbackTransport(self.messages.extend), linger_ms=0, **options)

    def events(self, expected: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 10
        while len(self.messages) < expected and time.monotonic() < deadline:
            self.telemetry.flush(1)
            time.sleep(0.01)
        assert self.telemetry.flush(5)
        events = [orjson.loads(m.value) for m in self.messages]
        assert len(events) == expected, events
        return events


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    r = Recorded(service="support-api", capture_content=True)
    yield r
    r.telemetry.close(2)


def sync_client(server: FakeOpenAI, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-test", base_url=server.base_url, max_retries=0, **options)


def async_client(server: FakeOpenAI, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="sk-test", base_url=server.base_url, max_retries=0, **options)


# --------------------------------------------------------------------------------------------


@pytest.mark.kafka
def test_a_completion_end_to_end_through_the_real_broker(server: FakeOpenAI, kafka_settings: Any) -> None:
    asyncio.run(create_topics(kafka_settings))
    telemetry = Telemetry(kafka_settings.bootstrap_servers, topic=kafka_settings.topics.calls, service="support-api")
    client = instrument_openai(
        sync_client(server), telemetry, feature="support-chat", team="cx", prompt_version="v3", variant="canary"
    )
    response = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        temperature=0.2,
        max_tokens=64,
        llmpulse={"user_id": "u-1", "conversation_id": "conv-1"},
    )
    assert isinstance(response, openai.types.chat.ChatCompletion)
    assert response.choices[0].message.content == "Hello there!"
    assert "llmpulse" not in server.requests[-1]  # the per-call fields never reach the provider
    assert telemetry.close(20)

    async def consume() -> list[Any]:
        consumer = AIOKafkaConsumer(
            kafka_settings.topics.calls,
            bootstrap_servers=kafka_settings.bootstrap_servers,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            got: list[Any] = []
            deadline = time.monotonic() + 20
            while not got and time.monotonic() < deadline:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    got.extend(batch)
            return got
        finally:
            await consumer.stop()

    (record,) = asyncio.run(consume())
    assert record.key == b"support-chat"
    event = orjson.loads(record.value)
    n = len(server.requests)
    assert event.pop("event_id") and event.pop("ts").endswith("Z")
    assert 0 < event.pop("latency_ms") < 5000
    assert event == {
        "kind": "call",
        "schema_version": SCHEMA_VERSION,
        "feature": "support-chat",
        "model": "gpt-4o",
        "input_tokens": 120,
        "output_tokens": 8,
        "status": "ok",
        "service": "support-api",
        "team": "cx",
        "user_id": "u-1",
        "response_model": SERVED_MODEL,
        "params": {"temperature": 0.2, "max_tokens": 64},
        "prompt_version": "v3",
        "variant": "canary",
        "request_id": f"chatcmpl-{n}",
        "conversation_id": "conv-1",
        "cached_input_tokens": 100,
        "finish_reason": "stop",
        "prompt_hash": prompt_hash(messages_text(MESSAGES)),
        "output_chars": 12,
        "attributes": {"openai_request_id": f"req_{n}"},
    }


def test_a_stream_reaches_the_caller_unchanged_and_is_recorded_with_usage_and_ttft(
    server: FakeOpenAI, recorded: Recorded
) -> None:
    plain = [
        c.model_dump()
        for c in sync_client(server).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    ]
    assert "stream_options" not in server.requests[-1]

    client = instrument_openai(sync_client(server), recorded.telemetry, feature="support-chat", capture_content=True)
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, max_completion_tokens=50)
    assert isinstance(stream, openai.Stream)
    chunks = [c.model_dump() for c in stream]
    assert server.requests[-1]["stream_options"] == {"include_usage": True}  # asked for by the wrapper

    def comparable(chunk: dict[str, Any]) -> Any:
        return {k: v for k, v in chunk.items() if k != "id"}

    # the caller did not ask for the usage-only chunk, so it does not see it: same chunks as without the wrapper
    assert [comparable(c) for c in chunks] == [comparable(c) for c in plain]
    assert all(c["choices"] for c in chunks)

    (event,) = recorded.events(1)
    assert (event["input_tokens"], event["output_tokens"], event["cached_input_tokens"]) == (120, 8, 100)
    assert event["status"] == "ok" and event["finish_reason"] == "stop"
    assert event["output"] == "Hello there!" and event["output_chars"] == 12  # captured: both gates are on
    assert event["prompt"] == messages_text(MESSAGES) and event["prompt_hash"] == prompt_hash(event["prompt"])
    assert event["params"] == {"max_tokens": 50}
    assert event["response_model"] == SERVED_MODEL
    assert event["request_id"] == f"chatcmpl-{len(server.requests)}"
    # TTFT is the first chunk that carries content (the role-only chunk comes ~60 ms earlier)
    assert FIRST_CONTENT_DELAY_S * 1000 <= event["ttft_ms"] < event["latency_ms"]
    assert event["latency_ms"] - event["ttft_ms"] >= BETWEEN_CHUNKS_S * 1000  # timed to the end of the stream
    assert "usage_unknown" not in event.get("attributes", {})


def test_a_caller_who_asked_for_usage_still_gets_the_usage_chunk(server: FakeOpenAI, recorded: Recorded) -> None:
    client = instrument_openai(sync_client(server), recorded.telemetry, feature="support-chat")
    with client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
    ) as stream:
        chunks = list(stream)
    assert server.requests[-1]["stream_options"] == {"include_usage": True, "include_obfuscation": False}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 100
    (event,) = recorded.events(1)
    assert event["input_tokens"] == 120


def test_async_client_completions_streams_and_early_close(server: FakeOpenAI, recorded: Recorded) -> None:
    client = instrument_openai(async_client(server), recorded.telemetry, feature="async-chat", team="growth")

    async def run() -> list[str]:
        response = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert response.choices[0].message.content == "Hello there!"
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        assert isinstance(stream, openai.AsyncStream)
        pieces = [c.choices[0].delta.content async for c in stream]
        early = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        async for chunk in early:
            if chunk.choices[0].delta.content:
                break  # the caller has what it needs
        await early.close()
        return [p for p in pieces if p]

    assert asyncio.run(run()) == PIECES
    completion, streamed, closed_early = recorded.events(3)
    assert (completion["feature"], completion["team"], completion["input_tokens"]) == ("async-chat", "growth", 120)
    assert "ttft_ms" not in completion  # TTFT belongs to streamed calls
    assert (streamed["output_tokens"], streamed["cached_input_tokens"], streamed["finish_reason"]) == (8, 100, "stop")
    assert streamed["ttft_ms"] >= FIRST_CONTENT_DELAY_S * 1000
    assert closed_early["status"] == "ok"
    assert closed_early["attributes"] == {
        "stream_closed_early": True,
        "usage_unknown": True,  # the usage chunk never came: token counts are not known, not zero
        "openai_request_id": f"req_{len(server.requests)}",
    }
    assert closed_early["output_chars"] == len(PIECES[0])
    assert closed_early["ttft_ms"] <= closed_early["latency_ms"]


def test_a_sync_stream_left_early_inside_its_with_block_is_recorded(server: FakeOpenAI, recorded: Recorded) -> None:
    client = instrument_openai(sync_client(server), recorded.telemetry, feature="support-chat")
    with client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True) as stream:
        for chunk in stream:
            if chunk.choices[0].delta.content:
                break
    (event,) = recorded.events(1)
    assert event["attributes"]["stream_closed_early"] is True
    assert "finish_reason" not in event


def test_refusals_tool_calls_and_content_filter(server: FakeOpenAI, recorded: Recorded) -> None:
    client = instrument_openai(sync_client(server), recorded.telemetry, feature="agent", capture_content=True)
    refused = client.chat.completions.create(model="refuser", messages=MESSAGES)
    assert refused.choices[0].message.refusal == "I can't help with that."
    client.chat.completions.create(model="tool-user", messages=MESSAGES)
    client.chat.completions.create(model="filtered", messages=MESSAGES)
    streamed_refusal = list(client.chat.completions.create(model="refuser", messages=MESSAGES, stream=True))
    assert streamed_refusal[1].choices[0].delta.refusal == "I can't "
    list(client.chat.completions.create(model="tool-user", messages=MESSAGES, stream=True))

    refusal, tools, filtered, stream_refusal, stream_tools = recorded.events(5)
    assert (refusal["refusal"], refusal["output_chars"], refusal["output"]) == (True, 23, "I can't help with that.")
    assert (tools["tool_calls"], tools["finish_reason"]) == (["get_weather", "get_time"], "tool_calls")
    assert "refusal" not in tools  # false is the default, left out of the message
    assert (filtered.get("refusal"), filtered["finish_reason"]) == (True, "content_filter")
    assert stream_refusal["refusal"] is True and stream_refusal["output_chars"] == 23
    assert stream_tools["tool_calls"] == ["get_weather", "get_time"]
    assert stream_tools["finish_reason"] == "tool_calls"
    assert stream_tools["ttft_ms"] >= FIRST_CONTENT_DELAY_S * 1000  # a tool-call delta counts as the first token


def test_client_errors_pass_through_unchanged_and_set_the_status(server: FakeOpenAI, recorded: Recorded) -> None:
    client = instrument_openai(sync_client(server, timeout=0.3), recorded.telemetry, feature="support-chat")
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="rate-limited", messages=MESSAGES)
    assert limited.value.status_code == 429
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="broken", messages=MESSAGES)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="slow", messages=MESSAGES)
    unreachable = instrument_openai(
        openai.OpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1", max_retries=0),
        recorded.telemetry,
        feature="support-chat",
    )
    with pytest.raises(openai.APIConnectionError) as refused:
        unreachable.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert type(refused.value) is openai.APIConnectionError

    async def async_limited() -> None:
        aclient = instrument_openai(async_client(server), recorded.telemetry, feature="support-chat")
        with pytest.raises(openai.RateLimitError):
            await aclient.chat.completions.create(model="rate-limited", messages=MESSAGES, stream=True)

    asyncio.run(async_limited())

    rate, broken, slow, connection, async_rate = recorded.events(5)
    assert (rate["status"], rate["error_type"], rate["request_id"]) == ("rate_limited", "RateLimitError", "req_429")
    assert "Rate limit reached" in rate["error_message"]
    assert (broken["status"], broken["error_type"]) == ("error", "InternalServerError")
    assert (slow["status"], slow["error_type"]) == ("timeout", "APITimeoutError")
    assert 300 <= slow["latency_ms"] < 2000
    assert (connection["status"], connection["error_type"]) == ("error", "APIConnectionError")
    assert async_rate["status"] == "rate_limited"
    assert all(e["input_tokens"] == e["output_tokens"] == 0 for e in (rate, broken, slow, connection, async_rate))


def test_telemetry_trouble_never_reaches_the_request_path(server: FakeOpenAI) -> None:
    r = Recorded()
    client = instrument_openai(sync_client(server), r.telemetry, feature="support-chat")
    client = instrument_openai(client, r.telemetry, feature="support-chat")  # twice: still one event per call

    # an invalid per-call field costs the event, never the response
    response = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, llmpulse={"user_id": ""})
    assert response.choices[0].message.content == "Hello there!"
    assert r.telemetry.stats()["dropped_invalid"] == 1

    # a one-shot iterable of messages is read once and still reaches the server whole
    def generated() -> Iterator[dict[str, Any]]:
        yield from MESSAGES

    client.chat.completions.create(model="gpt-4o", messages=generated())
    assert server.requests[-1]["messages"] == MESSAGES
    (event,) = r.events(1)
    assert event["prompt_hash"] == prompt_hash(messages_text(MESSAGES))
    assert "prompt" not in event and "output" not in event  # capture is off: text never leaves the process

    # a closed Telemetry drops (and counts) what it is given; the caller notices nothing
    r.telemetry.close(2)
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "Hello there!"
    assert r.telemetry.stats()["dropped_closed"] == 1


def test_messages_text_is_deterministic_and_skips_volatile_ids() -> None:
    a = [
        {"role": "user", "content": "hi", "name": "ann"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_x", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
    ]
    b = [dict(m) for m in a]
    b[1] = {
        "tool_calls": [{"function": {"arguments": "{}", "name": "f"}, "id": "call_y"}],
        "content": None,
        "role": "assistant",
    }
    assert messages_text(a) == messages_text(b)
    assert "base64" not in messages_text(a) and "[image_url:" in messages_text(a)
    assert prompt_hash(messages_text(a)) != prompt_hash(messages_text(a[:2]))
