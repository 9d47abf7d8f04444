"""Arrow columns for ClickHouse: the map columns built from flat lists equal per-row conversion
and read back from the real engine exactly."""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa

from processors.chain import CallPipeline
from schemas.prices import builtin_price_table
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
