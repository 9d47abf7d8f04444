"""Test-only fault injection: a ClickHouse client that is "down" while a flag file exists.

Run a worker with ``python -m tests.reliability.faults FLAG -- <llmpulse args>``: the module wraps
the client the worker opens, then hands over to the normal CLI. Nothing in the product knows about
it. While FLAG exists every client call raises exactly what clickhouse-connect raises when the
server refuses the connection — not a look-alike: the error is produced by clickhouse-connect's own
HTTP client connecting to a port nobody listens on (an ``OperationalError`` from a urllib3
``MaxRetryError`` caused by ``ConnectionRefusedError``).
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn

import clickhouse_connect

log = logging.getLogger("llmpulse.faults")

FAILING = frozenset({"insert", "insert_arrow", "insert_df", "query", "command", "raw_query", "raw_insert", "ping"})
"""Every call that reaches the server: a refused connection fails all of them alike."""


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused() -> NoReturn:
    """Raise the real refused-connection error of clickhouse-connect's HTTP client."""
    clickhouse_connect.get_client(host="127.0.0.1", port=closed_port(), connect_timeout=1, send_receive_timeout=1)
    raise AssertionError("a ClickHouse client connected to a closed port")


class FaultyClient:
    """Proxies a clickhouse-connect client; every server call fails while ``flag`` exists."""

    def __init__(self, client: Any, flag: Path) -> None:
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_flag", flag)
        object.__setattr__(self, "refused", 0)

    def __setattr__(self, name: str, value: Any) -> None:
        """Settings such as ``database`` belong to the real client."""
        if name == "refused":
            object.__setattr__(self, name, value)
        else:
            setattr(self._client, name, value)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in FAILING:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._flag.exists():
                self.refused += 1
                if self.refused == 1 or self.refused % 50 == 0:
                    log.warning("fault injection: ClickHouse refused (%d calls so far)", self.refused)
                refused()
            return attr(*args, **kwargs)

        return call


def install(flag: Path) -> None:
    """Wrap the client of every connection the runtime opens from now on."""
    from llmpulse import runtime

    original = runtime.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        conn = original(*args, **kwargs)
        conn.client = FaultyClient(conn.client, flag)
        return conn

    runtime.connect = connect  # type: ignore[assignment]


def main(argv: list[str]) -> None:
    flag, sep, *rest = argv
    assert sep == "--", "usage: python -m tests.reliability.faults FLAG -- <llmpulse args>"
    install(Path(flag))
    from llmpulse.cli import main as cli

    sys.argv = ["llmpulse", *rest]
    cli()


if __name__ == "__main__":
    main(sys.argv[1:])
