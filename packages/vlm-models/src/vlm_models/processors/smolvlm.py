"""SmolVLM 2's video processor in numpy, output-identical to transformers' SmolVLMVideoProcessor, and the
SmolVLM processor's prompt for a video: an introduction naming the frame count and duration, then each frame as
one global image view after a ``Frame from MM:SS:`` line.

Images go through Idefics3ImageProcessor (processors/idefics3.py).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from ..video import Video, VideoSampling
from .frames import FrameSettings, ProcessedVideos, resize_frames
from .idefics3 import image_prompt, scaled_to_longest_edge
from .image import image_settings

__all__ = ["SmolVLMVideoProcessor", "number_words"]

MAX_SIDE = 4096
"""transformers caps the longest edge of the first resize at 4k."""

_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000 as num2words writes them ("forty-two", "one hundred and five",
    "two thousand, three hundred"): how SmolVLM's prompt names the frame count."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words takes 0 <= n < 1000000, got {n}")
    if n < 20:
        return _UNITS[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _UNITS[n % 10])
    if n < 1000:
        head = f"{_UNITS[n // 100]} hundred"
        return head if n % 100 == 0 else f"{head} and {number_words(n % 100)}"
    head, rest = f"{number_words(n // 1000)} thousand", n % 1000
    if rest == 0:
        return head
    return f"{head}{', ' if rest >= 100 else ' and '}{number_words(rest)}"


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """The first resize of each frame: the longest side to ``longest`` (at most 4096), the other in proportion
    and rounded up to even (transformers' arithmetic)."""
    return scaled_to_longest_edge(height, width, min(MAX_SIDE, longest))


@dataclass
class SmolVLMVideoProcessor(FrameSettings):
    """Videos -> ``pixel_values`` (1, frames, C, side, side) float32 and ``pixel_attention_mask`` (1, frames,
    side, side): each frame resized to the longest edge, then to the square tile the vision tower takes."""

    longest_edge: int = 4 * 364
    tile: int = 364
    image_seq_length: int = 169
    resample: int = int(Image.Resampling.LANCZOS)
    do_sample_frames: bool = False
    """transformers' default (kept for old checkpoints): every frame, unless sampling is asked for."""
    fps: float | None = None
    max_frames: int | None = None
    skip_secs: float = 1.0

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> SmolVLMVideoProcessor:
        """From a video_preprocessor_config.json dict (or, as transformers falls back to it, the image one, with
        the processor's ``image_seq_len``)."""
        kwargs: dict[str, Any] = image_settings(cfg, bool_keys=("do_sample_frames",))
        sampling = cfg.get("video_sampling") if isinstance(cfg.get("video_sampling"), dict) else {}
        size = cfg.get("size") or sampling.get("video_size")
        for key, value in (("longest_edge", size), ("tile", cfg.get("max_image_size"))):
            if value is None:
                continue
            if not isinstance(value, dict) or "longest_edge" not in value:
                raise ValueError(f"video processor config {key}={value!r} needs a longest_edge")
            kwargs[key] = int(value["longest_edge"])
        if cfg.get("image_seq_len") is not None:
            kwargs["image_seq_length"] = int(cfg["image_seq_len"])
        fps = sampling.get("fps", cfg.get("fps"))
        frames = sampling.get("max_frames", cfg.get("num_frames"))
        kwargs.update(fps=None if fps is None else float(fps), max_frames=None if frames is None else int(frames))
        return cls(**kwargs)

    def with_sampling(self, sampling: VideoSampling | None) -> SmolVLMVideoProcessor:
        """Sampling switched on with the settings ``sampling`` sets in place of this processor's (its
        ``num_frames`` and ``max_frames`` both cap the frame count, as transformers' ``num_frames`` does)."""
        if sampling is None or (sampling.fps, sampling.num_frames, sampling.max_frames) == (None, None, None):
            return self
        frames = sampling.num_frames if sampling.num_frames is not None else sampling.max_frames
        return replace(
            self,
            do_sample_frames=True,
            fps=sampling.fps if sampling.fps is not None else self.fps,
            max_frames=frames if frames is not None else self.max_frames,
        )

    def frame_indices(self, total_frames: int, video_fps: float) -> np.ndarray:
        """Every frame, or (sampling) ``fps`` per second up to ``max_frames``, evenly spread, skipping a second
        at each end of a video long enough for it."""
        if not self.do_sample_frames:
            return np.arange(total_frames)
        if self.fps is None or self.max_frames is None:
            raise ValueError("sampling SmolVLM video frames needs both fps and a frame count")
        duration = total_frames / video_fps
        count = max(min(round(self.fps * duration), self.max_frames), 1)
        start, end = 0, total_frames - 1
        if self.skip_secs > 0 and duration - 2 * self.skip_secs > self.max_frames * self.fps:
            start, end = int(self.skip_secs * video_fps), int(total_frames - self.skip_secs * video_fps)
        start, end = max(0, start), min(end, total_frames - 1)
        if start >= end:
            start, end = 0, total_frames - 1
        return np.unique(np.linspace(start, end, count, dtype=int))

    def __call__(self, videos: Sequence[Video]) -> ProcessedVideos:
        if not videos:
            raise ValueError("no videos given")
        clips, timestamps = [], []
        for video in videos:
            indices = self.frame_indices(video.total_frames, video.fps)
            clips.append(self._process_one(video.take(indices)))
            timestamps.append([i / video.fps for i in indices.tolist()])
        # Zero padding (frames, then bottom/right) to the largest clip, marked in the pixel mask.
        count = max(len(c) for c in clips)
        height, width = max(c.shape[2] for c in clips), max(c.shape[3] for c in clips)
        pixels = np.zeros((len(clips), count, clips[0].shape[1], height, width), dtype=np.float32)
        mask = np.zeros((len(clips), count, height, width), dtype=np.int64)
        for i, clip in enumerate(clips):
            pixels[i, : len(clip), :, : clip.shape[2], : clip.shape[3]] = clip
            mask[i, :, : clip.shape[2], : clip.shape[3]] = 1  # padding frames too, as transformers marks them
        arrays = {"pixel_values": pixels, "pixel_attention_mask": mask}
        return ProcessedVideos(arrays, timestamps, [v.total_frames / v.fps for v in videos])

    def _process_one(self, frames: np.ndarray) -> np.ndarray:
        if self.do_resize:
            frames = resize_frames(frames, longest_edge_size(*frames.shape[1:3], self.longest_edge), self.resample)
            frames = resize_frames(frames, (self.tile, self.tile), self.resample)
        pixels = self.normalize(frames)
        return pixels.transpose(0, 3, 1, 2)

    def expand_prompt(
        self, prompt: str, video_token: str, processed: ProcessedVideos, image_token: str = "<image>"
    ) -> str:
        """Each video slot becomes the introduction, each frame's ``Frame from MM:SS:`` line and global view,
        and a blank line (SmolVLMProcessor.replace_video_token)."""
        pieces = prompt.split(video_token)
        if len(pieces) - 1 != len(processed.timestamps):
            raise ValueError(f"the prompt has {len(pieces) - 1} video slot(s) for {len(processed.timestamps)} video(s)")
        frame = image_prompt(0, 0, self.image_seq_length, image_token)
        out = [pieces[0]]
        for stamps, duration, piece in zip(processed.timestamps, processed.durations, pieces[1:]):
            length = datetime.timedelta(seconds=int(duration))
            out.append(
                f"You are provided the following series of {number_words(len(stamps))} frames from a {length}"
                " [H:MM:SS] video.\n"
            )
            out.extend(f"\nFrame from {int(t // 60):02d}:{int(t % 60):02d}:{frame}" for t in stamps)
            out.append("\n\n")
            out.append(piece)
        return "".join(out)
