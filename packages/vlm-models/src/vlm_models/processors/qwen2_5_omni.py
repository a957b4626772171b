"""Qwen2.5-Omni's video input, equal to transformers' ``Qwen2_5OmniProcessor``: Qwen2-VL's frames and patches
within the processor's own per-frame bounds, ``video_second_per_grid``, and a video heard with its sound track
written as video and audio tokens interleaved by time chunks.

The audio features are Qwen2-Audio's (processors/qwen2_audio.py): Whisper's log-mel frames, one audio token per
40 ms of real audio.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from ..video import Video, VideoSampling
from .frames import ProcessedVideos
from .qwen2_audio import audio_token_count
from .qwen2_vl import Qwen2VLVideoProcessor

__all__ = ["Qwen2_5OmniVideoProcessor", "time_chunks"]

DEFAULT_FPS = 2.0
"""The frame rate transformers assumes for ``video_second_per_grid`` when the call names none."""


def time_chunks(times: np.ndarray, per_chunk: float) -> list[tuple[int, int]]:
    """(start, end) runs of ``times`` (non-decreasing) split where a value reaches the next multiple of
    ``per_chunk``; the boundary advances one chunk per token, as transformers' walk does."""
    runs, start, chunk = [], 0, 1
    for i, value in enumerate(times):
        if value >= chunk * per_chunk:
            runs.append((start, i))
            start, chunk = i, chunk + 1
    runs.append((start, len(times)))
    return runs


@dataclass
class Qwen2_5OmniVideoProcessor(Qwen2VLVideoProcessor):
    """Qwen2-VL's video processor with Qwen2_5OmniProcessor's per-frame bounds (128 to 768 merged patches: the
    processor's defaults take the place of the video processor config's) and ``video_second_per_grid``
    (videos,): the temporal patch over the frame rate asked for (2 fps when none is)."""

    interleaves_audio: ClassVar[bool] = True
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    asked_fps: float | None = None
    position_id_per_seconds: float = 25
    seconds_per_chunk: float = 2
    audio_bos_token: str = "<|audio_bos|>"
    audio_eos_token: str = "<|audio_eos|>"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Qwen2_5OmniVideoProcessor:
        """From the video processor config; the pixel bounds stay the processor's, as in transformers."""
        base = super().from_config(cfg)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Qwen2VLVideoProcessor)}
        fields.update(min_pixels=cls.min_pixels, max_pixels=cls.max_pixels)
        return cls(**fields)

    def with_sampling(self, sampling: VideoSampling | None) -> Qwen2_5OmniVideoProcessor:
        sampled = super().with_sampling(sampling)
        asked = None if sampling is None or sampling.num_frames is not None else sampling.fps
        return replace(sampled, asked_fps=asked) if asked is not None else sampled

    def __call__(self, videos: Sequence[Video]) -> ProcessedVideos:
        processed = super().__call__(videos)
        fps = DEFAULT_FPS if self.asked_fps is None else self.asked_fps
        processed.arrays["video_second_per_grid"] = np.full(len(videos), self.temporal_patch_size / fps, np.float32)
        return processed

    def interleaved_tokens(self, grid: Sequence[int], seconds: float, n_audio: int, video: str, audio: str) -> str:
        """The placeholder of a video heard with ``n_audio`` audio tokens of its sound track: each 2 s chunk of
        video tokens, then that chunk's audio tokens, between ``<|audio_bos|>`` and ``<|audio_eos|>``."""
        t, h, w = (int(v) for v in grid)
        per_patch = (h // self.merge_size) * (w // self.merge_size)
        times = np.repeat(np.arange(t), per_patch) * float(seconds) * self.position_id_per_seconds
        per_chunk = int(self.position_id_per_seconds * self.seconds_per_chunk)
        video_runs, audio_runs = time_chunks(times, per_chunk), time_chunks(np.arange(n_audio), per_chunk)
        out = [self.audio_bos_token]
        for j in range(max(len(video_runs), len(audio_runs))):
            if j < len(video_runs):
                out.append(video * (video_runs[j][1] - video_runs[j][0]))
            if j < len(audio_runs):
                out.append(audio * (audio_runs[j][1] - audio_runs[j][0]))
        out.append(self.audio_eos_token)
        return "".join(out)

    def expand_prompt_with_audio(
        self,
        prompt: str,
        video_token: str,
        audio_token: str,
        processed: ProcessedVideos,
        audio_frames: Sequence[int],
    ) -> str:
        """Each video slot becomes its interleaved video and audio tokens (``audio_frames``: the real mel
        frames of each video's sound track)."""
        pieces = prompt.split(video_token)
        grids = processed.arrays["video_grid_thw"]
        if len(pieces) - 1 != len(grids) or len(grids) != len(audio_frames):
            raise ValueError(f"the prompt has {len(pieces) - 1} video slot(s) for {len(grids)} video(s)")
        # In double precision, as transformers times the tokens (the model's positions use float32).
        seconds = self.temporal_patch_size / (DEFAULT_FPS if self.asked_fps is None else self.asked_fps)
        out = [pieces[0]]
        for grid, frames, piece in zip(grids, audio_frames, pieces[1:]):
            n_audio = audio_token_count(int(frames))
            out += [self.interleaved_tokens(grid, seconds, n_audio, video_token, audio_token), piece]
        return "".join(out)
