"""MobileNetV5 (timm's ``mobilenetv5_300m_enc``), Gemma 3n's vision tower, channels last.

A 3x3 stride-2 stem, then stages of MobileNetV4 blocks: edge residuals (``er``: a full kxk expansion conv and a
1x1 projection), universal inverted residuals (``uir``: optional depthwise convs before and between a 1x1
expansion and a 1x1 projection, times a learned layer scale) and mobile multi-query attention (``mqa``: one
key/value head, optionally strided by a depthwise conv). Norms are RMS norms over channels; the activation is
tanh-approximated GELU; convolutions pad like TensorFlow's "same" (the odd pixel of a strided conv at the end).
A multi-scale fusion adapter (``msfa``) joins the last two stages' outputs (the coarser upsampled to the finer,
nearest), runs an inverted residual to 2048 channels and average-pools to ``msfa_output_resolution``².

The block list is timm's: the built-in 300M architecture in its arch-string notation, or a config's
``model_args.block_args`` (timm's decoded form, as a small test checkpoint carries). Module names follow the
published weights under ``timm_model.`` (``conv_stem.conv``, ``blocks.S.B.dw_start.conv``, ``msfa.ffn.pw_exp``); the
1x1 convolutions (most of the weights) are linear layers over the channels axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigError

__all__ = ["MobileNetV5", "MobileNetV5Config", "parse_arch"]

FUSION_WIDTH = 2048  # timm fixes the adapter's output width


def _repeat(block: str, times: int) -> list[str]:
    return [block] * times


ARCH_300M: list[list[str]] = [
    ["er_r1_k3_s2_e4_c128", "er_r1_k3_s1_e4_c128", "er_r1_k3_s1_e4_c128"],
    [
        "uir_r1_a3_k5_s2_e6_c256",
        "uir_r1_a5_k0_s1_e4_c256",
        "uir_r1_a3_k0_s1_e4_c256",
        "uir_r1_a5_k0_s1_e4_c256",
        "uir_r1_a3_k0_s1_e4_c256",
    ],
    [
        "uir_r1_a5_k5_s2_e6_c640",
        *_repeat("uir_r1_a5_k0_s1_e4_c640", 7),
        "uir_r1_a0_k0_s1_e1_c640",
        *[b for _ in range(14) for b in ("mqa_r1_k3_h12_v2_s1_d64_c640", "uir_r1_a0_k0_s1_e2_c640")],
    ],
    [
        "uir_r1_a5_k5_s2_e6_c1280",
        *[b for _ in range(19) for b in ("mqa_r1_k3_h16_s1_d96_c1280", "uir_r1_a0_k0_s1_e2_c1280")],
    ],
]
"""timm's mobilenetv5_300m arch strings (``kind_r<repeats>_<options>``)."""


def parse_arch(stages: Sequence[Sequence[str]]) -> list[list[dict[str, Any]]]:
    """timm's arch strings -> its decoded block dicts (the keys this module reads)."""
    out = []
    for stage in stages:
        blocks = []
        for text in stage:
            kind, *parts = text.split("_")
            options = {p[0]: p[1:] for p in parts}
            block: dict[str, Any] = {
                "block_type": kind,
                "out_chs": int(options["c"]),
                "stride": int(options.get("s", 1)),
                "noskip": False,
            }
            if kind == "er":
                block.update(exp_kernel_size=int(options["k"]), exp_ratio=float(options["e"]), pw_kernel_size=1)
            elif kind == "uir":
                block.update(
                    dw_kernel_size_start=int(options.get("a", 0)),
                    dw_kernel_size_mid=int(options.get("k", 0)),
                    dw_kernel_size_end=int(options.get("p", 0)),
                    exp_ratio=float(options["e"]),
                )
            elif kind == "mqa":
                block.update(
                    dw_kernel_size=int(options["k"]),
                    num_heads=int(options["h"]),
                    key_dim=int(options["d"]),
                    value_dim=int(options["d"]),
                    kv_stride=int(options.get("v", 1)),
                )
            else:
                raise ConfigError(f"MobileNetV5 block kind {kind!r} is not supported")
            blocks += [block] * int(options.get("r", 1))
        out.append(blocks)
    return out


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's channel rounding: the nearest multiple of ``divisor``, never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


