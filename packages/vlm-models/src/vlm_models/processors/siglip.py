"""Fixed-size image processors for SigLIP towers (PaliGemma, Gemma 3), output-identical to transformers' PIL
backend: resize every image to one (height, width), rescale, normalize, channels first."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .image import SampleBatching, image_settings, rescale_and_normalize, resize, to_rgb

__all__ = ["SiglipImageProcessor", "IMAGENET_STANDARD_MEAN", "IMAGENET_STANDARD_STD"]

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


@dataclass
class SiglipImageProcessor(SampleBatching):
    """Images -> ``pixel_values`` (images, C, height, width) float32."""

    height: int = 224
    width: int = 224
    image_mean: tuple[float, ...] = field(default=IMAGENET_STANDARD_MEAN)
    image_std: tuple[float, ...] = field(default=IMAGENET_STANDARD_STD)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = int(Image.Resampling.BICUBIC)
    image_seq_length: int = 256
    """Text placeholder tokens per image."""

    @classmethod
    def config_values(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """The fields this class declares, from a ``preprocessor_config.json`` dict; null means the default."""
        kwargs: dict[str, Any] = image_settings(cfg, int_keys=("image_seq_length",))
        size = cfg.get("size")
        if isinstance(size, dict):
            if "height" not in size or "width" not in size:
                raise ValueError(f"preprocessor config size={size!r} needs height and width")
            kwargs.update(height=int(size["height"]), width=int(size["width"]))
        return kwargs

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> SiglipImageProcessor:
        return cls(**cls.config_values(cfg))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One picture -> (C, height, width) float32."""
        if self.do_convert_rgb:
            image = to_rgb(image)
        array = resize(image, (self.height, self.width), self.resample) if self.do_resize else np.asarray(image)
        if array.ndim == 2:  # mode L with do_convert_rgb off
            array = array[..., None]
        return rescale_and_normalize(
            array,
            self.rescale_factor if self.do_rescale else None,
            self.image_mean if self.do_normalize else None,
            self.image_std if self.do_normalize else None,
        )

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        if not images:
            raise ValueError("no images given")
        return {"pixel_values": np.stack([self.preprocess(image) for image in images])}

    def expand_prompt(self, prompt: str, image_token: str, outputs: dict[str, np.ndarray]) -> str:
        """The prompt with each image slot replaced by the image's placeholder tokens."""
        return prompt.replace(image_token, image_token * self.image_seq_length)
