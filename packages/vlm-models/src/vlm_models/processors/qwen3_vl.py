"""Qwen3-VL's video processor in numpy, output-identical to transformers' Qwen3VLVideoProcessor, and the
Qwen3-VL processor's prompt expansion for videos (a timestamp before each temporal patch's run of tokens).

Images go through Qwen2VLImageProcessor (processors/qwen2_vl.py) with Qwen3-VL's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..video import VideoSampling
from .frames import ProcessedVideos
from .qwen2_vl import MAX_ASPECT_RATIO, Qwen2VLVideoProcessor, fit_pixel_budget

__all__ = ["Qwen3VLVideoProcessor", "video_smart_resize"]


def video_smart_resize(
    num_frames: int, height: int, width: int, temporal_factor: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Frame size for a clip: sides multiples of ``factor``, the clip's pixels (frames x area) near
    ``[min_pixels, max_pixels]``, aspect kept; sides below ``factor`` are scaled up first. transformers'
    arithmetic, step for step."""
    if num_frames < temporal_factor:
        raise ValueError(
            f"a video needs at least {temporal_factor} frames (the temporal patch), got {num_frames};"
            " sample more frames"
        )
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width)}"
        )
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    return fit_pixel_budget(height, width, factor, min_pixels, max_pixels, frames=num_frames, padded_frames=t_bar)


@dataclass
class Qwen3VLVideoProcessor(Qwen2VLVideoProcessor):
    """Videos -> ``pixel_values_videos`` (patches, C*T*P*P) float32 and ``video_grid_thw`` (videos, 3) int64.
    Qwen2-VL's settings and switches, with Qwen3-VL's defaults, frame sampling, clip-wide pixel budget and
    timestamped prompt."""

    patch_size: int = 16
    min_pixels: int = 128 * 32 * 32
    max_pixels: int = 32 * 32 * 768
    """For the whole clip (frames x area), unlike Qwen2-VL's per-frame budget."""
    image_mean: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    image_std: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    do_sample_frames: bool = True
    sampling: VideoSampling = field(default=VideoSampling(fps=2.0))
    max_video_tokens: int = 768

    def frame_indices(self, total_frames: int, video_fps: float) -> np.ndarray:
        """The source frames taken: evenly spread, ``fps`` per second (at least ``min_frames``, at most
        ``max_frames`` and the frames there are) or exactly ``num_frames``."""
        if not self.do_sample_frames:
            return np.arange(total_frames)
        count, fps = self.sampling.num_frames, self.sampling.fps
        if count is None and fps is not None:
            count = int(total_frames / video_fps * fps)
            count = min(max(count, self.min_frames), self.max_frames, total_frames)
        if count is None:
            count = min(max(total_frames, self.min_frames), self.max_frames)
        return np.linspace(0, total_frames - 1, count).round().astype(int)

    def frame_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            per_frame = max(
                min(self.max_video_tokens * self.factor**2, self.max_pixels // num_frames), int(self.min_pixels * 1.05)
            )
            max_pixels = per_frame * num_frames
        return video_smart_resize(
            num_frames, height, width, self.temporal_patch_size, self.factor, self.min_pixels, max_pixels
        )

    def timestamps(self, indices: np.ndarray, video_fps: float) -> list[float]:
        """Seconds at each temporal patch: the mean time of its first and last frame (the last frame repeats to
        fill the final patch)."""
        t = self.temporal_patch_size
        padded = [*indices.tolist(), *[int(indices[-1])] * (-len(indices) % t)]
        times = [i / video_fps for i in padded]
        return [(times[i] + times[i + t - 1]) / 2 for i in range(0, len(times), t)]

    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"

    def expand_prompt(self, prompt: str, video_token: str, processed: ProcessedVideos) -> str:
        """Each video slot becomes, per temporal patch, ``<t seconds>``, the vision start marker, the frame's
        tokens and the end marker (Qwen3VLProcessor.replace_video_token)."""
        pieces = prompt.split(video_token)
        grids = processed.arrays["video_grid_thw"].tolist()
        if len(pieces) - 1 != len(grids):
            raise ValueError(f"the prompt has {len(pieces) - 1} video slot(s) for {len(grids)} video(s)")
        out = [pieces[0]]
        for (frames, h, w), stamps, piece in zip(grids, processed.timestamps, pieces[1:]):
            tokens = video_token * (h * w // self.merge_size**2)
            out.extend(f"<{stamps[i]:.1f} seconds>{self.vision_start}{tokens}{self.vision_end}" for i in range(frames))
            out.append(piece)
        return "".join(out)
