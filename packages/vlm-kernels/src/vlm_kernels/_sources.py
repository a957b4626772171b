"""Kernel sources in one dialect for both GPUs: each backend's prelude maps a few macros (shared memory, barriers,
SIMD shuffles, thread ids), so the CUDA and Metal versions are the same text and what the CUDA run verifies is
what the Metal version computes. The bodies are put together per storage format (TurboQuant, affine) and
variant (single pass or split-K) by the functions below; sizes are template constants fixed per model.

Decode attention, one thread block per (batch row, kv head, block of query heads, split of the keys):

* the block's query heads are loaded once, rotated into the key codec's space (TurboQuant) and scaled;
* keys/values are staged tile by tile (TT tokens) in shared memory; ``LPT`` lanes share a token, each lane
  owning a contiguous run of coordinates, whose codes it reads from a sliding 64-bit window (codes straddle
  words); partial dot products are summed over the lanes with xor shuffles;
* each group of lanes keeps an online softmax (running max, sum, value accumulator in the value codec's
  rotated space) over its own tokens; groups, then warps, are merged at the end;
* single pass: the block normalises and rotates the output back; split-K: it writes (acc, max, sum) per split
  and ``combine`` merges the splits, normalises and rotates back.
"""

from __future__ import annotations

__all__ = [
    "COMBINE_BODY",
    "ENCODE_BODY",
    "decode_body",
    "prelude",
    "thread_ids",
]

_CUDA_PRELUDE = """
#define TGMEM __shared__
#define BARRIER() __syncthreads()
#define SHFL_XOR(v, o) __shfl_xor_sync(0xffffffffu, (v), (o))
#define FEXP(x) __expf(x)
#define FSQRT(x) sqrtf(x)
#define TO_FLOAT(x) static_cast<float>(x)
#define NEG_INF (-__int_as_float(0x7f800000))
#define HALF_T __half
#define ASYNC_COPY4(dst, src) \
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"((unsigned)__cvta_generic_to_shared(&(dst))), \
                 "l"((const void*)&(src)))
#define ASYNC_COMMIT() asm volatile("cp.async.commit_group;" ::)
#define ASYNC_WAIT_PREVIOUS() asm volatile("cp.async.wait_group 1;" ::)
#define ASYNC_WAIT_ALL() asm volatile("cp.async.wait_group 0;" ::)
typedef uint32_t U32;
typedef unsigned long long U64;
typedef long long I64;
"""

_METAL_PRELUDE = """
#define TGMEM threadgroup
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define SHFL_XOR(v, o) simd_shuffle_xor((v), (ushort)(o))
#define FEXP(x) metal::exp(x)
#define FSQRT(x) metal::sqrt(x)
#define TO_FLOAT(x) static_cast<float>(x)
#define NEG_INF (-INFINITY)
#define HALF_T half
#define ASYNC_COPY4(dst, src) ((dst) = (src))
#define ASYNC_COMMIT()
#define ASYNC_WAIT_PREVIOUS()
#define ASYNC_WAIT_ALL()
typedef uint U32;
typedef ulong U64;
typedef long I64;
"""

_CUDA_IDS = "const int tid = threadIdx.x; const int bx = blockIdx.x; const int by = blockIdx.y;\n"
_METAL_IDS = (
    "const int tid = thread_position_in_threadgroup.x; const int bx = threadgroup_position_in_grid.x;\n"
    "const int by = threadgroup_position_in_grid.y;\n"
)


def prelude(backend: str) -> str:
    return _CUDA_PRELUDE if backend == "cuda" else _METAL_PRELUDE


def thread_ids(backend: str) -> str:
    """Body lines naming the thread's index in its block and the block's position (written out, not hidden in
    macros: MLX's Metal wrapper adds the attributes a body mentions)."""
    return _CUDA_IDS if backend == "cuda" else _METAL_IDS


