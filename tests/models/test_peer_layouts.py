"""Checkpoints converted by the peer tool itself (mlx-vlm 0.7.10's ``convert``, run on each family's published
fixture by tests/fixtures/make_mlx_community_fixtures.py): what people's MLX-community downloads look like.

The float conversions are each family's ``mlx_community`` folder, covered by the shared parity suite. The 4-bit
ones (``mlx_vlm_4bit``: mlx-vlm quantizes the language model and keeps the vision tower float) are checked here:
they load quantized, compute exactly what their own dequantized weights compute, and stay near transformers'
float32 logits. mlx-vlm 0.7.10 cannot convert the tiny Pixtral, Gemma 3 and SmolVLM fixtures (it fails on them),
so those families' MLX-community folders come from our converter.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from vlm_models import load
from vlm_models.quantize import dequantize_model

from .conftest import FAMILY_LAYOUTS, FIXTURES, Reference, check_quantized_fixture

# Gemma 4's 26B-A4B shape reacts about twice as strongly to 4-bit weights as the others (see test_convert.py's
# FAMILY_ERROR_GAIN), too strongly for a bound against the float reference to mean much: there the peer's
# checkpoint must instead compute what the float fixture quantized by us, layer for layer, computes.
SENSITIVE = {"gemma4_moe"}
PEER_4BIT = sorted(p.parent.name for p in FIXTURES.glob("*/mlx_vlm_4bit"))


def test_every_peer_folder_is_checked() -> None:
    assert PEER_4BIT == [
        "gemma4_moe",
        "idefics3",
        "llava",
        "llava_next",
        "mistral3",
        "paligemma2",
        "qwen3_5",
        "qwen3_5_moe",
        "qwen3_vl",
        "qwen3_vl_moe",
    ]


@pytest.mark.parametrize("family", PEER_4BIT)
def test_peer_quantized_checkpoint_loads_and_computes_its_weights(family: str) -> None:
    if family not in SENSITIVE:
        check_quantized_fixture(family, Reference(family), folder="mlx_vlm_4bit")
        return
    path = FIXTURES / family / "mlx_vlm_4bit"
    ref = Reference(family)
    model, _ = load(path)
    assert sum(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()) >= 4
    if family.endswith("_moe"):
        assert any(type(m).__name__ == "QuantizedSwitchLinear" for _, m in model.named_modules()), "experts"
    twin, _ = load(path)
    dequantize_model(twin)
    for case in ("one_image", "text"):
        inputs = {k: mx.array(v) for k, v in ref.inputs(case).items()}
        ours = np.array(model(**inputs).logits)
        np.testing.assert_allclose(ours, np.array(twin(**inputs).logits), atol=1e-4, rtol=0)
        # Too sensitive for a bound against the float reference: what our quantization of the fixture computes.
        mine = np.array(ours_quantized(family, path)(**inputs).logits)
        np.testing.assert_allclose(ours, mine, atol=1e-4, rtol=0, err_msg=f"{family}/{case}")


def ours_quantized(family: str, peer: Path) -> nn.Module:
    """The family's float fixture with exactly the layers the peer's checkpoint stores quantized quantized by
    ``mx.quantize`` at the peer's settings."""
    import json

    from vlm_models.loading import apply_quantization

    model, _ = load(FIXTURES / family / FAMILY_LAYOUTS[family][0])
    stored = {}
    for file in peer.glob("*.safetensors"):
        stored.update(mx.load(str(file)))
    quantization = json.loads((peer / "config.json").read_text())["quantization"]
    apply_quantization(model, quantization, model.sanitize(stored))
    return model
