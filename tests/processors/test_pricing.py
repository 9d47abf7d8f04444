"""Costs to the cent against hand-computed expectations (rates in schemas/data/prices.json)."""

from __future__ import annotations

import msgspec
import pytest

from processors.pricing import COST_CLIENT, COST_COMPUTED, COST_MISSING, COST_USAGE_UNKNOWN, CostAttribution, Rates
from schemas.prices import LongContextTier, ModelPrice, PriceTable, builtin_price_table
from schemas.wire import WireCall
from tests.conftest import payload

DECODE = msgspec.json.Decoder(WireCall).decode


@pytest.fixture(scope="module")
def price() -> CostAttribution:
    return CostAttribution(builtin_price_table())


def ev(**kw: object) -> WireCall:
    return DECODE(payload(**kw))


def test_cached_tokens_are_priced_at_the_cached_rate(price: CostAttribution) -> None:
    # gpt-4o: $2.50 input, $1.25 cached input, $10 output per 1M tokens.
    # 4,000 uncached × 2.50 + 8,000 cached × 1.25 + 900 out × 10 = 0.010 + 0.010 + 0.009
    costs = price([ev(model="gpt-4o", input_tokens=12_000, cached_input_tokens=8_000, output_tokens=900)])
    assert costs.cost_usd[0] == pytest.approx(0.029, abs=1e-12)
    assert costs.cost_source == [COST_COMPUTED]
    # had the cached tokens been charged as input, this would read 0.039: a 34% overstatement
    assert costs.cost_usd[0] != pytest.approx(0.039)


def test_cache_writes_and_reads_on_anthropic(price: CostAttribution) -> None:
    # claude-sonnet-4-5: $3 input, $0.30 cache read, $3.75 cache write, $15 output per 1M.
    # 10,000 uncached × 3 + 30,000 read × 0.30 + 10,000 written × 3.75 + 2,000 out × 15
    # = 0.030 + 0.009 + 0.0375 + 0.030 = 0.1065
    costs = price(
        [
            ev(
                model="claude-sonnet-4-5",
                input_tokens=50_000,
                cached_input_tokens=30_000,
                cache_write_tokens=10_000,
                output_tokens=2_000,
            )
        ]
    )
    assert costs.cost_usd[0] == pytest.approx(0.1065, abs=1e-12)


def test_long_context_tier_applies_above_the_threshold(price: CostAttribution) -> None:
    # claude-sonnet-4-5 above 200k input tokens: $6 input, $22.50 output per 1M
    over = price([ev(model="claude-sonnet-4-5", input_tokens=250_000, output_tokens=1_000)])
    assert over.cost_usd[0] == pytest.approx(1.5 + 0.0225, abs=1e-12)
    at = price([ev(model="claude-sonnet-4-5", input_tokens=200_000, output_tokens=1_000)])
    assert at.cost_usd[0] == pytest.approx(0.6 + 0.015, abs=1e-12)


def test_thousand_calls_sum_to_the_cent(price: CostAttribution) -> None:
    # 1,234 × gpt-4o-mini calls of 3,000 in (1,000 cached) / 250 out:
    # per call 2,000 × 0.15 + 1,000 × 0.075 + 250 × 0.60 per 1M = 0.0003 + 0.000075 + 0.00015 = 0.000525
    # × 1,234 = $0.64785 → $0.65
    events = [
        ev(model="gpt-4o-mini", input_tokens=3_000, cached_input_tokens=1_000, output_tokens=250) for _ in range(1234)
    ]
    total = sum(c for c in price(events).cost_usd if c is not None)
    assert round(total, 2) == 0.65
    assert total == pytest.approx(0.64785, abs=1e-9)


def test_client_cost_wins_and_is_flagged(price: CostAttribution) -> None:
    costs = price([ev(model="gpt-4o", cost_usd=0.5)])
    assert costs.cost_usd == [0.5]
    assert costs.cost_source == [COST_CLIENT]
    assert costs.client == 1


def test_unknown_model_is_null_and_counted_never_zero(price: CostAttribution) -> None:
    costs = price([ev(model="acme-llm-1"), ev(model="acme-llm-1"), ev(model="gpt-4o")])
    assert costs.cost_usd[0] is None and costs.cost_usd[1] is None
    assert costs.cost_source[:2] == [COST_MISSING, COST_MISSING]
    assert costs.price_missing == [True, True, False]
    assert costs.missing == 2
    assert costs.unknown_models == {"acme-llm-1": 2}


def test_a_successful_call_without_usage_is_null_never_a_free_call(price: CostAttribution) -> None:
    """A stream closed early or a client that never read usage records 0 tokens; the provider
    billed the prompt all the same. A failed call with no tokens may well have cost nothing."""
    costs = price([
        ev(model="gpt-4o", input_tokens=0, output_tokens=0),
        ev(model="gpt-4o", input_tokens=0, output_tokens=0, status="error"),
        ev(model="gpt-4o", input_tokens=0, output_tokens=0, cost_usd=0.012),
        ev(model="acme-llm-1", input_tokens=0, output_tokens=0),
        ev(model="gpt-4o", input_tokens=0, output_tokens=100),  # a cached prompt left out: the output is known
    ])  # fmt: skip
    assert costs.cost_usd == [None, 0.0, 0.012, None, pytest.approx(0.001)]
    assert costs.cost_source == [COST_USAGE_UNKNOWN, COST_COMPUTED, COST_CLIENT, COST_MISSING, COST_COMPUTED]
    assert costs.price_missing == [True, False, False, True, False]  # no cost, for either reason
    assert (costs.usage_unknown, costs.missing) == (1, 1)  # ``missing``: unknown models alone


