"""What is rejected (with raw bytes, field path and reason) and what is accepted and flagged."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from processors.validate import ValidationLimits, decode_calls, decode_feedback, kind_of
from tests.conftest import NOW, batch, call, iso, payload

DECODE = decode_calls(ValidationLimits(max_age_s=90 * 86400))


def rejected(raw: bytes) -> tuple[str, str]:
    out = DECODE(batch([raw]), NOW)
    assert not out.events, f"expected a rejection, accepted {out.events}"
    assert len(out.dead) == 1
    letter = out.dead[0]
    assert letter.raw == raw  # byte for byte, for re-drive
    return letter.reason, letter.path


def test_valid_event_is_accepted_with_utc_timestamp() -> None:
    out = DECODE(batch([payload(ts="2026-11-18T13:00:00+01:00")]), NOW)
    assert len(out.events) == 1 and not out.dead
    assert out.ts == [datetime(2026, 11, 18, 12, 0, tzinfo=UTC).timestamp()]
    assert out.events[0].ts.utcoffset() is not None


@pytest.mark.parametrize(
    ("event", "path", "fragment"),
    [
        (call(input_tokens=-5), "$.input_tokens", ">= 0"),
        (call(output_tokens="200"), "$.output_tokens", "Expected `int`, got `str`"),
        (call(model=None), "$.model", "missing required field `model`"),
        (call(params={"temperature": 0.2}, event_id=None), "$.event_id", "missing required field `event_id`"),
        (
            call(status="exploded"),
            "$.status",
            "Invalid enum value 'exploded': expected one of 'ok', 'error', 'timeout', 'rate_limited'",
        ),
        (call(latency_ms=-1.0), "$.latency_ms", ">= 0"),
        (call(ts="2026-11-18T12:00:00"), "$.ts", "timezone component: end it with `Z` for UTC"),
        (call(feature=""), "$.feature", "length >= 1"),
        (call(input_tokens=10, cached_input_tokens=20), "$.cached_input_tokens", "must include cached"),
        (
            call(input_tokens=10, cache_write_tokens=4, cache_write_1h_tokens=5),
            "$.cache_write_1h_tokens",
            "cache_write_tokens counts every cache write, the 1-hour ones included",
        ),
        (call(tool_calls="search"), "$.tool_calls", "Expected `array`"),
        (call(params={"temperature": 99}), "$.params.temperature", "<= 10"),
        (call(output_chars=5_000_000_000), "$.output_chars", "<= 4294967295"),  # the column is UInt32
    ],
)
def test_invalid_fields_are_rejected_with_path_and_reason(event: dict, path: str, fragment: str) -> None:
    reason, got_path = rejected(orjson.dumps(event))
    assert got_path == path
    assert fragment in reason


def test_unparseable_json_is_rejected() -> None:
    reason, path = rejected(b'{"event_id": "a", "ts": ')
    assert reason.startswith("not valid JSON") and path == "$"


def test_nan_and_infinity_are_rejected() -> None:
    assert "not valid JSON" in rejected(payload().replace(b"850.0", b"NaN"))[0]
    assert "out of range" in rejected(payload().replace(b"850.0", b"1e400"))[0]


def test_invalid_utf8_is_rejected_with_its_position() -> None:
    raw = payload(feature="abc").replace(b'"abc"', b'"ab\xff"')
    reason, _ = rejected(raw)
    assert reason.startswith("not valid UTF-8: byte 0xff at position")


def test_not_an_object_is_rejected() -> None:
    reason, _ = rejected(b"[1, 2, 3]")
    assert "Expected `object`, got `array`" in reason


def test_timestamp_more_than_an_hour_ahead_is_rejected() -> None:
    reason, path = rejected(payload(ts=iso(NOW + 2 * 3600)))
    assert path == "$.ts"
    assert "2.0 h in the future (limit 1 h)" in reason
    ok = DECODE(batch([payload(ts=iso(NOW + 3000))]), NOW)  # 50 minutes ahead: a skewed clock, accepted
    assert len(ok.events) == 1


def test_timestamp_older_than_retention_is_rejected() -> None:
    reason, path = rejected(payload(ts=iso(NOW - 91 * 86400)))
    assert "older than raw retention (90 days)" in reason and path == "$.ts"


def test_oversized_payload_is_rejected_before_decoding() -> None:
    small = decode_calls(ValidationLimits(max_event_bytes=2048))
    raw = payload(prompt="x" * 5000)
    out = small(batch([raw]), NOW)
    assert out.dead[0].reason == f"payload is {len(raw)} bytes, over the 2048-byte limit"


def test_unknown_fields_are_kept_in_attributes() -> None:
    raw = payload(region="eu-west-1", shard=7, flags={"beta": True}, params={"temperature": 0.1, "seed": 42})
    out = DECODE(batch([raw]), NOW)
    assert not out.dead
    assert out.unknown_fields == 1
    e = out.events[0]
    assert e.attributes == {"region": "eu-west-1", "shard": 7, "flags": '{"beta":true}', "params.seed": 42}
    assert e.params is not None and e.params.temperature == 0.1


def test_explicit_attribute_wins_over_same_named_unknown_field() -> None:
    out = DECODE(batch([payload(region="from-field", attributes={"region": "explicit"})]), NOW)
    assert out.events[0].attributes == {"region": "explicit"}


def test_unknown_field_nested_beyond_the_depth_limit_is_rejected() -> None:
    deep: object = "leaf"
    for _ in range(20):
        deep = {"x": deep}
    reason, path = rejected(payload(blob=deep))
    assert reason == "nested deeper than 16 levels" and path == "$.blob"
    shallow: object = "leaf"
    for _ in range(10):
        shallow = [shallow]
    assert DECODE(batch([payload(blob=shallow)]), NOW).events


def test_extremely_deep_nesting_does_not_crash() -> None:
    raw = payload()[:-1] + b',"bomb":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    out = DECODE(batch([raw]), NOW)
    assert not out.events and len(out.dead) == 1


def test_one_bad_event_does_not_cost_the_batch() -> None:
    raws = [payload(), b"garbage", payload(input_tokens=-1), payload()]
    out = DECODE(batch(raws, first=100), NOW)
    assert len(out.events) == 2
    assert out.offsets == [100, 103]
    assert [d.offset for d in out.dead] == [101, 102]


def test_feedback_needs_a_verdict() -> None:
    decode = decode_feedback(ValidationLimits())
    good = orjson.dumps({"kind": "feedback", "request_id": "r1", "ts": iso(NOW - 5), "thumbs": "down"})
    bad = orjson.dumps({"kind": "feedback", "request_id": "r1", "ts": iso(NOW - 5)})
    out = decode(batch([good, bad]), NOW)
    assert len(out.events) == 1
    assert out.dead[0].reason == "feedback needs thumbs ('up'/'down') or a rating (1-5)"
    assert out.dead[0].kind == "feedback"
    sideways = orjson.dumps({"kind": "feedback", "request_id": "r1", "ts": iso(NOW - 5), "thumbs": "sideways"})
    (letter,) = decode(batch([sideways]), NOW).dead  # an optional field with a fixed set names the set too
    assert (letter.path, letter.reason) == ("$.thumbs", "Invalid enum value 'sideways': expected one of 'up', 'down'")


def test_a_mixed_stream_is_routed_by_kind() -> None:
    fb = orjson.dumps({"kind": "feedback", "request_id": "r1", "ts": iso(NOW), "rating": 4})
    judged = orjson.dumps({"kind": "judge_result", "request_id": "r1", "rubric": "helpful", "score": 0.8,
                           "judge_model": "gpt-4o", "ts": iso(NOW)})  # fmt: skip
    others: dict[str, Any] = {}
    calls = DECODE(batch([payload(), fb, payload(), judged]), NOW, others)
    assert calls.offsets == [0, 2] and others["feedback"].offsets == [1] and others["judge_result"].offsets == [3]
    assert not calls.dead


def test_a_mixed_batch_moves_other_kinds_aside_as_it_decodes_the_calls() -> None:
    """The call decoder reads every payload; only the ones it fails are tested for their kind,
    so each lands with its own kind's pipeline, rejects keep their own kind's reason, and the
    calls keep the block identity and count of the calls alone (as splitting first gave them)."""
    from processors.chain import CallPipeline
    from schemas.prices import builtin_price_table

    fb = orjson.dumps({"thumbs": "down", "kind": "feedback", "request_id": "r1", "ts": iso(NOW)})  # field unknown first
    judged = orjson.dumps({"kind": "judge_result", "request_id": "r1", "rubric": "helpful", "score": 0.8,
                           "judge_model": "gpt-4o", "ts": iso(NOW)})  # fmt: skip
    broken_fb = b'{"kind":"feedback","request_id":"r2",'  # cut off: the feedback DLQ's, not the calls'
    nested = payload(extra={"kind": "feedback"})  # a call whose unknown field mentions a kind
    payloads = [fb, payload(), payload(latency_ms=-1), judged, broken_fb, nested, payload()]
    mixed = batch(payloads, digest="run-1")

    others: dict[str, Any] = {}
    processed = CallPipeline(builtin_price_table()).process(mixed, NOW, others)
    assert others["feedback"].offsets == [0, 4] and others["judge_result"].offsets == [3]
    assert others["feedback"].digest == "run-1" and others["feedback"].source == mixed.source
    assert processed.offsets == [1, 5, 6] and [d.offset for d in processed.dead] == [2]
    assert processed.events[1].attributes == {"extra": '{"kind":"feedback"}'}
    assert kind_of(nested) == "feedback"  # a byte test alone sent it to feedback, whose decode rejected it
    assert processed.counters.received == 4
    calls_alone = batch([payloads[i] for i in (1, 2, 5, 6)], digest="run-1")
    calls_alone.offsets = [1, 2, 5, 6]
    assert processed.block_id == calls_alone.block_id != mixed.block_id
    dead_fb = decode_feedback(ValidationLimits())(others["feedback"], NOW).dead
    assert [(d.offset, d.kind) for d in dead_fb] == [(4, "feedback")] and "not valid JSON" in dead_fb[0].reason
