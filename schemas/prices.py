"""Versioned price tables: what a model costs per million tokens, by token kind.

Rates are USD per 1M tokens because that is how providers publish them and how a reviewer
checks them. Every priced row records the table's ``price_version``, so a later price change
can be re-applied to history (``llmpulse reprice``) without losing which table produced which
figure.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Rate = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class PriceError(ValueError):
    """A price file that cannot be used; the message names the file and the entry."""


class LongContextTier(BaseModel):
    """Rates that apply to the whole call once its input exceeds ``above_input_tokens``. Missing
    cache rates are the base ones times the tier's input markup (``processors.pricing.Rates``)."""

    model_config = ConfigDict(extra="forbid")

    above_input_tokens: Annotated[int, Field(gt=0)]
    input: Rate
    output: Rate
    cached_input: Rate | None = None
    cache_write: Rate | None = None
    cache_write_1h: Rate | None = None


class ModelPrice(BaseModel):
    """One model's rates. Missing cache rates fall back to the input rate (never to zero); a
    missing 1-hour write rate to the (5-minute) write rate: one write rate is all most providers have."""

    model_config = ConfigDict(extra="forbid")

    provider: str
    input: Rate
    output: Rate
    cached_input: Rate | None = None
    cache_write: Rate | None = None
    cache_write_1h: Rate | None = None
    long_context: LongContextTier | None = None
    aliases: list[str] = Field(default_factory=list)


class PriceTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    price_version: Annotated[str, Field(min_length=1, max_length=64)]
    currency: str = "USD"
    unit: str = "per 1M tokens"
    source: str = ""
    models: dict[str, ModelPrice]


def builtin_price_table() -> PriceTable:
    """The table shipped in the package."""
    text = resources.files("schemas").joinpath("data/prices.json").read_text(encoding="utf-8")
    return PriceTable.model_validate_json(text)


def load_price_table(path: Path) -> PriceTable:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PriceError(f"{path}: cannot read price table: {exc.strerror}") from exc
    try:
        return PriceTable.model_validate_json(raw)
    except ValidationError as exc:
        if _looks_like_litellm(raw):
            raise PriceError(
                f"{path}: this is LiteLLM's model_prices_and_context_window.json, not an llmpulse price table: "
                f"convert it with `llmpulse prices import {path} --out prices.json` and use the file it writes"
            ) from exc
        raise PriceError(f"{path}: {_first_error(exc)}") from exc


def _looks_like_litellm(raw: bytes) -> bool:
    """LiteLLM's file is an object of model entries priced per token; ours has ``models``."""
    try:
        data = json.loads(raw)
    except ValueError:
        return False
    return (
        isinstance(data, dict)
        and "models" not in data
        and any(isinstance(v, dict) and "input_cost_per_token" in v for v in data.values())
    )


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"key `{where}`: {first['msg']}" if where else str(first["msg"])


_LITELLM_CHAT_MODES = {"chat", "completion", "responses", None}


def _per_million(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or value < 0:
        raise TypeError(f"expected a non-negative number, got {value!r}")
    # LiteLLM stores USD per token; round away float noise (2.5e-06 * 1e6 = 2.4999999999999996).
    return round(float(value) * 1_000_000, 9)


_LITELLM_TIER = re.compile(r"^input_cost_per_token_above_(\d+)k_tokens$")


def _litellm_tier(entry: dict[str, Any]) -> LongContextTier | None:
    """The first long-context tier an entry lists (``*_above_128k_tokens``, ``_200k``, ``_272k``…).

    A price table holds one tier per model; where LiteLLM lists several, the lowest is the one
    most long calls cross. A tier without its own output rate keeps the base one. A tier cache
    write rate counts only where the base has one (LiteLLM's Vertex Gemini lists a tier write
    rate below the input rate and no base one: writes stay at the input rate in both tiers)."""
    thresholds = sorted(int(m.group(1)) for key in entry if (m := _LITELLM_TIER.match(key)))
    for k in thresholds:
        tier_in = _per_million(entry.get(f"input_cost_per_token_above_{k}k_tokens"))
        if tier_in is None:
            continue
        tier_out = _per_million(entry.get(f"output_cost_per_token_above_{k}k_tokens"))
        has_write = entry.get("cache_creation_input_token_cost") is not None
        return LongContextTier(
            above_input_tokens=k * 1000,
            input=tier_in,
            output=tier_out if tier_out is not None else _per_million(entry.get("output_cost_per_token")),
            cached_input=_per_million(entry.get(f"cache_read_input_token_cost_above_{k}k_tokens")),
            cache_write=_per_million(entry.get(f"cache_creation_input_token_cost_above_{k}k_tokens"))
            if has_write
            else None,
        )
    return None


def from_litellm(
    data: dict[str, Any], *, source: str, price_version: str | None = None, skipped: dict[str, str] | None = None
) -> PriceTable:
    """Convert LiteLLM's ``model_prices_and_context_window.json`` into a price table.

    Only text-generation entries with both input and output rates are kept; the first
    long-context tier an entry lists becomes ``long_context`` (``_litellm_tier``), and LiteLLM's
    1-hour cache write rate (``cache_creation_input_token_cost_above_1hr``) ``cache_write_1h``.

    An entry with a malformed rate raises, naming it; given ``skipped``, it is left out and
    recorded there (name → reason) instead. LiteLLM's file is edited by hand across ~2,000
    entries, and one odd entry must not keep a user from the prices of every other model.
    """
    models: dict[str, ModelPrice] = {}
    for name, entry in data.items():
        if name == "sample_spec" or not isinstance(entry, dict):
            continue
        if entry.get("mode") not in _LITELLM_CHAT_MODES:
            continue
        try:
            inp = _per_million(entry.get("input_cost_per_token"))
            out = _per_million(entry.get("output_cost_per_token"))
            if inp is None or out is None:
                continue
            tier = _litellm_tier(entry)
            models[name] = ModelPrice(
                provider=str(entry.get("litellm_provider") or "unknown"),
                input=inp,
                output=out,
                cached_input=_per_million(entry.get("cache_read_input_token_cost")),
                cache_write=_per_million(entry.get("cache_creation_input_token_cost")),
                cache_write_1h=_per_million(entry.get("cache_creation_input_token_cost_above_1hr")),
                long_context=tier,
            )
        except (TypeError, ValidationError) as exc:
            if skipped is None:
                raise PriceError(f"{source}: entry `{name}`: {exc}") from exc
            skipped[name] = str(exc) if isinstance(exc, TypeError) else _first_error(exc)
    if not models:
        raise PriceError(f"{source}: no chat model with input and output prices found (is this LiteLLM's file?)")
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
    return PriceTable(
        price_version=price_version or f"litellm-{digest}",
        source=f"imported from {source}",
        models=models,
    )


def merge_tables(base: PriceTable, override: PriceTable) -> PriceTable:
    """``override``'s entries win; the result carries ``override``'s version."""
    return PriceTable(
        price_version=override.price_version,
        currency=override.currency,
        source=f"{override.source}; over {base.price_version}",
        models={**base.models, **override.models},
    )
