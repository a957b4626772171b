"""A freshly initialised model to train from scratch: the architecture, tokenizer, chat template and image
processor of an existing checkpoint, new sizes, random weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from vlm_models.convert import save_model
from vlm_models.loading import load_config, resolve_model_path
from vlm_models.registry import architecture_of

__all__ = ["ModelSizes", "init_model"]


@dataclass(frozen=True)
class ModelSizes:
    """Sizes of a small Qwen2-VL-style model; the defaults give about 3.5M parameters."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    vision_embed_dim: int = 128
    vision_depth: int = 4
    vision_num_heads: int = 4
    vision_mlp_ratio: int = 2

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("hidden_size must divide by the heads, and the heads by the key/value heads")
        if self.vision_embed_dim % self.vision_num_heads:
            raise ValueError("vision_embed_dim must divide by vision_num_heads")


def _sized_config(config: dict[str, Any], sizes: ModelSizes) -> dict[str, Any]:
    """``config`` with the new sizes, in its own layout (flat transformers 4, or nested ``text_config``)."""
    config = json.loads(json.dumps(config))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    head_dim = sizes.hidden_size // sizes.num_attention_heads
    text.update(
        hidden_size=sizes.hidden_size,
        num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads,
        intermediate_size=sizes.intermediate_size,
        max_window_layers=sizes.num_hidden_layers,
    )
    text.pop("head_dim", None)
    # M-RoPE splits half the head dimension over (time, row, column) in the proportions 1:1.5:1.5, like Qwen2-VL.
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    for holder in (text, config):
        for key in ("rope_scaling", "rope_parameters"):
            if isinstance(holder.get(key), dict) and "mrope_section" in holder[key]:
                holder[key]["mrope_section"] = section
    vision = config.setdefault("vision_config", {})
    vision.update(
        depth=sizes.vision_depth,
        embed_dim=sizes.vision_embed_dim,
        num_heads=sizes.vision_num_heads,
        mlp_ratio=sizes.vision_mlp_ratio,
        hidden_size=sizes.hidden_size,
    )
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    return config


def _capped_image_settings(settings: dict[str, Any], max_pixels: int) -> dict[str, Any]:
    """The processor settings with larger images resized down to about ``max_pixels`` (a model trained on small
    images should see only as many image tokens as it was trained with)."""
    if max_pixels < settings.get("min_pixels", 0):
        raise ValueError(f"--max-pixels {max_pixels} is below the processor's min_pixels {settings['min_pixels']}")
    settings = {**settings, "max_pixels": max_pixels}
    if isinstance(settings.get("size"), dict):
        settings["size"] = {**settings["size"], "longest_edge": max_pixels}
    return settings


def init_model(
    like: str, output: str | Path, sizes: ModelSizes = ModelSizes(), seed: int = 0, max_pixels: int | None = None
) -> tuple[Path, int]:
    """Write a randomly initialised model of ``like``'s architecture with ``sizes`` to ``output``; returns the
    folder and the parameter count. ``like`` must be a Qwen2-VL-family checkpoint (its sizes are rewritten).
    ``max_pixels`` caps the image processor's resize target (``None``: ``like``'s own)."""
    source = resolve_model_path(like)
    base = load_config(source)
    if base.get("model_type") not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"init knows the Qwen2-VL family's size keys, not {base.get('model_type')!r}")
    if base.get("model_type") == "qwen2_5_vl":
        raise ValueError("init writes Qwen2-VL sizes; pass a qwen2_vl checkpoint as --like")
    config = _sized_config(base, sizes)
    processor_file = source / "preprocessor_config.json"
    capped = None
    if max_pixels is not None:  # checked before anything is written
        capped = _capped_image_settings(json.loads(processor_file.read_text(encoding="utf-8")), max_pixels)
    mx.random.seed(seed)
    model = architecture_of(config).load_module().Model.from_hf_config(config)
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    folder = save_model(model, output, source=source, config=config)
    if capped is not None:
        (folder / processor_file.name).write_text(json.dumps(capped, indent=2))
    return folder, n_params
