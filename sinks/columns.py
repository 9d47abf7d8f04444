"""Processed batches → Arrow tables shaped like the ClickHouse tables.

Why Arrow: ClickHouse parses an Arrow stream column by column. Measured here on chDB, 200k
call rows cost 0.31 s of CPU as ArrowStream against 1.07 s as JSONEachRow, and building the
columns from the decoded structs (one C-level ``pa.array`` per column) is cheaper than
serialising rows. The same bytes go to chDB and to a server over HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import accumulate, chain
from operator import attrgetter
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from processors.chain import ProcessedCalls, ProcessedFeedback, ProcessedJudgeResults
from processors.native import K_ANY_LEN, K_BOOL, K_F64, K_I32, K_I64, K_STR, K_STR_TUPLE, K_U16, K_U32, _native
from processors.quality import Lineage
from processors.records import DeadLetter
from schemas.wire import WireCall

_TS = pa.timestamp("ms", tz="UTC")
_STR = pa.string()
_DICT = pa.dictionary(pa.int32(), pa.string())
"""Low-cardinality text goes as Arrow dictionaries: ClickHouse maps them onto LowCardinality
columns without re-hashing every value (Arrow parse cost per row halves, measured)."""
_STR_MAP = pa.map_(pa.string(), pa.string())
_STR_LIST = pa.list_(pa.string())

# (column, arrow type) taken straight from the event struct's attribute of the same name
_EVENT_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("event_id", _STR),
    ("ts", _TS),
    ("schema_version", pa.uint16()),
    ("service", _DICT),
    ("feature", _DICT),
    ("team", _DICT),
    ("tenant", _DICT),
    ("user_id", _STR),
    ("provider", _DICT),
    ("model", _DICT),
    ("response_model", _DICT),
    ("prompt_version", _DICT),
    ("variant", _DICT),
    ("adapter", _DICT),
    ("feature_view", _DICT),
    ("guardrail_version", _DICT),
    ("release", _STR_MAP),
    ("request_id", _STR),
    ("conversation_id", _STR),
    ("trace_id", _STR),
    ("input_tokens", pa.uint32()),
    ("output_tokens", pa.uint32()),
    ("cached_input_tokens", pa.uint32()),
    ("cache_write_tokens", pa.uint32()),
    ("cache_write_1h_tokens", pa.uint32()),
    ("latency_ms", pa.float64()),
    ("ttft_ms", pa.float64()),
    ("status", _DICT),
    ("refusal", pa.bool_()),
    ("finish_reason", _DICT),
    ("error_type", _DICT),
    ("error_message", _STR),
    ("tool_calls", _STR_LIST),
    ("fallback_from", _DICT),
    ("schema_valid", pa.bool_()),
    ("prompt_hash", _STR),
    ("prompt", _STR),
    ("output", _STR),
    ("output_chars", pa.uint32()),
)
_LOW_CARDINALITY = tuple(name for name, typ in _EVENT_COLUMNS if typ == _DICT)
_COMBINATION = attrgetter(*_LOW_CARDINALITY)
_REQUIRED = frozenset({"event_id", "ts", "feature", "model", "input_tokens", "output_tokens", "latency_ms", "status"})


def _param(name: str) -> Callable[[WireCall], Any]:
    def get(e: WireCall) -> Any:
        return None if e.params is None else getattr(e.params, name)

    return get


# (column, getter, arrow type, field path): the columns read as they are from the event struct
_GETTERS: list[tuple[str, Callable[[WireCall], Any], pa.DataType, tuple[str, ...]]] = [
    *((name, attrgetter(name), typ, (name,)) for name, typ in _EVENT_COLUMNS
      if name not in ("release", "ts") and typ != _DICT),
    *((name, _param(name), typ, ("params", name))
      for name, typ in (("temperature", pa.float64()), ("max_tokens", pa.uint32()), ("top_p", pa.float64()))),
]  # fmt: skip


def _map_array(maps: list[dict[str, Any]], as_text: bool = False) -> pa.Array:
    """A Map(String, String) column from dicts (an empty dict is an empty map), built from flat
    key and value lists and offsets rather than by converting each dict: 0.56 against 1.13 µs per
    event carrying three attributes, and no slower when most are empty. ``as_text``: values that
    are not strings are stored as their JSON text (attributes may hold numbers, booleans, null)."""
    offsets = pa.array(list(accumulate(map(len, maps), initial=0)), type=pa.int32())
    values: list[Any] = list(chain.from_iterable(map(dict.values, maps)))
    if as_text:
        values = [v if isinstance(v, str) else orjson.dumps(v).decode() for v in values]
    keys = pa.array(list(chain.from_iterable(maps)), type=_STR)
    return pa.MapArray.from_arrays(offsets, keys, pa.array(values, type=_STR))


def calls_table(b: ProcessedCalls) -> pa.Table:
    """One batch's rows of ``llm_calls`` (``concat`` joins batches into an insert block)."""
    events: list[WireCall] = b.events
    n = len(events)
    is_kafka = b.source.kind == "kafka"

    arrays: list[pa.Array] = [epoch_ms(b.ts)]
    names: list[str] = ["ts"]
    for name, array in _low_cardinality_columns(events):
        names.append(name)
        arrays.append(array)
    plain, has_release, has_attributes = _plain_columns(events)
    for (name, _, _, _), array in zip(_GETTERS, plain, strict=True):
        if array.null_count == n and name not in _REQUIRED:
            continue  # all NULL: the column default fills it, at no cost per row
        names.append(name)
        arrays.append(array)
    if has_release:
        names.append("release")
        arrays.append(_map_array([e.release for e in events]))
    if has_attributes:
        names.append("attributes")
        arrays.append(_map_array([e.attributes for e in events], as_text=True))
    for name, values, typ in (
        ("release_id", b.release_ids, _DICT),
        ("cost_usd", b.costs.cost_usd, pa.float64()),
        ("cost_source", b.costs.cost_source, _DICT),
        ("price_version", [b.price_version] * n, _DICT),
        ("price_missing", b.costs.price_missing, pa.bool_()),
        ("source", [b.source.kind] * n, _DICT),
        ("kafka_partition", [b.source.partition if is_kafka else -1] * n, pa.int32()),
        ("kafka_offset", b.offsets if is_kafka else [-1] * n, pa.int64()),
    ):
        names.append(name)
        arrays.append(pa.array(values, type=typ))
    return pa.Table.from_arrays(arrays, names=names)