# TurboQuant encode: one block of 128 threads per vector. Inputs: x (N, D), fwd (D, D) with rotated = x @ fwd,
# bnd (the high codebook's 2**HI - 1 boundaries, then the low one's). Outputs: words (N, W), norms (N,).
ENCODE_BODY = """
constexpr int NT = 128;
TGMEM float xs[D];
TGMEM float red[NT / 32];
TGMEM int codes_s[D];
const I64 n = bx;
float ss = 0.0f;
for (int i = tid; i < D; i += NT) {
    const float v = TO_FLOAT(x[n * D + i]);
    xs[i] = v;
    ss += v * v;
}
for (int o = 16; o > 0; o >>= 1) ss += SHFL_XOR(ss, o);
if (tid % 32 == 0) red[tid / 32] = ss;
BARRIER();
float total = 0.0f;
for (int w = 0; w < NT / 32; ++w) total += red[w];
const float norm = FSQRT(total);
const float inv = norm > 0.0f ? 1.0f / norm : 0.0f;
for (int i = tid; i < D; i += NT) {
    float y = 0.0f;
    for (int k = 0; k < D; ++k) y += xs[k] * fwd[k * D + i];
    y *= inv;
    int code = 0;
    if (i < NHI) {
        for (int j = 0; j < (1 << HI) - 1; ++j) code += (y > bnd[j]) ? 1 : 0;
    } else {
        for (int j = 0; j < (1 << LO) - 1; ++j) code += (y > bnd[(1 << HI) - 1 + j]) ? 1 : 0;
    }
    codes_s[i] = code;
}
BARRIER();
for (int w = tid; w < W; w += NT) {
    const int bit0 = 32 * w;
    int i = bit0 < NHI * HI ? bit0 / HI : NHI + (bit0 - NHI * HI) / LO;
    U32 word = 0u;
    for (; i < D; ++i) {
        const int off = i < NHI ? i * HI : NHI * HI + (i - NHI) * LO;
        if (off >= bit0 + 32) break;
        const U32 c = (U32)codes_s[i];
        const int rel = off - bit0;
        word |= rel >= 0 ? (c << rel) : (c >> (-rel));
    }
    words[n * W + w] = word;
}
if (tid == 0) norms[n] = static_cast<HALF_T>(norm < 65504.0f ? norm : 65504.0f);
"""


def _codes(prefix: str, words: str) -> str:
    """A loop over this lane's ``{prefix}CP`` coordinates of one token, decoding each code from the words at
    ``tile_w[{words} ...]`` into ``code`` (and its coordinate ``c``), then running ``EMIT``."""
    p = prefix
    return f"""
{{
    const int c0 = lane * {p}CP;
    const int bit = c0 < {p}NHI ? c0 * {p}HI : {p}NHI * {p}HI + (c0 - {p}NHI) * {p}LO;
    int wi = bit >> 5;
    U64 buf = ((U64)tile_w[{words} + (wi < {p}W ? wi : {p}W - 1)]) >> (bit & 31);
    int avail = 32 - (bit & 31);
    wi += 1;
    #pragma unroll
    for (int k = 0; k < {p}CP; ++k) {{
        const int c = c0 + k;
        if (c < {p}D) {{
            const int nb = c < {p}NHI ? {p}HI : {p}LO;
            if (avail < nb) {{
                buf |= ((U64)tile_w[{words} + wi]) << avail;
                avail += 32;
                wi += 1;
            }}
            const U32 code = (U32)(buf & (U64)((1u << nb) - 1u));
            buf >>= nb;
            avail -= nb;
            EMIT
        }}
    }}
}}
"""


