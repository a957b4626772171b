"""Decode attention straight from a compressed KV cache: one new query per row, keys/values never dequantized.

Two storage formats, one kernel shape (``_sources``):

* ``turboquant_decode_attention``: keys and values as ``TurboQuantPacked`` (codes + float16 norms). The query
  is rotated once into the key codec's space; scores are |k| · (R q)·c[codes]; values are summed in their own
  rotated space and the result rotated back once.
* ``affine_decode_attention``: keys and values as ``mx.quantize`` triples (packed uint32, scales, biases; 4 or
  8 bits, groups of 32/64/128), what ``vlm_runtime``'s ``QuantizedKVCache`` stores.

Both take the cache's whole buffers (batch, kv_heads, capacity, ...) and ``length``, the columns in use, so
decoding token after token never slices (and copies) the cache. Rows of a batch may start late (``starts``:
left padding) and carry an additive or boolean ``mask`` over the columns, (batch or 1, 1, 1, >= length).
Query heads are grouped over kv heads (GQA): head h reads kv head h // (heads / kv_heads).

Short contexts run in one pass; long ones are split along the keys over more thread blocks (split-K) and the
partial softmax states merged by a second small kernel.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from . import _sources
from .bitpack import CodeLayout
from .dispatch import CUDA_VERIFIED, Kernel, cuda_kernel, metal_kernel, requested_backend, resolve
from .turboquant import TurboQuantCodec, TurboQuantPacked

__all__ = [
    "AFFINE_DECODE",
    "TURBOQUANT_DECODE",
    "Affine",
    "affine_decode_attention",
    "fast_decode_applies",
    "is_row_mask",
    "turboquant_decode_attention",
]

TURBOQUANT_DECODE = Kernel(
    name="turboquant_decode_attention",
    fast=("cuda", "metal"),
    verified=(("reference", "CPU (this repo's CI)"), ("cuda", CUDA_VERIFIED)),
)
AFFINE_DECODE = Kernel(
    name="affine_decode_attention",
    fast=("cuda", "metal"),
    verified=(("reference", "CPU (this repo's CI)"), ("cuda", CUDA_VERIFIED)),
)

Affine = tuple[mx.array, mx.array, mx.array]
"""``mx.quantize``'s (packed uint32, scales, biases) of a (batch, kv_heads, capacity, dim) array."""

_THREADS = 128
_SPLIT_MIN_KEYS = 256  # a split-K block is worth its merge only past this many keys
_TARGET_BLOCKS = 2 * 132  # two waves of an H100/H200's 132 multiprocessors
_SHARED_BYTES = 48 * 1024


@dataclass(frozen=True)
class _Rows:
    """Which columns each row attends: ``starts`` (batch,) int32 first column, ``length`` the end (shared),
    ``mask`` (batch or 1, n_keys) float32 additive or None."""

    starts: mx.array
    length: int
    mask: mx.array | None


def _rows(batch: int, capacity: int, length: int | None, starts: mx.array | None, mask: mx.array | None) -> _Rows:
    length = capacity if length is None else length
    if not 0 <= length <= capacity:
        raise ValueError(f"length {length} is outside the cache buffer's {capacity} columns")
    if starts is None:
        starts = _zero_starts(batch)
    elif starts.shape != (batch,) or starts.dtype != mx.int32:
        starts = mx.broadcast_to(starts.reshape(-1).astype(mx.int32), (batch,))
    if mask is not None:
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[0] not in (1, batch):
            raise ValueError(f"decode attention takes a mask of shape (batch or 1, 1, 1, keys), got {mask.shape}")
        if mask.shape[3] < length:
            raise ValueError(f"the mask covers {mask.shape[3]} keys, fewer than the {length} in use")
        mask = mask[:, 0, 0, :]
        if mask.dtype == mx.bool_:
            mask = mx.where(mask, 0.0, mx.finfo(mx.float32).min)
        mask = mask.astype(mx.float32)
    return _Rows(starts, length, mask)


