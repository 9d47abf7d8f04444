"""The documented event schema: one ``CallEvent`` per LLM call, ``FeedbackEvent`` for user feedback.

These pydantic models are the schema of record: services build events with them, the JSON
Schema in ``schemas/jsonschema/`` is exported from them, and the hot-path decoder in
``schemas.wire`` is tested field by field against them. Unknown fields are not rejected
(schema changes are additive and producers may run ahead of consumers): the pipeline keeps
them in ``attributes``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from schemas import limits

Status = Literal["ok", "error", "timeout", "rate_limited"]
STATUSES: tuple[Status, ...] = ("ok", "error", "timeout", "rate_limited")

Id = Annotated[str, Field(min_length=1, max_length=limits.MAX_ID_CHARS)]
Name = Annotated[str, Field(min_length=1, max_length=limits.MAX_NAME_CHARS)]
Tokens = Annotated[int, Field(ge=0, le=limits.MAX_TOKENS)]
Millis = Annotated[float, Field(ge=0, le=limits.MAX_LATENCY_MS, allow_inf_nan=False)]
AttributeValue = str | int | float | bool | None


class CallParams(BaseModel):
    """Generation parameters as the service sent them to the provider."""

    model_config = ConfigDict(extra="allow")

    temperature: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] | None = None
    max_tokens: Tokens | None = None
    top_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None


class CallEvent(BaseModel):
    """One LLM call, published by the service that made it.

    Token semantics follow the OpenAI usage object and the OTel GenAI conventions:
    ``input_tokens`` counts *all* input tokens, including the ``cached_input_tokens`` read
    from a prompt cache and the ``cache_write_tokens`` written to it. (Anthropic reports
    cache reads and writes beside ``input_tokens``, Gemini thinking tokens beside its output:
    add them in before publishing; ``ingest.anthropic_usage``/``gemini_usage`` do.)
    """

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})

    kind: Literal["call"] = "call"
    schema_version: Annotated[int, Field(ge=1, le=1000)] = limits.SCHEMA_VERSION

    # required
    event_id: Id
    ts: AwareDatetime = Field(description="When the call started (RFC 3339 with offset, UTC preferred).")
    feature: Name
    model: Name = Field(description="The model the service asked for (may be an alias).")
    input_tokens: Tokens
    output_tokens: Tokens
    latency_ms: Millis = Field(description="Wall time from request sent to last byte received.")
    status: Status

    # who made the call
    service: Name | None = None
    team: Name | None = None
    tenant: Name | None = Field(None, description="Set by the ingest layer from the API key when there is one.")
    user_id: Id | None = None

    # what was called
    provider: Name | None = Field(None, description="Filled from the price table when absent.")
    response_model: Name | None = Field(None, description="The exact model version the provider served.")
    params: CallParams | None = None

    # release tuple
    prompt_version: Name | None = None
    variant: Name | None = Field(None, description="control, canary or shadow (or an experiment arm).")
    adapter: Name | None = None
    feature_view: Name | None = None
    guardrail_version: Name | None = None
    release: Annotated[dict[str, str], Field(max_length=limits.MAX_RELEASE_FIELDS)] = Field(
        default_factory=dict, description="Any further release inputs (retrieval index, router, judge...)."
    )

    # correlation
    request_id: Id | None = None
    conversation_id: Id | None = None
    trace_id: Id | None = None

    # usage and cost
    cached_input_tokens: Tokens = 0
    cache_write_tokens: Tokens = 0
    cache_write_1h_tokens: Tokens = Field(
        0,
        description="Of cache_write_tokens, those written to a 1-hour cache (Anthropic's ttl '1h'): billed at the "
        "1-hour write rate (2x input, against 1.25x for the default 5 minutes).",
    )
    ttft_ms: Millis | None = Field(None, description="Time to first token/chunk for streamed calls.")
    cost_usd: Annotated[float, Field(ge=0, le=limits.MAX_COST_USD, allow_inf_nan=False)] | None = Field(
        None, description="Client-computed cost. When present it wins over the price table and is flagged."
    )

    # outcome
    refusal: bool = False
    finish_reason: Name | None = None
    error_type: Name | None = None
    error_message: Annotated[str, Field(max_length=limits.MAX_ERROR_MESSAGE_CHARS)] | None = None
    tool_calls: Annotated[list[Name], Field(max_length=limits.MAX_TOOL_CALLS)] = Field(
        default_factory=list, description="Names of the tools the model called."
    )
    fallback_from: Name | None = Field(None, description="The provider this call fell back from.")
    schema_valid: bool | None = Field(None, description="Did a structured output validate against its schema?")

    # content (dropped by the pipeline unless content capture is enabled)
    prompt_hash: Id | None = None
    prompt: str | None = None
    output: str | None = None
    output_chars: Annotated[int, Field(ge=0, le=limits.MAX_OUTPUT_CHARS)] | None = None

    attributes: Annotated[dict[str, AttributeValue], Field(max_length=limits.MAX_ATTRIBUTES)] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _cached_tokens_within_input(self) -> CallEvent:
        if self.cached_input_tokens + self.cache_write_tokens > self.input_tokens:
            raise ValueError(
                "cached_input_tokens + cache_write_tokens exceed input_tokens: "
                "input_tokens must include cached reads and cache writes"
            )
        if self.cache_write_1h_tokens > self.cache_write_tokens:
            raise ValueError(
                "cache_write_1h_tokens exceed cache_write_tokens: cache_write_tokens counts every cache write, "
                "the 1-hour ones included"
            )
        return self


class FeedbackEvent(BaseModel):
    """A user's verdict on one call's output, joined to the call by ``request_id``."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})

    kind: Literal["feedback"] = "feedback"
    schema_version: Annotated[int, Field(ge=1, le=1000)] = limits.SCHEMA_VERSION
    request_id: Id
    ts: AwareDatetime
    event_id: Id | None = Field(None, description="Idempotency id; derived from request_id+ts+user when absent.")
    thumbs: Literal["up", "down"] | None = None
    rating: Annotated[int, Field(ge=1, le=limits.MAX_RATING)] | None = None
    comment: Annotated[str, Field(max_length=limits.MAX_ERROR_MESSAGE_CHARS)] | None = None
    user_id: Id | None = None
    feature: Name | None = None
    tenant: Name | None = None
    attributes: Annotated[dict[str, AttributeValue], Field(max_length=limits.MAX_ATTRIBUTES)] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _has_a_verdict(self) -> FeedbackEvent:
        if self.thumbs is None and self.rating is None:
            raise ValueError("feedback needs thumbs ('up'/'down') or a rating (1-5)")
        return self


class JudgeResult(BaseModel):
    """An LLM judge's score for one sampled call, published on ``llm.judge.results``.

    Only ``request_id`` ties it to its call: llmpulse copies the call's lineage (feature,
    release...) in at ingest. A judge may echo the lineage it was sent; llmpulse's own wins.
    """

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})

    kind: Literal["judge_result"] = "judge_result"
    schema_version: Annotated[int, Field(ge=1, le=1000)] = limits.SCHEMA_VERSION
    request_id: Id
    rubric: Name
    score: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    judge_model: Name
    ts: AwareDatetime
    event_id: Id | None = None
    rationale: Annotated[str, Field(max_length=limits.MAX_ERROR_MESSAGE_CHARS)] | None = None
    feature: Name | None = None
    release_id: Name | None = None
    attributes: Annotated[dict[str, AttributeValue], Field(max_length=limits.MAX_ATTRIBUTES)] = Field(
        default_factory=dict
    )
