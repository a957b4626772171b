"""Gemma 3 beyond the shared parity tests: chat template, image processing (pan-and-scan included) against
transformers, bidirectional image attention, and the invariants of pan-and-scan crops and grouped masks."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_models import apply_chat_template, load
from vlm_models.processors.gemma3 import Gemma3ImageProcessor, pan_and_scan_boxes
from vlm_runtime.masks import grouped_window_mask

from .conftest import FIXTURES, Reference

ROOT = FIXTURES / "gemma3"


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference("gemma3")


@pytest.fixture(scope="module")
def loaded():
    return load(ROOT / "hf4")


def inputs_of(ref: Reference, case: str) -> dict[str, mx.array]:
    return {k: mx.array(v) for k, v in ref.inputs(case).items()}


@pytest.mark.parametrize("layout", ["hf4", "hf5", "mlx_community_4bit"])
def test_chat_template_through_the_checkpoint_tokenizer(layout: str, ref: Reference) -> None:
    _, processor = load(ROOT / layout)
    for case in ref.single_cases:
        meta = ref.meta["cases"][case]
        prompt = apply_chat_template(processor, None, meta["text"], num_images=len(meta["images"]))
        assert prompt == meta["prompt"], case


@pytest.mark.parametrize("config", ["fixture", "pan_and_scan"])
def test_image_processor_matches_transformers(config: str) -> None:
    expected = np.load(ROOT / "image_processor_reference.npz")
    settings_ = json.loads((ROOT / "image_processor_reference.json").read_text())["configs"][config]
    processor = Gemma3ImageProcessor.from_config(settings_)
    names = sorted({k.split("/")[1] for k in expected.files if k.startswith(config + "/")})
    assert len(names) == 7
    crops_seen = set()
    for name in names:
        with Image.open(FIXTURES / "images" / name) as image:
            ours = processor([image])
        want = expected[f"{config}/{name}/pixel_values"]
        assert ours["pixel_values"].shape == want.shape, name
        np.testing.assert_allclose(ours["pixel_values"], want, atol=1e-6, rtol=0, err_msg=name)
        np.testing.assert_array_equal(ours["num_crops"], expected[f"{config}/{name}/num_crops"], err_msg=name)
        crops_seen.add(int(ours["num_crops"][0]))
    if config == "pan_and_scan":
        assert len(crops_seen) > 1, "the images should exercise both cropped and uncropped paths"


def test_published_config_nulls_mean_the_defaults() -> None:
    config = json.loads((ROOT / "hf4" / "preprocessor_config.json").read_text())
    processor = Gemma3ImageProcessor.from_config(config)
    assert processor.do_pan_and_scan is False and processor.do_convert_rgb is True
    assert (processor.height, processor.width, processor.image_seq_length) == (56, 56, 16)
    with pytest.raises(ValueError, match="height and width"):
        Gemma3ImageProcessor.from_config({"size": {"shortest_edge": 224}})


def test_image_tokens_attend_both_ways(loaded, ref: Reference) -> None:
    """Without the bidirectional image groups the logits are far off: the fixture does test them."""
    model, _ = loaded
    prompt = model.embed_prompt(**inputs_of(ref, "two_images"))
    assert prompt.attention_groups is not None
    groups = np.array(prompt.attention_groups)[0]
    assert sorted(set(groups.tolist())) == [-1, 0, 1] and (groups >= 0).sum() == 2 * 16
    causal_only = np.array(model.compute_logits(model.hidden_states(prompt.inputs_embeds)))
    assert np.abs(causal_only - ref.get("two_images", "logits")).max() > 1.0


@settings(max_examples=100, deadline=None)
@given(
    height=st.integers(1, 800),
    width=st.integers(1, 800),
    min_crop=st.integers(1, 400),
    max_crops=st.integers(2, 8),
    ratio=st.floats(1.0, 3.0),
)
def test_pan_and_scan_crops_tile_the_picture(height, width, min_crop, max_crops, ratio) -> None:
    boxes = pan_and_scan_boxes(height, width, min_crop, max_crops, ratio)
    if not boxes:
        return
    assert 1 <= len(boxes) <= max_crops
    assert max(height, width) / min(height, width) >= ratio
    covered = np.zeros((height, width), dtype=np.int32)
    for top, left, bottom, right in boxes:
        assert 0 <= top < bottom <= height and 0 <= left < right <= width
        covered[top:bottom, left:right] += 1
    assert (covered == 1).all(), "crops must cover the picture exactly once"


@settings(max_examples=100, deadline=None)
@given(
    n_past=st.integers(0, 6),
    spans=st.lists(st.tuples(st.integers(1, 4), st.booleans()), min_size=1, max_size=5),
    window=st.one_of(st.none(), st.integers(1, 8)),
)
def test_grouped_window_mask_invariants(n_past: int, spans: list[tuple[int, bool]], window: int | None) -> None:
    """Contiguous spans, each a bidirectional group or plain text, as in real prompts."""
    ids: list[int] = []
    for index, (length, is_group) in enumerate(spans):
        ids += [index if is_group else -1] * length
    n = len(ids)
    mask = np.array(grouped_window_mask(n, n_past, window=window, groups=mx.array([ids])))[0, 0]
    plain = np.array(grouped_window_mask(n, n_past, window=window))
    q = np.arange(n_past, n_past + n)[:, None]
    k = np.arange(n_past + n)[None]
    in_window = np.ones_like(plain) if window is None else q - k < window
    np.testing.assert_array_equal(plain, (k <= q) & in_window)
    key_ids = np.array([-1] * n_past + ids)[None]
    same_group = (np.array(ids)[:, None] == key_ids) & (key_ids >= 0)
    np.testing.assert_array_equal(mask, (plain | same_group) & in_window)
    assert mask[:, n_past:][np.array(ids) < 0].sum() == plain[:, n_past:][np.array(ids) < 0].sum(), (
        "text queries never see later keys"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(mm_tokens_per_image=15), "mm_tokens_per_image=15 must be a square"),
        (lambda c: c["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unsupported rope"),
        (lambda c: c["text_config"].update(layer_types=["sliding_attention"]), "layer_types must name 4 layers"),
    ],
    ids=["tokens-per-image", "rope-type", "layer-types"],
)
def test_config_problems_are_named(tmp_path, change, message: str) -> None:
    import shutil

    from vlm_models import ModelLoadError

    path = shutil.copytree(ROOT / "hf4", tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        load(path)