def _check_queries(queries: mx.array, n_kv_heads: int) -> tuple[int, int, int]:
    if queries.ndim != 4 or queries.shape[2] != 1:
        raise ValueError(f"decode attention takes queries of shape (batch, heads, 1, dim), got {queries.shape}")
    batch, n_heads = queries.shape[:2]
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads do not group over {n_kv_heads} kv heads")
    return batch, n_heads, n_heads // n_kv_heads


# -- references (mlx ops): the oracle, and the path on any device without a fast version


def _attend_reference(
    queries: mx.array, keys: mx.array, values: mx.array, rows: _Rows, n_repeats: int
) -> tuple[mx.array, mx.array]:
    """softmax over the rows' columns of (grouped) queries · keys, times values, all float32; queries
    (batch, heads, 1, d) already scaled. Returns the output (batch, heads, 1, dv) and whether a row had keys."""
    batch, n_heads, _, dim = queries.shape
    n_kv_heads, n_keys = keys.shape[1], keys.shape[2]
    q = queries.reshape(batch, n_kv_heads, n_repeats, dim)
    scores = q @ keys.swapaxes(-1, -2)  # (batch, kv_heads, repeats, keys)
    columns = mx.arange(n_keys)
    valid = (columns[None, :] >= rows.starts[:, None]) & (columns[None, :] < rows.length)
    if rows.mask is not None:
        scores = scores + rows.mask[:, None, None, :n_keys]
    scores = mx.where(valid[:, None, None, :], scores, -mx.inf)
    has_keys = mx.any(valid, axis=-1)
    probs = mx.softmax(mx.where(has_keys[:, None, None, None], scores, 0.0), axis=-1)
    out = (probs @ values).reshape(batch, n_heads, 1, -1)
    return mx.where(has_keys[:, None, None, None], out, 0.0), has_keys


def _turboquant_reference(
    queries: mx.array,
    keys: TurboQuantPacked,
    values: TurboQuantPacked,
    key_codec: TurboQuantCodec,
    value_codec: TurboQuantCodec,
    scale: float,
    rows: _Rows,
    n_repeats: int,
) -> mx.array:
    n = rows.length
    k_rot = key_codec.decode_rotated(TurboQuantPacked(keys.words[:, :, :n], keys.norms[:, :, :n]))
    v_rot = value_codec.decode_rotated(TurboQuantPacked(values.words[:, :, :n], values.norms[:, :, :n]))
    q_rot = key_codec.rotate(queries) * scale
    out_rot, _ = _attend_reference(q_rot, k_rot, v_rot, rows, n_repeats)
    return value_codec.unrotate(out_rot).astype(queries.dtype)


def _affine_reference(
    queries: mx.array,
    keys: Affine,
    values: Affine,
    bits: int,
    group_size: int,
    scale: float,
    rows: _Rows,
    n_repeats: int,
) -> mx.array:
    def dequantize(parts: Affine) -> mx.array:
        # In float32, as the kernel does: scale·q + bias in bfloat16 would round every element.
        packed, scales, biases = (a[:, :, : rows.length] for a in parts)
        scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
        return mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)

    k, v = dequantize(keys), dequantize(values)
    out, _ = _attend_reference(queries.astype(mx.float32) * scale, k, v, rows, n_repeats)
    return out.astype(queries.dtype)


# -- the GPU kernels


@dataclass(frozen=True)
class _Plan:
    """Launch shape: ``rows_per_block`` query heads of one kv head per block, ``lanes`` per token, ``tile``
    tokens staged per step, and the split of the keys."""

    rows_per_block: int
    lanes: int
    tile: int
    splits: int
    chunk: int


