"""Run the kernels' GPU sources on the CPU, for machines with no GPU (this repo's CI).

``_sources`` writes each kernel once, in a dialect whose few macros each backend's prelude defines. This file
gives that dialect a third prelude, plain C++: a thread block becomes 128 ``std::thread``s, a barrier a
``std::barrier`` over the block, a SIMD shuffle an exchange through memory between two barriers of its warp of
32, shared memory static arrays. ``installed()`` makes ``mx.fast.cuda_kernel`` build such a program (g++,
C++20) instead, so the public functions run their CUDA path's exact source text, launch shapes, template
constants and index arithmetic on the CPU. It checks the logic, not the GPU: asynchronous copies become plain
copies and no timing or memory model of a real GPU is involved.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np

_PRELUDE = r"""
#include <barrier>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>
#define TGMEM static
static std::barrier<>* g_block;
static std::barrier<>* g_warps[32];
static thread_local int g_tid;
static float g_slots[1024];
#define BARRIER() g_block->arrive_and_wait()
static inline float shfl_xor(float v, int o) {
  auto* warp = g_warps[g_tid / 32];
  g_slots[g_tid] = v;
  warp->arrive_and_wait();
  float r = g_slots[g_tid ^ o];
  warp->arrive_and_wait();
  return r;
}
#define SHFL_XOR(v, o) shfl_xor((v), (o))
#define FEXP(x) std::exp(x)
#define FSQRT(x) std::sqrt(x)
#define TO_FLOAT(x) static_cast<float>(x)
#define NEG_INF (-INFINITY)
#define HALF_T float
#define ASYNC_COPY4(dst, src) ((dst) = (src))
#define ASYNC_COMMIT()
#define ASYNC_WAIT_PREVIOUS()
#define ASYNC_WAIT_ALL()
typedef uint32_t U32;
typedef unsigned long long U64;
typedef long long I64;
#include <bit>
struct uint4 { uint32_t x, y, z, w; };
#define U4 uint4
#define LOAD_U4(ptr, i) (uint4{(ptr)[4 * (i)], (ptr)[4 * (i) + 1], (ptr)[4 * (i) + 2], (ptr)[4 * (i) + 3]})
#define AS_FLOAT(u) std::bit_cast<float>((uint32_t)(u))
#define X_ALIGNED(p) false
#define LOAD_X8(p, vec, v) for (int _i = 0; _i < 8; ++_i) (v)[_i] = static_cast<float>((p)[_i])
"""

_CUDA_IDS = "const int tid = threadIdx.x; const int bx = blockIdx.x; const int by = blockIdx.y;"
_TYPES = {mx.float16: "float", mx.bfloat16: "float", mx.float32: "float", mx.uint32: "uint32_t", mx.int32: "int32_t"}
_NUMPY = {"float": np.float32, "uint32_t": np.uint32, "int32_t": np.int32}


def compiler() -> str | None:
    return shutil.which("g++")


class _Kernel:
    """Stands in for one ``mx.fast.cuda_kernel``: same call signature, runs on the CPU."""

    def __init__(self, build_dir: Path, name: str, input_names, output_names, source: str, header: str = "") -> None:
        self.build_dir, self.inputs, self.outputs = build_dir, list(input_names), list(output_names)
        self.source = source.replace(_CUDA_IDS, "const int tid = g_tid;")

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes, **_):
        arrays = [a if isinstance(a, mx.array) else mx.array(a) for a in inputs]
        params = [f"const {_TYPES[a.dtype]}* {n}" for n, a in zip(self.inputs, arrays)]
        params += [f"{_TYPES[d]}* {n}" for n, d in zip(self.outputs, output_dtypes)]
        constants = ""
        for name, value in template or []:
            if isinstance(value, bool):
                constants += f"constexpr bool {name} = {'true' if value else 'false'};\n"
            elif isinstance(value, int):
                constants += f"constexpr int {name} = {value};\n"
            else:
                constants += f"using {name} = float;\n"
        casts = [f"({_TYPES[a.dtype]}*)a[{i}]" for i, a in enumerate(arrays)]
        casts += [f"({_TYPES[d]}*)a[{len(arrays) + i}]" for i, d in enumerate(output_dtypes)]
        program = _PRELUDE + f"static void body({', '.join(params)}, int bx, int by) {{\n{constants}{self.source}\n}}\n"
        program += f"""
extern "C" void launch(void** a, int gx, int gy, int nt) {{
  std::barrier<> block(nt);
  g_block = &block;
  std::vector<std::barrier<>*> warps;
  for (int w = 0; w < nt / 32; ++w) {{ warps.push_back(new std::barrier<>(32)); g_warps[w] = warps.back(); }}
  for (int by = 0; by < gy; ++by)
    for (int bx = 0; bx < gx; ++bx) {{
      std::vector<std::thread> threads;
      for (int t = 0; t < nt; ++t) threads.emplace_back([=]() {{ g_tid = t; body({", ".join(casts)}, bx, by); }});
      for (auto& t : threads) t.join();
    }}
  for (auto* w : warps) delete w;
}}
"""
        library = self._build(program)
        host = [
            np.ascontiguousarray(np.array(a.astype(mx.float32) if a.dtype in (mx.float16, mx.bfloat16) else a))
            for a in arrays
        ]
        outs = [
            np.full(shape, np.nan, _NUMPY[_TYPES[d]]) if _TYPES[d] == "float" else np.zeros(shape, _NUMPY[_TYPES[d]])
            for shape, d in zip(output_shapes, output_dtypes)
        ]
        pointers = (ctypes.c_void_p * (len(host) + len(outs)))(*[h.ctypes.data for h in host + outs])
        library.launch(pointers, grid[0] // threadgroup[0], grid[1], threadgroup[0])
        return [mx.array(o).astype(d) for o, d in zip(outs, output_dtypes)]

    def _build(self, program: str) -> ctypes.CDLL:
        stem = self.build_dir / hashlib.sha1(program.encode()).hexdigest()[:16]
        if not stem.with_suffix(".so").exists():
            stem.with_suffix(".cpp").write_text(program)
            command = [compiler(), "-O1", "-std=c++20", "-shared", "-fPIC", "-pthread", "-w"]
            subprocess.run([*command, str(stem.with_suffix(".cpp")), "-o", str(stem.with_suffix(".so"))], check=True)
        return ctypes.CDLL(str(stem.with_suffix(".so")))


@contextlib.contextmanager
def installed(monkeypatch) -> Iterator[None]:
    """Within the block, the "cuda" backend runs the emulated kernels."""
    from vlm_kernels import decode_attention, dispatch, quantized_matvec

    with tempfile.TemporaryDirectory() as build:
        monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: _Kernel(Path(build), **kw))
        monkeypatch.setattr(dispatch, "available_backends", lambda: ("reference", "cuda"))
        caches = (
            dispatch.cuda_kernel,
            decode_attention._decode_kernel,
            decode_attention._combine_kernel,
            quantized_matvec._kernel,
        )
        for cache in caches:
            cache.cache_clear()
        try:
            yield
        finally:
            for cache in caches:
                cache.cache_clear()
