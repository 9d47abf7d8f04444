"""Grafana's side of a panel query, reproduced for tests: load the provisioned dashboards and
datasources, and expand template variables and the ClickHouse plugin's macros to the SQL the
server would receive.

The expansions follow the plugin (grafana-clickhouse-datasource v4): in the browser
``$__conditionalAll(condition, $var)`` becomes ``1=1`` when the variable is at *All*, then the
variables are interpolated (``${var:singlequote}`` → ``'a','b'``); on the backend
``$__timeFilter(col)`` → ``col >= toDateTime(from) AND col <= toDateTime(to)``,
``$__fromTime``/``$__toTime`` → ``toDateTime(...)``, ``$__timeInterval(col)`` →
``toStartOfInterval(toDateTime(col), INTERVAL n second)`` and ``$__interval_s`` → ``n``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"
CLICKHOUSE_TYPE = "grafana-clickhouse-datasource"
PROMETHEUS_TYPE = "prometheus"

ALL: None = None
"""A variable selection of *All*."""


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def provisioned_datasources() -> dict[str, dict[str, Any]]:
    """uid → datasource, from every provisioning file Grafana would read."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.y*ml")):
        for ds in yaml.safe_load(path.read_text()).get("datasources", []):
            found[ds["uid"]] = ds
    return found


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data (rows unfolded, collapsed or not)."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def targets(dashboard: dict[str, Any], ds_type: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if (target.get("datasource") or panel["datasource"])["type"] == ds_type:
                yield panel, target


@dataclass(frozen=True)
class TimeRange:
    start: int
    """Epoch seconds, like Grafana's ``from``."""
    end: int
    interval_s: int


def expand_clickhouse(sql: str, selections: dict[str, list[str] | None], tr: TimeRange) -> str:
    """The SQL the ClickHouse server receives for ``selections`` (variable → values, or ``ALL``)."""
    sql = _replace_macro(sql, "conditionalAll", lambda args: _conditional_all(args, selections))
    sql = _interpolate(sql, selections)
    sql = _replace_macro(
        sql, "timeFilter", lambda a: f"{a[0]} >= toDateTime({tr.start}) AND {a[0]} <= toDateTime({tr.end})"
    )
    sql = _replace_macro(
        sql, "timeInterval", lambda a: f"toStartOfInterval(toDateTime({a[0]}), INTERVAL {tr.interval_s} second)"
    )
    sql = re.sub(r"\$__fromTime\b", f"toDateTime({tr.start})", sql)
    sql = re.sub(r"\$__toTime\b", f"toDateTime({tr.end})", sql)
    sql = re.sub(r"\$__interval_s\b", str(tr.interval_s), sql)
    if "$" in sql:
        raise AssertionError(f"unexpanded Grafana syntax left in:\n{sql}")
    return sql


def expand_prometheus(expr: str, variables: dict[str, str]) -> str:
    """PromQL with Grafana's built-ins at fixed values and ``variables`` (name → regex) filled in."""
    builtins = {"__rate_interval": "5m", "__interval": "1m", "__range": "30m"}
    for name, value in {**builtins, **variables}.items():
        expr = re.sub(rf"\$\{{{name}\}}|\${name}\b", value, expr)
    if "$" in expr:
        raise AssertionError(f"unexpanded Grafana syntax left in: {expr}")
    return expr


def _conditional_all(args: list[str], selections: dict[str, list[str] | None]) -> str:
    if len(args) != 2:
        raise AssertionError(f"$__conditionalAll takes 2 arguments, got {len(args)}: {args}")
    name = args[1].strip().lstrip("$").strip("{}")
    if name not in selections:
        raise AssertionError(f"$__conditionalAll names an unknown variable {name!r}")
    return "1=1" if selections[name] is ALL else args[0]


def _interpolate(sql: str, selections: dict[str, list[str] | None]) -> str:
    def value(m: re.Match[str]) -> str:
        name, fmt = m["name"] or m["bare"], m["fmt"]
        if name.startswith("__"):
            return m[0]  # a macro, for the backend
        if name not in selections:
            raise AssertionError(f"query uses ${name}, which is not a dashboard variable")
        chosen = selections[name]
        if chosen is ALL:
            raise AssertionError(f"${name} at All outside $__conditionalAll would expand to every value")
        if fmt == "singlequote":
            return ",".join("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in chosen)
        if fmt is None:
            return ",".join(chosen)
        raise AssertionError(f"unsupported variable format {fmt!r}")

    return re.sub(r"\$\{(?P<name>\w+)(?::(?P<fmt>\w+))?\}|\$(?P<bare>\w+)", value, sql)


def _replace_macro(sql: str, name: str, expand: Callable[[list[str]], str]) -> str:
    """Replace every ``$__name(args)``, innermost last, with balanced parentheses and quotes."""
    token = f"$__{name}("
    while (start := sql.rfind(token)) != -1:
        args, end = _macro_args(sql, start + len(token))
        sql = sql[:start] + expand(args) + sql[end:]
    return sql


def _macro_args(sql: str, i: int) -> tuple[list[str], int]:
    depth, quote, current = 0, "", ""
    args: list[str] = []
    while i < len(sql):
        ch = sql[i]
        if quote:
            current += ch
            if ch == quote and sql[i - 1] != "\\":
                quote = ""
        elif ch in "'\"":
            quote = ch
            current += ch
        elif ch == "(":
            depth += 1
            current += ch
        elif ch == ")":
            if depth == 0:
                return [*args, current], i + 1
            depth -= 1
            current += ch
        elif ch == "," and depth == 0:
            args.append(current)
            current = ""
        else:
            current += ch
        i += 1
    raise AssertionError(f"unbalanced macro arguments in:\n{sql}")
