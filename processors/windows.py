"""Event-time tumbling windows: stage 1 of the two-stage aggregation in DESIGN.md.

``WindowAggregator`` runs per source partition. It keeps one ``WindowPartial`` per
(window, scope key) — counts, sums and quantile sketches, all mergeable — and emits a
window's partials once the partition's watermark (max event time seen minus the allowed
lateness) passes the window's end. An event whose window was already emitted is late: it is
counted here and still written to the raw table by the runtime, never dropped. Stage 2
(merging partials of all partitions per scope) only adds partials up, so a rebalance needs no
state migration: the old owner flushes, the new owner continues.
"""

from __future__ import annotations

import base64
import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from processors.drift import is_pinned
from processors.flows import ClosedFlow, FlowTracker
from processors.pricing import Costs
from processors.sketch import QuantileSketch
from schemas.wire import WireCall

SCOPE_DIMS: tuple[str, ...] = ("feature", "team", "model", "provider", "prompt_version", "variant")
"""The finest scope a partial is kept at; coarser scopes (team, model, ...) merge these."""

QUANTILES = (0.5, 0.95, 0.99)

FLOW_IDS_KEPT = 256
"""Distinct flows a partial remembers: past a few dozen, silence is already beyond improbable
(e^-256), and every trace id an OTLP source sends would otherwise be held for the window."""
FLOWS_REMEMBERED = 4096
"""Distinct flows remembered per feature and absence window; past it, flows are counted again
(an overcount only where silence is beyond improbable anyway)."""

_COUNTS = (
    "calls",
    "errors",
    "timeouts",
    "rate_limited",
    "refusals",
    "price_missing",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_chars",
    "schema_checked",
    "schema_valid",
    "tool_call_calls",
    "unpinned_calls",
    "eval_count",
    "feedback_count",
    "thumbs_up",
    "thumbs_down",
    "rated",
    "flows",
    "flow_calls",
    "flow_tokens",
    "flow_unpriced",
    "lone_calls",
)
_SUMS = ("cost_usd", "latency_ms_sum", "ttft_ms_sum", "eval_sum", "eval_sumsq", "rating_sum", "flow_ms_sum",
         "flow_cost_usd")  # fmt: skip