def test_a_deployment_name_is_priced_by_the_snapshot_that_served_it(price: CostAttribution) -> None:
    """1M input + 1M output tokens. gpt-4o-2024-05-13 and chatgpt-4o-latest list at $5 / $15 per
    1M, the gpt-4o alias at $2.50 / $10: 20.00 against 12.50. An Azure deployment name is no
    model at all: the snapshot that answered prices it, by its own entry or its family's."""
    one_m = {"input_tokens": 1_000_000, "output_tokens": 1_000_000}
    costs = price([
        ev(model="prod-4o", response_model="gpt-4o-2024-05-13", provider="azure", **one_m),
        ev(model="chatgpt-4o-latest", **one_m),
        ev(model="gpt-4o", response_model="gpt-4o-2024-08-06", **one_m),
        ev(model="prod-4o", response_model="gpt-4o-2024-08-06", provider="azure", **one_m),
        ev(model="prod-4o", response_model="acme-2", **one_m),
    ])  # fmt: skip
    assert costs.cost_usd[:4] == [pytest.approx(20.0), pytest.approx(20.0), pytest.approx(12.5), pytest.approx(12.5)]
    assert costs.cost_usd[4] is None and costs.unknown_models == {"prod-4o": 1}


def test_the_requested_models_own_price_wins_over_a_dated_entry() -> None:
    """A LiteLLM import lists every dated snapshot; a contract price set for the alias must still apply."""
    table = PriceTable(price_version="t", models={
        "gpt-4o": ModelPrice(provider="openai", input=2.0, output=8.0),
        "gpt-4o-2024-08-06": ModelPrice(provider="openai", input=2.5, output=10.0),
    })  # fmt: skip
    costs = CostAttribution(table)([ev(model="gpt-4o", response_model="gpt-4o-2024-08-06", input_tokens=1_000_000,
                                       output_tokens=0)])  # fmt: skip
    assert costs.cost_usd == [pytest.approx(2.0)]


def test_gemini_cached_reads_at_the_implicit_caching_rates(price: CostAttribution) -> None:
    # gemini-2.5-pro, 150k prompt of which 140k cached, 2k out: 10k × 1.25 + 140k × 0.125 + 2k × 10 per 1M
    # = 0.0125 + 0.0175 + 0.02 = 0.05; above 200k (300k, 250k cached): 50k × 2.5 + 250k × 0.25 + 2k × 15
    # = 0.125 + 0.0625 + 0.03 = 0.2175; gemini-2.5-flash 100k (80k cached), 500 out: 0.006 + 0.0024 + 0.00125
    costs = price([
        ev(model="gemini-2.5-pro", input_tokens=150_000, cached_input_tokens=140_000, output_tokens=2_000),
        ev(model="gemini-2.5-pro", input_tokens=300_000, cached_input_tokens=250_000, output_tokens=2_000),
        ev(model="gemini-2.5-flash", input_tokens=100_000, cached_input_tokens=80_000, output_tokens=500),
    ])  # fmt: skip
    assert costs.cost_usd == [pytest.approx(0.05), pytest.approx(0.2175), pytest.approx(0.00965)]