_DECODE_HEAD = """
constexpr int NT = 128;
constexpr int TG = NT / LPT;
constexpr int NWARP = NT / 32;
constexpr int KCP = (KD + LPT - 1) / LPT;
constexpr int VCP = (VD + LPT - 1) / LPT;
constexpr int TF = TOKEN_FLOATS;
constexpr int TW = TT * (KW + VW);
constexpr int FPT = (TT * (TF - 1) + NT - 1) / NT;
constexpr int QBUF = (NWARP * RB * VD > RB * KD) ? NWARP * RB * VD : RB * KD;
TGMEM float q_s[RB * KD];
TGMEM float tile_f[TT * TF];
TGMEM U32 tile_w[2 * TW];
TGMEM float red_acc[QBUF];
TGMEM float o_s[RB * VD];
TGMEM float w_s[RB * TT];
TGMEM float run_m[RB];
TGMEM float run_l[RB];
TGMEM float corr_s[RB];
TGMEM float kcb_s[KCB];
TGMEM float vcb_s[VCB];
const int grp = tid / LPT;
const int lane = tid % LPT;
const int warp = tid / 32;
const int wl = tid % 32;
const int rb = bx;
const int split = by;
const int bkv = rb / NRB;
const int b = bkv / HKV;
const int row0 = rb * RB;
const int length = length_arr[0];
const int chunk = shape_arr[0];
const int cap = shape_arr[1];
const int mstride = shape_arr[2];
const int n_splits = shape_arr[3];
const float scale = fparams[0];
const int first = starts[b] > split * chunk ? starts[b] : split * chunk;
const int last = length < (split + 1) * chunk ? length : (split + 1) * chunk;
for (int i = tid; i < KCB; i += NT) kcb_s[i] = kcb[i];
for (int i = tid; i < VCB; i += NT) vcb_s[i] = vcb[i];
for (int i = tid; i < RB * KD; i += NT) red_acc[i] = TO_FLOAT(q[(I64)row0 * KD + i]);
if (tid < RB) {
    run_m[tid] = NEG_INF;
    run_l[tid] = 0.0f;
}
BARRIER();
// Each thread rotates one coordinate of every row: one pass over the rotation's column, loads in flight together.
for (int c = tid; c < KD; c += NT) {
    float v[RB];
    for (int r = 0; r < RB; ++r) v[r] = ROT_Q ? 0.0f : red_acc[r * KD + c];
    if (ROT_Q) {
        #pragma unroll 8
        for (int k = 0; k < KD; ++k) {
            const float f = kfwd[k * KD + c];
            for (int r = 0; r < RB; ++r) v[r] += red_acc[r * KD + k] * f;
        }
    }
    for (int r = 0; r < RB; ++r) q_s[r * KD + c] = v[r] * scale;
}
BARRIER();
float qreg[RB][KCP];
float acc[RB][VCP];
for (int r = 0; r < RB; ++r) {
    for (int k = 0; k < KCP; ++k) {
        const int c = lane * KCP + k;
        qreg[r][k] = c < KD ? q_s[r * KD + c] : 0.0f;
    }
    for (int k = 0; k < VCP; ++k) acc[r][k] = 0.0f;
}
// Tiles of TT tokens: the codes of the next tile are copied to shared memory (asynchronously where the GPU can)
// and its per-token floats loaded into registers while the current tile is computed.
float pf[FPT];
int it = 0;
ISSUE_TILE(first, 0)
ASYNC_COMMIT();
for (int t0 = first; t0 < last; t0 += TT, ++it) {
    const int nt = (last - t0) < TT ? (last - t0) : TT;
    const int wbuf = (it & 1) * TW;
    const I64 base = (I64)bkv * cap + t0;
    for (int e = 0; e < FPT; ++e) {
        const int i = tid + e * NT;
        if (i < TT * (TF - 1) && i % TT < nt) tile_f[(i % TT) * TF + i / TT] = pf[e];
    }
    for (int i = tid; i < nt; i += NT) {
        tile_f[i * TF + TF - 1] = HAS_MASK ? TO_FLOAT(mask[(I64)b * mstride + t0 + i]) : 0.0f;
    }
    if (t0 + TT < last) {
        ISSUE_TILE(t0 + TT, TW - wbuf)
    }
    ASYNC_COMMIT();
    ASYNC_WAIT_PREVIOUS();
    BARRIER();
    // Scores: LPT lanes per token, each over its own run of coordinates, summed by xor shuffles.
    for (int j0 = 0; j0 < nt; j0 += TG) {
        const int j = j0 + grp;
        const bool live = j < nt;
        const int jj = live ? j : 0;
        float s[RB];
        for (int r = 0; r < RB; ++r) s[r] = 0.0f;
        KEY_SETUP
        KEY_CODES
        for (int o = LPT / 2; o > 0; o >>= 1) {
            for (int r = 0; r < RB; ++r) s[r] += SHFL_XOR(s[r], o);
        }
        KEY_FINISH
        if (live && lane == 0) {
            for (int r = 0; r < RB; ++r) w_s[r * TT + j] = s[r] + tile_f[j * TF + TF - 1];
        }
    }
    BARRIER();
    // Softmax over the tile, one warp per row: new running max, weights (times the value norm), running sum.
    for (int r = warp; r < RB; r += NWARP) {
        float x0 = wl < nt ? w_s[r * TT + wl] : NEG_INF;
        float x1 = wl + 32 < nt ? w_s[r * TT + wl + 32] : NEG_INF;
        float mx_ = x0 > x1 ? x0 : x1;
        for (int o = 16; o > 0; o >>= 1) {
            const float other = SHFL_XOR(mx_, o);
            mx_ = other > mx_ ? other : mx_;
        }
        const float m_old = run_m[r];
        const float m_new = m_old > mx_ ? m_old : mx_;
        const float p0 = wl < nt ? FEXP(x0 - m_new) : 0.0f;
        const float p1 = wl + 32 < nt ? FEXP(x1 - m_new) : 0.0f;
        float sum = p0 + p1;
        for (int o = 16; o > 0; o >>= 1) sum += SHFL_XOR(sum, o);
        if (wl < nt) w_s[r * TT + wl] = p0 * VALUE_WEIGHT(wl);
        if (wl + 32 < nt) w_s[r * TT + wl + 32] = p1 * VALUE_WEIGHT(wl + 32);
        if (wl == 0) {
            const float corr = m_old == NEG_INF ? 0.0f : FEXP(m_old - m_new);
            run_l[r] = run_l[r] * corr + sum;
            run_m[r] = m_new;
            corr_s[r] = corr;
        }
    }
    BARRIER();
    // Values: each group of lanes sums its tokens' weighted codes over its run of coordinates.
    for (int r = 0; r < RB; ++r) {
        const float corr = corr_s[r];
        for (int k = 0; k < VCP; ++k) acc[r][k] *= corr;
    }
    for (int j0 = 0; j0 < nt; j0 += TG) {
        const int j = j0 + grp;
        if (j < nt) {
            const int jj = j;
            float p[RB];
            for (int r = 0; r < RB; ++r) p[r] = w_s[r * TT + jj];
            VALUE_SETUP
            VALUE_CODES
        }
    }
    BARRIER();
}
ASYNC_WAIT_ALL();
// Groups share one softmax state: their partial sums just add, first across the groups of a warp, then warps.
for (int o = LPT; o < 32; o <<= 1) {
    for (int r = 0; r < RB; ++r) {
        for (int k = 0; k < VCP; ++k) acc[r][k] += SHFL_XOR(acc[r][k], o);
    }
}
if (wl < LPT) {
    for (int r = 0; r < RB; ++r) {
        for (int k = 0; k < VCP; ++k) {
            const int c = lane * VCP + k;
            if (c < VD) red_acc[(warp * RB + r) * VD + c] = acc[r][k];
        }
    }
}
BARRIER();
for (int i = tid; i < RB * VD; i += NT) {
    const int r = i / VD;
    const int c = i % VD;
    float a = 0.0f;
    for (int w = 0; w < NWARP; ++w) a += red_acc[(w * RB + r) * VD + c];
    const float mm = run_m[r];
    const float ls = run_l[r];
    FINISH
}
"""