@dataclass(slots=True)
class WindowPartial:
    """Aggregates of one scope key in one window, from one partition (or merged from several)."""

    window_start: int
    window_s: int
    key: tuple[str, ...]
    partition: int = -1
    calls: int = 0
    errors: int = 0
    """Calls whose status is not ``ok`` (error, timeout, rate_limited)."""
    timeouts: int = 0
    rate_limited: int = 0
    refusals: int = 0
    price_missing: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_chars: int = 0
    schema_checked: int = 0
    schema_valid: int = 0
    tool_call_calls: int = 0
    unpinned_calls: int = 0
    """Calls that named a model alias, not a pinned snapshot (set as a window closes: ``_count_unpinned``)."""
    cost_usd: float = 0.0
    latency_ms_sum: float = 0.0
    ttft_ms_sum: float = 0.0
    eval_count: int = 0
    """Judge scores that arrived in the window (quality partials; calls stay 0 there)."""
    eval_sum: float = 0.0
    eval_sumsq: float = 0.0
    feedback_count: int = 0
    thumbs_up: int = 0
    thumbs_down: int = 0
    rated: int = 0
    rating_sum: float = 0.0
    latency: QuantileSketch = field(default_factory=QuantileSketch)
    ttft: QuantileSketch = field(default_factory=QuantileSketch)
    output: QuantileSketch = field(default_factory=QuantileSketch)
    """Output tokens per call: the length distribution drift compares (p95, PSI)."""
    served: set[str] = field(default_factory=set)
    """The response_models that answered: a new one under an unchanged model name is a silent switch."""
    flows: int = 0
    """Multi-call flows (agent runs, conversation turns) known finished in this window (processors.flows)."""
    flow_calls: int = 0
    flow_tokens: int = 0
    flow_ms_sum: float = 0.0
    flow_cost_usd: float = 0.0
    """Of the flows whose every call had a cost; ``flow_unpriced`` counts the others."""
    flow_unpriced: int = 0
    flow_ms: QuantileSketch = field(default_factory=QuantileSketch)
    """Perceived latency of those flows: first call's start to last call's end."""
    new_flows: dict[int, int] = field(default_factory=dict)
    """Per absence-rule window length (s): the flows (agent runs by ``trace_id``, else
    conversations) of this minute not yet seen in the feature's current window of that length
    (aligned, as rule windows are). Summed over a rule window's minutes, with ``lone_calls``, they
    are the flows active in it (``active_flows``): what silence is judged by, not calls. An agent
    run of six calls is one flow, and a feature with three runs every ten minutes goes quiet for
    ten minutes once a day or so (``processors.alerts.engine.silence_probability``). Set as the
    minute closes (``WindowAggregator``); empty where nothing counted them (no absence rule, or a
    partial from before): each call then counts as its own flow."""
    lone_calls: int = 0
    """Calls belonging to no flow: each is its own arrival."""
    flow_ids: set[str] = field(default_factory=set)
    """Stage 1 only, while the window is open: the flows its calls belonged to (at most
    ``FLOW_IDS_KEPT``). Never sent."""

    @property
    def window_end(self) -> int:
        return self.window_start + self.window_s

    def labels(self, dims: tuple[str, ...] = SCOPE_DIMS) -> dict[str, str]:
        return dict(zip(dims, self.key, strict=True))

    def merge(self, other: WindowPartial, latency: bool = True, ttft: bool = True, output: bool = True) -> None:
        """Add ``other`` in. Stage 2 passes ``latency``/``ttft``/``output`` False where no rule reads
        those sketches: merging sketches nobody queries is most of what merging costs."""
        # spelled out: stage 2 merges hundreds of thousands of cells a minute, and a getattr/setattr
        # loop over the field names costs five times as much
        self.calls += other.calls
        self.errors += other.errors
        self.timeouts += other.timeouts
        self.rate_limited += other.rate_limited
        self.refusals += other.refusals
        self.price_missing += other.price_missing
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.cache_write_tokens += other.cache_write_tokens
        self.output_chars += other.output_chars
        self.schema_checked += other.schema_checked
        self.schema_valid += other.schema_valid
        self.tool_call_calls += other.tool_call_calls
        self.unpinned_calls += other.unpinned_calls
        self.lone_calls += other.lone_calls
        if other.new_flows:
            mine = self.new_flows
            if mine:
                for w, n in other.new_flows.items():
                    mine[w] = mine.get(w, 0) + n
            else:
                self.new_flows = dict(other.new_flows)
        self.cost_usd += other.cost_usd
        self.latency_ms_sum += other.latency_ms_sum
        self.ttft_ms_sum += other.ttft_ms_sum
        if other.eval_count or other.feedback_count:
            self.eval_count += other.eval_count
            self.eval_sum += other.eval_sum
            self.eval_sumsq += other.eval_sumsq
            self.feedback_count += other.feedback_count
            self.thumbs_up += other.thumbs_up
            self.thumbs_down += other.thumbs_down
            self.rated += other.rated
            self.rating_sum += other.rating_sum
        if latency:
            self.latency.merge(other.latency)
        if ttft:
            self.ttft.merge(other.ttft)
        if output:
            self.output.merge(other.output)
        if other.served:
            self.served |= other.served
        if other.flows:
            self.flows += other.flows
            self.flow_calls += other.flow_calls
            self.flow_tokens += other.flow_tokens
            self.flow_ms_sum += other.flow_ms_sum
            self.flow_cost_usd += other.flow_cost_usd
            self.flow_unpriced += other.flow_unpriced
            self.flow_ms.merge(other.flow_ms)  # flows are few: always merged

    def copy(
        self, key: tuple[str, ...] | None = None, latency: bool = True, ttft: bool = True, output: bool = True
    ) -> WindowPartial:
        """A new partial with this one's aggregates (sketches copied too, so the two stay independent)."""
        out = WindowPartial(self.window_start, self.window_s, self.key if key is None else key, self.partition)
        out.merge(self, latency, ttft, output)
        return out

    def metric(self, name: str) -> float | None:
        """One metric value (alert rules need one each: no reason to fold every sketch)."""
        fn = METRIC_FNS.get(name)
        return fn(self) if fn is not None else None

    def metrics(self) -> dict[str, float | None]:
        """Every metric this window has, as alert rules and summaries read them; None where undefined."""
        return {name: fn(self) for name, fn in METRIC_FNS.items()}

    def to_wire(self, sketches: tuple[bool, bool, bool] = (True, True, True), **header: Any) -> bytes:
        """The ``llm.window.partials`` message: a JSON header (counts, sums, key and ``header``'s
        fields), a newline, then the sketches' bytes back to back (their lengths in the header).

        Sketches are most of a partial's bytes. As base64 strings inside the JSON they cost a
        third more bytes, an encode here, and in stage 2 a JSON scan, a decode and a copy each.
        Stage 2's read of a partial, both forms in one process: 33 → 19 µs for one of raw values
        (feature × model), 74 → 20 µs for one of t-digests (feature).
        ``sketches``: the latency / TTFT / output sketches to send (the others go empty): those
        no alert rule reads were a third of the topic's bytes.
        """
        out: dict[str, Any] = {
            "window_start": self.window_start,
            "window_s": self.window_s,
            "key": list(self.key),
            "partition": self.partition,
        }
        for name in _COUNTS + _SUMS:
            out[name] = getattr(self, name)
        out["served"] = sorted(self.served)
        if self.new_flows:
            out["new_flows"] = {str(w): n for w, n in self.new_flows.items()}
        blobs = [sk.to_bytes() if send else b"" for sk, send in zip((self.latency, self.ttft, self.output), sketches,
                                                                       strict=True)]  # fmt: skip
        if self.flows:
            blobs.append(self.flow_ms.to_bytes())
        out["sketch_bytes"] = [len(b) for b in blobs]
        out.update(header)
        return orjson.dumps(out) + b"\n" + b"".join(blobs)

    @classmethod
    def from_wire(cls, value: bytes, sketches: tuple[bool, bool, bool] = (True, True, True)) -> WindowPartial:
        partial = read_wire(value, sketches)[1]
        if partial is None:
            raise ValueError("not a window partial (a watermark heartbeat?)")
        return partial


