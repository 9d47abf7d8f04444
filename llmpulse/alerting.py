"""Alert evaluation wired up: stage 2 → rule windows and budgets → delivery, storage, topic.

The same ``AlertPipeline`` runs in both runtimes. Embedded, it listens to the in-process
stage-1 partials (one source); in the worker it is fed by the partials topic, with every
``llm.calls`` partition as a source. Delivery never blocks evaluation (the dispatcher queues),
every transition is stored in the ``alerts`` table, and a restart restores what is firing so
nobody is paged twice for one incident.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from processors.alerts.budgets import BudgetTracker, period_bounds, period_label
from processors.alerts.engine import AlertEngine
from processors.alerts.events import AlertEvent
from processors.alerts.stage2 import Owns, RuleWindows, Stage2
from processors.drift import BASELINE_WINDOWS
from processors.sketch import QuantileSketch
from processors.windows import SCOPE_DIMS, WindowPartial, read_wire
from schemas.channels import ChannelConfig, ConsoleChannelConfig
from schemas.config import ConfigError, Settings
from schemas.rules import Budget, Rule, RulesFile, check_channels, default_rules, load_rules
from sinks.alert_store import AlertStore
from sinks.alerts import AlertDispatcher
from sinks.clickhouse import Connection
from sinks.kafka import scope_key
from sinks.metrics import PipelineMetrics
from sinks.queries.metrics import metric_over_time

log = logging.getLogger("llmpulse.alerting")

DriftWindows = Mapping[tuple[str, ...], list[tuple[int, QuantileSketch, set[str]]]]

MAX_REPLAY_S = 6 * 3600
"""Commits hold behind open rule windows, but never more than this (the partials topic keeps a
day): a longer window open across a restart is evaluated from the minutes read after it."""

QUALITY_SOURCE = -2
"""Stage-2 source id of quality partials (they carry no watermark)."""


def rules_for(settings: Settings, path: Path | None = None) -> RulesFile:
    chosen = path or settings.alerting.rules_path
    return load_rules(chosen) if chosen else default_rules()


def query_for(rule: Rule, scope: Mapping[str, str], start: float, end: float) -> str:
    return metric_over_time(rule.metric, {**rule.scope.where, **scope}, start, end, int(rule.window))


@dataclass
class _Seed:
    """Stage 2's state for some scopes as ClickHouse holds it (``AlertPipeline._read_seed``)."""

    firing: list[AlertEvent]
    history: list[tuple[Rule, dict[str, str], list[tuple[float, float]]]] = field(default_factory=list)
    seen: list[tuple[Rule, tuple[str, ...], int]] = field(default_factory=list)
    drift: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...], int], DriftWindows] = field(default_factory=dict)
    budgets: list[tuple[str, float, float, set[float]]] = field(default_factory=list)


