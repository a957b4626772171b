"""The unified Gemma 4 beyond the shared parity tests: its image processor against transformers' on every fixture
image, torch's uint8 resize on held-out pictures, the patch merge against transformers' algorithm written out independently, the raw-waveform frames, images
attending both ways in every layer (also past the sliding window), the config's fixed parts, and the names
transformers gives the weights in memory."""

from __future__ import annotations

import dataclasses
import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_models import load
from vlm_models.config import ConfigError
from vlm_models.models.gemma4_unified import ModelConfig
from vlm_models.processors.gemma4 import Gemma4ImageProcessor
from vlm_models.processors.gemma4_unified import Gemma4UnifiedAudioFeatureExtractor, Gemma4UnifiedImageProcessor
from vlm_models.processors.image import torch_bicubic_resize
from vlm_runtime import generate

from .conftest import AUDIO, FIXTURES, Reference, check_chunked_prefill, inputs_of

ROOT = FIXTURES / "gemma4_unified"


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference("gemma4_unified")


@pytest.fixture(scope="module")
def loaded():
    return load(ROOT / "hf5")


# -------------------------------------------------------------------------------------------------- processors


@pytest.mark.parametrize("tokens", [70, 140])
def test_image_processor_matches_transformers(tokens: int) -> None:
    expected = np.load(ROOT / "image_processor_reference.npz")
    processor = Gemma4UnifiedImageProcessor(patch_size=4, pooling_kernel_size=3, max_soft_tokens=tokens)
    names = sorted({k.split("/")[1] for k in expected.files if k.startswith(f"{tokens}/")})
    assert len(names) == 7
    for name in names:
        with Image.open(FIXTURES / "images" / name) as image:
            ours = processor([image])
        np.testing.assert_array_equal(ours["image_position_ids"], expected[f"{tokens}/{name}/image_position_ids"])
        # transformers' float32 pixels are exactly these levels times float32(1 / 255) (make_fixtures checks it).
        real = expected[f"{tokens}/{name}/pixel_levels"].astype(np.float32) * np.float32(1 / 255)
        assert ours["pixel_values"].shape[1:] == (tokens, 12 * 12 * 3)
        np.testing.assert_array_equal(ours["pixel_values"][:, : real.shape[1]], real, err_msg=name)
        assert not ours["pixel_values"][:, real.shape[1] :].any()
        assert processor.image_token_counts(ours) == [real.shape[1]]


def test_resize_is_torchs_on_held_out_pictures() -> None:
    """Noise pictures of other sizes than the fixture images, shrunk and stretched by other ratios, one axis
    alone too: the same 8-bit pixels as torchvision's uint8 bicubic resize."""
    expected = np.load(ROOT / "resize_reference.npz")
    cases = sorted({k.split("/")[0] for k in expected.files})
    assert len(cases) == 5
    for case in cases:
        source, resized = expected[f"{case}/source"], expected[f"{case}/resized"]
        ours = torch_bicubic_resize(source, resized.shape[:2])
        assert ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, resized, err_msg=f"{source.shape} -> {resized.shape}")