@dataclass(frozen=True)
class MobileNetV5Config:
    block_args: tuple[tuple[Mapping[str, Any], ...], ...]
    stem_size: int = 64
    msfa_output_resolution: int = 16
    msfa_indices: tuple[int, ...] = (-2, -1)
    hidden_size: int = FUSION_WIDTH
    rms_norm_eps: float = 1e-6
    vocab_size: int = 128
    vocab_offset: int = 262_144

    @classmethod
    def from_hf(cls, vision: Mapping[str, Any]) -> MobileNetV5Config:
        architecture = vision.get("architecture", "mobilenetv5_300m_enc")
        args = dict(vision.get("model_args") or {})
        if "block_args" in args:
            blocks = args.pop("block_args")
        elif architecture in ("mobilenetv5_300m_enc", "mobilenetv5_300m"):
            blocks = parse_arch(ARCH_300M)
        else:
            raise ConfigError(f"vision architecture {architecture!r} is not supported (mobilenetv5_300m_enc is)")
        known = {"stem_size", "msfa_output_resolution", "msfa_indices"}
        unknown = set(args) - known
        if unknown:
            raise ConfigError(f"vision model_args {sorted(unknown)} are not supported (only {sorted(known)})")
        for stage in blocks:
            for block in stage:
                if block.get("block_type") not in ("er", "uir", "mqa") or block.get("se_ratio"):
                    raise ConfigError(f"unsupported MobileNetV5 block {dict(block)}")
        width = int(vision.get("hidden_size") or FUSION_WIDTH)
        if width != FUSION_WIDTH:
            raise ConfigError(f"vision hidden_size {width}: timm's MobileNetV5 encoder is {FUSION_WIDTH} wide")
        return cls(
            block_args=tuple(tuple(dict(b) for b in stage) for stage in blocks),
            stem_size=int(args.get("stem_size", 64)),
            msfa_output_resolution=int(args.get("msfa_output_resolution", 16)),
            msfa_indices=tuple(int(i) for i in args.get("msfa_indices", (-2, -1))),
            hidden_size=width,
            rms_norm_eps=float(vision.get("rms_norm_eps") or 1e-6),
            vocab_size=int(vision.get("vocab_size") or 128),
            vocab_offset=int(vision.get("vocab_offset") or 262_144),
        )

    @property
    def soft_tokens(self) -> int:
        return self.msfa_output_resolution**2


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def same_pad(x: mx.array, kernel: int, stride: int) -> mx.array:
    """``x`` (batch, height, width, channels) padded as TensorFlow's "same" convolution pads (the odd pixel of
    a strided one at the end)."""
    if kernel == 1:
        return x
    (top, bottom), (left, right) = (_same_padding(n, kernel, stride) for n in x.shape[1:3])
    return mx.pad(x, [(0, 0), (top, bottom), (left, right), (0, 0)])


