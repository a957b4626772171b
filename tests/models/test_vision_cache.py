"""embed_prompt with a VisionFeatureCache: the same embeddings as without one, the vision tower skipped on a
hit, and keys that follow image content (not paths), preprocessing and the model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from vlm_models import apply_chat_template, load
from vlm_runtime.vision_cache import VisionFeatureCache

from .conftest import FAMILIES, FIXTURES, media_options, media_prompt, published

IMAGES = FIXTURES / "images"
FIRST, SECOND = IMAGES / "rgb_112x168.png", IMAGES / "rgb_333x250.png"


# These tests count calls of the Qwen vision towers (which take grids); Gemma 3's cache use is in test_gemma3.py.
TOWER_FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module", params=TOWER_FAMILIES)
def loaded(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    return load(FIXTURES / request.param / "hf4")


class TowerCalls:
    """Records every call of one model's vision tower (the grid rows it was given), by swapping that one
    instance's class for a subclass whose ``__call__`` logs and defers to the real one: no private internals
    are touched, and other instances and the class itself stay as they were."""

    def __init__(self, model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.grids: list[np.ndarray] = []
        tower = model.model.visual
        calls = self.grids

        class CountingTower(type(tower)):  # type: ignore[misc]
            def __call__(self, pixel_values: mx.array, grid_thw: np.ndarray) -> mx.array:
                calls.append(np.array(grid_thw))
                return super().__call__(pixel_values, grid_thw)

        monkeypatch.setattr(tower, "__class__", CountingTower)

    def __len__(self) -> int:
        return len(self.grids)


@pytest.fixture
def tower_calls(loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[TowerCalls]:
    yield TowerCalls(loaded[0], monkeypatch)


def prepare(processor: Any, images: list[Path], text: str = "Describe.") -> dict[str, mx.array]:
    """(A family that only hears gets a clip per image: the cache keeps clips' features too.)"""
    prompt = media_prompt(processor, text, len(images))
    media = media_options(processor, images)
    return processor.prepare_inputs(prompt, media.get("image") or [], audios=media.get("audio") or [])


def embeddings(model: Any, inputs: dict[str, mx.array], cache: VisionFeatureCache | None = None) -> np.ndarray:
    prompt = model.embed_prompt(**inputs) if cache is None else model.embed_prompt(**inputs, vision_cache=cache)
    return np.array(prompt.inputs_embeds)


def test_hit_gives_the_same_embeddings_and_skips_the_tower(loaded, tower_calls: TowerCalls) -> None:
    model, processor = loaded
    inputs = prepare(processor, [FIRST])
    expected = embeddings(model, inputs)
    assert len(tower_calls) == 1
    cache = VisionFeatureCache()

    first = embeddings(model, inputs, cache)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    assert len(tower_calls) == 2
    np.testing.assert_array_equal(first, expected)

    # A second turn: the same image in a different prompt.
    second_inputs = prepare(processor, [FIRST], "And what colour is it?")
    second = embeddings(model, second_inputs, cache)
    assert (cache.hits, cache.misses) == (1, 1)
    assert len(tower_calls) == 2, "a hit must not run the vision tower"
    np.testing.assert_array_equal(second, embeddings(model, second_inputs))

    # The rest of the prompt embedding is unchanged too.
    cached_prompt = model.embed_prompt(**inputs, vision_cache=cache)
    plain_prompt = model.embed_prompt(**inputs)
    np.testing.assert_array_equal(np.array(cached_prompt.position_ids), np.array(plain_prompt.position_ids))
    assert cached_prompt.attention_mask is None and plain_prompt.attention_mask is None


def test_one_cached_and_one_new_image(loaded, tower_calls: TowerCalls) -> None:
    model, processor = loaded
    cache = VisionFeatureCache()
    embeddings(model, prepare(processor, [SECOND]), cache)  # caches SECOND
    inputs = prepare(processor, [FIRST, SECOND])
    grids = np.array(inputs["image_grid_thw"])
    expected = embeddings(model, inputs)
    calls_before = len(tower_calls)

    mixed = embeddings(model, inputs, cache)
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2)
    # The tower ran once, over the new image only, with that image's own grid row.
    assert len(tower_calls) == calls_before + 1
    np.testing.assert_array_equal(tower_calls.grids[-1], grids[:1])
    # Not bit-exact in general: the no-cache call attends over both images under a block-diagonal mask, the
    # cached SECOND was computed alone (no mask); a different kernel may round differently.
    np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-6)

    # Now both are cached: no tower call at all, and the order of the images is kept.
    swapped = prepare(processor, [SECOND, FIRST])
    calls_before = len(tower_calls)
    np.testing.assert_allclose(embeddings(model, swapped, cache), embeddings(model, swapped), rtol=1e-5, atol=1e-6)
    assert len(tower_calls) == calls_before + 1  # only the no-cache reference ran the tower
    assert cache.hits == 3