_KINDS = {_STR: K_STR, pa.int64(): K_I64, pa.uint32(): K_U32, pa.uint16(): K_U16, pa.int32(): K_I32,
          pa.float64(): K_F64, pa.bool_(): K_BOOL, _STR_LIST: K_STR_TUPLE}  # fmt: skip
"""Arrow type → the column kind ``processors._native.gather`` writes."""
_GATHER_SPECS = (
    *((*path[:1], _KINDS[typ], *path[1:]) for _, _, typ, path in _GETTERS),
    ("release", K_ANY_LEN),
    ("attributes", K_ANY_LEN),
)


def _plain_columns(events: list[WireCall]) -> tuple[list[pa.Array], bool, bool]:
    """The ``_GETTERS`` columns, and whether any event has a ``release`` / ``attributes`` entry.

    ``processors._native.gather`` (C, built with the package) reads each field at its slot
    (a nested one such as ``params.temperature`` too) and writes the Arrow buffers directly:
    0.48 against 1.90 µs per event for these ~25 columns, and 1.27 against 2.94 µs for the whole
    ``calls_table`` with ``combine`` (medians of seven alternating repeats over 50k demo calls in
    2,048-call parts). Without it, or on anything it does not expect, the same columns come from
    Python, value for value (``tests/sinks/test_columns.py``).
    """
    if _native is not None:
        try:
            gathered = _native.gather(events, WireCall, _GATHER_SPECS)
        except (TypeError, OverflowError, UnicodeError):
            pass  # a value it does not expect: the Python path below raises (or not) as it always did
        else:
            return _from_buffers(len(events), gathered)
    plain = [pa.array(list(map(getter, events)), type=typ) for _, getter, typ, _ in _GETTERS]
    return plain, any(e.release for e in events), any(e.attributes for e in events)


