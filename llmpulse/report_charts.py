"""Inline SVG charts for the weekly report, drawn in Python.

The report must open offline from a file (a chat attachment, a wiki upload), so there is no
charting library and no script: each chart is a small SVG string with ``<title>`` tooltips.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from html import escape

PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip
"""Tableau 10: distinguishable, and readable by most colour-blind viewers."""

Fmt = Callable[[float], str]


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _nice_max(v: float) -> float:
    """The axis top: 1, 2, 2.5 or 5 times a power of ten, just above ``v``."""
    if v <= 0 or not math.isfinite(v):
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp


def _day_ticks(x: Callable[[float], float], t0: float, t1: float, y1: float, y2: float, label_y: float) -> list[str]:
    """A grid line and a weekday label at every UTC midnight between t0 and t1."""
    out = []
    day = 86400.0
    tick = math.ceil(t0 / day) * day
    while tick < t1:
        label = datetime.fromtimestamp(tick, UTC).strftime("%a %d")
        out.append(f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{y1}" y2="{y2}" class="grid"/>')
        out.append(f'<text x="{x(tick) + 3:.1f}" y="{label_y}" class="xtick">{label}</text>')
        tick += day
    return out


def legend(names: Sequence[str]) -> str:
    items = "".join(
        f'<span class="key"><i style="background:{color(i)}"></i>{escape(n)}</span>' for i, n in enumerate(names)
    )
    return f'<div class="legend">{items}</div>'


def line_chart(
    series: dict[str, list[tuple[float, float | None]]],
    t0: float,
    t1: float,
    *,
    y_fmt: Fmt = lambda v: f"{v:,.0f}",
    thresholds: Sequence[tuple[str, float]] = (),
    width: int = 900,
    height: int = 240,
    title: str = "",
) -> str:
    """Lines over time (x: epoch seconds in [t0, t1)); ``None`` breaks a line; dashed thresholds."""
    left, right, top, bottom = 64, 12, 10, 26
    w, h = width - left - right, height - top - bottom
    values = [v for pts in series.values() for _, v in pts if v is not None and math.isfinite(v)]
    ymax = _nice_max(max(values + [t for _, t in thresholds], default=1.0) * 1.05)
    span = max(t1 - t0, 1.0)

    def x(t: float) -> float:
        return left + (t - t0) / span * w

    def y(v: float) -> float:
        return top + h - v / ymax * h

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">']
    for i in range(5):
        v = ymax * i / 4
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" class="ytick">{escape(y_fmt(v))}</text>')
    parts += _day_ticks(x, t0, t1, top, top + h, height - 8)
    for label, value in thresholds:
        parts.append(
            f'<line x1="{left}" x2="{left + w}" y1="{y(value):.1f}" y2="{y(value):.1f}" class="threshold">'
            f"<title>{escape(label)}: {escape(y_fmt(value))}</title></line>"
        )
    for i, (name, pts) in enumerate(series.items()):
        runs: list[list[str]] = [[]]
        for t, v in pts:
            if v is None or not math.isfinite(v):
                runs.append([])
                continue
            runs[-1].append(f"{x(t):.1f},{y(min(v, ymax)):.1f}")
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{color(i)}"/>')
            elif run:
                parts.append(
                    f'<polyline points="{" ".join(run)}" fill="none" stroke="{color(i)}" stroke-width="1.6">'
                    f"<title>{escape(name)}</title></polyline>"
                )
    parts.append("</svg>")
    return "".join(parts) + legend(list(series))


def grouped_bars(
    rows: Sequence[tuple[str, float | None, float | None]],
    *,
    value_fmt: Fmt = lambda v: f"${v:,.2f}",
    labels: tuple[str, str] = ("this week", "previous week"),
    width: int = 900,
) -> str:
    """Horizontal bars, one pair per row: (label, this period, previous period). None is a value
    nobody knows (spend of calls none of which had a price): no bar, and — for its label."""
    if not rows:
        return ""
    left, right, bar, gap = 170, 90, 11, 10
    height = len(rows) * (2 * bar + gap) + 8
    w = width - left - right
    top = _nice_max(max((x for _, v, p in rows for x in (v, p) if x is not None), default=0.0))
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(labels[0])}">']
    for i, (label, value, prev) in enumerate(rows):
        y0 = 4 + i * (2 * bar + gap)
        parts.append(f'<text x="{left - 8}" y="{y0 + bar + 4}" class="ylabel">{escape(label)}</text>')
        for j, (v, cls) in enumerate(((value, 0), (prev, 9))):
            bw = 0.0 if v is None else max(v / top * w, 0.5 if v else 0)
            shown = "—" if v is None else value_fmt(v)
            yy = y0 + j * bar
            parts.append(
                f'<rect x="{left}" y="{yy}" width="{bw:.1f}" height="{bar - 1}" fill="{color(cls)}">'
                f"<title>{escape(label)}, {labels[j]}: {escape(shown)}</title></rect>"
            )
            parts.append(f'<text x="{left + bw + 4:.1f}" y="{yy + bar - 2}" class="val">{escape(shown)}</text>')
    parts.append("</svg>")
    keys = "".join(
        f'<span class="key"><i style="background:{color(c)}"></i>{escape(t)}</span>'
        for c, t in ((0, labels[0]), (9, labels[1]))
    )
    return "".join(parts) + f'<div class="legend">{keys}</div>'


def stacked_columns(
    columns: Sequence[str],
    series: dict[str, list[float]],
    *,
    value_fmt: Fmt = lambda v: f"${v:,.2f}",
    width: int = 900,
    height: int = 220,
) -> str:
    """One column per label (a day), stacked by series (features)."""
    if not columns:
        return ""
    left, right, top, bottom = 64, 12, 10, 24
    w, h = width - left - right, height - top - bottom
    totals = [sum(s[i] for s in series.values()) for i in range(len(columns))]
    ymax = _nice_max(max(totals, default=1.0))
    slot = w / len(columns)
    bw = slot * 0.7
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="stacked columns">']
    for i in range(5):
        v = ymax * i / 4
        yy = top + h - v / ymax * h
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{yy:.1f}" y2="{yy:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" class="ytick">{escape(value_fmt(v))}</text>')
    for c, label in enumerate(columns):
        x0 = left + c * slot + (slot - bw) / 2
        base = 0.0
        for k, (name, values) in enumerate(series.items()):
            v = values[c]
            if v <= 0:
                continue
            y1 = top + h - (base + v) / ymax * h
            hh = v / ymax * h
            parts.append(
                f'<rect x="{x0:.1f}" y="{y1:.1f}" width="{bw:.1f}" height="{hh:.1f}" fill="{color(k)}">'
                f"<title>{escape(label)} {escape(name)}: {escape(value_fmt(v))}</title></rect>"
            )
            base += v
        parts.append(f'<text x="{x0 + bw / 2:.1f}" y="{height - 7}" class="xtick mid">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts) + legend(list(series))


def timeline(
    lanes: Sequence[str],
    items: Sequence[tuple[int, float, float, str]],
    t0: float,
    t1: float,
    *,
    width: int = 900,
) -> str:
    """Incidents as bars on lanes: (lane index, start, end, tooltip)."""
    if not lanes:
        return ""
    left, right, lane_h, top = 170, 12, 18, 4
    height = top + len(lanes) * lane_h + 22
    w = width - left - right
    span = max(t1 - t0, 1.0)

    def x(t: float) -> float:
        return left + (min(max(t, t0), t1) - t0) / span * w

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="alert timeline">']
    for i, lane in enumerate(lanes):
        yy = top + i * lane_h
        parts.append(f'<text x="{left - 8}" y="{yy + 13}" class="ylabel">{escape(lane)}</text>')
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{yy + lane_h / 2}" y2="{yy + lane_h / 2}" class="grid"/>')
    parts += _day_ticks(x, t0, t1, top, height - 20, height - 6)
    for lane, start, end, tip in items:
        yy = top + lane * lane_h + 3
        bw = max(x(end) - x(start), 2.0)
        parts.append(
            f'<rect x="{x(start):.1f}" y="{yy}" width="{bw:.1f}" height="{lane_h - 6}" fill="{color(lane)}" rx="2">'
            f"<title>{escape(tip)}</title></rect>"
        )
    parts.append("</svg>")
    return "".join(parts)
