"""Arrow columns for ClickHouse: the map columns built from flat lists equal per-row conversion
and read back from the real engine exactly."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson
import pyarrow as pa
import pytest

from processors import _native
from processors.chain import CallPipeline
from schemas.limits import MAX_TOKENS
from schemas.prices import builtin_price_table
from schemas.wire import LenientCall, LenientParams, WireCall, WireParams
from sinks import columns
from sinks.clickhouse import ClickHouseSink
from sinks.columns import _map_array
from tests.conftest import NOW, batch, payload

MAPS: list[dict[str, Any]] = [{}, {"region": "eu", "n": 3, "ok": True, "none": None, "pi": 2.5}, {}, {"k": "v"}, {}]


def test_map_columns_equal_converting_each_dict() -> None:
    text = [{k: v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in m.items()} for m in MAPS]
    expected = pa.array(text, type=pa.map_(pa.string(), pa.string()))
    assert _map_array(MAPS, as_text=True).equals(expected)
    assert _map_array([{}, {}]).equals(pa.array([{}, {}], type=pa.map_(pa.string(), pa.string())))
    assert _map_array([]).to_pylist() == []


def test_attributes_and_release_maps_read_back_exactly(settings: Any, conn: Any) -> None:
    calls = [payload(attributes=m, release={"dataset": f"d{i}"} if i % 2 else {}) for i, m in enumerate(MAPS)]
    processed = CallPipeline(builtin_price_table()).process(batch(calls), NOW)
    ClickHouseSink(conn).write([processed], processed.block_id)
    stored = {
        r[0]: (r[1], r[2]) for r in conn.client.query("SELECT event_id, attributes, release FROM llm_calls").result_rows
    }
    assert len(stored) == len(MAPS)
    for i, e in enumerate(processed.events):
        text = {k: v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in MAPS[i].items()}
        assert stored[e.event_id] == (text, {"dataset": f"d{i}"} if i % 2 else {})


def _in_python(helper: Callable[[list[Any]], Any], events: list[Any]) -> Any:
    """What ``helper`` gives without the C extension (its Python path)."""
    saved, columns._native = columns._native, None
    try:
        return helper(events)
    finally:
        columns._native = saved


def _python_columns(events: list[Any]) -> tuple[list[pa.Array], bool, bool]:
    return _in_python(columns._plain_columns, events)  # type: ignore[no-any-return]


def test_c_gathered_columns_equal_the_python_ones_value_for_value() -> None:
    """Every kind of value the structs hold: NULLs, empty and non-ASCII text, tool-call tuples,
    the bounds of each integer type, ints where floats go, nested params (absent, empty, partly
    set), and the lenient structs that events with unknown fields decode into (their slots are
    their own)."""
    events: list[WireCall] = []
    for i in range(300):
        kind = LenientCall if i % 7 == 0 else WireCall
        events.append(kind(
            event_id=f"e-{i}-é✓" if i % 3 else f"e-{i}", ts=datetime.fromtimestamp(NOW + i, UTC),
            feature="f", model="m", input_tokens=[0, 1, MAX_TOKENS][i % 3], output_tokens=i,
            latency_ms=float(i) if i % 2 else i, status="ok", schema_version=[1, 1000][i % 2],
            user_id=None if i % 4 else "", request_id="r" * (i % 5) or None, conversation_id="会話" if i % 6 else None,
            ttft_ms=None if i % 5 == 0 else i / 7, refusal=bool(i % 2), schema_valid=[None, True, False][i % 3],
            tool_calls=() if i % 3 else ("search", "計算", ""), output_chars=None if i % 2 else 4_000_000_000,
            error_message=None if i % 8 else "🔥 timed out", prompt_hash=f"p{i}",
            release={"dataset": "d"} if i == 150 else {}, attributes={"n": 1} if i == 299 else {},
            params=[None, WireParams(), WireParams(temperature=0.2, max_tokens=4_294_967_295),
                    LenientParams(top_p=1, temperature=0)][i % 4],
        ))  # fmt: skip
    for part in (events, events[:1], events[1:2], []):
        native = columns._from_buffers(len(part), _native.gather(part, WireCall, columns._GATHER_SPECS))  # no fallback
        python = _python_columns(part)
        assert native[1:] == python[1:]
        assert [a.type for a in native[0]] == [a.type for a in python[0]]
        for (name, _, _, _), a, b in zip(columns._GETTERS, native[0], python[0], strict=True):
            a.validate(full=True)
            assert a.equals(b), name
    assert columns._plain_columns(events)[1:] == (True, True)


def test_anything_the_c_path_does_not_expect_takes_the_python_path() -> None:
    """A struct built in code (not decoded) can hold what its annotation does not allow; the
    C path refuses it and the columns come out, or fail, exactly as from Python."""
    good = WireCall(event_id="e", ts=datetime.fromtimestamp(NOW, UTC), feature="f", model="m", input_tokens=1,
                    output_tokens=2, latency_ms=3.0, status="ok")  # fmt: skip
    # pyarrow takes a whole float for an int and bytes for text; the C path does not
    for odd in (msgspec.structs.replace(good, input_tokens=7.0), msgspec.structs.replace(good, event_id=b"e-2")):
        with pytest.raises(TypeError):
            _native.gather([good, odd], WireCall, columns._GATHER_SPECS)
        native, python = columns._plain_columns([good, odd]), _python_columns([good, odd])
        assert all(a.equals(b) for a, b in zip(native[0], python[0], strict=True))
    # an int no float holds exactly: pyarrow refuses it, and so does the C path
    huge = msgspec.structs.replace(good, latency_ms=2**53 + 1)
    with pytest.raises(TypeError):
        _native.gather([huge], WireCall, columns._GATHER_SPECS)
    with pytest.raises(pa.ArrowInvalid):
        columns._plain_columns([huge])
    bad = msgspec.structs.replace(good, output_tokens="many")
    with pytest.raises(pa.ArrowInvalid):
        _python_columns([good, bad])
    with pytest.raises(pa.ArrowInvalid):
        columns._plain_columns([good, bad])


def test_c_combinations_equal_a_dict_of_tuples() -> None:
    """Codes numbered in order of first appearance, and the distinct combinations, as the dict
    gives them: with NULLs, text of every width (Latin-1, BMP, astral) that differs only there,
    thousands of distinct combinations (the hash table probes), and a value that is not
    text (built in code), which takes the Python path."""
    good = WireCall(event_id="e", ts=datetime.fromtimestamp(NOW, UTC), feature="f", model="m", input_tokens=1,
                    output_tokens=2, latency_ms=3.0, status="ok")  # fmt: skip
    texts = ["a", "é", "a✓", "a😀", "", None]

    def varied(i: int) -> WireCall:
        team, tenant, error = texts[i % 6], texts[(i // 6) % 6], None if i % 2 else "timeout"
        return msgspec.structs.replace(good, feature=f"f{i % 3000}", team=team, tenant=tenant, error_type=error)

    events = [varied(i) for i in range(6000)]
    odd = [*events[:10], msgspec.structs.replace(good, team=7)]  # type: ignore[arg-type]
    for part in (events, events[:1], []):
        raw, distinct = _native.combine(part, WireCall, columns._LOW_CARDINALITY)  # no fallback
        codes, python = _python_combinations(part)
        assert pa.Array.from_buffers(pa.int32(), len(part), [None, pa.py_buffer(raw)]).equals(codes)
        assert distinct == python
    with pytest.raises(TypeError):
        _native.combine(odd, WireCall, columns._LOW_CARDINALITY)
    native, python = columns._combinations(odd), _python_combinations(odd)
    assert native[0].equals(python[0]) and native[1] == python[1]
    assert len(columns._combinations(events)[1]) == 6000  # features repeat every 3,000, with another team


def _python_combinations(events: list[Any]) -> tuple[pa.Array, list[Any]]:
    return _in_python(columns._combinations, events)  # type: ignore[no-any-return]


def test_a_member_descriptor_of_another_class_is_not_read() -> None:
    """A slot descriptor copied onto an unrelated class would point past its objects: refused."""

    class Big:
        __slots__ = ("a", "b", "c", "far")

    class Small:
        __slots__ = ("event_id",)

    Small.far = Big.__dict__["far"]  # type: ignore[attr-defined]
    small = Small()
    small.event_id = "x"
    with pytest.raises(TypeError, match="is not a slot"):
        _native.gather([small], Small, (("far", 0),))
    with pytest.raises(TypeError, match="is not a slot"):
        _native.combine([small], Small, ("far",))


def test_an_unset_slot_takes_the_python_path() -> None:
    """Python raises AttributeError for a slot never set; the C path refuses it rather than read NULL."""

    class Partial:
        __slots__ = ("event_id", "feature")

    event = Partial()
    event.event_id = "e"
    with pytest.raises(TypeError, match="is not set"):
        _native.gather([event], Partial, (("feature", 0),))
    with pytest.raises(TypeError, match="is not set"):
        _native.combine([event], Partial, ("feature",))
