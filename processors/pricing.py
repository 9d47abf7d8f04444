"""CostAttribution: price each call from the table, cached tokens at the cached rate.

A client-sent ``cost_usd`` wins (flagged ``client``); otherwise the cost is computed
(``computed``); a model the table does not know gets NULL and ``price_missing`` — never a
silent zero, which would make a new model look free on every dashboard. Nor does a successful
call that reports no tokens at all: every call the provider answered read a prompt and wrote an
answer, so zero means the producer never got the usage (a stream closed early, a client without usage), and
the call gets NULL with ``usage_unknown`` instead of a $0.00 that looks like a free call.
``price_missing`` marks both (no cost: the rollups count them, so a per-call cost is taken
over priced calls only); ``cost_source`` says which.

The model priced is the requested ``model`` when the table has it by that exact name, else the
snapshot that served the call by its exact name (``response_model``: a deployment name such as
``prod-4o`` answered by ``gpt-4o-2024-05-13`` is billed at that snapshot's own rates), else the
requested model with its decorations stripped, else the served one stripped (``prod-4o``
answered by ``gpt-4o-2024-08-06``: gpt-4o's rates).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from processors.native import K_F64, K_U32, _native
from schemas.prices import ModelPrice, PriceTable
from schemas.wire import WireCall

COST_COMPUTED = "computed"
COST_CLIENT = "client"
COST_MISSING = "missing"
COST_USAGE_UNKNOWN = "usage_unknown"

_DATE_SUFFIX = re.compile(r"(-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8}|-latest|-preview(-\d{2}-\d{4}|-\d{2}-\d{2})?)$")
_VERSION_SUFFIX = re.compile(r"(-v\d+(:\d+)?|:\d+)$")
_BEDROCK = re.compile(r"^(?:[a-z]{2,6}\.)?anthropic\.")
"""Bedrock's model ids: ``anthropic.…`` and its inference profiles (``us.``, ``eu.``, ``apac.``,
``jp.``, ``global.``…)."""


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per token (not per million), resolved once per model string."""

    provider: str
    input: float
    output: float
    cached_input: float
    cache_write: float
    long_threshold: int
    """Above this many input tokens the ``long_*`` rates apply (0: no long-context tier)."""
    long_input: float
    long_output: float
    long_cached_input: float
    long_cache_write: float
    cache_write_1h: float
    """For the ``cache_write_1h_tokens`` of ``cache_write_tokens`` (the 1-hour cache)."""
    long_cache_write_1h: float

    @classmethod
    def of(cls, price: ModelPrice) -> Rates:
        m = 1e-6
        cached = price.input if price.cached_input is None else price.cached_input
        write = price.input if price.cache_write is None else price.cache_write
        write_1h = write if price.cache_write_1h is None else price.cache_write_1h
        tier = price.long_context
        if tier is None:
            return cls(
                price.provider, price.input * m, price.output * m, cached * m, write * m, 0, 0, 0, 0, 0, write_1h * m, 0
            )
        # A tier that lists no cache rate scales the base one by the tier's input markup: the
        # tier's full input rate for a cached read would charge it ~10x what it costs.
        markup = tier.input / price.input if price.input else 1.0
        long_write = write * markup if tier.cache_write is None else tier.cache_write
        if tier.cache_write_1h is not None:
            long_write_1h = tier.cache_write_1h
        elif price.cache_write_1h is not None:  # the base's 1-hour premium over its write rate, kept
            long_write_1h = long_write * (price.cache_write_1h / write) if write else price.cache_write_1h * markup
        else:  # one write rate, as in the base
            long_write_1h = long_write
        return cls(
            price.provider,
            price.input * m,
            price.output * m,
            cached * m,
            write * m,
            tier.above_input_tokens,
            tier.input * m,
            tier.output * m,
            (cached * markup if tier.cached_input is None else tier.cached_input) * m,
            long_write * m,
            write_1h * m,
            long_write_1h * m,
        )

    @property
    def vector(self) -> tuple[float, ...]:
        """The rates as one row of ``CostAttribution``'s per-batch rate table."""
        return (
            self.input, self.cached_input, self.cache_write, self.output, float(self.long_threshold),
            self.long_input, self.long_cached_input, self.long_cache_write, self.long_output,
            self.cache_write_1h, self.long_cache_write_1h,
        )  # fmt: skip

    def cost(self, input_tokens: int, output_tokens: int, cached: int, cache_write: int, write_1h: int = 0) -> float:
        """``cache_write`` counts every write; ``write_1h`` those of them to the 1-hour cache."""
        uncached = input_tokens - cached - cache_write
        write_5m = cache_write - write_1h
        if self.long_threshold and input_tokens > self.long_threshold:
            return (
                uncached * self.long_input
                + cached * self.long_cached_input
                + write_5m * self.long_cache_write
                + write_1h * self.long_cache_write_1h
                + output_tokens * self.long_output
            )
        return (
            uncached * self.input
            + cached * self.cached_input
            + write_5m * self.cache_write
            + write_1h * self.cache_write_1h
            + output_tokens * self.output
        )


