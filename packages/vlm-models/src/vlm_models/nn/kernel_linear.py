"""Quantized linear and embedding layers whose decode-time products go through ``vlm_kernels.quantized_matvec``
where ``matvec_applies`` says so (a CUDA GPU, a few rows, and either measured faster or ``VLM_KERNELS_BACKEND=cuda``)
and through MLX's own ``quantized_matmul`` everywhere else (prefill, the CPU, Apple GPUs, formats other than affine
4/8-bit).

Same parameters as MLX's layers, so checkpoints load and save unchanged; ``use_matvec_kernels`` re-types the
loaded layers in place (no re-quantizing). The kernel computes in float32 what MLX computes in the activations'
type, so results agree within that type's rounding.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from vlm_kernels.quantized_matvec import QUANTIZED_MATVEC, matvec_applies, quantized_matvec

__all__ = ["KernelQuantizedEmbedding", "KernelQuantizedLinear", "use_matvec_kernels"]

_BITS = (4, 8)
_GROUP_SIZES = (32, 64, 128)


def _kernel_takes(x: mx.array) -> bool:
    return matvec_applies(QUANTIZED_MATVEC, math.prod(x.shape[:-1]))


class KernelQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (affine, 4 or 8 bits) with the fused kernel for decode-sized inputs."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _kernel_takes(x):
            return super().__call__(x)
        return quantized_matvec(
            x,
            self["weight"],
            self["scales"],
            self["biases"],
            bits=self.bits,
            group_size=self.group_size,
            bias=self.get("bias"),
        )


class KernelQuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose ``as_linear`` (a tied vocabulary head) uses the kernel at decode."""

    def as_linear(self, x: mx.array) -> mx.array:
        if not _kernel_takes(x):
            return super().as_linear(x)
        return quantized_matvec(
            x, self["weight"], self["scales"], self["biases"], bits=self.bits, group_size=self.group_size
        )


def _fits(module: nn.Module) -> bool:
    return module.mode == "affine" and module.bits in _BITS and module.group_size in _GROUP_SIZES


def use_matvec_kernels(model: nn.Module) -> int:
    """Re-type, in place, MLX's affine 4/8-bit quantized linears and embeddings of ``model`` as the kernel-backed
    ones (same parameters); returns how many. Layers of other formats stay MLX's."""
    swaps = {nn.QuantizedLinear: KernelQuantizedLinear, nn.QuantizedEmbedding: KernelQuantizedEmbedding}
    count = 0
    for _, module in model.named_modules():
        kind = swaps.get(type(module))
        if kind is not None and _fits(module):
            module.__class__ = kind
            count += 1
    return count
