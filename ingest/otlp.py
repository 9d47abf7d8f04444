"""OTLP GenAI spans → llmpulse call events: decode an OTLP/HTTP traces body, map each model call.

Many services are already instrumented with OpenTelemetry (the OTel GenAI instrumentations,
OpenLLMetry, OpenLIT). Their spans carry ``gen_ai.*`` attributes that describe one model call
each, so ``POST /v1/traces`` can turn them into call events without any change on the
service side. Everything here is pure (bytes in, dicts out, no I/O) so the HTTP receiver, a
file replay of captured OTLP bodies and the tests all share it.

Conventions followed: OpenTelemetry Semantic Conventions **v1.41.1**, ``docs/gen-ai`` — the
last core release that defines the GenAI conventions (v1.42.0 deprecated them in the core
repository and moved them to ``open-telemetry/semantic-conventions-genai``, which had no
release yet; its registry keeps the same span attributes). Older names are tolerated
(``gen_ai.system``, ``gen_ai.usage.prompt_tokens``/``completion_tokens``), and so are the
names OpenLLMetry and OpenLIT emit (see ``_CACHE_READ_KEYS``, ``_TTFT_SECONDS_KEYS``...).

Attribute → event field (span attributes first, then resource attributes for attribution):

============================================================  =========================================
``gen_ai.operation.name`` (OpenLLMetry: ``llm.request.type``)  decides call or not; kept in ``attributes``
``gen_ai.provider.name`` (older: ``gen_ai.system``)            ``provider``, normalised (``PROVIDER_ALIASES``)
``gen_ai.request.model`` (else ``gen_ai.response.model``)     ``model``
``gen_ai.response.model``                                      ``response_model``
``gen_ai.usage.input_tokens`` (older: ``prompt_tokens``)       ``input_tokens`` (see "Input tokens")
``gen_ai.usage.output_tokens`` (older: ``completion_tokens``)  ``output_tokens``
``gen_ai.usage.cache_read.input_tokens`` (+ variants)          ``cached_input_tokens``
``gen_ai.usage.cache_creation.input_tokens`` (+ variants)      ``cache_write_tokens``
``gen_ai.response.finish_reasons`` (first element)             ``finish_reason``; a safety stop → ``refusal``
``gen_ai.request.temperature`` / ``max_tokens`` / ``top_p``    ``params`` (out-of-range values dropped)
``gen_ai.response.id``                                         ``request_id``
``gen_ai.conversation.id`` (else ``session.id``)              ``conversation_id``
``gen_ai.response.time_to_first_chunk`` (s) (+ OpenLIT names)  ``ttft_ms``
span status ERROR / ``error.type``                             ``status``, ``error_type``, ``error_message``
span end − start                                               ``latency_ms``
span start                                                     ``ts`` (RFC 3339 UTC, milliseconds)
trace id, span id                                              ``trace_id``; ``event_id`` = ``otel-{trace}-{span}``
resource ``service.name``                                      ``service``
``OtlpOptions.*_keys`` (span, then resource)                   ``feature``, ``team``, ``prompt_version``,
                                                               ``variant``, ``user_id``
other span attributes (bounded, no content)                    ``attributes``
============================================================  =========================================

Input tokens: llmpulse's ``input_tokens`` includes cache reads and writes (OpenAI usage
semantics), and so does ``gen_ai.usage.input_tokens`` per the conventions ("SHOULD include all
types of input tokens, including cached tokens"; the cache attributes "SHOULD be included in
``gen_ai.usage.input_tokens``"). It is taken as reported. Some Anthropic instrumentations
(OpenLIT, for one) report Anthropic's own ``input_tokens``, which *excludes* cache reads and
writes. When cache reads + writes exceed the reported input that is certain, and the cache
counts are added in (the reported figure is kept as ``attributes["llmpulse.input_tokens_reported"]``);
for instrumentations known to report that way, ``OtlpOptions.input_excludes_cache_providers``
(e.g. ``{"anthropic"}``) adds them in always. Either way cached ≤ input holds in the output.

Which spans are calls: ``chat``, ``text_completion``, ``generate_content`` and ``embeddings``
(embeddings cost input tokens; ``output_tokens`` is 0 unless reported). Agent, workflow, tool,
retrieval, planning and memory operations are not model calls — an ``invoke_agent`` span may
even carry the summed usage of its child calls, which would count twice — so they are ignored
and counted in ``ignored_other``. A span with an unknown or missing operation name is a call
when it names a model and reports token usage. Spans without any ``gen_ai.*`` attribute are
counted in ``ignored_non_genai``.

Feature fallback: when none of ``OtlpOptions.feature_keys`` is present on the span or its
resource, ``feature`` is the resource's ``service.name`` (so a service's calls still group
together), and ``OtlpOptions.default_feature`` (``"unattributed"``) when the service is unnamed
too (the SDK's ``unknown_service*`` default counts as unnamed). The span name is not used: by
convention it is ``"{operation} {model}"``, which says nothing the event does not already say.

``tenant`` never comes from the payload: the receiver passes the authenticated tenant in.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final, Literal

import msgspec
import orjson

from schemas import limits
from schemas.errors import ErrorStatus, error_status

SEMCONV_VERSION: Final = "1.41.1"
"""OpenTelemetry Semantic Conventions release whose ``docs/gen-ai`` this mapping follows."""
SEMCONV_SCHEMA_URL: Final = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"

CONTENT_TYPE_PROTOBUF: Final = "application/x-protobuf"
CONTENT_TYPE_JSON: Final = "application/json"

STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2
"""``Status.StatusCode`` values of the OTLP trace proto."""

CALL_OPERATIONS: Final = frozenset(
    {
        "chat",
        "text_completion",
        "generate_content",
        "embeddings",
        # OpenLLMetry's llm.request.type and OpenLIT's older operation names
        "completion",
        "embedding",
    }
)
"""Operations that are one billable model call each."""

NOT_CALL_OPERATIONS: Final = frozenset(
    {
        "execute_tool",
        "invoke_agent",
        "create_agent",
        "invoke_workflow",
        "retrieval",
        "plan",
        "search_memory",
        "create_memory",
        "update_memory",
        "upsert_memory",
        "delete_memory",
        "create_memory_store",
        "delete_memory_store",
        # OpenLIT / OpenLLMetry framework-level operations
        "agent",
        "execute_task",
        "framework",
        "vectordb",
        "workflow",
        "task",
        "tool",
        "rerank",
    }
)
"""Operations that wrap or sit beside model calls; they never become call events."""

PROVIDER_ALIASES: Final[Mapping[str, str]] = {
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "vertex_ai": "google",
    "vertexai": "google",
    "gemini": "google",
    "google.ai.studio": "google",
    "google-ai-studio": "google",
    "google_genai": "google",
    "google.genai": "google",
    "aws.bedrock": "bedrock",
    "aws_bedrock": "bedrock",
    "amazon_bedrock": "bedrock",
    "azure.ai.openai": "azure",
    "az.ai.openai": "azure",
    "azure_openai": "azure",
    "azure.ai.inference": "azure",
    "az.ai.inference": "azure",
    "azure-ai-inference": "azure",
    "mistral_ai": "mistral",
    "mistralai": "mistral",
    "x_ai": "xai",
    "ibm.watsonx.ai": "watsonx",
    "ibm.watson.ai": "watsonx",
    "moonshot_ai": "moonshot",
}
"""Semconv provider values → llmpulse provider labels. The cloud vendor is kept (``bedrock``,
``azure``) because an outage or rate limit is the serving platform's, not the model maker's;
names match LiteLLM's provider names where they overlap. Unlisted values pass through
lower-cased (``openai``, ``anthropic``, ``cohere``, ``groq``, ``deepseek``...)."""

REFUSAL_FINISH_REASONS: Final = frozenset(
    {
        "content_filter",  # OpenAI, Azure
        "refusal",  # Anthropic
        "safety",  # Gemini
        "prohibited_content",
        "blocklist",
        "spii",
        "image_safety",
        "recitation",
        "guardrail_intervened",  # Bedrock
        "content_filtered",
    }
)
"""Finish reasons (compared lower-cased) meaning the provider or model declined to answer."""

# attribute names, in order of preference
_OPERATION_KEYS = ("gen_ai.operation.name", "llm.request.type")
_PROVIDER_KEYS = ("gen_ai.provider.name", "gen_ai.system")
_REQUEST_MODEL = "gen_ai.request.model"
_RESPONSE_MODEL = "gen_ai.response.model"
_INPUT_KEYS = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
_OUTPUT_KEYS = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
_CACHE_READ_KEYS = (
    "gen_ai.usage.cache_read.input_tokens",  # semconv
    "gen_ai.usage.cache_read_input_tokens",  # OpenLLMetry, OpenLIT
    "gen_ai.usage.input_tokens.cached",  # Sentry
)
_CACHE_WRITE_KEYS = (
    "gen_ai.usage.cache_creation.input_tokens",
    "gen_ai.usage.cache_creation_input_tokens",
    "gen_ai.usage.input_tokens.cache_write",
)
_TTFT_SECONDS_KEYS = (
    "gen_ai.response.time_to_first_chunk",  # semconv (seconds)
    "gen_ai.server.time_to_first_token",  # OpenLIT (seconds)
    "gen_ai.server.ttft",
)
_STREAM_KEYS = ("gen_ai.request.stream", "gen_ai.request.is_stream", "llm.is_streaming")
_FINISH_KEYS = (
    "gen_ai.response.finish_reasons",
    "llm.response.finish_reason",  # OpenLLMetry
    "llm.response.stop_reason",
    "gen_ai.completion.0.finish_reason",
)
_RESPONSE_ID = "gen_ai.response.id"
_CONVERSATION_KEYS = ("gen_ai.conversation.id", "session.id")
_TEMPERATURE = "gen_ai.request.temperature"
_MAX_TOKENS = "gen_ai.request.max_tokens"
_TOP_P = "gen_ai.request.top_p"
_ERROR_TYPE = "error.type"
_HTTP_STATUS_KEYS = ("http.response.status_code", "http.status_code")
_SERVICE_NAME = "service.name"

_MAPPED_KEYS = frozenset(
    {
        *_PROVIDER_KEYS,
        _REQUEST_MODEL,
        _RESPONSE_MODEL,
        *_INPUT_KEYS,
        *_OUTPUT_KEYS,
        *_CACHE_READ_KEYS,
        *_CACHE_WRITE_KEYS,
        *_TTFT_SECONDS_KEYS,
        *_FINISH_KEYS,
        _RESPONSE_ID,
        *_CONVERSATION_KEYS,
        _TEMPERATURE,
        _MAX_TOKENS,
        _TOP_P,
        _ERROR_TYPE,
        _SERVICE_NAME,
    }
)
"""Span attributes that became event fields and are therefore not repeated in ``attributes``."""

_CONTENT_PREFIXES = (
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.system_instructions",
    "gen_ai.prompt",
    "gen_ai.completion",
    "gen_ai.content.",
    "gen_ai.tool.call.arguments",
    "gen_ai.tool.call.result",
    "gen_ai.tool.definitions",
    "gen_ai.retrieval.documents",
    "gen_ai.retrieval.query.text",
    "gen_ai.memory.query.text",
    "gen_ai.memory.records",
    "llm.prompts",
    "llm.completions",
    "llm.request.functions",
    "llm.input_messages",
    "llm.output_messages",
    "traceloop.entity.input",
    "traceloop.entity.output",
    "input.value",
    "output.value",
)
"""Attributes that carry prompt/response text (semconv opt-in content, OpenLLMetry's indexed
``gen_ai.prompt.N.content``, OpenLIT's ``gen_ai.prompt``, OpenInference's ``input.value``)."""

_PROMPT_KEYS = ("gen_ai.input.messages", "gen_ai.prompt")
_OUTPUT_TEXT_KEYS = ("gen_ai.output.messages", "gen_ai.completion")

_MAX_VALUE_DEPTH = limits.DEFAULT_MAX_DEPTH


@dataclass(frozen=True, slots=True)
class OtlpOptions:
    """Which attributes attribute a call, and how much else of a span to keep.

    Each ``*_keys`` tuple is tried in order; for each key the span's attributes are looked at
    first, then the resource's, so a per-span value beats a service-wide one of the same key.
    There is deliberately no tenant key: the tenant comes from the API key, never the payload.
    """

    feature_keys: tuple[str, ...] = (
        "llmpulse.feature",
        "app.feature",
        "feature",
        "traceloop.association.properties.feature",  # OpenLLMetry association properties
        "traceloop.workflow.name",
        "gen_ai.agent.name",
    )
    team_keys: tuple[str, ...] = ("llmpulse.team", "app.team", "team", "traceloop.association.properties.team")
    prompt_version_keys: tuple[str, ...] = (
        "llmpulse.prompt_version",
        "app.prompt_version",
        "prompt_version",
        "traceloop.prompt.version",
    )
    variant_keys: tuple[str, ...] = ("llmpulse.variant", "app.variant", "variant")
    user_id_keys: tuple[str, ...] = ("user.id", "enduser.id", "llmpulse.user_id")
    default_feature: str = "unattributed"
    """Feature for calls with no feature attribute and no ``service.name``."""
    include_content: bool = False
    """Map ``gen_ai.input.messages``/``gen_ai.output.messages`` (or OpenLIT's ``gen_ai.prompt``/
    ``gen_ai.completion``) to ``prompt``/``output``; the pipeline's content policy then hashes
    or keeps them. Off: content attributes are dropped here and never leave this function."""
    max_extra_attributes: int = 32
    max_attribute_chars: int = 1024
    input_excludes_cache_providers: frozenset[str] = frozenset()
    """Normalised providers whose spans report ``input_tokens`` without cache reads/writes."""


DEFAULT_OPTIONS: Final = OtlpOptions()


@dataclass(slots=True)
class OtlpSpan:
    """One decoded span: just what the mapping needs, the same for protobuf and JSON bodies."""

    trace_id: str
    """Lower-case hex, ``""`` when absent."""
    span_id: str
    name: str
    start_ns: int
    end_ns: int
    status_code: int
    status_message: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    """Shared by every span of one ``ResourceSpans``: do not mutate."""
    exception: tuple[str, str] | None = None
    """``(exception.type, exception.message)`` of the first exception event, decoded for ERROR spans only."""

    def ident(self) -> str:
        return f"trace {self.trace_id or '?'} span {self.span_id or '?'} ({self.name!r})"


@dataclass(slots=True)
class OtlpResult:
    """What one OTLP body became: call events plus an account of every span that did not."""

    events: list[dict[str, Any]] = field(default_factory=list)
    ignored_non_genai: int = 0
    """Spans without any ``gen_ai.*`` attribute (HTTP, DB, framework spans...)."""
    ignored_other: int = 0
    """GenAI spans that are not model calls (agents, tools, workflows, retrieval...)."""
    invalid: list[tuple[str, str]] = field(default_factory=list)
    """``(reason, span identification)`` for GenAI call spans that cannot become a valid event."""
    spans: int = 0

    def payloads(self) -> list[bytes]:
        """The events as JSON payloads, ready for a ``PayloadBatch``."""
        dumps = orjson.dumps
        return [dumps(e) for e in self.events]


class OtlpDecodeError(ValueError):
    """The body is not an OTLP traces request; ``path`` points at the offending part (JSON)."""

    def __init__(self, reason: str, path: str = "$") -> None:
        super().__init__(f"{reason} (at {path})" if path != "$" else reason)
        self.reason = reason
        self.path = path


class UnsupportedContentType(OtlpDecodeError):
    """Neither ``application/x-protobuf`` nor ``application/json``: the receiver answers 415."""


class _Invalid(Exception):
    """One span cannot become a valid event; the reason ends up in ``OtlpResult.invalid``."""


# --------------------------------------------------------------------------------------------
# decoding


def media_type(content_type: str | None) -> Literal["protobuf", "json"]:
    """``application/x-protobuf`` or ``application/json`` (parameters such as charset ignored)."""
    mt = (content_type or "").split(";", 1)[0].strip().lower()
    if mt in (CONTENT_TYPE_PROTOBUF, "application/protobuf"):
        return "protobuf"
    if mt == CONTENT_TYPE_JSON:
        return "json"
    raise UnsupportedContentType(
        f"unsupported content type {content_type!r}: OTLP/HTTP uses {CONTENT_TYPE_PROTOBUF} or {CONTENT_TYPE_JSON}"
    )


def decode_request(body: bytes, content_type: str | None) -> list[OtlpSpan]:
    """Decode an (already decompressed) OTLP/HTTP ``ExportTraceServiceRequest`` body."""
    if media_type(content_type) == "protobuf":
        return decode_protobuf(body)
    return decode_json(body)


@lru_cache(maxsize=1)
def _request_class() -> Any:
    # imported on first use: a JSON-only receiver does not need opentelemetry-proto
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    return ExportTraceServiceRequest


def decode_protobuf(body: bytes) -> list[OtlpSpan]:
    """Binary protobuf ``ExportTraceServiceRequest`` → spans."""
    from google.protobuf.message import DecodeError

    try:
        request = _request_class().FromString(body)
    except (DecodeError, ValueError, RecursionError) as exc:
        raise OtlpDecodeError(f"not a protobuf ExportTraceServiceRequest: {exc}") from exc
    out: list[OtlpSpan] = []
    append = out.append
    for rs in request.resource_spans:
        resource = _pb_attributes(rs.resource.attributes, 0)
        for ss in rs.scope_spans:
            for s in ss.spans:
                status = s.status
                code = status.code
                append(
                    OtlpSpan(
                        s.trace_id.hex(),
                        s.span_id.hex(),
                        s.name,
                        s.start_time_unix_nano,
                        s.end_time_unix_nano,
                        code,
                        status.message,
                        _pb_attributes(s.attributes, 0),
                        resource,
                        _pb_exception(s.events) if code == STATUS_ERROR else None,
                    )
                )
    return out


def _pb_attributes(kvs: Iterable[Any], depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv.value
        kind = v.WhichOneof("value")
        # the scalar cases inline: this loop runs for every attribute of every span
        if kind == "string_value":
            out[kv.key] = v.string_value
        elif kind == "int_value":
            out[kv.key] = v.int_value
        elif kind == "double_value":
            out[kv.key] = v.double_value
        elif kind == "bool_value":
            out[kv.key] = v.bool_value
        else:
            out[kv.key] = _pb_value(v, kind, depth)
    return out


def _pb_value(v: Any, kind: str | None, depth: int) -> Any:
    if kind == "string_value":
        return v.string_value
    if kind == "int_value":
        return v.int_value
    if kind == "double_value":
        return v.double_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "bytes_value":
        return bytes(v.bytes_value)
    if kind is None:
        return None
    if depth >= _MAX_VALUE_DEPTH:
        raise OtlpDecodeError(f"attribute value nested deeper than {_MAX_VALUE_DEPTH} levels")
    if kind == "array_value":
        return [_pb_value(x, x.WhichOneof("value"), depth + 1) for x in v.array_value.values]
    return _pb_attributes(v.kvlist_value.values, depth + 1)


def _pb_exception(events: Iterable[Any]) -> tuple[str, str] | None:
    for ev in events:
        if ev.name == "exception":
            attrs = _pb_attributes(ev.attributes, 0)
            return str(attrs.get("exception.type") or ""), str(attrs.get("exception.message") or "")
    return None


# OTLP JSON, decoded by msgspec into these structs (C speed; its errors carry the JSON path).
# Unknown fields are ignored, as the OTLP spec asks of JSON receivers.


class _JAnyValue(msgspec.Struct):
    stringValue: str | None = None
    boolValue: bool | None = None
    intValue: int | str | None = None
    doubleValue: float | str | None = None
    arrayValue: _JArrayValue | None = None
    kvlistValue: _JKeyValueList | None = None
    bytesValue: str | None = None


class _JArrayValue(msgspec.Struct):
    values: list[_JAnyValue] = []


class _JKeyValue(msgspec.Struct):
    key: str
    value: _JAnyValue | None = None


class _JKeyValueList(msgspec.Struct):
    values: list[_JKeyValue] = []


class _JLongBits(msgspec.Struct):
    """How the JS transformer writes a 64-bit integer when configured with ``useLongBits``."""

    low: int
    high: int


class _JStatus(msgspec.Struct):
    code: int | str = 0
    message: str = ""


class _JEvent(msgspec.Struct):
    name: str = ""
    attributes: list[_JKeyValue] = []


class _JSpan(msgspec.Struct):
    traceId: str = ""
    spanId: str = ""
    name: str = ""
    startTimeUnixNano: int | float | str | _JLongBits = 0
    endTimeUnixNano: int | float | str | _JLongBits = 0
    attributes: list[_JKeyValue] = []
    events: list[_JEvent] = []
    status: _JStatus | None = None


class _JScopeSpans(msgspec.Struct):
    spans: list[_JSpan] = []


class _JResource(msgspec.Struct):
    attributes: list[_JKeyValue] = []


class _JResourceSpans(msgspec.Struct):
    resource: _JResource | None = None
    scopeSpans: list[_JScopeSpans] = []


class _JRequest(msgspec.Struct):
    resourceSpans: list[_JResourceSpans] = []


class _BadValue(Exception):
    """A JSON value msgspec accepted but OTLP does not; ``where`` is its path below the caught level."""

    def __init__(self, reason: str, where: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.where = where


@lru_cache(maxsize=1)
def _json_decoder() -> msgspec.json.Decoder[_JRequest]:
    return msgspec.json.Decoder(_JRequest)


_AT_PATH = re.compile(r" - at `(\$[^`]*)`$")
_JSON_STATUS = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2, "0": 0, "1": 1, "2": 2}


def decode_json(body: bytes) -> list[OtlpSpan]:
    """OTLP JSON ``ExportTraceServiceRequest`` → spans.

    Follows the OTLP JSON encoding (lowerCamelCase keys, hex trace/span ids, int64 as number
    or string, integer enums) and also accepts what a generic protobuf JSON printer writes
    (base64 ids, enum names), so a body made with ``MessageToJson`` decodes too. Error paths
    are built only once something is wrong: the happy path formats no strings.
    """
    try:
        request = _json_decoder().decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _AT_PATH.search(message)
        if match:
            raise OtlpDecodeError(message[: match.start()], match.group(1)) from None
        raise OtlpDecodeError(message) from None
    except msgspec.DecodeError as exc:
        raise OtlpDecodeError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise OtlpDecodeError("JSON nested too deeply") from None
    out: list[OtlpSpan] = []
    append = out.append
    for i, rs in enumerate(request.resourceSpans):
        try:
            resource = _json_attributes(rs.resource.attributes, 0) if rs.resource is not None else {}
        except _BadValue as exc:
            raise OtlpDecodeError(exc.reason, f"$.resourceSpans[{i}].resource.attributes{exc.where}") from None
        for j, ss in enumerate(rs.scopeSpans):
            for k, s in enumerate(ss.spans):
                try:
                    status = s.status
                    code = _json_status(status.code) if status is not None else STATUS_UNSET
                    append(
                        OtlpSpan(
                            _json_id(s.traceId, 16, ".traceId"),
                            _json_id(s.spanId, 8, ".spanId"),
                            s.name,
                            _json_uint64(s.startTimeUnixNano, ".startTimeUnixNano"),
                            _json_uint64(s.endTimeUnixNano, ".endTimeUnixNano"),
                            code,
                            status.message if status is not None else "",
                            _json_span_attributes(s.attributes),
                            resource,
                            _json_exception(s.events) if code == STATUS_ERROR else None,
                        )
                    )
                except _BadValue as exc:
                    path = f"$.resourceSpans[{i}].scopeSpans[{j}].spans[{k}]{exc.where}"
                    raise OtlpDecodeError(exc.reason, path) from None
    return out


def _json_id(value: str, size: int, where: str) -> str:
    """Hex per the OTLP JSON spec; base64 (what generic protobuf JSON printers emit) also accepted."""
    if not value:
        return ""
    if len(value) == 2 * size:
        try:
            return bytes.fromhex(value).hex()
        except ValueError:
            pass
    elif len(value) == (size + 2) // 3 * 4:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == size:
            return raw.hex()
    raise _BadValue(f"expected a {size}-byte id as {2 * size} hex digits, got {value!r:.80}", where)


def _json_uint64(value: int | float | str | _JLongBits, where: str) -> int:
    if type(value) is int:
        result = value
    elif (isinstance(value, str) and value.isdigit()) or (isinstance(value, float) and value.is_integer()):
        result = int(value)
    elif isinstance(value, _JLongBits):
        result = (value.high & 0xFFFFFFFF) << 32 | (value.low & 0xFFFFFFFF)
    else:
        raise _BadValue(f"expected an unsigned 64-bit integer, got {value!r:.80}", where)
    if not 0 <= result < 1 << 64:
        raise _BadValue(f"expected an unsigned 64-bit integer, got {value!r:.80}", where)
    return result


def _json_status(value: int | str) -> int:
    if isinstance(value, int):
        if value in (0, 1, 2):
            return value
    elif value in _JSON_STATUS:
        return _JSON_STATUS[value]
    raise _BadValue(f"expected a status code 0, 1 or 2, got {value!r:.80}", ".status.code")


def _json_span_attributes(kvs: list[_JKeyValue]) -> dict[str, Any]:
    try:
        return _json_attributes(kvs, 0)
    except _BadValue as exc:
        raise _BadValue(exc.reason, f".attributes{exc.where}") from None


def _json_attributes(kvs: list[_JKeyValue], depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, kv in enumerate(kvs):
        v = kv.value
        if v is None:
            out[kv.key] = None
        elif v.stringValue is not None:  # the common case, inline
            out[kv.key] = v.stringValue
        else:
            try:
                out[kv.key] = _json_value(v, depth)
            except _BadValue as exc:
                raise _BadValue(exc.reason, f"[{n}].value{exc.where}") from None
    return out


def _json_value(v: _JAnyValue, depth: int) -> Any:
    if v.stringValue is not None:
        return v.stringValue
    if v.boolValue is not None:
        return v.boolValue
    x: Any = v.intValue
    if x is not None:
        if type(x) is int:
            return x
        try:
            return int(x)
        except ValueError:
            raise _BadValue(f"invalid intValue: {x!r:.80}", ".intValue") from None
    x = v.doubleValue
    if x is not None:
        try:
            return float(x)  # also "NaN", "Infinity", "-Infinity", as the protobuf JSON mapping writes them
        except ValueError:
            raise _BadValue(f"invalid doubleValue: {x!r:.80}", ".doubleValue") from None
    if v.arrayValue is not None or v.kvlistValue is not None:
        if depth >= _MAX_VALUE_DEPTH:
            raise _BadValue(f"attribute value nested deeper than {_MAX_VALUE_DEPTH} levels", "")
        if v.kvlistValue is not None:
            try:
                return _json_attributes(v.kvlistValue.values, depth + 1)
            except _BadValue as exc:
                raise _BadValue(exc.reason, f".kvlistValue.values{exc.where}") from None
        items: list[Any] = []
        for n, item in enumerate(v.arrayValue.values):  # type: ignore[union-attr]
            try:
                items.append(_json_value(item, depth + 1))
            except _BadValue as exc:
                raise _BadValue(exc.reason, f".arrayValue.values[{n}]{exc.where}") from None
        return items
    if v.bytesValue is not None:
        try:
            return base64.b64decode(v.bytesValue, validate=True)
        except (binascii.Error, ValueError):
            raise _BadValue(f"invalid bytesValue: {v.bytesValue!r:.80}", ".bytesValue") from None
    return None


def _json_exception(events: list[_JEvent]) -> tuple[str, str] | None:
    for n, ev in enumerate(events):
        if ev.name == "exception":
            try:
                attrs = _json_attributes(ev.attributes, 0)
            except _BadValue as exc:
                raise _BadValue(exc.reason, f".events[{n}].attributes{exc.where}") from None
            return str(attrs.get("exception.type") or ""), str(attrs.get("exception.message") or "")
    return None


# --------------------------------------------------------------------------------------------
# mapping


def normalize_provider(value: str) -> str:
    """``gcp.vertex_ai`` → ``google`` and the like (``PROVIDER_ALIASES``); others lower-cased."""
    v = value.strip().lower()
    return PROVIDER_ALIASES.get(v, v)


def event_id_for(trace_id: str, span_id: str) -> str:
    """Deterministic: the same span sent twice (an exporter retry) is the same event, deduplicated."""
    return f"otel-{trace_id}-{span_id}"


def classify_error(error_type: str | None, http_status: int | None = None) -> ErrorStatus:
    """``error.type`` (and an HTTP status when recorded) → llmpulse status.

    Instrumentations put the exception class (``RateLimitError``, ``APITimeoutError``,
    ``ThrottlingException``), an HTTP status (``429``) or a gRPC code (``RESOURCE_EXHAUSTED``,
    ``DEADLINE_EXCEEDED``) there; the shared vocabulary in ``schemas.errors`` reads them all.
    """
    return error_status([error_type], http_status)


def map_request(
    body: bytes, content_type: str | None, options: OtlpOptions = DEFAULT_OPTIONS, *, tenant: str | None = None
) -> OtlpResult:
    """Decode an OTLP/HTTP traces body and map its GenAI spans (raises ``OtlpDecodeError``)."""
    return map_spans(decode_request(body, content_type), options, tenant=tenant)


def map_spans(
    spans: Iterable[OtlpSpan], options: OtlpOptions = DEFAULT_OPTIONS, *, tenant: str | None = None
) -> OtlpResult:
    """Map decoded spans to call event dicts, counting and explaining the spans that are not calls."""
    result = OtlpResult()
    events = result.events
    invalid = result.invalid
    plans = _plans(options)
    # keyed by id(); the value holds the dict itself, so no id is recycled while this runs
    resources: dict[int, tuple[dict[str, Any], _ResourceInfo]] = {}
    ts_cache: dict[int, str] = {}
    tenant_label = tenant[: limits.MAX_NAME_CHARS] if tenant else None
    for span in spans:
        result.spans += 1
        attrs = span.attributes
        shape = tuple(attrs)
        plan = plans.get(shape)
        if plan is None:
            plan = _Plan.of(shape, options)
            if len(plans) < _PLAN_CACHE_MAX:  # bounded: a sender must not grow it without limit
                plans[shape] = plan
        if not plan.genai:
            result.ignored_non_genai += 1
            continue
        operation = _first_str(attrs, plan.operation)
        op = operation.lower() if operation else None
        if op in NOT_CALL_OPERATIONS or (op not in CALL_OPERATIONS and not _looks_like_call(attrs, plan)):
            result.ignored_other += 1
            continue
        cached = resources.get(id(span.resource))
        if cached is None:
            cached = resources[id(span.resource)] = (span.resource, _ResourceInfo.of(span.resource, options))
        try:
            event = _map_call(span, plan, cached[1], options, ts_cache)
        except _Invalid as exc:
            invalid.append((str(exc), span.ident()))
            continue
        if tenant_label:
            event["tenant"] = tenant_label
        events.append(event)
    return result


_PLAN_CACHE_MAX = 1024


@dataclass(frozen=True, slots=True)
class _Plan:
    """For one set of attribute keys: which of each field's candidate keys are present, in order.

    Spans from one instrumentation carry the same keys span after span, so this is worked out
    once per key set and cached: the mapping then reads present keys only instead of probing
    some seventy names that are mostly absent. Values still decide (an empty string falls
    through to the next candidate), so the result is the same as probing every name.
    """

    genai: bool
    operation: tuple[str, ...]
    provider: tuple[str, ...]
    model: tuple[str, ...]
    response_model: tuple[str, ...]
    input: tuple[str, ...]
    output: tuple[str, ...]
    cache_read: tuple[str, ...]
    cache_write: tuple[str, ...]
    ttft: tuple[str, ...]
    stream: tuple[str, ...]
    finish: tuple[str, ...]
    response_id: tuple[str, ...]
    conversation: tuple[str, ...]
    temperature: tuple[str, ...]
    max_tokens: tuple[str, ...]
    top_p: tuple[str, ...]
    error_type: tuple[str, ...]
    http_status: tuple[str, ...]
    prompt: tuple[str, ...]
    output_text: tuple[str, ...]
    attribution: tuple[tuple[tuple[int, str], ...], ...]
    """Per ``_ResourceInfo.fields`` entry: ``(position in the option's key list, key)`` present on the span."""
    extras: tuple[str, ...]
    """Keys that go to ``attributes``, ``gen_ai.*`` first, before the count limit."""

    @classmethod
    def of(cls, shape: tuple[str, ...], options: OtlpOptions) -> _Plan:
        present = set(shape)

        def keep(keys: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(k for k in keys if k in present)

        genai_extra: list[str] = []
        other_extra: list[str] = []
        skip = _skip_keys(options)
        for key in shape:
            if key in skip or len(key) > limits.MAX_NAME_CHARS or _is_content_key(key):
                continue
            (genai_extra if key.startswith("gen_ai.") else other_extra).append(key)
        return cls(
            genai=any(k.startswith("gen_ai.") for k in shape),
            operation=keep(_OPERATION_KEYS),
            provider=keep(_PROVIDER_KEYS),
            model=keep((_REQUEST_MODEL, _RESPONSE_MODEL)),
            response_model=keep((_RESPONSE_MODEL,)),
            input=keep(_INPUT_KEYS),
            output=keep(_OUTPUT_KEYS),
            cache_read=keep(_CACHE_READ_KEYS),
            cache_write=keep(_CACHE_WRITE_KEYS),
            ttft=keep(_TTFT_SECONDS_KEYS),
            stream=keep(_STREAM_KEYS),
            finish=keep(_FINISH_KEYS),
            response_id=keep((_RESPONSE_ID,)),
            conversation=keep(_CONVERSATION_KEYS),
            temperature=keep((_TEMPERATURE,)),
            max_tokens=keep((_MAX_TOKENS,)),
            top_p=keep((_TOP_P,)),
            error_type=keep((_ERROR_TYPE,)),
            http_status=keep(_HTTP_STATUS_KEYS),
            prompt=keep(_PROMPT_KEYS),
            output_text=keep(_OUTPUT_TEXT_KEYS),
            attribution=tuple(
                tuple((i, k) for i, k in enumerate(keys) if k in present) for _, keys, _ in _attribution_fields(options)
            ),
            extras=tuple(genai_extra + other_extra),
        )


@lru_cache(maxsize=16)
def _plans(options: OtlpOptions) -> dict[tuple[str, ...], _Plan]:
    return {}


@lru_cache(maxsize=16)
def _skip_keys(options: OtlpOptions) -> frozenset[str]:
    """Mapped and attribution keys: already in the event's own fields, not repeated in ``attributes``."""
    return _MAPPED_KEYS.union(*(keys for _, keys, _ in _attribution_fields(options)))


@lru_cache(maxsize=16)
def _attribution_fields(options: OtlpOptions) -> tuple[tuple[str, tuple[str, ...], int], ...]:
    """``(event field, candidate keys, length bound)`` for the fields attribution options fill."""
    return (
        ("feature", options.feature_keys, limits.MAX_NAME_CHARS),
        ("team", options.team_keys, limits.MAX_NAME_CHARS),
        ("prompt_version", options.prompt_version_keys, limits.MAX_NAME_CHARS),
        ("variant", options.variant_keys, limits.MAX_NAME_CHARS),
        ("user_id", options.user_id_keys, limits.MAX_ID_CHARS),
    )


@dataclass(slots=True)
class _ResourceInfo:
    """What a resource contributes, worked out once per ``ResourceSpans`` instead of once per span.

    ``fields`` holds, per attribution field, the position in its key list of the first key the
    resource has (or the list's length) and that key's value. A span's own attribute wins when
    its key comes at or before that position.
    """

    service: str | None
    fallback_feature: str
    fields: tuple[tuple[str, int, str | None, int], ...]

    @classmethod
    def of(cls, resource: dict[str, Any], options: OtlpOptions) -> _ResourceInfo:
        service = _label(resource.get(_SERVICE_NAME))
        fallback = service if service and not service.startswith("unknown_service") else options.default_feature
        fields = []
        for name, keys, limit in _attribution_fields(options):
            found, value = len(keys), None
            for i, key in enumerate(keys):
                value = _label(resource.get(key), limit)
                if value is not None:
                    found = i
                    break
            fields.append((name, found, value, limit))
        return cls(service, fallback[: limits.MAX_NAME_CHARS], tuple(fields))


def _looks_like_call(attrs: dict[str, Any], plan: _Plan) -> bool:
    """No (known) operation name: a call if it names a model and reports usage."""
    has_model = any(attrs[k] is not None for k in plan.model)
    return has_model and any(attrs[k] is not None for k in (*plan.input, *plan.output))


def _map_call(
    span: OtlpSpan, plan: _Plan, resource: _ResourceInfo, options: OtlpOptions, ts_cache: dict[int, str]
) -> dict[str, Any]:
    attrs = span.attributes
    if not span.trace_id.strip("0") or not span.span_id.strip("0"):
        raise _Invalid("span has no trace id or span id")
    start, end = span.start_ns, span.end_ns
    if start <= 0:
        raise _Invalid("span has no start time")
    if end < start:
        raise _Invalid(f"span ends before it starts (start {start} ns, end {end} ns)")
    latency_ms = (end - start) / 1e6
    if latency_ms > limits.MAX_LATENCY_MS:
        raise _Invalid(f"span lasted {latency_ms / 3.6e6:.1f} h, over the 24 h limit")
    sec, ms = divmod(start // 1_000_000, 1000)
    prefix = ts_cache.get(sec)
    if prefix is None:
        try:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        except (OverflowError, OSError, ValueError) as exc:
            raise _Invalid(f"span start time {start} ns is out of range") from exc
        ts_cache[sec] = prefix

    model = _first_label(attrs, plan.model)
    if model is None:
        raise _Invalid("no model: neither gen_ai.request.model nor gen_ai.response.model is set")

    input_tokens = _tokens(attrs, plan.input)
    output_tokens = _tokens(attrs, plan.output)
    cached = _tokens(attrs, plan.cache_read) or 0
    written = _tokens(attrs, plan.cache_write) or 0
    provider_raw = _first_str(attrs, plan.provider)
    provider = normalize_provider(provider_raw)[: limits.MAX_NAME_CHARS] if provider_raw else None
    extra: dict[str, Any] = {}

    reported = input_tokens or 0
    input_total = reported
    if provider in options.input_excludes_cache_providers or cached + written > reported:
        input_total = reported + cached + written
        if input_total != reported:
            extra["llmpulse.input_tokens_reported"] = reported
        if input_total > limits.MAX_TOKENS:
            raise _Invalid(f"input tokens {input_total} exceed the {limits.MAX_TOKENS} per-call limit")
    if input_tokens is None and output_tokens is None:
        extra["llmpulse.usage_missing"] = True

    event: dict[str, Any] = {
        "event_id": event_id_for(span.trace_id, span.span_id),
        "ts": f"{prefix}.{ms:03d}Z",
        "feature": resource.fallback_feature,
        "model": model,
        "input_tokens": input_total,
        "output_tokens": output_tokens or 0,
        "latency_ms": latency_ms,
        "status": "ok",
    }

    # attribution: a span's own attribute beats the resource's value for the same or a later key
    for (name, found, resource_value, limit), candidates in zip(resource.fields, plan.attribution, strict=True):
        value = resource_value
        for i, key in candidates:
            if i > found:
                break
            label = _label(attrs[key], limit)
            if label is not None:
                value = label
                break
        if value is not None:
            event[name] = value
    if resource.service:
        event["service"] = resource.service

    if provider:
        event["provider"] = provider
        if provider != provider_raw:
            extra["gen_ai.provider.name"] = provider_raw
    response_model = _first_label(attrs, plan.response_model)
    if response_model:
        event["response_model"] = response_model
    params = _params(attrs, plan)
    if params:
        event["params"] = params

    request_id = _first_label(attrs, plan.response_id, limits.MAX_ID_CHARS)
    if request_id:
        event["request_id"] = request_id
    conversation = _first_label(attrs, plan.conversation, limits.MAX_ID_CHARS)
    if conversation:
        event["conversation_id"] = conversation
    event["trace_id"] = span.trace_id

    if cached:
        event["cached_input_tokens"] = cached
    if written:
        event["cache_write_tokens"] = written
    if plan.ttft:
        ttft = _ttft_ms(attrs, plan)
        if ttft is not None:
            event["ttft_ms"] = ttft

    # outcome
    finish = _finish_reason(attrs, plan.finish)
    if finish:
        event["finish_reason"] = finish
        if finish.lower() in REFUSAL_FINISH_REASONS:
            event["refusal"] = True
    error_type = _first_label(attrs, plan.error_type)
    if span.status_code == STATUS_ERROR or error_type:
        exc_type, exc_message = span.exception or ("", "")
        error_type = error_type or _label(exc_type)
        event["status"] = classify_error(error_type, _http_status(attrs, plan.http_status))
        if error_type:
            event["error_type"] = error_type
        message = span.status_message or exc_message
        if message:
            event["error_message"] = message[: limits.MAX_ERROR_MESSAGE_CHARS]

    if options.include_content:
        prompt = _content(attrs, plan.prompt)
        if prompt is not None:
            event["prompt"] = prompt
        output = _content(attrs, plan.output_text)
        if output is not None:
            event["output"] = output

    if plan.extras:
        _extra_attributes(attrs, plan.extras, options, extra)
    if extra:
        event["attributes"] = extra
    return event


def _label(value: Any, limit: int = limits.MAX_NAME_CHARS) -> str | None:
    """A non-empty string (numbers are written out), cut to the schema's bound; else None."""
    if type(value) is str:
        value = value.strip()
        return value[:limit] if value else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)[:limit]
    return None


def _first_str(attrs: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = attrs[key]
        if type(value) is str and value.strip():
            return value.strip()
    return None


def _first_label(attrs: dict[str, Any], keys: tuple[str, ...], limit: int = limits.MAX_NAME_CHARS) -> str | None:
    for key in keys:
        value = _label(attrs[key], limit)
        if value is not None:
            return value
    return None


def _tokens(attrs: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    """The first present token count; a count that is not a non-negative integer makes the span invalid."""
    for key in keys:
        value = attrs[key]
        if value is None:
            continue
        if type(value) is int and 0 <= value <= limits.MAX_TOKENS:
            return value
        n: int | None = None
        if isinstance(value, bool):
            n = None
        elif isinstance(value, int):
            n = value
        elif isinstance(value, float) and value.is_integer():
            n = int(value)
        elif isinstance(value, str) and value.strip().isdigit():
            n = int(value.strip())
        if n is None or n < 0:
            raise _Invalid(f"{key} is not a non-negative integer: {value!r:.60}")
        if n > limits.MAX_TOKENS:
            raise _Invalid(f"{key} = {n} exceeds the {limits.MAX_TOKENS} per-call limit")
        return n
    return None


def _number(value: Any) -> float | None:
    if type(value) is float:
        return value if math.isfinite(value) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        f = float(value)
    elif isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            return None
    else:
        return None
    return f if math.isfinite(f) else None


def _params(attrs: dict[str, Any], plan: _Plan) -> dict[str, Any]:
    """Out-of-range values are dropped, not fatal: OpenLIT, for one, records ``max_tokens = -1`` for "unset"."""
    params: dict[str, Any] = {}
    if plan.temperature:
        t = _number(attrs[_TEMPERATURE])
        if t is not None and 0 <= t <= 10:
            params["temperature"] = t
    if plan.max_tokens:
        m = _number(attrs[_MAX_TOKENS])
        if m is not None and m.is_integer() and 0 <= m <= limits.MAX_TOKENS:
            params["max_tokens"] = int(m)
    if plan.top_p:
        p = _number(attrs[_TOP_P])
        if p is not None and 0 <= p <= 1:
            params["top_p"] = p
    return params


def _ttft_ms(attrs: dict[str, Any], plan: _Plan) -> float | None:
    """Seconds → ms. Dropped when the span says the request was not streamed: OpenLIT records the
    whole duration as "time to first token" for non-streamed calls, which is not a TTFT."""
    for key in plan.stream:
        if attrs[key] is False:
            return None
    for key in plan.ttft:
        seconds = _number(attrs[key])
        if seconds is not None:
            ms = seconds * 1000.0
            return ms if 0 <= ms <= limits.MAX_LATENCY_MS else None
    return None


def _finish_reason(attrs: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    """The first choice's reason (``gen_ai.response.finish_reasons`` has one per choice)."""
    for key in keys:
        value = attrs[key]
        if type(value) is list:
            value = value[0] if value else None
        reason = _label(value)
        if reason:
            return reason
    return None


def _http_status(attrs: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        n = _number(attrs[key])
        if n is not None:
            return int(n)
    return None


def _content(attrs: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = attrs[key]
        if value is None:
            continue
        if isinstance(value, str):
            return value
        return orjson.dumps(value, default=str).decode()
    return None


def _is_content_key(key: str) -> bool:
    if not key.startswith(_CONTENT_PREFIXES):
        return False
    for base in ("gen_ai.prompt", "gen_ai.completion"):
        if key.startswith(base):
            # OpenLIT's gen_ai.prompt and OpenLLMetry's gen_ai.prompt.0.content are text;
            # gen_ai.prompt.name (the semconv prompt *name*) is not
            rest = key[len(base) :]
            return rest == "" or (rest[:1] == "." and rest[1:2].isdigit())
    return True


def _extra_attributes(
    attrs: dict[str, Any], keys: tuple[str, ...], options: OtlpOptions, extra: dict[str, Any]
) -> None:
    """Unmapped span attributes (``_Plan.extras``), bounded in count and size."""
    limit = options.max_extra_attributes
    chars = options.max_attribute_chars
    kept = dropped = 0
    for key in keys:
        value = attrs[key]
        if value is None or key in extra:
            continue
        if kept == limit:
            dropped += 1
            continue
        kept += 1
        if type(value) is str:
            extra[key] = value[:chars]
        elif type(value) is int or type(value) is bool:
            extra[key] = value
        else:
            extra[key] = _attribute_value(value, chars)
    if dropped:
        extra["llmpulse.attributes_dropped"] = dropped


def _attribute_value(value: Any, chars: int) -> str | int | float | bool:
    if isinstance(value, str):
        return value[:chars]
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        return value.hex()[:chars]
    return orjson.dumps(value, default=str).decode()[:chars]


# --------------------------------------------------------------------------------------------
# response


def encode_response(result: OtlpResult, content_type: str | None) -> bytes:
    """The ``ExportTraceServiceResponse`` body for a 200 answer, in the request's encoding.

    Invalid GenAI spans are reported as OTLP partial success (``rejected_spans`` and the first
    reason), which exporters log but do not retry. Ignored (non-call) spans are accepted.
    """
    rejected = len(result.invalid)
    message = ""
    if rejected:
        reason, ident = result.invalid[0]
        message = f"{rejected} GenAI span(s) rejected; first: {reason} [{ident}]"
    if media_type(content_type) == "json":
        if not rejected:
            return b"{}"
        return orjson.dumps({"partialSuccess": {"rejectedSpans": str(rejected), "errorMessage": message}})
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTracePartialSuccess,
        ExportTraceServiceResponse,
    )

    if not rejected:
        return bytes(ExportTraceServiceResponse().SerializeToString())
    partial = ExportTracePartialSuccess(rejected_spans=rejected, error_message=message)
    return bytes(ExportTraceServiceResponse(partial_success=partial).SerializeToString())