def model_candidates(model: str) -> list[str]:
    """Names to try for a model string, most specific first.

    Providers and gateways decorate names: ``openai/gpt-4o``, ``gpt-4o-2024-08-06``,
    ``claude-sonnet-4-5-20250929``, ``anthropic.claude-3-5-haiku-20241022-v1:0``.
    """
    out = exact_candidates(model)
    name = out[-1]
    if _BEDROCK.match(name):
        name = name.split("anthropic.", 1)[1]
        out.append(name)
    bare = _VERSION_SUFFIX.sub("", name)
    bare = _DATE_SUFFIX.sub("", bare)
    out.append(bare)
    return out


def usage_unknown(status: str, input_tokens: int, output_tokens: int) -> bool:
    """A call the provider answered read a prompt and wrote an answer: an ``ok`` one with neither
    counted never got its usage (the module docstring). With output tokens alone, what is known is
    priced (a local server may leave a cached prompt out). Failed calls may well have cost nothing."""
    return status == "ok" and input_tokens == 0 and output_tokens == 0


def exact_candidates(model: str) -> list[str]:
    """The name as given, lower-cased, and without a gateway's ``provider/`` prefix: as the table
    may list it on its own (a snapshot with its own price). ``model_candidates`` goes on from the last."""
    name = model.strip().lower()
    out = [model, name]
    if "/" in name:
        out.append(name.rsplit("/", 1)[1])
    return out


@dataclass(slots=True)
class Costs:
    """Per-event columns, aligned with the batch's events."""

    cost_usd: list[float | None]
    cost_source: list[str]
    price_missing: list[bool]
    missing: int
    client: int
    unknown_models: dict[str, int]
    usage_unknown: int = 0
    """Successful calls that reported no tokens at all: cost NULL, ``cost_source = usage_unknown``,
    ``price_missing`` (``missing`` counts the unknown models alone)."""


