"""Helpers for the kernel tests: which fast backends this machine runs, and example budgets.

The CUDA (and, opted in, Metal) implementations are compared with the mlx-ops reference wherever they can run;
on a machine without that GPU those tests skip. ``VLM_KERNELS_EXAMPLES`` raises hypothesis' example count (the
accelerator run uses more)."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from vlm_kernels.dispatch import available_backends

FAST_BACKENDS = [b for b in ("cuda", "metal") if b in available_backends()]
EXAMPLES = int(os.environ.get("VLM_KERNELS_EXAMPLES", "12"))

KERNEL_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True)


def fast_backends() -> list:
    """Parameters for every fast backend, or one skipped parameter saying why there is none."""
    if FAST_BACKENDS:
        return FAST_BACKENDS
    return [pytest.param("cuda", marks=pytest.mark.skip(reason="no CUDA or Metal GPU is MLX's default device here"))]
