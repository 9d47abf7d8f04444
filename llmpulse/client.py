"""How CLI commands reach a running ``llmpulse serve``: found from the data directory, or ``--server URL``.

chDB allows one process per data directory. When ``llmpulse serve`` holds it, commands that read
data go through the server's read API instead of failing: the lock file names the server's URL
(``DataDirLock.update(server_url=...)``), and the server leaves a local admin token (mode 0600)
beside it, so nothing needs configuring on the same machine. From elsewhere, pass ``--server URL``
and an API key (``--api-key`` or ``LLMPULSE_API_KEY``).

``open_for_reading`` is what commands call (``query``, ``gate``, ``trace``, ``drift``, ``report``): a
``Connection`` to local ClickHouse when the data directory is free (or on a ClickHouse server), else a
``RemoteConnection`` whose ``client.query`` goes to the server's ``POST /v1/query`` and whose named
queries (``sinks.queries.run``) go by name to ``POST /v1/queries/{name}``. Code written against
``conn.client.query(sql, parameters=...)`` and ``sinks.queries.run`` runs unchanged on
either: rows come back with the types ClickHouse reported restored (DateTime → ``datetime``, Date
→ ``date``), so a report computed through the server equals one computed locally. Free SQL needs
an admin key; the local token the server writes is one. A tenant key runs the named queries that take
``{tenant:String}`` (the server binds its tenant): ``gate`` and ``trace`` read only through those, so
they work with a tenant key and see only its rows; ``report`` and ``drift`` also read tables without a
tenant column (judge and feedback rollups, alerts) and need an admin key. ``run_query``/``run_named_query`` are
one-shot shortcuts on top.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sinks.lock import DataDirBusy, read_holder

if TYPE_CHECKING:
    from schemas.config import Settings
    from sinks.clickhouse import Connection

TOKEN_FILE = "llmpulse.server-token"
"""Written by the embedded server into its data directory (``llmpulse.server.TOKEN_FILE``)."""
API_KEY_ENV = "LLMPULSE_API_KEY"
DEFAULT_TIMEOUT_S = 120.0


class RemoteError(RuntimeError):
    """The server could not be reached or refused the request; the message says what to do."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class QueryFailed(RuntimeError):
    """ClickHouse rejected the SQL (locally or through the server): the message is ClickHouse's."""


@dataclass(frozen=True)
class ServerRef:
    url: str
    api_key: str | None
    found_via: str
    """``--server`` or the data directory whose lock file named it (shown to the user)."""


