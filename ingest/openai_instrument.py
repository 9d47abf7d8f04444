"""Instrument the official ``openai`` client: one ``CallEvent`` per chat completion, streams included.

The module is named ``openai_instrument`` rather than ``openai`` so that nothing inside the
``ingest`` package (a script run from it, a tool that puts it on ``sys.path``) can ever
shadow the real ``openai`` package. It never imports ``openai`` itself: it wraps whatever
client it is given, so the SDK's base install stays free of it (``openai`` is an optional
extra).

The wrapper sits on the caller's request path, so everything it does is wrapped: telemetry
trouble is counted on the ``Telemetry`` and swallowed, the client's exceptions pass through
unchanged, and stream chunks reach the caller exactly as the server sent them. For streams
it asks for ``stream_options.include_usage`` so streamed calls carry token counts; if the
caller did not ask for that final usage-only chunk themselves, it is consumed here and not
passed on (code written against un-instrumented streams often reads ``chunk.choices[0]``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
import xxhash

from ingest.sdk import Telemetry, TrackedCall, prompt_hash
from ingest.usage import openai_usage
from schemas import limits

_ORIGINAL: Final = "__llmpulse_original__"
PER_CALL_KWARG: Final = "llmpulse"
"""``create(..., llmpulse={"user_id": ..., "conversation_id": ...})``: per-call event fields,
removed before the client sees the arguments."""


def instrument_openai(
    client: Any,
    telemetry: Telemetry,
    *,
    feature: str,
    team: str | None = None,
    prompt_version: str | None = None,
    variant: str | None = None,
    capture_content: bool = False,
    **fields: Any,
) -> Any:
    """Wrap ``client.chat.completions.create`` of an ``OpenAI`` or ``AsyncOpenAI`` client in place.

    Returns the same client. Instrumenting twice replaces the first wrapper rather than
    stacking a second one. ``fields`` are further static event fields (``adapter``,
    ``guardrail_version``, ``attributes``...). ``capture_content`` attaches prompt and output
    text to the event; the ``Telemetry``'s own ``capture_content`` must also be on for the
    text to leave the process (otherwise only ``prompt_hash``/``output_chars`` do).
    Calls through ``.chat.completions.stream()`` are recorded too (it delegates to ``create``);
    ``.parse()`` and raw-response calls made before instrumenting are not.
    """
    completions = client.chat.completions
    original = completions.create
    original = getattr(original, _ORIGINAL, original)
    static: dict[str, Any] = {"feature": feature, **fields}
    for name, value in (("team", team), ("prompt_version", prompt_version), ("variant", variant)):
        if value is not None:
            static[name] = value
    provider = _provider(client)
    if provider is not None:
        static.setdefault("provider", provider)
    instrumentation = _Instrumentation(telemetry, static, capture_content)

    if _is_async(original):

        @functools.wraps(original)
        async def acreate(*args: Any, **kwargs: Any) -> Any:
            return await instrumentation.acreate(original, args, kwargs)

        wrapper: Any = acreate
    else:

        @functools.wraps(original)
        def create(*args: Any, **kwargs: Any) -> Any:
            return instrumentation.create(original, args, kwargs)

        wrapper = create
    setattr(wrapper, _ORIGINAL, original)
    completions.create = wrapper
    return client


def _is_async(method: Any) -> bool:
    """The client decorates ``create`` with a plain function (argument checks), which hides that
    the real method is ``async def``: look through ``__wrapped__``."""
    return inspect.iscoroutinefunction(method) or inspect.iscoroutinefunction(inspect.unwrap(method))


def _provider(client: Any) -> str | None:
    """Only hosts that say who they are; a self-hosted gateway is left to the price table."""
    try:
        host = urlsplit(str(client.base_url)).hostname or ""
    except Exception:
        return None
    if host.endswith(".openai.azure.com"):
        return "azure"
    if host == "api.openai.com" or host.endswith(".openai.com"):
        return "openai"
    return None


def messages_text(messages: Sequence[Any]) -> str:
    """The prompt as one deterministic string: JSON (sorted keys) of each message's role, name,
    text and tool calls. Non-text parts (images, audio, files) appear as ``[type:xxh3]`` so a
    base64 image neither bloats the text nor goes unnoticed; tool-call ids are left out because
    they differ on every call and would hide repeated prompts."""
    out: list[dict[str, Any]] = []
    for message in messages:
        m = _as_mapping(message)
        item: dict[str, Any] = {"role": str(m.get("role", "")), "content": _content_text(m.get("content"))}
        if m.get("name"):
            item["name"] = str(m["name"])
        calls = m.get("tool_calls")
        if calls:
            item["tool_calls"] = [
                {"name": str(fn.get("name", "")), "arguments": str(fn.get("arguments", ""))}
                for fn in (_as_mapping(_as_mapping(c).get("function") or {}) for c in calls)
            ]
        out.append(item)
    return orjson.dumps(out, option=orjson.OPT_SORT_KEYS).decode()


def _as_mapping(value: Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        dumped = dump(exclude_none=True)
        if isinstance(dumped, Mapping):
            return dumped
    return {}


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content if isinstance(content, Sequence) else ():
        p = _as_mapping(part)
        kind = str(p.get("type", ""))
        if kind == "text":
            parts.append(str(p.get("text", "")))
        elif kind == "refusal":
            parts.append(str(p.get("refusal", "")))
        else:
            parts.append(f"[{kind}:{xxhash.xxh3_64_hexdigest(orjson.dumps(p, option=orjson.OPT_SORT_KEYS))}]")
    return "\n".join(parts)


def _number(value: Any, low: float, high: float) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high:
        return value
    return None


def _request_params(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Only values the schema accepts: an odd parameter must not cost the whole event."""
    params: dict[str, Any] = {}
    temperature = _number(kwargs.get("temperature"), 0, 10)
    if temperature is not None:
        params["temperature"] = temperature
    top_p = _number(kwargs.get("top_p"), 0, 1)
    if top_p is not None:
        params["top_p"] = top_p
    for name in ("max_tokens", "max_completion_tokens"):
        value = kwargs.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limits.MAX_TOKENS:
            params["max_tokens"] = value
            break
    return params


