"""Reading the YAML files people write (config, rules, rubrics) with errors they can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: Path, what: str, error: type[Exception], missing: str | None = None) -> Any:
    """The file's YAML content; ``error`` names the file, and the line and column of a syntax error.

    ``missing``: a hint for a file that does not exist (where it was configured), else the OS's reason.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        if missing is None:
            raise error(f"{path}: cannot read {what}: {exc.strerror}") from exc
        raise error(f"{path}: {what} not found ({missing})") from exc
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from exc