def read_wire(
    value: bytes, sketches: tuple[bool, bool, bool] = (True, True, True)
) -> tuple[dict[str, Any], WindowPartial | None]:
    """A partials-topic message → (its header, the partial; None for a watermark heartbeat).

    ``sketches``: decode the latency / TTFT / output sketch, or leave it empty. Stage 2 passes
    False for those no rule reads; decoding them was a third of reading a partial. Messages of
    the earlier all-JSON form (sketches base64 strings) still read, so an upgrade mid-stream
    loses no minute.
    """
    cut = value.find(b"\n")
    if cut < 0:
        data = orjson.loads(value)
        if data.get("type") == "watermark":
            return data, None
        wanted = (*sketches, True)
        encoded = (data.get("latency"), data.get("ttft"), data.get("output"), data.get("flow_ms"))
        blobs = [
            QuantileSketch.from_bytes(base64.b64decode(e)) if e and w else QuantileSketch()
            for e, w in zip(encoded, wanted, strict=True)
        ]
        return data, _partial_from(data, blobs)
    view = memoryview(value)
    data = orjson.loads(view[:cut])
    blobs = [QuantileSketch(), QuantileSketch(), QuantileSketch(), QuantileSketch()]
    at = cut + 1
    for i, length in enumerate(data["sketch_bytes"]):
        if length and (i == 3 or sketches[i]):  # flow_ms (only sent where flows finished) is always read
            blobs[i] = QuantileSketch.from_bytes(view[at : at + length])
        at += length
    return data, _partial_from(data, blobs)


def _partial_from(data: dict[str, Any], blobs: list[QuantileSketch]) -> WindowPartial:
    partial = WindowPartial(
        window_start=int(data["window_start"]),
        window_s=int(data["window_s"]),
        key=tuple(data["key"]),
        partition=int(data.get("partition", -1)),
        latency=blobs[0],
        ttft=blobs[1],
        output=blobs[2],  # absent in partials from before drift metrics: an empty sketch, nothing served
        served=set(data.get("served", ())),
        flow_ms=blobs[3],
    )
    _read_numbers(partial, data.get)
    flows = data.get("new_flows")
    if flows:
        partial.new_flows = {int(w): int(n) for w, n in flows.items()}
    return partial


