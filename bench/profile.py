"""Profiles of the hot path with py-spy: where P1's and P2's CPU goes, as tables and a flame graph.

``python -m bench.profile p1`` samples the P1 child process (pinned, the embedded runtime into
chDB) from its start; ``python -m bench.profile p2`` attaches to ``llmpulse worker`` once it has
its partitions and samples until it has drained the topic. py-spy reads the interpreter's stacks
from outside (``--nonblocking``: the process is never paused), so the profiled code is the
shipped code, with no tracing hooks changing its timing as cProfile's do.

Only Python threads are sampled. ClickHouse's own threads (chDB's merge and insert pools) are
not, so the report sets the sampled seconds against the process's CPU time: the difference is
native work no Python frame was on.

Each run writes ``<out>.folded`` (collapsed stacks: flamegraph.pl, speedscope and inferno read
them) and ``<out>.svg`` (a self-contained flame graph: opens offline in a browser; hover for
figures), and prints two tables: the own-code functions that hold the most samples (inclusive
of the libraries they call: an insert's row counts chDB's time spent in that thread), and
samples by the package the innermost frame belongs to (self time).
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

OWN = ("processors/", "sinks/", "llmpulse/", "ingest/", "schemas/")
"""Source paths (as py-spy prints them, relative to the working directory) that are llmpulse's code."""

FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: `pip install -e '.[test]'` (deploy/test.sh installs it)")
    return found


def record_command(out: Path, rate: int, pid: int | None = None) -> list[str]:
    """py-spy's command line; ``pid`` attaches, else the target command follows ``--``."""
    cmd = [py_spy(), "record", "--format", "raw", "--rate", str(rate), "--threads", "--nonblocking", "-o", str(out)]
    return [*cmd, "--pid", str(pid)] if pid is not None else [*cmd, "--"]


def stop_recording(recorder: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """py-spy writes its output on SIGINT, as on Ctrl-C."""
    if recorder.poll() is None:
        recorder.send_signal(signal.SIGINT)
    try:
        recorder.wait(timeout)
    except subprocess.TimeoutExpired:
        recorder.kill()
        raise RuntimeError("py-spy did not write its profile within a minute of being stopped") from None


@dataclass
class Profile:
    """Collapsed stacks, each a list of frames from the thread's root to the innermost call."""

    stacks: Counter[tuple[str, ...]] = field(default_factory=Counter)
    rate: int = 100

    @classmethod
    def read(cls, path: Path, rate: int, keep: Iterable[str] = (), drop: Iterable[str] = ()) -> Profile:
        """``keep``: a main-thread sample counts only under one of these frames (the measured part);
        other threads always count. ``drop``: samples under one of these frames never count."""
        keep, drop = tuple(keep), tuple(drop)
        prof = cls(rate=rate)
        for line in path.read_text(errors="replace").splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack or not n.isdigit():
                continue
            frames = tuple(stack.split(";"))
            if any(f.startswith(d) for f in frames for d in drop):
                continue
            main = not any(f.startswith("Thread._bootstrap (") for f in frames)  # py-spy may not name it
            if main and keep and not any(f.startswith(k) for f in frames for k in keep):
                continue
            prof.stacks[frames] += int(n)
        return prof

    @property
    def samples(self) -> int:
        return sum(self.stacks.values())

    @property
    def seconds(self) -> float:
        return self.samples / self.rate

    def own_inclusive(self) -> Counter[str]:
        """Each sample goes to the innermost llmpulse frame on its stack, library time included."""
        out: Counter[str] = Counter()
        for frames, n in self.stacks.items():
            owner = next((f for f in reversed(frames) if _file(f).startswith(OWN)), None)
            out[_label(owner) if owner else "(no llmpulse frame: event loop, libraries, start-up)"] += n
        return out

    def by_package(self) -> Counter[str]:
        """Self time by the top-level package (or llmpulse module) of the innermost frame."""
        out: Counter[str] = Counter()
        for frames, n in self.stacks.items():
            out[_package(_file(frames[-1]))] += n
        return out

    def write_folded(self, path: Path) -> None:
        path.write_text("".join(f"{';'.join(frames)} {n}\n" for frames, n in self.stacks.most_common()))


def _file(frame: str) -> str:
    m = FRAME.match(frame)
    return m["file"] if m else ""


def _label(frame: str) -> str:
    m = FRAME.match(frame)
    return f"{m['func']} ({m['file']})" if m else frame


def _package(file: str) -> str:
    if file.startswith(OWN):
        return file.removesuffix(".py")
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0]
    if file.startswith("<frozen") or "/" not in file or file.startswith(("python3", "/")):
        return "python runtime and stdlib"
    return file.split("/", 1)[0]


@dataclass
class _Node:
    n: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


