"""Hypothesis strategies for hostile call payloads, each paired with what DESIGN.md says must happen.

Every case is one payload and its expected fate: rejected into the DLQ with a given path and a
reason matching a pattern, or accepted (valid traffic; unknown models and unknown fields are
accepted and flagged, never rejected). Valid events are mixed in so the tests also prove that
bad neighbours cost good traffic nothing.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import strategies as st

from schemas import limits
from schemas.wire import CALL_FIELDS
from tests.conftest import iso

_ids = itertools.count()

REQUIRED = ("event_id", "ts", "feature", "model", "input_tokens", "output_tokens", "latency_ms", "status")
"""In WireCall's field order: msgspec names the first one missing."""
INT_FIELDS = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens")
FLOAT_FIELDS = ("latency_ms", "ttft_ms")
STR_FIELDS = ("event_id", "feature", "model", "team", "provider", "prompt_version", "request_id")
DEEP_PATH_LIMIT = 900
"""Past ~900 levels msgspec's own recursion limit stops the decode before the field is known: path ``$``."""


@dataclass(frozen=True)
class Case:
    payload: bytes
    accepted: bool
    category: str
    path: str = "$"
    reason: str = ""
    """A regular expression the dead letter's reason must match in full."""
    paths: tuple[str, ...] = ()
    """Alternatives to ``path`` where the engine may legitimately report either."""
    flag: str = ""
    """For accepted cases: ``price_missing`` or the attribute key an unknown field lands in."""

    def check(self, reason: str, path: str) -> None:
        assert path == self.path or path in self.paths, (self.category, path, self.path, reason, self.payload[:300])
        assert re.fullmatch(self.reason, reason, re.DOTALL), (self.category, reason, self.reason, self.payload[:300])


def valid_event(now: float, **overrides: Any) -> dict[str, Any]:
    event = {
        "event_id": f"h-{next(_ids):012d}",  # fixed width: draws that depend on the length stay deterministic
        "ts": iso(now - 300),
        "feature": "support-chat",
        "team": "cx",
        "model": "gpt-4o-mini",
        "input_tokens": 1000,
        "output_tokens": 200,
        "latency_ms": 850.0,
        "status": "ok",
    }
    event.update(overrides)
    return event


def _dumps(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event)


@st.composite
def valid(draw: st.DrawFn, now: float) -> Case:
    tokens = draw(st.integers(0, 100_000))
    event = valid_event(now, input_tokens=tokens, output_tokens=draw(st.integers(0, 10_000)),
                        latency_ms=draw(st.floats(0, 600_000, allow_nan=False)),
                        status=draw(st.sampled_from(["ok", "error", "timeout", "rate_limited"])),
                        feature=draw(st.text(min_size=1, max_size=limits.MAX_NAME_CHARS)))  # fmt: skip
    return Case(_dumps(event), True, "valid")


