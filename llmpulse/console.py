"""Rendering for people: rich tables on stdout, errors on stderr with what to do next."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

PIPED_WIDTH = 200
"""Columns for output that goes to a file, a pipe or a CI log rather than a terminal."""


def _console(stderr: bool = False) -> Console:
    """Rich assumes 80 columns when it is not writing to a terminal, and cuts wider cells with an
    ellipsis: the release, alert and gate tables came out unreadable in files and CI logs. A
    terminal, or an explicit ``COLUMNS``, keeps its own width."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=PIPED_WIDTH if piped else None)


out = _console()
err = _console(stderr=True)


SIGNIFICANT_DIGITS = 7
"""Of a float in a table: as many as a price per 1M tokens or a rounded rate has, so no digit the
value carries is cut (0.075 showed as 0.07, ``round(x, 3)`` was re-rounded to 2 places)."""


def fmt_float(value: float) -> str:
    """Up to ``SIGNIFICANT_DIGITS`` significant digits, without trailing zeros; thousands separated.
    What is shown is the value, not a guess at its unit: 0.265 stays 0.265, 1e-09 stays 1e-09."""
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return f"{value:g}"
    if abs(value) < 1:
        return f"{value:.{SIGNIFICANT_DIGITS}g}"
    whole_digits = int(math.log10(abs(value))) + 1
    text = f"{value:,.{max(0, SIGNIFICANT_DIGITS - whole_digits)}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return fmt_float(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def table(title: str | None, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> Table:
    cols = list(columns or (rows[0].keys() if rows else []))
    t = Table(title=title, title_justify="left", header_style="bold cyan")
    for c in cols:
        numeric = bool(rows) and isinstance(rows[0].get(c), int | float) and not isinstance(rows[0].get(c), bool)
        t.add_column(c, justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*(fmt(r.get(c)) for c in cols))
    return t


def error(message: str, hint: str | None = None) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[dim]{hint}[/]", highlight=False, soft_wrap=True)