# Codes of tile t (words of keys then values, contiguous per token) into tile_w at ``buffer``; the tile's
# per-token floats (all but the mask) into pf, in (float index, token) order.
_ISSUE_TILE = """{
    const int ts = (START);
    const int tn = (last - ts) < TT ? (last - ts) : TT;
    const I64 tb = (I64)bkv * cap + ts;
    for (int i = tid; i < tn * KW; i += NT) ASYNC_COPY4(tile_w[(BUFFER) + i], kw[tb * KW + i]);
    for (int i = tid; i < tn * VW; i += NT) ASYNC_COPY4(tile_w[(BUFFER) + TT * KW + i], vw[tb * VW + i]);
    for (int e = 0; e < FPT; ++e) {
        const int i = tid + e * NT;
        const int f = i / TT;
        const int tok = i % TT;
        pf[e] = (i < TT * (TF - 1) && tok < tn) ? TOKEN_FLOAT(f, tb + tok) : 0.0f;
    }
}
"""

_FINISH_SPLIT = """
    const I64 slot = ((I64)rb * n_splits + split) * RB + r;
    part_o[slot * VD + c] = a;
    if (c == 0) {
        part_ml[slot * 2] = mm;
        part_ml[slot * 2 + 1] = ls;
    }
"""

_FINISH_SINGLE = """
    o_s[i] = ls > 0.0f ? a / ls : 0.0f;
}
BARRIER();
for (int c = tid; c < VD; c += NT) {
    float v[RB];
    for (int r = 0; r < RB; ++r) v[r] = ROT_OUT ? 0.0f : o_s[r * VD + c];
    if (ROT_OUT) {
        #pragma unroll 8
        for (int k = 0; k < VD; ++k) {
            const float f = vinv[k * VD + c];
            for (int r = 0; r < RB; ++r) v[r] += o_s[r * VD + k] * f;
        }
    }
    for (int r = 0; r < RB; ++r) out[(I64)(row0 + r) * VD + c] = static_cast<OutT>(v[r]);
"""

