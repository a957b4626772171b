"""GPU source of the skinny matrix product ``x @ W.T`` for decode (1-32 rows of ``x``), W affine-quantized in
``mx.quantize``'s layout (packed uint32 words, least significant code first; a scale and a bias per group) or
dense bfloat16. Written in ``_sources``' dialect plus a few macros of its own (``matvec_prelude``), so the CUDA and
Metal versions are one text and the CPU emulation of the tests runs it too.

Layout of the work: the packed weight row of every output column is cut into 16-byte chunks (32 codes at 4 bits,
16 at 8, 8 bfloat16 values). A block of NT threads is GROUPS groups of TK threads; each group owns COLS output
columns and its TK threads stride over the chunks, so neighbouring threads read neighbouring 16 bytes (coalesced,
one 128-bit load per column and chunk; the loop over chunks is unrolled so several loads per thread are in flight).
A thread reads the chunk's activations once for its COLS columns. Codes become floats without an integer
conversion: a code masked in place (``v & (mask << s)``) is or-ed into the mantissa of 2^(23 - s), which makes the
float 2^(23 - s) + code exactly; subtracting 2^(23 - s) leaves the code. Per group, the dot product of the codes is
scaled once and the bias multiplies the activations' sum: y = sum_g s_g (x_g . q_g) + b_g sum(x_g). The TK partial
sums of a column are added by xor shuffles (and through shared memory past a warp). Rows of ``x`` are tiled by MT
(grid y), all accumulated in registers.
"""

from __future__ import annotations

__all__ = ["MATVEC_BODY", "matvec_prelude"]

_CUDA = """
#define U4 uint4
#define LOAD_U4(ptr, i) __ldg(reinterpret_cast<const uint4*>(ptr) + (i))
#define AS_FLOAT(u) __uint_as_float(u)
#define X_ALIGNED(p) ((reinterpret_cast<unsigned long long>(p) & 15ull) == 0ull)
template <typename T>
__device__ __forceinline__ void vlm_load_x8(const T* p, bool vec, float* v) {
  if (vec && sizeof(T) == 2) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&u);
    #pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(e[i]);
  } else if (vec && sizeof(T) == 4) {
    const uint4 a = reinterpret_cast<const uint4*>(p)[0];
    const uint4 b = reinterpret_cast<const uint4*>(p)[1];
    v[0] = __uint_as_float(a.x); v[1] = __uint_as_float(a.y); v[2] = __uint_as_float(a.z); v[3] = __uint_as_float(a.w);
    v[4] = __uint_as_float(b.x); v[5] = __uint_as_float(b.y); v[6] = __uint_as_float(b.z); v[7] = __uint_as_float(b.w);
  } else {
    #pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(p[i]);
  }
}
#define LOAD_X8(p, vec, v) vlm_load_x8((p), (vec), (v))
"""

_METAL = """
#define U4 uint4
#define LOAD_U4(ptr, i) (((const device uint4*)(ptr))[(i)])
#define AS_FLOAT(u) as_type<float>(u)
#define X_ALIGNED(p) false
#define LOAD_X8(p, vec, v) for (int _i = 0; _i < 8; ++_i) (v)[_i] = static_cast<float>((p)[_i])
"""


def matvec_prelude(backend: str) -> str:
    from . import _sources

    return _sources.prelude(backend) + (_CUDA if backend == "cuda" else _METAL)


