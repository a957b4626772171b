"""SmolVLM: Idefics3's architecture (SigLIP tiles, pixel shuffle, a Llama decoder) and image processing unchanged;
its checkpoints differ only in sizes, the tied embeddings of the small ones, and their chat template. SmolVLM 2's
video frames come in as images (processors/smolvlm.py), one global view each."""

from __future__ import annotations

from .idefics3 import Model, ModelConfig, processor_defaults

__all__ = ["Model", "ModelConfig", "processor_defaults"]
