from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from schemas.prices import PriceError, builtin_price_table, from_litellm, load_price_table, merge_tables

LITELLM_SAMPLE = {
    "sample_spec": {"input_cost_per_token": 0},
    "gpt-4o": {
        "litellm_provider": "openai", "mode": "chat",
        "input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05, "cache_read_input_token_cost": 1.25e-06,
    },
    "claude-sonnet-4-5": {
        "litellm_provider": "anthropic", "mode": "chat",
        "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
        "cache_read_input_token_cost": 3e-07, "cache_creation_input_token_cost": 3.75e-06,
        "cache_creation_input_token_cost_above_1hr": 6e-06,
        "input_cost_per_token_above_200k_tokens": 6e-06, "output_cost_per_token_above_200k_tokens": 2.25e-05,
    },
    "text-embedding-3-small": {"litellm_provider": "openai", "mode": "embedding", "input_cost_per_token": 2e-08},
    "dall-e-3": {"litellm_provider": "openai", "mode": "image_generation"},
}  # fmt: skip


def test_builtin_table_covers_the_major_providers() -> None:
    table = builtin_price_table()
    providers = {p.provider for p in table.models.values()}
    assert {"openai", "anthropic", "google"} <= providers
    assert table.models["gpt-4o"].cached_input == 1.25
    assert table.price_version


def test_litellm_import_converts_per_token_to_per_million() -> None:
    table = from_litellm(LITELLM_SAMPLE, source="sample.json")
    assert set(table.models) == {"gpt-4o", "claude-sonnet-4-5"}  # chat models with both rates only
    sonnet = table.models["claude-sonnet-4-5"]
    assert (sonnet.input, sonnet.output, sonnet.cached_input, sonnet.cache_write) == (3.0, 15.0, 0.3, 3.75)
    assert sonnet.cache_write_1h == 6.0 and table.models["gpt-4o"].cache_write_1h is None
    assert sonnet.long_context is not None
    assert (sonnet.long_context.above_input_tokens, sonnet.long_context.input) == (200_000, 6.0)
    assert table.models["gpt-4o"].cache_write is None  # falls back to the input rate, never 0
    assert table.price_version.startswith("litellm-")
    assert from_litellm(LITELLM_SAMPLE, source="x").price_version == table.price_version  # content hash


def test_litellm_tiers_at_any_threshold_with_what_they_leave_out_filled_in() -> None:
    """LiteLLM lists tiers above 128k, 200k, 256k, 272k tokens; only 200k was read, so a 300k-token
    call of a 272k-tier model was billed at the base rates, half its cost."""
    from processors.pricing import CostAttribution
    from schemas.wire import WireCall
    from tests.conftest import payload

    entries = {
        "big-272k": {  # per 1M: 2.5 / 15 below, 5 / 22.5 above 272k
            "litellm_provider": "openai", "mode": "chat",
            "input_cost_per_token": 2.5e-06, "output_cost_per_token": 1.5e-05, "cache_read_input_token_cost": 2.5e-07,
            "input_cost_per_token_above_272k_tokens": 5e-06, "output_cost_per_token_above_272k_tokens": 2.25e-05,
        },
        "two-tiers": {  # the lower tier is kept; no tier output rate: the base one
            "litellm_provider": "x", "mode": "chat", "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,
            "input_cost_per_token_above_256k_tokens": 3e-06, "input_cost_per_token_above_128k_tokens": 2e-06,
        },
        "vertex-gemini": {  # a tier write rate and no base one: writes stay at the input rates
            "litellm_provider": "vertex_ai", "mode": "chat",
            "input_cost_per_token": 1.25e-06, "output_cost_per_token": 1e-05,
            "input_cost_per_token_above_200k_tokens": 2.5e-06, "output_cost_per_token_above_200k_tokens": 1.5e-05,
            "cache_creation_input_token_cost_above_200k_tokens": 2.5e-07,
        },
    }  # fmt: skip
    table = from_litellm(entries, source="tiers.json")
    big, two, vertex = (table.models[k].long_context for k in ("big-272k", "two-tiers", "vertex-gemini"))
    assert big is not None and (big.above_input_tokens, big.input, big.output) == (272_000, 5.0, 22.5)
    assert two is not None and (two.above_input_tokens, two.input, two.output) == (128_000, 2.0, 2.0)
    assert vertex is not None and vertex.cache_write is None
    decode = msgspec.json.Decoder(WireCall).decode
    call = decode(payload(model="big-272k", input_tokens=300_000, output_tokens=1_000))
    # 300k × 5 + 1k × 22.5 per 1M = 1.5 + 0.0225
    assert CostAttribution(table)([call]).cost_usd == [pytest.approx(1.5225)]


def test_litellm_import_errors_name_the_entry() -> None:
    with pytest.raises(PriceError, match=r"sample.json: entry `bad`"):
        from_litellm(
            {"bad": {"mode": "chat", "input_cost_per_token": "cheap", "output_cost_per_token": 1}},
            source="sample.json",
        )
    with pytest.raises(PriceError, match="no chat model"):
        from_litellm({"x": {"mode": "embedding"}}, source="e.json")


def test_litellm_import_can_skip_odd_entries_and_say_why() -> None:
    """``llmpulse prices import`` skips them: one odd entry of ~2,000 must not block the rest."""
    skipped: dict[str, str] = {}
    data = {
        "cheap": {"mode": "chat", "input_cost_per_token": "cheap", "output_cost_per_token": 1e-6},
        "negative-cache": {"mode": "chat", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6,
                           "cache_read_input_token_cost": -1e-7},
        "good": {"mode": "chat", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
    }  # fmt: skip
    table = from_litellm(data, source="odd.json", skipped=skipped)
    assert set(table.models) == {"good"} and table.models["good"].output == 2.0
    assert skipped == {
        "cheap": "expected a non-negative number, got 'cheap'",
        "negative-cache": "expected a non-negative number, got -1e-07",
    }


def test_merge_and_load(tmp_path: Path) -> None:
    merged = merge_tables(builtin_price_table(), from_litellm(LITELLM_SAMPLE, source="s", price_version="v2"))
    assert merged.price_version == "v2"
    assert "gemini-2.5-flash" in merged.models  # kept from the built-in table
    path = tmp_path / "prices.json"
    path.write_text(merged.model_dump_json())
    assert load_price_table(path) == merged
    path.write_text(json.dumps({"price_version": "x", "models": {"m": {"provider": "p", "input": -1, "output": 1}}}))
    with pytest.raises(PriceError, match=r"prices.json: key `models.m.input`"):
        load_price_table(path)