def merge_as_transformers(patches: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' ``patches_merge`` (gemma4_unified) restated in numpy: order the small patches so that each
    k x k block is contiguous, then lay every block out as one patch of (k * p) rows, (k * p) columns, channels."""
    p = math.isqrt(patches.shape[-1] // 3)
    width = positions[:, 0].max() + 1
    block = positions // k
    inside = positions % k
    order = np.argsort(inside[:, 0] + inside[:, 1] * k + k * k * block[:, 0] + k * width * block[:, 1], kind="stable")
    grouped = patches[order].reshape(-1, k, k, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
    merged_positions = (positions[order] // k).reshape(-1, k * k, 2).min(axis=1)
    return grouped.reshape(len(grouped), -1), merged_positions


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 5),
    k=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_cutting_at_the_merged_size_is_transformers_merge(rows: int, cols: int, k: int, seed: int) -> None:
    """What the processor relies on: merging k x k small patches equals cutting big ones straight away."""
    p = 2
    picture = np.random.default_rng(seed).integers(0, 256, (rows * k * p, cols * k * p, 3)).astype(np.uint8)
    small = Gemma4ImageProcessor(patch_size=p, pooling_kernel_size=k, do_resize=False, do_rescale=False)
    big = Gemma4UnifiedImageProcessor(patch_size=p, pooling_kernel_size=k, do_resize=False, do_rescale=False)
    image = Image.fromarray(picture)
    patches, positions = small.patches(image)
    merged, merged_positions = merge_as_transformers(patches, positions, k)
    cut, cut_positions = big.patches(image)
    np.testing.assert_array_equal(cut, merged)
    np.testing.assert_array_equal(cut_positions, merged_positions)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 3000), min_size=1, max_size=4), per_token=st.sampled_from([160, 640]))
def test_waveform_frames(lengths: list[int], per_token: int) -> None:
    """Each clip is cut into ceil(samples / per_token) frames, the last zero-filled; clips are padded with whole
    frames to the longest, which the mask marks."""
    rng = np.random.default_rng(sum(lengths))
    clips = [rng.uniform(-1, 1, n).astype(np.float32) for n in lengths]
    out = Gemma4UnifiedAudioFeatureExtractor(audio_samples_per_token=per_token)(clips)
    counts = [math.ceil(n / per_token) for n in lengths]
    assert out["input_features"].shape == (len(clips), max(counts), per_token)
    assert out["input_features"].dtype == np.float32
    for clip, count, features, mask in zip(clips, counts, out["input_features"], out["input_features_mask"]):
        assert mask.tolist() == [True] * count + [False] * (max(counts) - count)
        flat = features.reshape(-1)
        np.testing.assert_array_equal(flat[: len(clip)], clip)
        assert not flat[len(clip) :].any()


def test_audio_slots_get_one_token_per_frame(loaded, ref: Reference) -> None:
    _, processor = loaded
    out = processor(ref.meta["cases"]["audio"]["prompt"], [], audios=[AUDIO / "tone_chirp.wav"])
    assert out["input_features"].shape == (1, 25, 640)  # one second at 16 kHz, 640 samples a frame
    assert int((out["input_ids"] == ref.meta["special_token_ids"]["<|audio|>"]).sum()) == 25
    np.testing.assert_array_equal(out["input_features"], ref.get("audio", "input_features"))


def test_feature_extractor_settings_from_the_checkpoint(loaded) -> None:
    _, processor = loaded
    assert processor.audio_processor == Gemma4UnifiedAudioFeatureExtractor(audio_samples_per_token=640)
    assert processor.image_processor.cut_size == 12 and processor.image_processor.max_soft_tokens == 70


# ------------------------------------------------------------------------------------------------------ model


def test_images_attend_both_ways_in_every_layer(loaded, ref: Reference) -> None:
    """The reference's image cases need it: with plain causal attention, or both ways only within the sliding
    window of sliding layers (Gemma 4's other checkpoints), the logits leave transformers'."""
    model, _ = loaded
    prompt = model.embed_prompt(**inputs_of(ref, "two_images"))
    assert sorted(set(np.array(prompt.attention_groups)[0].tolist())) == [-1, 0, 1]
    expected = ref.get("two_images", "logits")
    # Each image has more soft tokens than the sliding window: the window must not bound them.
    assert min(np.bincount(np.array(prompt.attention_groups)[0] + 1)[1:]) > model.config.text.sliding_window
    decoder = model.model.language_model
    for variant in ({"bidirectional_vision": False}, {"vision_groups_every_layer": False}):
        original = decoder.config
        decoder.config = dataclasses.replace(original, **variant)
        try:
            hidden = model.hidden_states(prompt.inputs_embeds, attention_groups=prompt.attention_groups)
            assert np.abs(np.array(model.compute_logits(hidden)) - expected).max() > 1e-2, variant
        finally:
            decoder.config = original


def test_config_has_no_per_layer_embeddings_or_experts(loaded) -> None:
    model, _ = loaded
    text = model.config.text
    assert text.hidden_size_per_layer_input == 0 and not text.enable_moe_block
    assert "embed_tokens_per_layer" not in model.model.language_model
    assert text.bidirectional_vision and text.vision_groups_every_layer


def test_unsupported_settings_are_named() -> None:
    config = {"model_type": "gemma4_unified", "text_config": {"use_bidirectional_attention": "all"}}
    with pytest.raises(ConfigError, match="use_bidirectional_attention='all'"):
        ModelConfig.from_hf(config)
    with pytest.raises(ConfigError, match="needs a text_config"):
        ModelConfig.from_hf({"model_type": "gemma4_unified"})


def test_in_memory_weight_names_load_too(loaded) -> None:
    """transformers names the vision weights differently in memory than in the files it writes."""
    model, _ = loaded
    raw = mx.load(str(ROOT / "hf5" / "model.safetensors"))
    renamed = {}
    for key, value in raw.items():
        key = key.replace("model.vision_embedder.", "model.embed_vision.")
        key = key.replace(
            "embed_vision.embedding_projection.", "embed_vision.multimodal_embedder.embedding_projection."
        )
        renamed[key] = value
    assert renamed.keys() != raw.keys()
    ours, theirs = model.sanitize(raw), model.sanitize(renamed)
    assert ours.keys() == theirs.keys()
    assert all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)


def test_media_features_and_slots_must_agree(loaded, ref: Reference) -> None:
    model, _ = loaded
    inputs = inputs_of(ref, "audio")
    inputs["input_ids"] = inputs["input_ids"][:, :-30]
    with pytest.raises(ValueError, match="audio tokens but the audios give"):
        model(**inputs)


@pytest.mark.parametrize("case,step", [("long", 7), ("two_images", 16), ("image_and_audio", 64)])
def test_chunked_prefill_matches_transformers(loaded, ref: Reference, case: str, step: int) -> None:
    """Chunks smaller than the sliding window and than an image: an image's tokens still see each other."""
    model, _ = loaded
    check_chunked_prefill(model, ref, case, step)


def test_generate_sees_and_hears_files(loaded, ref: Reference) -> None:
    """From files through our processor to tokens: transformers' greedy answer to its image + two clips."""
    model, processor = loaded
    meta = ref.meta["cases"]["image_and_audio"]
    images = [FIXTURES / "images" / n for n in meta["images"]]
    audios = [AUDIO / n for n in meta["audios"]]
    expected = ref.get("image_and_audio", "greedy")[0, :8].tolist()
    assert not processor.eos_token_ids.intersection(expected)
    result = generate(model, processor, meta["prompt"], image=images, audios=audios, max_tokens=8)
    assert (result.generation_tokens, result.text) == (8, processor.decode(expected))
