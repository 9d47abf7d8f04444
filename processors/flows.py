"""Agent runs and conversation turns as flows, in the stream, so alert rules can watch them.

Multi-step flows compound latency: five calls of 2 s are 10 s for the user, and no single call's
latency shows it. A flow is the calls sharing a ``trace_id`` (an agent run), or else a
``conversation_id``; it ends when no call follows within ``idle_s`` of the previous call's end
(event time), so a conversation splits into turns the way ``sinks/queries/flows_by_feature.sql``
splits it. ``llm.calls`` is keyed by feature, so every call of a flow reaches the same
partition and one tracker per partition sees whole flows.

A flow is known to be over once the partition's event time passes its last end plus ``idle_s``;
it is counted in the window containing that moment (``idle_s`` after it really ended), which is
still open then (the watermark trails event time by the allowed lateness), so closed flows never
land in an emitted window. A rebalance moves a
feature's partition mid-flow: the old owner closes its part at revoke and the new owner starts a
new flow, which counts one flow as two shorter ones (rare, and never more calls than happened).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from processors.pricing import Costs
from schemas.wire import WireCall

# An open flow is a tuple, not an object: most flows are one call long and die unseen, and a tuple
# costs a fraction of a slotted dataclass to create. Fields: the scope key of the flow's first
# call (feature, team, model, provider, prompt, variant), start, end, calls, tokens, cost.
_KEY, _START, _END, _CALLS, _TOKENS, _COST = range(6)


@dataclass(frozen=True, slots=True)
class ClosedFlow:
    key: tuple[str, ...]
    known_at: float
    """When the flow was known to be over (its last end + the idle gap): it is counted in that window."""
    calls: int
    perceived_ms: float
    """First call's start to last call's end: what the user waited."""
    tokens: int
    cost_usd: float
    """NaN when a call of the flow had no cost (unknown model or usage): the flow's cost is unknown,
    not that of its priced calls."""


class FlowTracker:
    """Open flows of one partition. Not thread-safe, like the window aggregator that owns it.

    A flow is over once the partition's newest event time passes its end by ``idle_s``; due
    times are kept in per-second buckets so closing touches only what is due, never every open
    flow. ``max_open`` bounds memory under any traffic: beyond it the flows due soonest are
    closed early (``evicted`` counts them; a flow cut that way may count as two).
    """

    def __init__(self, idle_s: float = 30.0, max_open: int = 200_000) -> None:
        self.idle_s = idle_s
        self.max_open = max_open
        self.evicted = 0
        self._open: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        self._pending: list[ClosedFlow] = []
        self._due: dict[int, list[tuple[str, str, str]]] = {}
        """Second → flows that may be due then (an updated flow is listed again under its new second)."""
        self._seconds: list[int] = []
        """A heap of the keys of ``_due``."""

    @property
    def open_flows(self) -> int:
        return len(self._open)

    def add(
        self,
        events: Sequence[WireCall],
        ts: Sequence[float],
        keys: Sequence[tuple[str, ...]],
        costs: Costs,
        since: float = float("-inf"),
    ) -> None:
        """Fold a batch's calls into their flows; calls with neither trace nor conversation are not flows,
        and calls before ``since`` (late: their window is gone) would only start a stray second flow."""
        flows = self._open
        due = self._due
        cost = costs.cost_usd
        idle = self.idle_s
        nan = math.nan
        for i, e in enumerate(events):
            trace = e.trace_id
            if trace:
                fk = (e.feature, "t", trace)
            elif e.conversation_id:
                fk = (e.feature, "c", e.conversation_id)
            else:
                continue
            start = ts[i]
            if start < since:
                continue
            end = start + e.latency_ms / 1000.0
            f = flows.get(fk)
            if f is not None and start > f[_END] + idle:
                # quiet for longer than the idle gap: a conversation's next turn, or a run resumed
                # after a long wait, is a new flow, within a batch as across batches (where close()
                # has already ended the first one by then)
                del flows[fk]
                if f[_CALLS] > 1:
                    self._pending.append(self._closed(f))
                f = None
            if f is None:
                # a tuple, not a list: tuples of atoms leave the garbage collector's books, and most
                # flows are one call long and are never touched again
                c = cost[i]
                flows[fk] = (keys[i], start, end, 1, e.input_tokens + e.output_tokens, nan if c is None else c)
            else:
                later = end > f[_END]
                c = cost[i]
                total = f[_COST] + (nan if c is None else c)
                flows[fk] = (f[_KEY], min(f[_START], start), end if later else f[_END], f[_CALLS] + 1,
                             f[_TOKENS] + e.input_tokens + e.output_tokens, total)  # fmt: skip
                if not later:
                    continue  # due no later than it already was: listed
            second = int(end + idle)
            bucket = due.get(second)
            if bucket is None:
                bucket = due[second] = []
                heapq.heappush(self._seconds, second)
            bucket.append(fk)

    def _closed(self, f: tuple[Any, ...]) -> ClosedFlow:
        return ClosedFlow(f[_KEY], f[_END] + self.idle_s, f[_CALLS], (f[_END] - f[_START]) * 1000.0, f[_TOKENS],
                          f[_COST])  # fmt: skip

    def close(self, now: float) -> list[ClosedFlow]:
        """Flows over by event time ``now`` (the partition's newest event), plus turns a later call
        already ended. One-call flows are dropped unseen: a single call's latency is its own."""
        out, self._pending = self._pending, []
        flows, due, seconds, idle = self._open, self._due, self._seconds, self.idle_s
        while seconds and seconds[0] + 1 <= now:  # every flow listed under that second is due by now
            second = heapq.heappop(seconds)
            for fk in due.pop(second):
                f = flows.get(fk)
                if f is not None and f[_END] + idle <= now:  # else: updated since, listed again later
                    del flows[fk]
                    if f[_CALLS] > 1:
                        out.append(self._closed(f))
        while len(flows) > self.max_open and seconds:
            second = heapq.heappop(seconds)
            for fk in due.pop(second):
                f = flows.get(fk)
                if f is not None and int(f[_END] + idle) <= second:
                    del flows[fk]
                    self.evicted += 1
                    if f[_CALLS] > 1:
                        out.append(self._closed(f))
        return out

    def flush(self) -> list[ClosedFlow]:
        """Every flow, open or not (partition revoked, or a finite source ended)."""
        out, self._pending = self._pending, []
        out.extend(self._closed(f) for f in self._open.values() if f[_CALLS] > 1)
        self._open.clear()
        self._due.clear()
        self._seconds.clear()
        return out
