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
from pathlib import Path

from processors.alerts.budgets import BudgetTracker, period_bounds, period_label
from processors.alerts.engine import AlertEngine
from processors.alerts.events import AlertEvent
from processors.alerts.stage2 import Owns, RuleWindows, Stage2
from processors.sketch import QuantileSketch
from processors.windows import SCOPE_DIMS, WindowPartial, read_wire
from schemas.channels import ChannelConfig, ConsoleChannelConfig
from schemas.config import ConfigError, Settings
from schemas.rules import Budget, Rule, RulesFile, default_rules, load_rules
from sinks.alert_store import AlertStore
from sinks.alerts import AlertDispatcher
from sinks.clickhouse import Connection
from sinks.kafka import scope_key
from sinks.metrics import PipelineMetrics
from sinks.queries.metrics import metric_over_time

log = logging.getLogger("llmpulse.alerting")

QUALITY_SOURCE = -2
"""Stage-2 source id of quality partials (they carry no watermark)."""


def rules_for(settings: Settings, path: Path | None = None) -> RulesFile:
    chosen = path or settings.alerting.rules_path
    return load_rules(chosen) if chosen else default_rules()


def query_for(rule: Rule, scope: Mapping[str, str], start: float, end: float) -> str:
    return metric_over_time(rule.metric, {**rule.scope.where, **scope}, start, end, int(rule.window))


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
        self.budgets = BudgetTracker(self.rules.budgets)
        self.store = AlertStore(conn)
        chosen = list(channels) if channels is not None else list(settings.alerting.channels)
        if channels is None and not chosen:
            chosen = [ConsoleChannelConfig(name="console", type="console")]
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

    # ---- restart ---------------------------------------------------------------------------

    def restore(self, now: float | None = None) -> list[AlertEvent]:
        """Carry on after a restart: firing alerts stay firing silently, baselines and budgets warm."""
        if self.progress_key:
            saved = self.store.conn.client.query(
                "SELECT value FROM llmpulse_meta FINAL WHERE key = {k:String}", parameters={"k": self.progress_key}
            ).result_rows
            if saved:
                through = float(saved[0][0])
                self.stage2.released_through = self.stage2.restored_through = self._saved_through = through
                self.windows.resume_after(through)
        firing = self._seed(time.time() if now is None else now, None, self.rules.budgets)
        if firing:
            log.info("restored %d firing alert(s): %s", len(firing), ", ".join(e.rule for e in firing))
        return firing

    def assign(self, partitions: Iterable[int], partition_of: Callable[[str], int], now: float | None = None) -> int:
        """Worker: the partials partitions this stage 2 was assigned (every step; acts on a change).

        The partials topic is keyed by scope, so the assignment decides which scopes are this
        worker's. Scopes that went elsewhere are forgotten (``Stage2.keep_scopes``,
        ``RuleWindows.keep_scopes``, budgets); scopes that came here are restored from ClickHouse
        as after a restart, only up to where evaluation is now (later minutes come from the
        partials read again). The first assignment drops what ``restore`` read for other workers'
        scopes: their silence here would page. Returns the scopes dropped."""
        assigned = frozenset(partitions)
        before = self.stage2.inputs
        if assigned == before:
            return 0
        self.stage2.listen_on(assigned)
        for gone in set(self._read_to) - assigned:
            del self._read_to[gone]  # state from it is dropped: merge it again when it comes back
        partition = functools.lru_cache(maxsize=None)(lambda dims, values: partition_of(scope_key(dims, values)))

        def owns(dims: tuple[str, ...], values: tuple[str, ...]) -> bool:
            return partition(dims, values) in assigned

        dropped = self.stage2.keep_scopes(owns) + self.windows.keep_scopes(owns)
        budgets = self.budgets.keep(owns)
        gained = assigned - before if before is not None else frozenset()
        if gained:

            def new(dims: tuple[str, ...], values: tuple[str, ...]) -> bool:
                return partition(dims, values) in gained

            firing = self._seed(time.time() if now is None else now, new, budgets)
            log.info(
                "stage 2 gained partials partitions %s: %d firing alert(s) taken over", sorted(gained), len(firing)
            )
        if before is not None and before - assigned:
            log.info("stage 2 lost partials partitions %s: %d scope(s) forgotten", sorted(before - assigned), dropped)
        return dropped

    def _seed(self, now: float, owns: Owns | None, budgets: Iterable[Budget]) -> list[AlertEvent]:
        """Firing alerts, spike and absence baselines, drift memories and budget spend from
        ClickHouse, for the scopes ``owns`` (None: all). Baselines end where evaluation resumes
        (the rule's last evaluated window; without one, now), budgets at the minutes released:
        what comes after is evaluated from partials read again, and must not count twice."""
        rules = self.engine.rules

        def mine(rule: Rule | None, scope: Mapping[str, str]) -> bool:
            if owns is None:
                return True
            return rule is not None and self.windows.owns_rule_scope(rule, scope, owns)

        firing = [e for e in self.store.firing() if mine(rules.get(e.rule), e.scope)]
        for e in firing:
            self.engine.restore_firing(e.rule, e.scope, e.started_at.timestamp())
        if firing and self.dispatcher is not None:
            self.dispatcher.refresh(firing)  # Alertmanager only: it forgets alerts nobody re-sends
        for rule in rules.values():
            length = rule.spike.baseline if rule.spike else rule.absent.baseline if rule.absent else 0
            if not length:
                continue
            done = self.windows.evaluated_through(rule)
            end = done if done is not None else now - now % rule.window
            for values, history in self.store.recent_values(rule, end, length).items():
                scope = dict(zip(rule.scope.by, values, strict=True))
                if mine(rule, scope):
                    self.engine.seed_history(rule, scope, history)
            if rule.absent is not None:
                since = end - rule.window * length
                for ws, cells in self.store.window_values(rule, since, end).items():
                    for values, (_, calls) in cells.items():
                        if calls > 0 and mine(rule, dict(zip(rule.scope.by, values, strict=True))):
                            self.windows.saw(rule, values, ws)

        def drift_history(
            by: tuple[str, ...], where: dict[str, str], w: int, windows: int, done: int | None
        ) -> Mapping[tuple[str, ...], list[tuple[int, QuantileSketch, set[str]]]]:
            end = done if done is not None else now - now % w
            return self.store.drift_history(by, where, w, end - w * windows, end)

        self.windows.seed_drift(drift_history, owns)  # drift pages from the first window
        through = self.stage2.released_through
        step = self.settings.pipeline.window
        released = through - through % step if math.isfinite(through) else now
        for budget in budgets:
            start, _ = period_bounds(budget.period, now)
            spent = self.store.period_spend(budget, start, min(now, released))
            announced = self.store.announced_thresholds(budget, period_label(budget.period, start))
            self.budgets.seed(budget.name, start, spent, announced)
        return firing

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
        # a gained scope's replayed minutes count toward its open windows; its budget was seeded through them
        events = self.windows.feed(cells, through, self.stage2.take_catch_up()) + self.budgets.feed(cells, through)
        if events:
            self.deliver(events)
        return events

    def check_lag(self, now: float) -> list[AlertEvent]:
        """``pipeline_lag_s`` rules: how far the slowest source's watermark trails the wall clock."""
        lag_rules = [r for r in self.engine.rules.values() if r.metric == "pipeline_lag_s"]
        if not lag_rules or not self.stage2.watermarks:
            return []
        lag = max(0.0, now - min(self.stage2.watermarks.values()))
        events = []
        for rule in lag_rules:
            e = self.engine.evaluate(rule, {}, now - rule.window, now, {"pipeline_lag_s": lag, "calls": math.inf})
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
