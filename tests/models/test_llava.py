"""LLaVA families beyond the shared parity suite: the quantized MLX-community layout, the chat template through the
checkpoint's tokenizer, the vision feature cache, and clear errors for configurations we do not run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_models import ModelLoadError, apply_chat_template, load
from vlm_models.quantize import dequantize_model
from vlm_runtime.vision_cache import VisionFeatureCache

from .conftest import FIXTURES, Reference
from .conftest import checkpoint_with_config as _with_config

LLAVA_FAMILIES = ["llava", "llava_next", "pixtral", "mistral3"]
"""LLaVA and the families built on it (models/pixtral.py, models/mistral3.py)."""


def as_mx(inputs: dict[str, np.ndarray]) -> dict[str, mx.array]:
    return {k: mx.array(v) for k, v in inputs.items()}


@pytest.mark.parametrize("family", ["llava", "llava_next"])  # Pixtral's: test_pixtral.py
def test_quantized_mlx_community_checkpoint_loads(family: str) -> None:
    """The 4-bit folder written by tests/fixtures/make_mlx_community_llava.py: quantized layers come back
    quantized, compute exactly what their dequantized weights compute, and stay near transformers' logits."""
    ref = Reference(family)
    model, _ = load(FIXTURES / family / "mlx_community_4bit")
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.model.language_model.named_modules())
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.model.vision_tower.named_modules())
    twin, _ = load(FIXTURES / family / "mlx_community_4bit")
    dequantize_model(twin)
    inputs = as_mx(ref.inputs("one_image"))
    ours = np.array(model(**inputs).logits)
    np.testing.assert_allclose(ours, np.array(twin(**inputs).logits), atol=1e-4)
    expected = ref.get("one_image", "logits")
    rel = np.abs(ours - expected).mean() / np.abs(expected).mean()
    assert rel < 0.5, f"4-bit relative error {rel:.3f}"
    assert (ours.argmax(-1) == expected.argmax(-1)).mean() > 0.5


@pytest.mark.parametrize("layout", ["hf4", "hf5", "mlx_community"])
@pytest.mark.parametrize("family", LLAVA_FAMILIES)
def test_chat_template_through_the_checkpoint_tokenizer(family: str, layout: str) -> None:
    ref = Reference(family)
    _, processor = load(FIXTURES / family / layout)
    for case, meta in ref.meta["cases"].items():
        content = meta["messages"][0]["content"]
        if [item["type"] for item in content] == ["image"] * len(meta["images"]) + ["text"]:
            prompt = apply_chat_template(processor, None, content[-1]["text"], num_images=len(meta["images"]))
        else:  # images between texts: the messages as they are
            prompt = apply_chat_template(processor, None, meta["messages"])
        assert prompt == meta["prompt"], f"{family}/{layout}/{case}"


@pytest.mark.parametrize("family", LLAVA_FAMILIES)
def test_vision_cache_reuses_features_and_changes_nothing(family: str) -> None:
    ref = Reference(family)
    model, _ = load(FIXTURES / family / "hf5")
    inputs = as_mx(ref.inputs("two_images"))
    plain = model.embed_prompt(**inputs).inputs_embeds
    cache = VisionFeatureCache()
    first = model.embed_prompt(**inputs, vision_cache=cache).inputs_embeds
    second = model.embed_prompt(**inputs, vision_cache=cache).inputs_embeds
    assert cache.misses == 2 and cache.hits == 2
    assert mx.array_equal(plain, first).item() and mx.array_equal(plain, second).item()


