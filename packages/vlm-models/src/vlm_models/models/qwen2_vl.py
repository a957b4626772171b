"""Qwen2-VL: a ViT with 2D rotary attention and a 2x2 patch merger, feeding a Qwen2 decoder with M-RoPE.

Module names follow the transformers 5 weight names (``model.visual.*``, ``model.language_model.*``,
``lm_head``); ``sanitize`` maps the transformers 4 and MLX-community layouts onto them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vlm_runtime import PromptEmbedding
from vlm_runtime.vision_cache import VisionFeatureCache

from ..config import ConfigError, from_dict, text_section
from ..nn.checkpoint import rename_prefix
from ..nn.decoder import DecoderConfig, TextDecoder, TextGeneration
from ..nn.layers import MLP
from ..nn.output import ModelOutput
from ..nn.rope import MultimodalRotary, inverse_frequencies
from ..nn.vision import VisionBlock, features_per_image, merge_features, segment_mask, vision_identity


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "quick_gelu"

    @property
    def width(self) -> int:
        return self.embed_dim

    @property
    def out_size(self) -> int:
        return self.hidden_size


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: DecoderConfig
    vision: Any
    rope_theta: float
    mrope_section: tuple[int, ...]
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    tie_word_embeddings: bool
    mrope_interleaved: bool = False

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], vision_cls: type = VisionConfig, decoder: Any = None) -> ModelConfig:
        """``decoder``: the text decoder's own config where the family's is not a ``DecoderConfig``."""
        text = text_section(config)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        vision = dict(config.get("vision_config") or {})
        if "in_chans" in vision:
            vision.setdefault("in_channels", vision["in_chans"])
        try:
            return cls(
                model_type=config["model_type"],
                # Qwen2 puts biases on q/k/v only.
                text=decoder if decoder is not None else from_dict(DecoderConfig, text, attention_bias=True),
                vision=from_dict(vision_cls, vision),
                rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))),
                mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
                image_token_id=int(text.get("image_token_id", 151655)),
                video_token_id=int(text.get("video_token_id", 151656)),
                vision_start_token_id=int(text.get("vision_start_token_id", 151652)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                mrope_interleaved=bool(rope.get("mrope_interleaved", False)),
            )
        except KeyError as exc:
            raise ConfigError(f"config.json lacks {exc.args[0]!r}") from None


# ----------------------------------------------------------------------------------------------- vision tower


class PatchEmbed(nn.Module):
    """The reference's Conv3d with stride equal to its kernel is a matmul over flattened patches."""

    def __init__(self, config: Any, bias: bool = False) -> None:
        super().__init__()
        c = config
        self.proj = nn.Linear(c.in_channels * c.temporal_patch_size * c.patch_size**2, c.width, bias=bias)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        return self.proj(pixel_values)


