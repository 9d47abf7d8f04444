"""Rendering for people: rich tables on stdout, errors on stderr with what to do next."""

from __future__ import annotations

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


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.01:
            return f"{value:.6f}"
        return f"{value:,.2f}"
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
