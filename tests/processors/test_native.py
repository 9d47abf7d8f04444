"""processors._native (C) against the Python it replaces: the validate step gives the same events,
offsets, timestamps (to the bit), dead letters and routing either way, on a batch of everything it
sees. The column helpers are compared in tests/sinks/test_columns.py."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import orjson
import pytest

from processors import _native, validate
from processors.records import DeadLetter
from processors.validate import ValidationLimits, decode_calls, decode_feedback
from schemas.wire import WireCall
from tests.conftest import NOW, batch, iso, payload


def test_the_c_extension_is_built_with_the_package() -> None:
    """The suite runs where a C compiler is (pip builds processors/_native.c): the C path is tested."""
    assert validate._native is not None, "processors/_native.c was not built: pip install -e '.[test]' again"


def _letters(dead: list[DeadLetter]) -> list[tuple[Any, ...]]:
    return [(d.raw, d.reason, d.path, d.offset, d.kind) for d in dead]


def _both(run: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    native = run()
    with monkeypatch.context() as m:
        m.setattr(validate, "_native", None)
        python = run()
    return native, python


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"a": value}
    return value


def hostile() -> list[bytes]:
    """Valid calls with every kind of failure between them, in a shuffled but fixed order."""
    good = [payload(event_id=f"ok-{i}", ts=iso(NOW - 600 + i * 0.001234)) for i in range(200)]
    zones = (timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-1)), UTC)
    odd_times = [payload(ts=datetime.fromtimestamp(NOW - 3600 + 0.999999, z).isoformat()) for z in zones]
    odd_times.append(payload(ts=iso(NOW - 7200).replace("Z", "+00:00")))
    bad = [
        b"{not json",
        b'{"event_id": "x\xff"}',
        payload(input_tokens=-1),
        payload(model=None),
        payload(cached_input_tokens=900, cache_write_tokens=200),  # 1,100 > 1,000 input tokens
        payload(extra_field="kept", nested={"a": {"b": 1}}),  # unknown fields: accepted, moved to attributes
        payload(deep=_nested(20)),  # unknown and deeper than the 16-level limit
        payload(unknown=1, cached_input_tokens=2000),  # unknown fields, then the check rejects it
        payload(ts=iso(NOW + 10 * 86400)),  # in the future
        payload(ts=iso(NOW - 400 * 86400)),  # older than raw retention
        payload(prompt="x" * 5000),  # over the size limit below
        orjson.dumps({"kind": "feedback", "request_id": "r-1", "ts": iso(NOW - 60), "thumbs": "down"}),
        orjson.dumps({"kind": "feedback", "request_id": "r-2", "ts": iso(NOW - 60)}),  # feedback, but invalid
        b"[]",
        b"",
    ]
    everything = good + odd_times + bad
    random.Random(7).shuffle(everything)
    return everything


def test_decode_over_a_hostile_batch_equals_the_python_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    decode = decode_calls(ValidationLimits(max_event_bytes=4096))
    payloads = hostile()

    def run() -> Any:
        others: dict[str, Any] = {}
        out = decode(batch(payloads, first=100), NOW, others)
        return out, {k: (b.payloads, b.offsets) for k, b in others.items()}

    (native, n_others), (python, p_others) = _both(run, monkeypatch)
    assert native.events == python.events and native.offsets == python.offsets
    assert native.ts == python.ts  # exactly: datetime.timestamp()'s own rounding
    assert _native.timestamps(native.events, WireCall, "ts") == native.ts  # the C path, not its fallback
    assert _letters(native.dead) == _letters(python.dead)
    assert native.unknown_fields == python.unknown_fields == 2  # counted once decoded, before the check
    assert n_others == p_others and len(n_others["feedback"][0]) == 2
    assert len(native.events) == 205  # 200 + 4 odd times + the one with unknown fields
    reasons = {d.reason.split(":")[0].split(" (")[0] for d in native.dead}
    assert len(native.dead) == 12, reasons
    offsets = [d.offset for d in native.dead]
    assert offsets[:-2] == sorted(offsets[:-2])  # payload order (range checks come after, as before)


def test_timestamps_equal_datetime_timestamp_to_the_bit() -> None:
    rng = random.Random(3)
    zones = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-11))]
    stamps = [datetime(1970, 1, 1, tzinfo=UTC), datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
              datetime(2000, 2, 29, 12, tzinfo=UTC), datetime(2100, 3, 1, tzinfo=UTC),
              datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(1, 1, 1, tzinfo=UTC)]  # fmt: skip
    stamps += [
        datetime.fromtimestamp(rng.uniform(0, 4e9), UTC).replace(microsecond=rng.randrange(10**6)).astimezone(z)
        for z in zones
        for _ in range(3000)
    ]
    events = [msgspec.structs.replace(_CALL, ts=t) for t in stamps]
    assert _native.timestamps(events, WireCall, "ts") == [t.timestamp() for t in stamps]  # no fallback


_CALL = msgspec.json.decode(payload(), type=WireCall)


def test_feedback_check_and_routing_are_the_same_in_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    decode = decode_feedback(ValidationLimits())
    payloads = [orjson.dumps({"kind": "feedback", "request_id": f"r{i}", "ts": iso(NOW - 5),
                              **({"thumbs": "up"} if i % 3 else {})}) for i in range(30)] + [payload()]  # fmt: skip

    def run() -> Any:
        others: dict[str, Any] = {}
        out = decode(batch(payloads), NOW, others)
        return out.events, out.offsets, _letters(out.dead), {k: b.offsets for k, b in others.items()}

    native, python = _both(run, monkeypatch)
    assert native == python
    assert len(native[2]) == 10 and native[3] == {"call": [30]}
