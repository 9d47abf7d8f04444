"""Named queries: the SQL behind summaries and reports lives in ``*.sql`` files here.

They are plain ClickHouse SQL with query parameters (``{start:DateTime64(3)}``), so the same
file runs from clickhouse-client (``--param_start=...``), from Grafana, and from llmpulse.
Tables are unqualified: the client's database (``llmpulse`` by default) applies.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Protocol, runtime_checkable

from clickhouse_connect.driver.client import Client

DEFAULTS: dict[str, Any] = {"tenant": "", "idle_s": 30}
"""Parameters some queries take, with the value used unless the caller says otherwise: every
tenant, and 30 s of quiet between a flow's calls ending a turn."""


def sql(name: str) -> str:
    path = resources.files("sinks").joinpath("queries", f"{name}.sql")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyError(f"no named query {name!r} (looked for sinks/queries/{name}.sql)") from None


def names() -> list[str]:
    folder = resources.files("sinks").joinpath("queries")
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".sql"))


def describe(name: str) -> str:
    """The leading ``--`` comment of a query file: what it answers, for listings and docs."""
    lines = []
    for line in sql(name).splitlines():
        if not line.startswith("--"):
            break
        lines.append(line[2:].strip())
    return " ".join(lines)


class _Result(Protocol):
    @property
    def column_names(self) -> Any: ...

    @property
    def result_rows(self) -> Any: ...


@runtime_checkable
class ByName(Protocol):
    """A client that runs named queries by name: ``llmpulse serve``'s ``POST /v1/queries/{name}``.

    The server holds the same files and binds a tenant key's tenant itself, which it cannot do
    for SQL text; so a tenant key can run ``report``/``gate``/``trace`` queries, only ever on its
    own rows, and an admin key gets the same answer as a local run.
    """

    def query_named(self, name: str, params: dict[str, Any]) -> _Result: ...


def run(client: Client | ByName, name: str, **params: Any) -> list[dict[str, Any]]:
    """Rows of a named query as dicts; through a server (``ByName``) it goes by name, not as SQL."""
    if isinstance(client, ByName):
        result = client.query_named(name, params)  # the server applies DEFAULTS (and a tenant key's tenant)
    else:
        result = client.query(sql(name), parameters={**DEFAULTS, **params})
    cols = result.column_names
    return [dict(zip(cols, row, strict=True)) for row in result.result_rows]
