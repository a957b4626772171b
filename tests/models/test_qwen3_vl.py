"""Qwen3-VL beyond the shared parity tests: the image processor against transformers' under Qwen3-VL's
settings, the chat template, the 4-bit MLX-community folder, proof that the fixture exercises deepstack and
interleaved M-RoPE, video inputs, and the invariants of the position-table resampling."""

from __future__ import annotations

import dataclasses
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_models import apply_chat_template, load
from vlm_models.models.qwen3_vl import Model, interpolation_taps
from vlm_models.nn.rope import axis_of_frequency
from vlm_models.processors.qwen2_vl import Qwen2VLImageProcessor
from vlm_models.quantize import dequantize_model
from vlm_runtime import GenerationConfig, SamplingParams, generate_step, make_sampler

from .conftest import FIXTURES, Reference, check_chunked_prefill

ROOT = FIXTURES / "qwen3_vl"
TOL = 1e-4


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference("qwen3_vl")


@pytest.fixture(scope="module")
def loaded():
    return load(ROOT / "hf4")


def inputs_of(ref: Reference, case: str) -> dict[str, mx.array]:
    return {k: mx.array(v) for k, v in ref.inputs(case).items()}


@pytest.mark.parametrize("config", ["fixture", "published"])
def test_image_processor_matches_transformers(config: str) -> None:
    expected = np.load(ROOT / "image_processor_reference.npz")
    settings_ = json.loads((ROOT / "image_processor_reference.json").read_text())["configs"][config]
    processor = Qwen2VLImageProcessor.from_config(settings_)
    assert processor.patch_size == 16 and processor.image_mean == (0.5, 0.5, 0.5)
    names = sorted({k.split("/")[1] for k in expected.files if k.startswith(config + "/")})
    assert len(names) == 7
    for name in names:
        with Image.open(FIXTURES / "images" / name) as image:
            ours = processor([image])
        want = expected[f"{config}/{name}/pixel_values"]
        assert ours["pixel_values"].shape == want.shape, name
        np.testing.assert_allclose(ours["pixel_values"], want, atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_array_equal(ours["image_grid_thw"], expected[f"{config}/{name}/image_grid_thw"])


def test_published_preprocessor_settings_are_read(loaded) -> None:
    _, processor = loaded
    ip = processor.image_processor
    assert (ip.patch_size, ip.merge_size, ip.min_pixels, ip.max_pixels) == (16, 2, 64 * 64, 32 * 32 * 64)


@pytest.mark.parametrize("layout", ["hf4", "hf5", "mlx_community", "mlx_community_4bit"])
def test_chat_template_through_the_checkpoint_tokenizer(layout: str, ref: Reference) -> None:
    _, processor = load(ROOT / layout)
    for case in ref.single_cases:
        meta = ref.meta["cases"][case]
        text = meta["messages"][0]["content"][-1]["text"]
        prompt = apply_chat_template(processor, None, text, num_images=len(meta["images"]))
        assert prompt == meta["prompt"], case


def test_quantized_mlx_community_checkpoint_loads(ref: Reference) -> None:
    """Written by our converter (tests/fixtures/make_mlx_community_llava.py): decoder and vision tower come back
    quantized, the patch embedding (a Conv3d in that layout) stays float, the model computes what its dequantized
    weights compute, and it stays near transformers' float32 logits."""
    path = ROOT / "mlx_community_4bit"
    raw = dict(mx.load(str(path / "model.safetensors")))
    assert raw["vision_tower.patch_embed.proj.weight"].ndim == 5
    quantized, _ = load(path)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in quantized.model.language_model.named_modules())
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in quantized.model.visual.named_modules())
    twin, _ = load(path)
    dequantize_model(twin)
    for case in ("one_image", "text"):
        inputs = inputs_of(ref, case)
        ours, expected = np.array(quantized(**inputs).logits), ref.get(case, "logits")
        np.testing.assert_allclose(ours, np.array(twin(**inputs).logits), atol=TOL, rtol=0)
        rel = np.abs(ours - expected).mean() / np.abs(expected).mean()
        corr = np.corrcoef(ours.reshape(-1), expected.reshape(-1))[0, 1]
        assert rel < 0.5 and corr > 0.9, f"{case}: relative error {rel:.3f}, correlation {corr:.3f}"


