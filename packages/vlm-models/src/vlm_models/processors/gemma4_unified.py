"""The unified Gemma 4's image processor and raw-waveform feature extractor in numpy, output-identical to
transformers' (``Gemma4UnifiedImageProcessor``, ``Gemma4UnifiedAudioFeatureExtractor``).

Images are resized as for Gemma 4 (processors/gemma4.py), but the model has no vision tower to pool its patches:
transformers cuts ``patch_size`` patches and merges each ``pooling_kernel_size``² block of them into one patch of
``(pooling_kernel_size * patch_size)``² * 3 pixels (rows, then columns, then channels), ordered row by row with the
block's (x, y) as its position. That is the same as cutting the picture into patches of the merged size directly,
which is what this processor does; each merged patch is one soft token. transformers' processor here is a
torchvision one: its bicubic resize is torch's uint8 kernel (int16 fixed-point weights, ``torch_bicubic_resize``
in processors/image.py), not Pillow's, and it rescales in float32.

Audio is no spectrogram: a 16 kHz clip is cut into frames of ``audio_samples_per_token`` samples (the last one
zero-filled), one soft token each; clips are padded with whole frames to the longest and masked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from .gemma4 import BOA, EOA, Gemma4ImageProcessor, expand_slots
from .image import torch_bicubic_resize

__all__ = ["Gemma4UnifiedAudioFeatureExtractor", "Gemma4UnifiedImageProcessor"]


@dataclass
class Gemma4UnifiedImageProcessor(Gemma4ImageProcessor):
    """Images -> ``pixel_values`` (images, max_soft_tokens, (pooling_kernel_size * patch_size)² * 3) in [0, 1]
    and ``image_position_ids`` (images, max_soft_tokens, 2): each merged patch's (x, y), (-1, -1) for padding."""

    rescale_dtype: ClassVar[type] = np.float32
    """transformers' unified processor is a torchvision one, which rescales in float32."""

    def resized(self, image: Image.Image, size: tuple[int, int]) -> np.ndarray:
        """As torch resizes uint8 pictures (bicubic, the default); other filters go through Pillow, which may
        differ from transformers' by a level on some pixels."""
        if self.resample == int(Image.Resampling.BICUBIC):
            return torch_bicubic_resize(np.asarray(image, dtype=np.uint8), size)
        return super().resized(image, size)

    @property
    def cut_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    @property
    def patches_per_token(self) -> int:
        return 1

    @property
    def padded_patches(self) -> int:
        return self.max_soft_tokens


@dataclass
class Gemma4UnifiedAudioFeatureExtractor:
    """16 kHz mono waveforms -> ``input_features`` (clips, frames, audio_samples_per_token) float32 samples and
    ``input_features_mask`` (clips, frames) bool."""

    sampling_rate: int = 16_000
    audio_samples_per_token: int = 640
    padding_value: float = 0.0
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if self.audio_samples_per_token < 1:
            raise ValueError(f"audio_samples_per_token must be positive, got {self.audio_samples_per_token}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Gemma4UnifiedAudioFeatureExtractor:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in cfg.items() if k in names and v is not None})

    def frames(self, waveform: np.ndarray) -> np.ndarray:
        """One clip's (frames, audio_samples_per_token) samples, the last frame zero-filled."""
        clip = np.asarray(waveform, dtype=np.float32).reshape(-1)
        n = self.audio_samples_per_token
        count = math.ceil(len(clip) / n)
        return np.pad(clip, (0, count * n - len(clip))).reshape(count, n)

    def __call__(self, waveforms: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        if not waveforms:
            raise ValueError("no audio given")
        clips = [self.frames(w) for w in waveforms]
        longest = max(len(c) for c in clips)
        features, masks = [], []
        for clip in clips:
            pad = [(0, longest - len(clip)) if self.padding_side == "right" else (longest - len(clip), 0), (0, 0)]
            features.append(np.pad(clip, pad, constant_values=self.padding_value))
            masks.append(np.pad(np.ones(len(clip), dtype=bool), pad[0]))
        return {"input_features": np.stack(features), "input_features_mask": np.stack(masks)}

    def expand_prompt(self, prompt: str, audio_token: str, outputs: dict[str, np.ndarray]) -> str:
        """Each audio slot becomes one soft token per frame of its clip, between the begin and end markers."""
        counts = [int(m.sum()) for m in np.asarray(outputs["input_features_mask"])]
        return expand_slots(prompt, audio_token, [f"{BOA}{audio_token * n}{EOA}" for n in counts])
