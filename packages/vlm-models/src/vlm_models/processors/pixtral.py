"""Pixtral image processing (Pixtral-12B, Mistral 3) in numpy, output-identical to transformers'
``PixtralImageProcessorPil`` with ``PixtralProcessor``'s prompt expansion.

Each image keeps its aspect: scaled down (never up) to fit ``longest_edge``, then each side rounded up to whole
tokens (``patch_size * spatial_merge_size`` pixels). A batch is zero-padded bottom-right to its largest image,
and ``image_sizes`` says where each one ends. In the prompt an image becomes its token grid row by row: ``[IMG]``
per token, ``[IMG_BREAK]`` after each row, the last one replaced by ``[IMG_END]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .image import RepeatsImageTokens, SampleBatching, image_settings, rescale_and_normalize, resize, to_rgb
from .qwen2_vl import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = ["PixtralImageProcessor"]


def _square(value: Any, what: str) -> int:
    """A transformers size of equal height and width (an int, or a dict of them), as one int."""
    if isinstance(value, dict):
        sides = {value.get(k) for k in ("height", "width")} if "longest_edge" not in value else {value["longest_edge"]}
        sides.discard(None)
        if len(sides) != 1:
            raise ValueError(f"unsupported {what} {value!r}: need one longest_edge, or equal height and width")
        value = sides.pop()
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


@dataclass
class PixtralImageProcessor(RepeatsImageTokens, SampleBatching):
    longest_edge: int = 1024
    patch_size: int = 16
    spatial_merge_size: int = 1
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    do_pad: bool = True
    resample: int = int(Image.Resampling.BICUBIC)
    image_token: str = "[IMG]"
    image_break_token: str = "[IMG_BREAK]"
    image_end_token: str = "[IMG_END]"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> PixtralImageProcessor:
        """Build from the image processor dict merged with processor_config.json's top-level settings."""
        kwargs: dict[str, Any] = image_settings(cfg, int_keys=("spatial_merge_size",), bool_keys=("do_pad",))
        if cfg.get("size") is not None:
            kwargs["longest_edge"] = _square(cfg["size"], "size")
        if cfg.get("patch_size") is not None:
            kwargs["patch_size"] = _square(cfg["patch_size"], "patch_size")
        for key in ("image_token", "image_break_token", "image_end_token"):
            if isinstance(cfg.get(key), str):
                kwargs[key] = cfg[key]
        return cls(**kwargs)

    @property
    def token_pixels(self) -> int:
        """The side of the square of pixels one image token covers."""
        return self.patch_size * self.spatial_merge_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image is resized to."""
        ratio = max(height / self.longest_edge, width / self.longest_edge)
        if ratio > 1:
            height, width = math.floor(height / ratio), math.floor(width / ratio)
        if height < 1 or width < 1:
            raise ValueError(f"an image this elongated loses a whole side when fitted to {self.longest_edge} pixels")
        step = self.token_pixels
        return ((height - 1) // step + 1) * step, ((width - 1) // step + 1) * step

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        if not images:
            raise ValueError("no images given")
        processed = [self._process_one(image) for image in images]
        sizes = np.asarray([p.shape[-2:] for p in processed], dtype=np.int64)
        if self.do_pad:
            height, width = sizes.max(axis=0)
            processed = [np.pad(p, ((0, 0), (0, height - p.shape[1]), (0, width - p.shape[2]))) for p in processed]
        elif len({p.shape for p in processed}) > 1:
            raise ValueError("images of different sizes need do_pad to be batched")
        return {"pixel_values": np.stack(processed), "image_sizes": sizes}

    def _process_one(self, image: Image.Image) -> np.ndarray:
        if self.do_convert_rgb:
            image = to_rgb(image)
        array = np.asarray(image)
        if self.do_resize:
            array = resize(image, self.output_size(image.height, image.width), resample=self.resample)
        if array.ndim == 2:  # mode L with do_convert_rgb off
            array = array[..., None]
        return rescale_and_normalize(
            array,
            self.rescale_factor if self.do_rescale else None,
            self.image_mean if self.do_normalize else None,
            self.image_std if self.do_normalize else None,
        )

    def token_grids(self, outputs: dict[str, np.ndarray]) -> list[tuple[int, int]]:
        """Token rows and columns of each image."""
        step = self.token_pixels
        return [(int(h) // step, int(w) // step) for h, w in outputs["image_sizes"].tolist()]

    def image_token_counts(self, outputs: dict[str, np.ndarray]) -> list[int]:
        """The [IMG] tokens of each image: one per feature (the breaks and the end marker are text tokens)."""
        return [rows * cols for rows, cols in self.token_grids(outputs)]

    def image_placeholders(self, image_token: str, outputs: dict[str, np.ndarray]) -> list[str]:
        row_break, end = self.image_break_token, self.image_end_token
        grids = [(self.image_token * cols + row_break) * rows for rows, cols in self.token_grids(outputs)]
        return [grid[: -len(row_break)] + end for grid in grids]
