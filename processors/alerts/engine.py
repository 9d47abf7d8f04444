"""AlertEngine: the per-(rule, scope) state machine that decides when on-call hears about it.

ok → pending → firing → resolved (→ ok). A window breaches or clears by the rule's
condition; ``for`` breaching windows in a row fire, ``clear_for`` clear windows in a row
resolve, and a threshold alert only clears once the value is ``hysteresis`` back inside the
limit — so a value hovering at the limit neither flaps nor re-pages. ``cooldown`` keeps a
resolved alert from firing again too soon. Windows with fewer than ``min_calls`` calls carry no
evidence: they neither breach nor clear. Spike baselines learn only from windows that did not
breach, so a lasting regression keeps firing until it is fixed instead of becoming the new normal.

Pure: it takes metric values per window and returns AlertEvents; the runtime stores state,
delivers, and feeds it windows (live from stage 2, or historical ones for a backtest).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import xxhash

from processors.alerts.events import AlertEvent
from processors.stats import clamped_rate
from processors.windows import EVIDENCE, UNCOUNTED
from schemas.rules import Rule, is_rate

State = Literal["ok", "pending", "firing"]
QueryFor = Callable[[Rule, Mapping[str, str], float, float], str | None]


def dedup_key(rule_name: str, scope: Mapping[str, str]) -> str:
    """Stable across restarts and processes: the same incident stream always has the same key."""
    text = rule_name + "\x1e" + "\x1f".join(f"{k}={v}" for k, v in sorted(scope.items()))
    return "llmpulse-" + xxhash.xxh3_64_hexdigest(text.encode())


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


@dataclass(slots=True)
class KeyState:
    """One per (rule, scope) a rule has looked at: 250k for 25 spike rules over 10k keys, so it is
    small. Slots and a list instead of a ``__dict__`` and a ``deque(maxlen)`` (which allocates a
    64-slot block at once): 912 → 160 bytes each, created in half the time."""

    state: State = "ok"
    breaches: int = 0
    clears: int = 0
    firing_since: float | None = None
    first_breach_start: float | None = None
    last_resolved: float | None = None
    last_value: float | None = None
    history: list[tuple[float, float]] = field(default_factory=list)
    """(value, calls) of baseline windows (spike), or (calls, active flows) per window (absent): the last
    ``history_len(rule)``, oldest first."""

    def remember(self, entry: tuple[float, float], keep: int) -> None:
        history = self.history
        history.append(entry)
        if len(history) > keep:
            del history[: len(history) - keep]


def history_len(rule: Rule) -> int:
    """Windows of history a rule's state keeps (its spike or absence baseline)."""
    return rule.spike.baseline if rule.spike else rule.absent.baseline if rule.absent else 1


@dataclass(frozen=True, slots=True)
class Verdict:
    breach: bool
    clear: bool
    baseline: float | None = None
    note: str = ""
    value: float = math.nan
    ratio: bool = False
    """A spike rule with a ratio: the detail shows value / baseline."""
    z: float | None = None
    silence: tuple[float, float] | None = None
    """Absence: (calls before, chance of a silent window)."""

    @property
    def detail(self) -> str:
        """Why, for the alert's summary: built only for the few windows that fire or resolve (it
        was a fifth of judging a window when every window formatted it)."""
        if self.silence is not None:
            had, p0 = self.silence
            return f"{had:.0f} calls before; a silent window had p={p0:.1g}"
        parts = [self.note] if self.note else []
        if self.ratio and self.baseline is not None:
            level = self.baseline
            parts.append(f"{self.value / level:.2f}× baseline {level:.4g}" if level else f"baseline {level:.4g}")
        if self.z is not None:
            parts.append(f"z {self.z:.1f}")
        return "; ".join(parts)


