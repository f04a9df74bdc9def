"""``cronguard timeline``: which host ran a job when, one row per host.

Time runs left to right over the window asked for; each run is a bar from
its start to its end, coloured by how it ended, so a glance shows which host
led at any moment, and where two bars overlap in time something went wrong.
A run with no recorded end whose lease is gone (its host crashed or was
killed) is drawn up to where its lease expired: the latest it could have led.

The same chart is drawn for the terminal (``rich``, imported only here) and
as a small SVG document written by hand: it is a text format, and a plotting
library would cost more to install than the chart is worth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO
from xml.sax.saxutils import escape, quoteattr

from .durations import format_duration
from .history import Event, Run, iso, runs_from
from .lease import Holder

# Outcome -> (terminal glyph, colour).  The glyphs differ too, so the chart
# still reads where colour is lost (cron mail, a pipe).
STYLES = {
    "ok": ("█", "#2e7d32"),
    "failed": ("X", "#c62828"),
    "timeout": ("T", "#ef6c00"),
    "lost": ("L", "#6a1b9a"),
    "not-started": ("!", "#795548"),
    "interrupted": ("I", "#9e9e9e"),
    "running": ("▶", "#1565c0"),
    "unknown": ("?", "#757575"),
}


@dataclass(frozen=True)
class Bar:
    host: str
    start: float
    end: float
    run: Run


@dataclass(frozen=True)
class Chart:
    key: str
    start: float
    end: float
    hosts: list[str]
    bars: list[Bar]

    @property
    def span(self) -> float:
        return max(self.end - self.start, 0.001)


def build_chart(
    key: str,
    events: Sequence[Event],
    holder: Holder | None,
    now: float,
    since: float | None = None,
) -> Chart:
    """The chart of ``events`` (oldest first) up to ``now``, server seconds.

    ``since`` starts the window; by default it starts with the first run.
    """
    runs = runs_from(events, holder)
    bars = []
    for run in runs:
        if run.start is None:
            continue
        end = run.end
        if end is None:
            ttl = int(run.extra.get("ttl_ms", "0") or 0) / 1000
            end = now if run.outcome == "running" else min(now, run.start + ttl)
        bars.append(Bar(run.host, run.start, max(end, run.start), run))
    if since is not None:
        start = since
    elif bars:
        start = min(bar.start for bar in bars)
    else:
        start = now - 3600
    bars = [bar for bar in bars if bar.end >= start]
    hosts = sorted({bar.host for bar in bars})
    return Chart(key, start, max(now, start + 1), hosts, bars)


# The terminal


def print_chart(chart: Chart, out: TextIO, width: int | None = None) -> None:
    from rich.console import Console
    from rich.text import Text

    console = Console(file=out, highlight=False, width=width)
    label = max([len(host) for host in chart.hosts] + [4])
    cells = max(20, console.width - label - 3)
    step = chart.span / cells

    console.print(Text(
        f"{chart.key}: {iso(chart.start)} to {iso(chart.end)} "
        f"({format_duration(chart.span)}, one column = {format_duration(step)})"
    ), no_wrap=True, overflow="ignore", crop=False)
    if not chart.bars:
        console.print("no runs in this window")
        return
    for host in chart.hosts:
        row: list[str | None] = [None] * cells
        for bar in chart.bars:
            if bar.host != host:
                continue
            first = max(0, int((bar.start - chart.start) / step))
            last = min(cells - 1, max(first, math.ceil((bar.end - chart.start) / step)
                                      - 1))
            for cell in range(first, last + 1):
                # A failure stays visible when a success shares its column.
                if row[cell] is None or row[cell] == "ok":
                    row[cell] = bar.run.outcome
        line = Text(f"{host:>{label}} │")
        for outcome in row:
            if outcome is None:
                line.append(" ")
            else:
                glyph, colour = STYLES[outcome]
                line.append(glyph, style=colour)
        line.append("│")
        console.print(line, no_wrap=True, overflow="crop")

    left, right = iso(chart.start) or "", iso(chart.end) or ""
    axis = f"{'':>{label}}  {left[11:19]}"
    axis += right[11:19].rjust(label + 2 + cells - len(axis))
    console.print(Text(axis))
    legend = Text(f"{'':>{label}}  ")
    shown = {bar.run.outcome for bar in chart.bars}
    for outcome, (glyph, colour) in STYLES.items():
        if outcome in shown:
            legend.append(glyph, style=colour)
            legend.append(f" {outcome}  ")
    console.print(legend)


# SVG

_ROW, _TOP, _LEFT, _WIDTH = 26, 40, 160, 1000


def svg_text(chart: Chart) -> str:
    """The chart as a standalone SVG document."""
    plot = _WIDTH - _LEFT - 20
    height = _TOP + _ROW * max(1, len(chart.hosts)) + 60

    def x(at: float) -> float:
        return _LEFT + (at - chart.start) / chart.span * plot

    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" '
        f'height="{height}" viewBox="0 0 {_WIDTH} {height}" '
        'font-family="sans-serif" font-size="12">',
        f"<title>{escape(f'cronguard timeline of {chart.key}')}</title>",
        '<rect width="100%" height="100%" fill="#ffffff"/>',
        f'<text x="10" y="20" font-size="14" font-weight="bold">'
        f"{escape(chart.key)}: {iso(chart.start)} to {iso(chart.end)}</text>",
    ]
    # Time ticks: six across the plot, labelled in UTC.
    bottom = _TOP + _ROW * max(1, len(chart.hosts))
    for tick in range(6):
        at = chart.start + chart.span * tick / 5
        left = x(at)
        stamp = (iso(at) or "")[11:19]
        parts.append(f'<line x1="{left:.1f}" y1="{_TOP - 4}" x2="{left:.1f}" '
                     f'y2="{bottom}" stroke="#e0e0e0"/>')
        parts.append(f'<text x="{left:.1f}" y="{bottom + 16}" '
                     f'text-anchor="middle">{stamp}</text>')
    for row, host in enumerate(chart.hosts):
        top = _TOP + row * _ROW
        parts.append(f'<text class="host" x="{_LEFT - 8}" y="{top + 17}" '
                     f'text-anchor="end">{escape(host)}</text>')
        for bar in chart.bars:
            if bar.host != host:
                continue
            left = max(x(bar.start), _LEFT)
            right = min(x(bar.end), _LEFT + plot)
            run = bar.run
            tip = (f"{host} fence {run.fence}: {run.outcome}, started "
                   f"{iso(bar.start)}, {format_duration(bar.end - bar.start)}"
                   + (f", exit {run.status}" if run.status is not None else ""))
            parts.append(
                f'<rect class="run" data-outcome={quoteattr(run.outcome)} '
                f'x="{left:.1f}" y="{top + 4}" width="{max(right - left, 2):.1f}" '
                f'height="{_ROW - 8}" fill="{STYLES[run.outcome][1]}">'
                f"<title>{escape(tip)}</title></rect>"
            )
    # The legend: the outcomes that appear.
    left = _LEFT
    shown = {bar.run.outcome for bar in chart.bars}
    for outcome, (_, colour) in STYLES.items():
        if outcome not in shown:
            continue
        parts.append(f'<rect x="{left}" y="{bottom + 30}" width="12" height="12" '
                     f'fill="{colour}"/>')
        parts.append(f'<text x="{left + 16}" y="{bottom + 40}">{outcome}</text>')
        left += 30 + 8 * len(outcome)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
