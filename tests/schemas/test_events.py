"""The documented schema (pydantic) and the hot-path decoder (msgspec) accept the same events."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from pydantic import ValidationError

from schemas.events import CallEvent, FeedbackEvent
from schemas.export import MODELS, OUT_DIR, render
from schemas.wire import WireCall, WireFeedback
from tests.conftest import call

REQUIRED = {"event_id", "ts", "feature", "model", "input_tokens", "output_tokens", "latency_ms", "status"}
DOCUMENTED = {  # the list, word for word
    "event_id",
    "ts",
    "service",
    "feature",
    "team",
    "tenant",
    "provider",
    "model",
    "response_model",
    "prompt_version",
    "variant",
    "request_id",
    "conversation_id",
    "user_id",
    "params",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "latency_ms",
    "ttft_ms",
    "cost_usd",
    "status",
    "refusal",
    "finish_reason",
    "error_type",
    "tool_calls",
    "prompt_hash",
    "prompt",
    "output",
    "output_chars",
    "schema_valid",
    "attributes",
    "trace_id",
    "fallback_from",
    "error_message",
    "adapter",
    "feature_view",
    "guardrail_version",
    "release",
    "schema_version",
}


def test_call_event_carries_every_documented_field() -> None:
    assert set(CallEvent.model_fields) >= DOCUMENTED
    required = {n for n, f in CallEvent.model_fields.items() if f.is_required()}
    assert required == REQUIRED


def test_exported_json_schema_is_current() -> None:
    for name in MODELS:
        committed = (OUT_DIR / f"{name}.schema.json").read_text()
        assert committed == render(name), f"run `python -m schemas.export`: {name} schema is stale"


def _props(schema: dict[str, Any]) -> dict[str, Any]:
    return schema["properties"]


@pytest.mark.parametrize(("model", "struct"), [(CallEvent, WireCall), (FeedbackEvent, WireFeedback)])
def test_wire_struct_mirrors_the_model(model: Any, struct: Any) -> None:
    doc = model.model_json_schema()
    (wire,), defs = msgspec.json.schema_components([struct])
    wire = defs[struct.__name__]
    assert set(_props(doc)) == set(_props(wire))
    assert set(doc.get("required", [])) == set(wire.get("required", []))

    def bounds(schema: dict[str, Any]) -> set[tuple[str, Any]]:
        out = set()
        for key in ("minimum", "maximum", "minLength", "maxLength", "maxProperties", "maxItems"):
            if key in schema:
                out.add((key, str(schema[key])))
        if "const" in schema:  # pydantic writes a one-value Literal as const, msgspec as enum
            out.add(("enum", str(sorted([schema["const"]]))))
        if "enum" in schema:
            out.add(("enum", str(sorted(schema["enum"]))))
        for sub in schema.get("anyOf", []):
            out |= bounds(sub)
        if "items" in schema and isinstance(schema["items"], dict):
            out |= {("items." + k, v) for k, v in bounds(schema["items"])}
        return out

    for name in _props(doc):
        assert bounds(_props(doc)[name]) == bounds(_props(wire)[name]), f"bounds of `{name}` differ"


GOOD = [
    call(),
    call(cached_input_tokens=400, cache_write_tokens=100, ttft_ms=120.5, params={"temperature": 0.3}),
    call(tool_calls=["search"], release={"index": "kb-7"}, attributes={"region": "eu", "shard": 3}),
    call(status="rate_limited", error_type="rate_limit", refusal=True, schema_valid=False),
]
BAD = [
    call(input_tokens=-1),
    call(status="weird"),
    call(ts="2026-11-18T10:00:00"),
    call(latency_ms=-3),
    call(model=None),
    call(output_tokens=1.5),
    call(cost_usd=-0.01),
    call(feature=""),
]


@pytest.mark.parametrize("event", GOOD)
def test_both_accept(event: dict[str, Any]) -> None:
    CallEvent.model_validate(event)
    msgspec.json.decode(msgspec.json.encode(event), type=WireCall)


@pytest.mark.parametrize("event", BAD)
def test_both_reject(event: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CallEvent.model_validate(event)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(event), type=WireCall)


def test_pydantic_keeps_unknown_fields_and_checks_cached_tokens() -> None:
    event = CallEvent.model_validate(call(region="eu"))
    assert event.model_extra == {"region": "eu"}
    with pytest.raises(ValidationError, match="must include cached"):
        CallEvent.model_validate(call(input_tokens=10, cached_input_tokens=11))


def test_feedback_needs_a_verdict() -> None:
    FeedbackEvent.model_validate({"request_id": "r", "ts": "2026-11-18T10:00:00Z", "thumbs": "down"})
    with pytest.raises(ValidationError, match="needs thumbs"):
        FeedbackEvent.model_validate({"request_id": "r", "ts": "2026-11-18T10:00:00Z"})