# Template constants: K, N (the weight's input and output widths), M (rows of x), MT (rows per grid-y block), BITS
# (4, 8; 16 = dense bfloat16), GS (group size), COLS, TK, NT (see above), HAS_BIAS, OutT.
# Inputs: x (M, K), w (N, K * BITS / 32) uint32, scales and biases (N, K / GS), lin_bias (N,). Output: out (M, N).
MATVEC_BODY = """
constexpr bool DENSE = BITS == 16;
constexpr int EPC = 128 / BITS;
constexpr int CH = K * BITS / 128;
constexpr int NG = DENSE ? 1 : K / GS;
constexpr int CPG = DENSE ? 1 : GS / EPC;
constexpr int ITERS = (CH + TK - 1) / TK;
constexpr int GROUPS = NT / TK;
constexpr int PER = 32 / BITS;
constexpr int HALF = PER / 2;
constexpr U32 MASK = DENSE ? 0xFFFFu : ((1u << (BITS % 16)) - 1u);
const int lane_k = tid % TK;
const int grp = tid / TK;
const int col0 = (bx * GROUPS + grp) * COLS;
const int row0 = by * MT;
const bool xvec = X_ALIGNED(x);
float acc[COLS][MT];
#pragma unroll
for (int j = 0; j < COLS; ++j) {
    #pragma unroll
    for (int m = 0; m < MT; ++m) acc[j][m] = 0.0f;
}
#pragma unroll
for (int it = 0; it < ITERS; ++it) {
    const int c = lane_k + it * TK;
    if (ITERS * TK == CH || c < CH) {
        const int g = c / CPG;
        U4 wv[COLS];
        float sc[COLS];
        float bi[COLS];
        #pragma unroll
        for (int j = 0; j < COLS; ++j) {
            // Columns past N (the last group's) read the last real column and are never stored.
            const I64 col = col0 + j < N ? col0 + j : N - 1;
            wv[j] = LOAD_U4(w, col * CH + c);
            sc[j] = DENSE ? 1.0f : TO_FLOAT(scales[col * NG + g]);
            bi[j] = DENSE ? 0.0f : TO_FLOAT(biases[col * NG + g]);
        }
        #pragma unroll
        for (int m = 0; m < MT; ++m) {
            const I64 row = row0 + m < M ? row0 + m : M - 1;
            float xv[EPC];
            #pragma unroll
            for (int e = 0; e < EPC; e += 8) {
                LOAD_X8(x + row * K + c * EPC + e, xvec, xv + e);
            }
            float xsum = 0.0f;
            if (!DENSE) {
                #pragma unroll
                for (int e = 0; e < EPC; ++e) xsum += xv[e];
            }
            #pragma unroll
            for (int j = 0; j < COLS; ++j) {
                float dot = 0.0f;
                #pragma unroll
                for (int wd = 0; wd < 4; ++wd) {
                    const U32 v = wd == 0 ? wv[j].x : wd == 1 ? wv[j].y : wd == 2 ? wv[j].z : wv[j].w;
                    if (DENSE) {
                        dot += xv[wd * 2] * AS_FLOAT(v << 16);
                        dot += xv[wd * 2 + 1] * AS_FLOAT(v & 0xFFFF0000u);
                    } else {
                        const U32 hi = v >> 16;
                        #pragma unroll
                        for (int p = 0; p < HALF; ++p) {
                            const int s = BITS * p;
                            const U32 magic = (U32)(150 - s) << 23;
                            const float offset = (float)(1u << (23 - s));
                            dot += xv[wd * PER + p] * (AS_FLOAT(magic | (v & (MASK << s))) - offset);
                            dot += xv[wd * PER + HALF + p] * (AS_FLOAT(magic | (hi & (MASK << s))) - offset);
                        }
                    }
                }
                acc[j][m] += sc[j] * dot + bi[j] * xsum;
            }
        }
    }
}
// The TK threads of a group hold partial sums of the same COLS x MT outputs.
#pragma unroll
for (int o = (TK < 32 ? TK : 32) / 2; o > 0; o >>= 1) {
    #pragma unroll
    for (int j = 0; j < COLS; ++j) {
        #pragma unroll
        for (int m = 0; m < MT; ++m) acc[j][m] += SHFL_XOR(acc[j][m], o);
    }
}
constexpr int WPG = TK > 32 ? TK / 32 : 1;
constexpr int OUTS = COLS * MT;
TGMEM float red[TK > 32 ? NT / 32 * OUTS : 1];
if (TK > 32) {
    if (tid % 32 == 0) {
        #pragma unroll
        for (int j = 0; j < COLS; ++j) {
            #pragma unroll
            for (int m = 0; m < MT; ++m) red[(tid / 32) * OUTS + j * MT + m] = acc[j][m];
        }
    }
    BARRIER();
}
#pragma unroll
for (int j = 0; j < COLS; ++j) {
    #pragma unroll
    for (int m = 0; m < MT; ++m) {
        const int e = j * MT + m;
        if (e % TK == lane_k) {
            float total = acc[j][m];
            if (TK > 32) {
                total = 0.0f;
                for (int wg = 0; wg < WPG; ++wg) total += red[(grp * WPG + wg) * OUTS + e];
            }
            const int col = col0 + j;
            const int row = row0 + m;
            if (col < N && row < M) {
                if (HAS_BIAS) total += TO_FLOAT(lin_bias[col]);
                out[(I64)row * N + col] = static_cast<OutT>(total);
            }
        }
    }
}
"""
