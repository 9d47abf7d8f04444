"""The ``llmpulse`` command: a thin layer of flags over the runtime, sinks and reports."""

from __future__ import annotations

import sys


def main() -> None:
    """Console-script entry point; explains a missing extra instead of a traceback."""
    try:
        from llmpulse.commands import cli
    except ImportError as exc:
        missing = exc.name or str(exc)
        sys.stderr.write(
            f"llmpulse: the pipeline is not installed ({missing} is missing).\n"
            "The base install only carries the SDK. For the CLI and pipeline run:\n"
            "    pip install 'llmpulse[pipeline]'\n"
        )
        raise SystemExit(2) from None
    cli(prog_name="llmpulse")


if __name__ == "__main__":
    main()
