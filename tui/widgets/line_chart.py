"""A small line chart in Braille dots: loss (train and eval) and learning rate.

Textual's Sparkline has no axes and one series; a run's loss needs the step
range, the value range and a second, sparse series (eval). Lines are drawn in
Braille (2x4 dots per cell); sparse series are drawn as marker characters so
they stay distinguishable without colour (NO_COLOR).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from rich.text import Text
from textual.app import RenderResult
from textual.widget import Widget

from ftsup.tui.format import number

_DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [row][col]


@dataclass(frozen=True)
class ChartSeries:
    label: str
    points: Sequence[tuple[float, float]]
    style: str = ""
    marker: str | None = None  # draw each point as this character instead of a line


def _finite(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]


def _line(x0: int, y0: int, x1: int, y1: int) -> Iterable[tuple[int, int]]:
    """Bresenham: the dots from (x0, y0) to (x1, y1)."""
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        yield x0, y0
        if x0 == x1 and y0 == y1:
            return
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


def render_chart(
    series: Sequence[ChartSeries],
    width: int,
    height: int,
    title: str = "",
    empty: str = "no data yet",
) -> Text:
    """The chart as `height` lines of `width` cells."""
    lines: list[Text] = []
    head = Text(title, style="bold")
    for item in series:
        if item.points:
            glyph = item.marker or "─"
            head.append(f"  {glyph} ", style=item.style)
            head.append(f"{item.label} {number(item.points[-1][1])}")
    lines.append(head)
    data = [_finite(s.points) for s in series]
    every = [p for points in data for p in points]
    rows = height - 2
    if not every or rows < 1 or width < 12:
        if height > 1:
            lines.append(Text(empty, style="dim"))
        return _join(lines, height)
    xs, ys = [p[0] for p in every], [p[1] for p in every]
    x_min, x_max, y_min, y_max = min(xs), max(xs), min(ys), max(ys)
    if y_max == y_min:
        pad = abs(y_max) * 0.05 or 1.0
        y_min, y_max = y_min - pad, y_max + pad
    if x_max == x_min:
        x_max = x_min + 1
    labels = [number(y_max), number((y_max + y_min) / 2), number(y_min)]
    label_width = max(len(label) for label in labels)
    cols = max(1, width - label_width - 1)
    dots_w, dots_h = cols * 2, rows * 4
    bits = [[0] * cols for _ in range(rows)]
    owner: list[list[int]] = [[-1] * cols for _ in range(rows)]
    marks: dict[tuple[int, int], int] = {}

    def to_dot(x: float, y: float) -> tuple[int, int]:
        px = round((x - x_min) / (x_max - x_min) * (dots_w - 1))
        py = round((y_max - y) / (y_max - y_min) * (dots_h - 1))
        return px, py

    for index, (item, points) in enumerate(zip(series, data, strict=True)):
        if item.marker:
            for x, y in points:
                px, py = to_dot(x, y)
                marks[(py // 4, px // 2)] = index
            continue
        dots = [to_dot(x, y) for x, y in points]
        segments = pairwise(dots) if len(dots) > 1 else [(dots[0], dots[0])]
        for (x0, y0), (x1, y1) in segments:
            for px, py in _line(x0, y0, x1, y1):
                row, col = py // 4, px // 2
                bits[row][col] |= _DOT_BITS[py % 4][px % 2]
                owner[row][col] = index
    mid = rows // 2 if rows >= 5 else -1
    for row in range(rows):
        label = (
            labels[0]
            if row == 0
            else labels[2]
            if row == rows - 1
            else (labels[1] if row == mid else "")
        )
        line = Text(label.rjust(label_width), style="dim")
        line.append("┤" if label else "│", style="dim")
        # Runs of cells with one style become one span (a chart is redrawn often).
        run: list[str] = []
        run_style = ""
        for col in range(cols):
            if (row, col) in marks:
                item = series[marks[(row, col)]]
                char, style = item.marker or "•", item.style
            elif bits[row][col]:
                char, style = chr(0x2800 + bits[row][col]), series[owner[row][col]].style
            else:
                char, style = " ", ""
            if style != run_style and run:
                line.append("".join(run), style=run_style)
                run = []
            run_style = style
            run.append(char)
        if run:
            line.append("".join(run), style=run_style)
        lines.append(line)
    left, right = f"step {x_min:.0f}", f"{x_max:.0f}"
    axis = Text(" " * label_width + "└", style="dim")
    axis.append(left.ljust(max(len(left) + 1, cols - len(right))) + right, style="dim")
    lines.append(axis)
    return _join(lines, height)


def _join(lines: list[Text], height: int) -> Text:
    out = Text()
    for k, line in enumerate(lines[:height]):
        if k:
            out.append("\n")
        out.append_text(line)
    return out


class LineChart(Widget):
    DEFAULT_CSS = """
    LineChart { height: 8; }
    """

    def __init__(
        self,
        title: str,
        *,
        empty: str = "no data yet",
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(id=id, classes=classes)
        self.title = title
        self.empty = empty
        self._series: list[ChartSeries] = []

    def set_series(self, series: list[ChartSeries]) -> None:
        self._series = series
        self.refresh()

    def render(self) -> RenderResult:
        return render_chart(self._series, self.size.width, self.size.height, self.title, self.empty)
