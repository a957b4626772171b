"""Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5): the gated delta rule and the layer built on it.

Per value head the layer keeps a (key_dim, value_dim) memory S instead of keys and values. Each token decays it,
S <- exp(g) S, then writes the part of its value that S does not predict yet, S <- S + beta k (v - S^T k)^T (the
delta rule), and reads it with its query, o = S^T q. Queries and keys are L2-normalised, queries scaled by
key_dim^-1/2; a short causal depthwise convolution mixes neighbouring tokens first.

Two ways to compute the same rule:

* ``gated_delta_step``: one token, in plain mlx ops (the oracle the chunked form is tested against; decoding
  runs ``vlm_kernels.gated_delta.gated_delta_decode``, the same step fused with the gates and normalisation).
* ``gated_delta_chunked``: a prompt, in chunks of 64 tokens (the "WY"/UT form transformers' reference uses): within
  a chunk the updates are one triangular solve and a few matmuls, and only the state passes from chunk to chunk,
  so a prompt costs T/64 sequential steps instead of T.

Both start from and return the state, so a prompt may be prefilled in pieces and decoding continues from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vlm_kernels.gated_delta import delta_rule_step, gate_and_strength, gated_delta_decode, l2_normalize

__all__ = [
    "CausalConv1d",
    "GatedDeltaNet",
    "GatedRMSNorm",
    "LinearAttentionConfig",
    "gated_delta_chunked",
    "gated_delta_step",
    "l2_normalize",
]

CHUNK = 64


@dataclass(frozen=True)
class LinearAttentionConfig:
    hidden_size: int
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int = 4
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.num_value_heads % self.num_key_heads:
            raise ValueError(
                f"linear attention: {self.num_value_heads} value heads do not share {self.num_key_heads} key heads "
                "evenly"
            )
        if self.conv_kernel < 1:
            raise ValueError(f"linear attention: conv kernel must be at least 1, got {self.conv_kernel}")

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


gated_delta_step = delta_rule_step
"""One token of the rule in mlx ops (vlm_kernels' own, the oracle the chunked form is tested against)."""


def _unit_lower_solve(lower: mx.array, rhs: mx.array) -> mx.array:
    """X with (I + lower) X = rhs, ``lower`` strictly lower triangular (..., n, n): forward substitution, all
    leading axes (batch, heads, chunks) at once."""
    n = lower.shape[-1]
    x = rhs
    for i in range(1, n):
        row = rhs[..., i : i + 1, :] - lower[..., i : i + 1, :i] @ x[..., :i, :]
        x = mx.concatenate([x[..., :i, :], row, x[..., i + 1 :, :]], axis=-2)
    return x


def gated_delta_chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    chunk: int = CHUNK,
) -> tuple[mx.array, mx.array]:
    """The gated delta rule over a sequence, ``chunk`` tokens at a time.

    ``q``, ``k``: (batch, heads, T, key_dim), normalised and scaled; ``v``: (batch, heads, T, value_dim); ``g``,
    ``beta``: (batch, heads, T); ``state``: (batch, heads, key_dim, value_dim). All float32. Returns the outputs
    (batch, heads, T, value_dim) and the state after the last token: what ``gated_delta_step`` gives token by token.
    """
    batch, heads, length, _ = k.shape
    pad = -length % chunk
    if pad:
        # Padding keys are zero and decay nothing: the state passes through them unchanged.
        q, k, v = (mx.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)]) for x in (q, k, v))
        g, beta = (mx.pad(x, [(0, 0), (0, 0), (0, pad)]) for x in (g, beta))
    n_chunks = (length + pad) // chunk

    def chunked(x: mx.array) -> mx.array:
        return x.reshape(batch, heads, n_chunks, chunk, *x.shape[3:])

    q, k, v, g, beta = (chunked(x) for x in (q, k, v, g, beta))
    decay = mx.cumsum(g, axis=-1)  # log of the decay from the chunk's start through each token
    causal = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_))
    # exp(decay_i - decay_j) for j <= i: the decay between tokens j and i; masked before exp, which could overflow.
    pairwise = mx.where(causal, mx.exp(mx.where(causal, decay[..., :, None] - decay[..., None, :], 0.0)), 0.0)
    k_beta = k * beta[..., None]
    lower = mx.where(mx.tril(causal, -1), (k_beta @ k.swapaxes(-1, -2)) * pairwise, 0.0)
    # The chunk's updates, each correcting for the ones before it, in one solve: the values to write ("u") and the
    # decayed keys through which they read the state the chunk starts from.
    solved = _unit_lower_solve(lower, mx.concatenate([v * beta[..., None], k_beta * mx.exp(decay)[..., None]], -1))
    new_values, read_keys = solved[..., : v.shape[-1]], solved[..., v.shape[-1] :]
    intra = (q @ k.swapaxes(-1, -2)) * pairwise
    q_decayed = q * mx.exp(decay)[..., None]
    k_decayed = k * mx.exp(decay[..., -1:] - decay)[..., None]
    chunk_decay = mx.exp(decay[..., -1])[..., None, None]
    outputs = []
    for c in range(n_chunks):
        values = new_values[:, :, c] - read_keys[:, :, c] @ state
        outputs.append(q_decayed[:, :, c] @ state + intra[:, :, c] @ values)
        state = state * chunk_decay[:, :, c] + k_decayed[:, :, c].swapaxes(-1, -2) @ values
    out = mx.concatenate(outputs, axis=2) if n_chunks > 1 else outputs[0]
    return out[:, :, :length], state


