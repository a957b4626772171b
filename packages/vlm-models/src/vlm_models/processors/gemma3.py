"""Gemma 3 image processor in numpy: SigLIP's fixed-size resize plus optional pan-and-scan crops, output-identical
to transformers' PIL backend."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .image import to_rgb
from .siglip import SiglipImageProcessor

__all__ = ["Gemma3ImageProcessor", "pan_and_scan_boxes"]

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


def pan_and_scan_boxes(
    height: int, width: int, min_crop_size: int, max_num_crops: int, min_ratio: float
) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) crops tiling a picture whose aspect ratio is at least ``min_ratio`` along its
    long side into up to ``max_num_crops`` (normally at least 2) pieces of ``min_crop_size`` or more; none for
    squarer pictures. The last crop may reach past the edge and is cut there, as in the reference."""
    long, short = (width, height) if width >= height else (height, width)
    if long / short < min_ratio:
        return []
    n = math.floor(long / short + 0.5)  # half rounds up
    n = min(math.floor(long / min_crop_size), n)
    n = min(max_num_crops, max(2, n))
    n_w, n_h = (n, 1) if width >= height else (1, n)
    crop_w, crop_h = math.ceil(width / n_w), math.ceil(height / n_h)
    if min(crop_w, crop_h) < min_crop_size:
        return []
    # In a degenerate picture (a side of a pixel or two) a crop can start past the edge; it holds nothing.
    return [
        (top, left, min(top + crop_h, height), min(left + crop_w, width))
        for top in range(0, crop_h * n_h, crop_h)
        for left in range(0, crop_w * n_w, crop_w)
        if top < height and left < width
    ]


@dataclass
class Gemma3ImageProcessor(SiglipImageProcessor):
    """Images -> ``pixel_values`` (images + crops, C, H, W) and ``num_crops`` (images,), each image followed by
    its crops."""

    height: int = 896
    width: int = 896
    resample: int = int(Image.Resampling.BILINEAR)
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Gemma3ImageProcessor:
        kwargs = cls.config_values(cfg)
        if cfg.get("do_pan_and_scan") is not None:
            kwargs["do_pan_and_scan"] = bool(cfg["do_pan_and_scan"])
        for key in ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops"):
            if cfg.get(key) is not None:
                kwargs[key] = int(cfg[key])
        if cfg.get("pan_and_scan_min_ratio_to_activate") is not None:
            kwargs["pan_and_scan_min_ratio_to_activate"] = float(cfg["pan_and_scan_min_ratio_to_activate"])
        return cls(**kwargs)

    def crops(self, image: Image.Image) -> list[Image.Image]:
        if not self.do_pan_and_scan:
            return []
        boxes = pan_and_scan_boxes(
            image.height,
            image.width,
            self.pan_and_scan_min_crop_size,
            self.pan_and_scan_max_num_crops,
            self.pan_and_scan_min_ratio_to_activate,
        )
        return [image.crop((left, top, right, bottom)) for top, left, bottom, right in boxes]

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        if not images:
            raise ValueError("no images given")
        pixels, num_crops = [], []
        for image in images:
            if self.do_convert_rgb:
                image = to_rgb(image)
            crops = self.crops(image)
            num_crops.append(len(crops))
            pixels.extend(self.preprocess(picture) for picture in [image, *crops])
        return {"pixel_values": np.stack(pixels), "num_crops": np.asarray(num_crops, dtype=np.int64)}

    def expand_prompt(self, prompt: str, image_token: str, outputs: dict[str, np.ndarray]) -> str:
        """Each ``<start_of_image>`` slot becomes the image's soft tokens between begin/end markers, framed by
        blank lines; with pan-and-scan, the original's and then each crop's."""
        sequence = f"\n\n{BOI}{SOFT * self.image_seq_length}{EOI}\n\n"
        pieces = prompt.split(image_token)
        if len(pieces) - 1 != len(outputs["num_crops"]):
            raise ValueError(f"the prompt has {len(pieces) - 1} image slot(s) for {len(outputs['num_crops'])} image(s)")
        out = [pieces[0]]
        for n_crops, piece in zip(outputs["num_crops"], pieces[1:]):
            if n_crops:
                crops = " ".join([sequence] * int(n_crops))
                out.append(
                    f"Here is the original image {sequence} and here are some crops to help you see better {crops}"
                )
            else:
                out.append(sequence)
            out.append(piece)
        return "".join(out)