def _from_buffers(n: int, gathered: list[Any]) -> tuple[list[pa.Array], bool, bool]:
    *columns, has_release, has_attributes = gathered
    arrays: list[pa.Array] = []
    for (_, _, typ, _), (nulls, validity, *buffers) in zip(_GETTERS, columns, strict=True):
        valid = None if validity is None else pa.py_buffer(validity)
        if typ == _STR_LIST:
            offsets, child_offsets, data = map(pa.py_buffer, buffers)
            values = pa.Array.from_buffers(_STR, len(child_offsets) // 4 - 1, [None, child_offsets, data])
            arrays.append(pa.Array.from_buffers(typ, n, [valid, offsets], null_count=nulls, children=[values]))
        else:
            arrays.append(pa.Array.from_buffers(typ, n, [valid, *map(pa.py_buffer, buffers)], null_count=nulls))
    return arrays, has_release, has_attributes


def batch_columns(batch: ProcessedCalls) -> pa.Table:
    """The batch's raw-table columns, built once and kept on the batch.

    The writer asks for them as each batch is added, while its events are still in the CPU's
    cache: the same columns built at flush time, from five batches gone cold, cost 8.3 instead
    of 5.3 µs per row (measured on 200k calls). The metrics read them too, and a retried write
    reuses them.
    """
    if batch.columns is None:
        batch.columns = calls_table(batch)
    table: pa.Table = batch.columns
    return table


def _low_cardinality_columns(events: list[WireCall]) -> list[tuple[str, pa.Array]]:
    """The sixteen LowCardinality columns, from the few distinct combinations a batch holds.

    One C-level pass takes each event's combination (service, feature, team, model, status...)
    and one dict numbers the distinct ones, so the text is converted once per combination rather
    than once per event and column; each column is then an index ``take``. 0.95 against 1.9 µs
    per event converting the sixteen columns one by one (measured on 10k-event batches).
    """
    codes, distinct = _combinations(events)
    out: list[tuple[str, pa.Array]] = []
    for i, name in enumerate(_LOW_CARDINALITY):
        values = [c[i] for c in distinct]
        if name not in _REQUIRED and values.count(None) == len(values):
            continue  # all NULL: the column default fills it, at no cost per row
        encoded = pa.array(values, type=_STR).dictionary_encode()
        out.append((name, pa.DictionaryArray.from_arrays(pc.take(encoded.indices, codes), encoded.dictionary)))
    return out


def _combinations(events: list[WireCall]) -> tuple[pa.Array, list[tuple[str | None, ...]]]:
    """Each event's combination of the low-cardinality fields as an int32 code (numbered in order
    of first appearance), and the distinct combinations. ``processors._native.combine`` does in C what
    the dict below does: 0.27 against 0.65 µs per event (medians of seven alternating repeats
    over 50k demo calls in 2,048-call parts; what is left is mostly reading sixteen strings an
    event from memory)."""
    if _native is not None:
        try:
            raw, distinct = _native.combine(events, WireCall, _LOW_CARDINALITY)
        except TypeError:
            pass  # a value that is not text: the Python path below handles it as it always did
        else:
            return pa.Array.from_buffers(pa.int32(), len(events), [None, pa.py_buffer(raw)]), distinct
    combos: dict[tuple[str | None, ...], int] = {}
    number = combos.setdefault
    codes = pa.array([number(c, len(combos)) for c in map(_COMBINATION, events)], type=pa.int32())
    return codes, list(combos)


def epoch_ms(seconds: list[float]) -> pa.Array:
    """Epoch seconds (the validate step's ``ts``) → millisecond timestamps, as pyarrow truncates
    a ``datetime``: 30 ns per row against 270 ns converting the datetimes themselves.

    A float near 1.8e9 s is exact to 0.24 µs and a datetime carries whole microseconds, so
    adding half a microsecond before the floor recovers the truncated millisecond exactly.
    """
    ms = pc.floor(pc.add(pc.multiply(pa.array(seconds, type=pa.float64()), 1000.0), 0.0005))
    return ms.cast(pa.int64()).cast(_TS)


def concat(tables: list[pa.Table]) -> pa.Table:
    """One insert block from per-batch tables (``batch_columns``).

    A column a batch left out (all NULL there) comes back as NULLs, which the insert turns
    into the column default exactly as an omitted column. Each column becomes one chunk: the
    Arrow file format allows one dictionary per column, and the same block left chunked (with
    unified dictionaries) inserted 2-3x slower.
    """
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="default").combine_chunks()