def _compile_read_numbers() -> Callable[[WindowPartial, Callable[..., Any]], None]:
    """``partial.calls = int(get("calls", 0))`` … for every count and sum, as straight-line code.

    Stage 2 decodes one partial per scope key per minute from the partials topic; a setattr loop
    over the 30 names was two thirds of that decode (11.9 → 5.7 µs per partial measured). Built
    from ``_COUNTS``/``_SUMS`` so the field list stays in one place.
    """
    lines = [f"    p.{n} = int(get({n!r}, 0))" for n in _COUNTS]
    lines += [f"    p.{n} = float(get({n!r}, 0.0))" for n in _SUMS]
    namespace: dict[str, Any] = {}
    exec("def read_numbers(p, get):\n" + "\n".join(lines), namespace)  # the names are our constants
    fn: Callable[[WindowPartial, Callable[..., Any]], None] = namespace["read_numbers"]
    return fn


_read_numbers = _compile_read_numbers()


def active_flows(p: WindowPartial, window_s: int) -> float:
    """The flows active in a rule window of ``window_s`` (and calls in none): what absence rules
    judge silence by. Where stage 1 did not count flows for that length, each call counts."""
    n = p.new_flows.get(window_s)
    return float(p.calls if n is None else n + p.lone_calls)


def rate_f(n: float, d: int) -> float | None:
    return n / d if d else None


SKETCH_METRICS: dict[str, str] = {
    "latency_p50_ms": "latency", "latency_p95_ms": "latency", "latency_p99_ms": "latency",
    "ttft_p50_ms": "ttft", "ttft_p95_ms": "ttft", "ttft_p99_ms": "ttft",
    "output_tokens_p50": "output", "output_tokens_p95": "output", "output_tokens_psi": "output",
    "flow_perceived_p50_ms": "flow_ms", "flow_perceived_p95_ms": "flow_ms",
}  # fmt: skip
"""Metrics read from a sketch (and which one)."""


def _q(sketch: str, q: float) -> Callable[[WindowPartial], float | None]:
    return lambda p: getattr(p, sketch).quantile(q)


METRIC_FNS: dict[str, Callable[[WindowPartial], float | None]] = {
    "calls": lambda p: float(p.calls),
    "priced_calls": lambda p: float(p.calls - p.price_missing),
    "priced_flows": lambda p: float(p.flows - p.flow_unpriced),
    "cost_usd": lambda p: p.cost_usd,
    # over the calls with a cost: an unpriced one counted as $0 makes a release without a price look cheap
    "cost_per_call_usd": lambda p: rate_f(p.cost_usd, p.calls - p.price_missing),
    "error_rate": lambda p: rate_f(p.errors, p.calls),
    "timeout_rate": lambda p: rate_f(p.timeouts, p.calls),
    "rate_limited_rate": lambda p: rate_f(p.rate_limited, p.calls),
    "refusal_rate": lambda p: rate_f(p.refusals, p.calls),
    "price_missing": lambda p: float(p.price_missing),
    "input_tokens": lambda p: float(p.input_tokens),
    "output_tokens": lambda p: float(p.output_tokens),
    "output_tokens_avg": lambda p: rate_f(p.output_tokens, p.calls),
    "cached_input_share": lambda p: rate_f(p.cached_input_tokens, p.input_tokens),
    "output_chars_avg": lambda p: rate_f(p.output_chars, p.calls),
    "schema_valid_rate": lambda p: rate_f(p.schema_valid, p.schema_checked),
    "tool_call_rate": lambda p: rate_f(p.tool_call_calls, p.calls),
    "unpinned_model_share": lambda p: rate_f(p.unpinned_calls, p.calls),
    "latency_avg_ms": lambda p: rate_f(p.latency_ms_sum, p.calls),
    "latency_p50_ms": _q("latency", 0.5),
    "latency_p95_ms": _q("latency", 0.95),
    "latency_p99_ms": _q("latency", 0.99),
    "ttft_p50_ms": _q("ttft", 0.5),
    "ttft_p95_ms": _q("ttft", 0.95),
    "ttft_p99_ms": _q("ttft", 0.99),
    "output_tokens_p50": _q("output", 0.5),
    "output_tokens_p95": _q("output", 0.95),
    # need the scope's trailing windows, not just this one: stage 2 supplies them (processors.drift.DriftMemory)
    "output_tokens_psi": lambda p: None,
    "response_models_new": lambda p: None,
    "flows": lambda p: float(p.flows),
    "flow_calls_avg": lambda p: rate_f(p.flow_calls, p.flows),
    "flow_tokens_avg": lambda p: rate_f(p.flow_tokens, p.flows),
    "flow_cost_usd_avg": lambda p: rate_f(p.flow_cost_usd, p.flows - p.flow_unpriced),
    "flow_perceived_avg_ms": lambda p: rate_f(p.flow_ms_sum, p.flows),
    "flow_perceived_p50_ms": _q("flow_ms", 0.5),
    "flow_perceived_p95_ms": _q("flow_ms", 0.95),
    "eval_score": lambda p: rate_f(p.eval_sum, p.eval_count),
    "eval_count": lambda p: float(p.eval_count),
    "thumbs_down_rate": lambda p: rate_f(p.thumbs_down, p.thumbs_up + p.thumbs_down),
    "feedback_count": lambda p: float(p.feedback_count),
    "rating_avg": lambda p: rate_f(p.rating_sum, p.rated),
    "rated": lambda p: float(p.rated),
}
"""The stream's metrics, one function each (``sinks/queries/metrics.py`` has them as SQL)."""

