"""Click commands. Each one loads settings, calls into the runtime/sinks, and renders."""

from __future__ import annotations

import functools
import json
import logging
import re
import shlex
import sys
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaTimeoutError,
    NoBrokersAvailable,
    NodeNotReadyError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from ingest.files import UnreadableFile
from llmpulse import console
from llmpulse.client import QueryFailed, RemoteError
from llmpulse.logs import quiet_repeats
from schemas.config import ConfigError, Settings, load_settings
from schemas.durations import parse_duration
from schemas.judge import RubricError
from schemas.prices import PriceError
from schemas.rules import RulesError
from sinks.clickhouse import SinkError, chdb_path
from sinks.lock import DataDirBusy

F = TypeVar("F", bound=Callable[..., Any])

KAFKA_UNREACHABLE = (
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
    NoBrokersAvailable,
)
KAFKA_REFUSED = (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
)
"""Kafka failures a user can act on (with ``UnknownTopicOrPartitionError``); any other Kafka error
is a bug and keeps its traceback."""


DRIVER_CHATTER = ("urllib3.connectionpool", "clickhouse_connect.driver")
"""Loggers that narrate their own retries as warnings: an unreachable ClickHouse server printed two
lines of pool internals above the one error that says what to do. ``-v`` shows them again; the
sink's retries log what they do themselves."""


class DurationType(click.ParamType):
    """A duration option (``30m``, ``24h``, ``7d``) checked while click parses the command line, so a
    typo is a usage error naming the option instead of a traceback from deep in the command. The
    value stays the text typed: the commands echo it back ("no dead letters in the last 7d")."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


DURATION = DurationType()


def _data_options(fn: F) -> F:
    """--config / --data-dir / --clickhouse-url on every command that reads or writes data."""
    fn = click.option(
        "--clickhouse-url",
        default=None,
        metavar="URL",
        help="ClickHouse server (http(s)://host:8123); default: embedded chDB in --data-dir.",
    )(fn)
    fn = click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Embedded data directory [config data_dir, default ./.llmpulse].",
    )(fn)
    fn = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        envvar="LLMPULSE_CONFIG",
        help="Config file [default ./llmpulse.yaml if present].",
    )(fn)
    return fn


def _server_options(fn: F) -> F:
    """--server / --api-key on commands that read: through a running `llmpulse serve` instead of ClickHouse."""
    fn = click.option(
        "--api-key",
        default=None,
        envvar="LLMPULSE_API_KEY",
        help="Key for --server (admin for free SQL) [env LLMPULSE_API_KEY; the local server's token is found].",
    )(fn)
    fn = click.option(
        "--server",
        "server_url",
        default=None,
        metavar="URL",
        envvar="LLMPULSE_SERVER_URL",  # not LLMPULSE_SERVER: pydantic-settings reads that as the `server` section
        help="Read through this `llmpulse serve` [env LLMPULSE_SERVER_URL; default: the one holding --data-dir, "
        "found automatically].",
    )(fn)
    return fn


def _settings(config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None) -> Settings:
    return load_settings(config_path, {"data_dir": data_dir, "clickhouse": {"url": clickhouse_url}})


def _reading_settings(
    config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None, server_url: str | None = None
) -> Settings:
    """Settings for a command that only reads. Opening embedded chDB creates the data directory, so a
    mistyped --data-dir used to answer every query from a new, empty database ("0 calls") and leave
    the directory behind: here it is an error naming the path and how data gets there."""
    settings = _settings(config_path, data_dir, clickhouse_url)
    _require_readable(settings, server_url)
    return settings


def _require_readable(settings: Settings, server_url: str | None) -> None:
    """Only embedded chDB read locally can be missing: a server (--server, --clickhouse-url) answers itself."""
    if server_url is None and settings.clickhouse.url is None:
        _require_data(settings.data_dir)


def _require_data(data_dir: Path) -> None:
    """A directory without chDB data is still fine while a process holds it (a demo just starting)."""
    from sinks.lock import read_holder

    if data_dir.is_dir() and (chdb_path(data_dir).is_dir() or read_holder(data_dir) is not None):
        return
    what = "does not exist" if not data_dir.exists() else "holds no llmpulse data"
    flag = f"--data-dir {shlex.quote(str(data_dir))}"
    console.error(f"data directory {data_dir} {what}",
                  f"Check --data-dir (config data_dir, env LLMPULSE_DATA_DIR). To put data there: `llmpulse demo "
                  f"{flag}` (sample traffic) or `llmpulse replay FILE {flag}`; a ClickHouse server is read with "
                  "--clickhouse-url.")  # fmt: skip
    raise SystemExit(2)


def _busy_message(exc: DataDirBusy) -> str:
    """A server holding the directory makes DataDirBusy suggest ``--server URL``, which only the commands
    that read have (`reconcile --server` was "No such option"): the others need the directory itself,
    so for them the advice is the one for any other holder."""
    ctx = click.get_current_context(silent=True)
    reads = ctx is not None and any(p.name == "server_url" for p in ctx.command.params)
    server = exc.holder.get("server_url")
    if reads or not server:
        return str(exc)
    name = f"`llmpulse {ctx.command_path.split(' ', 1)[-1]}`" if ctx is not None else "This command"
    plain = DataDirBusy(exc.data_dir, {**exc.holder, "server_url": None})
    return f"{plain} (It serves queries at {server}, but {name} cannot run through it.)"


def _friendly_errors(fn: F) -> F:
    """Known failures print one readable message (and exit 2), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            console.error(str(exc), "Fix the value named above; `llmpulse.yaml` in the repository lists every key.")
        except DataDirBusy as exc:
            console.error(_busy_message(exc))
        except (PriceError, RubricError) as exc:
            console.error(str(exc))
        except RulesError as exc:
            console.error(str(exc), "Fix that rules file (`llmpulse rules check FILE` checks one) or point "
                          "alerting.rules_path at another; unset, the built-in rules apply.")  # fmt: skip
        except SinkError as exc:
            console.error(str(exc), "Is ClickHouse reachable? Check clickhouse.url and credentials.")
        except (RemoteError, QueryFailed) as exc:
            console.error(str(exc))
        except FileNotFoundError as exc:
            console.error(f"{exc.filename}: no such file")
        except UnreadableFile as exc:
            console.error(
                f"{exc}. Nothing was replayed from it.",
                f"Copy the file again, or replay the readable part: zcat {shlex.quote(str(exc.path))} > part.jsonl "
                "(zcat stops where "
                "the file ends), then llmpulse replay part.jsonl; a cut last line goes to the dead letters.",
            )
        except KAFKA_UNREACHABLE as exc:
            console.error(
                str(exc),
                "Is Kafka reachable? Check kafka.bootstrap_servers (or --bootstrap-servers) and the security "
                "settings; `bash deploy/kafka/kafka.sh start` runs a local broker.",
            )
        except KAFKA_REFUSED as exc:
            console.error(str(exc), "Check kafka.sasl_* / kafka.ssl_* and the ACLs the broker grants this user.")
        except UnknownTopicOrPartitionError as exc:
            console.error(str(exc), "Create the topics first: `llmpulse topics create`.")
        raise SystemExit(2)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="llmpulse")
