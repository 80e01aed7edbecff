"""The end-of-training plot: loss (and the control gap, if measured) against step.

Drawn with PIL alone so that matplotlib is not a dependency. ``records`` are the lines of the
run's ``metrics.jsonl``; non-finite floats arrive there as strings ("nan", "inf").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from .errors import InputError

PANEL_SIZE = (480, 320)  # width, height of one panel; the gap panel sits to the right
MARGINS = (64, 30, 16, 40)  # left, top, right, bottom: room for tick labels, title and x label
FONT_SIZE = 12
TICKS = 5
INSET = 6  # pixels between the frame and the data range
# A smoothing span of 1/20 of the run: steady over long runs, no lag on short ones.
SMOOTHING_FRACTION = 1 / 20
BACKGROUND, INK, GRID, ZERO = (255, 255, 255), (40, 40, 40), (225, 225, 225), (140, 140, 140)
RAW_LOSS, SMOOTH_LOSS, GAP = (170, 200, 235), (31, 119, 180), (214, 96, 20)

Point = tuple[float, float]


def _finite(value) -> float | None:
    """A plottable number, or None for missing, non-numeric and non-finite ("nan", "inf") values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _series(records: Sequence[dict], key: str, scale: float = 1.0) -> tuple[list[Point], int]:
    """(step, value) points in step order, and how many records held a non-finite value."""
    present = [r for r in records if r.get(key) is not None and _finite(r.get("step")) is not None]
    points = [(float(r["step"]), _finite(r[key])) for r in present]
    finite = sorted((step, value * scale) for step, value in points if value is not None)
    return finite, len(points) - len(finite)


def _ema(points: list[Point]) -> list[Point]:
    alpha = 2 / (max(2.0, len(points) * SMOOTHING_FRACTION) + 1)
    smoothed, average = [], points[0][1]
    for step, value in points:
        average += alpha * (value - average)
        smoothed.append((step, average))
    return smoothed


def _span(values: Sequence[float], pad: float) -> tuple[float, float]:
    """Data range; a single value (one point, a flat line) gets ``pad`` either side so the axis has a scale."""
    low, high = min(values), max(values)
    if high - low > 1e-9 * max(abs(low), abs(high)):
        return low, high
    return low - pad, high + pad


def _nice_ticks(low: float, high: float, *, integer: bool = False) -> list[float]:
    """About TICKS values at 1, 2 or 5 times a power of ten inside [low, high]; whole numbers if ``integer``."""
    raw = max((high - low) / TICKS, 1.0) if integer else (high - low) / TICKS
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e-9 else "0"


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Without FreeType, load_default() cannot size its bitmap font and rejects a size.
    return ImageFont.load_default(FONT_SIZE) if features.check("freetype2") else ImageFont.load_default()


@dataclasses.dataclass(frozen=True)
class _Frame:
    """Where a panel's data range lands in pixels."""

    box: tuple[int, int, int, int]  # left, top, right, bottom of the plot frame
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def pixel(self, step: float, value: float) -> Point:
        # Inset so that lines and dots at the extremes do not sit on the frame.
        (left, top, right, bottom), (x_low, x_high), (y_low, y_high) = self.box, self.x_range, self.y_range
        return (
            left + INSET + (step - x_low) / (x_high - x_low) * (right - left - 2 * INSET),
            bottom - INSET - (value - y_low) / (y_high - y_low) * (bottom - top - 2 * INSET),
        )


def _draw_axes(draw: ImageDraw.ImageDraw, frame: _Frame, font) -> None:
    """Frame, horizontal grid with value labels, step ticks below, and a zero line when 0 is in range."""
    (left, top, right, bottom), (x_low, x_high), (y_low, y_high) = frame.box, frame.x_range, frame.y_range
    for tick in _nice_ticks(y_low, y_high):
        y = frame.pixel(x_low, tick)[1]
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((left - 6, y), _label(tick), fill=INK, font=font, anchor="rm")
    for tick in _nice_ticks(x_low, x_high, integer=True):
        x = frame.pixel(tick, y_low)[0]
        draw.line([(x, bottom), (x, bottom + 4)], fill=INK)
        draw.text((x, bottom + 6), _label(tick), fill=INK, font=font, anchor="mt")
    draw.rectangle([(left, top), (right, bottom)], outline=INK)
    if y_low < 0 < y_high:
        draw.line([frame.pixel(x_low, 0), frame.pixel(x_high, 0)], fill=ZERO)


