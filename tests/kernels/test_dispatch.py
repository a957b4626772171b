"""Backend choice: the argument beats the environment, auto takes CUDA where it runs, never an unverified Metal
kernel unless opted in, and a backend that cannot run here is an error, not a silent fallback."""

from __future__ import annotations

import pytest

from vlm_kernels import dispatch
from vlm_kernels.dispatch import (
    BACKEND_ENV,
    METAL_OPT_IN_ENV,
    Kernel,
    available_backends,
    reread_environment,
    resolve,
)

KERNEL = Kernel("example", fast=("cuda", "metal"), verified=(("cuda", "H200"),))


@pytest.fixture(autouse=True)
def fresh_environment():
    """Each test sets the variables it needs; the dispatch reads them again, and again after the test."""
    reread_environment()
    yield
    reread_environment()


def setenv(monkeypatch, name: str, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    reread_environment()


def test_reference_always_runs_and_the_argument_beats_the_environment(monkeypatch) -> None:
    assert "reference" in available_backends()
    setenv(monkeypatch, BACKEND_ENV, "reference")
    assert resolve(KERNEL) == "reference"
    setenv(monkeypatch, BACKEND_ENV, "no-such-backend")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        resolve(KERNEL)
    assert resolve(KERNEL, "reference") == "reference"
    with pytest.raises(ValueError, match="backend argument"):
        resolve(KERNEL, "tpu")


def test_a_backend_that_cannot_run_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(dispatch, "available_backends", lambda: ("reference",))
    with pytest.raises(ValueError, match="cannot run here"):
        resolve(KERNEL, "cuda")
    with pytest.raises(ValueError, match="has no metal implementation"):
        resolve(Kernel("cuda-only", fast=("cuda",)), "metal")
    assert resolve(KERNEL, "auto") == "reference"


def test_auto_prefers_cuda_and_keeps_unverified_metal_opt_in(monkeypatch) -> None:
    setenv(monkeypatch, BACKEND_ENV, None)
    monkeypatch.setattr(dispatch, "available_backends", lambda: ("reference", "cuda"))
    assert resolve(KERNEL) == "cuda"
    monkeypatch.setattr(dispatch, "available_backends", lambda: ("reference", "metal"))
    setenv(monkeypatch, METAL_OPT_IN_ENV, None)
    assert resolve(KERNEL) == "reference"
    assert resolve(KERNEL, "metal") == "metal"  # forcing it is the opt-in for one call
    setenv(monkeypatch, METAL_OPT_IN_ENV, "1")
    assert resolve(KERNEL) == "metal"
    setenv(monkeypatch, METAL_OPT_IN_ENV, None)
    assert resolve(Kernel("checked", fast=("metal",), metal_verified=True)) == "metal"


def test_verification_is_stated_per_backend() -> None:
    assert KERNEL.verified_on("cuda") == "H200"
    assert KERNEL.verified_on("metal") == "never ran"
