"""Which implementation of a kernel runs: the mlx-ops reference, the CUDA one or the Metal one.

Every kernel of this package is one public function with up to three implementations. The reference (mlx array
ops) runs on every device and is the oracle the tests hold the others to. ``resolve`` picks, per call:

1. the ``backend`` argument, when given;
2. else the ``VLM_KERNELS_BACKEND`` environment variable (``reference``, ``cuda``, ``metal`` or ``auto``; read
   once per process, see ``reread_environment``);
3. else ``auto``: CUDA when MLX's default device is a CUDA GPU, Metal on an Apple GPU only for kernels whose
   Metal version ran on Apple hardware (``Kernel.metal_verified``) or when ``VLM_KERNELS_METAL=1`` opts in,
   and the reference otherwise.

Forcing a backend the machine cannot run is an error, never a silent fallback. A new kernel declares a
``Kernel`` (its name, which fast versions exist, what was verified where) and calls ``resolve`` first; compiled
sources are built once per process through ``cuda_kernel`` / ``metal_kernel``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

__all__ = [
    "BACKENDS",
    "CUDA_VERIFIED",
    "BACKEND_ENV",
    "METAL_OPT_IN_ENV",
    "Kernel",
    "available_backends",
    "cuda_kernel",
    "metal_kernel",
    "requested_backend",
    "reread_environment",
    "resolve",
]

BACKENDS = ("reference", "cuda", "metal")
CUDA_VERIFIED = (
    "NVIDIA H200, MLX 0.32.4: the previous revision of the sources passed tests/kernels there; this revision "
    "was compiled with nvcc 13 (sm_90a) and run in the CPU emulation of tests/kernels, not yet on the GPU"
)
BACKEND_ENV = "VLM_KERNELS_BACKEND"
METAL_OPT_IN_ENV = "VLM_KERNELS_METAL"


@dataclass(frozen=True)
class Kernel:
    """What a kernel offers: ``fast`` names its implementations besides the reference; ``verified`` says, per
    backend, where it was checked against the reference (shown by ``vlm-kernels bench`` and the README)."""

    name: str
    fast: tuple[str, ...]
    verified: tuple[tuple[str, str], ...] = ()
    metal_verified: bool = False
    """False until the Metal version has run on Apple hardware: until then auto never picks it."""

    def verified_on(self, backend: str) -> str:
        return dict(self.verified).get(backend, "never ran")


def _gpu_is_default() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


@functools.cache
def _cuda_available() -> bool:
    return bool(getattr(mx, "cuda", None) and mx.cuda.is_available())


@functools.cache
def _metal_available() -> bool:
    return bool(mx.metal.is_available())


def available_backends() -> tuple[str, ...]:
    """The backends this process can run now (the default device decides between GPU and CPU)."""
    found = ["reference"]
    if _gpu_is_default() and _cuda_available():
        found.append("cuda")
    if _gpu_is_default() and _metal_available():
        found.append("metal")
    return tuple(found)


@functools.cache
def _environment() -> tuple[str | None, bool]:
    return os.environ.get(BACKEND_ENV), os.environ.get(METAL_OPT_IN_ENV) == "1"


def reread_environment() -> None:
    """Read ``VLM_KERNELS_BACKEND`` and ``VLM_KERNELS_METAL`` again: they are read once, at the first kernel
    call (every layer of every decode step asks; an environment lookup each time would cost more than the
    answer)."""
    _environment.cache_clear()


def requested_backend(backend: str | None = None) -> str:
    """What the caller asked for: the argument, else ``VLM_KERNELS_BACKEND``, else "auto"."""
    return backend or _environment()[0] or "auto"


def resolve(kernel: Kernel, backend: str | None = None) -> str:
    """The backend ``kernel`` runs on for this call (see the module docstring)."""
    requested = requested_backend(backend)
    if requested == "auto":
        return _auto(kernel)
    if requested not in BACKENDS:
        source = "backend argument" if backend else BACKEND_ENV
        raise ValueError(f"{source}: unknown backend {requested!r}; choose one of {(*BACKENDS, 'auto')}")
    if requested == "reference":
        return requested
    if requested not in kernel.fast:
        raise ValueError(
            f"{kernel.name} has no {requested} implementation (it has: reference, {', '.join(kernel.fast)})"
        )
    if requested not in available_backends():
        raise ValueError(
            f"{kernel.name}: backend {requested!r} cannot run here (available: {', '.join(available_backends())}; "
            "MLX's default device must be that GPU)"
        )
    return requested


def _auto(kernel: Kernel) -> str:
    available = available_backends()
    if "cuda" in available and "cuda" in kernel.fast:
        return "cuda"
    metal_allowed = kernel.metal_verified or _environment()[1]
    if "metal" in available and "metal" in kernel.fast and metal_allowed:
        return "metal"
    return "reference"


def _unique_name(name: str, *sources: str) -> str:
    # MLX caches compiled modules by kernel name (before 0.32.2 on CUDA, by name alone): one name per source.
    digest = hashlib.sha1("\0".join(sources).encode()).hexdigest()[:10]
    return f"vlm_{name}_{digest}"


@functools.cache
def cuda_kernel(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], source: str, header: str = "") -> Any:
    """``mx.fast.cuda_kernel`` built once per (name, source, header)."""
    return mx.fast.cuda_kernel(
        name=_unique_name(name, source, header),
        input_names=list(inputs),
        output_names=list(outputs),
        source=source,
        header=header,
    )


@functools.cache
def metal_kernel(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], source: str, header: str = "") -> Any:
    """``mx.fast.metal_kernel`` built once per (name, source, header)."""
    return mx.fast.metal_kernel(
        name=_unique_name(name, source, header),
        input_names=list(inputs),
        output_names=list(outputs),
        source=source,
        header=header,
    )
