"""User data printed through rich is shown as it is: rich read ``[b]`` in a model output, a query
result or a path as markup (the text vanished) and ``[/INST]`` as a stray closing tag (MarkupError
crashed the command)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import orjson
import pytest
from rich.console import Console
from rich.text import Text

from llmpulse import console
from tests.conftest import call, iso
from tests.llmpulse.test_cli import llmpulse

TRICKY = ["[draft]", "[/INST]", "a [b] c", "C:\\runs\\", ":warning:"]
"""A tag rich would apply, a closing tag it would choke on, a tag mid-text, a trailing backslash
(which would escape a tag after it) and an emoji code."""


def render(renderable: object, emoji: bool = True) -> str:
    out = Console(file=io.StringIO(), width=200, emoji=emoji)
    out.print(renderable)
    assert isinstance(out.file, io.StringIO)
    return out.file.getvalue()


def test_table_cells_and_headers_are_literal() -> None:
    """Query results and column names are data: they must not lose or inject styling."""
    rows = [{"[col]": value, "n": i} for i, value in enumerate(TRICKY)]
    shown = render(console.table(None, rows))
    for value in TRICKY:
        assert f"│ {value} " in shown
    assert "[col]" in shown


def test_table_keeps_numbers_right_aligned_and_caller_styles() -> None:
    """Literal cells must not cost the layout, nor the styling a caller asks for with ``Text``."""
    table = console.table(None, [{"name": "[x]", "calls": 5, "verdict": Text("DRIFT", style="bold red")}])
    assert [c.justify for c in table.columns] == ["left", "right", "left"]
    out = Console(file=io.StringIO(), width=200, force_terminal=True, color_system="standard")
    out.print(table)
    assert isinstance(out.file, io.StringIO)
    assert "\x1b[1;31mDRIFT" in out.file.getvalue()


def test_table_title_keeps_our_markup_and_escaped_data() -> None:
    """A title is ours (styled) around data (escaped)."""
    wide = [{"a": "x" * 40}]  # a title wraps at the table's width
    shown = render(console.table(f"[bold]Replayed[/] {console.escape('calls [/v2].jsonl')}", wide))
    assert "Replayed calls [/v2].jsonl" in shown


@pytest.mark.parametrize("value", TRICKY)
def test_escape_round_trips(value: str) -> None:
    """Anything escaped and wrapped in our markup prints as the value itself (emoji codes are off on
    our consoles, as markup escaping leaves them)."""
    assert render(f"[dim]{console.escape(value)}[/]", emoji=False).rstrip("\n") == value


def test_error_prints_message_and_hint_verbatim(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An error quoting a path or SQL must not itself fail with MarkupError and hide the real error.
    Through a console made as ``console.err`` is, so its settings (emoji codes) are covered too."""
    monkeypatch.setattr(console, "err", console._console(stderr=True))
    console.error("file [x].yaml: key [/pipeline] is :warning: wrong", hint="[/oops]")
    assert capsys.readouterr().err == "error: file [x].yaml: key [/pipeline] is :warning: wrong\n[/oops]\n"


def test_query_prints_a_bracketed_value_verbatim(tmp_path: Path) -> None:
    """`llmpulse query` returning a model prompt template exited with a MarkupError traceback."""
    data = tmp_path / "d"
    llmpulse("migrate", "--data-dir", str(data))
    proc = llmpulse("query", "SELECT '[/INST] hi [b]' AS s, 1 AS `[n]`", "--data-dir", str(data))
    assert proc.returncode == 0
    assert "[/INST] hi [b]" in proc.stdout and "[n]" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_replay_and_trace_show_paths_models_and_outputs_verbatim(tmp_path: Path) -> None:
    """The replay title (a file name), the unpriced model list and a traced call's output all carry
    user text; each used to lose its brackets or crash."""
    data = tmp_path / "d"
    file = tmp_path / "[b]" / "calls [draft].jsonl"  # a file name cannot hold "[/"
    file.parent.mkdir()
    event = call(request_id="req-[1]", model="acme-[/beta]", output="[/INST] answer [b]", ts=iso(time.time() - 60))
    file.write_text(orjson.dumps(event).decode() + "\n")
    replayed = llmpulse("replay", str(file), "--data-dir", str(data), LLMPULSE_CONTENT__CAPTURE="true").stdout
    unwrapped = "".join(replayed.split())  # the title wraps at the table's width
    assert "Replayed" + "".join(str(file).split()) in unwrapped
    assert "Models without a price: acme-[/beta] (1)" in replayed
    traced = llmpulse("trace", "req-[1]", "--data-dir", str(data)).stdout
    assert "Call req-[1]" in traced and "acme-[/beta]" in traced
    assert "chars): [/INST] answer [b]" in traced