FLOW_METRICS = frozenset(
    ("flows", "flow_calls_avg", "flow_tokens_avg", "flow_cost_usd_avg", "flow_perceived_avg_ms",
     "flow_perceived_p50_ms", "flow_perceived_p95_ms")
)  # fmt: skip
"""Metrics of finished flows (processors.flows): stage 1 tracks flows only when a rule reads one."""

EVIDENCE: dict[str, str] = {
    "eval_score": "eval_count",
    "thumbs_down_rate": "feedback_count",
    "rating_avg": "rated",
    **dict.fromkeys(FLOW_METRICS - {"flows"}, "flows"),
    "cost_per_call_usd": "priced_calls",
    "flow_cost_usd_avg": "priced_flows",
}  # fmt: skip
"""What ``min_calls`` counts for a metric: judged calls for eval scores, feedback for feedback
metrics, finished flows for flow metrics, calls (flows) with a cost for costs per call (flow),
calls for everything else. A window of 50 calls, 40 of them on a model without a price, holds
ten costs: too few to call a spike on."""

CALL_BOUNDED: frozenset[str] = frozenset({"calls", "priced_calls"})
"""Evidence never above a window's calls: a scope with fewer calls than ``min_calls`` has too little."""

UNCOUNTED: frozenset[str] = frozenset({"pipeline_lag_s"})
"""Metrics measured rather than counted from a window's traffic: ``min_calls`` does not apply, and
an alert on one carries no call count (a lag page saying "calls: 50" named a number nobody counted)."""


def project(partials: Iterable[WindowPartial], dims: tuple[str, ...]) -> dict[tuple[Any, ...], WindowPartial]:
    """Merge partials into coarser scopes: ``dims`` ⊆ SCOPE_DIMS, keyed by (window_start, values)."""
    index = [SCOPE_DIMS.index(d) for d in dims]
    out: dict[tuple[Any, ...], WindowPartial] = {}
    for p in partials:
        values = tuple(p.key[i] for i in index)
        key = (p.window_start, *values)
        acc = out.get(key)
        if acc is None:
            acc = out[key] = WindowPartial(p.window_start, p.window_s, values)
        acc.merge(p)
    return out


_MODEL = SCOPE_DIMS.index("model")
_pinned = functools.lru_cache(maxsize=4096)(is_pinned)


def _count_unpinned(partials: list[WindowPartial]) -> list[WindowPartial]:
    """Stage-1 partials are keyed by model among the rest, so whether their calls named an alias is
    one check per partial as its window closes, not one per event."""
    for p in partials:
        if p.calls and not _pinned(p.key[_MODEL]):
            p.unpinned_calls = p.calls
    return partials