def _name(value: Any) -> str | None:
    return value[: limits.MAX_NAME_CHARS] if isinstance(value, str) and value else None


def _attributes(call: TrackedCall) -> dict[str, Any]:
    """The event's attributes as a fresh dict: never mutate the one the caller configured."""
    current = call.fields.get("attributes")
    attributes = dict(current) if isinstance(current, Mapping) else {}
    call.fields["attributes"] = attributes
    return attributes


class _Instrumentation:
    def __init__(self, telemetry: Telemetry, static: dict[str, Any], capture_content: bool) -> None:
        self.telemetry = telemetry
        self.static = static
        self.capture = capture_content

    # ---- around the request ------------------------------------------------------------------

    def create(self, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call, observer = self._begin(kwargs)
        try:
            result = original(*args, **kwargs)
        except BaseException as exc:
            self._fail(call, exc)
            raise
        if inspect.isawaitable(result):  # an async client whose ``create`` did not look async
            return self._awaited(call, observer, result)
        return self._returned(call, observer, result)

    async def _awaited(self, call: TrackedCall | None, observer: _StreamObserver | None, pending: Any) -> Any:
        try:
            result = await pending
        except BaseException as exc:
            self._fail(call, exc)
            raise
        return self._returned(call, observer, result)

    async def acreate(self, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call, observer = self._begin(kwargs)
        try:
            result = await original(*args, **kwargs)
        except BaseException as exc:
            self._fail(call, exc)
            raise
        return self._returned(call, observer, result)

    def _begin(self, kwargs: dict[str, Any]) -> tuple[TrackedCall | None, _StreamObserver | None]:
        """Prepare the event and, for streams, the request's ``stream_options``. Edits ``kwargs``
        (the wrapper's own copy) only once everything it needs has succeeded."""
        per_call = kwargs.pop(PER_CALL_KWARG, None)
        try:
            messages = kwargs.get("messages")
            if messages is not None and not isinstance(messages, Sequence):
                messages = list(messages)  # a one-shot iterable: read it once, hand the client the list
                kwargs["messages"] = messages
            fields = dict(self.static)
            if isinstance(per_call, Mapping):
                fields.update(per_call)
            model = kwargs.get("model")
            fields["model"] = _name(model) or "unknown"
            params = _request_params(kwargs)
            if params:
                fields["params"] = params
            if messages is not None:
                text = messages_text(messages)
                fields["prompt_hash"] = prompt_hash(text)
                if self.capture:
                    fields["prompt"] = text
            call = self.telemetry.call(**fields)
            observer = None
            if kwargs.get("stream") is True:
                asked = kwargs.get("stream_options")
                asked = asked if isinstance(asked, Mapping) else {}
                observer = _StreamObserver(self, call, pass_usage_chunk=asked.get("include_usage") is True)
                kwargs["stream_options"] = {**asked, "include_usage": True}
            call.start()
            return call, observer
        except Exception as exc:
            self.telemetry._internal_error(exc)
            return None, None

    def _fail(self, call: TrackedCall | None, exc: BaseException) -> None:
        if call is None:
            return
        try:
            request_id = getattr(exc, "request_id", None)
            if isinstance(request_id, str) and request_id:
                call.set(request_id=request_id[: limits.MAX_ID_CHARS])
        except Exception as internal:
            self.telemetry._internal_error(internal)
        call.finish(exc)

    def _returned(self, call: TrackedCall | None, observer: _StreamObserver | None, result: Any) -> Any:
        if call is None:
            return result
        try:
            if observer is not None:
                return observer.attach(result)
            self._fill_from_completion(call, result)
        except Exception as exc:
            self.telemetry._internal_error(exc)
        call.finish()
        return result

    # ---- reading a completion ----------------------------------------------------------------

    def _fill_from_completion(self, call: TrackedCall, response: Any) -> None:
        choices = getattr(response, "choices", None)
        if choices is None:  # a raw/streaming-response wrapper: no parsed body to read
            _attributes(call)["usage_unknown"] = True
            return
        fields: dict[str, Any] = openai_usage(getattr(response, "usage", None))
        if not fields:
            _attributes(call)["usage_unknown"] = True
        response_model = _name(getattr(response, "model", None))
        if response_model:
            fields["response_model"] = response_model
        self._set_request_id(call, getattr(response, "id", None), getattr(response, "_request_id", None))
        finish_reasons = [c.finish_reason for c in choices if getattr(c, "finish_reason", None)]
        if finish_reasons:
            fields["finish_reason"] = _name(str(finish_reasons[0]))
        messages = [getattr(c, "message", None) for c in choices]
        refusals = [m.refusal for m in messages if m is not None and getattr(m, "refusal", None)]
        fields["refusal"] = bool(refusals) or "content_filter" in finish_reasons
        tools: list[str] = []
        output_chars = 0
        for m in messages:
            if m is None:
                continue
            output_chars += len(getattr(m, "content", None) or "") + len(getattr(m, "refusal", None) or "")
            for tool_call in getattr(m, "tool_calls", None) or ():
                target = getattr(tool_call, "function", None) or getattr(tool_call, "custom", None)
                name = _name(getattr(target, "name", None))
                if name and len(tools) < limits.MAX_TOOL_CALLS:
                    tools.append(name)
        fields["tool_calls"] = tools
        fields["output_chars"] = output_chars
        if self.capture and messages and messages[0] is not None:
            text = getattr(messages[0], "content", None) or getattr(messages[0], "refusal", None)
            if isinstance(text, str):
                fields["output"] = text
        call.set(**fields)

    @staticmethod
    def _set_request_id(call: TrackedCall, response_id: Any, header_id: Any) -> None:
        """``response.id`` is what the service has in hand for feedback; the ``x-request-id``
        header is what the provider's support asks for, so it is kept beside it."""
        if isinstance(response_id, str) and response_id:
            call.set(request_id=response_id[: limits.MAX_ID_CHARS])
            if isinstance(header_id, str) and header_id and header_id != response_id:
                _attributes(call)["openai_request_id"] = header_id[:200]
        elif isinstance(header_id, str) and header_id:
            call.set(request_id=header_id[: limits.MAX_ID_CHARS])


class _StreamObserver:
    """Watches chunks go by on their way to the caller and records the call when the stream
    ends: exhausted, failed, closed early, or garbage-collected half-read."""

    def __init__(self, instrumentation: _Instrumentation, call: TrackedCall, *, pass_usage_chunk: bool) -> None:
        self.instrumentation = instrumentation
        self.call = call
        self.pass_usage_chunk = pass_usage_chunk
        self.first_chunk_ms: float | None = None
        self.response_id: str | None = None
        self.header_id: str | None = None
        self.response_model: str | None = None
        self.usage: Any = None
        self.finish_reason: str | None = None
        self.refusal_chars = 0
        self.content_chars = 0
        self.output: list[str] = []
        self.tools: dict[tuple[int, int], str] = {}
        self.ended = False

    def attach(self, stream: Any) -> Any:
        """Swap the stream's chunk iterator for an observing one; the object the caller gets is
        still the client's own ``Stream``/``AsyncStream`` (same type, same ``response``)."""
        inner = getattr(stream, "_iterator", None)
        if inner is None:  # an unknown client layout: record what is known rather than guess
            _attributes(self.call)["usage_unknown"] = True
            self.end()
            return stream
        headers = getattr(getattr(stream, "response", None), "headers", None)
        if headers is not None:
            header_id = headers.get("x-request-id")
            self.header_id = header_id if isinstance(header_id, str) else None
        # the replacement close() must not hold the stream strongly: a stream -> close -> stream cycle
        # leaves an abandoned stream to the cyclic GC, which finalizes its whole chain of async
        # generators at once and makes them trip over each other
        stream_ref = weakref.ref(stream)
        close = type(stream).close
        if inspect.iscoroutinefunction(close):
            stream._iterator = self._observe_async(inner)

            async def aclose_and_record() -> None:
                try:
                    target = stream_ref()
                    if target is not None:
                        await close(target)
                finally:
                    self.end(closed_early=True)

            stream.close = aclose_and_record
        else:
            stream._iterator = self._observe_sync(inner)

            def close_and_record() -> None:
                try:
                    target = stream_ref()
                    if target is not None:
                        close(target)
                finally:
                    self.end(closed_early=True)

            stream.close = close_and_record
        return stream

    def _observe_sync(self, inner: Iterator[Any]) -> Iterator[Any]:
        try:
            for chunk in inner:
                if self._observe(chunk):
                    yield chunk
        except GeneratorExit:
            self.end(closed_early=True)
            raise
        except BaseException as exc:
            self.end(error=exc)
            raise
        else:
            self.end()
        finally:
            close = getattr(inner, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    async def _observe_async(self, inner: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Unlike the sync twin this never closes ``inner``: an abandoned stream's generators are
        finalized by the event loop, each on its own, and closing ``inner`` from here would race
        that ("aclose(): asynchronous generator is already running"). The client's own
        ``AsyncStream.__aiter__`` leaves it alone for the same reason."""
        try:
            async for chunk in inner:
                if self._observe(chunk):
                    yield chunk
        except GeneratorExit:
            self.end(closed_early=True)
            raise
        except BaseException as exc:
            self.end(error=exc)
            raise
        else:
            self.end()

    def _observe(self, chunk: Any) -> bool:
        """Note what the chunk says; returns whether the caller gets it."""
        try:
            call = self.call
            if self.first_chunk_ms is None:
                self.first_chunk_ms = call.elapsed_ms()
                self.response_id = getattr(chunk, "id", None) or None
                self.response_model = _name(getattr(chunk, "model", None))
            usage = getattr(chunk, "usage", None)
            if usage is not None:
                self.usage = usage
            choices = getattr(chunk, "choices", None) or ()
            for choice in choices:
                delta = getattr(choice, "delta", None)
                content = getattr(delta, "content", None)
                refusal = getattr(delta, "refusal", None)
                tool_calls = getattr(delta, "tool_calls", None)
                if content or refusal or tool_calls:
                    call.first_token()
                if content:
                    self.content_chars += len(content)
                    if self.instrumentation.capture and getattr(choice, "index", 0) == 0:
                        self.output.append(content)
                if refusal:
                    self.refusal_chars += len(refusal)
                for tool_call in tool_calls or ():
                    name = _name(getattr(getattr(tool_call, "function", None), "name", None))
                    if name:
                        self.tools.setdefault((getattr(choice, "index", 0), getattr(tool_call, "index", 0)), name)
                reason = getattr(choice, "finish_reason", None)
                if reason and self.finish_reason is None:
                    self.finish_reason = _name(str(reason))
            return self.pass_usage_chunk or bool(choices) or usage is None
        except Exception as exc:
            self.instrumentation.telemetry._internal_error(exc)
            return True

    def end(self, *, error: BaseException | None = None, closed_early: bool = False) -> None:
        if self.ended:
            return
        self.ended = True
        call = self.call
        try:
            fields: dict[str, Any] = openai_usage(self.usage)
            if not fields:
                _attributes(call)["usage_unknown"] = True
            if closed_early:
                _attributes(call)["stream_closed_early"] = True
            if "ttft_ms" not in call.fields and self.first_chunk_ms is not None:
                fields["ttft_ms"] = self.first_chunk_ms
            if self.response_model:
                fields["response_model"] = self.response_model
            if self.finish_reason:
                fields["finish_reason"] = self.finish_reason
            fields["refusal"] = self.refusal_chars > 0 or self.finish_reason == "content_filter"
            fields["tool_calls"] = list(self.tools.values())[: limits.MAX_TOOL_CALLS]
            fields["output_chars"] = self.content_chars + self.refusal_chars
            if self.output:
                fields["output"] = "".join(self.output)
            call.set(**fields)
            _Instrumentation._set_request_id(call, self.response_id, self.header_id)
        except Exception as exc:
            self.instrumentation.telemetry._internal_error(exc)
        call.finish(error)
