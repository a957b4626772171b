"""CLIP / LLaVA / LLaVA-NeXT image processing: parity with stored transformers outputs, and shape invariants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_models.processors import load_image
from vlm_models.processors.clip import (
    CLIPImageProcessor,
    LlavaNextImageProcessor,
    select_best_resolution,
    unpadded_grid,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
REFERENCE = np.load(FIXTURES / "clip_image_processor_reference.npz")
META = json.loads((FIXTURES / "clip_image_processor_reference.json").read_text())
PROCESSORS = {"CLIPImageProcessorPil": CLIPImageProcessor, "LlavaImageProcessorPil": CLIPImageProcessor}


def build(config_name: str):
    meta = META[config_name]
    cfg = {**meta["config"], "patch_size": 14}  # the processor-level setting; pixels do not depend on it
    cls = LlavaNextImageProcessor if meta["class"] == "LlavaNextImageProcessorPil" else PROCESSORS[meta["class"]]
    return cls.from_config(cfg)


CASES = [(c, name) for c, m in META.items() if "class" in m for name in m["images"]]


@pytest.mark.parametrize(("config_name", "image"), CASES, ids=[f"{c}-{n}" for c, n in CASES])
def test_matches_transformers(config_name: str, image: str) -> None:
    out = build(config_name)([load_image(FIXTURES / "images" / image)])
    expected = REFERENCE[f"{config_name}/{image}/pixel_values"]
    assert out["pixel_values"].dtype == np.float32
    assert out["pixel_values"].shape == expected.shape
    assert np.abs(out["pixel_values"] - expected).max() <= 1e-5
    if f"{config_name}/{image}/image_sizes" in REFERENCE:
        np.testing.assert_array_equal(out["image_sizes"], REFERENCE[f"{config_name}/{image}/image_sizes"])


def test_anyres_batch_pads_the_tile_axis_like_transformers() -> None:
    meta = META["next_batch"]
    out = build(meta["config"])([load_image(FIXTURES / "images" / n) for n in meta["images"]])
    expected = REFERENCE["next_batch/pixel_values"]
    assert out["pixel_values"].shape == expected.shape
    assert np.abs(out["pixel_values"] - expected).max() <= 1e-5
    np.testing.assert_array_equal(out["image_sizes"], REFERENCE["next_batch/image_sizes"])


def test_missing_patch_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        CLIPImageProcessor.from_config({"size": {"shortest_edge": 42}})


def test_bad_strategy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        CLIPImageProcessor.from_config({"patch_size": 14, "vision_feature_select_strategy": "cls"})


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300))
def test_any_image_becomes_one_crop_sized_tensor(height: int, width: int) -> None:
    processor = CLIPImageProcessor(size=24, crop_size=(20, 22), patch_size=14)
    out = processor([Image.new("RGB", (width, height), (10, 200, 30))])
    assert out["pixel_values"].shape == (1, 3, 20, 22)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400))
def test_anyres_picks_a_pinpoint_and_tiles_it(height: int, width: int) -> None:
    pinpoints = ((42, 84), (84, 42), (84, 84), (126, 42), (42, 126))
    best = select_best_resolution(height, width, pinpoints)
    assert best in pinpoints
    rows, cols = unpadded_grid(height, width, best[0] // 14, best[1] // 14)
    # The unpadded grid is the image's part of the letterboxed one: never larger, tight on one axis (a sliver
    # of an image can keep no column at all, as in transformers).
    assert 0 <= rows <= best[0] // 14 and 0 <= cols <= best[1] // 14
    assert rows == best[0] // 14 or cols == best[1] // 14
    processor = LlavaNextImageProcessor(size=42, crop_size=(42, 42), image_grid_pinpoints=pinpoints, patch_size=14)
    out = processor([Image.new("RGB", (width, height))])
    assert out["pixel_values"].shape == (1, 1 + best[0] * best[1] // 42**2, 3, 42, 42)
    assert out["image_sizes"].tolist() == [[height, width]]