def flame_svg(prof: Profile, title: str, width: int = 1600) -> str:
    """An icicle graph (roots on top) as one self-contained SVG: no script, a title per frame for hover."""
    root = _Node()
    for frames, n in prof.stacks.items():
        root.n += n
        cur = root
        for f in frames:
            cur = cur.children.setdefault(f, _Node())
            cur.n += n
    total, row_h, top = max(1, prof.samples), 17, 24
    rects: list[str] = []
    depth_max = 0

    def draw(node: _Node, x: float, depth: int) -> None:
        nonlocal depth_max
        for name, child in sorted(node.children.items(), key=lambda kv: -kv[1].n):
            w = child.n / total * width
            if w >= 0.5:
                depth_max = max(depth_max, depth)
                own = _file(name).startswith(OWN)
                fill = "hsl(210,70%,65%)" if own else f"hsl({20 + sum(map(ord, _package(_file(name)))) % 40},75%,60%)"
                y = top + depth * row_h
                label = _label(name)
                text = html.escape(label[: int(w / 7)]) if w > 30 else ""
                rects.append(
                    f"<g><title>{html.escape(label)}: {child.n / total:.1%}, {child.n / prof.rate:.2f} s</title>"
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 1}" fill="{fill}"/>'
                    f'<text x="{x + 3:.1f}" y="{y + row_h - 5}">{text}</text></g>'
                )
                draw(child, x, depth + 1)
            x += w

    draw(root, 0.0, 0)
    height = top + (depth_max + 1) * row_h + 4
    head = html.escape(f"{title}: {prof.samples:,} samples at {prof.rate}/s (blue: llmpulse code; hover for shares)")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" '
        f'font-size="11"><rect width="100%" height="100%" fill="#fff"/>'
        f'<text x="4" y="16" font-size="14">{head}</text>\n' + "\n".join(rects) + "\n</svg>\n"
    )


def report(prof: Profile, title: str, cpu_s: float | None, out: Path, console: Console, top: int = 15) -> None:
    """Print the tables and write the folded stacks and the flame graph beside ``out``."""
    folded, svg = out.with_suffix(".folded"), out.with_suffix(".svg")
    prof.write_folded(folded)
    svg.write_text(flame_svg(prof, title))
    total = max(1, prof.samples)
    native = ""
    if cpu_s and cpu_s > prof.seconds:
        native = (f"; process CPU {cpu_s:.1f} s, so at least {cpu_s - prof.seconds:.1f} s ran on threads py-spy "
                  "does not sample (chDB's own)")  # fmt: skip
    elif cpu_s:
        native = (f"; process CPU {cpu_s:.1f} s: py-spy counts every runnable thread, and threads sharing the "
                  "pinned core wait their turn, so read the shares, not the seconds")  # fmt: skip
    console.print(f"[bold]{title}[/]: {prof.samples:,} samples = {prof.seconds:.1f} s of Python-thread time{native}")
    for heading, counts in (("innermost llmpulse frame (inclusive of libraries it calls)", prof.own_inclusive()),
                            ("package of the innermost frame (self time)", prof.by_package())):  # fmt: skip
        table = Table(title=heading, title_justify="left")
        table.add_column("share", justify="right")
        table.add_column("seconds", justify="right")
        table.add_column("where")
        for name, n in counts.most_common(top):
            table.add_row(f"{n / total:.1%}", f"{n / prof.rate:.2f}", name)
        console.print(table)
    console.print(f"flame graph: {svg}\ncollapsed stacks: {folded}")


def profile_p1(events: int, out: Path, rate: int, console: Console) -> Profile:
    """P1's child run under py-spy; the embedded run's samples only (not the baselines' or set-up)."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llmpulse-profile-") as tmp:
        result = Path(tmp) / "p1.json"
        cmd = [*record_command(out.with_suffix(".raw"), rate), sys.executable, "-m", "bench.p1_embedded",
               "--events", str(events), "--core", "0", "--data-dir", str(Path(tmp) / "data"),
               "--json-out", str(result)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not result.exists():
            raise RuntimeError(f"profiling P1 failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        cpu = json.loads(result.read_text())["embedded"]["cpu_s"]
    prof = Profile.read(out.with_suffix(".raw"), rate, keep=("EmbeddedRuntime.",), drop=("open_clickhouse (",))
    out.with_suffix(".raw").unlink()
    report(prof, f"P1 embedded runtime → chDB, {events:,} events", cpu, out, console)
    return prof


def profile_p2(bootstrap: str, events: int, out: Path, rate: int, console: Console) -> Profile:
    """``llmpulse worker`` draining a fresh topic, sampled from assignment until drained."""
    import tempfile

    from bench import p2_kafka

    with tempfile.TemporaryDirectory(prefix="llmpulse-profile-") as tmp:
        run = p2_kafka.worker_run(bootstrap, events, Path(tmp), profile=(out.with_suffix(".raw"), rate))
    prof = Profile.read(out.with_suffix(".raw"), rate)
    out.with_suffix(".raw").unlink()
    report(prof, f"P2 llmpulse worker, {events:,} events from Kafka", run["cpu_s"], out, console)
    return prof


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("target", choices=("p1", "p2"))
    parser.add_argument("--events", type=int, default=None, help="events (P1 200k, P2 300k)")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--bootstrap", default="127.0.0.1:19092")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parser.add_argument("--out", type=Path, default=None, help="path stem (default bench/results/profile-…)")
    args = parser.parse_args()
    out = args.out or Path("bench/results") / f"profile-{args.target}-{stamp}"
    out.parent.mkdir(parents=True, exist_ok=True)
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    if args.target == "p1":
        profile_p1(args.events or 200_000, out, args.rate, console)
    else:
        profile_p2(args.bootstrap, args.events or 300_000, out, args.rate, console)


if __name__ == "__main__":
    main()