def test_a_tier_without_cache_rates_scales_the_base_ones() -> None:
    """A LiteLLM tier often lists input and output only. Its cached reads cost the base cached rate
    times the tier's input markup (2x here), not the tier's full input rate."""
    table = PriceTable(price_version="t", models={"m": ModelPrice(
        provider="p", input=1.0, cached_input=0.1, cache_write=1.25, output=4.0,
        long_context=LongContextTier(above_input_tokens=100_000, input=2.0, output=6.0),
    )})  # fmt: skip
    # 300k input: 200k cached × 0.2 + 40k written × 2.5 + 60k × 2.0 + 1k out × 6.0 per 1M
    costs = CostAttribution(table)([
        ev(model="m", input_tokens=300_000, cached_input_tokens=200_000, cache_write_tokens=40_000, output_tokens=1_000)
    ])  # fmt: skip
    assert costs.cost_usd[0] == pytest.approx(0.04 + 0.1 + 0.12 + 0.006)


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("global.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),
        ("apac.anthropic.claude-haiku-4-5-20251001-v1:0", "claude-haiku-4-5"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("openai/gpt-4o-mini", "gpt-4o-mini"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("anthropic.claude-3-5-haiku-20241022-v1:0", "claude-3-5-haiku"),
        ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
        ("GPT-4.1", "gpt-4.1"),
    ],
)
def test_decorated_model_names_resolve(price: CostAttribution, name: str, canonical: str) -> None:
    assert price.rates(name) == price.rates(canonical)
    assert price.rates(name) is not None


def test_provider_is_filled_from_the_price_table(price: CostAttribution) -> None:
    e = ev(model="gemini-2.5-flash")
    assert e.provider is None
    price([e])
    assert e.provider == "google"


def test_a_mixed_batch_costs_the_same_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-column path (C helpers + numpy) against the per-event one, bit for bit: long-context
    tiers, 1-hour cache writes, client costs (also on unknown models), unknown models, providers filled or kept."""
    import random

    from processors import pricing

    rng = random.Random(7)
    models = ["gpt-4o", "claude-sonnet-4-5", "gemini-2.5-pro", "gemini-2.5-flash", "no-such-model", "openai/gpt-4o"]

    def batch() -> list[WireCall]:
        rng.seed(7)
        out = []
        for i in range(500):
            inp = rng.choice([0, 1, 900, 12_000, 199_999, 200_000, 200_001, 350_000])
            cached = rng.randint(0, inp // 2)
            kw: dict[str, object] = {
                "event_id": f"e{i}",
                "model": rng.choice(models),
                "input_tokens": inp,
                "cached_input_tokens": cached,
                "cache_write_tokens": (written := rng.randint(0, (inp - cached) // 3)),
                "cache_write_1h_tokens": rng.choice([0, written // 2, written]),
                "output_tokens": 0 if inp == 0 and rng.random() < 0.5 else rng.randint(0, 5_000),
            }
            if rng.random() < 0.2:
                kw["cost_usd"] = round(rng.random(), 6)
            if rng.random() < 0.3:
                kw["provider"] = "azure"
            if rng.random() < 0.3:
                kw["response_model"] = rng.choice(["gpt-4o-2024-05-13", "gpt-4o-2024-08-06", "acme-2"])
            if rng.random() < 0.2:
                kw["status"] = "error"
            out.append(ev(**kw))
        return out

    table = builtin_price_table()
    columns, events = CostAttribution(table), batch()
    by_columns = columns._by_columns(events)  # called directly: no silent fallback
    monkeypatch.setattr(pricing, "_native", None)
    per_event, reference = CostAttribution(table), batch()
    expected = per_event(reference)
    assert by_columns.cost_usd == expected.cost_usd  # exact doubles, None where missing
    assert by_columns.cost_source == expected.cost_source
    assert by_columns.price_missing == expected.price_missing
    assert (by_columns.missing, by_columns.client, by_columns.usage_unknown) == (
        expected.missing, expected.client, expected.usage_unknown
    )  # fmt: skip
    assert expected.usage_unknown > 0
    assert by_columns.unknown_models == expected.unknown_models
    assert [e.provider for e in events] == [e.provider for e in reference]
    assert {COST_CLIENT, COST_COMPUTED, COST_MISSING, COST_USAGE_UNKNOWN} == set(expected.cost_source)
    assert any(e.input_tokens > 200_000 and e.model.startswith("claude") for e in events)


def test_a_struct_built_in_code_with_out_of_range_tokens_is_still_priced() -> None:
    """The decoder bounds tokens to uint32, but a ``WireCall`` built in code is not validated: the
    C gather refuses such a value (OverflowError) and the per-event path prices it instead."""
    e = ev(model="gpt-4o", input_tokens=10, output_tokens=1)
    e.input_tokens = 2**32 + 5
    costs = CostAttribution(builtin_price_table())([e])
    assert costs.cost_usd[0] == pytest.approx((2**32 + 5) * 2.5e-6 + 10e-6)


def test_one_hour_write_rates_fall_back_like_the_other_cache_rates() -> None:
    """Per 1M: a tier's own 1-hour rate; else the base one scaled by the tier's input markup; and a
    model with one write rate bills 1-hour writes at it, the tier's (not the base's, scaled) above."""
    tier = LongContextTier(above_input_tokens=1000, input=4.0, output=8.0, cache_write=5.0)
    one_rate = Rates.of(ModelPrice(provider="x", input=2.0, output=4.0, cache_write=2.5, long_context=tier))
    assert (one_rate.cache_write_1h * 1e6, one_rate.long_cache_write_1h * 1e6) == (2.5, 5.0)
    two_rates = Rates.of(ModelPrice(provider="x", input=2.0, output=4.0, cache_write=2.5, cache_write_1h=4.0,
                                    long_context=tier))  # fmt: skip
    assert (two_rates.cache_write_1h * 1e6, two_rates.long_cache_write_1h * 1e6) == (4.0, 8.0)  # 4 x markup 2
    own = tier.model_copy(update={"cache_write_1h": 7.0})
    assert Rates.of(ModelPrice(provider="x", input=2.0, output=4.0, long_context=own)).long_cache_write_1h * 1e6 == 7.0
    # 2,000 in (1,000 of them 1-hour writes) above the 1,000 tier: 1,000 x 4 + 1,000 x 8 per 1M
    assert two_rates.cost(2000, 0, 0, 1000, 1000) == pytest.approx(0.012)