def test_padded_batch_rows_match_each_prompt_alone() -> None:
    """Left padding: each row counts positions over its own tokens, so it computes what it computes alone."""
    ref = Reference("llava")
    model, _ = load(FIXTURES / "llava" / "hf5")
    short, long = ref.get("text", "input_ids")[0], ref.get("one_image", "input_ids")[0]
    pad = len(long) - len(short)
    ids = np.stack([np.concatenate([np.zeros(pad, np.int64), short]), long])
    mask = np.stack([np.concatenate([np.zeros(pad, np.int64), np.ones_like(short)]), np.ones_like(long)])
    pixels = ref.get("one_image", "pixel_values")
    logits = np.array(model(mx.array(ids), mx.array(pixels), mx.array(mask)).logits)
    np.testing.assert_allclose(logits[0, pad:], ref.get("text", "logits")[0], atol=1e-4)
    np.testing.assert_allclose(logits[1], ref.get("one_image", "logits")[0], atol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["text_config"].update(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope type"),
        (lambda c: c["text_config"].update(model_type="gemma"), "not supported"),
        (lambda c: c["text_config"].update(sliding_window=16), "sliding"),
        (lambda c: c.update(vision_feature_select_strategy="cls"), "vision_feature_select_strategy"),
    ],
    ids=["rope-scaling", "text-model", "sliding-window", "strategy"],
)
def test_unsupported_configs_are_named(tmp_path: Path, change, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load(_with_config(tmp_path, "llava", change))


def test_feature_layer_out_of_range_is_a_clear_error(tmp_path: Path) -> None:
    model, _ = load(_with_config(tmp_path, "llava", lambda c: c.update(vision_feature_layer=-9)))
    ref = Reference("llava")
    with pytest.raises(ValueError, match="out of range"):
        model(**as_mx(ref.inputs("one_image")))


def test_wrong_image_size_is_a_clear_error() -> None:
    model, _ = load(FIXTURES / "llava" / "hf5")
    ids = mx.array(Reference("llava").get("one_image", "input_ids"))
    with pytest.raises(ValueError, match="takes 42x42 images"):
        model(ids, mx.zeros((1, 3, 56, 56)))


@pytest.fixture(scope="module")
def llava_next():
    return load(FIXTURES / "llava_next" / "hf4")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400))
def test_anyres_placeholders_equal_the_packed_features(llava_next, height: int, width: int) -> None:
    """For any image size the processor writes as many <image> tokens as the model packs features (global view,
    unpadded tile grid, one newline per row), so the prompt and the features always line up."""
    model, processor = llava_next
    outputs = processor.image_processor([Image.new("RGB", (width, height))])
    (expected,) = processor.image_processor.image_token_counts(outputs)
    gh, gw = model._grid(height, width)
    side = model.config.vision.patches_per_side
    features = mx.zeros((1 + gh * gw, side * side, model.config.text.hidden_size))
    assert model._pack(features, height, width, (gh, gw)).shape[0] == expected