class PatchMerger(nn.Module):
    """Concatenate each 2x2 group of neighbouring patch features and project them to the text width."""

    def __init__(self, out_size: int, width: int, merge: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.merged_width = width * merge**2
        self.ln_q = norm(width)
        self.mlp = [nn.Linear(self.merged_width, self.merged_width), nn.GELU(), nn.Linear(self.merged_width, out_size)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.ln_q(x).reshape(-1, self.merged_width)
        for layer in self.mlp:
            x = layer(x)
        return x


def vision_position_ids(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(tokens, 2) row/column of every patch, in the processor's order (merge groups are contiguous)."""
    rows = []
    for t, h, w in grid_thw:
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        pair = np.stack([hpos, wpos], axis=-1).reshape(h // merge, merge, w // merge, merge, 2)
        rows.append(np.tile(pair.transpose(0, 2, 1, 3, 4).reshape(-1, 2), (t, 1)))
    return np.concatenate(rows)


def frame_boundaries(grid_thw: np.ndarray) -> list[int]:
    """Cumulative token counts at each frame's end: attention never crosses frames."""
    per_frame = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return [0, *np.cumsum(per_frame).tolist()]


def vision_rotary(positions: np.ndarray, inv_freq: mx.array) -> tuple[mx.array, mx.array]:
    """cos/sin tables (tokens, head_dim) for (tokens, 2) row/column positions: the first half of each head's
    frequencies reads the row, the second the column."""
    angles = (mx.array(positions).astype(mx.float32)[..., None] * inv_freq).reshape(len(positions), -1)
    emb = mx.concatenate([angles, angles], axis=-1)
    return mx.cos(emb), mx.sin(emb)


class VisionTransformer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c)
        self.blocks = [self.make_block(c) for _ in range(c.depth)]
        self.merger = PatchMerger(c.out_size, c.width, c.spatial_merge_size, self.norm)
        self._inv_freq = inverse_frequencies(c.width // c.num_heads // 2, 10000.0)

    @staticmethod
    def norm(dim: int) -> nn.Module:
        return nn.LayerNorm(dim, eps=1e-6)

    @classmethod
    def make_block(cls, c: VisionConfig) -> VisionBlock:
        mlp = MLP(c.embed_dim, int(c.embed_dim * c.mlp_ratio), c.hidden_act)
        return VisionBlock(c.width, c.num_heads, mlp, norm=lambda: cls.norm(c.width))

    @property
    def dtype(self) -> mx.Dtype:
        return self.merger.ln_q.weight.dtype

    def rotary(self, positions: np.ndarray) -> tuple[mx.array, mx.array]:
        return vision_rotary(positions, self._inv_freq)

    def __call__(self, pixel_values: mx.array, grid_thw: np.ndarray) -> mx.array:
        x = self.patch_embed(pixel_values.astype(self.dtype))
        cos, sin = self.rotary(vision_position_ids(grid_thw, self.config.spatial_merge_size))
        mask = segment_mask(frame_boundaries(grid_thw))
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.merger(x)


# ----------------------------------------------------------------------------------------- positions (M-RoPE)


def multimodal_position_ids(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    attention_mask: np.ndarray | None,
    *,
    image_token_id: int,
    vision_start_token_id: int,
    merge: int,
    video_grid_thw: np.ndarray | None = None,
    video_token_id: int | None = None,
    video_time_steps: np.ndarray | None = None,
) -> np.ndarray:
    """(3, batch, length) positions: text advances all three axes together; an image's tokens take
    (time, row, column) offsets from the position after the preceding text, and the following text continues
    ``max(rows, columns)`` after that start (transformers 5's rule; for an image, its largest position + 1).
    Padding gets position 1, as in the reference. Runs of ``video_token_id`` take their grids from
    ``video_grid_thw`` in the same way, temporal patch i at offset ``floor(i * video_time_steps[run])``
    (float32, as the reference computes it; a step of 1 without ``video_time_steps``)."""
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
    positions = np.ones((3, batch, length), dtype=np.int64)
    grids = {image_token_id: ("image", image_grid_thw), video_token_id: ("video", video_grid_thw)}
    used = {image_token_id: 0, video_token_id: 0}
    media = [image_token_id] if video_token_id is None else [image_token_id, video_token_id]
    for b in range(batch):
        keep = mask[b] == 1
        tokens = input_ids[b][keep]
        starts = np.nonzero(np.isin(tokens[1:], media) & (tokens[:-1] == vision_start_token_id))[0] + 1
        parts, cursor, next_pos = [], 0, 0
        for start in starts:
            token = int(tokens[start])
            kind, given = grids[token]
            if given is None or used[token] >= len(given):
                raise ValueError(f"the prompt has more {kind} slots than {kind}s were given")
            t, h, w = (int(v) for v in given[used[token]])
            step = np.float32(1)
            if token == video_token_id and video_time_steps is not None:
                step = np.float32(video_time_steps[used[token]])
            used[token] += 1
            gh, gw = h // merge, w // merge
            n_text = start - cursor
            parts.append(np.broadcast_to(np.arange(n_text) + next_pos, (3, n_text)))
            times = (np.arange(t, dtype=np.float32) * step).astype(np.int64)
            grid = np.stack(np.meshgrid(times, np.arange(gh), np.arange(gw), indexing="ij")).reshape(3, -1)
            start_pos = next_pos + n_text
            parts.append(grid + start_pos)
            next_pos = start_pos + max(gh, gw)
            cursor = start + t * gh * gw
        n_text = len(tokens) - cursor
        parts.append(np.broadcast_to(np.arange(n_text) + next_pos, (3, n_text)))
        positions[:, b, keep] = np.concatenate(parts, axis=1)
    return positions


# ------------------------------------------------------------------------------------------------------ model


class Qwen2VLModel(nn.Module):
    def __init__(self, config: ModelConfig, vision_tower: type[nn.Module], language_model: nn.Module) -> None:
        super().__init__()
        self.visual = vision_tower(config.vision)
        self.language_model = language_model


class Model(TextGeneration, nn.Module):
    """Qwen2-VL for generation. ``__call__`` takes the Hugging Face processor's tensors; the runtime uses the
    split steps (``embed_prompt``, ``hidden_states``, ``compute_logits``) for chunked prefill and decode."""

    vision_config_class = VisionConfig
    vision_tower = VisionTransformer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2VLModel(config, self.vision_tower, self.language_model_for(config))
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        return cls(ModelConfig.from_hf(config, cls.vision_config_class))

    @staticmethod
    def language_model_for(config: ModelConfig) -> nn.Module:
        """The text decoder, with M-RoPE over its whole head dim."""
        rotary = MultimodalRotary(
            config.text.attention_head_dim, config.rope_theta, config.mrope_section, config.mrope_interleaved
        )
        return TextDecoder(config.text, rotary)

    # -- runtime protocol (the decoder steps come from TextGeneration)
    def embed_prompt(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        image_grid_thw: mx.array | None = None,
        attention_mask: mx.array | None = None,
        pixel_values_videos: mx.array | None = None,
        video_grid_thw: mx.array | None = None,
        second_per_grid_ts: mx.array | None = None,
        *,
        vision_cache: VisionFeatureCache | None = None,
    ) -> PromptEmbedding:
        """Token embeddings with the image and video features merged in, and their M-RoPE positions
        (``second_per_grid_ts``: Qwen2.5-VL's seconds per temporal patch of each video). With a
        ``vision_cache``, images seen before (same pixels, grid and model) reuse their features instead of
        running the vision tower."""
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw must be given together")
        if (pixel_values_videos is None) != (video_grid_thw is None):
            raise ValueError("pixel_values_videos and video_grid_thw must be given together")
        embeds = self.prompt_token_embeddings(input_ids)
        grid = None
        if pixel_values is not None:
            grid = np.asarray(image_grid_thw).astype(np.int64).reshape(-1, 3)
            features = self._image_features(pixel_values, grid, vision_cache)
            embeds = merge_features(embeds, input_ids, self.config.image_token_id, features)
        frames = steps = None
        if pixel_values_videos is not None:
            video_grid = np.asarray(video_grid_thw).astype(np.int64).reshape(-1, 3)
            # Videos bypass the vision feature cache: a clip is rarely sent twice, and its frames would crowd out
            # the images the cache is sized for.
            features = self.model.visual(pixel_values_videos, video_grid)
            embeds = merge_features(embeds, input_ids, self.config.video_token_id, features, kind="video")
            frames, steps = self.video_position_grids(video_grid, second_per_grid_ts)
        mask = None if attention_mask is None else np.asarray(attention_mask)
        positions = multimodal_position_ids(
            np.asarray(input_ids),
            grid,
            mask,
            image_token_id=self.config.image_token_id,
            vision_start_token_id=self.config.vision_start_token_id,
            merge=self.config.vision.spatial_merge_size,
            video_grid_thw=frames,
            video_token_id=None if frames is None else self.config.video_token_id,
            video_time_steps=steps,
        )
        padded = mask is not None and not bool(mask.all())
        return PromptEmbedding(embeds, mx.array(positions), attention_mask if padded else None)

    def video_position_grids(
        self, video_grid: np.ndarray, second_per_grid_ts: mx.array | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The grid each run of video tokens in the prompt takes its positions from, and the temporal position
        step of each run (None: one per temporal patch, as in Qwen2-VL)."""
        return video_grid, None

    def prompt_token_embeddings(self, input_ids: mx.array) -> mx.array:
        """The embeddings the image features replace at the image tokens (wider than the decoder in Qwen3-VL)."""
        return self.embed_tokens(input_ids)

    def _image_features(
        self, pixel_values: mx.array, grid: np.ndarray, vision_cache: VisionFeatureCache | None
    ) -> mx.array:
        """The vision tower's output for ``pixel_values`` (all images' patches, concatenated); with a
        ``vision_cache``, the tower runs once over the images it lacks and the rest come from it."""
        visual = self.model.visual
        if vision_cache is None:  # the images' patches as the processor concatenated them
            return visual(pixel_values, grid)
        patches_per_image = grid.prod(axis=1)
        patch_bounds = np.concatenate([[0], np.cumsum(patches_per_image)]).tolist()
        pixels = [pixel_values[patch_bounds[i] : patch_bounds[i + 1]] for i in range(len(grid))]
        rows_per_image = patches_per_image // self.config.vision.spatial_merge_size**2

        def encode(order: list[int]) -> list[mx.array]:
            # One tower call over the misses, each keeping its own grid row: the block-diagonal (and, in
            # Qwen2.5-VL, per-image window) attention keeps images apart, as in a call over all of them.
            batch = pixel_values if len(order) == len(grid) else mx.concatenate([pixels[i] for i in order])
            computed = visual(batch, grid[order])
            bounds = np.concatenate([[0], np.cumsum(rows_per_image[order])]).tolist()
            return [computed[bounds[j] : bounds[j + 1]] for j in range(len(order))]

        features = features_per_image(
            vision_cache,
            [(pixels[i], grid[i]) for i in range(len(grid))],
            lambda: vision_identity(self, self.config.vision, visual.dtype, visual.patch_embed),
            encode,
        )
        return features[0] if len(features) == 1 else mx.concatenate(features)

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
        second_per_grid_ts: mx.array | None = None,
    ) -> ModelOutput:
        prompt = self.embed_prompt(
            input_ids,
            pixel_values,
            image_grid_thw,
            attention_mask,
            pixel_values_videos,
            video_grid_thw,
            second_per_grid_ts,
        )
        return self.prompt_logits(prompt, cache, position_ids)

    # -- loading
    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Map any supported checkpoint layout onto this module's names. Pure and idempotent."""
        out: dict[str, mx.array] = {}
        for key, value in weights.items():
            key = _canonical_name(key)
            if key == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if key.endswith("patch_embed.proj.weight") and value.ndim == 5:
                value = _conv3d_to_linear(value, self.config.vision.in_channels)
            out[key] = value
        return out

    def mlx_community_names(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """The inverse of ``sanitize`` for writing checkpoints that MLX-community tools read."""
        c = self.config.vision
        out = {}
        for key, value in weights.items():
            if key.endswith("patch_embed.proj.weight") and value.ndim == 2:
                shape = (value.shape[0], c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
                value = value.reshape(shape).transpose(0, 2, 3, 4, 1)
            out[_mlx_community_name(key)] = value
        return out


_PREFIXES = (
    # (layout's prefix, ours); the first match wins, so the longer prefixes come first.
    ("model.language_model.", "model.language_model."),
    ("model.visual.", "model.visual."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.visual."),
    ("visual.", "model.visual."),
    ("model.", "model.language_model."),
)


def _canonical_name(key: str) -> str:
    return rename_prefix(key, _PREFIXES)


_MLX_COMMUNITY_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.visual.", "vision_tower."),
    ("lm_head.", "language_model.lm_head."),
)


def _mlx_community_name(key: str) -> str:
    return rename_prefix(key, _MLX_COMMUNITY_PREFIXES)


def _conv3d_to_linear(weight: mx.array, in_channels: int) -> mx.array:
    """Accept the PyTorch Conv3d layout (out, C, T, H, W) or MLX's (out, T, H, W, C); return (out, C*T*H*W)."""
    if weight.shape[-1] == in_channels and weight.shape[1] != in_channels:
        weight = weight.transpose(0, 4, 1, 2, 3)
    return weight.reshape(weight.shape[0], -1)
