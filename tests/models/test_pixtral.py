"""Pixtral (LLaVA + Pixtral tower) and Mistral 3 beyond the shared suites: the image processor against
transformers on several sizes and settings, prompt expansion against the model's features for any image size,
the quantized MLX-community folder, images batched together computing what each computes alone, and clear
errors."""

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
from vlm_models.models.mistral3 import PatchMerger
from vlm_models.nn.rope import AxialRotary
from vlm_models.processors import load_image
from vlm_models.processors.pixtral import PixtralImageProcessor
from vlm_models.quantize import dequantize_model, quantize_model
from vlm_models.registry import architecture_of
from vlm_runtime.vision_cache import VisionFeatureCache

from .conftest import FIXTURES, Reference, checkpoint_with_config

FAMILIES = ["pixtral", "mistral3"]
IMAGES = FIXTURES / "images"
PROCESSOR_REFERENCE = np.load(FIXTURES / "pixtral" / "image_processor_reference.npz")
PROCESSOR_META = json.loads((FIXTURES / "pixtral" / "image_processor_reference.json").read_text())
PROCESSOR_CASES = [(c, n) for c, m in PROCESSOR_META.items() if isinstance(m["config"], dict) for n in m["images"]]


def as_mx(inputs: dict[str, np.ndarray]) -> dict[str, mx.array]:
    return {k: mx.array(v) for k, v in inputs.items()}


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
    return request.param, *load(FIXTURES / request.param / "hf4")


# -- the image processor


@pytest.mark.parametrize(("config_name", "image"), PROCESSOR_CASES, ids=[f"{c}-{n}" for c, n in PROCESSOR_CASES])
def test_image_processor_matches_transformers(config_name: str, image: str) -> None:
    processor = PixtralImageProcessor.from_config(PROCESSOR_META[config_name]["config"])
    out = processor([load_image(IMAGES / image)])
    expected = PROCESSOR_REFERENCE[f"{config_name}/{image}/pixel_values"]
    assert out["pixel_values"].dtype == np.float32 and out["pixel_values"].shape == expected.shape
    assert np.abs(out["pixel_values"] - expected).max() <= 1e-5
    np.testing.assert_array_equal(out["image_sizes"], PROCESSOR_REFERENCE[f"{config_name}/{image}/image_sizes"])


