"""CLIP image processing for LLaVA 1.5 (resize the short side, centre crop) and LLaVA-NeXT (AnyRes tiling), in
numpy, output-identical to transformers' PIL backends (``CLIPImageProcessorPil``, ``LlavaImageProcessorPil``,
``LlavaNextImageProcessorPil``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .image import RepeatsImageTokens, SampleBatching, image_settings, rescale_and_normalize, resize, to_rgb
from .qwen2_vl import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = ["CLIPImageProcessor", "LlavaNextImageProcessor", "select_best_resolution", "unpadded_grid"]


def _size_pair(value: Any, what: str) -> tuple[int, int] | int:
    """A transformers size: ``{"height", "width"}`` -> (h, w); ``{"shortest_edge"}`` or an int -> int."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if value.get("height") is not None and value.get("width") is not None:
            return int(value["height"]), int(value["width"])
        if value.get("shortest_edge") is not None:
            return int(value["shortest_edge"])
    raise ValueError(f"unsupported image processor {what} {value!r} (need height/width or shortest_edge)")


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) with the short side at ``short`` and the long one scaled and truncated, as transformers'
    ``get_resize_output_image_size(default_to_square=False)``."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop HWC ``array`` about its centre; where it is smaller, pad with zeros first (as transformers does)."""
    h, w = array.shape[:2]
    if h < height or w < width:
        new_h, new_w = max(h, height), max(w, width)
        padded = np.zeros((new_h, new_w, *array.shape[2:]), dtype=array.dtype)
        top, left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
        padded[top : top + h, left : left + w] = array
        array, h, w = padded, new_h, new_w
    top, left = (h - height) // 2, (w - width) // 2
    return array[top : top + height, left : left + width]


def pad_to_square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """Centre ``image`` on a square of its longer side filled with ``color`` (LLaVA's ``do_pad``)."""
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image
    array = np.asarray(image)
    canvas = np.empty((side, side, array.shape[2]), dtype=array.dtype)
    canvas[...] = np.asarray(color, dtype=array.dtype)
    if width > height:
        start = (side - height) // 2
        canvas[start : start + height] = array
    else:
        start = (side - width) // 2
        canvas[:, start : start + width] = array
    return Image.fromarray(canvas)