class AlertPipeline:
    def __init__(
        self,
        settings: Settings,
        conn: Connection,
        *,
        rules: RulesFile | None = None,
        sources: Iterable[int] | None = None,
        channels: Sequence[ChannelConfig] | None = None,
        publish: Callable[[list[AlertEvent]], None] | None = None,
        progress_key: str | None = None,
        metrics: PipelineMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.rules = rules or rules_for(settings)
        self.engine = AlertEngine(self.rules.rules, query_for=query_for)
        self.windows = RuleWindows(self.engine)
        self.stage2 = Stage2(sources)
        self.bad_messages = 0
        """Partials-topic messages that could not be read (logged and skipped)."""
        self._read_to: dict[int, int] = {}
        """Per partials-topic partition, the offset after the last message merged (``on_wire``)."""
        self._restored = False
        """Whether progress and state were read back (``restore``, or the worker's first ``assign``)."""
        self.budgets = BudgetTracker(self.rules.budgets)
        self.store = AlertStore(conn)
        chosen = list(channels) if channels is not None else list(settings.alerting.channels)
        if channels is None and not chosen:
            chosen = [ConsoleChannelConfig(name="console", type="console")]
        check_channels(self.rules, {c.name for c in chosen}, str(settings.alerting.rules_path or "rules"))
        try:
            self.dispatcher = AlertDispatcher(chosen) if chosen else None
        except ValueError as exc:  # a secret that is configured but not there
            raise ConfigError(f"alerting.channels: {exc}") from exc
        self.publish = publish
        self.progress_key = f"alerts_evaluated_through:{progress_key}" if progress_key else None
        """llmpulse_meta key of the stream time alerts were evaluated through (survives restarts)."""
        self._saved_through = -math.inf
        self.delivered: list[AlertEvent] = []
        self.metrics = metrics
        self.link = settings.alerting.dashboard_url
        self._owns: Owns | None = None
        """The scopes this stage 2 owns (``assign``); None: every scope (embedded, ``restore``)."""

    # ---- restart ---------------------------------------------------------------------------

    def restore(self, now: float | None = None) -> list[AlertEvent]:
        """Carry on after a restart, for a stage 2 that owns every scope: firing alerts stay firing
        silently, baselines and budgets warm. (The worker restores at its first assignment
        instead, only the scopes it owns: ``assign``.)"""
        through = self._read_progress()
        seed = self._read_seed(time.time() if now is None else now, None, self.rules.budgets, through)
        self._resume(through)
        self._apply_seed(seed, None)
        if seed.firing and self.dispatcher is not None:
            self.dispatcher.refresh(seed.firing)  # Alertmanager only: it forgets alerts nobody re-sends
        if seed.firing:
            log.info("restored %d firing alert(s): %s", len(seed.firing), ", ".join(e.rule for e in seed.firing))
        return seed.firing

    def _read_progress(self) -> float:
        """How far evaluation got, as last saved (``save_progress``); -inf: never."""
        if not self.progress_key:
            return -math.inf
        saved = self.store.conn.client.query(
            "SELECT value FROM llmpulse_meta FINAL WHERE key = {k:String}", parameters={"k": self.progress_key}
        ).result_rows
        return float(saved[0][0]) if saved else -math.inf

    def _resume(self, through: float) -> None:
        self._restored = True
        if math.isfinite(through):
            self.stage2.released_through = self.stage2.restored_through = self._saved_through = through
            self.windows.resume_after(through)

    def assign(self, partitions: Iterable[int], partition_of: Callable[[str], int], now: float | None = None) -> int:
        """Worker: the partials partitions this stage 2 is assigned, every step (acts on a change).
        Returns the scopes forgotten.

        The partials topic is keyed by scope, so the assignment decides which scopes are this
        worker's. The first assignment restores them from ClickHouse (only them: the others'
        silence here would page), from the progress saved by then. Later, scopes that went
        elsewhere are forgotten (``Stage2.keep_scopes``, ``RuleWindows.keep_scopes``, budgets),
        and scopes that came here are restored as after a restart, up to where evaluation stands
        here (later minutes come from the partials read again). Alertmanager is then told to
        re-announce exactly the firing alerts this worker owns: the scopes that left are their
        new owner's to resolve. Every ClickHouse read comes before any change, so a failure
        changes nothing, and the next step, still seeing a new assignment, tries again.
        """
        assigned = frozenset(partitions)
        before = self.stage2.inputs
        if assigned == before:
            return 0
        now = time.time() if now is None else now
        partition = functools.lru_cache(maxsize=None)(lambda dims, values: partition_of(scope_key(dims, values)))

        def owns(dims: tuple[str, ...], values: tuple[str, ...]) -> bool:
            return partition(dims, values) in assigned

        # Restored as at a start when nothing was held before: the first assignment, or the first
        # after holding none (more workers than partials partitions), when evaluation here stood
        # still and the group's saved progress moved on.
        first = not self._restored or (before is not None and not before)
        through = max(self._read_progress(), self.stage2.released_through) if first else self.stage2.released_through
        # restore() already read every scope back when this is the first assignment after it
        gained = assigned if first else assigned - before if before is not None else frozenset()

        def new(dims: tuple[str, ...], values: tuple[str, ...]) -> bool:
            return partition(dims, values) in gained

        budgets = [b for b in self.budgets.budgets if new(*BudgetTracker.cell(b))]
        # reads
        firing = self.store.firing()
        seed = self._read_seed(now, new, budgets, through, firing) if gained else None
        # changes
        self.windows.full_grain = self.budgets.full_grain = False  # the worker: every scope at its own grain
        if first:
            self._resume(through)
        self.stage2.listen_on(assigned)
        for gone in set(self._read_to) - assigned:
            del self._read_to[gone]  # its state is dropped: merge it again when it comes back
        cells = self.stage2.keep_scopes(owns)
        forgotten = self.windows.keep_scopes(owns)
        self.budgets.keep(owns)
        self._owns = owns
        if before is not None and before - assigned:
            log.info(
                "stage 2 lost partials partitions %s: %d scope(s) and %d open cell(s) forgotten",
                sorted(before - assigned), forgotten, cells,
            )  # fmt: skip
        if seed is not None:
            self._apply_seed(seed, new)
            log.info(
                "stage 2 %s partials partitions %s: %d firing alert(s) %s",
                "restored" if first else "gained", sorted(gained), len(seed.firing),
                "restored" if first else "taken over",
            )  # fmt: skip
        if self.dispatcher is not None:
            mine = [e for e in firing if self._mine(e.rule, e.scope, owns)]
            self.dispatcher.refresh(mine)
        return forgotten

    def _mine(self, name: str, scope: Mapping[str, str], owns: Owns | None) -> bool:
        """Whether a stored alert is this stage 2's (``RuleWindows.owns_rule_scope``)."""
        rule = self.engine.rules.get(name)
        if owns is None:
            return True
        if rule is None:
            return False
        return self.windows.owns_rule_scope(rule, scope, owns)

    def _read_seed(
        self,
        now: float,
        owns: Owns | None,
        budgets: Iterable[Budget],
        through: float,
        firing: list[AlertEvent] | None = None,
    ) -> _Seed:
        """What restores the scopes ``owns`` (None: all) from ClickHouse: firing alerts, spike and
        absence baselines, absence last-seen windows, drift memories and budget spend. Only reads.

        Everything ends where evaluation stands (``through``; without it, now): later minutes
        are evaluated from the partials read again, and must not count twice."""

        def end_for(w: float) -> float:
            t = through if math.isfinite(through) else now
            return t - t % w

        stored = self.store.firing() if firing is None else firing
        seed = _Seed([e for e in stored if self._mine(e.rule, e.scope, owns)])
        for rule in self.engine.rules.values():
            length = rule.spike.baseline if rule.spike else rule.absent.baseline if rule.absent else 0
            if not length:
                continue
            end = end_for(rule.window)
            # an absence rule's windows come from the raw calls: read once for both uses
            windows = self.store.window_values(rule, end - rule.window * length, end) if rule.absent else None
            for values, history in self.store.recent_values(rule, end, length, windows).items():
                scope = dict(zip(rule.scope.by, values, strict=True))
                if self._mine(rule.name, scope, owns):
                    seed.history.append((rule, scope, history))
            if windows is not None:
                for ws, cells in windows.items():
                    for values, (_, calls) in cells.items():
                        if calls > 0 and self._mine(rule.name, dict(zip(rule.scope.by, values, strict=True)), owns):
                            seed.seen.append((rule, values, ws))
        for by, where, w in self.windows.drift_scopes():
            end = end_for(w)
            seed.drift[(by, tuple(sorted(where.items())), w)] = self.store.drift_history(
                by, where, w, end - w * BASELINE_WINDOWS, end
            )
        step = self.settings.pipeline.window
        released = through - through % step if math.isfinite(through) else now
        for budget in budgets:
            start, _ = period_bounds(budget.period, now)
            spent = self.store.period_spend(budget, start, min(now, released))
            announced = self.store.announced_thresholds(budget, period_label(budget.period, start))
            seed.budgets.append((budget.name, start, spent, announced))
        return seed

    def _apply_seed(self, seed: _Seed, owns: Owns | None) -> None:
        for e in seed.firing:
            self.engine.restore_firing(e.rule, e.scope, e.started_at.timestamp())
        for rule, scope, history in seed.history:
            self.engine.seed_history(rule, scope, history)
        for rule, values, ws in seed.seen:
            self.windows.saw(rule, values, ws)
        # the drift rules' trailing windows: drift pages from the first window
        self.windows.seed_drift(lambda by, where, w, _: seed.drift[(by, tuple(sorted(where.items())), w)], owns)
        for name, start, spent, announced in seed.budgets:
            self.budgets.seed(name, start, spent, announced)

    def progress_due(self) -> bool:
        """Whether ``save_progress`` would write (evaluation entered a new minute since the last save)."""
        through = self.stage2.released_through
        if not (self.progress_key and math.isfinite(through) and through > self._saved_through):
            return False
        step = self.settings.pipeline.window
        return not (math.isfinite(self._saved_through) and through // step == self._saved_through // step)

    def save_progress(self) -> bool:
        """Record how far evaluation got, so a restart neither re-evaluates nor skips a window.

        Only when ``through`` enters a new minute: a restart floors it to the minute anyway
        (``RuleWindows.resume_after``; no minute ends between two values in one minute, so
        nothing counts late differently). Saving every step cost an insert per watermark move —
        ten a second at ~11 ms of chDB CPU each (measured), more than evaluating the rules.
        """
        if not self.progress_due():
            return False
        through = self.stage2.released_through
        self.store.conn.client.insert(
            f"{self.store.conn.database}.llmpulse_meta",
            [[self.progress_key, repr(through)]],
            column_names=["key", "value"],
        )
        self._saved_through = through
        return True

    # ---- feeding -----------------------------------------------------------------------------

    def on_partials(self, partials: list[WindowPartial], source: int, watermark: float) -> list[AlertEvent]:
        """Embedded runtime: full-grain partials of one source, then evaluate what became final."""
        for p in partials:
            self.stage2.add(SCOPE_DIMS, p, source, None)
        self.stage2.heartbeat(source, watermark)
        return self.evaluate()

    def on_wire(self, messages: Iterable[tuple[int, int, bytes]]) -> int:
        """Worker: partials-topic messages as (topic partition, offset, value); returns partials read.

        Watermark heartbeats only move time. Each partial carries the topic position it came
        from, so stage 2 can pin commits below the oldest minute it still needs. A rebalance sets
        every assigned partition back to its committed offset, so messages this process has
        merged already come again: they are skipped by offset.
        """
        stage2, sketches, read_to = self.stage2, self.windows.sketches, self._read_to
        read = 0
        for partition, offset, value in messages:
            if offset < read_to.get(partition, 0):
                continue  # read again after a rebalance (from the commit, pinned behind open minutes): merged already
            read_to[partition] = offset + 1
            try:
                body, partial = read_wire(value, sketches)
                if partial is None:
                    stage2.heartbeat(int(body["partition"]), float(body["watermark"]), partition)
                    continue
                watermark = body["watermark"]  # None from judge scores and feedback: they never move time
                stage2.add(tuple(body["scope_dims"]), partial, int(body["partition"]),
                           None if watermark is None else float(watermark), (partition, offset))  # fmt: skip
            except (ValueError, KeyError, TypeError) as exc:  # one bad message must not cost the rest of the fetch
                self.bad_messages += 1
                log.warning("partials message at %d/%d skipped: %r", partition, offset, exc)
                continue
            read += 1
        return read

    def add_quality(self, partials: list[WindowPartial]) -> None:
        """Judge scores and feedback, windowed by arrival: they add to scopes, never move watermarks."""
        for p in partials:
            self.stage2.add(SCOPE_DIMS, p, QUALITY_SOURCE, None)

    def evaluate(self) -> list[AlertEvent]:
        cells, through = self.stage2.release()
        if not math.isfinite(through):
            return []
        # replayed minutes (a restart, a gained scope) count toward the open windows; budgets were
        # seeded through them
        events = self.windows.feed(cells, through, self.stage2.take_catch_up()) + self.budgets.feed(cells, through)
        self.stage2.hold_released(max(self.windows.open_since(), through - MAX_REPLAY_S))
        if events:
            self.deliver(events)
        return events

    def check_lag(self, now: float) -> list[AlertEvent]:
        """``pipeline_lag_s`` rules: how far the slowest source's watermark trails the wall clock.

        One stage 2 of a group evaluates them: the owner of the group-wide scope's partials
        partition (``RuleWindows.owns_rule_scope``). Every stage 2 sees every source's watermark,
        but each worker evaluating them under the one alert identity made a lagging worker's page
        be resolved by the next worker to restore it, and re-opened by the first. A stage 2 whose
        own partials backlog grows shows in Prometheus (``LlmpulseConsumerLagGrowing``)."""
        lag_rules = [
            r for r in self.engine.rules.values() if r.metric == "pipeline_lag_s" and self._mine(r.name, {}, self._owns)
        ]
        if not lag_rules or not self.stage2.watermarks:
            return []
        # a partition read again from its commit carries old watermarks until the replay is done;
        # evaluation itself stands at released_through
        lag = max(0.0, now - max(min(self.stage2.watermarks.values()), self.stage2.released_through))
        events = []
        for rule in lag_rules:
            # lag needs no calls as evidence (``UNCOUNTED``), and the alert names none
            e = self.engine.evaluate(rule, {}, now - rule.window, now, {"pipeline_lag_s": lag})
            if e is not None:
                events.append(e)
        if events:
            self.deliver(events)
        return events

    def deliver(self, events: list[AlertEvent]) -> None:
        stamped = time.time()
        for e in events:  # when stage 2 decided: what "alert latency" is measured from
            e.extra.setdefault("evaluated_at", stamped)
        if self.link:
            events = [_with_link(e, self.link) for e in events]
        if self.dispatcher is not None:
            for e in events:
                self.dispatcher.dispatch(e)
        try:
            self.store.write(events)
        except Exception:  # the alert went out; losing its history row must not stop evaluation
            log.exception("could not store %d alert(s) in ClickHouse", len(events))
        if self.publish is not None:
            self.publish(events)
        self.delivered.extend(events)
        for e in events:
            log.warning("%s", e.summary)
            if self.metrics is not None:
                self.metrics.alert(e.rule, e.state, e.severity)

    def close(self, timeout: float = 5.0) -> None:
        if self.dispatcher is not None:
            self.dispatcher.close(timeout)


def _with_link(e: AlertEvent, link: str) -> AlertEvent:
    from dataclasses import replace

    return replace(e, link=link)
