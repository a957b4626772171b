"""The CPU BLAS shim: products routed to numpy's OpenBLAS equal numpy's, and routing never happens half-way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not (shutil.which("cc") or shutil.which("gcc")),
    reason="the shim is built on Linux with a C compiler",
)

PROBE = textwrap.dedent(
    """
    import json, sys
    from vlm_kernels.cpu_blas import route_cpu_blas
    if sys.argv[1] == "late":
        import mlx.core
    routing = route_cpu_blas()
    import mlx.core as mx
    import numpy as np
    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(0)
    worst = 0.0
    # odd shapes, transposed operands and float64 (dgemm) all go through the shim's argument conversion
    for m, k, n in ((1, 7, 5), (33, 65, 17), (128, 96, 200)):
        a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
        got = np.array(mx.array(a) @ mx.array(b).T)
        worst = max(worst, float(np.abs(got - a @ b.T).max() / np.abs(a @ b.T).max()))
    with mx.stream(mx.cpu):
        d = rng.standard_normal((40, 30))
        got64 = np.array(mx.matmul(mx.array(d, dtype=mx.float64), mx.array(d.T, dtype=mx.float64)))
    maps = open("/proc/self/maps").read()
    print(json.dumps({"routed": routing.routed, "reason": routing.reason, "worst": worst,
                      "worst64": float(np.abs(got64 - d @ d.T).max()), "loaded": "libvlm_cpu_blas" in maps}))
    """
)


def probe(tmp_path, when: str, **env: str) -> dict:
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, when], capture_output=True, text=True, env=environment, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_routed_products_equal_numpy(tmp_path):
    outcome = probe(tmp_path, "early")
    if not outcome["routed"] and "does not bundle" in outcome["reason"]:
        pytest.skip(outcome["reason"])  # an MLX build with its own fast BLAS: nothing to route
    assert outcome["routed"], outcome["reason"]
    assert outcome["loaded"]
    assert outcome["worst"] < 1e-5
    assert outcome["worst64"] < 1e-9
    assert list(tmp_path.glob("vlm/cpu_blas/*/libvlm_cpu_blas.so"))  # built once into the cache


def test_too_late_or_disabled_leaves_mlx_alone(tmp_path):
    late = probe(tmp_path, "late")
    assert not late["routed"] and "before importing mlx" in late["reason"]
    assert not late["loaded"] and late["worst"] < 1e-5
    off = probe(tmp_path, "early", VLM_CPU_BLAS="0")
    assert not off["routed"] and not off["loaded"] and "VLM_CPU_BLAS=0" in off["reason"]