@dataclass
class CLIPImageProcessor(RepeatsImageTokens, SampleBatching):
    """Images -> ``pixel_values`` (images, C, crop height, crop width) float32.

    The processor-level settings (``patch_size``, ``vision_feature_select_strategy``,
    ``num_additional_image_tokens``, from processor_config.json) decide how many placeholder tokens an image takes.
    """

    size: tuple[int, int] | int = 224
    crop_size: tuple[int, int] = (224, 224)
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    do_pad: bool = False
    resample: int = int(Image.Resampling.BICUBIC)
    patch_size: int | None = None
    vision_feature_select_strategy: str = "default"
    num_additional_image_tokens: int = 0

    @classmethod
    def config_kwargs(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        kwargs = image_settings(
            cfg, int_keys=("patch_size", "num_additional_image_tokens"), bool_keys=("do_center_crop", "do_pad")
        )
        if cfg.get("size") is not None:
            kwargs["size"] = _size_pair(cfg["size"], "size")
        if cfg.get("crop_size") is not None:
            crop = _size_pair(cfg["crop_size"], "crop_size")
            kwargs["crop_size"] = crop if isinstance(crop, tuple) else (crop, crop)
        strategy = cfg.get("vision_feature_select_strategy")
        if strategy is not None:
            if strategy not in ("default", "full"):
                raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
            kwargs["vision_feature_select_strategy"] = strategy
        return kwargs

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> CLIPImageProcessor:
        """Build from the image processor dict merged with processor_config.json's top-level settings."""
        processor = cls(**cls.config_kwargs(cfg))
        if processor.patch_size is None:
            raise ValueError(
                "the processor config lacks patch_size (processor_config.json of a LLaVA checkpoint sets it), "
                "so the number of image tokens is unknown"
            )
        return processor

    # -- placeholder tokens
    def _base_tokens(self, height: int, width: int) -> int:
        assert self.patch_size is not None
        tokens = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return tokens - 1 if self.vision_feature_select_strategy == "default" else tokens

    def image_token_counts(self, outputs: dict[str, np.ndarray]) -> list[int]:
        _, _, height, width = outputs["pixel_values"].shape
        return [self._base_tokens(height, width)] * len(outputs["pixel_values"])

    # -- pixels
    def __call__(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        if not images:
            raise ValueError("no images given")
        return {"pixel_values": np.stack([self._process_one(self._prepare(image)) for image in images])}

    def _prepare(self, image: Image.Image) -> Image.Image:
        if self.do_convert_rgb:
            image = to_rgb(image)
        if self.do_pad:
            image = pad_to_square(image, tuple(int(m * 255) for m in self.image_mean))
        return image

    def _resize(self, image: Image.Image, size: tuple[int, int] | int) -> Image.Image:
        if isinstance(size, int):
            size = short_side_size(image.height, image.width, size)
        return Image.fromarray(resize(image, size, resample=self.resample))

    def _process_one(self, image: Image.Image) -> np.ndarray:
        if self.do_resize:
            image = self._resize(image, self.size)
        array = np.asarray(image)
        if array.ndim == 2:  # mode L with do_convert_rgb off
            array = array[..., None]
        if self.do_center_crop:
            array = center_crop(array, *self.crop_size)
        return rescale_and_normalize(
            array,
            self.rescale_factor if self.do_rescale else None,
            self.image_mean if self.do_normalize else None,
            self.image_std if self.do_normalize else None,
        )


def select_best_resolution(height: int, width: int, resolutions: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) of ``resolutions`` that keeps the most of the image's pixels when it is scaled to fit,
    ties going to the one that wastes the least area (LLaVA-NeXT's AnyRes choice)."""
    best, best_kept, best_waste = None, 0, math.inf
    for res_h, res_w in resolutions:
        scale = min(res_w / width, res_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = res_w * res_h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (int(res_h), int(res_w)), kept, waste
    if best is None:
        raise ValueError("image_grid_pinpoints is empty")
    return best


def fit_within(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The size of the image scaled to fit (target_h, target_w), aspect kept, rounding up."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpadded_grid(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int]:
    """Of a (grid_h, grid_w) feature grid covering the letterboxed image, the (rows, cols) the image itself covers."""
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        return grid_h - 2 * ((grid_h - new_h) // 2), grid_w
    new_w = int(round(width * (grid_h / height), 7))
    return grid_h, grid_w - 2 * ((grid_w - new_w) // 2)


@dataclass
class LlavaNextImageProcessor(CLIPImageProcessor):
    """AnyRes: every image becomes a resized global view plus the tiles of its letterboxed best-fit resolution.

    Outputs ``pixel_values`` (images, most tiles, C, H, W), zero-padded on the tile axis, and ``image_sizes``
    (images, 2) as (height, width) of the originals.
    """

    image_grid_pinpoints: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    do_pad: bool = True  # here: pad the tile axis for batching, not the LLaVA 1.5 square padding

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LlavaNextImageProcessor:
        kwargs = cls.config_kwargs(cfg)
        if cfg.get("image_grid_pinpoints") is not None:
            kwargs["image_grid_pinpoints"] = tuple((int(h), int(w)) for h, w in cfg["image_grid_pinpoints"])
        processor = cls(**kwargs)
        if processor.patch_size is None:
            raise ValueError("the processor config lacks patch_size, so the number of image tokens is unknown")
        return processor

    @property
    def base_size(self) -> tuple[int, int]:
        """The global view's size: ``size`` as is, a shortest edge as a square."""
        return self.size if isinstance(self.size, tuple) else (self.size, self.size)

    def image_token_counts(self, outputs: dict[str, np.ndarray]) -> list[int]:
        height, width = outputs["pixel_values"].shape[-2:]
        assert self.patch_size is not None
        rows, cols = height // self.patch_size, width // self.patch_size
        counts = []
        for orig_h, orig_w in outputs["image_sizes"].tolist():
            best_h, best_w = select_best_resolution(orig_h, orig_w, self.image_grid_pinpoints)
            kept_rows, kept_cols = unpadded_grid(orig_h, orig_w, rows * (best_h // height), cols * (best_w // width))
            # the base view, then the unpadded tiles' features with one newline per row
            counts.append(self._base_tokens(height, width) + kept_rows * (kept_cols + 1))
        return counts

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        if not images:
            raise ValueError("no images given")
        per_image, sizes = [], []
        for image in images:
            if self.do_convert_rgb:
                image = to_rgb(image)
            per_image.append(np.stack([self._process_one(view) for view in self._views(image)]))
            sizes.append((image.height, image.width))
        most = max(len(p) for p in per_image)
        if self.do_pad:
            per_image = [np.pad(p, ((0, most - len(p)), (0, 0), (0, 0), (0, 0))) for p in per_image]
        elif len({len(p) for p in per_image}) > 1:
            raise ValueError("images with different tile counts need do_pad")
        return {"pixel_values": np.stack(per_image), "image_sizes": np.asarray(sizes, dtype=np.int64)}

    def _views(self, image: Image.Image) -> list[Image.Image]:
        best_h, best_w = select_best_resolution(image.height, image.width, self.image_grid_pinpoints)
        new_h, new_w = fit_within(image.height, image.width, best_h, best_w)
        fitted = resize(image, (new_h, new_w), resample=self.resample)
        # Letterbox with black (before normalization), the odd pixel going to the bottom/right.
        top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
        canvas = np.zeros((best_h, best_w, *fitted.shape[2:]), dtype=np.uint8)
        canvas[top : top + new_h, left : left + new_w] = fitted
        tile = self.crop_size[0]  # transformers tiles by the crop height, cropping or not
        tiles = [canvas[i : i + tile, j : j + tile] for i in range(0, best_h, tile) for j in range(0, best_w, tile)]
        base = Image.fromarray(resize(image, self.base_size, resample=self.resample))
        return [base, *(Image.fromarray(np.ascontiguousarray(t)) for t in tiles)]