def test_an_image_repeated_in_one_prompt_runs_once(loaded, tower_calls: TowerCalls) -> None:
    model, processor = loaded
    inputs = prepare(processor, [FIRST, FIRST])
    expected = embeddings(model, inputs)
    cache = VisionFeatureCache()
    calls_before = len(tower_calls)
    repeated = embeddings(model, inputs, cache)
    assert (cache.misses, len(cache)) == (1, 1)
    assert len(tower_calls) == calls_before + 1 and len(tower_calls.grids[-1]) == 1
    np.testing.assert_allclose(repeated, expected, rtol=1e-5, atol=1e-6)


def test_a_changed_file_at_the_same_path_misses(loaded, tmp_path: Path) -> None:
    model, processor = loaded
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    # Same size both times, so the grid is the same too: only the content can tell the two apart.
    old, new = (rng.integers(0, 256, (84, 112, 3), dtype=np.uint8) for _ in range(2))
    cache = VisionFeatureCache()

    Image.fromarray(old).save(path)
    old_output = embeddings(model, prepare(processor, [path]), cache)
    Image.fromarray(new).save(path)
    new_inputs = prepare(processor, [path])
    new_output = embeddings(model, new_inputs, cache)

    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 2)
    np.testing.assert_array_equal(new_output, embeddings(model, new_inputs))
    assert not np.array_equal(new_output, old_output)


def test_a_resized_image_misses(loaded) -> None:
    """Different preprocessing of the same file (here: a different size) is a different entry."""
    model, processor = loaded
    cache = VisionFeatureCache()
    embeddings(model, prepare(processor, [FIRST]), cache)
    resized = Image.open(FIRST).resize((168, 112))
    inputs = processor.prepare_inputs(apply_chat_template(processor, None, "Describe.", num_images=1), [resized])
    np.testing.assert_array_equal(embeddings(model, inputs, cache), embeddings(model, inputs))
    assert (cache.hits, cache.misses) == (0, 2)


def test_models_sharing_a_cache_do_not_collide() -> None:
    """Two checkpoints of one architecture and config: same vision config and dtype, different weights."""
    model, processor = load(FIXTURES / "qwen2_vl" / "hf4")
    other, _ = load(FIXTURES / "qwen2_vl" / "hf4")
    proj = other.model.visual.patch_embed.proj
    proj.weight = proj.weight * 1.5
    inputs = prepare(processor, [FIRST])
    cache = VisionFeatureCache()
    embeddings(model, inputs, cache)
    from_other = embeddings(other, inputs, cache)
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 2)
    np.testing.assert_array_equal(from_other, embeddings(other, inputs))
    # Both models keep finding their own entries.
    embeddings(model, inputs, cache)
    embeddings(other, inputs, cache)
    assert cache.hits == 2


def test_weights_swapped_after_a_lookup_miss_the_cache() -> None:
    """The identity digest is remembered between calls; new weights must still give a new key."""
    model, processor = load(FIXTURES / "qwen2_vl" / "hf4")
    inputs = prepare(processor, [FIRST])
    cache = VisionFeatureCache()
    embeddings(model, inputs, cache)
    embeddings(model, inputs, cache)
    assert (cache.hits, cache.misses) == (1, 1)
    proj = model.model.visual.patch_embed.proj
    proj.weight = proj.weight * 1.5
    swapped = embeddings(model, inputs, cache)
    assert (cache.hits, cache.misses) == (1, 2)
    np.testing.assert_array_equal(swapped, embeddings(model, inputs))


def test_the_families_sharing_a_cache_do_not_collide() -> None:
    cache = VisionFeatureCache(4 * len(FAMILIES))  # room for every family's entries: nothing evicted
    for family in FAMILIES:
        model, processor = load(published(family))
        inputs = prepare(processor, [FIRST])
        np.testing.assert_array_equal(embeddings(model, inputs, cache), embeddings(model, inputs))
    # One entry per image, or per tile where a family caches its tiles (Idefics3, SmolVLM): never a hit.
    assert cache.hits == 0 and cache.misses == len(cache) >= len(FAMILIES)


def test_text_only_prompt_leaves_the_cache_alone(loaded) -> None:
    model, processor = loaded
    cache = VisionFeatureCache()
    inputs = prepare(processor, [])
    np.testing.assert_array_equal(embeddings(model, inputs, cache), embeddings(model, inputs))
    assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)