def test_image_processor_pads_a_batch_like_transformers() -> None:
    meta = PROCESSOR_META["batch"]
    processor = PixtralImageProcessor.from_config(PROCESSOR_META[meta["config"]]["config"])
    out = processor([load_image(IMAGES / n) for n in meta["images"]])
    np.testing.assert_array_equal(out["image_sizes"], PROCESSOR_REFERENCE["batch/image_sizes"])
    assert len({tuple(s) for s in out["image_sizes"].tolist()}) == len(meta["images"])  # really mixed sizes
    assert np.abs(out["pixel_values"] - PROCESSOR_REFERENCE["batch/pixel_values"]).max() <= 1e-5


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300))
def test_placeholders_line_up_with_the_features_for_any_size(loaded, height: int, width: int) -> None:
    """Any image: whole tokens, inside the longest edge (rounded up to a token), one [IMG] per feature the model
    computes, [IMG_BREAK] closing every token row but the last, which [IMG_END] closes."""
    _, model, processor = loaded
    ip = processor.image_processor
    image = Image.new("RGB", (width, height), (200, 30, 90))
    if min(height, width) * ip.longest_edge < max(height, width):  # fitting it would leave a side of no pixels
        with pytest.raises(ValueError, match="elongated"):
            ip([image])
        return
    outputs = ip([image])
    (h, w), step = outputs["image_sizes"][0].tolist(), ip.token_pixels
    assert h % step == 0 and w % step == 0
    assert max(h, w) <= -(-ip.longest_edge // step) * step
    expanded = ip.expand_prompt("a[IMG]b", "[IMG]", outputs)
    rows = expanded[1:-1].split("[IMG_BREAK]")
    assert rows[-1].endswith("[IMG_END]") and len(rows) == h // step
    assert all(row.replace("[IMG_END]", "") == "[IMG]" * (w // step) for row in rows)
    (features,) = model.image_features(mx.array(outputs["pixel_values"]), image_sizes=mx.array(outputs["image_sizes"]))
    assert features.shape[0] == expanded.count("[IMG]") == (h // step) * (w // step)


# -- the model


def test_quantized_mlx_community_checkpoint_loads(loaded) -> None:
    """The 4-bit folder written by tests/fixtures/make_mlx_community_llava.py: quantized layers come back quantized
    (tower and decoder), compute what their dequantized weights compute and what quantizing the float checkpoint in
    memory computes; at 4 bits a model this small drifts far, so closeness to transformers is shown at 8 bits."""
    family, _, _ = loaded
    ref = Reference(family)
    model, _ = load(FIXTURES / family / "mlx_community_4bit")
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.model.language_model.named_modules())
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.model.vision_tower.named_modules())
    inputs = as_mx(ref.inputs("two_images"))
    ours = np.array(model(**inputs).logits)
    twin, _ = load(FIXTURES / family / "mlx_community_4bit")
    np.testing.assert_allclose(ours, np.array(dequantize_model(twin)(**inputs).logits), atol=1e-4)
    in_memory, _ = load(FIXTURES / family / "hf4")
    quantize_model(in_memory, bits=4, group_size=32)
    np.testing.assert_allclose(ours, np.array(in_memory(**inputs).logits), atol=1e-4)
    expected = ref.get("two_images", "logits")
    assert np.abs(ours - expected).mean() / np.abs(expected).mean() < 0.5
    eight_bit, _ = load(FIXTURES / family / "hf4")
    quantize_model(eight_bit, bits=8, group_size=32)
    eight = np.array(eight_bit(**inputs).logits)
    assert (eight.argmax(-1) == expected.argmax(-1)).mean() > 0.9


def test_images_batched_together_compute_what_each_computes_alone(loaded) -> None:
    """Padding to the largest image, and attention inside each image only (transformers' block-diagonal mask):
    the batch's features are each image's own; the vision cache therefore keys an image by its own pixels and
    serves it across prompts."""
    _family, model, processor = loaded
    # Two images of one grid (both square) among two of others: same-grid images run as one batch.
    images = [IMAGES / n for n in ("rgb_200x100.png", "rgb_56x56.png", "rgb_90x600.png", "rgba_150x150.png")]
    several = processor.prepare_inputs(apply_chat_template(processor, None, "Compare.", num_images=4), images)
    sizes = [tuple(s) for s in np.array(several["image_sizes"]).tolist()]
    assert sizes[1] == sizes[3] and len(set(sizes)) == 3
    together = model.image_features(several["pixel_values"], image_sizes=several["image_sizes"])
    for image, features in zip(images, together):
        alone = processor.prepare_inputs(apply_chat_template(processor, None, "Describe.", num_images=1), [image])
        (single,) = model.image_features(alone["pixel_values"], image_sizes=alone["image_sizes"])
        np.testing.assert_allclose(np.array(features), np.array(single), atol=1e-5)
    pair = processor.prepare_inputs(apply_chat_template(processor, None, "Compare.", num_images=2), images[2:])
    alone = processor.prepare_inputs(apply_chat_template(processor, None, "Describe.", num_images=1), images[2:3])
    assert pair["pixel_values"].shape[-2:] != alone["pixel_values"].shape[-2:]  # padded in the pair
    cache = VisionFeatureCache()
    model.embed_prompt(**pair, vision_cache=cache)
    cached = model.embed_prompt(**alone, vision_cache=cache).inputs_embeds
    assert (cache.hits, cache.misses) == (1, 2)
    assert mx.array_equal(cached, model.embed_prompt(**alone).inputs_embeds).item()


def test_inputs_that_do_not_belong_together_are_clear_errors(loaded) -> None:
    family, model, _ = loaded
    inputs = as_mx(Reference(family).inputs("two_images"))
    without_sizes = {k: v for k, v in inputs.items() if k != "image_sizes"}
    with pytest.raises(ValueError, match="image_sizes"):
        model(**without_sizes)
    with pytest.raises(ValueError, match="does not fit"):
        model(**{**inputs, "image_sizes": inputs["image_sizes"] + 1})
    with pytest.raises(ValueError, match="do not match"):
        model(**{**inputs, "image_sizes": inputs["image_sizes"][:1]})


def test_mlx_vlm_model_type_loads_as_pixtral(tmp_path: Path) -> None:
    """mlx-vlm writes Pixtral-12B conversions with model_type "pixtral": the same model, transformers' logits."""
    path = Path(shutil.copytree(FIXTURES / "pixtral" / "mlx_community", tmp_path / "model"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "pixtral"}))
    model, _ = load(path)
    ref = Reference("pixtral")
    logits = np.array(model(**as_mx(ref.inputs("two_images"))).logits)
    assert np.abs(logits - ref.get("two_images", "logits")).max() <= 1e-4
    vision_only = tmp_path / "vision_only"
    vision_only.mkdir()
    (vision_only / "config.json").write_text(json.dumps({"model_type": "pixtral", **config["vision_config"]}))
    shutil.copy(path / "model.safetensors", vision_only)
    with pytest.raises(ModelLoadError, match="no text_config"):
        load(vision_only)


def test_registry_picks_the_tower_of_a_llava_checkpoint() -> None:
    for family, module in (("pixtral", "pixtral"), ("llava", "llava"), ("mistral3", "mistral3")):
        config = json.loads((FIXTURES / family / "hf4" / "config.json").read_text())
        assert architecture_of(config).module == module


@pytest.mark.parametrize(
    ("family", "change", "message"),
    [
        ("pixtral", lambda c: c.update(vision_feature_select_strategy="default"), "no class token"),
        ("pixtral", lambda c: c["text_config"].update(sliding_window=16), "sliding"),
        ("mistral3", lambda c: c["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type"),
        ("mistral3", lambda c: c.update(vision_feature_layer=[-2, -1]), "one int"),
        ("mistral3", lambda c: c["vision_config"].update(rope_parameters={"rope_type": "linear"}), "axial"),
        ("mistral3", lambda c: c["vision_config"].update(num_attention_heads=16), "multiple of 4"),
    ],
    ids=["strategy", "sliding-window", "text-rope", "feature-layers", "vision-rope", "head-size"],
)
def test_unsupported_configs_are_named(tmp_path: Path, family: str, change, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load(checkpoint_with_config(tmp_path, family, change))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 3), st.integers(1, 3))
def test_patch_merger_lays_out_blocks_as_torch_unfold(rows: int, cols: int, merge: int, dim: int) -> None:
    """Before its linear map, each token is one merge x merge block, channel-major and row-major inside the block
    (torch's unfold), the blocks row-major; a trailing partial row or column of blocks is dropped."""
    merger = PatchMerger(dim, merge)
    merger.merging_layer = nn.Identity()
    grid = np.arange(rows * cols * dim, dtype=np.float32).reshape(rows, cols, dim)
    expected = [
        [grid[bi * merge + ki, bj * merge + kj, c] for c in range(dim) for ki in range(merge) for kj in range(merge)]
        for bi in range(rows // merge)
        for bj in range(cols // merge)
    ]
    out = np.array(merger(mx.array(grid.reshape(-1, dim)), (rows, cols)))
    np.testing.assert_array_equal(out, np.asarray(expected, np.float32).reshape(-1, dim * merge * merge))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=2, max_size=6),
    st.integers(0, 30),
    st.integers(0, 30),
    st.integers(0, 2**31 - 1),
)
def test_axial_rotary_scores_depend_only_on_the_row_and_column_offsets(positions, shift_row, shift_col, seed) -> None:
    """Query-key products after the 2D rotary are unchanged when every patch moves by the same (rows, cols), and
    the rotation keeps each vector's length."""
    rotary, rng = AxialRotary(16, 10000.0), np.random.default_rng(seed)
    q, k = (mx.array(rng.standard_normal((1, 2, len(positions), 16)).astype(np.float32)) for _ in range(2))
    rows, cols = (np.array(axis) for axis in zip(*positions))

    def scores(dr: int, dc: int) -> np.ndarray:
        rotate = rotary.at_grid(mx.array(rows + dr), mx.array(cols + dc))
        lengths = np.linalg.norm(np.array(rotate(q)), axis=-1)
        assert np.allclose(lengths, np.linalg.norm(np.array(q), axis=-1), atol=1e-4)
        return np.array(rotate(q) @ rotate(k).transpose(0, 1, 3, 2))

    np.testing.assert_allclose(scores(shift_row, shift_col), scores(0, 0), atol=2e-3)
