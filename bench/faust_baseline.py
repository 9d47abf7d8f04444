"""The idiomatic per-event faust agent a user would write for the same job (the P2 baseline).

One event at a time through ``async for``: pydantic validation, pricing with the same table,
a per-(minute, feature) running count, and rows buffered into a ClickHouse insert every 5,000
events. Run as: ``BENCH_CONFIG=... BENCH_DATA_DIR=... python -m bench.faust_baseline worker``.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import faust

from llmpulse.runtime import open_clickhouse
from processors.pricing import CostAttribution
from schemas.config import load_settings
from schemas.events import CallEvent
from schemas.prices import builtin_price_table

COLUMNS = [
    "event_id", "ts", "feature", "team", "model", "provider", "input_tokens", "output_tokens",
    "cached_input_tokens", "cache_write_tokens", "latency_ms", "ttft_ms", "status", "refusal", "cost_usd",
    "source",
]  # fmt: skip


def main() -> None:
    settings = load_settings(os.environ["BENCH_CONFIG"], {"data_dir": Path(os.environ["BENCH_DATA_DIR"])})
    k = settings.kafka
    app = faust.App(
        k.consumer_group,  # the app id is the consumer group the harness watches
        broker=f"kafka://{k.bootstrap_servers}",
        value_serializer="raw",
        web_enabled=False,
        topic_disable_leader=True,
        datadir=str(settings.data_dir / "faust"),
        broker_commit_interval=0.5,
        stream_buffer_maxsize=20_000,
        broker_max_poll_records=20_000,
    )
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    conn = open_clickhouse(settings, purpose="faust baseline")
    pricing = CostAttribution(builtin_price_table())
    counts: dict[tuple[int, str], int] = defaultdict(int)
    topic = app.topic(k.topics.calls, value_type=bytes)
    rows: list[list[Any]] = []

    def flush() -> None:
        if rows:
            conn.client.insert("llm_calls", rows, column_names=COLUMNS)
            rows.clear()

    @app.agent(topic)
    async def process(stream: Any) -> None:
        async for value in stream:
            try:
                event = CallEvent.model_validate_json(value)
            except Exception:
                continue
            rates = pricing.rates(event.model)
            cost = event.cost_usd
            if cost is None and rates is not None:
                cost = rates.cost(
                    event.input_tokens, event.output_tokens, event.cached_input_tokens, event.cache_write_tokens
                )
            counts[(int(event.ts.timestamp()) // 60, event.feature)] += 1
            rows.append([
                event.event_id, event.ts, event.feature, event.team or "", event.model, event.provider or "",
                event.input_tokens, event.output_tokens, event.cached_input_tokens, event.cache_write_tokens,
                event.latency_ms, event.ttft_ms, event.status, event.refusal, cost, "kafka",
            ])  # fmt: skip
            if len(rows) >= 5000:
                flush()

    @app.timer(0.5)
    async def flush_idle() -> None:
        flush()

    @app.task
    async def ready() -> None:
        print(f"baseline ready {time.time()}", flush=True)

    app.main()


if __name__ == "__main__":
    main()
