"""Idefics3 and SmolVLM beyond the shared parity tests: the chat template, image tiling and prompt expansion
against transformers, the vision tower on partly padded tiles, the MLX-community layout written by our converter,
the vision feature cache per tile, config and input errors, and the invariants of pixel shuffle and the
variable-resolution positions."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_models import apply_chat_template, load
from vlm_models.config import ConfigError
from vlm_models.convert import save_model
from vlm_models.models.idefics3 import ModelConfig, pixel_shuffle
from vlm_models.nn.siglip import navit_position_ids
from vlm_models.processors.idefics3 import Idefics3ImageProcessor, image_prompt
from vlm_runtime.vision_cache import VisionFeatureCache

from .conftest import FIXTURES, Reference, check_quantized_fixture, inputs_of, logits_of

TOL = 1e-4
FAMILIES = ["idefics3", "smolvlm"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def ref(family: str) -> Reference:
    return Reference(family)


@pytest.fixture(scope="module")
def model(family: str):
    return load(FIXTURES / family / "hf4")[0]


@pytest.mark.parametrize("layout", ["hf4", "hf5", "mlx_community_4bit"])
def test_chat_template_through_the_checkpoint_tokenizer(family: str, layout: str, ref: Reference) -> None:
    _, processor = load(FIXTURES / family / layout)
    for case in ref.single_cases:
        meta = ref.meta["cases"][case]
        prompt = apply_chat_template(processor, None, meta["text"], num_images=len(meta["images"]))
        assert prompt == meta["prompt"], case


def fixture_image_processor(family: str) -> Idefics3ImageProcessor:
    from vlm_models.loading import _image_processor_config

    return Idefics3ImageProcessor.from_config(_image_processor_config(FIXTURES / family / "hf5"))


@pytest.mark.parametrize("config", ["fixture", "no_split", "wide"])
def test_image_processor_matches_transformers(family: str, config: str) -> None:
    """All seven fixture images (56x56 to 90x600, gray and RGBA too): tiled, untiled, and with tiles of 48 from
    a longest edge of 160 (up to 4x4 tiles; there the reference keeps only each frame's pixel sum)."""
    expected = np.load(FIXTURES / family / "image_processor_reference.npz")
    processor = fixture_image_processor(family)
    if config == "no_split":
        processor = dataclasses.replace(processor, do_image_splitting=False)
    elif config == "wide":
        processor = dataclasses.replace(processor, longest_edge=160, height=48, width=48)
    names = sorted({k.split("/")[1] for k in expected.files if k.startswith(config + "/")})
    assert len(names) == 7
    grids = set()
    for name in names:
        with Image.open(FIXTURES / "images" / name) as image:
            ours = processor([image])
        key = f"{config}/{name}"
        np.testing.assert_array_equal(ours["rows_cols"][0], expected[f"{key}/rows_cols"], err_msg=name)
        grids.add(tuple(ours["rows_cols"][0]))
        if config == "wide":
            sums = ours["pixel_values"][0].astype(np.float64).sum(axis=(1, 2, 3))
            np.testing.assert_allclose(sums, expected[f"{key}/frame_sums"], rtol=1e-6, atol=1e-3, err_msg=name)
            continue
        want = expected[f"{key}/pixel_values"]
        assert ours["pixel_values"].shape == want.shape, name
        np.testing.assert_allclose(ours["pixel_values"], want, atol=1e-6, rtol=0, err_msg=name)
        np.testing.assert_array_equal(ours["pixel_attention_mask"], expected[f"{key}/pixel_attention_mask"])
    assert len(grids) >= (1 if config == "no_split" else 3), grids  # several tile grids were exercised


def test_image_prompt_matches_transformers(family: str) -> None:
    reference = json.loads((FIXTURES / family / "image_prompt_reference.json").read_text())
    for grid, text in reference["prompts"].items():
        rows, cols = (int(v) for v in grid.split("x"))
        assert image_prompt(rows, cols, reference["image_seq_len"], "<image>") == text, grid


def test_vision_tower_on_partly_padded_tiles(model, family: str) -> None:
    """Tiles whose real content is a smaller rectangle of patches: padding is hidden from attention and the
    real patches take positions spread over the whole grid, as in transformers."""
    ref = np.load(FIXTURES / family / "vision_reference.npz")
    mask = ref["vision_masked/patch_attention_mask"]
    assert not mask.all() and mask[0].all()
    hidden = model.model.vision_model(mx.array(ref["vision_masked/pixel_values"]), mask)
    np.testing.assert_allclose(np.array(hidden), ref["vision_masked/hidden"], atol=TOL, rtol=0)


def test_mlx_community_layout_round_trip(tmp_path: Path, family: str, model, ref: Reference) -> None:
    config = json.loads((FIXTURES / family / "hf4" / "config.json").read_text())
    out = save_model(model, tmp_path / "mlx", source=FIXTURES / family / "hf4", config=config)
    names = set(mx.load(str(out / "model.safetensors")))
    assert {n.split(".")[0] for n in names} == {"language_model", "vision_model", "connector"}
    assert ("language_model.lm_head.weight" in names) != model.config.tie_word_embeddings
    reloaded, _ = load(out)
    for case in ("one_image", "text"):
        np.testing.assert_allclose(logits_of(reloaded, ref, case), ref.get(case, "logits"), atol=TOL, rtol=0)


def test_quantized_mlx_community_fixture(family: str, ref: Reference) -> None:
    check_quantized_fixture(family, ref)
    path = FIXTURES / family / "mlx_community_4bit"
    quantized, _ = load(path)
    raw = dict(mx.load(str(path / "model.safetensors")))
    once = quantized.sanitize(raw)
    twice = quantized.sanitize(once)
    assert once.keys() == twice.keys() and all(k.startswith(("model.", "lm_head.")) for k in once)


def test_vision_feature_cache_per_tile(model, ref: Reference) -> None:
    inputs = inputs_of(ref, "two_images")
    frames = int(inputs["pixel_values"].shape[1])
    plain = np.array(model.embed_prompt(**inputs).inputs_embeds)
    cache = VisionFeatureCache()
    first = np.array(model.embed_prompt(**inputs, vision_cache=cache).inputs_embeds)
    assert (cache.hits, cache.misses, len(cache)) == (0, frames, frames)
    second = np.array(model.embed_prompt(**inputs, vision_cache=cache).inputs_embeds)
    assert (cache.hits, cache.misses) == (frames, frames)
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(second, plain)


def test_padding_frames_of_a_batch_are_dropped(model, ref: Reference) -> None:
    """The padded batch's first row has fewer frames than the second; its all-zero padding frames give no
    features (else the image-token count would not match)."""
    inputs = inputs_of(ref, "batch_pad")
    pixels = np.asarray(inputs["pixel_values"])
    assert (pixels[0] == 0).all(axis=(1, 2, 3)).any()
    real = ref.get("batch_pad", "attention_mask").astype(bool)
    np.testing.assert_allclose(
        logits_of(model, ref, "batch_pad")[real], ref.get("batch_pad", "logits")[real], atol=TOL, rtol=0
    )


def test_mismatched_inputs_are_named(model, ref: Reference) -> None:
    inputs = inputs_of(ref, "one_image")
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, frames, C, H, W\)"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][0]})
    with pytest.raises(ValueError, match="image tokens"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:, :2]})
    _, processor = load(FIXTURES / "idefics3" / "hf4")
    with pytest.raises(ValueError, match="image slot"):
        processor("User:<image>Describe.", [])


