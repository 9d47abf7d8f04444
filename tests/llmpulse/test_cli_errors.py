"""Mistakes a user makes (a typo, a server that is down, a bad file) end in one line that says what
to do and exit code 2, never a traceback. In subprocesses, as a user runs the command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.llmpulse.test_cli import holding, llmpulse

UNREACHABLE = "http://127.0.0.1:1"


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "Aborted!" not in stderr


@pytest.mark.parametrize(
    "args",
    [
        ("query", "SELECT 1"),
        ("migrate",),
        ("reconcile",),
        ("dlq", "show"),
        ("demo", "--events", "10"),
    ],
)
def test_an_unreachable_clickhouse_server_is_one_line_with_the_hint(args: tuple[str, ...]) -> None:
    proc = llmpulse(*args, "--clickhouse-url", UNREACHABLE, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "cannot connect to the ClickHouse server at http://127.0.0.1:1: Connection refused" in proc.stderr
    assert "Is ClickHouse reachable?" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2  # the error and the hint: no driver chatter
    no_traceback(proc.stderr)


def test_replay_to_an_unreachable_clickhouse_server(tmp_path: Path) -> None:
    file = tmp_path / "calls.jsonl"
    file.write_text("{}\n")
    proc = llmpulse("replay", str(file), "--clickhouse-url", UNREACHABLE, check=False)
    assert proc.returncode == 2 and "Is ClickHouse reachable?" in proc.stderr
    no_traceback(proc.stderr)


@pytest.mark.parametrize(
    "args, option",
    [
        (("reconcile", "--since", "foo"), "--since"),
        (("reconcile", "--until", "foo"), "--until"),
        (("dlq", "show", "--since", "foo"), "--since"),
        (("dlq", "replay", "--since", "foo"), "--since"),
        (("query", "cost_by_feature", "--since", "foo"), "--since"),
        (("rules", "backtest", "--since", "foo"), "--since"),
        (("reprice", "--since", "foo"), "--since"),
        (("reprice", "--since", "7d", "--until", "foo"), "--until"),
        (("drift", "--window", "foo"), "--window"),
        (("drift", "--baseline", "foo"), "--baseline"),
        (("judge", "--since", "foo"), "--since"),
        (("judge", "--idle-exit", "foo"), "--idle-exit"),
    ],
)
def test_a_bad_duration_is_a_usage_error_naming_the_option(tmp_path: Path, args: tuple[str, ...], option: str) -> None:
    proc = llmpulse(*args, "--data-dir", str(tmp_path / "d"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"Invalid value for '{option}': expected a duration like '30s', '5m', '1h' or '7d', got 'foo'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()  # refused before touching anything


def test_a_zero_window_is_a_config_error(tmp_path: Path) -> None:
    proc = llmpulse("demo", "--events", "200", "--data-dir", str(tmp_path / "d"), check=False,
                    LLMPULSE_PIPELINE__WINDOW="0s")  # fmt: skip
    assert proc.returncode == 2
    assert "environment variable LLMPULSE_PIPELINE__WINDOW: key `pipeline.window`" in proc.stderr
    assert "at least 1s" in proc.stderr
    no_traceback(proc.stderr)


@pytest.mark.parametrize("command", [("demo", "--events", "200"), ("serve", "--port", "0")])
@pytest.mark.parametrize("rules", ["missing", "invalid"])
def test_a_bad_configured_rules_file_is_reported_not_raised(
    tmp_path: Path, command: tuple[str, ...], rules: str
) -> None:
    path = tmp_path / "rules.yaml"
    if rules == "invalid":
        path.write_text("rules: [{name: x}]\n")
    proc = llmpulse(*command, "--data-dir", str(tmp_path / "d"), check=False,
                    LLMPULSE_ALERTING__RULES_PATH=str(path))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr and "alerting.rules_path" in proc.stderr
    no_traceback(proc.stderr)


def test_secrets_are_not_printed_in_config_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "llmpulse.yaml"
    cfg.write_text("clickhouse: {password: 20240917}\nkafka: {sasl_password: 20240917}\n")
    proc = llmpulse("query", "SELECT 1", "--config", str(cfg), check=False)
    assert proc.returncode == 2
    assert "key `clickhouse.password`" in proc.stderr and "key `kafka.sasl_password`" in proc.stderr
    assert "20240917" not in proc.stderr


def test_worker_with_an_unreachable_kafka_gives_the_hint(tmp_path: Path) -> None:
    proc = llmpulse("worker", "--data-dir", str(tmp_path / "d"), check=False,
                    LLMPULSE_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1")  # fmt: skip
    assert proc.returncode == 2
    assert "Is Kafka reachable? Check kafka.bootstrap_servers" in proc.stderr
    no_traceback(proc.stderr)
    assert len(proc.stderr.strip().splitlines()) <= 3


def test_a_malformed_bootstrap_address_is_a_config_error() -> None:
    proc = llmpulse("topics", "create", "--bootstrap-servers", "garbage::x", check=False)
    assert proc.returncode == 2
    assert "key `kafka.bootstrap_servers`" in proc.stderr and "'garbage::x' is not a host:port" in proc.stderr
    no_traceback(proc.stderr)


def test_replay_hint_for_rejected_lines_runs_against_the_same_data(tmp_path: Path) -> None:
    import shlex

    data = tmp_path / "d"
    file = tmp_path / "it's.jsonl"
    file.write_text('{"broken"\n')
    out = llmpulse("replay", str(file), "--data-dir", str(data)).stdout
    (hint,) = [line for line in out.splitlines() if "See why lines were rejected" in line]
    args = shlex.split(hint.split("llmpulse ", 1)[1])
    assert args[:3] == ["query", "--data-dir", str(data)]
    shown = llmpulse(*args, "--format", "json").stdout
    assert '"line":1' in shown and "not valid JSON" in shown


@pytest.mark.parametrize(
    "sql, expected, code",
    [
        ("no_such_query", "no named query 'no_such_query'", 2),
        ("cost_by_featur", "did you mean cost_by_feature", 2),
        ("SELECT 1 FORMAT JSON", "`FORMAT JSON`: llmpulse query sets the output format itself", 2),
        ("SELEC foo FROM bar", "`SELEC` does not start a statement (did you mean SELECT?)", 1),
        ("SELECT (1", "failed at the end of the query: Unmatched parentheses", 1),
    ],
)
def test_query_errors_are_about_the_users_sql(tmp_path: Path, sql: str, expected: str, code: int) -> None:
    llmpulse("migrate", "--data-dir", str(tmp_path / "d"))
    proc = llmpulse("query", sql, "--data-dir", str(tmp_path / "d"), check=False)
    assert proc.returncode == code, proc.stderr
    assert expected in proc.stderr.replace("\n", " ")
    assert "Native" not in proc.stderr
    no_traceback(proc.stderr)


@pytest.mark.parametrize(
    "args",
    [
        ("query", "SELECT count() FROM llm_calls"),
        ("report", "weekly"),
        ("gate", "--candidate", "variant=canary", "--baseline", "variant=control"),
        ("trace", "r-1"),
        ("drift",),
        ("reconcile",),
        ("dlq", "show"),
        ("rules", "backtest"),
    ],
)
@pytest.mark.parametrize("state", ["missing", "empty"])
def test_reading_a_data_dir_without_data_is_an_error(tmp_path: Path, args: tuple[str, ...], state: str) -> None:
    data = tmp_path / "does not exist"
    if state == "empty":
        data.mkdir()
    proc = llmpulse(*args, "--data-dir", str(data), check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.replace("\n", " ")
    assert f"data directory {data} {'does not exist' if state == 'missing' else 'holds no llmpulse data'}" in err
    assert f"llmpulse demo --data-dir '{data}'" in err and "llmpulse replay FILE" in err
    assert data.exists() == (state == "empty") and not (data / "chdb").exists()  # nothing created


def test_commands_that_write_still_create_the_data_dir(tmp_path: Path) -> None:
    llmpulse("migrate", "--data-dir", str(tmp_path / "d"))
    assert (tmp_path / "d" / "chdb").is_dir()
    assert llmpulse("query", "SELECT count() n FROM llm_calls", "--data-dir", str(tmp_path / "d")).returncode == 0


def test_rules_check_without_file_checks_the_configured_rules(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{name: x}]\n")
    proc = llmpulse("rules", "check", check=False, cwd=tmp_path, LLMPULSE_ALERTING__RULES_PATH=str(bad))
    assert proc.returncode == 2 and f"{bad}: rule 'x'" in proc.stderr
    good = tmp_path / "good.yaml"
    good.write_text("rules:\n  - {name: slow, metric: latency_p95_ms, scope: [feature], window: 5m, max: 9000}\n")
    ok = llmpulse("rules", "check", cwd=tmp_path, LLMPULSE_ALERTING__RULES_PATH=str(good))
    assert f"{good} (alerting.rules_path): 1 rules" in " ".join(ok.stdout.split())  # the title wraps
    builtin = llmpulse("rules", "check", cwd=tmp_path)
    assert "built-in rules (alerting.rules_path is not set)" in " ".join(builtin.stdout.split())


def test_rules_backtest_without_file_uses_the_configured_rules(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{name: x}]\n")
    data = tmp_path / "d"
    llmpulse("migrate", "--data-dir", str(data))
    proc = llmpulse("rules", "backtest", "--data-dir", str(data), check=False, LLMPULSE_ALERTING__RULES_PATH=str(bad))
    assert proc.returncode == 2 and f"{bad}: rule 'x'" in proc.stderr
    no_traceback(proc.stderr)


def test_a_data_dir_held_by_serve_suggests_only_options_the_command_has(tmp_path: Path) -> None:
    data = tmp_path / "d"
    with holding(data, "llmpulse serve", server_url="http://127.0.0.1:9") as holder:
        for args in (("reconcile",), ("migrate",), ("dlq", "replay")):
            proc = llmpulse(*args, "--data-dir", str(data), check=False)
            err = " ".join(proc.stderr.split())
            assert proc.returncode == 2 and f"is in use by `llmpulse serve` (pid {holder.pid}" in err
            assert "--server" not in err and "Stop that process first" in err
            assert f"`llmpulse {' '.join(args)}` cannot run through it" in err


def test_demo_refuses_to_drop_feedback_and_dead_letters_that_are_not_its_own(tmp_path: Path) -> None:
    data = tmp_path / "d"
    file = tmp_path / "fb.jsonl"
    file.write_text(
        '{"broken"\n{"kind": "feedback", "request_id": "r-1", "ts": "2026-11-25T00:00:00Z", "thumbs": "down"}\n'
    )
    llmpulse("replay", str(file), "--data-dir", str(data))
    proc = llmpulse("demo", "--events", "300", "--data-dir", str(data), check=False)
    assert proc.returncode == 2
    assert "holds 1 dead letters, 1 feedback rows that are not demo data" in " ".join(proc.stderr.split())
    kept = llmpulse("query", "SELECT (SELECT count() FROM feedback) f, (SELECT count() FROM dlq) d", "--format",
                    "json", "--data-dir", str(data)).stdout  # fmt: skip
    assert kept.strip() == '[{"f":1,"d":1}]'


def test_demo_replaces_its_own_data(tmp_path: Path) -> None:
    data = tmp_path / "d"
    for _ in range(2):
        llmpulse("demo", "--events", "300", "--days", "1", "--data-dir", str(data), "--json")


def test_a_cut_short_gzip_replay_says_what_happened_not_aborted(tmp_path: Path) -> None:
    """Python raises EOFError for a gzip stream that ends early; click answered it with "Aborted!"."""
    import gzip
    import shlex

    whole = gzip.compress(b"".join(b'{"n": %d}\n' % i for i in range(20_000)))
    file = tmp_path / "my calls.jsonl.gz"  # the hint quotes it for a shell
    file.write_bytes(whole[: len(whole) // 2])
    proc = llmpulse("replay", str(file), "--data-dir", str(tmp_path / "data"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {file}: its gzip stream ends before the end-of-stream marker: the file was cut short" in proc.stderr
    assert "Nothing was replayed from it." in proc.stderr
    assert f"zcat '{file}' > part.jsonl" in proc.stderr and shlex.quote(str(file)) == f"'{file}'"
    no_traceback(proc.stderr)


def test_prices_import_skips_a_malformed_entry_and_names_it(tmp_path: Path) -> None:
    """One odd entry among LiteLLM's ~2,000 aborted the whole import."""
    import json

    file = tmp_path / "litellm.json"
    file.write_text(json.dumps({
        "odd-model": {"mode": "chat", "input_cost_per_token": "free", "output_cost_per_token": 1e-6},
        "my-model": {"litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 1e-6,
                     "output_cost_per_token": 2e-6},
    }))  # fmt: skip
    out = tmp_path / "prices.json"
    proc = llmpulse("prices", "import", str(file), "--out", str(out), "--data-dir", str(tmp_path / "data"))
    assert "Imported 1 models" in proc.stdout
    assert "Skipped 1 malformed entry (their models keep the built-in price, or none): odd-model: expected a " \
           "non-negative number, got 'free'" in proc.stdout  # fmt: skip
    assert "my-model" in json.loads(out.read_text())["models"]


