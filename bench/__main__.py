"""``python -m bench``: run the benchmarks, print the table, write JSON."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import Figure, machine


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", default="p2,p3", help="comma-separated figures to run (p2,p3)")
    parser.add_argument("--events", type=int, default=300_000, help="events for P2")
    parser.add_argument("--bootstrap", default=os.environ.get("LLMPULSE_KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parser.add_argument("--out", type=Path, default=Path("bench/results") / f"bench-{stamp}.json")
    args = parser.parse_args()
    only = {x.strip().lower() for x in args.only.split(",")}
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="llmpulse-bench-") as tmp:
        if "p2" in only:
            from bench import p2_kafka

            figures += p2_kafka.run(args.bootstrap, args.events, Path(tmp))
        if "p3" in only:
            from bench import p3_alerts

            figures.append(p3_alerts.overhead(Path(tmp) / "p3"))
            figures.append(p3_alerts.overhead(Path(tmp) / "p3", windows=("1m",)))
            figures.append(p3_alerts.latency(Path(tmp) / "p3"))
    table = Table(title="llmpulse bench", header_style="bold cyan")
    for col in ("figure", "value", "baseline", "ratio", "CPU µs/event", "notes"):
        table.add_column(col, justify="right" if col in {"value", "ratio", "CPU µs/event"} else "left")
    for f in figures:
        base = f"{f.baseline}: {f.baseline_value:,.0f}" if f.baseline and f.baseline_value is not None else "—"
        value = f"{f.value:,.1f} {f.unit}" if abs(f.value) < 100 else f"{f.value:,.0f} {f.unit}"
        table.add_row(
            f.name, value, base, f"{f.ratio:.2f}×" if f.ratio else "—",
            f"{f.cpu_us_per_event:.1f}" if f.cpu_us_per_event else "—", f.notes,
        )  # fmt: skip
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "figures": [f.as_dict() for f in figures]}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
