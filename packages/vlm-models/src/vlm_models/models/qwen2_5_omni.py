"""Qwen2.5-Omni's thinker (``qwen2_5_omni``): text out from text, images, videos and audio, a video's own sound
track included.

Three parts: Qwen2.5-VL's windowed vision tower (separate q/k/v projections in the checkpoints, fused here), a
Whisper-style audio encoder that attends within chunks of ``2 * n_window`` mel frames and ends in a pool, a norm
and a projection to the text width, and a Qwen2 decoder with M-RoPE. Positions differ from Qwen2.5-VL's: a
video's temporal patch i sits ``i * seconds_per_patch * position_id_per_seconds`` positions in (25 per second),
the text after a medium continues after its largest position, and a video heard with its audio
(``<|vision_bos|><|audio_bos|>`` video and audio tokens interleaved by 2 s chunks ``<|audio_eos|><|vision_eos|>``)
gives its audio tokens one position per 40 ms from the same start as the video, so the two line up in time.
The interleaving is read from the prompt itself (the processor writes it), so the model needs no flag.

Module names follow transformers 5's thinker (``model.language_model.*``, ``model.visual.*``,
``model.audio_tower.*``, ``lm_head``); ``sanitize`` maps the published checkpoints (``thinker.*`` beside the
talker and token2wav, which a text-out model drops) onto them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vlm_runtime import PromptEmbedding
from vlm_runtime.vision_cache import VisionFeatureCache

from ..config import ConfigError, from_dict
from ..nn.checkpoint import rename_prefix
from ..nn.decoder import DecoderConfig
from ..nn.output import ModelOutput
from ..nn.vision import features_per_image, merge_features, vision_identity
from ..nn.whisper import (
    EncoderLayer,
    WhisperEncoderConfig,
    chunk_lengths,
    conv1d_k3,
    conv1d_weight_to_mlx,
    sinusoid_positions,
)
from ..processors.qwen2_5_omni import time_chunks
from . import qwen2_5_vl, qwen2_vl

# Qwen2_5OmniTextConfig's defaults: the published configs leave out what equals them.
TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    hidden_act="silu",
)


@dataclass(frozen=True)
class AudioConfig:
    encoder: WhisperEncoderConfig
    n_window: int = 100
    """Attention runs within chunks of ``2 * n_window`` mel frames (2 s at the default)."""
    output_dim: int = 3584

    @classmethod
    def from_hf(cls, audio: Mapping[str, Any]) -> AudioConfig:
        values = {k: v for k, v in audio.items() if v is not None}
        sizes = {k: int(values[k]) for k in ("n_window", "output_dim") if k in values}
        return cls(WhisperEncoderConfig.from_hf(values), **sizes)


@dataclass(frozen=True)
class ModelConfig(qwen2_vl.ModelConfig):
    audio: AudioConfig = field(default_factory=lambda: AudioConfig(WhisperEncoderConfig()))
    audio_token_id: int = 151646
    audio_start_token_id: int = 151647
    position_id_per_seconds: float = 25
    seconds_per_chunk: float = 2

    @classmethod
    def from_omni(cls, config: Mapping[str, Any]) -> ModelConfig:
        """From the published config (the thinker's section of ``qwen2_5_omni``) or a thinker's own."""
        thinker, text = thinker_sections(config, TEXT_DEFAULTS, default_window=32768)  # transformers' default
        base = qwen2_vl.ModelConfig.from_hf(
            {"model_type": "qwen2_5_omni", "text_config": text, "vision_config": thinker.get("vision_config") or {}},
            qwen2_5_vl.VisionConfig,
            from_dict(DecoderConfig, text, attention_bias=True),
        )
        return cls(
            **thinker_fields(base, thinker),
            audio=AudioConfig.from_hf(thinker.get("audio_config") or {}),
            seconds_per_chunk=float(thinker.get("seconds_per_chunk", 2)),
        )


def thinker_sections(
    config: Mapping[str, Any], text_defaults: Mapping[str, Any], default_window: int | None
) -> tuple[dict, dict]:
    """An omni checkpoint's thinker section (the published config nests it; a thinker saved alone is it) and its
    text settings over ``text_defaults``; what the decoder cannot run is refused in one line (a window: where
    ``use_sliding_window`` is set and the config, or the family's ``default_window``, gives one)."""
    thinker = dict(config.get("thinker_config") or config)
    text = {**text_defaults, **(thinker.get("text_config") or {})}
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"text_config rope type {rope_type!r} is not supported (only M-RoPE's default rotary)")
    if text.get("use_sliding_window") and text.get("sliding_window", default_window):
        raise ConfigError("text_config.use_sliding_window is set: sliding-window attention is not supported yet")
    return thinker, text


def _token(thinker: Mapping[str, Any], name: str, default: int) -> int:
    """A token id under its ``*_token_id`` or older ``*_token_index`` spelling."""
    return int(thinker.get(f"{name}_token_id", thinker.get(f"{name}_token_index", default)))


def thinker_fields(base: qwen2_vl.ModelConfig, thinker: Mapping[str, Any]) -> dict[str, Any]:
    """``base``'s fields with the thinker's media and audio token ids, tying and audio position rate."""
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    fields.update(
        image_token_id=_token(thinker, "image", 151655),
        video_token_id=_token(thinker, "video", 151656),
        vision_start_token_id=int(thinker.get("vision_start_token_id", 151652)),
        tie_word_embeddings=bool(thinker.get("tie_word_embeddings", False)),
        audio_token_id=_token(thinker, "audio", 151646),
        audio_start_token_id=int(thinker.get("audio_start_token_id", 151647)),
        position_id_per_seconds=float(thinker.get("position_id_per_seconds", 25)),
    )
    return fields


# ------------------------------------------------------------------------------------------------ audio tower


class AudioEncoder(nn.Module):
    """(clips, mel bins, frames) log-mel features and each clip's real frame count -> one (frames / 4,
    output_dim) array per clip. Each chunk of ``2 * n_window`` frames is convolved and attended on its own (a
    batch row), then a clip's chunks are joined, pooled in pairs, normed and projected."""

    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        self.config = config
        c = config.encoder
        self.conv1 = nn.Conv1d(c.num_mel_bins, c.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, kernel_size=3, stride=2, padding=1)
        # Held by the checkpoints; the thinker's forward never reads it.
        self.audio_bos_eos_token = nn.Embedding(2, config.output_dim)
        self.layers = [EncoderLayer(c) for _ in range(c.encoder_layers)]
        self.ln_post = nn.LayerNorm(c.d_model)
        self.proj = nn.Linear(c.d_model, config.output_dim)
        self._positions = sinusoid_positions(c.max_source_positions, c.d_model)

    @property
    def dtype(self) -> mx.Dtype:
        return self.ln_post.weight.dtype

    def __call__(self, input_features: mx.array, frames: Sequence[int]) -> list[mx.array]:
        chunk = 2 * self.config.n_window
        pieces, lengths = [], []
        for clip, n in zip(input_features, frames):
            real = clip[:, :n].T.astype(self.dtype)  # (frames, mel)
            for start, length in zip(range(0, n, chunk), chunk_lengths(n, chunk)):
                pieces.append(mx.pad(real[start : start + length], [(0, chunk - length), (0, 0)]))
                lengths.append(length)
        x = mx.stack(pieces)
        real_frames = mx.arange(chunk)[None, :] < mx.array(lengths)[:, None]
        x = nn.gelu(conv1d_k3(self.conv1, x, 1)) * real_frames[..., None]
        x = nn.gelu(conv1d_k3(self.conv2, x, 2))
        x = x + self._positions[: x.shape[1]].astype(x.dtype)
        valid = [(n - 1) // 2 + 1 for n in lengths]
        mask = (mx.arange(x.shape[1])[None, :] < mx.array(valid)[:, None])[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        outputs, row = [], 0
        for n in frames:
            count = len(chunk_lengths(n, chunk))
            joined = mx.concatenate([x[row + j, : valid[row + j]] for j in range(count)])
            row += count
            pairs = joined.shape[0] // 2
            pooled = (joined[0 : 2 * pairs : 2] + joined[1 : 2 * pairs : 2]) / 2
            outputs.append(self.proj(self.ln_post(pooled)))
        return outputs


# ----------------------------------------------------------------------------------------- positions (M-RoPE)


@dataclass(frozen=True)
class OmniPositions:
    """What the 3D positions of a prompt depend on besides its tokens."""

    image_token_id: int
    video_token_id: int
    audio_token_id: int
    audio_start_token_id: int
    merge: int
    position_id_per_seconds: float
    seconds_per_chunk: float

    def grid_positions(self, grid: Sequence[int], step: np.float32) -> np.ndarray:
        """(3, tokens) offsets of a grid's merged patches: temporal patch i at ``floor(i * step)``."""
        t, h, w = (int(v) for v in grid)
        times = (np.arange(t, dtype=np.float32) * step).astype(np.int64)
        gh, gw = h // self.merge, w // self.merge
        return np.stack(np.meshgrid(times, np.arange(gh), np.arange(gw), indexing="ij")).reshape(3, -1)

    def row(self, tokens: np.ndarray, images: list, videos: list, steps: list) -> np.ndarray:
        """(3, len(tokens)) positions of one unpadded row; ``images`` / ``videos`` are consumed in order."""
        parts: list[np.ndarray] = []
        state = {"next": 0}

        def text(n: int) -> None:
            if n > 0:
                parts.append(np.broadcast_to(np.arange(n) + state["next"], (3, n)))
                state["next"] += n

        def block(positions: np.ndarray) -> None:
            if positions.shape[1]:  # (a chunk can be empty where a track is far shorter than its video)
                parts.append(positions)
                state["next"] = int(positions.max()) + 1

        visual = np.isin(tokens, [self.image_token_id, self.video_token_id])
        cursor = 0
        while True:
            found = np.nonzero(visual[cursor:])[0]
            if not len(found):
                break
            k = cursor + int(found[0])
            if tokens[k] == self.image_token_id:
                if not images:
                    raise ValueError("the prompt has more image slots than images were given")
                offsets = self.grid_positions(images.pop(0), np.float32(self.position_id_per_seconds))
                text(k - cursor)
                block(offsets + state["next"])
                cursor = k + offsets.shape[1]
                continue
            if not videos:
                raise ValueError("the prompt has more video slots than videos were given")
            offsets = self.grid_positions(videos.pop(0), steps.pop(0))
            if k == 0 or tokens[k - 1] != self.audio_start_token_id:
                text(k - cursor)
                block(offsets + state["next"])
                cursor = k + offsets.shape[1]
                continue
            # A video heard with its audio: <|vision_bos|><|audio_bos|> share one position, as do the two ends.
            text(k - 1 - cursor)
            parts.append(parts[-1][:, -1:])
            start = state["next"]
            inside = np.isin(tokens[k:], [self.video_token_id, self.audio_token_id])
            end = k + (int(inside.argmin()) if not inside.all() else len(inside))
            n_audio = int((tokens[k:end] == self.audio_token_id).sum())
            audio = np.broadcast_to(np.arange(n_audio), (3, n_audio))
            per_chunk = int(self.position_id_per_seconds * self.seconds_per_chunk)
            video_runs, audio_runs = time_chunks(offsets[0], per_chunk), time_chunks(audio[0], per_chunk)
            for j in range(max(len(video_runs), len(audio_runs))):
                for runs, positions in ((video_runs, offsets), (audio_runs, audio)):
                    if j < len(runs):
                        block(positions[:, runs[j][0] : runs[j][1]] + start)
            text(1)
            parts.append(parts[-1])  # <|vision_eos|> takes <|audio_eos|>'s position
            cursor = end + 2
        text(len(tokens) - cursor)
        positions = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
        if positions.shape[1] != len(tokens):
            raise ValueError("the prompt's media tokens do not match the media given (a slot was cut or altered)")
        return positions

    def __call__(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None,
        image_grid: np.ndarray | None,
        video_grid: np.ndarray | None,
        video_steps: np.ndarray | None,
    ) -> np.ndarray:
        """(3, batch, length) positions; padding sits at 1, as in the reference."""
        batch, length = input_ids.shape
        mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = np.ones((3, batch, length), dtype=np.int64)
        images = [] if image_grid is None else list(image_grid)
        videos = [] if video_grid is None else list(video_grid)
        steps = [] if video_steps is None else list(video_steps)
        for b in range(batch):
            keep = mask[b] == 1
            positions[:, b, keep] = self.row(input_ids[b][keep], images, videos, steps)
        return positions


# ------------------------------------------------------------------------------------------------------ model


class OmniThinker:
    """Mixed into a Qwen-Omni thinker (before its vision-language model): the audio tower's features beside the
    images' and videos', all merged in one ``embed_prompt``, with the family's 3D position rule
    (``_position_rule``, set by the family's ``__init__``). The Hugging Face processor's tensors come in
    (``input_features`` / ``feature_attention_mask`` for clips, ``video_second_per_grid`` for videos)."""

    config: Any
    model: Any
    _position_rule: Any

    # -- audio
    def audio_features(
        self, input_features: mx.array, feature_attention_mask: mx.array, cache: VisionFeatureCache | None
    ) -> mx.array:
        """All clips' features in prompt order; with a ``cache``, clips heard before skip the tower."""
        frames = np.asarray(feature_attention_mask).sum(axis=-1).astype(np.int64).tolist()
        tower = self.model.audio_tower
        per_clip = features_per_image(
            cache,
            [("audio", input_features[i], frames[i]) for i in range(input_features.shape[0])],
            lambda: vision_identity(self, self.config.audio, tower.dtype, tower.ln_post),
            lambda order: tower(input_features[mx.array(order)], [frames[i] for i in order]),
        )
        return per_clip[0] if len(per_clip) == 1 else mx.concatenate(per_clip)

    # -- runtime protocol (the decoder steps come from TextGeneration)
    def embed_prompt(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        image_grid_thw: mx.array | None = None,
        attention_mask: mx.array | None = None,
        pixel_values_videos: mx.array | None = None,
        video_grid_thw: mx.array | None = None,
        video_second_per_grid: mx.array | None = None,
        input_features: mx.array | None = None,
        feature_attention_mask: mx.array | None = None,
        *,
        vision_cache: VisionFeatureCache | None = None,
    ) -> PromptEmbedding:
        """Token embeddings with the clips', images' and videos' features at their tokens, and the 3D
        positions (``video_second_per_grid``: seconds per temporal patch of each video, 1 without it)."""
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw must be given together")
        if (pixel_values_videos is None) != (video_grid_thw is None):
            raise ValueError("pixel_values_videos and video_grid_thw must be given together")
        embeds = self.prompt_token_embeddings(input_ids)
        if input_features is not None:
            if feature_attention_mask is None:
                raise ValueError(
                    f"{self.config.model_type} needs feature_attention_mask with input_features (the processor "
                    "gives it)"
                )
            features = self.audio_features(input_features, feature_attention_mask, vision_cache)
            # Zeros in any channels the prompt embedding has beyond the decoder's (Qwen3's deepstack ones).
            features = mx.pad(features, [(0, 0), (0, embeds.shape[-1] - features.shape[-1])])
            embeds = merge_features(embeds, input_ids, self.config.audio_token_id, features, kind="audio")
        image_grid = video_grid = steps = None
        if pixel_values is not None:
            image_grid = np.asarray(image_grid_thw).astype(np.int64).reshape(-1, 3)
            features = self._image_features(pixel_values, image_grid, vision_cache)
            embeds = merge_features(embeds, input_ids, self.config.image_token_id, features)
        if pixel_values_videos is not None:
            video_grid = np.asarray(video_grid_thw).astype(np.int64).reshape(-1, 3)
            features = self.model.visual(pixel_values_videos, video_grid)
            embeds = merge_features(embeds, input_ids, self.config.video_token_id, features, kind="video")
            steps = self.video_time_steps(video_grid, video_second_per_grid)
        mask = None if attention_mask is None else np.asarray(attention_mask)
        positions = self.position_ids(
            np.asarray(input_ids), mask, image_grid, video_grid, steps, feature_attention_mask
        )
        padded = mask is not None and not bool(mask.all())
        return PromptEmbedding(embeds, mx.array(positions), attention_mask if padded else None)

    def position_ids(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None,
        image_grid: np.ndarray | None,
        video_grid: np.ndarray | None,
        video_steps: np.ndarray | None,
        feature_attention_mask: mx.array | None,
    ) -> np.ndarray:
        """(3, batch, length) positions by the family's rule (Qwen2.5-Omni's reads the audio lengths from the
        prompt's tokens)."""
        return self._position_rule(input_ids, attention_mask, image_grid, video_grid, video_steps)

    def video_time_steps(self, video_grid: np.ndarray, seconds_per_grid: mx.array | None) -> np.ndarray:
        """Temporal positions between a video's patches: seconds per patch times 25 (float32, as the
        reference multiplies them)."""
        seconds = np.ones(len(video_grid), np.float32)
        if seconds_per_grid is not None:
            seconds = np.asarray(seconds_per_grid, dtype=np.float32).reshape(-1)
            if len(seconds) != len(video_grid):
                raise ValueError(f"video_second_per_grid has {len(seconds)} values for {len(video_grid)} video(s)")
        return seconds * np.float32(self.config.position_id_per_seconds)

    # -- the Hugging Face contract
    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        image_grid_thw: mx.array | None = None,
        attention_mask: mx.array | None = None,
        *,
        cache: list[Any] | None = None,
        position_ids: mx.array | None = None,
        pixel_values_videos: mx.array | None = None,
        video_grid_thw: mx.array | None = None,
        video_second_per_grid: mx.array | None = None,
        input_features: mx.array | None = None,
        feature_attention_mask: mx.array | None = None,
    ) -> ModelOutput:
        prompt = self.embed_prompt(
            input_ids,
            pixel_values,
            image_grid_thw,
            attention_mask,
            pixel_values_videos,
            video_grid_thw,
            video_second_per_grid,
            input_features,
            feature_attention_mask,
        )
        return self.prompt_logits(prompt, cache, position_ids)


class Model(OmniThinker, qwen2_5_vl.Model):
    """The Qwen2.5-Omni thinker for generation; the runtime uses the split steps."""

    # LoRA's groups are Qwen's usual ones (the "vision" group is the visual tower); the audio tower's layers
    # are reached by module patterns (``model.audio_tower.*``).

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.model.audio_tower = AudioEncoder(config.audio)
        c = config
        self._position_rule = OmniPositions(
            c.image_token_id,
            c.video_token_id,
            c.audio_token_id,
            c.audio_start_token_id,
            c.vision.spatial_merge_size,
            c.position_id_per_seconds,
            c.seconds_per_chunk,
        )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        return cls(ModelConfig.from_omni(config))

    # -- loading
    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Map the published layout (or transformers 5's thinker) onto this module's names: the speech parts
        dropped, the vision q/k/v fused. Pure and idempotent."""
        out: dict[str, mx.array] = {}
        split: dict[str, dict[str, mx.array]] = {}
        c = self.config.audio.encoder
        for key, value in weights.items():
            if key.startswith(_SPEECH_PREFIXES):
                continue
            key = rename_prefix(key, _PREFIXES)
            if key == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if key.endswith("patch_embed.proj.weight") and value.ndim == 5:
                value = qwen2_vl._conv3d_to_linear(value, self.config.vision.in_channels)
            elif key.endswith("audio_tower.conv1.weight"):
                value = conv1d_weight_to_mlx(value, c.num_mel_bins)
            elif key.endswith("audio_tower.conv2.weight"):
                value = conv1d_weight_to_mlx(value, c.d_model)
            head, _, leaf = key.rpartition(".")
            stem, _, proj = head.rpartition(".")
            if stem.startswith("model.visual.blocks.") and stem.endswith(".attn") and proj in ("q", "k", "v"):
                split.setdefault(f"{stem}.qkv.{leaf}", {})[proj] = value
                continue
            out[key] = value
        for key, parts in split.items():
            if set(parts) != {"q", "k", "v"}:
                raise ValueError(f"{key}: the checkpoint has only the {sorted(parts)} projections")
            out[key] = mx.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
        return out

    def mlx_community_names(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """The published thinker names (q/k/v split again), which ``sanitize`` reads back."""
        out = {}
        for key, value in weights.items():
            head, _, leaf = key.rpartition(".")
            if head.startswith("model.visual.blocks.") and head.endswith(".attn.qkv"):
                stem = head[: -len(".qkv")]
                for name, part in zip("qkv", mx.split(value, 3, axis=0)):
                    out[rename_prefix(f"{stem}.{name}.{leaf}", _PUBLISHED_PREFIXES)] = part
                continue
            out[rename_prefix(key, _PUBLISHED_PREFIXES)] = value
        return out


_SPEECH_PREFIXES = ("talker.", "token2wav.")
_PREFIXES = (
    # (layout's prefix, ours); the first match wins, so the longer prefixes come first.
    ("model.language_model.", "model.language_model."),
    ("model.visual.", "model.visual."),
    ("model.audio_tower.", "model.audio_tower."),
    ("thinker.model.", "model.language_model."),
    ("thinker.visual.", "model.visual."),
    ("thinker.audio_tower.", "model.audio_tower."),
    ("thinker.lm_head.", "lm_head."),
)
_PUBLISHED_PREFIXES = (
    ("model.language_model.", "thinker.model."),
    ("model.visual.", "thinker.visual."),
    ("model.audio_tower.", "thinker.audio_tower."),
    ("lm_head.", "thinker.lm_head."),
)
