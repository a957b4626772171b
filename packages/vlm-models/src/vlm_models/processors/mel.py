"""Spectrogram primitives for audio feature extractors, in numpy, equal to transformers' ``audio_utils``
(float64 filters, numpy's Hann window)."""

from __future__ import annotations

import numpy as np

__all__ = ["hann_window", "mel_filter_bank", "frames"]


def hann_window(length: int, periodic: bool = True) -> np.ndarray:
    """The Hann window of ``length`` samples; periodic (the usual STFT window) unless told otherwise."""
    window = np.hanning(length + 1 if periodic else length)
    return window[:-1] if periodic else window


def _hz_to_mel_htk(freq: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filter_bank(
    num_frequency_bins: int, num_mel_filters: int, min_frequency: float, max_frequency: float, sampling_rate: int
) -> np.ndarray:
    """(num_frequency_bins, num_mel_filters) triangular filters, HTK mel scale, unnormalised: each filter rises
    from one mel-spaced centre to the next and falls to the one after, over FFT bins spaced evenly up to
    Nyquist."""
    if min_frequency > max_frequency:
        raise ValueError(f"min_frequency {min_frequency} is above max_frequency {max_frequency}")
    mels = np.linspace(_hz_to_mel_htk(min_frequency), _hz_to_mel_htk(max_frequency), num_mel_filters + 2)
    centres = _mel_to_hz_htk(mels)
    bins = np.linspace(0, sampling_rate // 2, num_frequency_bins)
    widths = np.diff(centres)
    slopes = centres[None, :] - bins[:, None]
    falling = -slopes[:, :-2] / widths[:-1]
    rising = slopes[:, 2:] / widths[1:]
    return np.maximum(np.zeros(1), np.minimum(falling, rising))


def frames(signal: np.ndarray, size: int, step: int) -> np.ndarray:
    """(n, size) overlapping windows of a 1-D signal, ``step`` samples apart (a view: no copy)."""
    count = (len(signal) - size) // step + 1
    if count <= 0:
        return np.zeros((0, size), dtype=signal.dtype)
    return np.lib.stride_tricks.as_strided(signal, (count, size), (signal.strides[0] * step, signal.strides[0]))
