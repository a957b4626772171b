"""Gemma 3n beyond the shared parity tests: the image processor and the audio feature extractor against
transformers, the published vision architecture, KV sharing and sliding windows across chunked prefill, the
multimodal vocabularies, audio through generate, weight layouts and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

from vlm_models import ModelLoadError, apply_chat_template, load
from vlm_models.nn.mobilenetv5 import ARCH_300M, MobileNetV5, MobileNetV5Config, parse_arch
from vlm_models.processors.gemma3n import Gemma3nAudioFeatureExtractor, Gemma3nImageProcessor
from vlm_runtime import generate

from .conftest import FIXTURES, Reference, check_chunked_prefill, inputs_of

ROOT = FIXTURES / "gemma3n"
AUDIO = FIXTURES / "audio"


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference("gemma3n")


@pytest.fixture(scope="module")
def loaded():
    return load(ROOT / "hf5")


# -------------------------------------------------------------------------------------------------- processors


@pytest.mark.parametrize("size", [64, 768])
def test_image_processor_matches_transformers(size: int) -> None:
    """Every fixture image at the fixture's size and the published 768 x 768 (a 64 x 64 centre crop kept)."""
    expected = np.load(ROOT / "image_processor_reference.npz")
    processor = Gemma3nImageProcessor(height=size, width=size)
    names = sorted({k.split("/")[1] for k in expected.files if k.startswith(f"{size}/")})
    assert len(names) == 7
    for name in names:
        with Image.open(FIXTURES / "images" / name) as image:
            pixels = processor([image])["pixel_values"]
        if size == 768:
            pixels = pixels[..., 352:416, 352:416]
        np.testing.assert_allclose(pixels, expected[f"{size}/{name}/pixel_values"], atol=1e-6, rtol=0, err_msg=name)