@dataclass
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    via: str | None = None
    """The server's URL when the rows came through ``llmpulse serve``."""

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_token(data_dir: Path) -> str | None:
    try:
        return (data_dir / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def find_server(data_dir: Path, server: str | None = None, api_key: str | None = None) -> ServerRef | None:
    """``--server`` if given, else the ``llmpulse serve`` holding ``data_dir`` (None when none does)."""
    key = api_key or os.environ.get(API_KEY_ENV) or None
    if server:
        return ServerRef(server.rstrip("/"), key, "--server")
    holder = read_holder(data_dir)
    if not holder or not holder.get("server_url") or not _alive(holder.get("pid")):
        return None
    # the local admin token first: a tenant key in LLMPULSE_API_KEY (meant for a remote server) would
    # otherwise turn this machine's own reads into 403s
    return ServerRef(
        str(holder["server_url"]).rstrip("/"), local_token(data_dir) or key, f"the lock file of {data_dir}"
    )


def _call(ref: ServerRef, method: str, path: str, body: Any = None, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(ref.url + path, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if ref.api_key:
        request.add_header("Authorization", f"Bearer {ref.api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            detail = json.loads(raw)
        except ValueError:
            detail = {"error": raw.decode("utf-8", "replace")[:500]}
        message = detail.get("error") if isinstance(detail, dict) else None
        code = detail.get("code") if isinstance(detail, dict) else None
        if code == "query_failed":
            raise QueryFailed(str(message)) from None
        hint = ""
        if exc.code == 401:
            hint = f" Give an API key with --api-key or {API_KEY_ENV} (found the server via {ref.found_via})."
        elif exc.code == 403:
            hint = " This needs an admin key (`llmpulse keys create --role admin`)."
        raise RemoteError(f"llmpulse serve at {ref.url} answered {exc.code}: {message or exc.reason}.{hint}",
                          exc.code) from None  # fmt: skip
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RemoteError(
            f"cannot reach llmpulse serve at {ref.url} ({reason}); is it running? (found via {ref.found_via})"
        ) from None


def remote_query(
    server_url: str, sql: str, params: dict[str, Any] | None = None, api_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> QueryResult:  # fmt: skip
    """Free SQL through a running server (admin key; read-only on the server's side)."""
    ref = ServerRef(server_url.rstrip("/"), api_key, "--server")
    return _query(ref, sql, params, timeout)


def _query(ref: ServerRef, sql: str, params: dict[str, Any] | None, timeout: float = DEFAULT_TIMEOUT_S) -> QueryResult:
    body: dict[str, Any] = {"sql": sql}
    if params:
        body["params"] = _jsonable(params)
    r = _result(_call(ref, "POST", "/v1/query", body, timeout))
    return QueryResult(list(r.column_names), [t.name for t in r.column_types], r.result_rows, ref.url)


def remote_named_query(
    server_url: str, name: str, params: dict[str, Any] | None = None, api_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[dict[str, Any]]:  # fmt: skip
    """A named query (``sinks/queries/NAME.sql``) through a running server; a tenant key is bound to its tenant."""
    ref = ServerRef(server_url.rstrip("/"), api_key, "--server")
    return _named(ref, name, params or {}, timeout).records()


def _named_result(
    ref: ServerRef, name: str, params: dict[str, Any], timeout: float = DEFAULT_TIMEOUT_S
) -> RemoteResult:
    """``tenant=''`` (every tenant, the local default) is not sent: the server binds a tenant key's
    own tenant, and gives an admin key every tenant anyway."""
    safe = urllib.parse.quote(name, safe="")
    given = {k: v for k, v in params.items() if not (k == "tenant" and v == "")}
    return _result(_call(ref, "POST", f"/v1/queries/{safe}", {"params": _jsonable(given)}, timeout))


def _named(ref: ServerRef, name: str, params: dict[str, Any], timeout: float = DEFAULT_TIMEOUT_S) -> QueryResult:
    r = _named_result(ref, name, params, timeout)
    return QueryResult(list(r.column_names), [t.name for t in r.column_types], r.result_rows, ref.url)


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    """datetimes travel as ISO 8601 (the server parses them back for DateTime parameters)."""
    from datetime import date

    return {k: v.isoformat() if isinstance(v, date) else v for k, v in params.items()}


def list_named_queries(server_url: str, api_key: str | None = None) -> list[dict[str, Any]]:
    ref = ServerRef(server_url.rstrip("/"), api_key, "--server")
    return list(_call(ref, "GET", "/v1/queries")["queries"])


# --------------------------------------------------------------------------------------------
# a Connection look-alike whose queries go through the server


_WRAPPER = re.compile(r"^(?:Nullable|LowCardinality)\((.*)\)$")


def _restorer(type_name: str) -> Callable[[Any], Any] | None:
    """JSON value → the Python value clickhouse-connect would have returned for ``type_name`` (None: as is)."""
    t = type_name.strip()
    while (m := _WRAPPER.match(t)) is not None:
        t = m.group(1).strip()
    if t.startswith("DateTime"):
        return lambda v: datetime.fromisoformat(v) if isinstance(v, str) else v
    if t in ("Date", "Date32"):
        return lambda v: date.fromisoformat(v[:10]) if isinstance(v, str) else v
    if t.startswith("Array("):
        inner = _restorer(t[6:-1])
        if inner is None:
            return None
        return lambda v: [inner(x) if x is not None else None for x in v] if isinstance(v, list) else v
    return None


@dataclass
class _Type:
    name: str


@dataclass
class RemoteResult:
    """The parts of clickhouse-connect's ``QueryResult`` that llmpulse's readers use."""

    column_names: tuple[str, ...]
    column_types: list[_Type]
    result_rows: list[list[Any]]

    @property
    def first_row(self) -> list[Any]:
        return self.result_rows[0]

    @property
    def row_count(self) -> int:
        return len(self.result_rows)

    def named_results(self) -> list[dict[str, Any]]:
        return [dict(zip(self.column_names, r, strict=True)) for r in self.result_rows]


def _result(out: dict[str, Any]) -> RemoteResult:
    types = [str(t) for t in out["types"]]
    fix = [_restorer(t) for t in types]
    rows = [list(r) for r in out["rows"]]
    if any(fix):
        for row in rows:
            for j, f in enumerate(fix):
                if f is not None and row[j] is not None:
                    row[j] = f(row[j])
    return RemoteResult(tuple(out["columns"]), [_Type(t) for t in types], rows)


@dataclass
class RemoteClient:
    """``client.query(sql, parameters=...)`` over ``POST /v1/query`` (read-only, admin keys), and
    ``query_named`` over ``POST /v1/queries/{name}`` (any key; what ``sinks.queries.run`` uses)."""

    ref: ServerRef
    database: str = "llmpulse"
    queries: int = field(default=0, init=False)

    def query(self, query: str, parameters: dict[str, Any] | None = None, **_: Any) -> RemoteResult:
        body: dict[str, Any] = {"sql": query}
        if parameters:
            body["params"] = _jsonable(parameters)
        self.queries += 1
        return _result(_call(self.ref, "POST", "/v1/query", body))

    def query_named(self, name: str, params: dict[str, Any]) -> RemoteResult:
        """``sinks.queries.run`` routes here: the query runs by name, so a tenant key may run it too."""
        self.queries += 1
        return _named_result(self.ref, name, params)

    def command(self, cmd: str, parameters: dict[str, Any] | None = None, **_: Any) -> Any:
        """Reads only: the first value of the first row (what ``command`` returns for a SELECT)."""
        rows = self.query(cmd, parameters).result_rows
        return rows[0][0] if rows and rows[0] else None

    def close(self) -> None:
        pass


@dataclass
class RemoteConnection:
    """Stands in for ``sinks.clickhouse.Connection`` while ``llmpulse serve`` holds the data (reads only)."""

    client: RemoteClient
    database: str
    ref: ServerRef
    embedded: bool = False
    lock: None = None

    @property
    def description(self) -> str:
        return f"llmpulse serve at {self.ref.url}"

    def close(self) -> None:
        pass


def _announce(ref: ServerRef) -> None:
    sys.stderr.write(f"llmpulse: reading through llmpulse serve at {ref.url} (found via {ref.found_via})\n")


def open_for_reading(
    settings: Settings, purpose: str, *, server: str | None = None, api_key: str | None = None,
    announce: bool = True,
) -> Connection:  # fmt: skip
    """Where a read-only command reads from: ``--server``, else local ClickHouse, else the server holding it.

    Typed as ``Connection`` so readers written for one (``gate.measure``, ``lineage.trace``...)
    take either; a ``RemoteConnection`` has the same attributes and its client the same ``query``
    (reads only). Raises ``DataDirBusy`` when a process that is not a server (a worker, a demo)
    holds the data. The caller closes what it gets, as with ``open_clickhouse``.
    """
    if server:
        ref = find_server(settings.data_dir, server, api_key)
        assert ref is not None
    else:
        from llmpulse.runtime import open_clickhouse

        try:
            return open_clickhouse(settings, purpose=purpose)
        except DataDirBusy:
            found = find_server(settings.data_dir, None, api_key)
            if found is None:
                raise
            ref = found
    if announce:
        _announce(ref)
    db = settings.clickhouse.database
    return cast("Connection", RemoteConnection(RemoteClient(ref, db), db, ref))


def run_query(
    settings: Settings, sql: str, params: dict[str, Any] | None = None, *, server: str | None = None,
    api_key: str | None = None, purpose: str = "llmpulse query",
) -> QueryResult:  # fmt: skip
    """One SQL statement, wherever ``open_for_reading`` says (see there).

    Raises ``QueryFailed`` for SQL that ClickHouse rejects, ``RemoteError`` when the server cannot
    be reached or refuses, and ``DataDirBusy`` when another process (not a server) holds the data.
    """
    from clickhouse_connect.driver.exceptions import DatabaseError

    conn = open_for_reading(settings, purpose, server=server, api_key=api_key, announce=False)
    try:
        result = conn.client.query(sql, parameters=params or None)
    except DatabaseError as exc:
        raise QueryFailed(str(exc).strip().split("\n")[0]) from None
    finally:
        conn.close()
    via = conn.ref.url if isinstance(conn, RemoteConnection) else None
    return QueryResult(
        list(result.column_names), [t.name for t in result.column_types], [list(r) for r in result.result_rows], via
    )


def run_named_query(
    settings: Settings, name: str, params: dict[str, Any] | None = None, *, server: str | None = None,
    api_key: str | None = None, purpose: str = "llmpulse",
) -> list[dict[str, Any]]:  # fmt: skip
    """A named query (``sinks/queries/NAME.sql``), locally or through the server holding the data.

    Through a server it runs as a named query (``POST /v1/queries/NAME``), so tenant keys work too
    (bound to their tenant). Queries that take ``{tenant:String}`` get ``tenant=''`` (every tenant)
    unless one is given, as an admin key does on the server.
    """
    from clickhouse_connect.driver.exceptions import DatabaseError

    from sinks import queries

    params = dict(params or {})
    conn = open_for_reading(settings, purpose, server=server, api_key=api_key, announce=False)
    if isinstance(conn, RemoteConnection):
        return _named(conn.ref, name, params).records()
    try:
        if "{tenant:String}" in queries.sql(name):
            params.setdefault("tenant", "")
        return queries.run(conn.client, name, **params)
    except DatabaseError as exc:
        raise QueryFailed(str(exc).strip().split("\n")[0]) from None
    finally:
        conn.close()
