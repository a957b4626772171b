"""Reading audio for models that hear: a file (or its bytes) or samples in memory, as float32 mono at the rate
the model's feature extractor wants.

A clip may also be an http(s) URL (fetched within ``MAX_AUDIO_BYTES``). Files are decoded with soundfile (libsndfile: WAV, FLAC, OGG/Vorbis, Opus, MP3, ... in its wheel), and with PyAV
(FFmpeg's decoders, already the video reader) for anything else (m4a/AAC, webm, a video's sound track).
Several channels are averaged into one; another sampling rate is converted with soxr (its "high quality"
setting). Every failure is one :class:`AudioLoadError` line naming the source.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

__all__ = ["Audio", "AudioLoadError", "AudioSource", "audio_duration", "load_audio", "to_mono", "resample"]


MAX_AUDIO_BYTES = 64 * 1024 * 1024
"""Largest clip fetched from a URL (an hour of 128 kbit/s MP3 is 58 MB)."""
MIN_RATE, MAX_RATE = 1_000, 768_000
"""Sampling rates taken (telephone audio is 8 kHz, studio masters up to 768 kHz): a clip claiming 3 Hz would be
stretched a thousandfold, one at a terahertz would vanish."""


class AudioLoadError(ValueError):
    """An audio source could not be turned into samples; the message names the source."""


@dataclass(frozen=True)
class Audio:
    """Samples in memory: (samples,) mono or (samples, channels), at ``sampling_rate`` Hz."""

    samples: np.ndarray
    sampling_rate: int


AudioSource = Union[str, Path, bytes, bytearray, memoryview, Audio, np.ndarray]  # noqa: UP007
"""A path or an http(s) URL, a file's bytes, an :class:`Audio`, or a numpy array already at the model's rate."""


def _describe(source: object) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(source)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(samples,) or (samples, channels) -> (samples,) float32, the channels averaged."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        return samples.mean(axis=1, dtype=np.float32)
    if samples.ndim != 1:
        raise AudioLoadError(f"audio samples must be (samples,) or (samples, channels), got shape {samples.shape}")
    return samples


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono float32 samples from ``rate`` to ``target`` Hz (soxr, high quality); unchanged when equal."""
    if rate == target:
        return samples
    import soxr

    try:
        return soxr.resample(samples, rate, target, quality="HQ").astype(np.float32, copy=False)
    except (ValueError, RuntimeError, OverflowError) as exc:  # a rate libsoxr cannot convert from
        raise AudioLoadError(f"cannot resample audio from {rate} Hz to {target} Hz: {exc}") from None


def _read_with_soundfile(data: io.BytesIO | Path) -> tuple[np.ndarray, int]:
    import soundfile

    samples, rate = soundfile.read(data, dtype="float32", always_2d=True)
    return samples, int(rate)


def _read_with_pyav(data: io.BytesIO | Path) -> tuple[np.ndarray, int]:
    import av

    with av.open(data if isinstance(data, io.BytesIO) else str(data)) as container:
        if not container.streams.audio:
            raise AudioLoadError("it has no audio stream")
        stream = container.streams.audio[0]
        converter = av.AudioResampler(format="fltp")  # float planar, the stream's own layout and rate
        chunks = [
            converted.to_ndarray() for frame in container.decode(stream) for converted in converter.resample(frame)
        ]
        chunks += [converted.to_ndarray() for converted in converter.resample(None)]
        rate = stream.rate or stream.codec_context.sample_rate
    if not chunks:
        return np.zeros((0, 1), np.float32), int(rate)
    return np.concatenate(chunks, axis=1).T, int(rate)


def _decode(data: io.BytesIO | Path, name: str) -> tuple[np.ndarray, int]:
    problems = []
    for reader in (_read_with_soundfile, _read_with_pyav):
        if isinstance(data, io.BytesIO):
            data.seek(0)
        try:
            return reader(data)
        except AudioLoadError as exc:
            problems.append(str(exc))
        except Exception as exc:  # libsndfile and FFmpeg raise many kinds for undecodable input
            problems.append(f"{type(exc).__name__}: {exc}".strip())
    raise AudioLoadError(f"cannot decode audio {name}: {problems[-1]}")


def audio_duration(data: bytes) -> float | None:
    """Seconds of audio an encoded clip says it holds, from its header (nothing is decoded); None where the
    container does not say. Lets a server refuse a clip that is too long before decoding it."""
    import soundfile

    try:
        return float(soundfile.info(io.BytesIO(data)).duration)
    except Exception:  # not a libsndfile format: ask FFmpeg's demuxer
        pass
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            return None if container.duration is None else container.duration / 1_000_000
    except Exception:  # undecodable: load_audio gives the one-line reason
        return None


def load_audio(source: AudioSource, sampling_rate: int) -> np.ndarray:
    """Float32 mono samples of ``source`` at ``sampling_rate`` Hz. A numpy array is taken as already at that
    rate; pass an :class:`Audio` to say another."""
    if isinstance(source, np.ndarray):
        samples, rate, name = source, sampling_rate, f"<array {source.shape}>"
    elif isinstance(source, Audio):
        samples, rate, name = source.samples, source.sampling_rate, f"<audio at {source.sampling_rate} Hz>"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name = _describe(source)
        samples, rate = _decode(io.BytesIO(bytes(source)), name)
    elif isinstance(source, str) and source[:8].lower().startswith(("http://", "https://")):
        from .processors.image import read_url

        name = source if len(source) <= 200 else source[:180] + "..."
        data, _ = read_url(source, "audio", MAX_AUDIO_BYTES, AudioLoadError)
        samples, rate = _decode(io.BytesIO(data), name)
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        name = str(path)
        if not path.exists():
            raise AudioLoadError(f"audio file not found: {path}")
        if not path.is_file():
            raise AudioLoadError(f"audio path is not a file: {path}")
        samples, rate = _decode(path, name)
    else:
        raise AudioLoadError(f"unsupported audio source type {type(source).__name__}")
    if rate <= 0:
        raise AudioLoadError(f"audio {name} has no valid sampling rate ({rate})")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioLoadError(
            f"audio {name} is at {rate} Hz, outside the rates vlm resamples ({MIN_RATE}-{MAX_RATE} Hz)"
        )
    mono = to_mono(samples)
    if mono.size == 0:
        raise AudioLoadError(f"audio {name} holds no samples")
    if not np.isfinite(mono).all():
        raise AudioLoadError(f"audio {name} holds NaN or infinite samples")
    return resample(mono, rate, sampling_rate)
