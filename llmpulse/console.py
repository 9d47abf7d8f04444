"""Rendering for people: rich tables on stdout, errors on stderr with what to do next."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.highlighter import ReprHighlighter
from rich.markup import escape as _escape_markup
from rich.table import Table
from rich.text import Text

PIPED_WIDTH = 200
"""Columns for output that goes to a file, a pipe or a CI log rather than a terminal."""


def _console(stderr: bool = False) -> Console:
    """Rich assumes 80 columns when it is not writing to a terminal, and cuts wider cells with an
    ellipsis: the release, alert and gate tables came out unreadable in files and CI logs. A
    terminal, or an explicit ``COLUMNS``, keeps its own width. Emoji codes are off: none of our
    text uses them, and with them on a model output or path holding ``:warning:`` printed a symbol."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=PIPED_WIDTH if piped else None, emoji=False)


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


def escape(value: object) -> str:
    """``value`` as literal text inside a string that carries our markup. Rich reads ``[b]`` in a
    model output, a path or a feature name as a tag (it vanished from the line) and ``[/INST]`` as a
    closing tag that matches nothing (MarkupError: the command crashed)."""
    return _escape_markup(str(value))


_highlight = ReprHighlighter()
"""Colours numbers and the like in cells as rich did when they were markup strings; text is kept."""


def _cell(value: Any) -> Text:
    """Data is shown as it is (a query returning ``[draft]`` shows ``[draft]``); a ``Text`` is a
    cell styled by its caller (a drifted metric in red) and is kept as such."""
    return value if isinstance(value, Text) else _highlight(fmt(value))


def table(title: str | Text | None, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> Table:
    """Cells and column names are literal text. A ``str`` title is markup, so our own styling can
    go in it: data interpolated into it goes through ``escape``."""
    cols = list(columns or (rows[0].keys() if rows else []))
    t = Table(title=title, title_justify="left", header_style="bold cyan")
    for c in cols:
        numeric = bool(rows) and isinstance(rows[0].get(c), int | float) and not isinstance(rows[0].get(c), bool)
        t.add_column(Text(str(c)), justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*(_cell(r.get(c)) for c in cols))
    return t


def error(message: str, hint: str | None = None) -> None:
    """Messages quote what the user gave (a path, SQL, a model name) and what a server said: printed
    as markup, a ``[`` in them lost text or raised MarkupError in place of the error."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[dim]{escape(hint)}[/]", highlight=False, soft_wrap=True)
