"""What Gemma 3 and PaliGemma 2 (SigLIP towers, Gemma decoders, bidirectional spans) share beyond the parity
tests: chunked prefill that keeps each bidirectional span whole, decode after a prefill, the vision feature
cache, SigLIP image processing against transformers, and the MLX-community layout written by our converter."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from vlm_models import load
from vlm_models.convert import save_model
from vlm_runtime.generate import prefill
from vlm_runtime.vision_cache import VisionFeatureCache

from .conftest import FIXTURES, Reference, check_chunked_prefill, check_quantized_fixture, inputs_of, logits_of

TOL = 1e-4
FAMILIES = ["gemma3", "paligemma2"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def ref(family: str) -> Reference:
    return Reference(family)


@pytest.fixture(scope="module")
def model(family: str):
    return load(FIXTURES / family / "hf4")[0]


@pytest.mark.parametrize("step", [5, 13])
def test_chunked_prefill_keeps_each_bidirectional_span_whole(model, ref: Reference, step: int) -> None:
    for case in ref.single_cases:
        check_chunked_prefill(model, ref, case, step)


def test_decode_after_prefill_equals_a_full_forward(model, ref: Reference) -> None:
    """Generated tokens attend causally (PaliGemma: token type 1) and stop seeing the window's oldest keys:
    a prefill plus one-token steps equals one forward over prompt and continuation."""
    for case in ref.single_cases:
        inputs = inputs_of(ref, case)
        new = mx.array(ref.get(case, "greedy")[:, :8])
        cache = model.make_cache()
        prompt = model.embed_prompt(**inputs)
        steps = [
            model.compute_logits(
                model.hidden_states(prompt.inputs_embeds, cache=cache, attention_groups=prompt.attention_groups)[:, -1]
            )
        ]
        for i in range(new.shape[1] - 1):
            steps.append(
                model.compute_logits(model.hidden_states(model.embed_tokens(new[:, i : i + 1]), cache=cache)[:, -1])
            )
        whole = dict(inputs, input_ids=mx.concatenate([inputs["input_ids"], new[:, :-1]], axis=1))
        whole["attention_mask"] = mx.ones_like(whole["input_ids"])
        n = inputs["input_ids"].shape[1]
        types = mx.concatenate([mx.zeros((1, n), mx.int32), mx.ones((1, new.shape[1] - 1), mx.int32)], axis=1)
        full = model(**whole, token_type_ids=types).logits[:, n - 1 :]
        diff = mx.abs(mx.stack(steps, axis=1) - full).max().item()
        assert diff <= TOL, f"{case}: {diff:.2e}"
        if case != "text":
            np.testing.assert_allclose(np.array(full[:, 0]), ref.get(case, "logits")[:, -1], atol=TOL, rtol=0)


def test_vision_feature_cache(model, ref: Reference) -> None:
    inputs = inputs_of(ref, "two_images")
    plain = np.array(model.embed_prompt(**inputs).inputs_embeds)
    cache = VisionFeatureCache()
    first = np.array(model.embed_prompt(**inputs, vision_cache=cache).inputs_embeds)
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 2)
    second = np.array(model.embed_prompt(**inputs, vision_cache=cache).inputs_embeds)
    assert (cache.hits, cache.misses) == (2, 2)
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(second, plain)


def test_image_processor_matches_transformers(family: str) -> None:
    """Every fixture image (sizes from 56x56 to 90x600, gray and RGBA too) at the checkpoint's settings."""
    from vlm_models.loading import _image_processor_config, load_config
    from vlm_models.registry import architecture_for

    root = FIXTURES / family
    expected = np.load(root / "image_processor_reference.npz")
    arch = architecture_for(load_config(root / "hf5")["model_type"])
    processor = arch.image_processor_class().from_config(_image_processor_config(root / "hf5"))
    names = sorted({k.split("/")[1] for k in expected.files if k.startswith("fixture/")})
    assert len(names) == 7
    for name in names:
        with Image.open(FIXTURES / "images" / name) as image:
            ours = processor([image])["pixel_values"]
        want = expected[f"fixture/{name}/pixel_values"]
        assert ours.shape == want.shape, name
        np.testing.assert_allclose(ours, want, atol=1e-6, rtol=0, err_msg=name)


