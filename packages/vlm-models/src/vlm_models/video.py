"""Reading videos: a file (through PyAV, FFmpeg's libraries), a folder of frame images, or a list of image paths.

A video is read once into the frames a processor asks for (``select`` picks source frame indices from the
frame count and rate), so a long clip never sits in memory whole. Every failure is a :class:`VideoLoadError`
with a one-line message naming the source.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from tqdm import tqdm

from vlm_runtime.field_types import check_field_types

from .processors.image import ImageLoadError, load_image

__all__ = ["FRAME_SUFFIXES", "Video", "VideoLoadError", "VideoSampling", "VideoSource", "read_video"]

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
"""Files of a frame folder that are frames (taken in name order)."""

LONG_VIDEO_FRAMES = 1000
"""Decoding at least this many frames shows a progress bar."""

FrameSelection = Callable[[int, float], Sequence[int]]
"""(source frame count, source fps) -> the indices of the frames to keep."""


@dataclass(frozen=True)
class VideoSampling:
    """How many frames to take from each video; ``None`` keeps the processor's setting."""

    fps: float | None = None
    """Frames taken per second of video."""
    num_frames: int | None = None
    """Exactly this many frames, evenly spread (then ``fps`` is not used)."""
    max_frames: int | None = None
    """At most this many frames when sampling by ``fps``."""
    source_fps: float | None = None
    """The rate at which a video given as frame images was captured (a file carries its own)."""
    with_audio: bool = False
    """Hear each video's sound track too, interleaved with its frames by time (families that do: Qwen2.5-Omni).
    A file's track is read with PyAV; a :class:`Video` brings its own ``audio``."""

    def __post_init__(self) -> None:
        check_field_types(self, "video_")
        for name in ("fps", "source_fps"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"video {name.replace('_', ' ')} must be positive, got {value}")
        for name in ("num_frames", "max_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"video {name.replace('_', ' ')} must be at least 1, got {value}")


class VideoLoadError(ValueError):
    """A video source could not be read; the message names the source."""


@dataclass(frozen=True)
class Video:
    """Frames taken from a source video, with what is needed to place them in time."""

    frames: np.ndarray
    """(frames, height, width, 3) uint8 RGB: the frames held."""
    fps: float
    """Frame rate of the source."""
    total_frames: int
    """Frames in the source."""
    frame_indices: np.ndarray
    """Source index of each held frame, increasing."""
    audio: Any = None
    """The sound track (an ``audio.AudioSource``: samples, an ``Audio``, a file), where the caller has it."""

    @classmethod
    def from_frames(cls, frames: np.ndarray, fps: float) -> Video:
        """A video holding all of ``frames`` ((T, H, W, 3) uint8), captured at ``fps``."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise VideoLoadError(
                f"video frames must be a (frames, height, width, 3) uint8 array, got {frames.dtype} {frames.shape}"
            )
        if len(frames) == 0:
            raise VideoLoadError("a video needs at least one frame")
        _check_fps(fps, "video")
        return cls(frames, float(fps), len(frames), np.arange(len(frames)))

    def take(self, indices: Sequence[int]) -> np.ndarray:
        """The frames at these source indices (each must be held)."""
        wanted = np.asarray(indices, dtype=np.int64)
        positions = np.searchsorted(self.frame_indices, wanted)
        held = (positions < len(self.frame_indices)) & (
            self.frame_indices[np.minimum(positions, len(self.frame_indices) - 1)] == wanted
        )
        if not held.all():
            raise ValueError(f"frames {wanted[~held].tolist()} of the source video were not read")
        return self.frames[positions]


VideoSource = Union[Video, str, Path, bytes, Sequence[str | Path]]  # noqa: UP007


def read_video(source: VideoSource, *, fps: float | None = None, select: FrameSelection | None = None) -> Video:
    """The frames of ``source`` that ``select`` picks (all frames without it).

    ``source`` is a video file, its bytes, a folder of frame images, a list of image paths, or a :class:`Video`
    (returned as is). A file carries its own frame rate; frames given as images need ``fps``, the rate they were captured
    at.
    """
    if isinstance(source, Video):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.exists():
            raise VideoLoadError(f"video not found: {path}")
        if path.is_dir():
            frames = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file())
            if not frames:
                raise VideoLoadError(f"video folder {path} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
            return _read_frames(frames, fps, select, f"video folder {path}")
        return _read_file(str(path), str(path), select)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise VideoLoadError("the video data is empty")
        return _read_file(io.BytesIO(bytes(source)), f"<{len(source)} bytes of video>", select)
    if isinstance(source, Sequence):
        if not source:
            raise VideoLoadError("a video given as frames needs at least one frame")
        return _read_frames([Path(p) for p in source], fps, select, f"the {len(source)} video frames")
    raise VideoLoadError(f"unsupported video source type {type(source).__name__}")


def _check_fps(fps: float | None, name: str) -> None:
    if fps is None:
        raise VideoLoadError(
            f"{name} is given as frames: give the rate they were captured at"
            " (VideoSampling.source_fps; --video-source-fps on the command line)"
        )
    if not np.isfinite(fps) or fps <= 0:
        raise VideoLoadError(f"{name}: frame rate must be positive, got {fps}")


def _selected(select: FrameSelection | None, total: int, fps: float, name: str) -> np.ndarray:
    if select is None:
        return np.arange(total)
    indices = np.asarray(select(total, fps), dtype=np.int64).reshape(-1)
    if len(indices) == 0 or indices.min() < 0 or indices.max() >= total:
        raise VideoLoadError(f"{name}: frame selection {indices.tolist()} is outside its {total} frames")
    return indices


def _read_frames(paths: list[Path], fps: float | None, select: FrameSelection | None, name: str) -> Video:
    _check_fps(fps, name)
    indices = np.unique(_selected(select, len(paths), float(fps), name))
    frames = []
    for i in indices:
        try:
            frames.append(np.asarray(load_image(paths[i]), dtype=np.uint8))
        except ImageLoadError as e:
            raise VideoLoadError(f"{name}: {e}") from None
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise VideoLoadError(f"{name}: frames differ in size ({', '.join(f'{w}x{h}' for h, w, _ in sorted(sizes))})")
    return Video(np.stack(frames), float(fps), len(paths), indices)


def _read_file(file: str | io.BytesIO, path: str, select: FrameSelection | None) -> Video:
    import av  # FFmpeg's libraries: loaded only when a video is read

    try:
        container = av.open(file)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoLoadError(f"cannot read video {path}: {_reason(e)}") from None
    with container:
        if not container.streams.video:
            raise VideoLoadError(f"{path} holds no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or float(rate) <= 0:
            raise VideoLoadError(f"video {path} has no frame rate")
        try:
            # The header's count where the container keeps one (as transformers' PyAV reader reads it), else the
            # packets: counting them decodes nothing.
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            if total == 0:
                raise VideoLoadError(f"video {path} has no frames")
            indices = np.unique(_selected(select, total, float(rate), f"video {path}"))
            container.seek(0)
            wanted, frames = set(indices.tolist()), []
            # Every frame up to the last wanted one is decoded: a progress bar where that takes a while.
            progress = tqdm(
                total=int(indices[-1]) + 1,
                desc="decoding video",
                unit="frame",
                leave=False,
                disable=indices[-1] < LONG_VIDEO_FRAMES,
            )
            with progress:
                for i, frame in enumerate(container.decode(stream)):
                    if i > indices[-1]:
                        break
                    if i in wanted:
                        frames.append(frame.to_ndarray(format="rgb24"))
                    progress.update()
        except av.FFmpegError as e:
            raise VideoLoadError(f"cannot decode video {path}: {_reason(e)}") from None
    if not frames:
        raise VideoLoadError(f"video {path} has no decodable frames")
    if len(frames) < len(indices):  # the header promised more frames than the stream holds
        indices = indices[: len(frames)]
    return Video(np.stack(frames), float(rate), int(total), indices)


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__