def dlq_id(letter: DeadLetter) -> str:
    """Stable per rejected payload and position, so a re-driven or re-read payload dedupes."""
    s = letter.source
    head = f"{s.kind}\x1f{s.name}\x1f{s.partition}\x1f{letter.offset}\x1f".encode()
    return xxhash.xxh3_128_hexdigest(head + letter.raw)


def dlq_table(letters: list[DeadLetter]) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "dlq_id": [dlq_id(d) for d in letters],
            "kind": [d.kind for d in letters],
            "source": [d.source.kind for d in letters],
            "source_name": [d.source.name for d in letters],
            "source_partition": pa.array([d.source.partition for d in letters], type=pa.int32()),
            "source_offset": pa.array([d.offset for d in letters], type=pa.int64()),
            "reason": [d.reason for d in letters],
            "path": [d.path for d in letters],
            "raw": pa.array([d.raw for d in letters], type=pa.binary()),
            "raw_bytes": pa.array([len(d.raw) for d in letters], type=pa.uint32()),
        }
    )


def samples_table(batches: Iterable[ProcessedCalls]) -> pa.Table:
    rows: dict[str, list[Any]] = {
        k: []
        for k in (
            "event_id", "ts", "reason", "feature", "team", "tenant", "model", "provider", "prompt_version",
            "variant", "release_id", "request_id", "conversation_id", "status", "refusal", "prompt_hash",
            "prompt", "output",
        )
    }  # fmt: skip
    for b in batches:
        for s in b.samples:
            e = b.events[s.index]
            rows["event_id"].append(e.event_id)
            rows["ts"].append(e.ts)
            rows["reason"].append(s.reason)
            rows["feature"].append(e.feature)
            rows["team"].append(e.team)
            rows["tenant"].append(e.tenant)
            rows["model"].append(e.model)
            rows["provider"].append(e.provider)
            rows["prompt_version"].append(e.prompt_version)
            rows["variant"].append(e.variant)
            rows["release_id"].append(b.release_ids[s.index])
            rows["request_id"].append(e.request_id)
            rows["conversation_id"].append(e.conversation_id)
            rows["status"].append(e.status)
            rows["refusal"].append(e.refusal)
            rows["prompt_hash"].append(e.prompt_hash)
            rows["prompt"].append(e.prompt)
            rows["output"].append(e.output)
    types = {"ts": _TS, "refusal": pa.bool_()}
    return pa.Table.from_arrays([pa.array(v, type=types.get(k, _STR)) for k, v in rows.items()], names=list(rows))


def _lineage_columns(request_ids: list[str], lineage: Mapping[str, Lineage]) -> dict[str, pa.Array]:
    found = [lineage.get(r) for r in request_ids]
    return {
        "event_id": pa.array([x.event_id if x else "" for x in found], type=_STR),
        "call_ts": pa.array([x.call_ts if x else None for x in found], type=_TS),
        "team": pa.array([x.team if x else "" for x in found], type=_DICT),
        "model": pa.array([x.model if x else "" for x in found], type=_DICT),
        "prompt_version": pa.array([x.prompt_version if x else "" for x in found], type=_DICT),
        "variant": pa.array([x.variant if x else "" for x in found], type=_DICT),
        "release_id": pa.array([x.release_id if x else "" for x in found], type=_DICT),
    }