def test_anyres_packing_keeps_the_image_rows_and_ends_each_with_the_newline(llava_next) -> None:
    """Tile features laid out by position: the packed rows are the stitched grid's middle rows, in order."""
    model, _ = llava_next
    side, dim = model.config.vision.patches_per_side, model.config.text.hidden_size
    gh, gw = 1, 2  # a wide image: two tiles side by side, letterboxed top and bottom
    height, width = 30, 100
    rows, cols = gh * side, gw * side
    position = np.zeros((1 + gh * gw, side * side, dim), np.float32)
    for t in range(gh * gw):
        for p in range(side * side):
            r, c = (t // gw) * side + p // side, (t % gw) * side + p % side
            position[1 + t, p, 0], position[1 + t, p, 1] = r, c
    packed = np.array(model._pack(mx.array(position), height, width, (gh, gw)))
    body = packed[side * side :].reshape(-1, cols + 1, dim)
    kept = body.shape[0]
    assert kept < rows  # the letterbox rows are gone
    np.testing.assert_array_equal(body[:, :cols, 0], np.repeat(np.arange(kept)[:, None] + (rows - kept) // 2, cols, 1))
    np.testing.assert_array_equal(body[:, :cols, 1], np.tile(np.arange(cols), (kept, 1)))
    np.testing.assert_array_equal(body[:, cols], np.broadcast_to(np.array(model.model.image_newline), (kept, dim)))


def test_anyres_without_image_sizes_is_a_clear_error(llava_next) -> None:
    model, _ = llava_next
    ref = Reference("llava_next")
    inputs = as_mx(ref.inputs("one_image"))
    inputs.pop("image_sizes")
    with pytest.raises(ValueError, match="image_sizes"):
        model(**inputs)


def test_anyres_cache_keys_ignore_the_batch_padding(llava_next) -> None:
    """An image padded with an empty tile in a two-image prompt is the same cache entry as the image alone."""
    model, processor = llava_next
    images = [FIXTURES / "images" / "rgb_200x100.png", FIXTURES / "images" / "rgb_90x600.png"]
    pair = processor.prepare_inputs(apply_chat_template(processor, None, "Compare.", num_images=2), images)
    alone = processor.prepare_inputs(apply_chat_template(processor, None, "Describe.", num_images=1), images[:1])
    assert pair["pixel_values"].shape[1] > alone["pixel_values"].shape[1]  # the first image is padded in the pair
    cache = VisionFeatureCache()
    model.embed_prompt(**pair, vision_cache=cache)
    cached = model.embed_prompt(**alone, vision_cache=cache).inputs_embeds
    assert (cache.hits, cache.misses) == (1, 2)
    assert mx.array_equal(cached, model.embed_prompt(**alone).inputs_embeds).item()


def test_several_feature_layers_with_the_class_token_match_transformers(tmp_path: Path) -> None:
    """vision_feature_layer [-3, -1] with strategy "full" (make_fixtures_llava.py's variant): the llava checkpoint
    with the variant's config and its wider projector layer computes transformers' logits, and the processor
    writes one more placeholder per image (the class token)."""
    variant = json.loads((FIXTURES / "llava" / "variant_reference.json").read_text())
    path = Path(shutil.copytree(FIXTURES / "llava" / "hf5", tmp_path / "model"))
    config = json.loads((path / "config.json").read_text())
    config.update(variant["config"])
    (path / "config.json").write_text(json.dumps(config))
    processor_config = json.loads((path / "processor_config.json").read_text())
    processor_config["vision_feature_select_strategy"] = variant["config"]["vision_feature_select_strategy"]
    (path / "processor_config.json").write_text(json.dumps(processor_config))
    weights = dict(mx.load(str(path / "model.safetensors")))
    weights.update(mx.load(str(FIXTURES / "llava" / "variant_projector.safetensors")))
    mx.save_safetensors(str(path / "model.safetensors"), weights)

    model, processor = load(path)
    reference = np.load(FIXTURES / "llava" / "variant_reference.npz")
    for case, meta in variant["cases"].items():
        inputs = {k: mx.array(reference[f"{case}/{k}"]) for k in ("input_ids", "attention_mask", "pixel_values")}
        logits = np.array(model(**inputs).logits)
        diff = np.abs(logits - reference[f"{case}/logits"]).max()
        assert diff <= 1e-4, f"{case}: {diff:.2e}"
        ours = processor(meta["prompt"], [FIXTURES / "images" / name for name in meta["images"]])
        np.testing.assert_array_equal(ours["input_ids"], reference[f"{case}/input_ids"])


@pytest.mark.parametrize("family", LLAVA_FAMILIES)
def test_checkpoint_without_processor_config_counts_placeholders_from_the_model(tmp_path: Path, family: str) -> None:
    """Older llava-hf revisions have no processor_config.json (patch_size, strategy): the model config's values
    give the same prompts as the processor settings do."""
    path = Path(shutil.copytree(FIXTURES / family / "hf4", tmp_path / "model"))
    (path / "processor_config.json").unlink()
    _, processor = load(path)
    ref = Reference(family)
    for case, meta in ref.meta["cases"].items():
        ours = processor(meta["prompt"], [FIXTURES / "images" / name for name in meta["images"]])
        np.testing.assert_array_equal(ours["input_ids"], ref.get(case, "input_ids"), err_msg=case)
