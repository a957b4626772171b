"""What a model's forward returns."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

__all__ = ["ModelOutput"]


@dataclass
class ModelOutput:
    logits: mx.array
    """(batch, length, vocab): logits for every position, as in the Hugging Face model outputs."""
