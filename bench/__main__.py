"""``python -m bench``: run the benchmarks, print the table, write JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import Figure, machine


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", default="p1,p2,p3,p3s,p3w", help="figures to run (p1,p2,p3,p3s,p3w,p4,p5,p5w)")
    parser.add_argument("--p4-sizes", default="1,10", help="P4: millions of calls to report over")
    parser.add_argument("--events", type=int, default=300_000, help="events for P2")
    parser.add_argument("--p1-events", type=int, default=200_000, help="events for P1")
    parser.add_argument("--bootstrap", default=os.environ.get("LLMPULSE_KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parser.add_argument("--out", type=Path, default=Path("bench/results") / f"bench-{stamp}.json")
    parser.add_argument("--p3-events", type=int, default=600_000, help="events for P3's overhead runs")
    parser.add_argument("--p3-repeat", type=int, default=3, help="P3: fresh processes per variant (medians)")
    parser.add_argument("--p3w-events", type=int, default=2_400_000, help="P3w: events (at 20k/s of event time)")
    parser.add_argument("--p3s-events", type=int, default=2_400_000, help="P3s: events whose partials stage 2 replays")
    parser.add_argument("--p3w-repeat", type=int, default=2, help="P3w: worker runs per variant (medians)")
    parser.add_argument("--p5-events", type=int, default=None, help="events for P5 [3M; env LLMPULSE_P5_EVENTS]")
    parser.add_argument("--ci", action="store_true",
                        help="CI sizes: every figure (P1-P5) on small inputs, so CI proves the harness runs; "
                             "the figures are printed, not asserted")  # fmt: skip
    parser.add_argument("--full", action="store_true",
                        help="every figure at the issue's sizes in one command (about an hour and a half): P1-P3w, "
                             "P4 over 1M and 10M calls, P5 and P5w over 10M events, py-spy profiles")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="also write py-spy profiles of P1 and P2")
    args = parser.parse_args()
    if args.full:
        args.only, args.p4_sizes, args.p5_events, args.profile = "p1,p2,p3,p3s,p3w,p4,p5,p5w", "1,10", 10_000_000, True
    if args.ci:
        args.only, args.p1_events, args.events, args.p3_events = "p1,p2,p3,p3s,p3w,p4,p5,p5w", 50_000, 30_000, 100_000
        args.p4_sizes, args.p5_events, args.p3_repeat = "0.2", 200_000, 1
        args.p3w_events, args.p3w_repeat, args.p3s_events = 120_000, 1, 120_000
    only = {x.strip().lower() for x in args.only.split(",")}
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="llmpulse-bench-") as tmp:
        if "p1" in only:
            from bench import p1_embedded

            figures += p1_embedded.run(args.p1_events, Path(tmp))
        if "p2" in only:
            from bench import p2_kafka

            figures += p2_kafka.run(args.bootstrap, args.events, Path(tmp))
        if "p3" in only:
            from bench import p3_alerts

            figures.append(p3_alerts.overhead(Path(tmp) / "p3", n=args.p3_events, repeat=args.p3_repeat))
            figures.append(p3_alerts.overhead(Path(tmp) / "p3-1m", n=args.p3_events, windows=("1m",),
                                              repeat=args.p3_repeat))  # fmt: skip
            figures.append(p3_alerts.latency(Path(tmp) / "p3"))
            for batch_s in (None, 0.2):  # the default batch interval, and a shorter one: latency's lever
                figures.append(p3_alerts.worker_latency(args.bootstrap, Path(tmp) / f"p3-latency-{batch_s}",
                                                        batch_max_seconds=batch_s))  # fmt: skip
        if "p3s" in only:
            from bench import p3_alerts

            figures += p3_alerts.stage2_replay(Path(tmp) / "p3s", n=args.p3s_events, repeat=1 if args.ci else 3)
        if "p3w" in only:
            from bench import p3_alerts

            figures += p3_alerts.worker_overhead(args.bootstrap, Path(tmp) / "p3w", n=args.p3w_events,
                                                 repeat=args.p3w_repeat)  # fmt: skip
        if "p4" in only:
            from bench import p4_report

            sizes = tuple(int(float(x) * 1_000_000) for x in args.p4_sizes.split(","))
            figures += p4_report.run(Path(tmp), sizes)
        if "p5" in only:
            from bench import p5_memory

            figures += p5_memory.run(Path(tmp), args.p5_events)
        if "p5w" in only:
            from bench import p5_worker

            figures += p5_worker.run(Path(tmp) / "p5w", args.p5_events, args.bootstrap)
    if args.profile or args.ci:
        profile(args, Path(tmp))
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
    # not a terminal (CI logs, a file): wide enough that the notes column stays readable
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "figures": [f.as_dict() for f in figures]}, indent=2))
    print(f"wrote {args.out}")


def profile(args: argparse.Namespace, tmp: Path) -> None:
    """py-spy profiles beside the JSON (``bench.profile``); CI profiles a small P1 to prove the tool runs."""
    from bench import profile as prof

    console = Console(width=None if sys.stdout.isatty() else 160)
    stem = args.out.with_suffix("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        prof.profile_p1(args.p1_events, stem.with_name(stem.name + "-profile-p1"), 200, console)
        if not args.ci:
            prof.profile_p2(args.bootstrap, args.events, stem.with_name(stem.name + "-profile-p2"), 200, console)
    except (RuntimeError, OSError) as exc:  # e.g. ptrace not permitted in a locked-down container
        console.print(f"[yellow]profile skipped:[/] {exc}")


if __name__ == "__main__":
    main()