class WindowAggregator:
    """Stage 1, per partition. Not thread-safe: one per consumer partition."""

    def __init__(
        self,
        window_s: int = 60,
        lateness_s: float = 120.0,
        partition: int = -1,
        flow_idle_s: float | None = 30.0,
        flow_windows: Iterable[int] = (),
    ) -> None:
        """``flow_idle_s`` None: no flow tracking (it costs ~1.8 µs/event here; runtimes turn it on
        only when a rule reads a flow metric). ``flow_windows``: the absence rules' window lengths
        (s), for which each partial counts its new flows (``WindowPartial.new_flows``); none: no
        flow ids are collected at all."""
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.flows = FlowTracker(flow_idle_s) if flow_idle_s is not None else None
        self.window_s = window_s
        self.lateness_s = lateness_s
        self.partition = partition
        self.max_ts = -math.inf
        self.watermark = -math.inf
        self.late_events = 0
        self._closed_before = -math.inf
        """Windows starting before this have been emitted; their events are late."""
        self._open: dict[int, dict[tuple[str, ...], WindowPartial]] = {}
        self._last_event_wall = 0.0
        self.flow_windows = tuple(sorted({int(w) for w in flow_windows}))
        self._flows_seen: dict[tuple[str, int], tuple[int, set[str]]] = {}
        """(feature, window length) → (the current aligned window's start, the flows seen in it)."""

    @property
    def open_windows(self) -> int:
        return len(self._open)

    @property
    def open_keys(self) -> int:
        return sum(len(v) for v in self._open.values())

    def add(
        self, events: list[WireCall], ts: list[float], costs: Costs, now: float = 0.0, close: bool = True
    ) -> list[WindowPartial]:
        """Fold a batch in; returns the partials of every window this batch closed.

        ``close`` False (a part of a batch, not its last): fold in without moving the watermark,
        so the batch's later parts are judged late against the same closed windows as its first.
        """
        if not events:
            return self.advance(self.max_ts - self.lateness_s) if close else []
        w = self.window_s
        closed_before = self._closed_before
        open_windows = self._open
        cost_usd = costs.cost_usd
        last_ws = -1
        accs: dict[tuple[str, ...], WindowPartial] = {}
        late = 0
        partition = self.partition
        keys: list[tuple[str, ...]] = []
        flows = self.flows  # the scope keys are kept for flow tracking only
        count_flows = bool(self.flow_windows)
        for i, e in enumerate(events):
            t = ts[i]
            ws = int(t // w) * w
            key = (
                e.feature,
                e.team or "",
                e.model,
                e.provider or "",
                e.prompt_version or "",
                e.variant or "",
            )
            if flows is not None:
                keys.append(key)
            if ws < closed_before:
                late += 1
                continue
            if ws != last_ws:
                accs = open_windows.get(ws)  # type: ignore[assignment]
                if accs is None:
                    accs = open_windows[ws] = {}
                last_ws = ws
            p = accs.get(key)
            if p is None:
                p = accs[key] = WindowPartial(ws, w, key, partition)
            p.calls += 1
            status = e.status
            if status != "ok":
                p.errors += 1
                if status == "timeout":
                    p.timeouts += 1
                elif status == "rate_limited":
                    p.rate_limited += 1
            if e.refusal:
                p.refusals += 1
            c = cost_usd[i]
            if c is None:  # ``price_missing``: an unknown model, or a call whose usage is unknown
                p.price_missing += 1
            else:
                p.cost_usd += c
            p.input_tokens += e.input_tokens
            p.output_tokens += e.output_tokens
            p.cached_input_tokens += e.cached_input_tokens
            p.cache_write_tokens += e.cache_write_tokens
            if e.output_chars is not None:
                p.output_chars += e.output_chars
            if e.schema_valid is not None:
                p.schema_checked += 1
                if e.schema_valid:
                    p.schema_valid += 1
            if e.tool_calls:
                p.tool_call_calls += 1
            lat = e.latency_ms
            p.latency_ms_sum += lat
            p.latency.add(lat)
            ttft = e.ttft_ms
            if ttft is not None:
                p.ttft_ms_sum += ttft
                p.ttft.add(ttft)
            p.output.add(e.output_tokens)
            rm = e.response_model
            if rm is not None and rm not in p.served:
                p.served.add(rm)
            if count_flows:
                flow = e.trace_id or e.conversation_id
                if not flow:
                    p.lone_calls += 1
                elif len(ids := p.flow_ids) < FLOW_IDS_KEPT:
                    ids.add(flow)
        self.late_events += late
        if flows is not None:
            flows.add(events, ts, keys, costs, closed_before)
        batch_max = max(ts)
        self.max_ts = max(self.max_ts, batch_max)
        self._last_event_wall = now
        return self.advance(self.max_ts - self.lateness_s) if close else []

    def advance(self, watermark: float) -> list[WindowPartial]:
        """Move the watermark forward (never back) and emit every window it closed."""
        if watermark <= self.watermark:
            return []
        self.watermark = watermark
        if self.flows is not None:
            self._count_flows(self.flows.close(watermark + self.lateness_s))  # event time: the newest event
        closed_starts = sorted(ws for ws in self._open if ws + self.window_s <= watermark)
        boundary = math.floor(watermark / self.window_s) * self.window_s
        self._closed_before = max(self._closed_before, boundary)
        out: list[WindowPartial] = []
        for ws in closed_starts:
            out.extend(self._open.pop(ws).values())
        return _count_unpinned(self._count_new_flows(out))

    def touch(self, now: float) -> None:
        """Count ``now`` as activity: a partition that never sees an event still goes idle (and
        advances by wall clock) once ``idle_timeout`` passes, instead of holding stage 2 back forever."""
        if not self._last_event_wall:
            self._last_event_wall = now

    def behind(self, now: float) -> None:
        """Events wait for this partition upstream (a backlog): it is behind, not idle, whatever
        the time since its last event. The idle countdown starts again when it catches up."""
        self._last_event_wall = now

    def tick(self, now: float, idle_timeout_s: float) -> list[WindowPartial]:
        """Idle partitions advance by wall clock, so quiet features still close windows.

        Only for live sources: a historical replay must not call it, or wall-clock time would
        close windows the replay has not reached yet.
        """
        if self._last_event_wall and now - self._last_event_wall >= idle_timeout_s:
            return self.advance(now - self.lateness_s - idle_timeout_s)
        return []

    def _count_new_flows(self, closed: list[WindowPartial]) -> list[WindowPartial]:
        """Each closing minute's flows against those its feature had earlier in the same (aligned)
        absence window, for each window length: a flow counts once per rule window, however many
        minutes, scope keys (a run switching model) or quiet gaps (a chat's turns) it spans.
        Minutes close oldest first; one set difference per partial and length, not per event."""
        windows = self.flow_windows
        if not windows:
            return closed
        seen = self._flows_seen
        newest = -1
        for p in closed:
            ids = p.flow_ids
            counts: dict[int, int] = {}
            for w in windows:
                aligned = p.window_start - p.window_start % w
                entry = seen.get((p.key[0], w))
                if entry is None or entry[0] != aligned:
                    entry = seen[(p.key[0], w)] = (aligned, set())
                known = entry[1]
                fresh = ids - known if known else ids
                counts[w] = len(fresh)
                if fresh and len(known) < FLOWS_REMEMBERED:
                    known |= fresh
            p.new_flows = counts
            p.flow_ids = set()
            newest = max(newest, p.window_start)
        for k in [k for k, (start, _) in seen.items() if start + k[1] <= newest]:
            del seen[k]  # windows over: what a feature saw there never counts again
        return closed

    def _count_flows(self, flows: list[ClosedFlow]) -> None:
        """Closed flows into the (still open) window of the moment each was known to be over."""
        w = self.window_s
        floor = self._closed_before if math.isfinite(self._closed_before) else -math.inf
        for f in flows:
            if f.calls < 2:
                continue  # one call is not a flow: its latency is the call's own
            ws = int(max(f.known_at // w * w, floor))
            accs = self._open.get(ws)
            if accs is None:
                accs = self._open[ws] = {}
            p = accs.get(f.key)
            if p is None:
                p = accs[f.key] = WindowPartial(ws, w, f.key, self.partition)
            p.flows += 1
            p.flow_calls += f.calls
            p.flow_tokens += f.tokens
            p.flow_ms_sum += f.perceived_ms
            if math.isnan(f.cost_usd):
                p.flow_unpriced += 1
            else:
                p.flow_cost_usd += f.cost_usd
            p.flow_ms.add(f.perceived_ms)

    def flush(self) -> list[WindowPartial]:
        """Emit everything still open (partition revoked, or a finite source ended)."""
        if self.flows is not None:
            self._count_flows(self.flows.flush())
        out: list[WindowPartial] = []
        for ws in sorted(self._open):
            out.extend(self._open[ws].values())
        self._open.clear()
        return _count_unpinned(self._count_new_flows(out))
