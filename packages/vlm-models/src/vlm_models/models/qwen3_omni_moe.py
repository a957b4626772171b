"""Qwen3-Omni-MoE's thinker (``qwen3_omni_moe``): text out from text, images, videos and audio, a video's own
sound track included.

Qwen3-VL-MoE's parts (the vision tower with deepstack, the sparse Qwen3 decoder with interleaved M-RoPE) and
Qwen2.5-Omni's (``OmniThinker``: audio features merged beside the media, the published ``thinker.*`` layout).
What is particular here:

* the audio encoder: each 1 s chunk (``2 * n_window`` mel frames, every chunk of a call padded to the longest)
  goes through three stride-2 3x3 convolutions over (mel, time), one token per 80 ms, a projection and fixed
  positions restarting at each chunk; then the transformer layers attend within windows of ``n_window_infer``
  frames of each clip, and a norm and two projections map to the text width (no pooling);
* positions: a video's temporal patch i sits ``i * seconds_per_patch * position_id_per_seconds`` in (13 a
  second), unrounded; a video heard with its sound track (``<|vision_start|><|audio_start|>`` ...
  ``<|audio_end|><|vision_end|>``) interleaves its video and audio tokens one by one in time order, the audio
  one position per token from the video's start, and the two begin / end tokens take consecutive positions;
* the vision mergers keep transformers' names (``ln_q``, ``mlp.0`` / ``mlp.2``, ``merger_list``).

Module names follow transformers 5's thinker; ``sanitize`` maps the published checkpoint (``thinker.*`` beside the
talker and code2wav, which a text-out model drops; one MLP per expert) onto them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ConfigError, from_dict
from ..nn.checkpoint import rename_prefix
from ..nn.decoder import DecoderConfig
from ..nn.layers import activation
from ..nn.moe import expert_weights, mlx_community_expert_names
from ..nn.whisper import EncoderLayer, WhisperEncoderConfig, chunk_lengths, sinusoid_positions
from ..processors.qwen3_omni_moe import audio_token_count, conv_length
from . import qwen2_vl, qwen3_vl, qwen3_vl_moe
from .qwen2_5_omni import OmniThinker, thinker_fields, thinker_sections

# Qwen3OmniMoeTextConfig's defaults that the published config may leave out.
TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=152064,  # the published vocabulary (the config class's own default, 3584, is no real one)
    hidden_size=2048,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    norm_topk_prob=True,
)


@dataclass(frozen=True)
class AudioConfig:
    encoder: WhisperEncoderConfig
    n_window: int = 50
    """Convolutions run over chunks of ``2 * n_window`` mel frames (1 s at the default)."""
    n_window_infer: int = 800
    """Attention runs within windows of this many mel frames of a clip (a whole number of chunks)."""
    downsample_hidden_size: int = 480
    output_dim: int = 3584

    @classmethod
    def from_hf(cls, audio: Mapping[str, Any]) -> AudioConfig:
        values = {k: v for k, v in audio.items() if v is not None}
        names = ("n_window", "n_window_infer", "downsample_hidden_size", "output_dim")
        config = cls(WhisperEncoderConfig.from_hf(values), **{k: int(values[k]) for k in names if k in values})
        if config.n_window_infer < 2 * config.n_window or config.n_window_infer % (2 * config.n_window):
            raise ConfigError(
                f"audio_config.n_window_infer {config.n_window_infer} must be a multiple of 2 * n_window "
                f"({2 * config.n_window})"
            )
        return config


@dataclass(frozen=True)
class ModelConfig(qwen2_vl.ModelConfig):
    audio: AudioConfig = field(default_factory=lambda: AudioConfig(WhisperEncoderConfig()))
    audio_token_id: int = 151646
    audio_start_token_id: int = 151647
    position_id_per_seconds: float = 13

    @classmethod
    def from_omni(cls, config: Mapping[str, Any]) -> ModelConfig:
        """From the published config (the thinker's section of ``qwen3_omni_moe``) or a thinker's own."""
        thinker, text = thinker_sections(config, TEXT_DEFAULTS, default_window=None)
        moe = qwen3_vl_moe.moe_config(text)
        # No shared expert in this family, whatever the config carries for one.
        moe = dataclasses.replace(
            moe, norm_topk_prob=bool(text.get("norm_topk_prob", True)), shared_expert_intermediate_size=0
        )
        decoder = from_dict(DecoderConfig, text, qk_norm=True, moe=moe)
        base = qwen2_vl.ModelConfig.from_hf(
            {"model_type": "qwen3_omni_moe", "text_config": text, "vision_config": thinker.get("vision_config") or {}},
            qwen3_vl.VisionConfig,
            decoder,
        )
        fields = thinker_fields(base, thinker)
        fields.update(mrope_interleaved=True)  # always, as in transformers
        return cls(**fields, audio=AudioConfig.from_hf(thinker.get("audio_config") or {}))


# ------------------------------------------------------------------------------------------------ audio tower


def window_mask(clip_tokens: Sequence[int], window: int) -> mx.array:
    """(1, 1, n, n) attention within windows of ``window`` tokens, each clip cut on its own (its last window
    shorter)."""
    lengths = [w for n in clip_tokens for w in chunk_lengths(n, window)]
    segments = np.repeat(np.arange(len(lengths)), lengths)
    return mx.array(segments[:, None] == segments[None, :])[None, None]


class AudioEncoder(nn.Module):
    """(clips, mel bins, frames) log-mel features and each clip's real frame count -> one (tokens, output_dim)
    array per clip."""

    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        self.config = config
        c, width = config.encoder, config.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, width, 3, stride=2, padding=1)
        self.conv2d2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.conv2d3 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.conv_out = nn.Linear(width * conv_length(c.num_mel_bins), c.d_model, bias=False)
        self.layers = [EncoderLayer(c, key_bias=True) for _ in range(c.encoder_layers)]
        self.ln_post = nn.LayerNorm(c.d_model)
        self.proj1 = nn.Linear(c.d_model, c.d_model)
        self.proj2 = nn.Linear(c.d_model, config.output_dim)
        self._act = activation(c.activation_function)
        self._positions = sinusoid_positions(c.max_source_positions, c.d_model)

    @property
    def dtype(self) -> mx.Dtype:
        return self.ln_post.weight.dtype

    def chunk_embeddings(self, chunks: mx.array) -> mx.array:
        """(chunks, mel, frames) -> (chunks, positions, d_model): the convolutions over (mel, time)."""
        x = chunks[..., None].astype(self.dtype)  # NHWC: mel is the height, time the width
        for conv in (self.conv2d1, self.conv2d2, self.conv2d3):
            x = nn.gelu(conv(x))
        b, f, t, c = x.shape
        # transformers flattens channels-major then mel: (chunks, time, channels * mel)
        x = self.conv_out(x.transpose(0, 2, 3, 1).reshape(b, t, c * f))
        return x + self._positions[:t].astype(x.dtype)

    def __call__(self, input_features: mx.array, frames: Sequence[int]) -> list[mx.array]:
        chunk = 2 * self.config.n_window
        pieces, lengths, per_clip = [], [], []
        for clip, n in zip(input_features, frames):
            lengths_of_clip = chunk_lengths(int(n), chunk)
            for start, length in zip(range(0, int(n), chunk), lengths_of_clip):
                pieces.append(clip[:, start : start + length])
                lengths.append(length)
            per_clip.append(len(lengths_of_clip))
        # Every chunk is padded to the call's longest, as transformers does: the convolutions see that padding.
        longest = max(lengths)
        x = self.chunk_embeddings(mx.stack([mx.pad(p, [(0, 0), (0, longest - p.shape[1])]) for p in pieces]))
        valid = [conv_length(n) for n in lengths]
        tokens = mx.concatenate([x[i, :v] for i, v in enumerate(valid)])
        # Attention windows: n_window_infer frames' worth of the longest chunk's tokens, within each clip.
        window = max(valid) * (self.config.n_window_infer // chunk)
        clip_tokens, row = [], 0
        for count in per_clip:
            clip_tokens.append(sum(valid[row : row + count]))
            row += count
        h = tokens[None]
        mask = window_mask(clip_tokens, window)
        for layer in self.layers:
            h = layer(h, mask)
        h = self.proj2(self._act(self.proj1(self.ln_post(h[0]))))
        bounds = np.concatenate([[0], np.cumsum(clip_tokens)]).tolist()
        return [h[bounds[i] : bounds[i + 1]] for i in range(len(clip_tokens))]


# ----------------------------------------------------------------------------------------------- vision tower


class PatchMerger(qwen2_vl.PatchMerger):
    """Qwen3-VL's merger under transformers' Qwen3-Omni names: the main one norms each patch, the deepstack ones
    norm the concatenated group (``postshuffle_norm``)."""

    def __init__(self, c: qwen3_vl.VisionConfig, postshuffle_norm: bool) -> None:
        merged = c.hidden_size * c.spatial_merge_size**2
        width = merged if postshuffle_norm else c.hidden_size
        super().__init__(c.out_hidden_size, c.hidden_size, c.spatial_merge_size, lambda _: nn.LayerNorm(width, 1e-6))
        self.postshuffle_norm = postshuffle_norm

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x.reshape(-1, self.merged_width) if self.postshuffle_norm else x)


class VisionTransformer(qwen3_vl.VisionTransformer):
    def make_mergers(self, c: qwen3_vl.VisionConfig) -> None:
        self.merger = PatchMerger(c, postshuffle_norm=False)
        self.merger_list = [PatchMerger(c, postshuffle_norm=True) for _ in c.deepstack_visual_indexes]

    @property
    def deepstack_mergers(self) -> list[nn.Module]:
        return self.merger_list

    @property
    def dtype(self) -> mx.Dtype:
        return self.merger.ln_q.weight.dtype


# ----------------------------------------------------------------------------------------- positions (M-RoPE)


@dataclass(frozen=True)
class OmniPositions:
    """What the 3D positions of a prompt depend on besides its tokens (transformers' rule for Qwen3-Omni)."""

    image_token_id: int
    video_token_id: int
    audio_token_id: int
    vision_start_token_id: int
    audio_start_token_id: int
    merge: int
    position_id_per_seconds: float

    def grid(self, grid: Sequence[int], seconds: np.float32) -> np.ndarray:
        """(3, tokens) float32 offsets of a grid's merged patches: temporal patch i at ``i * seconds * 13``."""
        t, h, w = (int(v) for v in grid)
        times = np.arange(t, dtype=np.float32) * seconds * np.float32(self.position_id_per_seconds)
        gh, gw = h // self.merge, w // self.merge
        rows, cols = np.arange(gh, dtype=np.float32), np.arange(gw, dtype=np.float32)
        return np.stack(np.meshgrid(times, rows, cols, indexing="ij")).reshape(3, -1)

    def row(self, tokens: np.ndarray, images: list, videos: list, seconds: list, clips: list) -> np.ndarray:
        """(3, len(tokens)) positions of one unpadded row; the media lists are consumed in order."""
        blocks: list[np.ndarray] = []

        def after() -> np.float32:  # transformers continues from the largest position of the last block
            return blocks[-1].max() + 1 if blocks else np.float32(0)

        def line(n: int) -> None:
            if n > 0:
                blocks.append(np.broadcast_to(np.arange(n, dtype=np.float32) + after(), (3, n)))

        def take(pool: list, kind: str) -> Any:
            if not pool:
                raise ValueError(f"the prompt has more {kind} slots than {kind}s were given")
            return pool.pop(0)

        media = [self.image_token_id, self.video_token_id, self.audio_token_id]
        cursor = 0
        while True:
            found = np.nonzero(np.isin(tokens[cursor:], media))[0]
            if not len(found):
                break
            k = cursor + int(found[0])  # the medium's first token, after its opening token(s)
            heard = (
                k >= 2 and tokens[k - 1] == self.audio_start_token_id and tokens[k - 2] == self.vision_start_token_id
            )
            line(k - cursor)  # the text, then the opening token(s): one run
            start = after()
            if heard:
                video = self.grid(take(videos, "video"), take(seconds, "video")) + start
                n = take(clips, "audio clip")
                audio = np.broadcast_to(np.arange(n, dtype=np.float32) + start, (3, n))
                blocks.extend(interleave_in_time(video, audio))
                count = video.shape[1] + n
            elif tokens[k] == self.audio_token_id:
                count = take(clips, "audio clip")
                blocks.append(np.broadcast_to(np.arange(count, dtype=np.float32) + start, (3, count)))
            else:
                image = tokens[k] == self.image_token_id
                grid = self.grid(take(images, "image"), np.float32(1)) if image else None
                if grid is None:
                    grid = self.grid(take(videos, "video"), take(seconds, "video"))
                blocks.append(grid + start)
                count = grid.shape[1]
            line(2 if heard else 1)  # the closing token(s)
            cursor = k + count + (2 if heard else 1)
        line(len(tokens) - cursor)
        positions = np.concatenate(blocks, axis=1) if blocks else np.zeros((3, 0), np.float32)
        if positions.shape[1] != len(tokens):
            raise ValueError("the prompt's media tokens do not match the media given (a slot was cut or altered)")
        return positions

    def __call__(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None,
        image_grid: np.ndarray | None,
        video_grid: np.ndarray | None,
        video_seconds: np.ndarray | None,
        audio_tokens: Sequence[int] = (),
    ) -> np.ndarray:
        """(3, batch, length) positions; padding sits at 1, as in the reference. Whole numbers come back as
        int64; a fractional one (a frame rate that does not divide the temporal patch's positions) is refused,
        since the decode steps count positions in whole numbers."""
        batch, length = input_ids.shape
        mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = np.ones((3, batch, length), dtype=np.float32)
        images = [] if image_grid is None else list(image_grid)
        videos = [] if video_grid is None else list(video_grid)
        seconds = [] if video_seconds is None else list(video_seconds)
        clips = list(audio_tokens)
        for b in range(batch):
            keep = mask[b] == 1
            positions[:, b, keep] = self.row(input_ids[b][keep], images, videos, seconds, clips)
        if not np.array_equal(positions, np.round(positions)):
            raise ValueError(
                "the video's temporal positions are fractional (seconds per temporal patch x "
                f"{self.position_id_per_seconds:g} is not whole): choose a frame rate that divides them"
            )
        return positions.astype(np.int64)


def interleave_in_time(video: np.ndarray, audio: np.ndarray) -> list[np.ndarray]:
    """A heard video's tokens, as transformers orders them: one at a time, a video token first while its time
    is not past the next audio token's, then whatever is left of either as one block."""
    blocks, v, a = [], 0, 0
    while v < video.shape[1] and a < audio.shape[1]:
        if video[0, v] <= audio[0, a]:
            blocks.append(video[:, v : v + 1])
            v += 1
        else:
            blocks.append(audio[:, a : a + 1])
            a += 1
    if v < video.shape[1]:
        blocks.append(video[:, v:])
    if a < audio.shape[1]:
        blocks.append(audio[:, a:])
    return blocks


# ------------------------------------------------------------------------------------------------------ model


class Model(OmniThinker, qwen3_vl_moe.Model):
    """The Qwen3-Omni-MoE thinker for generation; the runtime uses the split steps."""

    vision_config_class = qwen3_vl.VisionConfig
    vision_tower = VisionTransformer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.model.audio_tower = AudioEncoder(config.audio)
        c = config
        self._position_rule = OmniPositions(
            c.image_token_id,
            c.video_token_id,
            c.audio_token_id,
            c.vision_start_token_id,
            c.audio_start_token_id,
            c.vision.spatial_merge_size,
            c.position_id_per_seconds,
        )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        return cls(ModelConfig.from_omni(config))

    def video_time_steps(self, video_grid: np.ndarray, seconds_per_grid: mx.array | None) -> np.ndarray:
        """Seconds per temporal patch of each video (float32; the position rule scales them)."""
        seconds = np.ones(len(video_grid), np.float32)
        if seconds_per_grid is not None:
            seconds = np.asarray(seconds_per_grid, dtype=np.float32).reshape(-1)
            if len(seconds) != len(video_grid):
                raise ValueError(f"video_second_per_grid has {len(seconds)} values for {len(video_grid)} video(s)")
        return seconds

    def position_ids(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None,
        image_grid: np.ndarray | None,
        video_grid: np.ndarray | None,
        video_seconds: np.ndarray | None,
        feature_attention_mask: mx.array | None,
    ) -> np.ndarray:
        frames = [] if feature_attention_mask is None else np.asarray(feature_attention_mask).sum(axis=-1).tolist()
        clips = [audio_token_count(int(n), self.config.audio.n_window) for n in frames]
        return self._position_rule(input_ids, attention_mask, image_grid, video_grid, video_seconds, clips)

    # -- loading
    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Map the published layout (or transformers 5's thinker) onto this module's names: the speech parts
        dropped, the experts stacked, the convolutions in MLX's layout. Pure and idempotent."""
        out: dict[str, mx.array] = {}
        width = self.config.audio.downsample_hidden_size
        for key, value in weights.items():
            if key.startswith(_SPEECH_PREFIXES):
                continue
            key = rename_prefix(key, _PREFIXES)
            if key == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if key.endswith("patch_embed.proj.weight") and value.ndim == 5:
                value = qwen2_vl._conv3d_to_linear(value, self.config.vision.in_channels)
            elif key.startswith("model.audio_tower.conv2d") and value.ndim == 4:
                in_channels = 1 if key.startswith("model.audio_tower.conv2d1.") else width
                if value.shape[1] == in_channels and value.shape[-1] != in_channels:  # PyTorch's (out, in, kh, kw)
                    value = value.transpose(0, 2, 3, 1)
            out[key] = value
        text = self.config.text
        return expert_weights(out, hidden=text.hidden_size, intermediate=text.moe.moe_intermediate_size)

    def mlx_community_names(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """The published thinker names (experts as MLX-community ``switch_mlp``), which ``sanitize`` reads back."""
        return {rename_prefix(mlx_community_expert_names(k), _PUBLISHED_PREFIXES): v for k, v in weights.items()}


_SPEECH_PREFIXES = ("talker.", "code2wav.")
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
