"""Route MLX's CPU matrix products to an optimised BLAS on Linux.

MLX's Linux CPU wheel links the netlib reference BLAS (``mlx_cpu.libs/libblas-*.so``): a 1024x1024 float32
product runs at a few GFLOP/s where OpenBLAS reaches tens. numpy's wheel already carries OpenBLAS, but with
renamed (``scipy_``-prefixed, 64-bit integer) symbols, so MLX cannot use it directly. This module compiles a
few-line shim that exports ``cblas_sgemm`` / ``cblas_dgemm`` and forwards them to numpy's OpenBLAS, and loads it
into the process's global symbol scope *before* ``mlx.core`` is imported, so MLX's lazily bound calls resolve to
it. Nothing changes when any piece is missing (not Linux, no reference BLAS in MLX, no numpy OpenBLAS, no C
compiler, ``VLM_CPU_BLAS=0``): MLX keeps its own BLAS.

Call :func:`route_cpu_blas` first thing in a process (the ``vlm`` commands do).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BlasRouting", "route_cpu_blas"]

_SHIM_SOURCE = """\
#include <stdint.h>
void scipy_cblas_sgemm64_(int, int, int, int64_t, int64_t, int64_t, float, const float *, int64_t,
                          const float *, int64_t, float, float *, int64_t);
void scipy_cblas_dgemm64_(int, int, int, int64_t, int64_t, int64_t, double, const double *, int64_t,
                          const double *, int64_t, double, double *, int64_t);
void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    scipy_cblas_sgemm64_(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void cblas_dgemm(int order, int ta, int tb, int m, int n, int k, double alpha, const double *a, int lda,
                 const double *b, int ldb, double beta, double *c, int ldc) {
    scipy_cblas_dgemm64_(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""


@dataclass(frozen=True)
class BlasRouting:
    """What :func:`route_cpu_blas` did: ``shim`` is the loaded library, or ``None`` with the ``reason``."""

    shim: Path | None
    reason: str

    @property
    def routed(self) -> bool:
        return self.shim is not None


_routing: BlasRouting | None = None  # once per process: a second load would change nothing


def _site_file(package: str, pattern: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))).parent
    matches = sorted(glob.glob(str(root / pattern)))
    return matches[0] if matches else None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlm" / "cpu_blas"


def _build_shim(openblas: str, compiler: str) -> Path:
    """The shim for this OpenBLAS file, compiled once into the user cache (keyed by source and library)."""
    stat = os.stat(openblas)
    key = hashlib.sha256(f"{_SHIM_SOURCE}\0{openblas}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    target = _cache_dir() / key[:16] / "libvlm_cpu_blas.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source = Path(work) / "shim.c"
        source.write_text(_SHIM_SOURCE)
        built = Path(work) / target.name
        command = [
            compiler,
            "-O2",
            "-shared",
            "-fPIC",
            "-o",
            str(built),
            str(source),
            openblas,
            f"-Wl,-rpath,{os.path.dirname(openblas)}",
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=60)
        os.replace(built, target)  # atomic: a concurrent process sees the old state or the whole file
    return target


def route_cpu_blas() -> BlasRouting:
    """Load the BLAS shim if it applies (see the module docstring); safe to call more than once."""
    global _routing
    if _routing is not None:
        return _routing
    _routing = _route()
    return _routing


def _route() -> BlasRouting:
    if os.environ.get("VLM_CPU_BLAS", "1") == "0":
        return BlasRouting(None, "disabled by VLM_CPU_BLAS=0")
    if not sys.platform.startswith("linux"):
        return BlasRouting(None, "only MLX's Linux CPU build uses the reference BLAS")
    if "mlx.core" in sys.modules:
        return BlasRouting(None, "mlx.core was imported first; call route_cpu_blas() before importing mlx")
    if _site_file("mlx", "mlx_cpu.libs/libblas-*.so*") is None:
        return BlasRouting(None, "this MLX does not bundle the reference BLAS")
    openblas = _site_file("numpy", "numpy.libs/libscipy_openblas64_*.so*")
    if openblas is None:
        return BlasRouting(None, "numpy's bundled OpenBLAS was not found")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return BlasRouting(None, "no C compiler (cc) to build the BLAS shim")
    try:
        shim = _build_shim(openblas, compiler)
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    except (OSError, subprocess.SubprocessError) as error:
        return BlasRouting(None, f"the BLAS shim could not be built or loaded: {error}")
    return BlasRouting(shim, f"MLX's CPU sgemm/dgemm go to {os.path.basename(openblas)}")
