"""Numpy primitives shared by video processors: the frame resize of transformers' video processors.

transformers' video processors resize with torchvision on uint8 tensors, which on CPU runs torch's antialiased
fixed-point kernel (Pillow-SIMD's algorithm with int16 weights whose precision depends on the weights). Its
output differs from Pillow's resize by one level on some pixels, so it is redone here step for step: per axis
the same filter taps in float64, the same conversion to integer weights, the same rounding and clamping;
width first, then height. Only numpy is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from PIL import Image

__all__ = ["FrameSettings", "ProcessedVideos", "resize_frames", "torch_normalize"]


@dataclass(frozen=True)
class ProcessedVideos:
    """A video processor's outputs: the model inputs, and what the prompt expansion writes about each video."""

    arrays: dict[str, np.ndarray]
    """Model inputs, as the Hugging Face processor returns them."""
    timestamps: list[list[float]]
    """Per video, the time (seconds) of each run of video tokens in the prompt."""
    durations: list[float]
    """Per video, the length of the source (seconds)."""


@dataclass
class FrameSettings:
    """The pixel settings transformers' video processors share (IMAGENET_STANDARD mean and std by default)."""

    interleaves_audio: ClassVar[bool] = False
    """Whether the family hears a video's sound track, interleaved with the frames (``expand_prompt_with_audio``)."""

    image_mean: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    image_std: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def normalize(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (T, H, W, C) frames -> float32, rescaled and normalized as the switches say."""
        return torch_normalize(
            frames,
            self.rescale_factor if self.do_rescale else None,
            self.image_mean if self.do_normalize else None,
            self.image_std if self.do_normalize else None,
        )


def torch_normalize(
    frames: np.ndarray,
    rescale_factor: float | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> np.ndarray:
    """uint8 frames -> float32 as transformers' torchvision processors do it: the rescale folds into the
    normalize's mean and std, all in float32 (``None`` skips a step)."""
    pixels = frames.astype(np.float32)
    if mean is not None and std is not None:
        scale = np.float32(1 / rescale_factor) if rescale_factor is not None else np.float32(1)
        return (pixels - np.asarray(mean, dtype=np.float32) * scale) / (np.asarray(std, dtype=np.float32) * scale)
    if rescale_factor is not None:
        return pixels * np.float32(rescale_factor)
    return pixels


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:
    # Keys' cubic with a = -0.5, the one torch uses with antialiasing (as Pillow does); same operation order.
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _lanczos(x: np.ndarray) -> np.ndarray:
    # sinc(x) * sinc(x / 3) inside three lobes, as Pillow and torch write it.
    x = np.abs(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        px = np.pi * x
        value = np.where(x == 0.0, 1.0, np.sin(px) / px * np.sin(px / 3.0) / (px / 3.0))
    return np.where(x < 3.0, value, 0.0)


_FILTERS: dict[int, tuple[Callable[[np.ndarray], np.ndarray], int]] = {
    # Pillow resample code -> (filter, taps of the filter at scale 1)
    int(Image.Resampling.BILINEAR): (_bilinear, 2),
    int(Image.Resampling.BICUBIC): (_bicubic, 4),
    int(Image.Resampling.LANCZOS): (_lanczos, 6),
}


def _axis_weights(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, int]:
    """(in_size, out_size) integer weights (as float64) of one axis and their precision in bits."""
    filter_fn, taps = _FILTERS[resample]
    scale = in_size / out_size
    support = taps * 0.5 * scale if scale >= 1.0 else taps * 0.5
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    width = math.ceil(support) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    offsets = np.arange(width)
    weights = filter_fn((offsets + first[:, None] - center[:, None] + 0.5) * inv_scale)
    weights = np.where(offsets < count[:, None], weights, 0.0)
    total = np.zeros(out_size)
    for j in range(width):  # left to right, as the kernel sums them (numpy's sum pairs them up)
        total = total + weights[:, j]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    # The most bits (at most 22) that keep the largest weight within int16.
    w_max = weights.max()
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    ints = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5))
    matrix = np.zeros((in_size, out_size))
    rows = np.clip(first[:, None] + offsets, 0, in_size - 1)
    np.add.at(matrix, (rows, np.broadcast_to(np.arange(out_size)[:, None], rows.shape)), ints)
    return matrix, precision


def _resample_axis(frames: np.ndarray, axis: int, out_size: int, resample: int) -> np.ndarray:
    matrix, precision = _axis_weights(frames.shape[axis], out_size, resample)
    moved = np.moveaxis(frames, axis, -1).astype(np.float64)
    # Integer weights times uint8 pixels: every sum is an integer far below 2**53, so the float64 product is exact.
    sums = np.rint(moved @ matrix).astype(np.int64)
    out = np.clip((sums + (1 << (precision - 1))) >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, axis)


def resize_frames(
    frames: np.ndarray, size: tuple[int, int], resample: int = int(Image.Resampling.BICUBIC)
) -> np.ndarray:
    """Resize (frames, height, width, channels) uint8 to ``size`` = (height, width) as torchvision does on CPU
    (antialiased, ``align_corners=False``)."""
    if resample not in _FILTERS:
        raise ValueError(f"video resize supports bilinear and bicubic resampling, got resample={resample}")
    height, width = size
    if frames.shape[2] != width:
        frames = np.stack([_resample_axis(frame, 1, width, resample) for frame in frames])
    if frames.shape[1] != height:
        frames = np.stack([_resample_axis(frame, 0, height, resample) for frame in frames])
    return frames