def _draw_panel(points: list[Point], title: str, colour: tuple[int, int, int], *, smooth: bool) -> Image.Image:
    """One chart: raw + EMA lines if ``smooth`` (the loss), else a line with dots (sparse evaluations)."""
    image = Image.new("RGB", PANEL_SIZE, BACKGROUND)
    draw, font = ImageDraw.Draw(image), _font()
    box = (MARGINS[0], MARGINS[1], PANEL_SIZE[0] - MARGINS[2], PANEL_SIZE[1] - MARGINS[3])
    centre = (box[0] + box[2]) / 2
    draw.text((centre, 8), title, fill=INK, font=font, anchor="mt")
    draw.text((centre, PANEL_SIZE[1] - 6), "step", fill=INK, font=font, anchor="mb")
    if not points:
        draw.rectangle(box, outline=INK)
        draw.text((centre, (box[1] + box[3]) / 2), "no finite values", fill=INK, font=font, anchor="mm")
        return image
    # A lone step gets its neighbours; a flat value a tenth of itself (or 0.001 at zero).
    x_range = _span([p[0] for p in points], pad=1.0)
    y_range = _span([p[1] for p in points], pad=max(0.1 * abs(points[0][1]), 1e-3))
    frame = _Frame(box, x_range, y_range)
    _draw_axes(draw, frame, font)
    if smooth:
        _polyline(draw, [frame.pixel(*p) for p in points], RAW_LOSS, width=1, dots=len(points) == 1)
        _polyline(draw, [frame.pixel(*p) for p in _ema(points)], colour, width=2, dots=len(points) == 1)
    else:
        _polyline(draw, [frame.pixel(*p) for p in points], colour, width=2, dots=True)
    return image


def _polyline(draw: ImageDraw.ImageDraw, pixels: list[Point], colour, *, width: int, dots: bool) -> None:
    if len(pixels) > 1:
        draw.line(pixels, fill=colour, width=width, joint="curve")
    if dots:  # a single point has no line to show it
        for x, y in pixels:
            draw.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill=colour)


def _title(name: str, last: str | None, skipped: int) -> str:
    return name + (f": last {last}" if last else "") + (f" ({skipped} non-finite skipped)" if skipped else "")


def plot_training_curves(records: list[dict], path: str | Path) -> Path:
    """Write a PNG of the loss (raw and EMA-smoothed) vs step, plus the control gap in % if measured.

    Records without a loss are skipped for the loss panel (which then says so if none remain).
    Raises InputError (a ValueError) for an empty list: there is no run to describe.
    """
    if not records:
        raise InputError("no metrics records to plot: metrics.jsonl is empty or missing")
    loss, loss_skipped = _series(records, "loss")
    last_loss = f"{_label(_ema(loss)[-1][1])} (EMA)" if loss else None
    panels = [_draw_panel(loss, _title("loss", last_loss, loss_skipped), SMOOTH_LOSS, smooth=True)]
    # control_gap is stored as a fraction (0.12 = 12 %).
    gap, gap_skipped = _series(records, "fidelity/control_gap", scale=100.0)
    if gap or gap_skipped:
        last_gap = _label(gap[-1][1]) if gap else None
        panels.append(_draw_panel(gap, _title("control gap (%)", last_gap, gap_skipped), GAP, smooth=False))

    figure = Image.new("RGB", (PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]), BACKGROUND)
    for index, panel in enumerate(panels):
        figure.paste(panel, (index * PANEL_SIZE[0], 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path, format="PNG")
    return path