def test_mlx_community_layout_round_trip(tmp_path: Path, family: str, model, ref: Reference) -> None:
    config = json.loads((FIXTURES / family / "hf4" / "config.json").read_text())
    out = save_model(model, tmp_path / "mlx", source=FIXTURES / family / "hf4", config=config)
    names = set(mx.load(str(out / "model.safetensors")))
    assert {n.split(".")[0] for n in names} == {"language_model", "vision_tower", "multi_modal_projector"}
    assert any(n.startswith("vision_tower.vision_model.encoder.") for n in names)
    reloaded, _ = load(out)
    for case in ("one_image", "text"):
        np.testing.assert_allclose(logits_of(reloaded, ref, case), ref.get(case, "logits"), atol=TOL, rtol=0)


def test_quantized_mlx_community_fixture(family: str, ref: Reference) -> None:
    check_quantized_fixture(family, ref)


# The sparse config.json files the Hub checkpoints carry (transformers fills the rest with its defaults).
GEMMA3_4B_IT = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}
PALIGEMMA2_3B_224 = {
    "architectures": ["PaliGemmaForConditionalGeneration"],
    "hidden_size": 2048,
    "image_token_index": 257152,
    "model_type": "paligemma",
    "projection_dim": 2304,
    "text_config": {
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "model_type": "gemma2",
        "num_attention_heads": 8,
        "num_hidden_layers": 26,
        "num_key_value_heads": 4,
        "query_pre_attn_scalar": 256,
        "vocab_size": 257216,
    },
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "projection_dim": 2304,
        "vision_use_head": False,
    },
}


def test_published_gemma3_config_fills_the_transformers_defaults() -> None:
    from vlm_models.models.gemma3 import ModelConfig

    c = ModelConfig.from_hf(GEMMA3_4B_IT)
    t = c.text
    assert (t.vocab_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (262208, 8, 4, 256)
    assert t.layer_types.count("full_attention") == 5 and t.layer_types[5] == "full_attention"
    assert (t.sliding_window, t.global_rope_theta, t.local_rope_theta) == (1024, 1e6, 1e4)
    assert t.global_rope_position_scale == 1 / 8 and t.qk_norm and t.attn_logit_softcapping is None
    assert (c.vision.image_size, c.vision.patches_per_side, c.mm_tokens_per_image) == (896, 64, 256)


def test_published_paligemma2_config_fills_the_transformers_defaults() -> None:
    from vlm_models.models.paligemma import ModelConfig

    c = ModelConfig.from_hf(PALIGEMMA2_3B_224)
    t = c.text
    assert (t.hidden_size, t.head_dim, t.sliding_window) == (2304, 256, 4096)  # not the top-level 2048
    assert t.layer_types[:2] == ("sliding_attention", "full_attention") and not t.qk_norm
    assert (t.attn_logit_softcapping, t.final_logit_softcapping, t.first_position) == (50.0, 30.0, 1)
    assert t.global_rope_theta == t.local_rope_theta == 10_000.0
    assert (c.vision.image_size, c.projection_dim, c.image_token_id) == (224, 2304, 257152)


def test_a_bounded_cache_shorter_than_the_prompt_prefills_alike_in_chunks(model, ref: Reference) -> None:
    """max_kv_size below the prompt length makes every layer's cache a rolling one: prefilled in chunks (each
    seeing only what the caches kept) or in one piece (seeing everything under the window mask), the result is
    the same."""
    from vlm_runtime import RotatingKVCache

    prompt = model.embed_prompt(**inputs_of(ref, "two_images"))
    assert prompt.inputs_embeds.shape[1] > 24

    def bounded() -> list:
        return [RotatingKVCache(min(24, getattr(c, "max_size", 24))) for c in model.make_cache()]

    whole = np.array(prefill(model, prompt, bounded(), 10_000))
    chunked = np.array(prefill(model, prompt, bounded(), 7))
    np.testing.assert_allclose(chunked, whole, atol=TOL, rtol=0)


def test_sanitize_is_idempotent_on_the_mlx_community_layout(family: str) -> None:
    quantized, _ = load(FIXTURES / family / "mlx_community_4bit")
    raw = dict(mx.load(str(FIXTURES / family / "mlx_community_4bit" / "model.safetensors")))
    once = quantized.sanitize(raw)
    twice = quantized.sanitize(once)
    assert once.keys() == twice.keys() and all(mx.array_equal(once[k], twice[k]).item() for k in once)
    assert all(k.startswith(("model.", "lm_head.")) for k in once)
