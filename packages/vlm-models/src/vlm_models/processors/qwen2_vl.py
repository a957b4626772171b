"""Qwen2-VL / Qwen2.5-VL image and video processors in numpy, output-identical to transformers'
(``Qwen2VLImageProcessorPil``, ``Qwen2VLVideoProcessor`` and the Qwen2.5-VL processor's ``second_per_grid_ts``).

A video's frames are resized like images (each frame within the per-frame pixel budget), normalized as
torchvision does, and cut into patches two frames deep (an odd count repeats the last frame), one run of
video tokens per clip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from ..video import Video, VideoSampling
from .frames import FrameSettings, ProcessedVideos, resize_frames
from .image import RepeatsImageTokens, SampleBatching, image_settings, rescale_and_normalize, resize, to_rgb

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "Qwen2VLImageProcessor",
    "Qwen2VLVideoProcessor",
    "Qwen2_5_VLVideoProcessor",
    "fit_pixel_budget",
    "patchify",
    "smart_resize",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """Target ``(height, width)``: both multiples of ``factor``, area near ``[min_pixels, max_pixels]``, aspect kept.

    Same arithmetic as transformers (round to the nearest multiple; if that overshoots max_pixels scale down and
    floor, if it undershoots min_pixels scale up and ceil). The bounds are best effort: a side is never below
    ``factor``, so extreme aspect ratios can leave the area outside the range, exactly as in transformers.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height} width={width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width)}"
            f" for a {height}x{width} image"
        )
    return fit_pixel_budget(height, width, factor, min_pixels, max_pixels)


