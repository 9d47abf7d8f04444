"""Hot-path twins of ``schemas.events``: msgspec structs the pipeline decodes into.

pydantic validates ~300k events/s on one core here, msgspec ~1.2M/s; the pipeline's budget
for everything per event is ~6 µs, so the hot path decodes with these. They carry the same
fields, types and bounds as the pydantic models (``tests/schemas/test_wire.py`` compares
the two JSON Schemas). ``forbid_unknown_fields`` is deliberate: an unknown field sends that
one event down the slow path that moves it into ``attributes`` instead of dropping it.
``gc=False`` keeps 10k-event batches out of the cyclic GC, which otherwise costs 2-3×.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from schemas import limits

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.MAX_ID_CHARS)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.MAX_NAME_CHARS)]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=limits.MAX_TOKENS)]
Millis = Annotated[float, msgspec.Meta(ge=0, le=limits.MAX_LATENCY_MS)]
AwareTs = Annotated[datetime, msgspec.Meta(tz=True)]
AttributeValue = str | int | float | bool | None
Status = Literal["ok", "error", "timeout", "rate_limited"]


class WireParams(msgspec.Struct, forbid_unknown_fields=True, gc=False, omit_defaults=True):
    temperature: Annotated[float, msgspec.Meta(ge=0, le=10)] | None = None
    max_tokens: Tokens | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None


class WireCall(msgspec.Struct, forbid_unknown_fields=True, gc=False, omit_defaults=True):
    """Field order matches ``CallEvent``; see its docstrings for meaning."""

    event_id: Id
    ts: AwareTs
    feature: Name
    model: Name
    input_tokens: Tokens
    output_tokens: Tokens
    latency_ms: Millis
    status: Status

    kind: Literal["call"] = "call"
    schema_version: Annotated[int, msgspec.Meta(ge=1, le=1000)] = limits.SCHEMA_VERSION

    service: Name | None = None
    team: Name | None = None
    tenant: Name | None = None
    user_id: Id | None = None

    provider: Name | None = None
    response_model: Name | None = None
    params: WireParams | None = None

    prompt_version: Name | None = None
    variant: Name | None = None
    adapter: Name | None = None
    feature_view: Name | None = None
    guardrail_version: Name | None = None
    release: Annotated[dict[str, str], msgspec.Meta(max_length=limits.MAX_RELEASE_FIELDS)] = {}

    request_id: Id | None = None
    conversation_id: Id | None = None
    trace_id: Id | None = None

    cached_input_tokens: Tokens = 0
    cache_write_tokens: Tokens = 0
    cache_write_1h_tokens: Tokens = 0
    ttft_ms: Millis | None = None
    cost_usd: Annotated[float, msgspec.Meta(ge=0, le=limits.MAX_COST_USD)] | None = None

    refusal: bool = False
    finish_reason: Name | None = None
    error_type: Name | None = None
    error_message: Annotated[str, msgspec.Meta(max_length=limits.MAX_ERROR_MESSAGE_CHARS)] | None = None
    tool_calls: Annotated[tuple[Name, ...], msgspec.Meta(max_length=limits.MAX_TOOL_CALLS)] = ()
    fallback_from: Name | None = None
    schema_valid: bool | None = None

    prompt_hash: Id | None = None
    prompt: str | None = None
    output: str | None = None
    output_chars: Annotated[int, msgspec.Meta(ge=0, le=limits.MAX_OUTPUT_CHARS)] | None = None

    attributes: Annotated[dict[str, AttributeValue], msgspec.Meta(max_length=limits.MAX_ATTRIBUTES)] = {}


class WireFeedback(msgspec.Struct, forbid_unknown_fields=True, gc=False, omit_defaults=True):
    request_id: Id
    ts: AwareTs
    kind: Literal["feedback"] = "feedback"
    schema_version: Annotated[int, msgspec.Meta(ge=1, le=1000)] = limits.SCHEMA_VERSION
    event_id: Id | None = None
    thumbs: Literal["up", "down"] | None = None
    rating: Annotated[int, msgspec.Meta(ge=1, le=limits.MAX_RATING)] | None = None
    comment: Annotated[str, msgspec.Meta(max_length=limits.MAX_ERROR_MESSAGE_CHARS)] | None = None
    user_id: Id | None = None
    feature: Name | None = None
    tenant: Name | None = None
    attributes: Annotated[dict[str, AttributeValue], msgspec.Meta(max_length=limits.MAX_ATTRIBUTES)] = {}


class LenientParams(WireParams, forbid_unknown_fields=False):
    pass


class LenientCall(WireCall, forbid_unknown_fields=False):
    """Decodes a call that carries unknown fields, ignoring them (the validator keeps them)."""

    params: LenientParams | None = None


class LenientFeedback(WireFeedback, forbid_unknown_fields=False):
    pass


class WireJudgeResult(msgspec.Struct, forbid_unknown_fields=True, gc=False, omit_defaults=True):
    request_id: Id
    rubric: Name
    score: Annotated[float, msgspec.Meta(ge=0, le=1)]
    judge_model: Name
    ts: AwareTs
    kind: Literal["judge_result"] = "judge_result"
    schema_version: Annotated[int, msgspec.Meta(ge=1, le=1000)] = limits.SCHEMA_VERSION
    event_id: Id | None = None
    rationale: Annotated[str, msgspec.Meta(max_length=limits.MAX_ERROR_MESSAGE_CHARS)] | None = None
    feature: Name | None = None
    release_id: Name | None = None
    attributes: Annotated[dict[str, AttributeValue], msgspec.Meta(max_length=limits.MAX_ATTRIBUTES)] = {}


class LenientJudgeResult(WireJudgeResult, forbid_unknown_fields=False):
    pass


CALL_FIELDS: frozenset[str] = frozenset(WireCall.__struct_fields__)
PARAM_FIELDS: frozenset[str] = frozenset(WireParams.__struct_fields__)
FEEDBACK_FIELDS: frozenset[str] = frozenset(WireFeedback.__struct_fields__)
JUDGE_RESULT_FIELDS: frozenset[str] = frozenset(WireJudgeResult.__struct_fields__)