# Split-K merge, one block per query row: part_o (rows / RB, splits, RB, VD), part_ml (..., 2) -> out (rows, VD).
# Every thread takes some splits for the max and the weights, then one output coordinate over all splits.
COMBINE_BODY = """
constexpr int NT = 128;
constexpr int MAX_SPLITS = 1024;
TGMEM float o_s[VD];
TGMEM float e_s[MAX_SPLITS];
TGMEM float red[NT / 32];
TGMEM float total[2];
const int row = bx;
const int rb = row / RB;
const int r = row % RB;
const int n_splits = params[0];
const I64 slot0 = (I64)rb * n_splits * RB + r;
float mm = NEG_INF;
for (int s = tid; s < n_splits; s += NT) {
    const float ms = part_ml[(slot0 + (I64)s * RB) * 2];
    mm = ms > mm ? ms : mm;
}
for (int o = 16; o > 0; o >>= 1) {
    const float other = SHFL_XOR(mm, o);
    mm = other > mm ? other : mm;
}
if (tid % 32 == 0) red[tid / 32] = mm;
BARRIER();
if (tid == 0) {
    float m_all = NEG_INF;
    for (int w = 0; w < NT / 32; ++w) m_all = red[w] > m_all ? red[w] : m_all;
    total[0] = m_all;
}
BARRIER();
const float m_all = total[0];
float ls = 0.0f;
for (int s = tid; s < n_splits; s += NT) {
    const I64 slot = slot0 + (I64)s * RB;
    const float ms = part_ml[slot * 2];
    const float e = ms == NEG_INF ? 0.0f : FEXP(ms - m_all);
    e_s[s] = e;
    ls += part_ml[slot * 2 + 1] * e;
}
for (int o = 16; o > 0; o >>= 1) ls += SHFL_XOR(ls, o);
BARRIER();
if (tid % 32 == 0) red[tid / 32] = ls;
BARRIER();
if (tid == 0) {
    float l_all = 0.0f;
    for (int w = 0; w < NT / 32; ++w) l_all += red[w];
    total[1] = l_all;
}
BARRIER();
const float l_all = total[1];
for (int c = tid; c < VD; c += NT) {
    float a = 0.0f;
    #pragma unroll 8
    for (int s = 0; s < n_splits; ++s) a += part_o[(slot0 + (I64)s * RB) * VD + c] * e_s[s];
    o_s[c] = l_all > 0.0f ? a / l_all : 0.0f;
}
BARRIER();
for (int i = tid; i < VD; i += NT) {
    float v = ROT_OUT ? 0.0f : o_s[i];
    if (ROT_OUT) {
        #pragma unroll 8
        for (int k = 0; k < VD; ++k) v += o_s[k] * vinv[k * VD + i];
    }
    out[(I64)row * VD + i] = static_cast<OutT>(v);
}
"""

# TurboQuant: per token its key norm, value norm, mask; codes index the codebooks (low codes after the high).
_TQ = {
    "TOKEN_FLOATS": "3",
    "TOKEN_FLOAT": "((F) == 0 ? TO_FLOAT(kn[TOKEN]) : TO_FLOAT(vn[TOKEN]))",
    "KEY_SETUP": "",
    "KEY_EMIT": "const float v = kcb_s[(c < KNHI ? 0 : (1 << KHI)) + code]; "
    "for (int r = 0; r < RB; ++r) s[r] += qreg[r][k] * v;",
    "KEY_FINISH": "for (int r = 0; r < RB; ++r) s[r] *= tile_f[jj * TF];",
    "VALUE_WEIGHT": "tile_f[(J) * TF + 1]",
    "VALUE_SETUP": "",
    "VALUE_EMIT": "const float v = vcb_s[(c < VNHI ? 0 : (1 << VHI)) + code]; "
    "for (int r = 0; r < RB; ++r) acc[r][k] += p[r] * v;",
}

