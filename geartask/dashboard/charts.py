"""Time charts as inline SVG, drawn on the server: labelled axes, a scale, no script, no library.

Used for the Overview's throughput chart (outcomes per minute, from the outcome store) and its
queue-depth charts (from the fleet monitor's history). Every text that comes from a peer (a
function name) is escaped here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from markupsafe import Markup, escape


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]  # (Unix time, value), oldest first
    css: str  # class of the line: its colour comes from the stylesheet


def nice_top(value: float, min_step: float = 1.0) -> tuple[float, float]:
    """(top of the y scale, tick step) for values up to ``value``: 1, 2 or 5 times a power of
    ten per step, at most five steps, so tick labels are round numbers; never a step under
    ``min_step`` (jobs are counted whole: no 0.2 on the scale of a queue of one)."""
    if value <= 0 or not math.isfinite(value):
        return min_step, min_step
    for k in range(-3, 16):
        for m in (1, 2, 5):
            step = m * 10.0 ** k
            if step >= min_step and step * 5 >= value:
                return step * max(1, math.ceil(value / step)), step
    return value, value  # beyond any queue: one step


def _number(v: float) -> str:
    return f"{v:,.0f}" if v == int(v) else f"{v:g}"


def time_chart(series: list[Series], start: float, end: float, *, y_label: str, x_label: str = "time (UTC)",
               width: int = 720, height: int = 220, relative: bool = False, css: str = "tchart",
               title: str = "") -> Markup:
    """Lines of ``series`` between ``start`` and ``end`` (Unix times) on axes with ticks:
    clock times (HH:MM UTC) on x every 10 minutes, or minutes before now when ``relative``;
    ``y_label`` on y from 0 to a round top."""
    left, right, top, bottom = 52, 22, 10, 40  # room for the tick labels at both ends
    pw, ph = width - left - right, height - top - bottom
    span = max(end - start, 1.0)
    peak = max((v for s in series for _, v in s.points), default=0)
    y_top, y_step = nice_top(peak)

    def x_of(t: float) -> float:
        return left + pw * min(max((t - start) / span, 0.0), 1.0)

    def y_of(v: float) -> float:
        return top + ph * (1 - min(max(v / y_top, 0.0), 1.0))

    parts = [f'<svg class="{css}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title or y_label)}">']
    if title:
        parts.append(f"<title>{escape(title)}</title>")
    # y: grid lines and labels
    n = int(round(y_top / y_step))
    for i in range(n + 1):
        v = y_step * i
        y = y_of(v)
        parts.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_number(v)}</text>')
    # x: ticks on whole 10 minutes (clock) or every 15 minutes back from the end (relative)
    if relative:
        ticks = [(end - m * 60, f"-{m}m" if m else "now") for m in range(0, int(span // 60) + 1, 15)]
    else:
        first = math.ceil(start / 600) * 600
        ticks = [(t, time.strftime("%H:%M", time.gmtime(t))) for t in range(int(first), int(end) + 1, 600)]
    for t, text in ticks:
        x = x_of(t)
        parts.append(f'<line class="tickmark" x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}"/>')
        parts.append(f'<text class="tick" x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{text}</text>')
    parts.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}"/>')
    parts.append(f'<line class="axis" x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}"/>')
    parts.append(f'<text class="axis-label x-label" x="{left + pw / 2:.1f}" y="{height - 4}" '
                 f'text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text class="axis-label y-label" x="12" y="{top + ph / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + ph / 2:.1f})">{escape(y_label)}</text>')
    for s in series:
        xy = " ".join(f"{x_of(t):.1f},{y_of(v):.1f}" for t, v in s.points)
        if len(s.points) > 1:
            parts.append(f'<polyline class="line {s.css}" fill="none" points="{xy}"><title>{escape(s.label)}'
                         f'</title></polyline>')
        elif s.points:
            (t, v), = s.points
            parts.append(f'<circle class="line {s.css}" cx="{x_of(t):.1f}" cy="{y_of(v):.1f}" r="2"/>')
    parts.append("</svg>")
    return Markup("".join(parts))