def test_feature_extractor_matches_transformers() -> None:
    """Several lengths one by one (under one window, odd sizes, seconds) and a padded batch of three: features
    within 1e-4, masks equal."""
    expected = np.load(ROOT / "audio_features_reference.npz")
    extractor = Gemma3nAudioFeatureExtractor()
    names = sorted({k.split("/")[0] for k in expected.files} - {"batch"})
    assert len(names) == 5
    for name in names:
        ours = extractor([expected[f"{name}/waveform"]])
        np.testing.assert_array_equal(ours["input_features_mask"], expected[f"{name}/input_features_mask"], name)
        np.testing.assert_allclose(ours["input_features"], expected[f"{name}/input_features"], atol=1e-4, rtol=0)
    ours = extractor([expected[f"len_{n}/waveform"] for n in (16_127, 1600, 20_011)])
    mask = expected["batch/input_features_mask"]
    assert not mask.all(), "the batch is padded"
    np.testing.assert_array_equal(ours["input_features_mask"], mask)
    np.testing.assert_allclose(ours["input_features"], expected["batch/input_features"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["hub", "hf5"])
def test_processor_settings_from_the_checkpoint(layout: str) -> None:
    """transformers saves the window and hop in samples and the token counts at the processor's top level (both
    layouts: nested in processor_config.json, or one preprocessor_config.json for both processors)."""
    _, processor = load(ROOT / layout)
    extractor, images = processor.audio_processor, processor.image_processor
    assert (extractor.frame_length, extractor.hop_length, extractor.fft_length) == (512, 160, 1024)
    assert extractor.audio_seq_length == 24
    assert (images.height, images.width, images.image_seq_length, images.do_normalize) == (64, 64, 4, False)
    with pytest.raises(ValueError, match="fft_length"):
        Gemma3nAudioFeatureExtractor.from_config({"fft_length": 512})


# ------------------------------------------------------------------------------------------------ vision tower


def test_the_published_vision_architecture_is_timms() -> None:
    """mobilenetv5_300m_enc as written here: its stages' block counts, and the tensor count and size of timm 1.0.31's
    state dict for it (548 tensors, 294,126,912 values; checked name by name when this was written)."""
    blocks = parse_arch(ARCH_300M)
    assert [len(stage) for stage in blocks] == [3, 5, 37, 39]
    assert sum(b["block_type"] == "mqa" for stage in blocks for b in stage) == 14 + 19
    config = MobileNetV5Config.from_hf({"architecture": "mobilenetv5_300m_enc"})
    shapes = [v.shape for _, v in tree_flatten(MobileNetV5(config).parameters())]
    assert (len(shapes), sum(int(np.prod(s)) for s in shapes)) == (548, 294_126_912)
    assert config.soft_tokens == 256


def test_vision_tower_size_must_pool_evenly(loaded) -> None:
    model, _ = loaded
    with pytest.raises(ValueError, match="does not pool evenly"):
        model.image_features(mx.zeros((1, 3, 48, 48)))


# ------------------------------------------------------------------------------------------------------ model


def test_kv_shared_layers_have_no_keys_and_no_cache(loaded) -> None:
    model, _ = loaded
    layers = model.model.language_model.layers
    assert [("k_proj" in layer.self_attn) for layer in layers] == [True] * 4 + [False] * 2
    assert len(model.make_cache()) == 4
    assert [layer.mlp.z is not None for layer in layers] == [True, True] + [False] * 4  # gaussian top-k


@pytest.mark.parametrize("step", [7, 30])
def test_chunked_prefill_across_the_sliding_window(loaded, ref: Reference, step: int) -> None:
    """Chunks shorter and longer than the 16-token window, over prompts of 107 and 94 tokens (image and audio
    tokens included): the last logits and the greedy tokens are the reference's."""
    model, _ = loaded
    for case in ("long", "image_and_audio"):
        check_chunked_prefill(model, ref, case, step)


def test_multimodal_vocabulary_ids_embed_through_their_towers(loaded, ref: Reference) -> None:
    """The end-of-image / end-of-audio ids sit in the vision / audio vocabularies: they embed through
    ``embed_vision`` / ``embed_audio`` (not the token table), and text ids are untouched."""
    model, _ = loaded
    ids = ref.meta["special_token_ids"]
    tokens = mx.array([[ids["<bos>"], ids["<end_of_image>"], ids["<end_of_audio>"]]])
    embeds = model._token_embeddings(tokens)
    m = model.model
    np.testing.assert_allclose(np.array(embeds[0, 0]), np.array(m.language_model.embed(tokens[:, :1])[0, 0]))
    np.testing.assert_allclose(np.array(embeds[0, 1]), np.array(m.embed_vision.hard(tokens[:, 1:2])[0, 0]))
    np.testing.assert_allclose(np.array(embeds[0, 2]), np.array(m.embed_audio.hard(tokens[:, 2:3])[0, 0]))


def test_media_features_and_slots_must_agree(loaded, ref: Reference) -> None:
    model, _ = loaded
    inputs = inputs_of(ref, "audio")
    inputs["input_ids"] = inputs["input_ids"][:, :-30]
    with pytest.raises(ValueError, match="audio tokens but the audios give"):
        model(**inputs)


def test_a_clip_longer_than_its_slot_is_refused(loaded, ref: Reference) -> None:
    model, _ = loaded
    features = mx.zeros((1, 400, 128))  # 400 frames: 25 tokens, past the fixture's 24 per clip
    with pytest.raises(ValueError, match="cut the audio shorter"):
        model.audio_features(features, mx.ones((1, 400), dtype=mx.bool_))


def test_sanitize_takes_the_mlx_community_spelling(loaded) -> None:
    model, _ = loaded
    weights = mx.load(str(ROOT / "hf5" / "model.safetensors"))
    ours = model.sanitize(weights)
    peer = model.sanitize(model.mlx_community_names(ours))
    assert set(peer) == set(ours)
    assert all(mx.array_equal(peer[k], ours[k]) for k in ours)
    assert "language_model.model.embed_tokens.weight" in model.mlx_community_names(ours)


# ---------------------------------------------------------------------------------------- template, generation


def test_chat_template_writes_the_reference_prompt(loaded, ref: Reference) -> None:
    _, processor = loaded
    meta = ref.meta["cases"]["image_and_audio"]
    assert apply_chat_template(processor, None, meta["text"], num_images=1, num_audios=2) == meta["prompt"]


def test_generate_sees_and_hears_files(loaded, ref: Reference) -> None:
    model, processor = loaded
    meta = ref.meta["cases"]["image_and_audio"]
    images = [FIXTURES / "images" / n for n in meta["images"]]
    audios = [AUDIO / n for n in meta["audios"]]
    expected = ref.get("image_and_audio", "greedy")[0, :6].tolist()
    result = generate(model, processor, meta["prompt"], image=images, audio=audios, max_tokens=6)
    assert (result.generation_tokens, result.text) == (6, processor.decode(expected))


def test_a_config_problem_is_named(tmp_path: Path) -> None:
    path = Path(shutil.copytree(ROOT / "hf5", tmp_path / "model"))
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["model_args"]["msfa_output_resolution"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="vision_soft_tokens_per_image"):
        load(path)


def test_vision_tower_matches_timm_on_held_out_sizes() -> None:
    """timm's tower alone, held out from the model cases: another block list (written in arch strings, decoded by
    us: timm decoded its own), an odd 90 x 70 input (uneven "same" padding, a 3x3 -> 6x5 nearest upsampling in the
    fusion, a 6x5 -> 1x1 pool); fused output within 1e-4."""
    expected = np.load(ROOT / "vision_reference.npz")
    spec = json.loads((ROOT / "vision_reference.json").read_text())
    config = MobileNetV5Config.from_hf(
        {
            "model_args": {
                "block_args": parse_arch(spec["arch"]),
                **{k: spec[k] for k in ("stem_size", "msfa_output_resolution")},
            }
        }
    )
    tower = MobileNetV5(config)
    weights = {k.split("/", 1)[1]: mx.array(_to_mlx(v)) for k, v in expected.items() if k.startswith("weights/")}
    tower.load_weights(list(weights.items()), strict=True)
    out = tower(mx.array(expected["pixels"].transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.array(out).transpose(0, 3, 1, 2), expected["output"], atol=1e-4, rtol=0)


def _to_mlx(weight: np.ndarray) -> np.ndarray:
    """A PyTorch conv weight as our module stores it: 1x1 ones as linear weights, others channels last."""
    if weight.ndim != 4:
        return weight
    return weight.reshape(weight.shape[0], -1) if weight.shape[2:] == (1, 1) else weight.transpose(0, 2, 3, 1)


def test_batch_with_clips_equals_single_generate(loaded) -> None:
    """Prompts with one and with two clips of other lengths, batched: each answer is its own generate's (a
    prompt's clips are padded among themselves, never to another prompt's)."""
    from vlm_runtime import batch_generate

    model, processor = loaded
    one = apply_chat_template(processor, None, "What is it?", num_audios=1)
    two = apply_chat_template(processor, None, "Describe all of it, please.", num_audios=2)
    clips = [[AUDIO / "two_tones.wav"], [AUDIO / "tone_chirp.wav", AUDIO / "noise_burst.flac"]]
    single = [generate(model, processor, p, audio=c, max_tokens=8) for p, c in zip((one, two), clips)]
    batch = batch_generate(model, processor, [one, two], audios=clips, max_tokens=8)
    assert [(r.text, r.prompt_tokens, r.generation_tokens) for r in batch] == [
        (r.text, r.prompt_tokens, r.generation_tokens) for r in single
    ]
    assert single[0].text != single[1].text
