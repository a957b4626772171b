"""Qwen3-Omni-MoE's audio and video input, equal to transformers' ``Qwen3OmniMoeProcessor``.

Audio: Whisper's log-mel frames (processors/mel.py), the clips of a call padded to the longest of them (not to
30 s) and never cut, and one audio token per convolved 80 ms (each 1 s chunk convolved on its own). Video:
Qwen2.5-Omni's processor with this one's per-frame bounds (128 to 768 merged 32-pixel patches),
``video_second_per_grid`` at 1 fps unless a rate is asked for, and a heard video's video and audio tokens
interleaved one by one in time order (13 positions a second).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .frames import ProcessedVideos
from .mel import WhisperFeatureExtractor
from .qwen2_5_omni import Qwen2_5OmniVideoProcessor
from .qwen2_vl import Qwen2VLVideoProcessor

__all__ = ["Qwen3OmniMoeFeatureExtractor", "Qwen3OmniMoeVideoProcessor", "audio_token_count", "conv_length"]

DEFAULT_FPS = 1.0
"""The frame rate transformers assumes for ``video_second_per_grid`` when the call names none."""


def conv_length(frames: int) -> int:
    """Positions left of ``frames`` after the audio encoder's three stride-2 convolutions."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return frames


def audio_token_count(frames: int, n_window: int = 50) -> int:
    """Tokens of a clip of ``frames`` real mel frames: each ``2 * n_window`` chunk convolved on its own."""
    chunk = 2 * n_window
    return sum(conv_length(min(chunk, frames - start)) for start in range(0, frames, chunk))


@dataclass
class Qwen3OmniMoeFeatureExtractor(WhisperFeatureExtractor):
    """Waveforms -> ``input_features`` (clips, 128, frames) and ``feature_attention_mask`` (clips, frames), the
    clips padded to the longest."""

    feature_size: int = 128
    pad_to_longest: bool = True
    n_window: int = 50

    def __call__(self, waveforms: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        outputs = super().__call__(waveforms)
        return {"input_features": outputs["input_features"], "feature_attention_mask": outputs["attention_mask"]}

    def token_counts(self, feature_attention_mask: np.ndarray) -> list[int]:
        return [audio_token_count(int(n), self.n_window) for n in feature_attention_mask.sum(axis=-1)]

    def expand_prompt(self, prompt: str, audio_token: str, outputs: dict[str, np.ndarray]) -> str:
        """Each audio slot becomes one audio token per encoder output of the clip's real audio."""
        counts = self.token_counts(outputs["feature_attention_mask"])
        pieces = prompt.split(audio_token)
        if len(pieces) - 1 != len(counts):
            raise ValueError(f"the prompt has {len(pieces) - 1} audio slot(s) for {len(counts)} clip(s)")
        out = [pieces[0]]
        for count, piece in zip(counts, pieces[1:]):
            out += [audio_token * count, piece]
        return "".join(out)


@dataclass
class Qwen3OmniMoeVideoProcessor(Qwen2_5OmniVideoProcessor):
    min_pixels: int = 128 * 32 * 32
    max_pixels: int = 768 * 32 * 32
    position_id_per_seconds: float = 13
    audio_bos_token: str = "<|audio_start|>"
    audio_eos_token: str = "<|audio_end|>"
    n_window: int = 50

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Qwen3OmniMoeVideoProcessor:
        """From the video processor config; the pixel bounds stay the processor's, as in transformers."""
        base = Qwen2VLVideoProcessor.from_config(cfg)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Qwen2VLVideoProcessor)}
        fields.update(min_pixels=cls.min_pixels, max_pixels=cls.max_pixels)
        return cls(**fields)

    @property
    def seconds_per_patch(self) -> float:
        return self.temporal_patch_size / (DEFAULT_FPS if self.asked_fps is None else self.asked_fps)

    def __call__(self, videos: Sequence[Any]) -> ProcessedVideos:
        processed = super().__call__(videos)
        processed.arrays["video_second_per_grid"] = np.full(len(videos), self.seconds_per_patch, np.float32)
        return processed

    def interleaved_tokens(self, grid: Sequence[int], seconds: float, n_audio: int, video: str, audio: str) -> str:
        """The placeholder of a video heard with ``n_audio`` audio tokens of its sound track: its tokens one by
        one in time order (a video token while its time is not past the next audio token's), between
        ``<|audio_start|>`` and ``<|audio_end|>``."""
        t, h, w = (int(v) for v in grid)
        per_patch = (h // self.merge_size) * (w // self.merge_size)
        times = np.repeat(np.arange(t), per_patch) * float(seconds) * self.position_id_per_seconds
        # Merging the two sorted runs: audio token i (time i) goes before the first video token later than i.
        video_before = np.searchsorted(times, np.arange(n_audio), side="right")
        kinds = np.zeros(len(times) + n_audio, dtype=bool)  # True: audio
        kinds[video_before + np.arange(n_audio)] = True
        return self.audio_bos_token + "".join(audio if k else video for k in kinds) + self.audio_eos_token

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
        out = [pieces[0]]
        for grid, frames, piece in zip(grids, audio_frames, pieces[1:]):
            n_audio = audio_token_count(int(frames), self.n_window)
            out += [self.interleaved_tokens(grid, self.seconds_per_patch, n_audio, video_token, audio_token), piece]
        return "".join(out)
