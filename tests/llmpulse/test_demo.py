"""The demo's summary, read back from the rollups: spend per feature and team never shows an unknown as $0."""

from __future__ import annotations

from typing import Any

from llmpulse.demo import summarize
from sinks import queries
from tests.conftest import NOW, call, iso, run_embedded


def test_spend_of_a_scope_without_any_priced_call_is_unknown_not_zero(settings: Any, conn: Any) -> None:
    # gpt-4o: $2.50 per 1M input, $10 per 1M output. 100k in + 20k out = $0.25 + $0.20 = $0.45 a call.
    priced = {"input_tokens": 100_000, "output_tokens": 20_000, "ts": iso(NOW - 1200)}
    failed = {**priced, "input_tokens": 0, "output_tokens": 0, "status": "error"}  # priced, at $0
    calls = [
        call(feature="chat", team="cx", model="gpt-4o", **priced),
        call(feature="chat", team="cx", model="gpt-4o", **priced),
        call(feature="chat", team="cx", model="acme-llm-1", **priced),  # not in the price table
        call(feature="lab", team="research", model="acme-llm-1", **priced),
        call(feature="lab", team="research", model="acme-llm-2", **priced),
        call(feature="lab", team="ops", model="gpt-4o", **failed),
    ]
    run_embedded(settings, conn, calls, [])

    s = summarize(conn, NOW - 3600, NOW)

    assert s["cost_by_feature"] == {"chat": 0.9, "lab": 0.0}  # lab's one priced call failed: $0, and known
    assert s["cost_by_team"] == {"cx": 0.9, "ops": 0.0, "research": None}
    assert s["unpriced_by_feature"] == {"chat": 1, "lab": 2}
    assert s["unpriced_by_team"] == {"cx": 1, "research": 2}
    assert s["price_missing"] == 3 and s["cost_usd"] == 0.9
    by_feature = queries.run(conn.client, "cost_by_feature", start=int(NOW - 3600), end=int(NOW))
    assert {r["feature"]: r["teams"] for r in by_feature} == {"chat": "cx", "lab": "ops, research"}


def test_total_spend_of_calls_none_of_which_had_a_price_is_unknown(settings: Any, conn: Any) -> None:
    ts = iso(NOW - 1200)
    run_embedded(settings, conn, [call(feature="lab", team=None, model="acme-llm-1", ts=ts) for _ in range(3)], [])
    s = summarize(conn, NOW - 3600, NOW)
    assert (s["events"], s["price_missing"], s["cost_usd"]) == (3, 3, None)
    assert s["cost_by_feature"] == {"lab": None} and s["cost_by_team"] == {"": None}
    (row,) = queries.run(conn.client, "cost_by_feature", start=int(NOW - 3600), end=int(NOW))
    assert row["teams"] == ""  # a call without a team adds no empty name to the list
