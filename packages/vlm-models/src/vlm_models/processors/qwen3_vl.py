"""Qwen3-VL's video processor in numpy, output-identical to transformers' Qwen3VLVideoProcessor, and the
Qwen3-VL processor's prompt expansion for videos (a timestamp before each temporal patch's run of tokens).

Images go through Qwen2VLImageProcessor (processors/qwen2_vl.py) with Qwen3-VL's settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from ..video import Video, VideoSampling
from .frames import FrameSettings, ProcessedVideos, resize_frames
from .image import image_settings
from .qwen2_vl import MAX_ASPECT_RATIO, fit_pixel_budget, patchify

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
class Qwen3VLVideoProcessor(FrameSettings):
    """Videos -> ``pixel_values_videos`` (patches, C*T*P*P) float32 and ``video_grid_thw`` (videos, 3) int64."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 32 * 32
    max_pixels: int = 32 * 32 * 768
    resample: int = int(Image.Resampling.BICUBIC)
    do_sample_frames: bool = True
    sampling: VideoSampling = field(default=VideoSampling(fps=2.0))
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False
    """qwen-vl-utils' per-frame budget (transformers' ``cap_pixels_per_frame``; off there by default)."""
    max_video_tokens: int = 768

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Qwen3VLVideoProcessor:
        """From a video_preprocessor_config.json dict (or, as transformers falls back to it, the image one).
        ``size`` gives the clip's pixel budget; top-level ``min_pixels`` / ``max_pixels``, which transformers'
        Qwen3-VL video processor does not read but mlx-vlm's conversions write for it, take its place."""
        kwargs: dict[str, Any] = image_settings(
            cfg,
            int_keys=(
                "patch_size",
                "temporal_patch_size",
                "merge_size",
                "min_frames",
                "max_frames",
                "max_video_tokens",
            ),
            bool_keys=("do_sample_frames", "cap_pixels_per_frame"),
        )
        size = cfg.get("size")
        if isinstance(size, dict):
            if not size.get("shortest_edge") or not size.get("longest_edge"):
                raise ValueError(f"video processor config size={size!r} needs shortest_edge and longest_edge")
            kwargs.update(min_pixels=int(size["shortest_edge"]), max_pixels=int(size["longest_edge"]))
        for key in ("min_pixels", "max_pixels"):  # as mlx-vlm's conversions write the budget (Qwen2-VL's names)
            if cfg.get(key) is not None:
                kwargs[key] = int(cfg[key])
        fps, num_frames = cfg.get("fps", 2.0), cfg.get("num_frames")
        kwargs["sampling"] = VideoSampling(
            fps=None if fps is None else float(fps), num_frames=None if num_frames is None else int(num_frames)
        )
        return cls(**kwargs)

    def with_sampling(self, sampling: VideoSampling | None) -> Qwen3VLVideoProcessor:
        """This processor with the settings of ``sampling`` that are set taking the place of its own."""
        if sampling is None:
            return self
        num_frames = sampling.num_frames
        fps = None if num_frames is not None else (sampling.fps if sampling.fps is not None else self.sampling.fps)
        if num_frames is None and fps is None:
            num_frames = self.sampling.num_frames
        return replace(
            self,
            sampling=VideoSampling(fps=fps, num_frames=num_frames),
            max_frames=self.max_frames if sampling.max_frames is None else sampling.max_frames,
        )

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

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

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

    def __call__(self, videos: Sequence[Video]) -> ProcessedVideos:
        if not videos:
            raise ValueError("no videos given")
        patches, grids, timestamps = [], [], []
        for video in videos:
            indices = self.frame_indices(video.total_frames, video.fps)
            flat, grid = self._process_one(video.take(indices))
            patches.append(flat)
            grids.append(grid)
            timestamps.append(self.timestamps(indices, video.fps))
        arrays = {"pixel_values_videos": np.concatenate(patches), "video_grid_thw": np.asarray(grids, dtype=np.int64)}
        return ProcessedVideos(arrays, timestamps, [v.total_frames / v.fps for v in videos])

    def timestamps(self, indices: np.ndarray, video_fps: float) -> list[float]:
        """Seconds at each temporal patch: the mean time of its first and last frame (the last frame repeats to
        fill the final patch)."""
        t = self.temporal_patch_size
        padded = [*indices.tolist(), *[int(indices[-1])] * (-len(indices) % t)]
        times = [i / video_fps for i in padded]
        return [(times[i] + times[i + t - 1]) / 2 for i in range(0, len(times), t)]

    def _process_one(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        if self.do_resize:
            frames = resize_frames(frames, self.frame_size(*frames.shape[:3]), self.resample)
        pixels = self.normalize(frames)
        return patchify(pixels.transpose(0, 3, 1, 2), self.patch_size, self.merge_size, self.temporal_patch_size)

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