def _conv(dims: int, out: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Module:
    """A convolution; a 1x1 one is the linear layer it is over the channels axis (so LoRA and quantization treat
    it as one; its checkpoint weight (out, in, 1, 1) is stored as (out, in))."""
    if kernel == 1 and stride == 1 and groups == 1:
        return nn.Linear(dims, out, bias=bias)
    return nn.Conv2d(dims, out, kernel, stride=stride, groups=groups, bias=bias)


class RMSNorm2d(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = mx.ones((channels,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


def _gelu(x: mx.array) -> mx.array:
    return nn.gelu_approx(x)


class ConvNormAct(nn.Module):
    """``conv`` then ``bn`` (an RMS norm) then, unless told otherwise, GELU."""

    def __init__(
        self, dims: int, out: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False, act: bool = True
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.act = kernel, stride, act
        self.conv = _conv(dims, out, kernel, stride, groups, bias)
        self.bn = RMSNorm2d(out)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.bn(self.conv(same_pad(x, self.kernel, self.stride)))
        return _gelu(x) if self.act else x


class LayerScale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = mx.ones((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.gamma


class EdgeResidual(nn.Module):
    def __init__(self, dims: int, b: Mapping[str, Any]) -> None:
        super().__init__()
        out, stride = int(b["out_chs"]), int(b["stride"])
        mid = make_divisible((int(b.get("force_in_chs") or 0) or dims) * float(b["exp_ratio"]))
        self.kernel, self.stride = int(b["exp_kernel_size"]), stride
        self.conv_exp = nn.Conv2d(dims, mid, self.kernel, stride=stride, bias=False)
        self.bn1 = RMSNorm2d(mid)
        self.conv_pwl = _conv(mid, out, int(b.get("pw_kernel_size", 1)))
        self.bn2 = RMSNorm2d(out)
        self.skip = dims == out and stride == 1 and not b.get("noskip")

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv_exp(same_pad(x, self.kernel, self.stride))
        h = self.bn2(self.conv_pwl(_gelu(self.bn1(h))))
        return h + x if self.skip else h


class UniversalInvertedResidual(nn.Module):
    def __init__(self, dims: int, b: Mapping[str, Any], layer_scale: bool = True) -> None:
        super().__init__()
        out, stride = int(b["out_chs"]), int(b["stride"])
        start, mid_k, end = (
            int(b.get(k) or 0) for k in ("dw_kernel_size_start", "dw_kernel_size_mid", "dw_kernel_size_end")
        )
        if end:
            raise ConfigError("MobileNetV5 blocks with a trailing depthwise conv are not supported")
        mid = make_divisible(dims * float(b["exp_ratio"]))
        if start:
            self.dw_start = ConvNormAct(dims, dims, start, stride if not mid_k else 1, groups=dims, act=False)
        self.pw_exp = ConvNormAct(dims, mid, 1)
        if mid_k:
            self.dw_mid = ConvNormAct(mid, mid, mid_k, stride, groups=mid)
        self.pw_proj = ConvNormAct(mid, out, 1, act=False)
        if layer_scale:
            self.layer_scale = LayerScale(out)
        self.skip = dims == out and stride == 1 and not b.get("noskip")

    def __call__(self, x: mx.array) -> mx.array:
        h = self.dw_start(x) if "dw_start" in self else x
        h = self.pw_exp(h)
        if "dw_mid" in self:
            h = self.dw_mid(h)
        h = self.pw_proj(h)
        if "layer_scale" in self:
            h = self.layer_scale(h)
        return h + x if self.skip else h


class KeyValueBranch(nn.Module):
    """``down_conv`` (a strided depthwise conv) and ``norm`` where the block strides keys and values, then
    ``proj`` to the single head."""

    def __init__(self, dims: int, width: int, kernel: int, stride: int) -> None:
        super().__init__()
        if stride > 1:
            self.down_conv = nn.Conv2d(dims, dims, kernel, stride=stride, groups=dims, bias=False)
            self.norm = RMSNorm2d(dims)
        self.kernel, self.stride = kernel, stride
        self.proj = nn.Linear(dims, width, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if "down_conv" in self:
            x = self.norm(self.down_conv(same_pad(x, self.kernel, self.stride)))
        return self.proj(x)


class Projection(nn.Module):
    def __init__(self, dims: int, out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dims, out, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)


class MultiQueryAttention(nn.Module):
    def __init__(self, dims: int, out: int, b: Mapping[str, Any]) -> None:
        super().__init__()
        self.heads, self.key_dim, self.value_dim = int(b["num_heads"]), int(b["key_dim"]), int(b["value_dim"])
        kernel, stride = int(b["dw_kernel_size"]), int(b.get("kv_stride", 1))
        self.query = Projection(dims, self.heads * self.key_dim)
        self.key = KeyValueBranch(dims, self.key_dim, kernel, stride)
        self.value = KeyValueBranch(dims, self.value_dim, kernel, stride)
        self.output = Projection(self.heads * self.value_dim, out)

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, _ = x.shape
        q = self.query(x).reshape(batch, -1, self.heads, self.key_dim).transpose(0, 2, 1, 3)
        k = self.key(x).reshape(batch, 1, -1, self.key_dim)
        v = self.value(x).reshape(batch, 1, -1, self.value_dim)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.key_dim**-0.5)
        return self.output(out.transpose(0, 2, 1, 3).reshape(batch, height, width, -1))


class MobileAttention(nn.Module):
    def __init__(self, dims: int, b: Mapping[str, Any]) -> None:
        super().__init__()
        out, stride = int(b["out_chs"]), int(b["stride"])
        if stride != 1 or b.get("query_strides", 1) not in (1, (1, 1), [1, 1]):
            raise ConfigError("MobileNetV5 attention with strided queries is not supported")
        self.norm = RMSNorm2d(dims)
        self.attn = MultiQueryAttention(dims, out, b)
        self.layer_scale = LayerScale(out)
        self.skip = dims == out and not b.get("noskip")

    def __call__(self, x: mx.array) -> mx.array:
        h = self.layer_scale(self.attn(self.norm(x)))
        return h + x if self.skip else h


class FusionAdapter(nn.Module):
    """``msfa``: the stages' outputs at the finest one's resolution (nearest upsampling), concatenated, an
    inverted residual to the fusion width, average-pooled to the output resolution, RMS-normed."""

    def __init__(self, dims: int, c: MobileNetV5Config) -> None:
        super().__init__()
        block = {"out_chs": c.hidden_size, "stride": 1, "dw_kernel_size_mid": 0, "exp_ratio": 2.0, "noskip": True}
        self.ffn = UniversalInvertedResidual(dims, block, layer_scale=False)
        self.norm = RMSNorm2d(c.hidden_size)
        self.resolution = c.msfa_output_resolution

    def __call__(self, features: list[mx.array]) -> mx.array:
        height, width = features[0].shape[1:3]
        resized = []
        for x in features:
            h, w = x.shape[1:3]
            if h < height or w < width:
                rows = mx.minimum((mx.arange(height) * (h / height)).astype(mx.int32), h - 1)
                cols = mx.minimum((mx.arange(width) * (w / width)).astype(mx.int32), w - 1)
                x = x[:, rows][:, :, cols]
            resized.append(x)
        x = self.ffn(mx.concatenate(resized, axis=-1))
        out = self.resolution
        if (height, width) != (out, out):
            if height % out or width % out:
                raise ValueError(
                    f"MobileNetV5: a {height}x{width} feature map does not pool evenly to {out}x{out}; "
                    "give images of the processor's size"
                )
            sh, sw = height // out, width // out
            x = x.reshape(x.shape[0], out, sh, out, sw, x.shape[-1]).mean(axis=(2, 4))
        return self.norm(x)


def _block(dims: int, b: Mapping[str, Any]) -> nn.Module:
    kind = b["block_type"]
    if kind == "er":
        return EdgeResidual(dims, b)
    if kind == "uir":
        return UniversalInvertedResidual(dims, b)
    return MobileAttention(dims, b)


class MobileNetV5(nn.Module):
    """``timm_model``: pixels (images, height, width, 3) in [0, 1] -> (images, res, res, 2048)."""

    def __init__(self, config: MobileNetV5Config) -> None:
        super().__init__()
        self.config = config
        self.conv_stem = ConvNormAct(3, config.stem_size, 3, stride=2, bias=True)
        dims, self.blocks, stage_widths = config.stem_size, [], [config.stem_size]
        for stage in config.block_args:
            blocks = []
            for b in stage:
                blocks.append(_block(dims, b))
                dims = int(b["out_chs"])
            self.blocks.append(blocks)
            stage_widths.append(dims)
        n = len(stage_widths)
        self._taps = sorted(i % n for i in config.msfa_indices)
        self.msfa = FusionAdapter(sum(stage_widths[i] for i in self._taps), config)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.conv_stem(pixels)
        taps = [x] if 0 in self._taps else []
        for index, stage in enumerate(self.blocks, start=1):
            for block in stage:
                x = block(x)
            if index in self._taps:
                taps.append(x)
        return self.msfa(taps)