INT64 = st.integers(-(2**63), 2**63 - 1)
"""JSON numbers orjson can write: a larger int is the producer's encoder failing, not a payload."""
_SCALARS = st.one_of(st.booleans(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
WRONG_FOR = {
    "int": st.one_of(_SCALARS, st.lists(INT64, max_size=3), st.dictionaries(st.text(max_size=3), INT64,
                                                                                    max_size=2)),
    "float": st.one_of(st.booleans(), st.text(max_size=8), st.lists(INT64, max_size=3)),
    "str": st.one_of(INT64, st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                     st.lists(st.text(max_size=3), max_size=3)),
}  # fmt: skip
TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "array", dict: "object", type(None): "null"}


@st.composite
def wrong_type(draw: st.DrawFn, now: float) -> Case:
    """A value of another JSON type in a typed field; the reason names what arrived."""
    kind = draw(st.sampled_from(["int", "float", "str"]))
    field = draw(st.sampled_from({"int": INT_FIELDS, "float": FLOAT_FIELDS, "str": STR_FIELDS}[kind]))
    value = draw(WRONG_FOR[kind])
    got = TYPE_NAMES[type(value)]
    return Case(_dumps(valid_event(now, **{field: value})), False, "wrong type", f"$.{field}",
                rf"Expected `[^`]+`, got `{got}`")  # fmt: skip


@st.composite
def bad_number(draw: st.DrawFn, now: float) -> Case:
    """Negative, too large, NaN and infinite token counts and latencies."""
    how = draw(st.sampled_from(["negative int", "negative float", "too many tokens", "NaN", "Infinity", "1e400"]))
    if how == "negative int":
        field = draw(st.sampled_from(INT_FIELDS))
        event = valid_event(now, **{field: draw(st.integers(max_value=-1, min_value=-(2**63)))})
        return Case(_dumps(event), False, how, f"$.{field}", r"Expected `int` >= 0")
    if how == "negative float":
        field = draw(st.sampled_from(FLOAT_FIELDS))
        event = valid_event(now, **{field: draw(st.floats(max_value=-1e-9, allow_infinity=False))})
        return Case(_dumps(event), False, how, f"$.{field}", r"Expected `float` >= 0\.0")
    if how == "too many tokens":
        field = draw(st.sampled_from(INT_FIELDS[:2]))
        event = valid_event(now, **{field: draw(st.integers(limits.MAX_TOKENS + 1, 2**63 - 1))})
        return Case(_dumps(event), False, how, f"$.{field}", rf"Expected `int` <= {limits.MAX_TOKENS}")
    field = draw(st.sampled_from([*INT_FIELDS[:2], *FLOAT_FIELDS]))
    raw = _dumps(valid_event(now, **{field: 7})).replace(f'"{field}":7'.encode(), f'"{field}":{how}'.encode())
    if how == "1e400":
        return Case(raw, False, how, f"$.{field}", r"Number out of range")
    return Case(raw, False, how, "$", r"not valid JSON: .*")


@st.composite
def huge(draw: st.DrawFn, now: float, max_bytes: int) -> Case:
    how = draw(st.sampled_from(["long name", "long id", "long error", "over the size limit"]))
    if how == "over the size limit":
        filler = "x" * (max_bytes + draw(st.integers(0, 4096)))
        raw = _dumps(valid_event(now, error_message=filler))
        return Case(raw, False, how, "$", rf"payload is {len(raw)} bytes, over the {max_bytes}-byte limit")
    field, bound = {"long name": ("feature", limits.MAX_NAME_CHARS), "long id": ("event_id", limits.MAX_ID_CHARS),
                    "long error": ("error_message", limits.MAX_ERROR_MESSAGE_CHARS)}[how]  # fmt: skip
    text = draw(st.characters(min_codepoint=32, max_codepoint=0x10FFFF, blacklist_categories=("Cs",))) * (
        bound + draw(st.integers(1, 5000))
    )
    return Case(_dumps(valid_event(now, **{field: text})), False, how, f"$.{field}",
                rf"Expected `str( \| null)?` of length <= {bound}")  # fmt: skip


@st.composite
def too_deep(draw: st.DrawFn, now: float, max_depth: int) -> Case:
    """An unknown field nested past the depth limit (arrays, objects or both)."""
    depth = draw(st.integers(max_depth, 3000))
    key = draw(st.sampled_from(["blob", "context", "x_trace"]))
    shape = draw(st.sampled_from(["array", "object"]))
    value = ("[" * depth + "]" * depth) if shape == "array" else ('{"a":' * depth + "1" + "}" * depth)
    raw = _dumps(valid_event(now, **{key: 0})).replace(f'"{key}":0'.encode(), f'"{key}":{value}'.encode())
    paths = ("$",) if depth > DEEP_PATH_LIMIT else ()
    return Case(raw, False, "nesting beyond the depth limit", f"$.{key}",
                rf"nested deeper than {max_depth} levels", paths=paths)  # fmt: skip


BAD_UTF8 = (b"\xff", b"\xfe", b"\xc3(", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"\x80", b"\xe2\x82")


@st.composite
def invalid_utf8(draw: st.DrawFn, now: float) -> Case:
    field = draw(st.sampled_from(["feature", "model", "team", "blob"]))
    bad = draw(st.sampled_from(BAD_UTF8))
    raw = _dumps(valid_event(now, **{field: "ab\x00cd"}))
    at = raw.index(b"\\u0000")
    raw = raw[:at] + bad + raw[at + 6 :]
    return Case(raw, False, "invalid UTF-8", "$", rf"not valid UTF-8: byte 0x{bad[0]:02x} at position {at}")


@st.composite
def bad_time(draw: st.DrawFn, now: float, max_age_s: float) -> Case:
    how = draw(st.sampled_from(["future", "too old", "no timezone", "not a date", "year 0 or 10000"]))
    if how == "future":
        t = now + draw(st.floats(3600 + 600, 50 * 365 * 86400))  # 10 min of margin: the worker runs later
        return Case(_dumps(valid_event(now, ts=iso(t))), False, how, "$.ts",
                    r"timestamp \S+ is [\d.]+ h in the future \(limit 1 h\): check the producer's clock")  # fmt: skip
    if how == "too old":
        t = now - max_age_s - draw(st.floats(1, 40 * 365 * 86400))
        return Case(_dumps(valid_event(now, ts=iso(t))), False, how, "$.ts",
                    rf"timestamp \S+ is older than raw retention \({max_age_s / 86400:g} days\)")  # fmt: skip
    if how == "no timezone":
        return Case(
            _dumps(valid_event(now, ts=iso(now)[:-1])),
            False,
            how,
            "$.ts",
            r"Expected `datetime` with a timezone component: end it with `Z` for UTC or an offset .*",
        )
    if how == "not a date":
        text = draw(st.text(max_size=30).filter(lambda s: not re.match(r"\d{4}-", s)))
        return Case(_dumps(valid_event(now, ts=text)), False, how, "$.ts", r"Invalid RFC3339 encoded datetime")
    year = draw(st.sampled_from(["0000", "10000", "99999"]))
    return Case(
        _dumps(valid_event(now, ts=f"{year}-01-01T00:00:00Z")), False, how, "$.ts", r"Invalid RFC3339 encoded datetime"
    )


@st.composite
def missing(draw: st.DrawFn, now: float) -> Case:
    dropped = draw(st.sets(st.sampled_from(REQUIRED), min_size=1))
    event = {k: v for k, v in valid_event(now).items() if k not in dropped}
    first = next(f for f in REQUIRED if f in dropped)
    return Case(_dumps(event), False, "missing required field", f"$.{first}", rf"missing required field `{first}`")


@st.composite
def unparseable(draw: st.DrawFn, now: float) -> Case:
    how = draw(st.sampled_from(["truncated", "not an object", "garbage"]))
    raw = _dumps(valid_event(now))
    if how == "truncated":
        return Case(raw[: draw(st.integers(0, len(raw) - 1))], False, how, "$", r"not valid JSON: .*")
    if how == "not an object":
        value = draw(st.one_of(st.none(), st.booleans(), INT64, st.text(max_size=10),
                               st.lists(INT64, max_size=3)))  # fmt: skip
        return Case(orjson.dumps(value), False, how, "$", rf"Expected `object`, got `{TYPE_NAMES[type(value)]}`")
    garbage = draw(st.binary(min_size=1, max_size=200))
    reasons = (r"not valid JSON: .*|not valid UTF-8: .*|Expected `object`, got `\w+`"
               r"|missing required field `\w+`|nested deeper than \d+ levels")  # fmt: skip
    # garbage that happens to be a JSON object misses a required field: its path is that field's
    return Case(garbage, False, how, "$", f"({reasons})", paths=tuple(f"$.{f}" for f in REQUIRED))


@st.composite
def flagged(draw: st.DrawFn, now: float) -> Case:
    """Accepted and flagged, never rejected: an unknown model, or an unknown field kept in attributes."""
    if draw(st.booleans()):
        model = "unpriced-" + draw(st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=20))
        return Case(_dumps(valid_event(now, model=model)), True, "unknown model", flag="price_missing")
    key = draw(st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=40).filter(
        lambda k: k not in CALL_FIELDS))  # fmt: skip
    value = draw(st.one_of(INT64, st.text(max_size=50), st.booleans(), st.none(),
                           st.floats(allow_nan=False, allow_infinity=False),
                           st.lists(st.integers(0, 9), max_size=4)))  # fmt: skip
    return Case(_dumps(valid_event(now, **{key: value})), True, "unknown field", flag=key)


def cases(now: float, max_bytes: int, max_depth: int, max_age_s: float) -> st.SearchStrategy[Case]:
    """One hostile (or valid) case; about a fifth of them valid traffic."""
    return st.one_of(
        valid(now), wrong_type(now), bad_number(now), huge(now, max_bytes), too_deep(now, max_depth),
        invalid_utf8(now), bad_time(now, max_age_s), missing(now), unparseable(now), flagged(now), valid(now),
    )  # fmt: skip