class CostAttribution:
    def __init__(self, table: PriceTable) -> None:
        self.price_version = table.price_version
        self._by_name: dict[str, Rates] = {}
        for name, price in table.models.items():
            rates = Rates.of(price)
            self._by_name[name] = rates
            self._by_name[name.lower()] = rates
            for alias in price.aliases:
                self._by_name[alias.lower()] = rates
        self._resolved: dict[str, Rates | None] = {}

    def rates(self, model: str) -> Rates | None:
        """Resolved rates for a model string, memoized: the per-event cost is one dict lookup."""
        try:
            return self._resolved[model]
        except KeyError:
            pass
        found = None
        for candidate in model_candidates(model):
            found = self._by_name.get(candidate)
            if found is not None:
                break
        if len(self._resolved) < 100_000:  # bounded: hostile model names must not grow memory
            self._resolved[model] = found
        return found

    def rates_for(self, model: str, served: str | None) -> Rates | None:
        """The rates a call is billed at: the requested model's own entry (a price the user set for
        it wins over a dated one an import brought along), else the serving snapshot's own, else
        the requested model's with decorations stripped, else the served one's (module docstring)."""
        for name in (model, served) if served else (model,):
            for candidate in exact_candidates(name):
                found = self._by_name.get(candidate)
                if found is not None:
                    return found
        found = self.rates(model)
        if found is None and served:
            found = self.rates(served)
        return found

    def __call__(self, events: list[WireCall]) -> Costs:
        """A batch names a few models: rates are resolved once per distinct (model, provider) and
        the cost is computed per column (``_by_columns``); ``_per_event`` is the same arithmetic,
        value for value, where the C extension is not built."""
        if _native is not None and events:
            try:
                return self._by_columns(events)
            except (TypeError, OverflowError):
                pass  # a value the C helpers do not expect (a struct built in code, unvalidated)
        return self._per_event(events)

    def _by_columns(self, events: list[WireCall]) -> Costs:
        raw, combos = _native.combine(events, WireCall, ("model", "provider", "response_model", "status"))
        gathered = _native.gather(events, WireCall, _PRICE_COLUMNS)
        n = len(events)
        codes = np.frombuffer(raw, dtype=np.int32)
        rates = [self.rates_for(model, served) for model, _, served, _ in combos]
        known = np.array([r is not None for r in rates], dtype=bool)[codes]
        ok = np.array([status == "ok" for *_, status in combos], dtype=bool)[codes]
        table = np.array([_NO_RATES if r is None else r.vector for r in rates], dtype=np.float64)[codes]
        inp, out, cached, write, w1h = (np.frombuffer(c[2], dtype=np.uint32).astype(np.float64) for c in gathered[:5])
        # the order of ``Rates.cost``, operation for operation: the same doubles to the bit
        uncached = inp - cached - write
        w5m = write - w1h
        cost = (uncached * table[:, 0] + cached * table[:, 1] + w5m * table[:, 2] + w1h * table[:, 9]
                + out * table[:, 3])  # fmt: skip
        long = (table[:, 4] > 0) & (inp > table[:, 4])
        if long.any():
            tier = (uncached * table[:, 5] + cached * table[:, 6] + w5m * table[:, 7] + w1h * table[:, 10]
                    + out * table[:, 8])  # fmt: skip
            cost = np.where(long, tier, cost)
        client_nulls, client_valid, client_values = gathered[5]
        if client_nulls == n:  # the usual case: nobody sent a cost
            client = np.zeros(n, dtype=bool)
        else:
            if client_valid is None:
                client = np.ones(n, dtype=bool)
            else:
                client = np.unpackbits(np.frombuffer(client_valid, dtype=np.uint8), bitorder="little")[:n].astype(bool)
            cost = np.where(client, np.frombuffer(client_values, dtype=np.float64), cost)
        missing = ~known & ~client
        no_usage = ok & (inp == 0) & (out == 0) & known & ~client  # ``usage_unknown``, per column
        cost_usd: list[float | None] = cost.tolist()
        source = [COST_COMPUTED] * n
        for i in np.flatnonzero(client).tolist():
            source[i] = COST_CLIENT
        for i in np.flatnonzero(no_usage).tolist():
            cost_usd[i] = None
            source[i] = COST_USAGE_UNKNOWN
        unknown: dict[str, int] = {}
        for i in np.flatnonzero(missing).tolist():
            cost_usd[i] = None
            source[i] = COST_MISSING
            model = events[i].model
            unknown[model] = unknown.get(model, 0) + 1
        for code, ((_, provider, _, _), r) in enumerate(zip(combos, rates, strict=True)):
            if provider is None and r is not None:  # the table knows who serves it
                for i in np.flatnonzero(codes == code).tolist():
                    events[i].provider = r.provider
        unpriced = (missing | no_usage).tolist()
        return Costs(cost_usd, source, unpriced, int(missing.sum()), int(client.sum()), unknown, int(no_usage.sum()))

    def _per_event(self, events: list[WireCall]) -> Costs:
        cost_usd: list[float | None] = []
        source: list[str] = []
        missing_flags: list[bool] = []
        missing = client = no_usage = 0
        unknown: dict[str, int] = {}
        resolved: dict[tuple[str, str | None], Rates | None] = {}
        for e in events:
            pair = (e.model, e.response_model)
            rates = resolved[pair] if pair in resolved else resolved.setdefault(pair, self.rates_for(*pair))
            if rates is not None and e.provider is None:
                e.provider = rates.provider
            if e.cost_usd is not None:
                cost_usd.append(e.cost_usd)
                source.append(COST_CLIENT)
                missing_flags.append(False)
                client += 1
            elif rates is not None and usage_unknown(e.status, e.input_tokens, e.output_tokens):
                cost_usd.append(None)
                source.append(COST_USAGE_UNKNOWN)
                missing_flags.append(True)
                no_usage += 1
            elif rates is not None:
                tokens = (e.input_tokens, e.output_tokens, e.cached_input_tokens, e.cache_write_tokens)
                cost_usd.append(rates.cost(*tokens, e.cache_write_1h_tokens))
                source.append(COST_COMPUTED)
                missing_flags.append(False)
            else:
                cost_usd.append(None)
                source.append(COST_MISSING)
                missing_flags.append(True)
                missing += 1
                unknown[e.model] = unknown.get(e.model, 0) + 1
        return Costs(cost_usd, source, missing_flags, missing, client, unknown, no_usage)


_PRICE_COLUMNS = (
    ("input_tokens", K_U32), ("output_tokens", K_U32), ("cached_input_tokens", K_U32), ("cache_write_tokens", K_U32),
    ("cache_write_1h_tokens", K_U32), ("cost_usd", K_F64),
)  # fmt: skip
"""``_native.gather`` specs of what a cost is computed from."""
_NO_RATES = (0.0,) * 11