def test_unsupported_configs_are_named() -> None:
    base = json.loads((FIXTURES / "idefics3" / "hf4" / "config.json").read_text())
    assert ModelConfig.from_hf(base).tokens_per_tile == 16
    with pytest.raises(ConfigError, match="text_config.model_type 'mistral'"):  # noqa: RUF043
        ModelConfig.from_hf({**base, "text_config": {**base["text_config"], "model_type": "mistral"}})
    with pytest.raises(ConfigError, match="scale_factor 3"):
        ModelConfig.from_hf({**base, "scale_factor": 3})
    with pytest.raises(ConfigError, match="rope scaling"):
        ModelConfig.from_hf({**base, "text_config": {**base["text_config"], "rope_scaling": {"rope_type": "llama3"}}})
    # Idefics3Config's own defaults fill what a sparse config leaves out.
    sparse = ModelConfig.from_hf({"model_type": "idefics3", "vision_config": {"image_size": 364, "patch_size": 14}})
    assert (sparse.text.rms_norm_eps, sparse.vision.hidden_size, sparse.tokens_per_tile) == (1e-5, 1152, 169)
    assert (sparse.image_token_id, sparse.tie_word_embeddings) == (128_257, False)
    # As in transformers, only the top-level value ties the embeddings (Idefics3Config and SmolVLMConfig agree).
    text_tied = {**base, "text_config": {**base["text_config"], "tie_word_embeddings": True}}
    text_tied.pop("tie_word_embeddings", None)
    assert not ModelConfig.from_hf(text_tied).tie_word_embeddings


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.sampled_from([1, 2, 3]), st.integers(1, 8))
def test_pixel_shuffle_regroups_each_block_into_one_token(tiles: int, blocks: int, scale: int, dim: int) -> None:
    side = blocks * scale
    x = np.random.default_rng(side * dim).standard_normal((tiles, side * side, dim)).astype(np.float32)
    out = np.array(pixel_shuffle(mx.array(x), scale))
    assert out.shape == (tiles, blocks * blocks, dim * scale * scale)
    grid = x.reshape(tiles, side, side, dim)
    for t in range(tiles):
        for b in range(blocks * blocks):
            r, c = divmod(b, blocks)
            block = grid[t, r * scale : (r + 1) * scale, c * scale : (c + 1) * scale]  # (scale rows, scale cols, dim)
            np.testing.assert_array_equal(np.sort(out[t, b]), np.sort(block.reshape(-1)))


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 40), st.data())
def test_navit_positions_spread_real_patches_over_the_grid(side: int, data) -> None:
    rows, cols = data.draw(st.integers(1, side)), data.draw(st.integers(1, side))
    mask = np.zeros((2, side, side), dtype=bool)
    mask[0] = True
    mask[1, :rows, :cols] = True
    ids = navit_position_ids(mask, side)
    np.testing.assert_array_equal(ids[0], np.arange(side * side))  # a full tile: plain positions
    real = ids[1][mask[1].reshape(-1)]
    assert (np.diff(real) > 0).all() and real.min() == 0 and real.max() < side * side  # distinct, row-major
    assert real.reshape(rows, cols)[-1, -1] >= (side - side // rows - 1) * side  # the last row reaches down
    assert (ids[1][~mask[1].reshape(-1)] == 0).all()


def test_lora_groups_name_the_decoder_the_tower_and_the_connector(model) -> None:
    from vlm_models.adapters import LoRAConfig, target_paths

    language = target_paths(model, LoRAConfig(targets=("language",)))
    vision = target_paths(model, LoRAConfig(targets=("vision",)))
    projector = target_paths(model, LoRAConfig(targets=("projector",)))
    assert language and all(p.startswith("model.text_model.layers.") for p in language)
    assert vision and all(p.startswith("model.vision_model.encoder.") for p in vision)
    assert projector == ["model.connector.modality_projection.proj"]