def _plan(
    n_repeats: int, key_dim: int, value_dim: int, words_per_token: int, floats_per_token: int, blocks: int, length: int
) -> _Plan:
    rows_per_block = max(d for d in range(1, min(8, max(1, 1024 // value_dim)) + 1) if n_repeats % d == 0)
    widest = max(key_dim, value_dim)
    lanes = next((n for n in (4, 8, 16) if rows_per_block * math.ceil(widest / n) <= 64), 32)
    fixed = 4 * (rows_per_block * key_dim + rows_per_block * value_dim + 3 * rows_per_block + 64)
    fixed += 4 * max(4 * rows_per_block * value_dim, rows_per_block * key_dim)
    per_token = 4 * (2 * words_per_token + floats_per_token + rows_per_block)  # two tiles of codes in flight
    tile = next((t for t in (64, 32, 16, 8) if fixed + t * per_token <= _SHARED_BYTES), 0)
    if tile == 0:
        raise ValueError(f"head dims {key_dim}/{value_dim} need more shared memory than a block has")
    blocks *= n_repeats // rows_per_block
    splits = 1
    if length > _SPLIT_MIN_KEYS and blocks < _TARGET_BLOCKS:
        splits = min(math.ceil(length / _SPLIT_MIN_KEYS), math.ceil(_TARGET_BLOCKS / blocks))
    chunk = max(tile, math.ceil(math.ceil(max(length, 1) / splits) / tile) * tile)
    return _Plan(rows_per_block, lanes, tile, math.ceil(max(length, 1) / chunk), chunk)


@functools.lru_cache(maxsize=256)
def _int_array(*values: int) -> mx.array:
    """A small int32 array made once per value: every layer of a decode step passes the same length, and a
    fresh host array per call would be copied to the GPU per call."""
    array = mx.array(values, mx.int32)
    mx.eval(array)
    return array


@functools.lru_cache(maxsize=64)
def _constant(value: float) -> mx.array:
    array = mx.array([value], mx.float32)
    mx.eval(array)
    return array


@functools.lru_cache(maxsize=64)
def _zero_starts(batch: int) -> mx.array:
    array = mx.zeros((batch,), mx.int32)
    mx.eval(array)
    return array


@functools.cache
def _decode_kernel(backend: str, fmt: str, split: bool, inputs: tuple[str, ...]) -> Any:
    build = cuda_kernel if backend == "cuda" else metal_kernel
    outputs = ("part_o", "part_ml") if split else ("out",)
    body = _sources.thread_ids(backend) + _sources.decode_body(fmt, split)
    return build(f"{fmt}_decode{'_split' if split else ''}", inputs, outputs, body, _sources.prelude(backend))


@functools.cache
def _combine_kernel(backend: str) -> Any:
    build = cuda_kernel if backend == "cuda" else metal_kernel
    inputs = ("part_o", "part_ml", "vinv", "params")
    body = _sources.thread_ids(backend) + _sources.COMBINE_BODY
    return build("decode_combine", inputs, ("out",), body, _sources.prelude(backend))


def _launch(
    backend: str,
    fmt: str,
    queries: mx.array,
    named: list[tuple[str, mx.array]],
    template: list[tuple[str, int | bool]],
    rows: _Rows,
    plan: _Plan,
    scale: float,
    value_dim: int,
    rotate_out: mx.array | None,
    n_kv_heads: int,
    capacity: int,
) -> mx.array:
    """Run the decode kernel (and the split-K merge) on inputs ``named`` that are particular to ``fmt``."""
    batch, n_heads = queries.shape[:2]
    row_blocks = batch * n_heads // plan.rows_per_block
    has_mask = rows.mask is not None
    mask = rows.mask if has_mask else _constant(0)
    mask_stride = mask.shape[-1] if has_mask and mask.shape[0] == batch else 0
    split = plan.splits > 1
    inputs = [("q", queries), *named]
    if not split:
        inputs.append(("vinv", rotate_out if rotate_out is not None else _constant(0)))
    inputs += [
        ("starts", rows.starts),
        ("length_arr", _int_array(rows.length)),
        ("shape_arr", _int_array(plan.chunk, capacity, mask_stride, plan.splits)),
        ("fparams", _constant(scale)),
        ("mask", mask),
    ]
    kernel = _decode_kernel(backend, fmt, split, tuple(name for name, _ in inputs))
    template = [
        *template,
        ("HKV", n_kv_heads),
        ("NRB", n_heads // n_kv_heads // plan.rows_per_block),
        ("RB", plan.rows_per_block),
        ("LPT", plan.lanes),
        ("TT", plan.tile),
        ("ROT_OUT", rotate_out is not None),
        ("HAS_MASK", has_mask),
    ]
    launch = {"grid": (row_blocks * _THREADS, plan.splits, 1), "threadgroup": (_THREADS, 1, 1)}
    out_shape = (batch, n_heads, 1, value_dim)
    if not split:
        template.append(("OutT", queries.dtype))
        (out,) = kernel(
            inputs=[a for _, a in inputs],
            template=template,
            output_shapes=[out_shape],
            output_dtypes=[queries.dtype],
            **launch,
        )
        return out
    slots = row_blocks * plan.splits * plan.rows_per_block
    part_o, part_ml = kernel(
        inputs=[a for _, a in inputs],
        template=template,
        output_shapes=[(slots, value_dim), (slots, 2)],
        output_dtypes=[mx.float32, mx.float32],
        **launch,
    )
    (out,) = _combine_kernel(backend)(
        inputs=[
            part_o,
            part_ml,
            rotate_out if rotate_out is not None else _constant(0),
            _int_array(plan.splits),
        ],
        template=[
            ("VD", value_dim),
            ("RB", plan.rows_per_block),
            ("ROT_OUT", rotate_out is not None),
            ("OutT", queries.dtype),
        ],
        grid=(batch * n_heads * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[out_shape],
        output_dtypes=[queries.dtype],
    )
    return out


# -- public functions


def fast_decode_applies(kernel: Kernel, mask: mx.array | str | None, backend: str | None = None) -> bool:
    """Whether a caller with its own fallback (``QuantizedKVCache``'s two quantized_matmul) should run
    ``kernel``'s fast version for a decode step with this mask: only when a fast backend is asked for by name
    (argument or ``VLM_KERNELS_BACKEND``), since the fused affine kernel has not been shown faster than MLX's
    quantized_matmul end to end (see the README), and the mask is one row of keys per batch row."""
    if requested_backend(backend) == "auto" or resolve(kernel, backend) == "reference":
        return False
    return mask is None or (not isinstance(mask, str) and is_row_mask(mask))


def _code_layouts(keys: CodeLayout, values: CodeLayout) -> list[tuple[str, int | bool]]:
    """The template constants that place each code of a token's key and value words."""
    constants: list[tuple[str, int | bool]] = []
    for prefix, layout in (("K", keys), ("V", values)):
        constants += [(f"{prefix}D", layout.dim), (f"{prefix}HI", layout.high_bits), (f"{prefix}LO", layout.low_bits)]
        constants += [(f"{prefix}NHI", layout.n_high), (f"{prefix}W", layout.words)]
    return constants


def is_row_mask(mask: mx.array) -> bool:
    """Whether ``mask`` is one the decode kernels take: one row of keys per batch row, shared by the heads."""
    return mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1


def turboquant_decode_attention(
    queries: mx.array,
    keys: TurboQuantPacked,
    values: TurboQuantPacked,
    key_codec: TurboQuantCodec,
    value_codec: TurboQuantCodec,
    *,
    scale: float,
    length: int | None = None,
    starts: mx.array | None = None,
    mask: mx.array | None = None,
    backend: str | None = None,
) -> mx.array:
    """softmax(q·Kᵀ·scale + mask)·V for one query per row over TurboQuant-packed K/V.

    ``queries`` (batch, heads, 1, key_dim); ``keys``/``values`` words (batch, kv_heads, capacity, words) and
    norms (batch, kv_heads, capacity, 1), encoded by ``key_codec``/``value_codec``; ``length``: the columns in
    use (default: all); ``starts``: (batch,) first column of each row. Returns (batch, heads, 1, value_dim) in
    the queries' dtype.
    """
    batch, _, n_repeats = _check_queries(queries, keys.words.shape[1])
    if queries.shape[-1] != key_codec.dim:
        raise ValueError(f"queries of size {queries.shape[-1]} for keys of size {key_codec.dim}")
    capacity = keys.words.shape[2]
    rows = _rows(batch, capacity, length, starts, mask)
    chosen = resolve(TURBOQUANT_DECODE, backend)
    if chosen == "reference":
        return _turboquant_reference(queries, keys, values, key_codec, value_codec, scale, rows, n_repeats)
    kl, vl = key_codec.layout, value_codec.layout
    plan = _plan(n_repeats, kl.dim, vl.dim, kl.words + vl.words, 3, batch * keys.words.shape[1], rows.length)
    template = [
        *_code_layouts(kl, vl),
        ("KCB", key_codec.centroids.size),
        ("VCB", value_codec.centroids.size),
        ("ROT_Q", True),
    ]
    named = [
        ("kw", keys.words),
        ("kn", keys.norms),
        ("vw", values.words),
        ("vn", values.norms),
        ("kfwd", key_codec.forward),
        ("kcb", key_codec.centroids),
        ("vcb", value_codec.centroids),
    ]
    return _launch(
        chosen,
        "turboquant",
        queries,
        named,
        template,
        rows,
        plan,
        scale,
        vl.dim,
        value_codec.inverse,
        keys.words.shape[1],
        capacity,
    )


def affine_decode_attention(
    queries: mx.array,
    keys: Affine,
    values: Affine,
    *,
    bits: int,
    group_size: int,
    scale: float,
    length: int | None = None,
    starts: mx.array | None = None,
    mask: mx.array | None = None,
    backend: str | None = None,
) -> mx.array:
    """softmax(q·Kᵀ·scale + mask)·V for one query per row over ``mx.quantize``d K/V (``bits`` 4 or 8).

    Shapes and options as ``turboquant_decode_attention``; keys/values are (packed, scales, biases), each
    (batch, kv_heads, capacity, ...).
    """
    if bits not in (4, 8):
        raise ValueError(f"affine decode attention supports 4 and 8 bits, got {bits}")
    packed_keys = keys[0]
    batch, _, n_repeats = _check_queries(queries, packed_keys.shape[1])
    key_dim = packed_keys.shape[-1] * 32 // bits
    value_dim = values[0].shape[-1] * 32 // bits
    if queries.shape[-1] != key_dim:
        raise ValueError(f"queries of size {queries.shape[-1]} for keys of size {key_dim}")
    capacity = packed_keys.shape[2]
    rows = _rows(batch, capacity, length, starts, mask)
    chosen = resolve(AFFINE_DECODE, backend)
    if chosen == "reference":
        return _affine_reference(queries, keys, values, bits, group_size, scale, rows, n_repeats)
    key_groups, value_groups = key_dim // group_size, value_dim // group_size
    words = packed_keys.shape[-1] + values[0].shape[-1]
    floats = 2 * key_groups + 2 * value_groups + 1
    plan = _plan(n_repeats, key_dim, value_dim, words, floats, batch * packed_keys.shape[1], rows.length)
    # mx.quantize packs like a TurboQuant layout of one width: least significant bits first, word after word.
    template = [
        *_code_layouts(CodeLayout.for_bits(key_dim, bits), CodeLayout.for_bits(value_dim, bits)),
        ("KCB", 1),
        ("VCB", 1),
        ("ROT_Q", False),
        ("GS", group_size),
        ("KNG", key_groups),
        ("VNG", value_groups),
    ]
    dummy = _constant(0)
    named = [
        ("kw", keys[0]),
        ("ks", keys[1]),
        ("kb", keys[2]),
        ("vw", values[0]),
        ("vs", values[1]),
        ("vb", values[2]),
        ("kfwd", dummy),
        ("kcb", dummy),
        ("vcb", dummy),
    ]
    n_kv_heads = packed_keys.shape[1]
    return _launch(chosen, "affine", queries, named, template, rows, plan, scale, value_dim, None, n_kv_heads, capacity)
