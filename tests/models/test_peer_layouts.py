"""Checkpoints converted by the peer tool itself (mlx-vlm 0.7.10's ``convert``, run on each family's published
fixture by tests/fixtures/make_mlx_community_fixtures.py): what people's MLX-community downloads look like.

The float conversions are each family's ``mlx_community`` folder, covered by the shared parity suite. The 4-bit
ones (``mlx_vlm_4bit``: mlx-vlm quantizes the language model and keeps the vision tower float) are checked here:
they load quantized, compute exactly what their own dequantized weights compute, and stay near transformers'
float32 logits. mlx-vlm 0.7.10 cannot convert the tiny Pixtral, Gemma 3 and SmolVLM fixtures (it fails on them),
so those families' MLX-community folders come from our converter.
"""

from __future__ import annotations

import pytest

from .conftest import FIXTURES, Reference, check_quantized_fixture

PEER_4BIT = sorted(p.parent.name for p in FIXTURES.glob("*/mlx_vlm_4bit"))


def test_every_peer_folder_is_checked() -> None:
    assert PEER_4BIT == [
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
    check_quantized_fixture(family, Reference(family), folder="mlx_vlm_4bit")
