"""Gemma 4's image processor and audio feature extractor in numpy, output-identical to transformers'
(``Gemma4ImageProcessorPil``, ``Gemma4AudioFeatureExtractor``).

Images keep their aspect ratio: each is resized (bicubic) to the largest size whose sides are multiples of
``pooling_kernel_size * patch_size`` within ``max_soft_tokens`` soft tokens, cut into flat patches with their
(x, y) positions, and padded to the same number of patches. Audio (16 kHz mono) becomes log-mel frames: 20 ms
Hann windows every 10 ms over a half-window of leading silence, magnitude spectrum, 128 HTK mel filters, log with
a floor; a frame is valid only when its whole window is real audio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from .image import SampleBatching, image_settings, rescale_and_normalize, resize, to_rgb
from .mel import frames, hann_window, mel_filter_bank

__all__ = [
    "Gemma4AudioFeatureExtractor",
    "Gemma4ImageProcessor",
    "SUPPORTED_SOFT_TOKENS",
    "aspect_ratio_preserving_size",
    "expand_slots",
    "audio_token_counts",
]

BOI, EOI = "<|image>", "<image|>"
BOA, EOA = "<|audio>", "<audio|>"
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)


def aspect_ratio_preserving_size(
    height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int
) -> tuple[int, int]:
    """The largest (height, width), sides multiples of ``pooling_kernel_size * patch_size``, of the picture's
    aspect ratio within ``max_patches`` patches; a side that would round to nothing gets one multiple and the
    other as many as the ratio gives (within the budget's longest side)."""
    target = max_patches * patch_size**2
    factor = math.sqrt(target / (height * width))
    unit = pooling_kernel_size * patch_size
    new_height = math.floor(factor * height / unit) * unit
    new_width = math.floor(factor * width / unit) * unit
    if new_height == 0 and new_width == 0:
        raise ValueError(f"a {width}x{height} picture cannot be resized to a multiple of {unit} pixels")
    longest = (max_patches // pooling_kernel_size**2) * unit
    if new_height == 0:
        new_height, new_width = unit, min(math.floor(width / height) * unit, longest)
    elif new_width == 0:
        new_width, new_height = unit, min(math.floor(height / width) * unit, longest)
    if new_height * new_width > target:
        raise ValueError(f"a {width}x{height} picture needs more than {max_patches} patches of {patch_size} pixels")
    return new_height, new_width


@dataclass
class Gemma4ImageProcessor(SampleBatching):
    """Images -> ``pixel_values`` (images, max_patches, patch² * 3) in [0, 1] and ``image_position_ids``
    (images, max_patches, 2): each patch's (x, y), (-1, -1) for padding."""

    patch_size: int = 16
    max_soft_tokens: int = 280
    pooling_kernel_size: int = 3
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {self.max_soft_tokens}")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Gemma4ImageProcessor:
        kwargs = image_settings(cfg, int_keys=("patch_size", "max_soft_tokens", "pooling_kernel_size"))
        return cls(**kwargs)

    rescale_dtype: ClassVar[type] = np.float64
    """The rescale's precision: transformers' PIL processor multiplies in float64."""

    @property
    def max_patches(self) -> int:
        """The resize budget, in ``patch_size`` patches."""
        return self.max_soft_tokens * self.pooling_kernel_size**2

    @property
    def cut_size(self) -> int:
        """The side of the flat patches the resized picture is cut into (the vision tower pools them later)."""
        return self.patch_size

    @property
    def patches_per_token(self) -> int:
        return self.pooling_kernel_size**2

    @property
    def padded_patches(self) -> int:
        """How many flat patches every picture is padded to."""
        return self.max_patches

    def resized(self, image: Image.Image, size: tuple[int, int]) -> np.ndarray:
        """uint8 HWC at ``(height, width)``, as transformers' PIL processor resizes."""
        return resize(image, size, self.resample)

    def patches(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """One picture's (patches, patch² * 3) pixels and (patches, 2) positions, unpadded."""
        if self.do_convert_rgb:
            image = to_rgb(image)
        size = (image.height, image.width)
        if self.do_resize:
            size = aspect_ratio_preserving_size(*size, self.patch_size, self.max_patches, self.pooling_kernel_size)
        array = self.resized(image, size)
        pixels = rescale_and_normalize(
            array if array.ndim == 3 else array[..., None],
            self.rescale_factor if self.do_rescale else None,
            self.image_mean if self.do_normalize else None,
            self.image_std if self.do_normalize else None,
            rescale_dtype=self.rescale_dtype,
        )
        channels, height, width = pixels.shape
        p = self.cut_size
        rows, cols = height // p, width // p
        grid = pixels[:, : rows * p, : cols * p].reshape(channels, rows, p, cols, p)
        flat = grid.transpose(1, 3, 2, 4, 0).reshape(rows * cols, -1)
        xs, ys = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
        return flat, np.stack([xs, ys], axis=-1).reshape(-1, 2)

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        if not images:
            raise ValueError("no images given")
        pixels, positions = [], []
        for image in images:
            flat, where = self.patches(image)
            pad = self.padded_patches - len(flat)
            pixels.append(np.pad(flat, [(0, pad), (0, 0)]))
            positions.append(np.pad(where, [(0, pad), (0, 0)], constant_values=-1))
        return {"pixel_values": np.stack(pixels), "image_position_ids": np.stack(positions).astype(np.int64)}

    def image_token_counts(self, outputs: dict[str, np.ndarray]) -> list[int]:
        real = (outputs["image_position_ids"] != -1).all(axis=-1).sum(axis=-1)
        return [int(n) // self.patches_per_token for n in real]

    def expand_prompt(self, prompt: str, image_token: str, outputs: dict[str, np.ndarray]) -> str:
        """Each image slot becomes the image's soft tokens between its begin and end markers."""
        return expand_slots(
            prompt, image_token, [f"{BOI}{image_token * n}{EOI}" for n in self.image_token_counts(outputs)]
        )


def expand_slots(prompt: str, token: str, replacements: list[str]) -> str:
    """Each ``token`` slot of ``prompt`` becomes the next replacement; the counts must agree."""
    pieces = prompt.split(token)
    if len(pieces) - 1 != len(replacements):
        raise ValueError(f"the prompt has {len(pieces) - 1} {token} slot(s) for {len(replacements)} input(s)")
    out = [pieces[0]]
    for replacement, piece in zip(replacements, pieces[1:]):
        out += [replacement, piece]
    return "".join(out)


def audio_token_counts(input_features_mask: np.ndarray) -> list[int]:
    """Soft tokens per clip: the valid frames left after the audio tower's two stride-2 convolutions."""
    return [int(mask[::2][::2].sum()) for mask in np.asarray(input_features_mask)]


@dataclass
class Gemma4AudioFeatureExtractor:
    """16 kHz mono waveforms -> ``input_features`` (clips, frames, 128) float32 log-mel and
    ``input_features_mask`` (clips, frames) bool; the clips are padded (with silence, marked invalid) to the
    longest, rounded up to ``pad_to_multiple_of`` samples; a clip over ``max_length`` samples is cut there."""

    feature_size: int = 128
    sampling_rate: int = 16_000
    padding_value: float = 0.0
    frame_length_ms: float = 20.0
    hop_length_ms: float = 10.0
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    preemphasis: float = 0.0
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = False
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-3
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None
    max_length: int = 480_000
    pad_to_multiple_of: int = 128
    zeroes_padding: ClassVar[bool] = True
    """Whether the features of padding frames are zeroed (Gemma 4) or left as computed (Gemma 3n)."""

    def __post_init__(self) -> None:
        self.frame_length = round(self.sampling_rate * self.frame_length_ms / 1000.0)
        self.hop_length = round(self.sampling_rate * self.hop_length_ms / 1000.0)
        self.fft_length = 2 ** math.ceil(math.log2(self.frame_length)) * (2 if self.fft_overdrive else 1)
        self.window = hann_window(self.frame_length).astype(np.float32)
        self.mel_filters = mel_filter_bank(
            self.fft_length // 2 + 1, self.feature_size, self.min_frequency, self.max_frequency, self.sampling_rate
        )

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Gemma4AudioFeatureExtractor:
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in cfg.items() if k in names and v is not None}
        if cfg.get("dither"):
            raise ValueError("dither > 0 adds random noise to the audio; vlm's feature extractor does not (set 0)")
        for key in ("per_bin_mean", "per_bin_stddev"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        return cls(**kwargs)

    def _log_mel(self, waveform: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.input_scale_factor != 1.0:
            waveform = waveform * self.input_scale_factor
        # Half a window of silence first: the first frame is centred on the first sample.
        lead = self.frame_length // 2
        waveform = np.pad(waveform, (lead, 0))
        valid = np.pad(valid, (lead, 0))
        windows = frames(waveform, self.frame_length + 1, self.hop_length)
        if self.preemphasis > 0.0:
            if self.preemphasis_htk_flavor:
                first = windows[:, :1] * (1.0 - self.preemphasis)
                windows = np.concatenate([first, windows[:, 1:-1] - self.preemphasis * windows[:, :-2]], axis=-1)
            else:
                windows = windows[:, 1:] - self.preemphasis * windows[:, :-1]
        else:
            windows = windows[:, :-1]
        spectrum = np.abs(np.fft.rfft(windows * self.window, n=self.fft_length, axis=-1))
        log_mel = np.log(spectrum @ self.mel_filters + np.float64(self.mel_floor))
        if self.per_bin_mean is not None:
            log_mel = log_mel - np.asarray(self.per_bin_mean)
        if self.per_bin_stddev is not None:
            log_mel = log_mel / np.asarray(self.per_bin_stddev)
        # A frame counts only when the last sample of its window is real audio.
        ends = np.arange(len(log_mel)) * self.hop_length + self.frame_length
        return log_mel.astype(np.float32), valid[ends].astype(bool)

    def __call__(self, waveforms: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        if not waveforms:
            raise ValueError("no audio given")
        step = self.pad_to_multiple_of
        # As transformers: the cut is at max_length rounded up to a multiple of the padding step.
        limit = -(-self.max_length // step) * step if step else self.max_length
        clips = [np.asarray(w, dtype=np.float32).reshape(-1)[:limit] for w in waveforms]
        longest = max(len(c) for c in clips)
        padded_length = -(-longest // step) * step if step else longest
        features, masks = [], []
        for clip in clips:
            pad = padded_length - len(clip)
            signal = np.pad(clip, (0, pad), constant_values=self.padding_value)
            valid = np.pad(np.ones(len(clip), dtype=np.int32), (0, pad))
            log_mel, mask = self._log_mel(signal, valid)
            features.append(log_mel * mask[:, None] if self.zeroes_padding else log_mel)
            masks.append(mask)
        return {"input_features": np.stack(features), "input_features_mask": np.stack(masks)}

    def expand_prompt(self, prompt: str, audio_token: str, outputs: dict[str, np.ndarray]) -> str:
        """Each audio slot becomes the clip's soft tokens between its begin and end markers."""
        counts = audio_token_counts(outputs["input_features_mask"])
        return expand_slots(prompt, audio_token, [f"{BOA}{audio_token * n}{EOA}" for n in counts])