class CausalConv1d(nn.Module):
    """Depthwise causal convolution over time, its weight (channels, kernel, 1) as MLX's ``Conv1d`` stores it.

    Continues from the ``kernel - 1`` inputs before the new ones (zeros at the start of a sequence).
    """

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.weight = mx.zeros((channels, kernel, 1))

    def __call__(self, x: mx.array, previous: mx.array | None) -> tuple[mx.array, mx.array]:
        """``x`` (batch, T, channels); returns silu(conv) (batch, T, channels) and the window it read: the
        previous inputs then ``x`` (``state_after`` cuts the next call's previous inputs from it)."""
        batch, length, channels = x.shape
        if previous is None:
            previous = mx.zeros((batch, self.kernel - 1, channels), x.dtype)
        window = mx.concatenate([previous.astype(x.dtype), x], axis=1)
        weight = self.weight[..., 0].astype(x.dtype)
        out = window[:, :length] * weight[:, 0]
        for j in range(1, self.kernel):
            out = out + window[:, j : j + length] * weight[:, j]
        return nn.silu(out), window

    def state_after(self, window: mx.array, n_tokens: int) -> mx.array:
        """The ``kernel - 1`` inputs before token ``n_tokens`` of the call that read ``window``."""
        return window[:, n_tokens : n_tokens + self.kernel - 1]


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, then times silu(gate) (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        normed = mx.fast.rms_norm(x.astype(mx.float32), None, self.eps).astype(x.dtype)
        return (self.weight * normed * nn.silu(gate.astype(mx.float32))).astype(x.dtype)


class GatedDeltaNet(nn.Module):
    """The linear-attention token mixer. Attribute names follow transformers' weight names.

    ``cache`` is a ``vlm_runtime.RecurrentCache`` (or None: a whole sequence at once); ``valid`` (batch, T) marks
    real tokens: padding neither enters the convolution nor changes the state.
    """

    def __init__(self, config: LinearAttentionConfig) -> None:
        super().__init__()
        self.config = c = config
        self.in_proj_qkv = nn.Linear(c.hidden_size, c.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(c.hidden_size, c.value_dim, bias=False)
        self.in_proj_b = nn.Linear(c.hidden_size, c.num_value_heads, bias=False)
        self.in_proj_a = nn.Linear(c.hidden_size, c.num_value_heads, bias=False)
        self.conv1d = CausalConv1d(c.conv_dim, c.conv_kernel)
        self.dt_bias = mx.ones((c.num_value_heads,))
        self.A_log = mx.zeros((c.num_value_heads,))
        self.norm = GatedRMSNorm(c.value_head_dim, c.rms_norm_eps)
        self.out_proj = nn.Linear(c.value_dim, c.hidden_size, bias=False)

    def __call__(self, x: mx.array, cache: Any = None, valid: mx.array | None = None) -> mx.array:
        c = self.config
        batch, length, _ = x.shape
        if valid is None and cache is not None:
            valid = cache.token_mask(length)
        if valid is not None:
            x = x * valid[..., None].astype(x.dtype)
        mixed, window = self.conv1d(self.in_proj_qkv(x), None if cache is None else cache.conv_state)
        q, k, v = mx.split(mixed, [c.key_dim, 2 * c.key_dim], axis=-1)
        state = None if cache is None else cache.recurrent_state
        if state is None:
            state = mx.zeros((batch, c.num_value_heads, c.key_head_dim, c.value_head_dim), mx.float32)
        if length == 1 and cache is not None:
            # Decoding: one fused step (vlm_kernels) from the raw projections.
            out, state = gated_delta_decode(
                q.reshape(batch, c.num_key_heads, c.key_head_dim),
                k.reshape(batch, c.num_key_heads, c.key_head_dim),
                v.reshape(batch, c.num_value_heads, c.value_head_dim),
                self.in_proj_a(x)[:, 0],
                self.in_proj_b(x)[:, 0],
                self.A_log,
                self.dt_bias,
                state,
                None if valid is None else valid[:, 0],
            )
            cache.update(self.conv1d.state_after(window, length), state, length, None)
            return self._project_out(x, out[:, None])
        repeats = c.num_value_heads // c.num_key_heads

        def heads(t: mx.array, n: int, dim: int, repeat: int = 1) -> mx.array:
            t = t.reshape(batch, length, n, dim).astype(mx.float32).transpose(0, 2, 1, 3)
            # Each key head serves ``repeat`` consecutive value heads.
            return mx.repeat(t, repeat, axis=1) if repeat > 1 else t

        q = l2_normalize(heads(q, c.num_key_heads, c.key_head_dim, repeats)) * c.key_head_dim**-0.5
        k = l2_normalize(heads(k, c.num_key_heads, c.key_head_dim, repeats))
        v = heads(v, c.num_value_heads, c.value_head_dim)
        g, beta = gate_and_strength(
            self.in_proj_a(x), self.in_proj_b(x), self.A_log, self.dt_bias, None if valid is None else valid[..., None]
        )
        g, beta = g.transpose(0, 2, 1), beta.transpose(0, 2, 1)
        split = None if cache is None else cache.snapshot_split(length)
        snapshot = None
        if split:
            # The same rule in two pieces, so that the state after the first one can be kept.
            head, middle = gated_delta_chunked(
                q[:, :, :split], k[:, :, :split], v[:, :, :split], g[..., :split], beta[..., :split], state
            )
            tail, state = gated_delta_chunked(
                q[:, :, split:], k[:, :, split:], v[:, :, split:], g[..., split:], beta[..., split:], middle
            )
            out = mx.concatenate([head, tail], axis=2)
            snapshot = [self.conv1d.state_after(window, split), middle]
        else:
            out, state = gated_delta_chunked(q, k, v, g, beta, state)
        if cache is not None:
            cache.update(self.conv1d.state_after(window, length), state, length, snapshot)
        return self._project_out(x, out.transpose(0, 2, 1, 3))

    def _project_out(self, x: mx.array, out: mx.array) -> mx.array:
        """The gated norm of each head's output (batch, T, heads, value_dim), then the output projection."""
        c = self.config
        batch, length = out.shape[:2]
        z = self.in_proj_z(x).reshape(batch, length, c.num_value_heads, c.value_head_dim)
        return self.out_proj(self.norm(out.astype(x.dtype), z).reshape(batch, length, -1))
