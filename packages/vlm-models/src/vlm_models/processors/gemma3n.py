"""Gemma 3n's image processor and audio feature extractor in numpy, output-identical to transformers'
(``SiglipImageProcessor`` as the checkpoints configure it, ``Gemma3nAudioFeatureExtractor``).

Images are resized (bilinear) to one fixed size (768 x 768 published) and rescaled to [0, 1]; each takes
``image_seq_length`` soft tokens. Audio (16 kHz mono) becomes log-mel frames as Gemma 4's extractor computes
them but for Gemma 3n's settings (32 ms windows, pre-emphasis, 125-7600 Hz) and three differences: no half
window of leading silence, the log of the mel energy floored (not offset) by ``mel_floor``, and a frame counts
as valid when its first sample is real audio (the features of padding frames are kept). Each clip takes a fixed
``audio_seq_length`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from .gemma4 import Gemma4AudioFeatureExtractor, expand_slots
from .mel import frames
from .siglip import SiglipImageProcessor

__all__ = ["Gemma3nAudioFeatureExtractor", "Gemma3nImageProcessor"]

BOI, EOI = "<start_of_image>", "<end_of_image>"
BOA, EOA = "<start_of_audio>", "<end_of_audio>"


def _htk_filters(fft_length: int, n_mels: int, low: float, high: float, rate: int) -> np.ndarray:
    """(fft_length // 2 + 1, n_mels) triangular HTK-mel filters over float32 bin frequencies."""
    bins = np.arange(fft_length // 2 + 1, dtype=np.float32) * np.float32(rate / fft_length)
    mels = np.linspace(2595.0 * math.log10(1.0 + low / 700.0), 2595.0 * math.log10(1.0 + high / 700.0), n_mels + 2)
    centres = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    widths = centres[1:] - centres[:-1]
    slopes = centres[None, :] - bins[:, None]
    falling = -slopes[:, :-2] / widths[:-1]
    rising = slopes[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(falling, rising))


@dataclass
class Gemma3nImageProcessor(SiglipImageProcessor):
    height: int = 768
    width: int = 768
    resample: int = int(Image.Resampling.BILINEAR)
    do_normalize: bool = False

    def expand_prompt(self, prompt: str, image_token: str, outputs: dict[str, np.ndarray]) -> str:
        """Each image slot becomes its soft tokens between begin and end markers, framed by blank lines."""
        sequence = f"\n\n{BOI}{image_token * self.image_seq_length}{EOI}\n\n"
        return expand_slots(prompt, image_token, [sequence] * len(outputs["pixel_values"]))


@dataclass
class Gemma3nAudioFeatureExtractor(Gemma4AudioFeatureExtractor):
    """16 kHz mono waveforms -> ``input_features`` (clips, frames, 128) float32 log-mel and
    ``input_features_mask`` (clips, frames) bool, clips padded with silence to the longest (a multiple of
    ``pad_to_multiple_of`` samples) and cut at ``max_length``."""

    frame_length_ms: float = 32.0
    min_frequency: float = 125.0
    max_frequency: float = 7600.0
    preemphasis: float = 0.97
    fft_overdrive: bool = True
    mel_floor: float = 1e-5
    audio_seq_length: int = 188
    """Tokens per clip, whatever its length."""
    zeroes_padding: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        # transformers builds the window and the filters' bin frequencies in float32; a peaky spectrum's quiet
        # bins (its leakage) are sensitive to the window's last bits, so they are computed alike.
        n = np.arange(self.frame_length, dtype=np.float32)
        self.window = (0.5 * (1 - np.cos(2 * np.pi * n / self.frame_length))).astype(np.float32)
        self.mel_filters = _htk_filters(
            self.fft_length, self.feature_size, self.min_frequency, self.max_frequency, self.sampling_rate
        )

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Gemma3nAudioFeatureExtractor:
        cfg = dict(cfg)
        rate = float(cfg.get("sampling_rate") or 16_000)
        # transformers saves the window and hop in samples beside (or instead of) their lengths in ms.
        for samples, ms in (("frame_length", "frame_length_ms"), ("hop_length", "hop_length_ms")):
            if cfg.get(samples) and not cfg.get(ms):
                cfg[ms] = float(cfg[samples]) * 1000.0 / rate
        extractor = super().from_config(cfg)
        if cfg.get("fft_length") and int(cfg["fft_length"]) != extractor.fft_length:
            raise ValueError(f"fft_length {cfg['fft_length']} disagrees with the window and fft_overdrive settings")
        return extractor

    def _log_mel(self, waveform: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.input_scale_factor != 1.0:
            waveform = waveform * self.input_scale_factor
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
        log_mel = np.log(np.maximum(spectrum @ self.mel_filters, np.float64(self.mel_floor)))
        if self.per_bin_mean is not None:
            log_mel = log_mel - np.asarray(self.per_bin_mean)
        if self.per_bin_stddev is not None:
            log_mel = log_mel / np.asarray(self.per_bin_stddev)
        return log_mel.astype(np.float32), valid[:: self.hop_length][: len(log_mel)].astype(bool)

    def expand_prompt(self, prompt: str, audio_token: str, outputs: dict[str, np.ndarray]) -> str:
        """Each audio slot becomes ``audio_seq_length`` soft tokens between begin and end markers, framed by blank
        lines."""
        sequence = f"\n\n{BOA}{audio_token * self.audio_seq_length}{EOA}\n\n"
        return expand_slots(prompt, audio_token, [sequence] * len(outputs["input_features_mask"]))
