"""One decode step of a gated DeltaNet layer (Qwen3-Next, Qwen3.5), fused: the query/key normalisation, the gate
and write strength from their projections, and the delta-rule update of the recurrent state, in one kernel.

Per value head the layer keeps a (key_dim, value_dim) memory S. For one token, with q and k L2-normalised (q also
scaled by key_dim^-1/2), decay = exp(-exp(A_log) softplus(a + dt_bias)) and beta = sigmoid(b):

    S <- decay S;   delta = beta (v - S^T k);   S <- S + k delta^T;   y = S^T q

A value head reads key head ``hv // (HV / HK)`` (each key head serves consecutive value heads). ``keep`` (one per
batch row, 0 or 1) turns a row's update off: a padded row keeps its state.

Written as plain mlx ops this is some thirty small kernels per layer and token (a decode step of a 4B-shaped
Qwen3.5 spends more time launching them than reading the weights). The fused version: one thread block per
(batch row, value head, 32 value columns); each warp holds a slice of the key rows for its 32 columns in
registers, reads the state once (coalesced along the value axis), and the two dot products over the key axis are
summed across warps in shared memory.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ._sources import prelude, thread_ids
from .dispatch import Kernel, cuda_kernel, metal_kernel, resolve

__all__ = [
    "GATED_DELTA_DECODE",
    "delta_rule_step",
    "gate_and_strength",
    "gated_delta_decode",
    "gated_delta_decode_reference",
    "l2_normalize",
]

GATED_DELTA_DECODE = Kernel(
    name="gated_delta_decode",
    fast=("cuda", "metal"),
    verified=(("reference", "every device (mlx ops)"),),
)

_THREADS = 256
_WARPS = _THREADS // 32
_EPS = 1e-6

# Template constants: DK, DV (head dims), HK, HV (key / value heads). Inputs: q, k (B, HK, DK); v (B, HV, DV);
# a, b (B, HV); a_log, dt_bias (HV,); keep (B,); state (B, HV, DK, DV) float32. Outputs: y (B, HV, DV), state_out.
_BODY = """
constexpr int NT = 256;
constexpr int SL = NT / 32;
constexpr int RPS = DK / SL;
TGMEM float qs[DK];
TGMEM float ks[DK];
TGMEM float part[NT];
const int lane = tid % 32;
const int slice = tid / 32;
const int row = bx / HV;
const int hv = bx % HV;
const int hk = hv / (HV / HK);
const int dv = by * 32 + lane;
const I64 qk_base = ((I64)row * HK + hk) * DK;
for (int i = tid; i < DK; i += NT) {
    qs[i] = TO_FLOAT(q[qk_base + i]);
    ks[i] = TO_FLOAT(k[qk_base + i]);
}
BARRIER();
float sq = 0.0f;
float sk = 0.0f;
for (int i = lane; i < DK; i += 32) {
    sq += qs[i] * qs[i];
    sk += ks[i] * ks[i];
}
for (int o = 16; o > 0; o >>= 1) {
    sq += SHFL_XOR(sq, o);
    sk += SHFL_XOR(sk, o);
}
const float q_scale = 1.0f / (FSQRT(sq + EPS) * FSQRT((float)DK));
const float k_scale = 1.0f / FSQRT(sk + EPS);
const float kept = TO_FLOAT(keep[row]);
const I64 head = (I64)row * HV + hv;
const float x = TO_FLOAT(a[head]) + TO_FLOAT(dt_bias[hv]);
const float softplus = (x > 0.0f ? x : 0.0f) + FLOG(1.0f + FEXP(x > 0.0f ? -x : x));
const float decay = FEXP(-FEXP(TO_FLOAT(a_log[hv])) * softplus * kept);
const float beta = kept / (1.0f + FEXP(-TO_FLOAT(b[head])));
const I64 s_base = head * DK * DV;
float s[RPS];
float predicted = 0.0f;
for (int r = 0; r < RPS; ++r) {
    const int i = slice * RPS + r;
    s[r] = state[s_base + (I64)i * DV + dv] * decay;
    predicted += s[r] * ks[i];
}
part[tid] = predicted * k_scale;
BARRIER();
float total = 0.0f;
for (int w = 0; w < SL; ++w) total += part[w * 32 + lane];
const float delta = (TO_FLOAT(v[head * DV + dv]) - total) * beta;
BARRIER();
float out = 0.0f;
for (int r = 0; r < RPS; ++r) {
    const int i = slice * RPS + r;
    s[r] += ks[i] * k_scale * delta;
    state_out[s_base + (I64)i * DV + dv] = s[r];
    out += s[r] * qs[i];
}
part[tid] = out * q_scale;
BARRIER();
if (slice == 0) {
    float y_sum = 0.0f;
    for (int w = 0; w < SL; ++w) y_sum += part[w * 32 + lane];
    y[head * DV + dv] = y_sum;
}
"""

_LOG = {"cuda": "#define FLOG(x) logf(x)\n", "metal": "#define FLOG(x) metal::log(x)\n"}
_INPUTS = ("q", "k", "v", "a", "b", "a_log", "dt_bias", "keep", "state")


def l2_normalize(x: mx.array, eps: float = _EPS) -> mx.array:
    """x / sqrt(sum(x^2) + eps) over the last axis (the reference's epsilon placement)."""
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def gate_and_strength(
    a: mx.array, b: mx.array, a_log: mx.array, dt_bias: mx.array, keep: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """The log decay g = -exp(A_log) softplus(a + dt_bias) and the write strength beta = sigmoid(b), float32,
    from the layer's projections (heads on the last axis); where ``keep`` (broadcast against them) is 0, both are
    0 and the state passes unchanged."""
    beta = mx.sigmoid(b.astype(mx.float32))
    g = -mx.exp(a_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + dt_bias.astype(mx.float32))
    if keep is not None:
        kept = keep.astype(mx.float32)
        g, beta = g * kept, beta * kept
    return g, beta


def delta_rule_step(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """One token of the gated delta rule, in mlx ops.

    ``q``, ``k``: (batch, heads, key_dim), normalised and scaled; ``v``: (batch, heads, value_dim); ``g`` (log
    decay, <= 0) and ``beta``: (batch, heads); ``state``: (batch, heads, key_dim, value_dim). All float32. Returns
    the output (batch, heads, value_dim) and the new state.
    """
    state = state * mx.exp(g)[..., None, None]
    predicted = (k[..., None, :] @ state)[..., 0, :]
    delta = (v - predicted) * beta[..., None]
    state = state + k[..., :, None] * delta[..., None, :]
    return (q[..., None, :] @ state)[..., 0, :], state


def gated_delta_decode_reference(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    a_log: mx.array,
    dt_bias: mx.array,
    state: mx.array,
    keep: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """The step in mlx ops (every device; the oracle of the fast versions). See ``gated_delta_decode``."""
    key_dim = q.shape[-1]
    repeats = v.shape[1] // q.shape[1]
    q = l2_normalize(q.astype(mx.float32)) * key_dim**-0.5
    k = l2_normalize(k.astype(mx.float32))
    if repeats > 1:
        q, k = mx.repeat(q, repeats, axis=1), mx.repeat(k, repeats, axis=1)
    g, beta = gate_and_strength(a, b, a_log, dt_bias, None if keep is None else keep[:, None])
    return delta_rule_step(q, k, v.astype(mx.float32), g, beta, state)


def _fits(q: mx.array, v: mx.array, state: mx.array) -> bool:
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    return (
        key_dim % _WARPS == 0
        and key_dim // _WARPS <= 32
        and value_dim % 32 == 0
        and v.shape[1] % q.shape[1] == 0
        and state.dtype == mx.float32
    )


def _kernel(backend: str):
    # cuda_kernel / metal_kernel build each source once per process.
    body = _LOG[backend] + f"constexpr float EPS = {_EPS!r}f;\n" + thread_ids(backend) + _BODY
    build = cuda_kernel if backend == "cuda" else metal_kernel
    return build("gated_delta_decode", _INPUTS, ("y", "state_out"), body, prelude(backend))


def gated_delta_decode(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    a_log: mx.array,
    dt_bias: mx.array,
    state: mx.array,
    keep: mx.array | None = None,
    *,
    backend: str | None = None,
) -> tuple[mx.array, mx.array]:
    """One token of the gated delta rule from the layer's raw projections.

    ``q``, ``k``: (batch, key_heads, key_dim), after the convolution, before normalisation; ``v``: (batch,
    value_heads, value_dim); ``a``, ``b``: (batch, value_heads), the gate and write-strength projections;
    ``a_log``, ``dt_bias``: (value_heads,); ``state``: (batch, value_heads, key_dim, value_dim) float32; ``keep``:
    (batch,), 1 for a row that takes the token, 0 for a padded one (None: every row). Returns the output (batch,
    value_heads, value_dim) and the new state, both float32.
    """
    chosen = resolve(GATED_DELTA_DECODE, backend)
    if chosen == "reference" or not _fits(q, v, state):
        return gated_delta_decode_reference(q, k, v, a, b, a_log, dt_bias, state, keep)
    batch, value_heads, value_dim = v.shape
    key_heads, key_dim = q.shape[1], q.shape[2]
    if keep is None:
        keep = mx.ones((batch,), mx.float32)
    y, new_state = _kernel(chosen)(
        inputs=[q, k, v, a, b, a_log, dt_bias, keep.astype(mx.float32), state],
        template=[("DK", key_dim), ("DV", value_dim), ("HK", key_heads), ("HV", value_heads)],
        grid=(batch * value_heads * _THREADS, value_dim // 32, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(batch, value_heads, value_dim), state.shape],
        output_dtypes=[mx.float32, mx.float32],
    )
    return y, new_state
