"""The loss curve as a PNG, drawn with Pillow (already a dependency) rather than matplotlib."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["plot_loss"]

WIDTH, HEIGHT = 800, 480
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 40, 50
TRAIN_COLOUR, VAL_COLOUR, AXIS_COLOUR, GRID_COLOUR = (31, 119, 180), (255, 127, 14), (40, 40, 40), (225, 225, 225)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def plot_loss(
    history: Sequence[Mapping[str, float]], validation: Sequence[Mapping[str, float]], destination: str | Path
) -> Path:
    """Training loss per step (line) and validation loss (dots) against the step."""
    destination = Path(destination)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    points = [(float(h["step"]), float(h["loss"])) for h in history]
    val_points = [(float(v["step"]), float(v["val_loss"])) for v in validation]
    every = points + val_points
    if not every:
        draw.text((MARGIN_LEFT, HEIGHT // 2), "no steps recorded", fill=AXIS_COLOUR, font=font)
        image.save(destination)
        return destination
    x_low, x_high = min(p[0] for p in every), max(p[0] for p in every)
    y_low, y_high = min(p[1] for p in every), max(p[1] for p in every)
    if x_high == x_low:
        x_high = x_low + 1
    if y_high == y_low:
        y_high = y_low + 1
    pad = (y_high - y_low) * 0.05
    y_low, y_high = y_low - pad, y_high + pad
    left, right, top, bottom = MARGIN_LEFT, WIDTH - MARGIN_RIGHT, MARGIN_TOP, HEIGHT - MARGIN_BOTTOM

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x_low) / (x_high - x_low) * (right - left),
            bottom - (y - y_low) / (y_high - y_low) * (bottom - top),
        )

    for value in _ticks(y_low, y_high):
        _, y = to_pixel(x_low, value)
        draw.line([(left, y), (right, y)], fill=GRID_COLOUR)
        draw.text((5, y - 6), f"{value:.3f}", fill=AXIS_COLOUR, font=font)
    for value in _ticks(x_low, x_high):
        x, _ = to_pixel(value, y_low)
        draw.line([(x, bottom), (x, bottom + 5)], fill=AXIS_COLOUR)
        draw.text((x - 10, bottom + 8), f"{value:.0f}", fill=AXIS_COLOUR, font=font)
    draw.rectangle([left, top, right, bottom], outline=AXIS_COLOUR)
    draw.text(((left + right) // 2 - 15, HEIGHT - 20), "step", fill=AXIS_COLOUR, font=font)
    draw.text((left, 12), "loss", fill=AXIS_COLOUR, font=font)

    if len(points) > 1:
        draw.line([to_pixel(*p) for p in points], fill=TRAIN_COLOUR, width=2)
    for p in points if len(points) == 1 else ():
        x, y = to_pixel(*p)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=TRAIN_COLOUR)
    for p in val_points:
        x, y = to_pixel(*p)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=VAL_COLOUR)

    legend = [("train", TRAIN_COLOUR)] + ([("validation", VAL_COLOUR)] if val_points else [])
    for i, (label, colour) in enumerate(legend):
        x = right - 110
        y = top + 10 + 16 * i
        draw.rectangle([x, y + 2, x + 12, y + 10], fill=colour)
        draw.text((x + 18, y), label, fill=AXIS_COLOUR, font=font)
    image.save(destination)
    return destination