def test_a_worker_on_topics_nobody_created_refuses_to_start(tmp_path: Path, kafka_settings: Any) -> None:
    """It sat idle, the broker auto-creating its topics with its own partitions and retention."""
    from tests.llmpulse.workers import write_config

    cfg = write_config(tmp_path / "llmpulse.yaml", kafka_settings)
    proc = llmpulse("worker", "--config", str(cfg), "--data-dir", str(tmp_path / "d"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"error: topic(s) {kafka_settings.topics.calls}, {kafka_settings.topics.feedback}," in proc.stderr
    assert "Create them first, with the same config: `llmpulse topics create`" in proc.stderr
    no_traceback(proc.stderr)


def test_worker_startup_failures_are_one_line_before_joining_the_group(tmp_path: Path, kafka_settings: Any) -> None:
    """A second worker on the host's metrics port, or on a data directory in use, crashed with a
    traceback once faust had started and joined the consumer group (rebalancing the running one)."""
    import asyncio
    import socket

    from ingest.kafka import create_topics
    from sinks.lock import DataDirLock
    from tests.llmpulse.workers import write_config

    asyncio.run(create_topics(kafka_settings))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path / "busy-port.yaml", kafka_settings, metrics={"port": port, "addr": "127.0.0.1"})
        proc = llmpulse("worker", "--config", str(cfg), "--data-dir", str(tmp_path / "d"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"error: metrics.port {port} on 127.0.0.1 is not free (Address already in use)" in proc.stderr
    assert "LLMPULSE_METRICS__PORT; 0 picks a free one" in proc.stderr
    no_traceback(proc.stderr)
    held = tmp_path / "held"
    held.mkdir()
    lock = DataDirLock(held)
    lock.acquire("llmpulse worker")
    try:
        cfg = write_config(tmp_path / "free-port.yaml", kafka_settings)
        proc = llmpulse("worker", "--config", str(cfg), "--data-dir", str(held), check=False)
    finally:
        lock.release()
    assert proc.returncode == 2 and "is in use by `llmpulse worker`" in proc.stderr
    no_traceback(proc.stderr)


def test_topics_create_shows_the_brokers_partition_count_for_a_topic_that_exists(
    tmp_path: Path, kafka_settings: Any
) -> None:
    """A topic the broker auto-created (6 partitions, say) was listed with the configured count."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from tests.llmpulse.workers import write_config

    async def create_calls_topic() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_servers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(kafka_settings.topics.calls, 6, 1)])
        finally:
            await admin.close()

    asyncio.run(create_calls_topic())
    cfg = write_config(tmp_path / "llmpulse.yaml", kafka_settings)
    out = " ".join(llmpulse("topics", "create", "--config", str(cfg)).stdout.split())
    assert f"│ {kafka_settings.topics.calls} │ 6 │ exists (config says {kafka_settings.partitions} partitions; " \
           "the broker's count stands)" in out  # fmt: skip
