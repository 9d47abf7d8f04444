"""Provider usage → token fields, checked by what the call then costs (rates in schemas/data/prices.json)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from ingest.usage import anthropic_usage, gemini_usage, openai_usage
from processors.pricing import COST_USAGE_UNKNOWN, CostAttribution
from schemas.prices import builtin_price_table
from schemas.wire import WireCall
from tests.conftest import payload

DECODE = msgspec.json.Decoder(WireCall).decode
PRICE = CostAttribution(builtin_price_table())


def cost(model: str, fields: dict[str, int]) -> float | None:
    return PRICE([DECODE(payload(model=model, **fields))]).cost_usd[0]


def test_anthropic_cache_reads_and_writes_are_added_into_the_input() -> None:
    """Anthropic bills 12k × $3 + 8k cached × $0.30 + 1k out × $15 per 1M = $0.0534; published raw
    (12k input, 8k cached) the 8k cached tokens came out of the 12k: $0.0294."""
    usage = SimpleNamespace(
        input_tokens=12_000, output_tokens=1_000, cache_read_input_tokens=8_000, cache_creation_input_tokens=None
    )
    fields = anthropic_usage(usage)
    assert fields == {"input_tokens": 20_000, "output_tokens": 1_000, "cached_input_tokens": 8_000,
                      "cache_write_tokens": 0, "cache_write_1h_tokens": 0}  # fmt: skip
    assert cost("claude-sonnet-4-5", fields) == pytest.approx(0.0534)


def test_anthropic_long_context_tier_counts_the_whole_prompt() -> None:
    """150k raw + 100k cached = 250k > 200k: 150k × 6 + 100k × 0.60 + 2k × 22.50 per 1M = $1.005."""
    usage = {"input_tokens": 150_000, "output_tokens": 2_000, "cache_read_input_tokens": 100_000}
    assert cost("claude-sonnet-4-5", anthropic_usage(usage)) == pytest.approx(1.005)


def test_anthropic_cache_writes_at_the_write_rate() -> None:
    # 1k raw + 10k written, 200 out on claude-haiku-4-5: 1k × 1 + 10k × 1.25 + 200 × 5 per 1M = 0.0145
    usage = {"input_tokens": 1_000, "output_tokens": 200, "cache_creation_input_tokens": 10_000}
    assert cost("claude-haiku-4-5", anthropic_usage(usage)) == pytest.approx(0.0145)


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": 1_000, "output_tokens": 200, "cache_creation_input_tokens": 10_000,
         "cache_creation": {"ephemeral_5m_input_tokens": 4_000, "ephemeral_1h_input_tokens": 6_000}},
        # the SDK's objects; and a proxy that kept the breakdown but dropped the total
        SimpleNamespace(input_tokens=1_000, output_tokens=200, cache_read_input_tokens=0, cache_creation_input_tokens=0,
                        cache_creation=SimpleNamespace(ephemeral_5m_input_tokens=4_000,
                                                       ephemeral_1h_input_tokens=6_000)),
    ],
)  # fmt: skip
def test_anthropic_one_hour_cache_writes_at_the_one_hour_rate(usage: Any) -> None:
    """claude-haiku-4-5: 1k raw × $1 + 4k 5-minute writes × $1.25 + 6k 1-hour writes × $2 + 200 out
    × $5 per 1M = $0.019; priced all at the 5-minute rate, as before, it read $0.0145."""
    fields = anthropic_usage(usage)
    written = (fields["input_tokens"], fields["cache_write_tokens"], fields["cache_write_1h_tokens"])
    assert written == (11_000, 10_000, 6_000)
    assert cost("claude-haiku-4-5", fields) == pytest.approx(0.019)


def test_one_hour_writes_on_a_model_without_that_rate_and_in_the_long_context_tier() -> None:
    """A model whose price lists one write rate bills every write at it; claude-sonnet-4-5 above
    200k input bills 1-hour writes at 2x its tier's $6 input: 300k raw × $6 + 100k 1-hour writes ×
    $12 + 1k out × $22.50 per 1M = $3.0225."""
    fields = {"input_tokens": 400_000, "output_tokens": 1_000, "cache_write_tokens": 100_000,
              "cache_write_1h_tokens": 100_000}  # fmt: skip
    assert cost("claude-sonnet-4-5", fields) == pytest.approx(3.0225)
    # gpt-4o lists no write rate at all: writes are input, 1-hour or not
    assert cost("gpt-4o", fields) == cost("gpt-4o", {**fields, "cache_write_1h_tokens": 0})


@pytest.mark.parametrize(
    "metadata",
    [
        SimpleNamespace(prompt_token_count=10_000, cached_content_token_count=6_000, candidates_token_count=500,
                        thoughts_token_count=3_000, tool_use_prompt_token_count=None),
        {"promptTokenCount": 10_000, "cachedContentTokenCount": 6_000, "candidatesTokenCount": 500,
         "thoughtsTokenCount": 3_000},
    ],
)  # fmt: skip
def test_gemini_thinking_tokens_are_billed_as_output(metadata: Any) -> None:
    """gemini-2.5-pro: 4k × 1.25 + 6k cached × 0.125 + (500 + 3,000) out × 10 per 1M = $0.04075;
    the answer's 500 tokens alone would read $0.00575."""
    fields = gemini_usage(metadata)
    assert fields == {"input_tokens": 10_000, "output_tokens": 3_500, "cached_input_tokens": 6_000,
                      "cache_write_tokens": 0}  # fmt: skip
    assert cost("gemini-2.5-pro", fields) == pytest.approx(0.04075)


def test_openai_usage_reads_cached_tokens_inside_the_prompt() -> None:
    usage = {"prompt_tokens": 12_000, "completion_tokens": 900, "prompt_tokens_details": {"cached_tokens": 8_000}}
    # gpt-4o: 4k × 2.50 + 8k × 1.25 + 900 × 10 per 1M = 0.029
    assert cost("gpt-4o", openai_usage(usage)) == pytest.approx(0.029)


def test_no_usage_reported_is_priced_as_unknown_not_free() -> None:
    assert anthropic_usage(None) == gemini_usage(None) == openai_usage(None) == {}
    fields = {"input_tokens": 0, "output_tokens": 0}  # what an event without usage carries
    costs = PRICE([DECODE(payload(model="claude-sonnet-4-5", **fields))])
    assert (costs.cost_usd, costs.cost_source) == ([None], [COST_USAGE_UNKNOWN])


def test_odd_values_read_as_zero() -> None:
    usage = {
        "input_tokens": -5,
        "output_tokens": True,
        "cache_read_input_tokens": "12",
        "cache_creation_input_tokens": 3,
    }
    assert anthropic_usage(usage) == {"input_tokens": 3, "output_tokens": 0, "cached_input_tokens": 0,
                                      "cache_write_tokens": 3, "cache_write_1h_tokens": 0}  # fmt: skip
