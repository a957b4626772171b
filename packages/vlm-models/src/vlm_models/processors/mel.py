"""Spectrogram primitives for audio feature extractors, in numpy, equal to transformers' ``audio_utils``
(float64 filters, numpy's Hann window), and the Whisper-style log-mel feature extractor several families share
(Whisper's encoder is Qwen2-Audio's, Qwen2.5-Omni's and Voxtral's audio tower)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["WhisperFeatureExtractor", "hann_window", "mel_filter_bank", "frames"]


def hann_window(length: int, periodic: bool = True) -> np.ndarray:
    """The Hann window of ``length`` samples; periodic (the usual STFT window) unless told otherwise."""
    window = np.hanning(length + 1 if periodic else length)
    return window[:-1] if periodic else window


def _hz_to_mel_htk(freq: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


# Slaney's scale (librosa's default): linear up to 1 kHz (200/3 Hz per mel), logarithmic above.
_SLANEY_BREAK_HZ, _SLANEY_BREAK_MEL, _SLANEY_LOGSTEP = 1000.0, 15.0, 27.0 / np.log(6.4)


def _hz_to_mel_slaney(freq: np.ndarray | float) -> np.ndarray:
    freq = np.asarray(freq, dtype=np.float64)
    logarithmic = _SLANEY_BREAK_MEL + np.log(np.maximum(freq, 1e-12) / _SLANEY_BREAK_HZ) * _SLANEY_LOGSTEP
    return np.where(freq >= _SLANEY_BREAK_HZ, logarithmic, 3.0 * freq / 200.0)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    logarithmic = _SLANEY_BREAK_HZ * np.exp((mel - _SLANEY_BREAK_MEL) / _SLANEY_LOGSTEP)
    return np.where(mel >= _SLANEY_BREAK_MEL, logarithmic, 200.0 * mel / 3.0)


_MEL_SCALES = {"htk": (_hz_to_mel_htk, _mel_to_hz_htk), "slaney": (_hz_to_mel_slaney, _mel_to_hz_slaney)}


def mel_filter_bank(
    num_frequency_bins: int,
    num_mel_filters: int,
    min_frequency: float,
    max_frequency: float,
    sampling_rate: int,
    mel_scale: str = "htk",
    slaney_norm: bool = False,
) -> np.ndarray:
    """(num_frequency_bins, num_mel_filters) triangular filters: each rises from one mel-spaced centre to the
    next and falls to the one after, over FFT bins spaced evenly up to Nyquist. ``mel_scale`` "htk" or "slaney";
    ``slaney_norm`` scales each filter to unit area (2 / its width in Hz), as librosa's ``norm="slaney"``."""
    if min_frequency > max_frequency:
        raise ValueError(f"min_frequency {min_frequency} is above max_frequency {max_frequency}")
    to_mel, to_hz = _MEL_SCALES[mel_scale]
    mels = np.linspace(to_mel(min_frequency), to_mel(max_frequency), num_mel_filters + 2)
    centres = to_hz(mels)
    bins = np.linspace(0, sampling_rate // 2, num_frequency_bins)
    widths = np.diff(centres)
    slopes = centres[None, :] - bins[:, None]
    falling = -slopes[:, :-2] / widths[:-1]
    rising = slopes[:, 2:] / widths[1:]
    filters = np.maximum(np.zeros(1), np.minimum(falling, rising))
    if slaney_norm:
        filters = filters * (2.0 / (centres[2:] - centres[:-2]))[None, :]
    return filters


def frames(signal: np.ndarray, size: int, step: int) -> np.ndarray:
    """(n, size) overlapping windows of a 1-D signal, ``step`` samples apart (a view: no copy)."""
    count = (len(signal) - size) // step + 1
    if count <= 0:
        return np.zeros((0, size), dtype=signal.dtype)
    return np.lib.stride_tricks.as_strided(signal, (count, size), (signal.strides[0] * step, signal.strides[0]))


@dataclass
class WhisperFeatureExtractor:
    """16 kHz mono waveforms -> ``input_features`` (clips, mel bins, frames) float32 and ``attention_mask``
    (clips, frames) int32, as transformers' WhisperFeatureExtractor computes them: each clip cut to
    ``chunk_length`` seconds and padded with silence to it (``padding="max_length"``), 25 ms Hann windows every
    10 ms centred on reflect-padded audio, power spectrum, Slaney mel filters, log10, floored 8 below the clip's
    peak and scaled to about [-1, 1]; the mask marks the frames that start inside the real audio."""

    feature_size: int = 80
    sampling_rate: int = 16_000
    hop_length: int = 160
    chunk_length: int = 30
    n_fft: int = 400
    padding_value: float = 0.0
    pad_to_longest: bool = False
    """Pad the clips of a call to the longest of them and cut none (``padding=True, truncation=False``), in
    place of cutting and padding each to ``chunk_length``."""

    def __post_init__(self) -> None:
        self.n_samples = self.chunk_length * self.sampling_rate
        self.nb_max_frames = self.n_samples // self.hop_length
        self.window = hann_window(self.n_fft)
        self.mel_filters = mel_filter_bank(
            1 + self.n_fft // 2, self.feature_size, 0.0, 8000.0, self.sampling_rate, "slaney", slaney_norm=True
        )

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> WhisperFeatureExtractor:
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in cfg.items() if k in names and v is not None}
        if cfg.get("dither"):
            raise ValueError("dither > 0 adds random noise to the audio; vlm's feature extractor does not (set 0)")
        # No do_normalize check: transformers' extractor reads it only as a call argument, never from the config
        # (Qwen2.5-Omni's one preprocessor_config.json holds the image processor's do_normalize beside it).
        return cls(**kwargs)

    def log_mel(self, waveform: np.ndarray) -> np.ndarray:
        """(mel bins, frames) features of one padded clip."""
        half = self.n_fft // 2
        padded = np.pad(waveform.astype(np.float64), (half, half), mode="reflect")
        windows = frames(padded, self.n_fft, self.hop_length)[:-1]  # the last frame is dropped, as Whisper does
        power = np.abs(np.fft.rfft(windows * self.window, axis=-1)) ** 2
        mel = np.log10(np.maximum(power @ self.mel_filters, 1e-10))
        mel = np.maximum(mel, mel.max() - 8.0)
        return ((mel + 4.0) / 4.0).T.astype(np.float32)

    def __call__(self, waveforms: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        if not waveforms:
            raise ValueError("no audio given")
        features, masks = [], []
        clips = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waveforms]
        samples = max(len(c) for c in clips) if self.pad_to_longest else self.n_samples
        for clip in clips:
            clip = clip[:samples]
            signal = np.pad(clip, (0, samples - len(clip)), constant_values=self.padding_value)
            features.append(self.log_mel(signal))
            starts = np.arange(samples // self.hop_length) * self.hop_length
            masks.append((starts < len(clip)).astype(np.int32))
        return {"input_features": np.stack(features), "attention_mask": np.stack(masks)}