def relinked_feedback_table(rows: list[dict[str, Any]], lineage: Mapping[str, Lineage]) -> pa.Table:
    """Feedback rows read back from ClickHouse, written again with their calls' lineage (later
    ``ingested_at``: the ReplacingMergeTree keeps these); ``feature`` as the caller settled it."""
    ids = [r["request_id"] for r in rows]
    return pa.Table.from_pydict(
        {
            **_lineage_columns(ids, lineage),
            "feedback_id": pa.array([r["feedback_id"] for r in rows], type=_STR),
            "request_id": pa.array(ids, type=_STR),
            "ts": pa.array([r["ts"] for r in rows], type=_TS),
            "thumbs": pa.array([r["thumbs"] for r in rows], type=_STR),
            "rating": pa.array([r["rating"] for r in rows], type=pa.uint8()),
            "comment": pa.array([r["comment"] for r in rows], type=_STR),
            "user_id": pa.array([r["user_id"] for r in rows], type=_STR),
            "feature": pa.array([r["feature"] for r in rows], type=_STR),
            "tenant": pa.array([r["tenant"] for r in rows], type=_STR),
            "attributes": _map_array([dict(r["attributes"]) for r in rows]),
        }
    )


def judge_scores_table(batches: Iterable[ProcessedJudgeResults], lineage: Mapping[str, Lineage]) -> pa.Table:
    results = [r for b in batches for r in b.events]
    ids = [r.request_id for r in results]
    found = [lineage.get(i) for i in ids]
    columns = _lineage_columns(ids, lineage)
    columns["event_id"] = pa.array(
        [x.event_id if x else (r.event_id or "") for x, r in zip(found, results, strict=True)]
    )
    return pa.Table.from_pydict(
        {
            "request_id": pa.array(ids, type=_STR),
            "rubric": pa.array([r.rubric for r in results], type=_DICT),
            "score": pa.array([r.score for r in results], type=pa.float64()),
            "judge_model": pa.array([r.judge_model for r in results], type=_DICT),
            "ts": pa.array([r.ts for r in results], type=_TS),
            "feature": pa.array([x.feature if x else (r.feature or "") for x, r in zip(found, results, strict=True)],
                                type=_DICT),
            "provider": pa.array([x.provider if x else "" for x in found], type=_DICT),
            "rationale": pa.array([r.rationale for r in results], type=_STR),
            "sample_reason": pa.array([x.sample_reason if x else "" for x in found], type=_DICT),
            **columns,
        }
    )  # fmt: skip


def feedback_table(batches: Iterable[ProcessedFeedback], lineage: Mapping[str, Lineage] | None = None) -> pa.Table:
    events = [e for b in batches for e in b.events]
    known = lineage or {}
    extra = _lineage_columns([e.request_id for e in events], known)
    return pa.Table.from_pydict(
        {
            **extra,
            "feedback_id": pa.array([e.event_id for e in events], type=_STR),
            "request_id": pa.array([e.request_id for e in events], type=_STR),
            "ts": pa.array([e.ts for e in events], type=_TS),
            "thumbs": pa.array([e.thumbs for e in events], type=_STR),
            "rating": pa.array([e.rating for e in events], type=pa.uint8()),
            "comment": pa.array([e.comment for e in events], type=_STR),
            "user_id": pa.array([e.user_id for e in events], type=_STR),
            "feature": pa.array(
                [e.feature or (known[e.request_id].feature if e.request_id in known else None) for e in events],
                type=_STR,
            ),
            "tenant": pa.array([e.tenant for e in events], type=_STR),
            "attributes": _map_array([e.attributes for e in events], as_text=True),
        }
    )
