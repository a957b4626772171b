"""Qwen2-Audio's audio input: Whisper's log-mel features (processors/mel.py), each clip padded to the encoder's
30 s window, and the processor's prompt expansion (one ``<|AUDIO|>`` per 40 ms of real audio), equal to
transformers' ``Qwen2AudioProcessor``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .mel import WhisperFeatureExtractor

__all__ = ["Qwen2AudioFeatureExtractor", "audio_token_count"]


def audio_token_count(frames: int) -> int:
    """``<|AUDIO|>`` tokens for a clip of ``frames`` real mel frames: the strided convolution, then the pool."""
    return (((frames - 1) // 2 + 1) - 2) // 2 + 1


@dataclass
class Qwen2AudioFeatureExtractor(WhisperFeatureExtractor):
    """Waveforms -> ``input_features`` (clips, 128, frames) and ``feature_attention_mask`` (clips, frames)."""

    feature_size: int = 128

    def __call__(self, waveforms: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        outputs = super().__call__(waveforms)
        return {"input_features": outputs["input_features"], "feature_attention_mask": outputs["attention_mask"]}

    def expand_prompt(self, prompt: str, audio_token: str, outputs: dict[str, np.ndarray]) -> str:
        """Each audio slot becomes one audio token per encoder output of the clip's real audio."""
        counts = [audio_token_count(int(n)) for n in outputs["feature_attention_mask"].sum(axis=-1)]
        pieces = prompt.split(audio_token)
        if len(pieces) - 1 != len(counts):
            raise ValueError(f"the prompt has {len(pieces) - 1} audio slot(s) for {len(counts)} clip(s)")
        out = [pieces[0]]
        for count, piece in zip(counts, pieces[1:]):
            out += [audio_token * count, piece]
        return "".join(out)
