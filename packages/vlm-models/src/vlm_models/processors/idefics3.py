"""Idefics3 / SmolVLM image processor in numpy/Pillow, output-identical to transformers' PIL backend: resize to a
longest edge, then (with image splitting) a grid of square tiles plus a global view of the whole image, each one
vision input; and the prompt expansion that frames each tile's tokens with ``<fake_token_around_image>`` and a
``<row_r_col_c>`` / ``<global-img>`` tag."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .image import image_settings, resize, to_rgb
from .siglip import SiglipImageProcessor

__all__ = ["Idefics3ImageProcessor", "image_prompt", "resized_to_longest_edge"]

MAX_IMAGE_SIDE = 4096  # transformers' absolute cap on a resized image's longest side
FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"
GRID_KEY = "rows_cols"
"""The image processor's per-image (rows, cols) tile grid; the prompt expansion takes it out of the outputs,
as the Hugging Face processor drops its ``rows`` / ``cols``."""


def scaled_to_longest_edge(height: int, width: int, longest: int) -> tuple[int, int]:
    """The longest side to ``longest`` (up or down); the other keeps the aspect ratio, truncated and then rounded
    up to even."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def resized_to_longest_edge(height: int, width: int, longest: int) -> tuple[int, int]:
    """The reference's size for a longest edge of ``longest``: scaled_to_longest_edge, then the longer side capped
    at MAX_IMAGE_SIDE."""
    height, width = scaled_to_longest_edge(height, width, longest)
    aspect = width / height  # of the new size, as the reference's second step takes it
    if width >= height and width > MAX_IMAGE_SIDE:
        width, height = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE / aspect)
    elif height > width and height > MAX_IMAGE_SIDE:
        height, width = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE * aspect)
    return max(height, 1), max(width, 1)


def tile_multiple(height: int, width: int, tile: int) -> tuple[int, int]:
    """Both sides rounded up to whole tiles; the short side first follows the aspect ratio of the rounded long
    side, as the reference does."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def image_prompt(rows: int, cols: int, tokens_per_tile: int, image_token: str) -> str:
    """One image's text: each tile's tokens after a fake token and its <row_r_col_c> tag, a newline after each
    row, then a blank line and the global view framed by fake tokens; an untiled image is the global view alone."""
    tokens = image_token * tokens_per_tile
    whole = f"{FAKE}{GLOBAL}{tokens}{FAKE}"
    if rows == 0 and cols == 0:
        return whole
    grid = "".join("".join(f"{FAKE}<row_{r + 1}_col_{c + 1}>{tokens}" for c in range(cols)) + "\n" for r in range(rows))
    return f"{grid}\n{whole}"


@dataclass
class Idefics3ImageProcessor(SiglipImageProcessor):
    """Images -> ``pixel_values`` (1, frames, C, tile, tile) float32 and ``pixel_attention_mask`` (1, frames,
    tile, tile), each image's tiles (row-major) followed by its global view. SigLIP's settings and per-frame
    rescale/normalize, with ``height`` = ``width`` = the tile side (``max_image_size``) and ``image_seq_length``
    the tokens per tile (the processor's ``image_seq_len``)."""

    height: int = 364
    width: int = 364
    resample: int = int(Image.Resampling.LANCZOS)
    image_seq_length: int = 169
    longest_edge: int = 4 * 364
    do_image_splitting: bool = True

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Idefics3ImageProcessor:
        kwargs: dict[str, Any] = image_settings(cfg, bool_keys=("do_image_splitting",))
        if cfg.get("image_seq_len") is not None:
            kwargs["image_seq_length"] = int(cfg["image_seq_len"])
        for key in ("size", "max_image_size"):
            value = cfg.get(key)
            if value is None:
                continue
            if not isinstance(value, dict) or "longest_edge" not in value:
                raise ValueError(f"preprocessor config {key}={value!r} needs a longest_edge")
            if key == "size":
                kwargs["longest_edge"] = int(value["longest_edge"])
            else:
                kwargs["height"] = kwargs["width"] = int(value["longest_edge"])
        return cls(**kwargs)

    def _resize(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        return Image.fromarray(resize(image, size, self.resample))

    def frames(self, image: Image.Image) -> tuple[list[Image.Image], int, int]:
        """One picture -> its vision inputs (tiles row-major, then the global view) and the tile grid."""
        if self.do_convert_rgb:
            image = to_rgb(image)
        if self.do_resize:
            image = self._resize(image, resized_to_longest_edge(image.height, image.width, self.longest_edge))
        tile = self.height
        if not self.do_image_splitting:
            return [self._resize(image, (tile, tile))], 0, 0
        image = self._resize(image, tile_multiple(image.height, image.width, tile))
        if image.height <= tile and image.width <= tile:
            return [image], 0, 0
        rows, cols = image.height // tile, image.width // tile
        tiles = [
            image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)
        ]
        return [*tiles, self._resize(image, (tile, tile))], rows, cols

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        if not images:
            raise ValueError("no images given")
        arrays, grids = [], []
        for image in images:
            frames, rows, cols = self.frames(image)
            # Each frame has its final size already (SigLIP's resize to the tile leaves it as it is).
            arrays.extend(self.preprocess(frame) for frame in frames)
            grids.append((rows, cols))
        # A bottom/right zero padding to the largest frame, marked in the pixel mask.
        height, width = max(a.shape[1] for a in arrays), max(a.shape[2] for a in arrays)
        pixels = np.zeros((1, len(arrays), arrays[0].shape[0], height, width), dtype=np.float32)
        mask = np.zeros((1, len(arrays), height, width), dtype=np.int64)
        for i, array in enumerate(arrays):
            pixels[0, i, :, : array.shape[1], : array.shape[2]] = array
            mask[0, i, : array.shape[1], : array.shape[2]] = 1
        return {"pixel_values": pixels, "pixel_attention_mask": mask, GRID_KEY: np.asarray(grids, dtype=np.int64)}

    def expand_prompt(self, prompt: str, image_token: str, outputs: dict[str, np.ndarray]) -> str:
        """Each image slot becomes its tiles' and global view's tokens; takes the tile grids out of ``outputs``
        (they are no model input)."""
        grids = outputs.pop(GRID_KEY)
        pieces = prompt.split(image_token)
        if len(pieces) - 1 != len(grids):
            raise ValueError(f"the prompt has {len(pieces) - 1} image slot(s) for {len(grids)} image(s)")
        out = [pieces[0]]
        for (rows, cols), piece in zip(grids.tolist(), pieces[1:]):
            out.append(image_prompt(rows, cols, self.image_seq_length, image_token))
            out.append(piece)
        return "".join(out)
