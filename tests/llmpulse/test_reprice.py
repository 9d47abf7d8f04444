"""Re-pricing on the real engine: costs to the cent against hand-computed figures, client costs
untouched, newly priced models, the minute rollups rebuilt, history kept, reruns a no-op."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from llmpulse.reprice import reprice
from llmpulse.runtime import EmbeddedRuntime
from schemas.prices import ModelPrice, PriceTable, builtin_price_table
from sinks.rollups import compare
from tests.conftest import NOW, batch, call, iso
from tests.llmpulse.test_cli import ENV

START, END = NOW - 3 * 86400, NOW


def new_prices() -> PriceTable:
    """gpt-4o doubles ($5 in, $2.50 cached, $20 out per 1M tokens); acme-x gets a price."""
    table = builtin_price_table().model_copy(deep=True)
    table.price_version = "test-2026.12"
    table.models["gpt-4o"] = ModelPrice(provider="openai", input=5.0, cached_input=2.5, output=20.0)
    table.models["acme-x"] = ModelPrice(provider="acme", input=1.0, output=2.0)
    return table


def events() -> list[dict[str, Any]]:
    out = []
    for i in range(30):  # 1,000 in (400 cached) / 200 out, over two days
        out.append(
            call(request_id=f"g{i}", model="gpt-4o", cached_input_tokens=400, ts=iso(NOW - 2 * 86400 + i * 3000))
        )
    out.append(call(request_id="client", model="gpt-4o", cost_usd=0.5, ts=iso(NOW - 86400)))
    out.append(call(request_id="acme", model="acme-x", input_tokens=10_000, output_tokens=5_000, ts=iso(NOW - 3600)))
    out.append(call(request_id="mini", model="gpt-4o-mini", ts=iso(NOW - 3600)))
    return out


def seed(settings: Any, conn: Any) -> None:
    runtime = EmbeddedRuntime(settings, conn)
    runtime.ingest(batch([orjson.dumps(e) for e in events()]), now=NOW)
    runtime.finish()
    runtime.close()


def costs(conn: Any) -> dict[str, tuple[float | None, str, str]]:
    rows = conn.client.query("SELECT request_id, cost_usd, cost_source, price_version FROM llm_calls FINAL")
    return {r[0]: (None if r[1] is None else round(r[1], 9), r[2], r[3]) for r in rows.result_rows}


def test_reprice_to_the_cent_with_history_and_rollups(settings: Any, conn: Any) -> None:
    seed(settings, conn)
    before = costs(conn)
    # built-in gpt-4o: 600 × $2.50 + 400 × $1.25 + 200 × $10 per 1M = $0.0040
    assert before["g0"] == (0.004, "computed", "builtin-2025.11.3")
    assert before["acme"] == (None, "missing", "builtin-2025.11.3")

    stats = reprice(conn, new_prices(), START, END)
    # new gpt-4o: 600 × $5 + 400 × $2.50 + 200 × $20 per 1M = $0.0080; acme-x: 10k × $1 + 5k × $2 = $0.02
    assert (stats.scanned, stats.changed, stats.newly_priced, stats.still_unpriced) == (32, 32, 1, 0)
    assert stats.by_model["gpt-4o"] == (30, pytest.approx(0.12), pytest.approx(0.24), 0, 0.0)
    assert stats.by_model["acme-x"] == (1, 0.0, 0.0, 1, pytest.approx(0.02))
    assert stats.fresh_cost_usd == pytest.approx(0.02) and stats.old_cost_usd == pytest.approx(0.12 + before["mini"][0])
    after = costs(conn)
    assert after["g7"] == (0.008, "computed", "test-2026.12")
    assert after["acme"] == (0.02, "computed", "test-2026.12")
    assert after["client"] == (0.5, "client", "builtin-2025.11.3")  # the client's figure is its own
    mini = before["mini"][0]
    assert after["mini"] == (mini, "computed", "test-2026.12")  # unchanged price, new version stamp

    total = conn.client.query("SELECT sum(cost_usd) FROM llm_calls_1m").result_rows[0][0]
    assert total == pytest.approx(0.24 + 0.5 + 0.02 + (mini or 0), abs=1e-6)
    assert conn.client.command("SELECT sum(price_missing) FROM llm_calls_1m") == 0
    assert compare(conn, "llm_calls_1m", START, END) == []
    history = conn.client.query(
        "SELECT old_price_version, new_price_version, count(), round(sum(ifNull(old_cost_usd, 0)), 6), "
        "round(sum(new_cost_usd), 6) FROM cost_history GROUP BY ALL"
    ).result_rows
    assert history == [("builtin-2025.11.3", "test-2026.12", 32, pytest.approx(0.12 + (mini or 0)),
                        pytest.approx(0.26 + (mini or 0)))]  # fmt: skip

    again = reprice(conn, new_prices(), START, END)
    assert (again.scanned, again.changed) == (0, 0)
    assert costs(conn) == after


def test_a_table_without_a_model_keeps_its_calls_cost(settings: Any, conn: Any) -> None:
    """A partial table (a LiteLLM import of one provider) is no reason to forget a price: the
    calls keep their cost and version, and are counted as kept, not as "still without a price"."""
    seed(settings, conn)
    before = costs(conn)
    table = new_prices()
    del table.models["gpt-4o-mini"]
    stats = reprice(conn, table, START, END)
    assert (stats.scanned, stats.changed, stats.newly_priced, stats.still_unpriced, stats.kept) == (32, 31, 1, 0, 1)
    assert costs(conn)["mini"] == before["mini"] and before["mini"][0] is not None


def test_dry_run_writes_nothing(settings: Any, conn: Any) -> None:
    seed(settings, conn)
    before = costs(conn)
    stats = reprice(conn, new_prices(), START, END, dry_run=True)
    assert stats.changed == 32
    assert costs(conn) == before
    assert conn.client.command("SELECT count() FROM cost_history") == 0


def test_reprice_cli(tmp_path: Path) -> None:
    data, file, prices = tmp_path / "d", tmp_path / "events.jsonl", tmp_path / "prices.json"
    import time

    now = time.time()
    lines = [call(request_id=f"g{i}", model="gpt-4o", ts=iso(now - 7200 - i)) for i in range(10)]
    file.write_text("\n".join(orjson.dumps(e).decode() for e in lines) + "\n")
    prices.write_text(new_prices().model_dump_json())
    cli = [sys.executable, "-m", "llmpulse.cli"]
    subprocess.run([*cli, "replay", str(file), "--data-dir", str(data)], check=True, capture_output=True, env=ENV)
    wrong = subprocess.run([*cli, "reprice", "--since", "1d", "--prices", str(prices), "--price-version", "v9",
                            "--data-dir", str(data)], capture_output=True, text=True, env=ENV, check=False)  # fmt: skip
    assert wrong.returncode == 2 and "is price version 'test-2026.12', not 'v9'" in wrong.stderr
    litellm = tmp_path / "model_prices_and_context_window.json"
    litellm.write_text(
        json.dumps(
            {
                "sample_spec": {"input_cost_per_token": 0},
                "gpt-4o": {
                    "litellm_provider": "openai",
                    "mode": "chat",
                    "input_cost_per_token": 5e-06,
                    "output_cost_per_token": 2e-05,
                },
            }
        )
    )
    raw = subprocess.run([*cli, "reprice", "--since", "1d", "--prices", str(litellm), "--data-dir", str(data)],
                         capture_output=True, text=True, env={**ENV, "COLUMNS": "300"}, check=False)  # fmt: skip
    assert raw.returncode == 2 and "this is LiteLLM's model_prices_and_context_window.json" in raw.stderr
    assert f"llmpulse prices import {litellm} --out prices.json" in raw.stderr
    run = subprocess.run([*cli, "reprice", "--since", "1d", "--until", "0s", "--prices", str(prices),
                          "--price-version", "test-2026.12", "--data-dir", str(data)],
                         capture_output=True, text=True, env={**ENV, "COLUMNS": "200"}, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Repriced 10 of 10 calls to price version test-2026.12" in run.stdout
    assert "Total: $0.0450 → $0.0900" in run.stdout  # 10 × $0.0045 → 10 × $0.0090
    rows = subprocess.run([*cli, "query", "SELECT round(sum(cost_usd), 6) c FROM llm_calls_1m", "--format", "json",
                           "--data-dir", str(data)], capture_output=True, text=True, env=ENV, check=True)  # fmt: skip
    assert json.loads(rows.stdout) == [{"c": 0.09}]


def test_one_hour_cache_writes_are_priced_at_ingest_and_repriced_at_their_rate(settings: Any, conn: Any) -> None:
    """claude-haiku-4-5, 1,000 raw + 4,000 five-minute + 6,000 one-hour writes in, 200 out: $1 ×
    1k + $1.25 × 4k + $2 × 6k + $5 × 200 per 1M = $0.019. The 1-hour writes are kept on the raw row,
    so a table that moves their rate to $3 reprices them: $0.025."""
    day = NOW - 10 * 86400  # a day no other test here writes or reprices
    event = call(request_id="hour-cache", model="claude-haiku-4-5", input_tokens=11_000, output_tokens=200,
                 cache_write_tokens=10_000, cache_write_1h_tokens=6_000, ts=iso(day))  # fmt: skip
    runtime = EmbeddedRuntime(settings, conn)
    runtime.ingest(batch([orjson.dumps(event)]), now=NOW)
    runtime.finish()
    runtime.close()
    stored = conn.client.query(
        "SELECT cache_write_tokens, cache_write_1h_tokens, cost_usd FROM llm_calls FINAL "
        "WHERE request_id = 'hour-cache'"
    ).result_rows
    assert stored == [(10_000, 6_000, pytest.approx(0.019))]
    table = builtin_price_table().model_copy(deep=True)
    table.price_version = "test-1h"
    table.models["claude-haiku-4-5"] = table.models["claude-haiku-4-5"].model_copy(update={"cache_write_1h": 3.0})
    stats = reprice(conn, table, day - 60, day + 60)
    assert (stats.changed, stats.new_cost_usd) == (1, pytest.approx(0.025))
    assert costs(conn)["hour-cache"] == (0.025, "computed", "test-1h")