@click.option("-v", "--verbose", is_flag=True, help="Log what the pipeline does.")
def cli(verbose: bool) -> None:
    """llmpulse: streaming telemetry for LLM calls (cost, latency, quality, alerts)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet_repeats()
    if not verbose:
        for name in DRIVER_CHATTER:
            logging.getLogger(name).setLevel(logging.ERROR)


@cli.command()
@click.option("--events", default=200_000, show_default=True, type=click.IntRange(1),
              help="Calls to generate (calls retried on a fallback provider come on top).")  # fmt: skip
@click.option("--days", default=7.0, show_default=True, type=click.FloatRange(0.01, 80), help="Period they span.")
@click.option("--seed", default=7, show_default=True, help="Same seed, same traffic.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
@_data_options
@_friendly_errors
def demo(
    events: int,
    days: float,
    seed: int,
    as_json: bool,
    config_path: Path | None,
    data_dir: Path | None,
    clickhouse_url: str | None,
) -> None:
    """Run a week of realistic synthetic traffic through the pipeline, with four incidents to find:
    a prompt change, a refusal regression, a model snapshot switch and a canary release."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ingest.synthetic import Scenario
    from llmpulse.demo import DemoRefused, run_demo

    settings = _settings(config_path, data_dir, clickhouse_url)
    scenario = Scenario(events=events, days=days, seed=seed)
    try:
        _refuse_foreign_data(settings)
    except DemoRefused as exc:
        console.error(str(exc))
        raise SystemExit(2) from None
    progress = Progress(
        TextColumn("[bold]pipeline[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("events"),
        TimeRemainingColumn(),
        console=console.err,
        transient=True,
        disable=as_json and not console.err.is_terminal,
    )
    try:
        with progress:
            task = progress.add_task("demo", total=events)
            result = run_demo(settings, scenario, lambda n: progress.advance(task, n))
    except DemoRefused as exc:
        console.error(str(exc))
        raise SystemExit(2) from None
    if as_json:
        sys.stdout.write(json.dumps(result.summary, default=str) + "\n")
        return
    _render_demo(result.summary, settings)


_NOT_DEMO_REQUEST = "request_id NOT IN (SELECT request_id FROM {db}.llm_calls WHERE source = 'demo')"
_NOT_DEMO_EVENT = "event_id NOT IN (SELECT event_id FROM {db}.llm_calls WHERE source = 'demo')"
FOREIGN_ROWS = {
    "llm_calls": ("calls", "source != 'demo'"),
    "dlq": ("dead letters", "source != 'demo'"),
    "feedback": ("feedback rows", _NOT_DEMO_REQUEST),
    "judge_samples": ("judge samples", _NOT_DEMO_EVENT),
    "judge_scores": ("judge verdicts", _NOT_DEMO_REQUEST),
    "cost_history": ("repricing records", _NOT_DEMO_EVENT),
}  # fmt: skip
"""Per table the demo's DROP DATABASE would take: rows that are not the demo's own (by source, or by
the demo call they belong to). The other tables are derived from these (rollups, alerts) or are
llmpulse's bookkeeping."""


def _refuse_foreign_data(settings: Settings) -> None:
    """The demo replaces its database, and checked only llm_calls before dropping it: a replayed file of
    feedback (and its dead letters) went without a word. Every table with rows of its own is checked."""
    from llmpulse.demo import DemoRefused
    from sinks.clickhouse import connect

    if settings.clickhouse.url is None and not chdb_path(settings.data_dir).is_dir():
        return  # nothing stored yet: no need to create the directory here
    conn = connect(settings.clickhouse, settings.data_dir, purpose="llmpulse demo")
    try:
        db = settings.clickhouse.database
        present = {r[0] for r in conn.client.query("SELECT name FROM system.tables WHERE database = {db:String}",
                                                   parameters={"db": db}).result_rows}  # fmt: skip
        found = []
        for table, (what, foreign) in FOREIGN_ROWS.items():
            if table in present and (table == "llm_calls" or "llm_calls" in present):
                n = conn.client.command(f"SELECT count() FROM {db}.{table} WHERE {foreign.format(db=db)}")
                if int(n):  # type: ignore[arg-type]
                    found.append(f"{n:,} {what}")
    finally:
        conn.close()
    if found:
        raise DemoRefused(
            f"{conn.description} database `{db}` holds {', '.join(found)} that are not demo data; the demo "
            "replaces its database, so give it another one: --data-dir DIR (embedded) or "
            "LLMPULSE_CLICKHOUSE__DATABASE=llmpulse_demo"
        )


def _render_demo(s: dict[str, Any], settings: Settings) -> None:
    out = console.out
    rate = s["events_per_second"]
    out.print(
        f"\n[bold]llmpulse demo[/] — {s['period']['start']} → {s['period']['end']}, "
        f"stored in {console.escape(s['data'])}\n"
    )
    overview = [
        {"": "calls accepted", "value": s["events"]},
        {"": "rejected → dlq table", "value": s["dlq"]},
        {"": "duplicates dropped", "value": s["duplicates"]},
        {"": "late (raw only)", "value": s["late"]},
        {"": "unpriced (price_missing)", "value": s["price_missing"]},
        {"": "judge samples (scored by the simulated judge)", "value": s["judge_samples"]},
        {"": "  of which flagged by users", "value": s["flagged_for_judge"]},
        {"": "judge verdicts", "value": s["judged"]},
        {"": "user feedback events", "value": s["feedback"]},
        {"": "total cost (USD)", "value": s["cost_usd"]},
        {"": "pipeline events/s", "value": rate},
        {"": "wall time (s)", "value": s["wall_seconds"]},
    ]
    out.print(console.table("Overview", overview))
    for dim in ("feature", "team"):
        costs, unpriced = s[f"cost_by_{dim}"], s[f"unpriced_by_{dim}"]
        rows = [
            {dim: k, "cost_usd": v, **({"calls without a price": unpriced.get(k, 0)} if unpriced else {})}
            for k, v in costs.items()
        ]
        # a cost of None (shown —) is a scope none of whose calls had a price: unknown, not free
        out.print(console.table(f"Cost per {dim} (USD{', priced calls only' if unpriced else ''})", rows))
    out.print(
        console.table(
            "Latency per feature (ms)",
            [
                {"feature": k, **v, "ttft_p95": s["ttft_p95_ms_by_feature"].get(k)}
                for k, v in s["latency_ms_by_feature"].items()
            ],
        )
    )
    out.print(
        console.table(
            "Refusal and error rate per model",
            [
                {"model": k, "refusal_rate": f"{v:.2%}", "error_rate": f"{s['error_rate_by_model'][k]:.2%}"}
                for k, v in s["refusal_rate_by_model"].items()
            ],
        )
    )
    if s.get("alerts"):
        out.print(
            console.table(
                "Alerts the stream raised (default rules; delivered to no channel in the demo)",
                [
                    {"at (UTC)": a["at"].replace("T", " ")[:16], "rule": a["rule"], "state": a["state"],
                     "scope": ", ".join(f"{k}={v}" for k, v in a["scope"].items()),
                     "value": round(a["value"], 4) if a["value"] is not None else None, "action": a["action"]}
                    for a in sorted(s["alerts"], key=lambda a: a["at"])  # delivery order is per window length
                ],
            )
        )  # fmt: skip
    canary = s["canary"]
    out.print(
        console.table(
            "support-chat releases with 50+ calls: control vs canary (per call)",
            [
                {"release": r["release_id"], "prompt": r["prompt_version"], "variant": r["variant"],
                 "model": r["model"], "calls": r["calls"], "tokens": r["tokens_per_call"],
                 "cost": r["cost_per_call_usd"], "p95 ms": r["latency_p95_ms"],
                 "refusals": f"{r['refusal_rate']:.1%}",
                 "judge": None if r["eval_score"] is None else f"{r['eval_score']:.3f} (n={r['judged']})",
                 "thumbs down": None if r["thumbs_down_rate"] is None else f"{r['thumbs_down_rate']:.1%}"}
                for r in canary["releases"]
                if r["calls"] >= 50
            ],
        )
    )  # fmt: skip
    verdict = "[bold green]PASS[/]" if canary["gate"]["passed"] else "[bold red]REFUSED[/]"
    out.print(console.table(f"Gate: canary vs control → {verdict}", canary["gate"]["checks"]))
    inc = s["incidents"]
    data_flag = f" --data-dir {settings.data_dir}" if str(settings.data_dir) != ".llmpulse" else ""
    out.print("[bold]Injected incidents to look for[/]")
    out.print(
        f"  • prompt change: search-summarize v7 → v8 at {inc['prompt_change']['at']} doubles output tokens:\n"
        f'    llmpulse query{data_flag} "SELECT prompt_version, sum(calls) calls, '
        "round(sum(output_tokens)/sum(calls)) out_tokens, round(sum(cost_usd),2) cost "
        "FROM llm_calls_1m WHERE feature='search-summarize' GROUP BY prompt_version\"",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    out.print(
        f"  • refusal regression: claude-haiku-4-5 from {inc['refusal_regression']['at']}:\n"
        f'    llmpulse query{data_flag} "SELECT toDate(minute) day, round(sum(refusals)/sum(calls),3) '
        "refusal_rate FROM llm_calls_1m WHERE model='claude-haiku-4-5' GROUP BY day ORDER BY day\"",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    out.print(
        f"  • snapshot switch: gpt-4o-mini served by {inc['snapshot_switch']['to']} from "
        f"{inc['snapshot_switch']['at']}:\n    llmpulse drift{data_flag} --window 24h --baseline 3d",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    out.print(
        "  • canary: support-chat prompt v13 (variant canary) refuses 4× as often as control; the gate refuses it:\n"
        f"    llmpulse gate{data_flag} --since 8d --feature support-chat --baseline variant=control "
        "--candidate variant=canary --max-refusal-increase 0.02 --min-quality-delta 0\n",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_data_options
@_friendly_errors
def replay(file: Path, config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None) -> None:
    """Send a JSON Lines file (calls and feedback, optionally gzipped) through the pipeline.

    Replaying the same file again is a no-op: each fixed chunk of lines is an idempotent insert.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ingest.files import count_lines, read_chunks
    from llmpulse.runtime import EmbeddedRuntime, open_clickhouse

    settings = _settings(config_path, data_dir, clickhouse_url)
    total = count_lines(file)
    conn = open_clickhouse(settings, purpose=f"llmpulse replay {file}")
    try:
        runtime = EmbeddedRuntime(settings, conn)
        with Progress(
            TextColumn("[bold]replay[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("lines"),
            console=console.err, transient=True,
        ) as progress:  # fmt: skip
            task = progress.add_task("replay", total=total)
            for batch in read_chunks(file):
                runtime.ingest(batch)
                runtime.flush()  # one insert per chunk: the chunk is the idempotency unit
                progress.update(task, completed=batch.offsets[-1] if batch.offsets else total)
        runtime.finish()
        runtime.close()
    finally:
        conn.close()
    c, fb, verdicts = runtime.stats.counters, runtime.stats.feedback, runtime.stats.verdicts
    rejected = c.rejected + fb.rejected + verdicts.rejected
    rows = [
        {"": "lines read", "value": total},
        {"": "calls accepted", "value": c.accepted},
        *([{"": "feedback accepted", "value": fb.accepted}] if fb.received else []),
        *([{"": "judge verdicts accepted", "value": verdicts.accepted}] if verdicts.received else []),
        {"": "rejected → dlq", "value": rejected},
        {"": "duplicates dropped", "value": c.duplicates + fb.duplicates + verdicts.duplicates},
        {"": "unpriced: model not in the price table", "value": c.price_missing},
        *([{"": "unpriced: ok calls without usage", "value": c.usage_unknown}] if c.usage_unknown else []),
        {"": "unknown fields kept in attributes", "value": c.unknown_fields},
    ]
    console.out.print(console.table(f"Replayed {console.escape(file)}", rows))
    if c.unknown_models:
        console.out.print(
            "Models without a price: "
            + ", ".join(f"{m} ({n})" for m, n in sorted(c.unknown_models.items()))
            + ". Add them with `llmpulse prices import FILE`.",
            markup=False,
        )
    if rejected:
        name = str(file.resolve()).replace("\\", "\\\\").replace("'", "\\'")  # the dlq's source_name
        sql = (f"SELECT source_offset AS line, reason, path FROM dlq FINAL WHERE source_name = '{name}' "
               "ORDER BY line LIMIT 20")  # fmt: skip
        flags = _target_flags(config_path, data_dir, clickhouse_url)
        console.out.print(f"See why lines were rejected: llmpulse query{flags} {_shell_quote(sql)}",
                          highlight=False, markup=False, soft_wrap=True)  # fmt: skip


def _target_flags(config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None) -> str:
    """The flags that pointed this command at its data, for a command it suggests next: without them
    the suggestion reads the default data directory, usually another (empty) database. A URL's
    credentials are left out (secrets are never printed); the configuration supplies them."""
    flags: list[str] = []
    if config_path is not None:
        flags += ["--config", str(config_path)]
    if data_dir is not None:
        flags += ["--data-dir", str(data_dir)]
    if clickhouse_url:
        url = urllib.parse.urlsplit(clickhouse_url)
        netloc = url.netloc.rpartition("@")[2]
        flags += ["--clickhouse-url", urllib.parse.urlunsplit(url._replace(netloc=netloc))]
    return "".join(f" {shlex.quote(f)}" for f in flags)


def _shell_quote(text: str) -> str:
    """Double quotes, as the README writes SQL: single ones would need SQL's quotes escaped."""
    return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'


@cli.command()
@click.argument("sql", required=False)
@click.option(
    "--since",
    type=DURATION,
    default="7d",
    show_default=True,
    help="Named queries: the period ending now ({start}, {end}).",
)
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Named queries: another parameter.")
@click.option("--list", "list_names", is_flag=True, help="List the named queries (sinks/queries/*.sql) and exit.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@_server_options
@_data_options
@_friendly_errors
def query(
    sql: str | None, since: str, params: tuple[str, ...], list_names: bool, fmt: str, server_url: str | None,
    api_key: str | None, config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None,
) -> None:  # fmt: skip
    """Run SQL, or a named query such as `cost_by_feature`, against the configured ClickHouse.

    Tables of database `llmpulse` are unqualified. A named query is the same file Grafana and the
    weekly report run, so its numbers here match theirs.
    """
    import time as _time

    from clickhouse_connect.driver.exceptions import DatabaseError

    from llmpulse.client import open_for_reading
    from sinks import queries

    if list_names or not sql:
        rows = [{"name": n, "what": queries.describe(n)} for n in queries.names()]
        console.out.print(console.table("Named queries (llmpulse query NAME --since 7d)", rows))
        return
    parameters: dict[str, Any] = {}
    _check_free_sql(sql, queries.names())
    if sql in queries.names():
        end = _time.time()
        parameters = {"start": datetime.fromtimestamp(end - parse_duration(since), UTC),
                      "end": datetime.fromtimestamp(end, UTC), **queries.DEFAULTS}  # fmt: skip
        for item in params:
            key, sep, value = item.partition("=")
            if not sep:
                console.error(f"--param {item!r} is not KEY=VALUE", "e.g. -p trace_id=4bf92f35")
                raise SystemExit(2)
            parameters[key] = value
        sql = queries.sql(sql)
    elif params:
        console.error(f"--param only applies to named queries; {sql[:40]!r} is not one", "see llmpulse query --list")
        raise SystemExit(2)
    settings = _reading_settings(config_path, data_dir, clickhouse_url, server_url)
    conn = open_for_reading(settings, "llmpulse query", server=server_url, api_key=api_key)
    try:
        try:
            result = conn.client.query(sql, parameters=parameters or None)
        except (DatabaseError, QueryFailed) as exc:
            console.error(*_query_error(str(exc), sql))
            raise SystemExit(1) from None
    finally:
        conn.close()
    rows = [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]
    if fmt == "json":
        sys.stdout.write(orjson.dumps(rows, default=_json_default).decode() + "\n")
        return
    console.out.print(console.table(None, rows, result.column_names))
    console.out.print(f"[dim]{len(rows)} row(s)[/]")


DRIVER_SUFFIX = "\n FORMAT Native"
"""What clickhouse-connect appends to every query it sends (and `llmpulse serve` to what it runs):
ClickHouse's errors quote it, and it is not the user's."""
_FAILED_AT = re.compile(r"failed at position (\d+) \([^)]*\)(?: \(line \d+, col \d+\))?: ")
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_BARE_WORD = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*;?\s*$")
STATEMENTS = (
    "SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS", "CHECK", "INSERT", "CREATE", "ALTER",
    "DROP", "TRUNCATE", "RENAME", "OPTIMIZE", "SYSTEM", "SET", "USE", "KILL", "GRANT", "REVOKE", "ATTACH",
    "DETACH", "EXCHANGE", "UNDROP", "DELETE", "UPDATE", "BACKUP", "RESTORE",
)  # fmt: skip
"""Words a ClickHouse statement starts with; a query starting with another is read as ``SELECT <it>``."""


def _check_free_sql(sql: str, names: list[str]) -> None:
    """Refuse, before connecting, what would fail with an error about text the user never wrote: a
    misspelt named query goes out as SQL, and a FORMAT clause clashes with the driver's own."""
    import difflib

    word = _BARE_WORD.match(sql)
    if word is not None and word[1] not in names and word[1].upper() not in STATEMENTS:
        close = difflib.get_close_matches(word[1], names, n=3)
        console.error(f"no named query {word[1]!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""),
                      "see llmpulse query --list; SQL needs a statement, e.g. \"SELECT ...\"")  # fmt: skip
        raise SystemExit(2)
    clause = _TRAILING_FORMAT.search(sql)
    if clause is not None:
        console.error(f"`{clause[0].strip()}`: llmpulse query sets the output format itself",
                      "drop the FORMAT clause; --format json prints JSON, --format table a table")  # fmt: skip
        raise SystemExit(2)


def _query_error(message: str, sql: str) -> tuple[str, str | None]:
    """ClickHouse's error about the user's SQL, and a hint, without ``DRIVER_SUFFIX``: a syntax error
    found only in the suffix ("failed at position 28 (Native)") means the SQL ended where ClickHouse
    expected more, or did not start with a statement and was read as an expression."""
    import difflib

    text = message.replace(DRIVER_SUFFIX, "")
    hint = None
    at = _FAILED_AT.search(text)
    if at is not None and int(at[1]) > len(sql.encode()):
        rest = text[at.end() :]
        for quoted in ("FORMAT Native", "Native"):
            if rest.startswith(quoted):
                rest = rest[len(quoted) :].lstrip(". ")
                break
        text = f"{text[: at.start()]}failed at the end of the query: {rest}"
        first = sql.split(None, 1)[0].upper() if sql.strip() else ""
        if first and first not in STATEMENTS and not first.startswith("("):
            close = difflib.get_close_matches(first, STATEMENTS, n=1)
            hint = (f"`{sql.split(None, 1)[0]}` does not start a statement" + (f" (did you mean {close[0]}?)"
                    if close else "") + "; ClickHouse read the query as SELECT followed by an expression")  # fmt: skip
    return text.strip().split("\n")[0], hint


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat() if value.tzinfo else value.isoformat() + "Z"
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@cli.group()
def prices() -> None:
    """Price tables: show the active one, import LiteLLM's."""


@prices.command("show")
@click.argument("model", required=False)
@_data_options
@_friendly_errors
def prices_show(model: str | None, config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None) -> None:
    """List the active price table (USD per 1M tokens), or how one model string resolves."""
    from llmpulse.runtime import price_table
    from processors.pricing import CostAttribution

    settings = _settings(config_path, data_dir, clickhouse_url)
    table = price_table(settings)
    if model:
        rates = CostAttribution(table).rates(model)
        if rates is None:
            console.error(f"{model!r} is not in price table {table.price_version}: its calls get price_missing")
            raise SystemExit(1)
        console.out.print(f"{model} → provider {rates.provider}, USD per 1M tokens:", markup=False)
        console.out.print(
            f"  input {rates.input * 1e6:g}, cached input {rates.cached_input * 1e6:g}, "
            f"cache write {rates.cache_write * 1e6:g} (1-hour {rates.cache_write_1h * 1e6:g}), "
            f"output {rates.output * 1e6:g}"
        )
        return
    rows = [
        {
            "model": name,
            "provider": p.provider,
            "input": p.input,
            "cached_input": p.cached_input if p.cached_input is not None else p.input,
            "cache_write": p.cache_write if p.cache_write is not None else p.input,
            "cache_write_1h": next(r for r in (p.cache_write_1h, p.cache_write, p.input) if r is not None),
            "output": p.output,
            "long_context": f">{p.long_context.above_input_tokens:,}" if p.long_context else "",
        }
        for name, p in sorted(table.models.items())
    ]
    console.out.print(console.table(f"Price table {console.escape(table.price_version)} (USD per 1M tokens)", rows))


@prices.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--version", "price_version", default=None, help="price_version to record [litellm-<hash>].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="[data_dir/prices.json]")
@_data_options
@_friendly_errors
def prices_import(
    file: Path,
    price_version: str | None,
    out: Path | None,
    config_path: Path | None,
    data_dir: Path | None,
    clickhouse_url: str | None,
) -> None:
    """Import LiteLLM's model_prices_and_context_window.json over the built-in table."""
    from schemas.prices import builtin_price_table, from_litellm, merge_tables

    settings = _settings(config_path, data_dir, clickhouse_url)
    try:
        data = json.loads(file.read_bytes())
    except json.JSONDecodeError as exc:
        raise PriceError(f"{file}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PriceError(f"{file}: expected an object of model entries (LiteLLM's format)")
    skipped: dict[str, str] = {}
    imported = from_litellm(data, source=file.name, price_version=price_version, skipped=skipped)
    merged = merge_tables(builtin_price_table(), imported)
    target = out or settings.data_dir / "prices.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(merged.model_dump_json(indent=2, exclude_none=True))
    console.out.print(
        f"Imported {len(imported.models)} models from {console.escape(file)} as price_version "
        f"[bold]{console.escape(merged.price_version)}[/] → {console.escape(target)} "
        f"({len(merged.models)} models in all)."
    )
    if skipped:
        shown = "; ".join(f"{name}: {why}" for name, why in sorted(skipped.items())[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        console.out.print(
            f"[yellow]Skipped {len(skipped)} malformed entr{'y' if len(skipped) == 1 else 'ies'}[/] (their "
            f"models keep the built-in price, or none): {console.escape(shown)}{console.escape(more)}"
        )
    if out is not None:
        console.out.print(
            f"Point the pipeline at it with pricing.path: {out} (or LLMPULSE_PRICING__PATH).", markup=False
        )


@cli.command()
@click.option("--print-sql", is_flag=True,
              help="Print the whole schema's DDL (with the configured cluster and retention) instead of applying it: "
                   "for review, or for clickhouse-client where the pipeline may not run DDL.")  # fmt: skip
@click.option("--cluster", default=None, help="With --print-sql: the DDL for this cluster [config clickhouse.cluster].")
@_data_options
@_friendly_errors
def migrate(
    print_sql: bool, cluster: str | None, config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None
) -> None:
    """Create or upgrade the ClickHouse schema (every command also does this at start)."""
    from sinks.clickhouse import connect
    from sinks.migrations import migrate as run_migrations
    from sinks.migrations import retention_sql, schema_sql

    settings = _settings(config_path, data_dir, clickhouse_url)
    if print_sql:
        ch = settings.clickhouse
        on = cluster or ch.cluster
        for statement in [
            *schema_sql(ch.database, settings.retention, on),
            *retention_sql(ch.database, settings.retention, on),
        ]:
            sys.stdout.write(statement.rstrip().rstrip(";") + ";\n\n")
        return
    if cluster:
        raise click.UsageError("--cluster only goes with --print-sql; set clickhouse.cluster to migrate a cluster")
    conn = connect(settings.clickhouse, settings.data_dir, purpose="llmpulse migrate")
    try:
        applied = run_migrations(conn, settings.retention, settings.clickhouse.cluster)
    finally:
        conn.close()
    console.out.print(
        f"{conn.description}: " + (f"applied {', '.join(applied)}" if applied else "up to date"), markup=False
    )


def _kafka_options(fn: F) -> F:
    fn = click.option(
        "--bootstrap-servers", default=None, metavar="HOST:PORT", help="Kafka brokers [config kafka.bootstrap_servers]."
    )(fn)
    return fn


def _kafka_settings(
    config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None, bootstrap: str | None
) -> Settings:
    return load_settings(
        config_path,
        {"data_dir": data_dir, "clickhouse": {"url": clickhouse_url}, "kafka": {"bootstrap_servers": bootstrap}},
    )


@cli.group()
def topics() -> None:
    """Kafka topics llmpulse reads and writes."""


@topics.command("create")
@_kafka_options
@_data_options
@_friendly_errors
def topics_create(
    bootstrap_servers: str | None, config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None
) -> None:
    """Create every llmpulse topic that does not exist yet (names and partitions from config).
    Topics that exist are left as they are; their partition count is the broker's, shown as such."""
    import asyncio

    from ingest.kafka import create_topics, topic_partitions, topic_specs

    settings = _kafka_settings(config_path, data_dir, clickhouse_url, bootstrap_servers)
    outcome = asyncio.run(create_topics(settings.kafka))
    specs = topic_specs(settings.kafka)
    actual = asyncio.run(topic_partitions(settings.kafka, [s.name for s in specs]))
    rows = []
    for s in specs:
        status = outcome.get(s.name, "?")
        found = actual.get(s.name, s.partitions)
        if found != s.partitions:
            status += f" (config says {s.partitions} partitions; the broker's count stands)"
        rows.append({"topic": s.name, "partitions": found, "status": status, "holds": s.purpose})
    console.out.print(console.table(f"Kafka topics on {console.escape(settings.kafka.bootstrap_servers)}", rows))


async def _missing_topics(settings: Settings) -> list[str]:
    """Connect once before faust starts, and list the llmpulse topics the broker lacks: faust
    reports an unreachable broker as sixty lines of its services starting and stopping around a
    traceback, while an error raised here gets the same one-line hint as `topics create`
    (``KAFKA_UNREACHABLE``, ``KAFKA_REFUSED``)."""
    from aiokafka.admin import AIOKafkaAdminClient

    from ingest.kafka import client_options, topic_specs

    admin = AIOKafkaAdminClient(**client_options(settings.kafka))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    return [spec.name for spec in topic_specs(settings.kafka) if spec.name not in existing]


def _worker_preflight(settings: Settings) -> None:
    """What would otherwise fail once faust has started and joined the consumer group (a traceback
    after two rebalances of the running workers), or not fail at all: a worker on topics nobody
    created sat idle while the broker auto-created them with its own partitions and retention."""
    import asyncio
    import socket

    missing = asyncio.run(_missing_topics(settings))
    if missing:
        console.error(
            f"topic(s) {', '.join(missing)} do not exist on {settings.kafka.bootstrap_servers}",
            "Create them first, with the same config: `llmpulse topics create`. (A broker that creates topics "
            "on first use would give them its own partition count and retention.)",
        )
        raise SystemExit(2)
    m = settings.metrics
    if m.enabled and m.port:
        family = socket.AF_INET6 if ":" in m.addr else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((m.addr, m.port))
            except OSError as exc:
                console.error(
                    f"metrics.port {m.port} on {m.addr} is not free ({exc.strerror}): another worker on this host?",
                    "Give each worker on a host its own port (metrics.port, LLMPULSE_METRICS__PORT; 0 picks a free "
                    "one) or turn /metrics off (metrics.enabled: false).",
                )
                raise SystemExit(2) from None
    if settings.clickhouse.url:
        from llmpulse.runtime import open_clickhouse

        open_clickhouse(settings, purpose="llmpulse worker").close()  # reachable, credentials, migrations
    else:  # chDB: one process per data directory; say who holds it before joining the group
        from sinks.lock import DataDirLock

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        lock = DataDirLock(settings.data_dir)
        lock.acquire("llmpulse worker")
        lock.release()


@cli.command()
@_kafka_options
@_data_options
@_friendly_errors
def worker(
    bootstrap_servers: str | None, config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None
) -> None:
    """Consume the calls topic (llm.calls by default), feedback and judge verdicts, and write ClickHouse;
    SIGTERM drains and exits cleanly."""
    from llmpulse.worker import build_app, log_thread_crashes

    settings = _kafka_settings(config_path, data_dir, clickhouse_url, bootstrap_servers)
    _worker_preflight(settings)
    app, _ = build_app(settings)
    log_thread_crashes()
    worker = app.Worker(loglevel=settings.log_level.upper(), quiet=True)
    worker.execute_from_commandline()


@cli.command()
@click.option("--embedded", is_flag=True, help="Score judge_samples in ClickHouse instead of consuming Kafka.")
@click.option(
    "--since", type=DURATION, default=None, help="Only calls from this long ago (e.g. 7d); Kafka: skip older ones."
)
@click.option("--max-requests", type=int, default=None, help="Stop after this many requests.")
@click.option(
    "--idle-exit", type=DURATION, default=None, help="Kafka: stop after this long without requests (e.g. 30s)."
)
@click.option("--rubric", "rubric_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Rubric YAML [config judge.rubric_path, else the packaged helpfulness rubric].")  # fmt: skip
@click.option("--model", default=None, help="Judge model [config judge.model, else the rubric's].")
@click.option("--base-url", default=None, help="OpenAI-compatible API [config judge.base_url].")
@click.option("--concurrency", type=int, default=None, help="Requests in flight [config judge.concurrency].")
@click.option("--json", "as_json", is_flag=True, help="Print the run's figures as JSON.")
@_kafka_options
@_data_options
@_friendly_errors
def judge(
    embedded: bool, since: str | None, max_requests: int | None, idle_exit: str | None, rubric_path: Path | None,
    model: str | None, base_url: str | None, concurrency: int | None, as_json: bool, bootstrap_servers: str | None,
    config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None,
) -> None:  # fmt: skip
    """Score sampled calls with an LLM judge (any OpenAI-compatible API).

    The key comes from $OPENAI_API_KEY (or the variable named by judge.api_key_env). Kafka:
    consume llm.judge.requests, publish verdicts to llm.judge.results, commit once they are
    acknowledged; SIGTERM finishes the batch in hand. --embedded: score judge_samples rows not
    yet scored for this rubric and model. Calls stored without content (content.capture off)
    are skipped and counted: a judge never sees only hashes.
    """
    from llmpulse.judge import run_judge

    settings = load_settings(config_path, {
        "data_dir": data_dir, "clickhouse": {"url": clickhouse_url}, "kafka": {"bootstrap_servers": bootstrap_servers},
        "judge": {"rubric_path": rubric_path, "model": model, "base_url": base_url, "concurrency": concurrency},
    })  # fmt: skip
    with console.err.status("judging…") as status:
        stats = run_judge(
            settings, settings.judge, embedded=embedded, since=parse_duration(since) if since else None,
            max_requests=max_requests, idle_exit=parse_duration(idle_exit) if idle_exit else None,
            on_progress=lambda s: status.update(f"judging… {s.scored:,} scored, {s.skipped_total:,} skipped, "
                                                f"{s.failed:,} failed"),
        )  # fmt: skip
    if as_json:
        sys.stdout.write(json.dumps(stats.to_dict(), default=str) + "\n")
    else:
        mean = stats.mean_score
        rows = [
            {"": "requests", "value": stats.requests}, {"": "scored", "value": stats.scored},
            {"": "mean score", "value": None if mean is None else round(mean, 4)},
            *({"": f"skipped: {k}", "value": v} for k, v in sorted(stats.skipped.items())),
            *({"": f"failed: {k}", "value": v} for k, v in sorted(stats.failures.items())),
            {"": "deferred (endpoint unavailable)", "value": stats.deferred}, {"": "retries", "value": stats.retries},
            {"": "verdicts published" if not embedded else "verdicts stored", "value": stats.published},
            {"": "judge tokens in / out", "value": f"{stats.judge_input_tokens:,} / {stats.judge_output_tokens:,}"},
            {"": "seconds", "value": round(stats.seconds, 1)},
        ]  # fmt: skip
        console.out.print(console.table("llmpulse judge" + (" (embedded)" if embedded else ""), rows))
    raise SystemExit(1 if stats.failed or stats.deferred else 0)


@cli.group()
def feedback() -> None:
    """User feedback (thumbs, ratings) and the calls it is about."""


@feedback.command("relink")
@click.option("--since", type=DURATION, default="2d", show_default=True, help="Feedback from this long ago.")
@click.option("--dry-run", is_flag=True, help="Count what would be linked; write nothing.")
@_data_options
@_friendly_errors
def feedback_relink(
    since: str, dry_run: bool, config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None
) -> None:
    """Link feedback written before its call (a worker behind or down) to the call, now that it is
    there: its release, model and feature, and the hourly feedback rollups. The worker does this
    every 10 minutes; feedback of the last hour is left to it (its rollup cells are live)."""
    import time as _time

    from llmpulse.runtime import open_clickhouse
    from sinks.relink import relink_feedback

    settings = _settings(config_path, data_dir, clickhouse_url)
    conn = open_clickhouse(settings, purpose="llmpulse feedback relink")
    try:
        now = _time.time()
        outcome = relink_feedback(conn, now - parse_duration(since), now, dry_run=dry_run)
    finally:
        conn.close()
    verb = "Would link" if dry_run else "Linked"
    console.out.print(
        f"{verb} {outcome.linked:,} of {outcome.unlinked:,} feedback rows without a call in the last {since} "
        f"(the last hour excluded); the other {outcome.unlinked - outcome.linked:,} name calls not in ClickHouse.",
        markup=False,
    )


@cli.group()
def dlq() -> None:
    """Dead letters: what was rejected and why; re-drive after a fix."""


@dlq.command("show")
@click.option("--since", type=DURATION, default="7d", show_default=True, help="How far back (30m, 24h, 7d).")
@click.option("--json", "as_json", is_flag=True, help="The groups as a JSON array of objects.")
@_server_options
@_data_options
@_friendly_errors
def dlq_show(
    since: str, as_json: bool, server_url: str | None, api_key: str | None, config_path: Path | None,
    data_dir: Path | None, clickhouse_url: str | None,
) -> None:  # fmt: skip
    """Rejections grouped by reason, with an example position for each and how many still wait
    for a replay (``pending``: not yet accepted or republished by ``llmpulse dlq replay``)."""
    from llmpulse.client import open_for_reading
    from llmpulse.dlq import letters_by_reason

    settings = _reading_settings(config_path, data_dir, clickhouse_url, server_url)
    conn = open_for_reading(settings, "llmpulse dlq show", server=server_url, api_key=api_key)
    try:
        records = letters_by_reason(conn, parse_duration(since))
    finally:
        conn.close()
    if as_json:
        sys.stdout.write(orjson.dumps(records, default=_json_default).decode() + "\n")
        return
    if not records:
        console.out.print(f"No dead letters in the last {since}: every event received was accepted.", markup=False)
        return
    console.out.print(console.table(f"Dead letters in the last {console.escape(since)}", records))
    pending = sum(r["pending"] for r in records)
    if pending:
        console.out.print(
            f"{pending:,} of {sum(r['letters'] for r in records):,} not replayed yet: fix the cause (producer, "
            "price table, limits), then `llmpulse dlq replay --since SINCE --reason TEXT` re-drives them.",
            markup=False,
        )
    else:
        console.out.print("Every letter listed was replayed and accepted (or republished).", markup=False)


@dlq.command("replay")
@click.option("--since", type=DURATION, default="7d", show_default=True, help="Letters received within this period.")
@click.option("--reason", "reason_like", default=None, help="Only letters whose reason contains this text.")
@click.option("--limit", default=1_000_000, show_default=True, type=click.IntRange(1))
@click.option("--dry-run", is_flag=True, help="Show what would be accepted now, write nothing.")
@click.option(
    "--to-kafka",
    is_flag=True,
    help="Republish the raw payloads that this config's pipeline now accepts to the calls topic instead.",
)
@click.option("--all", "send_all", is_flag=True,
              help="With --to-kafka: republish every letter, also those this config still rejects (a fix deployed "
                   "to the workers only).")  # fmt: skip
@_kafka_options
@_data_options
@_friendly_errors
def dlq_replay(
    since: str,
    reason_like: str | None,
    limit: int,
    dry_run: bool,
    to_kafka: bool,
    send_all: bool,
    bootstrap_servers: str | None,
    config_path: Path | None,
    data_dir: Path | None,
    clickhouse_url: str | None,
) -> None:
    """Re-drive dead letters through the (fixed) pipeline; accepted ones are written exactly once."""
    from llmpulse.dlq import pending_letters, record, replay_into_clickhouse
    from llmpulse.runtime import EmbeddedRuntime, open_clickhouse

    settings = _kafka_settings(config_path, data_dir, clickhouse_url, bootstrap_servers)
    conn = open_clickhouse(settings, purpose="llmpulse dlq replay")
    try:
        letters = pending_letters(conn, parse_duration(since), reason_like, limit)
        runtime = EmbeddedRuntime(settings, conn)
        # --to-kafka checks first: a letter the pipeline still rejects, sent again, is rejected again
        # and lands in the dead letters twice
        outcome = replay_into_clickhouse(runtime, letters, dry_run or to_kafka)
        runtime.close()
        chosen = letters if send_all else [r for r in letters if str(r["dlq_id"]) in outcome.accepted_ids]
        if to_kafka and not dry_run:
            import asyncio

            from llmpulse.dlq import republish

            asyncio.run(republish(settings.kafka, chosen))
            record(conn, [(str(r["dlq_id"]), "republished", "") for r in chosen])
    finally:
        conn.close()
    if to_kafka:
        verb = "Would republish" if dry_run else "Republished"
        console.out.print(f"{verb} {len(chosen)} of {len(letters)} dead letters to {settings.kafka.topics.calls}.",
                          markup=False)  # fmt: skip
        if len(chosen) < len(letters):
            console.out.print(f"The other {len(letters) - len(chosen)}, which this config's pipeline still rejects, "
                              "stay in the dead letters (--all sends them anyway, for a fix deployed to the "
                              "workers only).", markup=False)  # fmt: skip
    else:
        verb = "would be" if dry_run else "were"
        console.out.print(
            f"{outcome.considered} dead letters considered: {outcome.accepted} {verb} accepted, "
            f"{outcome.rejected} still rejected."
        )
    if outcome.reasons:
        rows = [{"reason": k, "letters": v} for k, v in sorted(outcome.reasons.items())]
        console.out.print(console.table("Still rejected", rows))


@cli.group()
def rules() -> None:
    """Alert rules: check a rules file, backtest it on history."""


def _chosen_rules(file: Path | None, settings: Settings) -> tuple[Any, str]:
    """FILE, else the configured alerting.rules_path (what the worker and serve run), else the built-in
    rules; and how to name them. Without FILE the built-in rules used to be checked whatever was
    configured, so a broken rules file passed the check."""
    from schemas.rules import default_rules, load_rules

    if file is not None:
        return load_rules(file), str(file)
    configured = settings.alerting.rules_path
    if configured is not None:
        return load_rules(configured), f"{configured} (alerting.rules_path)"
    return default_rules(), "built-in rules (alerting.rules_path is not set)"


@rules.command("check")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              envvar="LLMPULSE_CONFIG", help="Config file [default ./llmpulse.yaml if present].")  # fmt: skip
@_friendly_errors
def rules_check(file: Path | None, config_path: Path | None) -> None:
    """Validate a rules file [default: the configured alerting.rules_path, else the built-in rules] and
    list what each rule watches."""
    from schemas.rules import check_channels

    settings = load_settings(config_path)
    parsed, source = _chosen_rules(file, settings)
    configured = [c.name for c in settings.alerting.channels] or ["console"]  # the worker's default
    check_channels(parsed, configured, source)
    rows = [
        {"rule": r.name, "scope": ",".join(r.scope.by) or "all", "condition": r.describe(),
         "min calls": r.min_calls, "severity": r.severity, "action": r.effective_action}
        for r in parsed.rules
    ]  # fmt: skip
    console.out.print(console.table(f"{console.escape(source)}: {len(parsed.rules)} rules", rows))
    if parsed.budgets:
        console.out.print(
            console.table(
                "Budgets",
                [{"budget": b.name, "scope": b.scope, "period": b.period, "limit_usd": b.limit_usd,
                  "warn at": ", ".join(f"{w:.0%}" for w in b.warn_at)} for b in parsed.budgets],
            )
        )  # fmt: skip


@rules.command("backtest")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False)
@click.option(
    "--since", type=DURATION, default="7d", show_default=True, help="How far back to replay (e.g. 24h, 7d, 30d)."
)
@click.option("--json", "as_json", is_flag=True, help="Incidents as a JSON array.")
@_server_options
@_data_options
@_friendly_errors
def rules_backtest(
    file: Path | None, since: str, as_json: bool, server_url: str | None, api_key: str | None,
    config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None,
) -> None:  # fmt: skip
    """Replay rules [default: the configured alerting.rules_path, else the built-in rules] over the stored
    history: when would they have fired?"""
    import time as _time

    from llmpulse.backtest import backtest
    from llmpulse.client import open_for_reading
    from sinks.alert_store import AlertStore

    settings = _settings(config_path, data_dir, clickhouse_url)
    parsed, source = _chosen_rules(file, settings)
    _require_readable(settings, server_url)
    conn = open_for_reading(settings, "llmpulse rules backtest", server=server_url, api_key=api_key)
    try:
        end = _time.time()
        raw_since = end - settings.retention.raw_days * 86400
        result = backtest(AlertStore(conn), parsed, end - parse_duration(since), end, raw_since)
    finally:
        conn.close()
    rows = [
        {"fired (UTC)": f"{i.fired_at:%Y-%m-%d %H:%M}", "rule": i.rule,
         "scope": ", ".join(f"{k}={v}" for k, v in i.scope.items()) or "all",
         "resolved (UTC)": f"{i.resolved_at:%Y-%m-%d %H:%M}" if i.resolved_at else "still firing",
         "duration": _human(i.duration_s), "value": round(i.value, 4) if i.value is not None else None,
         "action": i.action}
        for i in result.incidents
    ]  # fmt: skip
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    console.out.print(
        console.table(
            f"Backtest of {console.escape(source)} over the last {console.escape(since)}: {len(rows)} incidents", rows
        )
    )
    counts: dict[str, int] = {}
    for i in result.incidents:
        counts[i.rule] = counts.get(i.rule, 0) + 1
    quiet = [r.name for r in parsed.rules if r.name not in counts and r.name not in result.skipped_rules]
    console.out.print(
        f"{result.windows:,} rule windows evaluated. Never fired: {', '.join(quiet) or '—'}.", markup=False
    )
    for name, why in result.skipped_rules.items():
        console.out.print(f"[yellow]skipped[/] {console.escape(name)}: {console.escape(why)}")
    for name, why in result.shortened.items():
        console.out.print(f"[yellow]shortened[/] {console.escape(name)}: {console.escape(why)}")


def _human(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    hours, rem = divmod(int(seconds), 3600)
    return f"{hours}h{rem // 60:02d}m" if hours else f"{rem // 60}m"


@cli.command()
@click.option("--candidate", required=True, help="Release id, or key=value[,key=value] (e.g. variant=canary).")
@click.option("--baseline", required=True, help="Release id, or key=value[,key=value] (e.g. variant=control).")
@click.option("--feature", default=None, help="Compare within this feature.")
@click.option(
    "--since",
    default="24h",
    show_default=True,
    help="Start of the period both are measured over: a duration back from now, or an ISO 8601 time.",
)
@click.option(
    "--until", default=None, help="End of the period: a duration back from now, or an ISO 8601 time [default: now]."
)
@click.option("--max-token-increase", type=float, default=None, help="e.g. 0.15: at most +15% tokens per call.")
@click.option("--max-cost-increase", type=float, default=None, help="e.g. 0.10: at most +10% cost per call.")
@click.option("--max-p95-ms", type=float, default=None, help="Candidate p95 latency at most this (ms).")
@click.option("--max-p95-increase", type=float, default=None, help="e.g. 0.2: p95 at most +20% over the baseline.")
@click.option("--min-quality-delta", type=float, default=None, help="0: not worse; >0 demands improvement.")
@click.option("--max-refusal-increase", type=float, default=None, help="Absolute, e.g. 0.01 = +1 point.")
@click.option("--max-error-increase", type=float, default=None, help="Absolute, e.g. 0.01 = +1 point.")
@click.option("--min-calls", type=int, default=50, show_default=True, help="Calls needed on each side.")
@click.option("--min-judged", type=int, default=30, show_default=True, help="Judge scores needed on each side.")
@click.option("--allow-inconclusive", is_flag=True, help="Exit 0 (not 3) when a side has too little data.")
@click.option("--json", "as_json", is_flag=True)
@_server_options
@_data_options
@_friendly_errors
def gate(
    candidate: str, baseline: str, feature: str | None, since: str, until: str | None,
    max_token_increase: float | None,
    max_cost_increase: float | None, max_p95_ms: float | None, max_p95_increase: float | None,
    min_quality_delta: float | None, max_refusal_increase: float | None, max_error_increase: float | None,
    min_calls: int, min_judged: int, allow_inconclusive: bool, as_json: bool, server_url: str | None,
    api_key: str | None, config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None,
) -> None:  # fmt: skip
    """Compare a candidate release with its baseline; exit 1 when a policy fails (a CI gate).

    Exit codes: 0 promote, 1 a policy failed, 3 not enough data to decide.
    """
    import dataclasses
    import time as _time

    from llmpulse.client import open_for_reading
    from llmpulse.gate import GateUsageError, Policy, describe_period, evaluate, measure, parse_selector, parse_time

    now = _time.time()
    try:
        cand, base = parse_selector(candidate), parse_selector(baseline)
        start, end = parse_time(since, now), (now if until is None else parse_time(until, now))
    except GateUsageError as exc:
        console.error(str(exc))
        raise SystemExit(2) from None
    if start >= end:
        console.error(f"--since {since} is not before --until {until or 'now'}: the period is empty")
        raise SystemExit(2)
    if feature:
        cand["feature"] = base["feature"] = feature
    policy = Policy(max_token_increase, max_cost_increase, max_p95_ms, max_p95_increase, min_quality_delta,
                    max_refusal_increase, max_error_increase, min_calls, min_judged)  # fmt: skip
    settings = _reading_settings(config_path, data_dir, clickhouse_url, server_url)
    conn = open_for_reading(settings, "llmpulse gate", server=server_url, api_key=api_key)
    try:
        result = evaluate(measure(conn, base, start, end, baseline), measure(conn, cand, start, end, candidate), policy)
    finally:
        conn.close()
    code = 0 if result.passed else 1
    if result.passed and not result.conclusive and not allow_inconclusive:
        code = 3
    if as_json:
        out = {"passed": result.passed, "conclusive": result.conclusive, "exit_code": code,
               "baseline": dataclasses.asdict(result.baseline), "candidate": dataclasses.asdict(result.candidate),
               "checks": [dataclasses.asdict(c) for c in result.checks]}  # fmt: skip
        sys.stdout.write(json.dumps(out, default=str) + "\n")
        raise SystemExit(code)
    rows = [
        {"metric": c.metric, "baseline": c.baseline, "candidate": c.candidate, "change": c.change,
         "limit": c.limit, "verdict": c.verdict}
        for c in result.checks
    ]  # fmt: skip
    compared = f"{candidate} vs {baseline} {describe_period(since, until)}"
    console.out.print(console.table(f"Gate: {console.escape(compared)}", rows))
    if code == 0:
        console.out.print("[bold green]PROMOTE[/]: every policy holds.")
    elif code == 1:
        failed = ", ".join(c.metric for c in result.checks if c.verdict == "FAIL")
        console.out.print(f"[bold red]REFUSE[/]: {console.escape(failed)} outside policy.")
    else:
        console.out.print("[bold yellow]INCONCLUSIVE[/]: not enough calls or judge scores on a side to decide.")
    raise SystemExit(code)


@cli.command("trace")
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True)
@_server_options
@_data_options
@_friendly_errors
def trace_cmd(
    request_id: str, as_json: bool, server_url: str | None, api_key: str | None, config_path: Path | None,
    data_dir: Path | None, clickhouse_url: str | None,
) -> None:  # fmt: skip
    """Lineage of one call: its release tuple, judge scores and feedback, and how its release
    compares with the release of the same feature before it."""
    import dataclasses

    from llmpulse.client import open_for_reading
    from llmpulse.lineage import NotFound, trace

    settings = _reading_settings(config_path, data_dir, clickhouse_url, server_url)
    conn = open_for_reading(settings, "llmpulse trace", server=server_url, api_key=api_key)
    try:
        try:
            t = trace(conn, request_id)
        except NotFound:
            console.error(f"no call with request_id {request_id!r}",
                          "request ids are the ones your services send; see: llmpulse query "
                          '"SELECT request_id, ts, feature FROM llm_calls ORDER BY ts DESC LIMIT 10"')  # fmt: skip
            raise SystemExit(1) from None
    finally:
        conn.close()
    if as_json:
        sys.stdout.write(orjson.dumps(dataclasses.asdict(t), default=_json_default).decode() + "\n")
        return
    _render_trace(t)


def _render_trace(t: Any) -> None:
    out, c = console.out, t.call
    cached = f" ({c['cached_input_tokens']:,} cached)" if c["cached_input_tokens"] else ""
    ttft = f", first token {c['ttft_ms']:,.0f} ms" if c["ttft_ms"] is not None else ""
    cost = (
        "unpriced"
        if c["cost_usd"] is None
        else f"${c['cost_usd']:.6f} ({c['cost_source']}, prices {c['price_version']})"
    )
    status = c["status"] + (" · refused" if c["refusal"] else "") + (f" · {c['error_type']}" if c["error_type"] else "")
    rows = [
        ("when", _json_default(c["ts"])), ("feature", f"{c['feature']} (team {c['team']}, service {c['service']})"),
        ("provider / model", f"{c['provider']} / {c['model']}" + (f" → served by {c['response_model']}"
                                                                  if c["response_model"] else "")),
        ("status", status), ("tokens", f"{c['input_tokens']:,} in{cached}, {c['output_tokens']:,} out"),
        ("latency", f"{c['latency_ms']:,.0f} ms{ttft}"), ("cost", cost),
    ]  # fmt: skip
    if c["fallback_from"]:
        rows.append(("fell back from", c["fallback_from"]))
    if t.flow:
        f = t.flow
        where = f"call {f['position']} of {f['calls']}: {f['tokens']:,} tokens, ${f['cost_usd']:.4f}, "
        rows.append((f"flow ({f['by']})", where + f"{_duration_ms(f['span_ms'])} start to end"))
    out.print(console.table(f"Call {console.escape(c['request_id'])}", [{"": k, "value": v} for k, v in rows]))
    r = t.this_release
    seen = (
        f" — live {_json_default(r.first_seen)[:16]} → {_json_default(r.last_seen)[:16]}, {r.calls:,} calls"
        if r
        else ""
    )
    release = f"{c['release_id']} ({c['variant'] or 'no variant'})"
    out.print(console.table(f"Release {console.escape(release)}{seen}",
                            [{"field": k, "value": v} for k, v in t.release.items()]))  # fmt: skip
    if t.verdicts:
        out.print(console.table("Judge verdicts", t.verdicts))
    else:
        out.print("[dim]Not judged (not sampled; a thumbs-down or a higher sampling rate would send it).[/]")
    if t.feedback:
        out.print(console.table("User feedback", t.feedback))
    if c["output"] is not None:
        out.print(f"[bold]Output[/] ({c['output_chars'] or len(c['output']):,} chars): "
                  f"{console.escape(c['output'][:500])}", highlight=False)  # fmt: skip
    if t.comparison is None:
        out.print("[dim]No earlier release of this feature to compare with.[/]")
        return
    p = t.previous_release
    rows = [
        {"metric": k.metric, p.release_id: k.baseline, c["release_id"]: k.candidate, "change": k.change}
        for k in t.comparison.checks
    ]
    before = f"{p.release_id} (prompt {p.prompt_version}, {p.model}, live from {_json_default(p.first_seen)[:16]})"
    out.print(console.table(f"Against the release before it: {console.escape(before)}", rows))


def _duration_ms(ms: float) -> str:
    if ms < 10_000:
        return f"{ms:,.0f} ms"
    return f"{ms / 1000:,.1f} s" if ms < 120_000 else f"{ms / 60_000:,.1f} min"


@cli.command()
@click.option("--since", type=DURATION, required=True, help="Reprice calls from this long ago (e.g. 30d).")
@click.option(
    "--until", "until", type=DURATION, default=None, help="...up to this long ago [default: the start of this hour]."
)
@click.option("--price-version", default=None, help="Refuse unless the price table applied has this version.")
@click.option("--prices", "prices_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Price table JSON to apply [default: the configured one].")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")
@_data_options
@_friendly_errors
def reprice(
    since: str, until: str | None, price_version: str | None, prices_path: Path | None, dry_run: bool,
    config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None,
) -> None:  # fmt: skip
    """Recompute past calls' costs with the current price table; history kept in cost_history.

    Calls priced by their client are left alone. The minute rollups of the period are rebuilt
    from raw, so dashboards and budgets see the new figures; the default end (the start of this
    hour) keeps the rebuild clear of minutes a live worker is still writing.
    """
    import time as _time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from llmpulse.reprice import DAY
    from llmpulse.reprice import reprice as run_reprice
    from llmpulse.runtime import open_clickhouse, price_table
    from schemas.prices import load_price_table

    settings = _settings(config_path, data_dir, clickhouse_url)
    table = load_price_table(prices_path) if prices_path else price_table(settings)
    if price_version is not None and table.price_version != price_version:
        source = prices_path or "the configured price table"
        console.error(f"{source} is price version {table.price_version!r}, not {price_version!r}",
                      "import the new prices first (llmpulse prices import FILE) or pass --prices FILE")  # fmt: skip
        raise SystemExit(2)
    now = _time.time()
    end = now - now % 3600 if until is None else now - parse_duration(until)
    start = now - parse_duration(since)
    if start >= end:
        console.error(f"nothing to do: --since {since} starts after the end of the period")
        raise SystemExit(2)
    conn = open_clickhouse(settings, purpose="llmpulse reprice")
    try:
        days = int(-(-(end - (start - start % DAY)) // DAY))
        with Progress(TextColumn("[bold]reprice[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("days"),
                      console=console.err, transient=True) as progress:  # fmt: skip
            task = progress.add_task("reprice", total=days)
            stats = run_reprice(conn, table, start, end, dry_run=dry_run,
                                on_day=lambda n: progress.advance(task, n))  # fmt: skip
    finally:
        conn.close()
    rows = [
        # old → new and the change over the calls that had a cost; those priced for the first time
        # apart (counted in the change they would read as an increase, and their old cost is no $0)
        {"model": m, "calls": n, "old_cost_usd": None if fresh == n else round(o, 6),
         "new_cost_usd": None if fresh == n else round(c, 6),
         "change": "—" if fresh == n else f"{(c - o) / o:+.1%}" if o else "—",
         "priced for the first time": fresh, "their cost_usd": round(fresh_c, 6) if fresh else None}
        for m, (n, o, c, fresh, fresh_c) in sorted(stats.by_model.items(),
                                                   key=lambda kv: -abs(kv[1][2] - kv[1][1]) - kv[1][4])
    ]  # fmt: skip
    verb = "Would reprice" if dry_run else "Repriced"
    title = (f"{verb} {stats.changed:,} of {stats.scanned:,} calls to price version "
             f"{console.escape(stats.price_version)} ({_json_default(datetime.fromtimestamp(start, UTC))[:16]} → "
             f"{_json_default(datetime.fromtimestamp(end, UTC))[:16]}, {stats.seconds:.1f} s)")  # fmt: skip
    console.out.print(console.table(title, rows) if rows else title)
    total = f"Total: {_usd(stats.old_cost_usd)} → {_usd(stats.new_cost_usd)}"
    if stats.newly_priced:
        total += f"; {stats.newly_priced:,} calls priced for the first time: {_usd(stats.fresh_cost_usd)}"
    if stats.still_unpriced:
        total += f"; {stats.still_unpriced:,} still without a price"
    if stats.kept:
        total += f"; {stats.kept:,} whose model this table lacks keep their cost and price version"
    console.out.print(total)
    if not dry_run and stats.changed:
        history = ("SELECT new_price_version, old_price_version, count(), sum(old_cost_usd), sum(new_cost_usd) "
                   "FROM cost_history GROUP BY ALL")  # fmt: skip
        console.out.print(f'History: llmpulse query "{history}"', highlight=False)


@cli.command()
@click.option(
    "--since", type=DURATION, default="7d", show_default=True, help="Check the period starting this long ago."
)
@click.option("--until", "until", type=DURATION, default=None, help="...and ending this long ago [default: now].")
@click.option("--fix", is_flag=True, help="Rebuild the rollup buckets found wrong from raw; merge repeated rows.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@_data_options
@_friendly_errors
def reconcile(
    since: str, until: str | None, fix: bool, as_json: bool, config_path: Path | None, data_dir: Path | None,
    clickhouse_url: str | None,
) -> None:  # fmt: skip
    """Recompute the rollups from raw rows (FINAL) and report every difference; find repeated events.

    Exit 0 when everything matches (or --fix repaired all of it), 1 when differences remain.
    """
    import time as _time

    from llmpulse.reconcile import as_json as report_json
    from llmpulse.reconcile import reconcile as run_reconcile
    from llmpulse.runtime import open_clickhouse

    now = _time.time()
    start, end = now - parse_duration(since), now - (parse_duration(until) if until else 0.0)
    if start >= end:
        console.error(f"nothing to do: --since {since} starts after the end of the period")
        raise SystemExit(2)
    settings = _reading_settings(config_path, data_dir, clickhouse_url)
    conn = open_clickhouse(settings, purpose="llmpulse reconcile")
    try:
        report = run_reconcile(conn, start, end, fix=fix)
    finally:
        conn.close()
    if as_json:
        sys.stdout.write(orjson.dumps(report_json(report)).decode() + "\n")
    else:
        _render_reconcile(report)
    raise SystemExit(0 if report.ok else 1)


def _render_reconcile(report: Any) -> None:
    from llmpulse.reconcile import as_json as report_json

    out = console.out
    data = report_json(report)
    raw = report.raw
    out.print(f"Reconciled {data['start'][:16]} → {data['end'][:16]} in {report.seconds:.1f} s: {raw.rows:,} raw "
              f"rows, {raw.rows_final:,} after FINAL, {raw.event_ids:,} event ids", highlight=False)  # fmt: skip
    if report.differences:
        rows = [{"table": d["table"], "bucket": next(iter(d["key"].values()))[:16],
                 "key": " ".join(f"{k}={v}" for k, v in list(d["key"].items())[1:] if v not in ("", None)),
                 "column": d["column"], "stored": d["stored"], "recomputed": d["recomputed"]}
                for d in data["differences"]]  # fmt: skip
        out.print(console.table("Rollup cells that differ from their recomputation", rows))
    if report.repeats:
        out.print(console.table(f"Repeated events: {report.repeated_ids:,} ids",
                                [vars(r) for r in report.repeats[:50]]))  # fmt: skip
    for table, buckets in data["rebuilt"].items():
        out.print(f"rebuilt {len(buckets)} bucket(s) of {table} from raw", highlight=False)
    if report.merged_months:
        out.print(f"merged llm_calls months {', '.join(map(str, report.merged_months))}", highlight=False)
    if not report.found:
        out.print("[bold green]ok[/]: every rollup equals its recomputation; no event stored twice")
    elif report.ok:
        out.print("[bold green]repaired[/]: checked again, nothing differs")
    elif report.rebuilt or report.merged_months:
        out.print(f"[bold red]{report.remaining:,} difference(s) left after repairing[/] (an event id under two "
                  "features or days is the producer's to resolve)")  # fmt: skip
    else:
        out.print(f"[bold red]{len(report.differences):,} rollup cell(s) differ, {report.repeated_ids:,} event "
                  "id(s) stored more than once[/]; `--fix` rebuilds the cells from raw")  # fmt: skip


def _usd(x: float) -> str:
    """Cents once the sums are large, four places below $100 (a few calls' worth)."""
    return f"${x:,.2f}" if abs(x) >= 100 else f"${x:,.4f}"


@cli.command("drift")
@click.option(
    "--window", type=DURATION, default="24h", show_default=True, help="The recent period to check (ends now)."
)
@click.option("--baseline", type=DURATION, default="7d", show_default=True, help="Trailing period before the window.")
@click.option("--reference", default=None, metavar="FROM..TO",
              help="A pinned baseline instead, e.g. 2026-11-02..2026-11-09 (ISO dates or times, UTC).")  # fmt: skip
@click.option("--feature", default=None, help="Only this feature.")
@click.option("--max-length-change", type=float, default=0.2, show_default=True,
              help="Relative change of mean/p95 output tokens that counts as drift.")  # fmt: skip
@click.option("--max-rate-change", type=float, default=0.02, show_default=True,
              help="Absolute change of a rate (also needs to be beyond noise).")  # fmt: skip
@click.option("--max-psi", type=float, default=0.2, show_default=True, help="PSI on output length that counts.")
@click.option("--fail-on-drift", is_flag=True, help="Exit 1 when anything drifted (for CI or cron).")
@click.option("--json", "as_json", is_flag=True)
@_server_options
@_data_options
@_friendly_errors
def drift_cmd(
    window: str, baseline: str, reference: str | None, feature: str | None, max_length_change: float,
    max_rate_change: float, max_psi: float, fail_on_drift: bool, as_json: bool, server_url: str | None,
    api_key: str | None, config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None,
) -> None:  # fmt: skip
    """Per feature and model: the window against its baseline — output length (mean, p95, PSI),
    refusal, schema-valid, tool-call and thumbs-down rates — and model snapshot changes."""
    import dataclasses
    import time as _time

    from llmpulse.client import open_for_reading
    from llmpulse.drift import Thresholds, drift

    now = _time.time()
    win = (now - parse_duration(window), now)
    if reference:
        try:
            lo, hi = (datetime.fromisoformat(x.strip()).replace(tzinfo=UTC) for x in reference.split(".."))
        except ValueError:
            console.error(f"--reference {reference!r}: expected FROM..TO, e.g. 2026-11-02..2026-11-09")
            raise SystemExit(2) from None
        base = (lo.timestamp(), hi.timestamp())
    else:
        base = (win[0] - parse_duration(baseline), win[0])
    settings = _reading_settings(config_path, data_dir, clickhouse_url, server_url)
    conn = open_for_reading(settings, "llmpulse drift", server=server_url, api_key=api_key)
    try:
        report = drift(conn, win, base, Thresholds(max_length_change, max_rate_change, max_psi), feature)
    finally:
        conn.close()
    if as_json:
        sys.stdout.write(orjson.dumps(dataclasses.asdict(report), default=_json_default).decode() + "\n")
    else:
        _render_drift(report)
    raise SystemExit(1 if fail_on_drift and report.drifted else 0)


def _render_drift(report: Any) -> None:
    from rich.text import Text

    out = console.out
    w0, w1 = (_json_default(t)[:16] for t in report.window)
    b0, b1 = (_json_default(t)[:16] for t in report.baseline)
    rows = []
    for m in report.models:
        # Styled as Text: table cells are literal, so markup in a cell would show as brackets.
        marks = {c.metric: Text(c.detail, style="bold red" if c.drifted else "") for c in m.changes}
        rows.append({
            "feature": m.feature, "model": m.model, "calls": m.calls,
            "mean out": marks.get("output_tokens_avg"), "p95 out": marks.get("output_tokens_p95"),
            "PSI out": Text.assemble(f"{m.psi:.3f} " if m.psi is not None else "",
                                     marks.get("output_tokens_psi") or ""),
            "refusals": marks.get("refusal_rate"), "schema ok": marks.get("schema_valid_rate"),
            "tools": marks.get("tool_call_rate"), "thumbs down": marks.get("thumbs_down_rate"),
            "verdict": Text("DRIFT", style="bold red") if m.drifted else "ok",
        })  # fmt: skip
    out.print(console.table(f"Drift: {w0} → {w1} against {b0} → {b1}", rows))
    for model, found in report.versions.items():
        for v in found:
            if v.kind == "switched":
                used = ", ".join(sorted(set(report.features.get(model, []))))
                switched = console.escape(f"{v.detail} (used by {used})")
                out.print(f"[bold red]model switched[/] {switched}", highlight=False)
    unpinned = sorted(m for m, found in report.versions.items() if any(v.kind == "unpinned" for v in found))
    if unpinned:
        out.print(f"[yellow]Unpinned model aliases[/] (the provider decides when they change; pin a snapshot): "
                  f"{console.escape(', '.join(unpinned))}", highlight=False)  # fmt: skip
    if report.thin:
        thin = ", ".join(f"{f}/{m} ({w}/{b})" for f, m, w, b in report.thin[:8])
        more = f" and {len(report.thin) - 8} more" if len(report.thin) > 8 else ""
        out.print(f"[dim]Too few calls to judge (window/baseline, need {report.thresholds.min_calls} each): "
                  f"{console.escape(thin)}{more}[/]", highlight=False)  # fmt: skip


@cli.group()
def report() -> None:
    """Reports for people: the weekly LLMOps review."""


@report.command("weekly")
@click.option("--week", default=None, metavar="YYYY-Www",
              help="ISO week, e.g. 2026-W47 [default: the last complete week, or the newest data's week].")  # fmt: skip
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for report.html, summary.md, report.json [data_dir/reports/YYYY-Www].")  # fmt: skip
@click.option("--rules", "rules_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Rules file with the budgets and latency rules to show [config alerting.rules_path].")  # fmt: skip
@click.option("--open", "open_browser", is_flag=True, help="Open the page in a browser afterwards.")
@_server_options
@_data_options
@_friendly_errors
def report_weekly(
    week: str | None, out_dir: Path | None, rules_path: Path | None, open_browser: bool, server_url: str | None,
    api_key: str | None, config_path: Path | None, data_dir: Path | None, clickhouse_url: str | None,
) -> None:  # fmt: skip
    """Spend, budgets, latency, errors, eval and drift, alerts, error patterns, flagged outputs and cache
    savings for one ISO week: a self-contained HTML page (charts inline, opens offline) and a summary
    to paste in chat. Also overwrites data_dir/reports/latest.html, the page `llmpulse serve` shows."""
    from llmpulse.alerting import rules_for
    from llmpulse.client import open_for_reading
    from llmpulse.report import ReportError, Week, build_weekly, choose_week, write
    from schemas.rules import RulesError

    settings = _reading_settings(config_path, data_dir, clickhouse_url, server_url)
    try:
        chosen = Week.parse(week) if week else None
        rules = rules_for(settings, rules_path)
    except (ReportError, RulesError) as exc:
        console.error(str(exc))
        raise SystemExit(2) from None
    conn = open_for_reading(settings, "llmpulse report weekly", server=server_url, api_key=api_key)
    try:
        reason = "as asked (--week)"
        if chosen is None:
            chosen, reason = choose_week(conn)
        with console.err.status(f"building the {chosen.label} report…"):
            built = build_weekly(conn, chosen, rules, reason=reason)
    finally:
        conn.close()
    reports = settings.data_dir / "reports"
    written = write(built, out_dir or reports / chosen.label, reports / "latest.html")
    console.out.print(f"[bold]Weekly report {console.escape(chosen.label)}[/] ({console.escape(reason)}; "
                      f"{built.timings['total']:.2f} s)\n")  # fmt: skip
    console.out.print(written.markdown.read_text(encoding="utf-8"), highlight=False, markup=False)
    console.out.print(f"HTML: {written.html}\nMarkdown: {written.markdown}\nJSON: {written.json}\n"
                      f"Latest: {written.latest}", highlight=False, markup=False)  # fmt: skip
    if open_browser:
        import webbrowser

        webbrowser.open(written.html.resolve().as_uri())


def _register_server_commands() -> None:
    """``serve``, ``keys`` and ``tenant-sql`` live in llmpulse.server, which imports the helpers above and
    adds its commands to ``cli`` when it loads (when it is the one importing this module, it is loading)."""
    if "llmpulse.server" not in sys.modules:
        import llmpulse.server  # noqa: F401


_register_server_commands()