# Affine (mx.quantize): per token the key scales, key biases, value scales, value biases (one per group), mask.
_AFFINE = {
    "TOKEN_FLOATS": "(2 * KNG + 2 * VNG + 1)",
    "TOKEN_FLOAT": "((F) < KNG ? TO_FLOAT(ks[(TOKEN) * KNG + (F)]) : (F) < 2 * KNG ? "
    "TO_FLOAT(kb[(TOKEN) * KNG + (F) - KNG]) : (F) < 2 * KNG + VNG ? TO_FLOAT(vs[(TOKEN) * VNG + (F) - 2 * KNG]) : "
    "TO_FLOAT(vb[(TOKEN) * VNG + (F) - 2 * KNG - VNG]))",
    # A lane's coordinates lie in one quantization group when the group size is a multiple of their count:
    # then its scale and bias are read once per token.
    "KEY_SETUP": "const int kg0 = (lane * KCP) / GS; const float ksc0 = tile_f[jj * TF + kg0]; "
    "const float kbi0 = tile_f[jj * TF + KNG + kg0];",
    "KEY_EMIT": "const float ksc = (GS % KCP == 0) ? ksc0 : tile_f[jj * TF + c / GS]; "
    "const float kbi = (GS % KCP == 0) ? kbi0 : tile_f[jj * TF + KNG + c / GS]; "
    "const float v = (float)code * ksc + kbi; for (int r = 0; r < RB; ++r) s[r] += qreg[r][k] * v;",
    "KEY_FINISH": "",
    "VALUE_WEIGHT": "1.0f",
    "VALUE_SETUP": "const int vg0 = (lane * VCP) / GS; const float vsc0 = tile_f[jj * TF + 2 * KNG + vg0]; "
    "const float vbi0 = tile_f[jj * TF + 2 * KNG + VNG + vg0];",
    "VALUE_EMIT": "const float vsc = (GS % VCP == 0) ? vsc0 : tile_f[jj * TF + 2 * KNG + c / GS]; "
    "const float vbi = (GS % VCP == 0) ? vbi0 : tile_f[jj * TF + 2 * KNG + VNG + c / GS]; "
    "const float v = (float)code * vsc + vbi; for (int r = 0; r < RB; ++r) acc[r][k] += p[r] * v;",
}

FORMATS = {"turboquant": _TQ, "affine": _AFFINE}


def decode_body(fmt: str, split: bool) -> str:
    """The decode-attention body for storage format ``fmt`` ("turboquant" or "affine")."""
    parts = FORMATS[fmt]
    issue = _ISSUE_TILE.replace(
        "TOKEN_FLOAT(f, tb + tok)", parts["TOKEN_FLOAT"].replace("(F)", "(f)").replace("TOKEN", "tb + tok")
    )
    body = _DECODE_HEAD
    body = body.replace("ISSUE_TILE(first, 0)", issue.replace("(START)", "(first)").replace("(BUFFER)", "(0)"))
    body = body.replace(
        "ISSUE_TILE(t0 + TT, TW - wbuf)", issue.replace("(START)", "(t0 + TT)").replace("(BUFFER)", "(TW - wbuf)")
    )
    body = body.replace("KEY_CODES", _codes("K", "wbuf + jj * KW").replace("EMIT", parts["KEY_EMIT"]))
    body = body.replace("VALUE_CODES", _codes("V", "wbuf + TT * KW + jj * VW").replace("EMIT", parts["VALUE_EMIT"]))
    weight = parts["VALUE_WEIGHT"]
    body = body.replace("VALUE_WEIGHT(wl + 32)", weight.replace("(J)", "(wl + 32)"))
    body = body.replace("VALUE_WEIGHT(wl)", weight.replace("(J)", "(wl)"))
    for name in ("TOKEN_FLOATS", "KEY_SETUP", "KEY_FINISH", "VALUE_SETUP"):
        body = body.replace(name, parts[name])
    return body.replace("FINISH", _FINISH_SPLIT if split else _FINISH_SINGLE)