def fit_pixel_budget(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int, frames: int = 1, padded_frames: int = 1
) -> tuple[int, int]:
    """Sides rounded to multiples of ``factor``; if the pixels (``padded_frames`` x area) leave the budget, both
    sides rescaled by the square root of the overshoot measured on ``frames`` x the original area, then floored
    (too many) or ceiled (too few). transformers' order of operations, for images (one frame) and clips."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if padded_frames * h_bar * w_bar > max_pixels:
        beta = math.sqrt((frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif padded_frames * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class Qwen2VLImageProcessor(RepeatsImageTokens, SampleBatching):
    """Images -> ``pixel_values`` (patches, C*T*P*P) float32 and ``image_grid_thw`` (images, 3) int64."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = int(Image.Resampling.BICUBIC)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Qwen2VLImageProcessor:
        """Build from a ``preprocessor_config.json`` dict; unknown keys are ignored.

        As in transformers 5.x, top-level ``min_pixels``/``max_pixels`` override ``size.shortest_edge``/
        ``size.longest_edge``, and a ``size`` dict replaces the defaults wholesale.
        """
        kwargs: dict[str, Any] = image_settings(cfg, int_keys=("patch_size", "temporal_patch_size", "merge_size"))

        # A size dict replaces the defaults wholesale (older configs spell its keys min_pixels/max_pixels, which
        # transformers only accepts alongside the top-level keys; taking them here changes no working config).
        size = cfg.get("size")
        if isinstance(size, dict):
            bounds = {
                "min_pixels": size.get("shortest_edge", size.get("min_pixels")),
                "max_pixels": size.get("longest_edge", size.get("max_pixels")),
            }
        else:
            bounds = {"min_pixels": cls.min_pixels, "max_pixels": cls.max_pixels}
        for key in ("min_pixels", "max_pixels"):  # top-level keys win over size, as in transformers
            if cfg.get(key) is not None:
                bounds[key] = cfg[key]
        missing = [k for k, v in bounds.items() if v is None]
        if missing:
            # transformers accepts such a config but fails on the first image; fail at load instead.
            raise ValueError(
                f"preprocessor config size={size!r} lacks {' and '.join(missing)} "
                "(need size.shortest_edge/longest_edge or top-level min_pixels/max_pixels)"
            )
        kwargs.update({k: int(v) for k, v in bounds.items()})
        return cls(**kwargs)

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    def num_image_tokens(self, grid_thw: Sequence[int] | np.ndarray) -> int:
        """LLM placeholder tokens for one image: its patches after the merge_size x merge_size merge."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.merge_size**2

    def image_token_counts(self, outputs: dict[str, np.ndarray]) -> list[int]:
        """Placeholder tokens of each image in this processor's ``outputs``."""
        return [self.num_image_tokens(grid) for grid in outputs["image_grid_thw"]]

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        if not images:
            raise ValueError("no images given")
        patches = []
        grids = []
        for image in images:
            flat, grid = self._process_one(image)
            patches.append(flat)
            grids.append(grid)
        return {
            "pixel_values": np.concatenate(patches, axis=0),
            "image_grid_thw": np.asarray(grids, dtype=np.int64),
        }

    def _process_one(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
        if self.do_convert_rgb:
            image = to_rgb(image)
        if self.do_resize:
            height, width = smart_resize(
                image.height, image.width, self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
            )
            array = resize(image, (height, width), resample=self.resample)
        else:
            array = np.asarray(image)
        if array.ndim == 2:  # mode L with do_convert_rgb off
            array = array[..., None]
        pixels = rescale_and_normalize(
            array,
            self.rescale_factor if self.do_rescale else None,
            self.image_mean if self.do_normalize else None,
            self.image_std if self.do_normalize else None,
        )
        return self._patchify(pixels)

    def _patchify(self, pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """CHW -> (grid_h*grid_w, C*T*P*P): the one frame repeated over the temporal patch."""
        frames = np.broadcast_to(pixels[None], (self.temporal_patch_size, *pixels.shape))
        return patchify(frames, self.patch_size, self.merge_size, self.temporal_patch_size)


def patchify(
    frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(T, C, H, W) -> (grid_t*grid_h*grid_w, C*T'*P*P) float32 and the (t, h, w) grid.

    T is padded to a multiple of the temporal patch by repeating the last frame. Row order is
    (t, gh/m, gw/m, m, m) so the merge_size**2 patches of one LLM token are consecutive; the feature order is
    (C, T', P, P), the layout of the vision tower's Conv3d patch embedding.
    """
    count, channels, height, width = frames.shape
    p, m, t = patch_size, merge_size, temporal_patch_size
    if height % (p * m) or width % (p * m):
        raise ValueError(
            f"image of {height}x{width} is not a multiple of patch_size*merge_size={p * m}; enable do_resize"
        )
    if pad := -count % t:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    grid_t, grid_h, grid_w = len(frames) // t, height // p, width // p
    blocks = frames.reshape(grid_t, t, channels, grid_h // m, m, p, grid_w // m, m, p)
    blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, T', P, P)
    flat = blocks.reshape(grid_t * grid_h * grid_w, channels * t * p * p).astype(np.float32, copy=False)
    return flat, (grid_t, grid_h, grid_w)


@dataclass
class Qwen2VLVideoProcessor(FrameSettings):
    """Videos -> ``pixel_values_videos`` (patches, C*T*P*P) float32 and ``video_grid_thw`` (videos, 3) int64.

    As transformers (``do_sample_frames`` off by default, for old checkpoints), every frame is taken unless
    sampling is asked for: ``fps`` frames per second (at least ``min_frames``, at most ``max_frames``) or
    ``num_frames``, rounded down (fps) or to the nearest (count) multiple of the temporal patch."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 28 * 28 * 768
    """Per frame (transformers' ``size.shortest_edge`` / ``size.longest_edge``)."""
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)
    resample: int = int(Image.Resampling.BICUBIC)
    do_sample_frames: bool = False
    sampling: VideoSampling = field(default=VideoSampling())
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False
    """qwen-vl-utils' bound on a whole clip's pixels (transformers' ``cap_pixels_per_frame``; off there by
    default): each frame gets at most an even share of ``max_video_tokens``."""
    max_video_tokens: int = 128_000

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Qwen2VLVideoProcessor:
        """From a video_preprocessor_config.json dict (or, as transformers falls back to it, the image one).
        ``size`` gives the pixel budget; top-level ``min_pixels`` / ``max_pixels`` take its place, as in
        transformers (and as mlx-vlm's conversions write it)."""
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
            bounds = {"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge")}
        else:
            bounds = {"min_pixels": cls.min_pixels, "max_pixels": cls.max_pixels}
        for key in ("min_pixels", "max_pixels"):
            if cfg.get(key) is not None:
                bounds[key] = cfg[key]
        if not bounds["min_pixels"] or not bounds["max_pixels"]:
            raise ValueError(f"video processor config size={size!r} needs shortest_edge and longest_edge")
        kwargs.update({k: int(v) for k, v in bounds.items()})
        default = cls.__dataclass_fields__["sampling"].default
        fps = cfg.get("fps", default.fps)
        num_frames = cfg.get("num_frames", default.num_frames)
        kwargs["sampling"] = VideoSampling(
            fps=None if fps is None else float(fps), num_frames=None if num_frames is None else int(num_frames)
        )
        return cls(**kwargs)

    def with_sampling(self, sampling: VideoSampling | None) -> Qwen2VLVideoProcessor:
        """This processor with the settings of ``sampling`` that are set taking the place of its own; asking
        for any switches sampling on."""
        if sampling is None or (sampling.fps, sampling.num_frames, sampling.max_frames) == (None, None, None):
            return self
        num_frames = sampling.num_frames
        fps = None if num_frames is not None else (sampling.fps if sampling.fps is not None else self.sampling.fps)
        if num_frames is None and fps is None:
            num_frames = self.sampling.num_frames
        return replace(
            self,
            do_sample_frames=True,
            sampling=VideoSampling(fps=fps, num_frames=num_frames),
            max_frames=self.max_frames if sampling.max_frames is None else sampling.max_frames,
        )

    def frame_count(self, total_frames: int, video_fps: float) -> int | None:
        """How many frames sampling takes (None: every frame); transformers' arithmetic."""
        t = self.temporal_patch_size
        count, fps = self.sampling.num_frames, self.sampling.fps
        if count is not None:
            count = round(count / t) * t
        elif fps is not None:
            most = math.floor(min(self.max_frames, total_frames) / t) * t
            wanted = min(max(total_frames / video_fps * fps, self.min_frames), most, total_frames)
            count = math.floor(wanted / t) * t
        elif total_frames > self.max_frames:  # only a frame cap was asked for
            count = math.floor(self.max_frames / t) * t
        return count

    def frame_indices(self, total_frames: int, video_fps: float) -> np.ndarray:
        """The source frames taken: all of them, or ``frame_count`` spread evenly from the first."""
        if not self.do_sample_frames:
            return np.arange(total_frames)
        count = self.frame_count(total_frames, video_fps)
        if count is None:
            return np.arange(total_frames)
        if count < self.temporal_patch_size or count > total_frames:
            raise ValueError(
                f"cannot sample {count} frames from a video of {total_frames}: a video needs at least "
                f"{self.temporal_patch_size} frames (the temporal patch) and at most the frames it has"
            )
        step = total_frames / count
        # torch.arange(0, total, total / count).int(): steps in double, values through float32, truncated. Its
        # length can round up to one past the last frame (75 frames, 28 asked): that index names no frame.
        positions = np.arange(math.ceil(total_frames / step), dtype=np.float64) * step
        indices = positions.astype(np.float32).astype(np.int64)
        return indices[indices < total_frames]

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def frame_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """Each frame's size: ``smart_resize`` within the per-frame budget (capped by the clip's share where
        ``cap_pixels_per_frame``)."""
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            total = int(self.max_video_tokens * self.factor * self.factor * 0.9)
            share = total * self.temporal_patch_size // num_frames
            max_pixels = max(min(max_pixels, share), int(self.min_pixels * 1.05))
        return smart_resize(height, width, self.factor, self.min_pixels, max_pixels)

    def __call__(self, videos: Sequence[Video]) -> ProcessedVideos:
        if not videos:
            raise ValueError("no videos given")
        patches, grids, timestamps = [], [], []
        for video in videos:
            indices = self.frame_indices(video.total_frames, video.fps)
            flat, grid = self.process_frames(video.take(indices))
            patches.append(flat)
            grids.append(grid)
            timestamps.append(self.timestamps(indices, video.fps))
        arrays = {"pixel_values_videos": np.concatenate(patches), "video_grid_thw": np.asarray(grids, dtype=np.int64)}
        return ProcessedVideos(arrays, timestamps, [v.total_frames / v.fps for v in videos])

    def timestamps(self, indices: np.ndarray, video_fps: float) -> list[float]:
        """Seconds at the first frame of each temporal patch."""
        return [float(i) / video_fps for i in indices[:: self.temporal_patch_size]]

    def process_frames(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(T, H, W, 3) uint8 frames -> flat patches and the (t, h, w) grid."""
        if len(frames) < 1:
            raise ValueError("a video needs at least one frame")
        if self.do_resize:
            frames = resize_frames(frames, self.frame_size(*frames.shape[:3]), self.resample)
        pixels = self.normalize(frames)
        return patchify(pixels.transpose(0, 3, 1, 2), self.patch_size, self.merge_size, self.temporal_patch_size)

    def expand_prompt(self, prompt: str, video_token: str, processed: ProcessedVideos) -> str:
        """Each video slot becomes one video token per merged patch of the clip (Qwen2VLProcessor)."""
        pieces = prompt.split(video_token)
        grids = processed.arrays["video_grid_thw"]
        if len(pieces) - 1 != len(grids):
            raise ValueError(f"the prompt has {len(pieces) - 1} video slot(s) for {len(grids)} video(s)")
        out = [pieces[0]]
        for grid, piece in zip(grids, pieces[1:]):
            out += [video_token * (int(np.prod(grid)) // self.merge_size**2), piece]
        return "".join(out)


@dataclass
class Qwen2_5_VLVideoProcessor(Qwen2VLVideoProcessor):
    """Qwen2-VL's video processor plus ``second_per_grid_ts`` (videos,) float32: the seconds one temporal patch
    spans (the temporal patch over the sampled frame rate), which Qwen2.5-VL's temporal positions scale by."""

    def __call__(self, videos: Sequence[Video]) -> ProcessedVideos:
        processed = super().__call__(videos)
        seconds = []
        for video in videos:
            taken = len(self.frame_indices(video.total_frames, video.fps))
            sampled_fps = taken / video.total_frames * video.fps
            seconds.append(self.temporal_patch_size / sampled_fps)
        processed.arrays["second_per_grid_ts"] = np.asarray(seconds, dtype=np.float32)
        return processed