def _baseline(rule: Rule, history: list[tuple[float, float]]) -> float | None:
    """The history's level, or None when there is not enough of it yet.

    For a rate the level is the pooled rate (all baseline calls together), not the median of
    per-window rates, which small windows make jumpy.
    """
    spike = rule.spike
    assert spike is not None
    need = spike.min_baseline if spike.min_baseline is not None else max(3, spike.baseline // 2)
    if len(history) < need:
        return None
    if is_rate(rule.metric):
        weight = total = 0.0
        for v, c in history:
            weight += c
            total += v * c
        if weight:
            return total / weight
        return math.fsum(v for v, _ in history) / len(history)
    if spike.method == "median":
        return statistics.median([v for v, _ in history])
    values = [v for v, _ in history]
    alpha = 2 / (len(values) + 1)
    level = values[0]
    for v in values[1:]:
        level = alpha * v + (1 - alpha) * level
    return level


def _zscore(rule: Rule, value: float, calls: float, level: float, history: list[tuple[float, float]]) -> float:
    """How unusual the window is: binomial standard error for a rate, spread of history otherwise.

    Plain floats: statistics.pstdev computes exactly with Fractions, ~40 µs for 24 values, and
    this runs for every z-score rule's scope every window.
    """
    if is_rate(rule.metric) and calls > 0:
        p = clamped_rate(level, calls)  # a 0% or 100% baseline is not certainty
        return (value - p) / math.sqrt(p * (1 - p) / calls)
    n = len(history)
    mean = math.fsum(v for v, _ in history) / n
    stdev = math.sqrt(math.fsum((v - mean) * (v - mean) for v, _ in history) / n) if n > 1 else 0.0
    if stdev > 0:
        return (value - mean) / stdev
    return 0.0 if value == mean else math.copysign(math.inf, value - mean)  # a perfectly flat baseline


def silence_probability(counts: list[float]) -> float:
    """Chance of a window with no calls given these windows' counts: Poisson at their mean, or,
    where they vary more than Poisson allows (bursty traffic), the negative binomial with their
    mean and variance."""
    n = len(counts)
    if n == 0:
        return 1.0
    mean = math.fsum(counts) / n
    if mean <= 0:
        return 1.0
    var = math.fsum((c - mean) * (c - mean) for c in counts) / n
    if var <= mean:
        return math.exp(-mean)
    return float((mean / var) ** (mean * mean / (var - mean)))


def judge(rule: Rule, value: float, st: KeyState, calls: float = 0.0) -> Verdict:
    """Does this window breach, and (for a firing alert) is it clear enough to count toward a resolve?

    A spike rule with both ``ratio`` and ``zscore`` needs both: the move must be big *and*
    unlikely to be noise.
    """
    h = rule.hysteresis
    if rule.spike is not None:
        level = _baseline(rule, st.history)
        if level is None:
            return Verdict(False, True, None, "learning the baseline")
        spike = rule.spike
        up = spike.direction in ("up", "both")
        down = spike.direction in ("down", "both")
        breach = clear = True
        big_enough = abs(value - level) > spike.min_delta
        if spike.ratio is not None:
            hi, lo = spike.ratio * level, level / spike.ratio
            breach = ((up and value > hi) or (down and value < lo)) and big_enough
            if up:
                clear = value <= hi * (1 - h)
            if down:
                clear = clear and value >= lo * (1 + h)
        z = None
        if spike.zscore is not None:
            z = _zscore(rule, value, calls, level, st.history)
            breach = breach and ((up and z > spike.zscore) or (down and -z > spike.zscore)) and big_enough
            clear = clear and abs(z) <= spike.zscore * (1 - h)
        return Verdict(breach, clear and not breach, level, value=value, ratio=spike.ratio is not None, z=z)
    breach = False
    clear = True
    if rule.max is not None:
        breach = breach or value > rule.max
        clear = clear and value <= rule.max - h * abs(rule.max)
    if rule.min is not None:
        breach = breach or value < rule.min
        clear = clear and value >= rule.min + h * abs(rule.min)
    return Verdict(breach, clear and not breach)


class AlertEngine:
    def __init__(self, rules: Iterable[Rule], query_for: QueryFor | None = None) -> None:
        self.rules = {r.name: r for r in rules}
        self.query_for = query_for
        self.states: dict[tuple[str, tuple[tuple[str, str], ...]], KeyState] = {}

    def state(self, rule: Rule, scope: Mapping[str, str], key: tuple[tuple[str, str], ...] | None = None) -> KeyState:
        key_ = (rule.name, key if key is not None else tuple(sorted(scope.items())))
        st = self.states.get(key_)
        if st is None:
            st = self.states[key_] = KeyState()
        return st

    def restore_firing(self, rule_name: str, scope: Mapping[str, str], since: float) -> None:
        """After a restart: this alert is already firing and on-call already knows."""
        rule = self.rules.get(rule_name)
        if rule is None:
            return
        st = self.state(rule, scope)
        st.state, st.firing_since, st.breaches = "firing", since, rule.for_

    def seed_history(self, rule: Rule, scope: Mapping[str, str], windows: Iterable[tuple[float, float]]) -> None:
        """Warm a spike/absence baseline from history (ClickHouse rollups) after a restart: (value,
        calls) for a spike rule, (calls, active flows) for an absence rule."""
        st = self.state(rule, scope)
        keep = history_len(rule)
        for value, calls in windows:
            st.remember((value, calls), keep)

    def firing(self) -> list[tuple[str, tuple[tuple[str, str], ...], KeyState]]:
        return [(name, scope, st) for (name, scope), st in self.states.items() if st.state == "firing"]

    def evaluate(
        self,
        rule: Rule,
        scope: Mapping[str, str],
        window_start: float,
        window_end: float,
        metrics: Mapping[str, float | None],
        key: tuple[tuple[str, str], ...] | None = None,
    ) -> AlertEvent | None:
        """Feed one closed window of one scope; returns the transition it caused, if any.

        ``key`` (the scope as sorted items) saves rebuilding it when the caller has it already.
        """
        calls = int(metrics.get(EVIDENCE.get(rule.metric, "calls")) or 0)
        if rule.absent is None and calls < rule.min_calls and rule.metric not in UNCOUNTED:
            return None  # no evidence either way: not even worth looking up the state
        if rule.spike is None and rule.absent is None:
            # fast path for the common case: a threshold not crossed by a scope with nothing going on
            value = metrics.get(rule.metric)
            if value is None:
                return None
            if not ((rule.max is not None and value > rule.max) or (rule.min is not None and value < rule.min)):
                existing = self.states.get((rule.name, key if key is not None else tuple(sorted(scope.items()))))
                if existing is None or existing.state == "ok":
                    return None
        st = self.state(rule, scope, key)
        if rule.absent is not None:
            # Silence pages only a scope whose traffic made it improbable: calls in every one of
            # the last ``min_active_windows`` windows, enough of them, and a silent window unlikely
            # under the baseline's own mean and spread. A bursty scope (agent runs, a nightly
            # batch) is quiet between bursts as a matter of course. Like spike baselines, the
            # history learns only from windows that did not breach, so an outage neither erodes
            # the baseline (``for``, cooldown and long outages still see the traffic before it)
            # nor resolves while still silent.
            # The odds are those of the flows active in each window (``active_flows``: an agent
            # run or conversation is one, however many calls it makes), not of calls: counted in
            # calls, a feature with three six-call runs per window looked steady at 18 and paged
            # for every quiet window, several times a day.
            had = sum(c for c, _ in st.history)
            need = rule.absent.min_active_windows or rule.absent.baseline
            recent = st.history[-need:]
            ok = len(recent) >= need and all(c for c, _ in recent)
            p0 = silence_probability([a for _, a in recent]) if ok else 1.0
            armed = had >= rule.absent.min_baseline_calls and p0 <= rule.absent.max_silence_probability
            breach = calls == 0 and armed
            verdict = Verdict(breach, not breach, had / max(len(st.history), 1), silence=(had, p0))
            if not breach:
                flows = metrics.get("active_flows")  # None: a caller without them (each call counts)
                st.remember((float(calls), float(calls if flows is None else flows)), rule.absent.baseline)
            return self._step(rule, scope, st, verdict, float(calls), window_start, window_end, metrics)
        value = metrics.get(rule.metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None  # no evidence either way
        verdict = judge(rule, value, st, calls)
        if rule.spike is not None and not verdict.breach:
            st.remember((value, float(calls)), rule.spike.baseline)
        return self._step(rule, scope, st, verdict, value, window_start, window_end, metrics)

    def _step(
        self,
        rule: Rule,
        scope: Mapping[str, str],
        st: KeyState,
        verdict: Verdict,
        value: float,
        start: float,
        end: float,
        metrics: Mapping[str, float | None],
    ) -> AlertEvent | None:
        st.last_value = value
        if st.state in ("ok", "pending"):
            if not verdict.breach:
                st.state, st.breaches, st.first_breach_start = "ok", 0, None
                return None
            st.breaches += 1
            if st.first_breach_start is None:
                st.first_breach_start = start
            cooling = st.last_resolved is not None and end - st.last_resolved < rule.cooldown
            if st.breaches < rule.for_ or cooling:
                st.state = "pending"
                return None
            st.state, st.clears, st.firing_since = "firing", 0, end
            return self._event(rule, scope, st, "firing", value, verdict, start, end, metrics)
        # firing
        if verdict.clear:
            st.clears += 1
            if st.clears >= rule.clear_for:
                event = self._event(rule, scope, st, "resolved", value, verdict, start, end, metrics)
                st.state, st.breaches, st.clears, st.last_resolved = "ok", 0, 0, end
                st.firing_since, st.first_breach_start = None, None
                return event
        else:
            st.clears = 0
        return None

    def _event(
        self,
        rule: Rule,
        scope: Mapping[str, str],
        st: KeyState,
        state: Literal["firing", "resolved"],
        value: float,
        verdict: Verdict,
        start: float,
        end: float,
        metrics: Mapping[str, float | None],
    ) -> AlertEvent:
        scope_text = ", ".join(f"{k}={v}" for k, v in sorted(scope.items())) or "all traffic"
        shown = f"{value:.4g}"
        detail = verdict.detail
        why = f" ({detail})" if detail else ""
        if state == "firing":
            summary = f"[{rule.severity}] {rule.name}: {rule.metric} {shown}{why} on {scope_text}"
        else:
            summary = f"[resolved] {rule.name}: {rule.metric} back to {shown} on {scope_text}"
        assert st.firing_since is not None
        query_start = (st.first_breach_start or start) - 6 * rule.window
        return AlertEvent(
            dedup_key=dedup_key(rule.name, scope),
            rule=rule.name,
            state=state,
            severity=rule.severity,
            action=rule.effective_action,
            metric=rule.metric,
            value=value,
            condition=rule.describe(),
            scope=dict(scope),
            labels={**dict(scope), **rule.labels},
            window_start=_utc(start),
            window_end=_utc(end),
            started_at=_utc(st.firing_since),
            ended_at=_utc(end) if state == "resolved" else None,
            summary=summary,
            description=rule.description,
            runbook_url=rule.runbook_url,
            query=self.query_for(rule, scope, query_start, end) if self.query_for else None,
            channels=tuple(rule.channels),
            extra={
                "calls": metrics.get("calls"),
                "baseline": verdict.baseline,
                "first_breach_window_start": _utc(st.first_breach_start).isoformat() if st.first_breach_start else None,
            },
        )