def test_deepstack_features_change_the_logits(loaded, ref: Reference) -> None:
    """Dropping the deepstack channels of the prompt moves the logits well past the parity tolerance after the
    images (and not before them): the parity tests really check the deepstack path."""
    model, _ = loaded
    inputs = inputs_of(ref, "two_images")
    prompt = model.embed_prompt(**inputs)
    hidden = model.config.text.hidden_size
    assert prompt.inputs_embeds.shape[-1] == hidden * 3  # the merged features and two deepstack levels
    plain = model.compute_logits(
        model.hidden_states(prompt.inputs_embeds[..., :hidden], position_ids=prompt.position_ids)
    )
    expected = ref.get("two_images", "logits")
    first_image = int(np.argmax(ref.get("two_images", "input_ids")[0] == model.config.image_token_id))
    diff = np.abs(np.array(plain) - expected)
    assert diff[0, :first_image].max() <= TOL
    assert diff[0, first_image:].max() > 100 * TOL


@pytest.mark.parametrize("step", [5, 16])
def test_chunked_prefill_carries_the_deepstack_channels(loaded, ref: Reference, step: int) -> None:
    """Chunks cut through the image tokens: each chunk's slice of the packed embedding still holds its deepstack
    features, so the logits and greedy tokens are those of the reference."""
    model, _ = loaded
    for case in ("one_image", "two_images"):
        check_chunked_prefill(model, ref, case, step)


def test_interleaved_mrope_is_what_matches(loaded, ref: Reference) -> None:
    """The same weights with Qwen2-VL's sectioned M-RoPE miss the reference on an image prompt."""
    model, _ = loaded
    sectioned = Model(dataclasses.replace(model.config, mrope_interleaved=False))
    sectioned.update(model.parameters())
    inputs = inputs_of(ref, "one_image")
    diff = np.abs(np.array(sectioned(**inputs).logits) - ref.get("one_image", "logits")).max()
    assert diff > 100 * TOL


@settings(max_examples=40, deadline=None)
@given(
    grids=st.lists(
        st.tuples(st.integers(1, 2), st.integers(1, 8), st.integers(1, 8)).map(lambda g: (g[0], 2 * g[1], 2 * g[2])),
        min_size=1,
        max_size=3,
    ),
    side=st.integers(2, 12),
)
def test_position_table_resampling_invariants(grids, side: int) -> None:
    grid = np.array(grids)
    indices, weights = interpolation_taps(grid, 2, side)
    assert indices.shape == weights.shape == (int(grid.prod(axis=1).sum()), 4)
    assert ((indices >= 0) & (indices < side * side)).all()
    assert (weights >= 0).all()
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    # A grid as large as the table reads every entry exactly once, with weight one (the corners align).
    same, w = interpolation_taps(np.array([[1, side, side]]), 1, side)
    picked = (same * (w > 0.5)).sum(axis=1)
    np.testing.assert_array_equal(np.sort(picked), np.arange(side * side))
    np.testing.assert_allclose(w.max(axis=1), 1.0, atol=1e-6)


@given(time=st.integers(0, 40), spatial=st.integers(1, 24))
def test_interleaved_axes_give_each_axis_its_section(time: int, spatial: int) -> None:
    sections = (time + spatial, spatial, spatial)
    axis = axis_of_frequency(sections, interleaved=True)
    assert np.bincount(axis, minlength=3).tolist() == list(sections)
    assert (axis[: 3 * spatial] == np.tile([0, 1, 2], spatial)).all()


VIDEO_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
)


@pytest.mark.parametrize("layout", ["hf4", "hf5", "mlx_community"])
@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_video_and_image_prompt_matches_transformers(family: str, layout: str) -> None:
    """A video (two temporal patches, timestamped frames) and an image in one prompt: the video runs through the
    tower per frame, both feed deepstack, and each frame takes its own M-RoPE grid (Qwen3-VL-MoE shares the path)."""
    video = np.load(FIXTURES / family / "video_reference.npz")
    model, _ = load(FIXTURES / family / layout)
    inputs = {name: mx.array(video[name]) for name in VIDEO_INPUTS}
    prompt = model.embed_prompt(**inputs)
    np.testing.assert_array_equal(np.array(prompt.position_ids), video["position_ids"])
    diff = np.abs(np.array(model(**inputs).logits) - video["logits"]).max()
    assert diff <= TOL, f"max |logits - reference| = {diff:.2e}"
    expected = video["greedy"].reshape(-1).tolist()
    config = GenerationConfig(max_tokens=len(expected))
    steps = generate_step(model, inputs, sampler=make_sampler(SamplingParams()), config=config)
    assert [t for t, _ in steps] == expected


def test_video_inputs_come_in_pairs(loaded) -> None:
    model, _ = loaded
    video = np.load(ROOT / "video_reference.npz")
    with pytest.raises(ValueError, match="pixel_values_videos and video_grid_thw"):
        model.embed_prompt(mx.array(video["input_ids"]), pixel_values_videos=mx.array(video["pixel_values_videos"]))
