"""Numerical parity with transformers (float32) on the tiny fixtures, for every family and layout, plus the
model invariants every architecture must keep."""

from __future__ import annotations

import copy
import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from vlm_models import load
from vlm_runtime import GenerationConfig, SamplingParams, generate_step, make_sampler

from .conftest import FAMILY_LAYOUTS, FIXTURES, PREFIX_LM, Reference

TOL = 1e-4


@pytest.fixture(
    scope="module", params=[(f, l) for f, ls in FAMILY_LAYOUTS.items() for l in ls], ids=lambda p: f"{p[0]}-{p[1]}"
)
def loaded(request):
    family, layout = request.param
    model, processor = load(FIXTURES / family / layout)
    return family, model, processor


def as_mx(inputs: dict[str, np.ndarray]) -> dict[str, mx.array]:
    return {k: mx.array(v) for k, v in inputs.items()}


def test_logits_match_transformers(loaded, references: dict[str, Reference]) -> None:
    family, model, _ = loaded
    ref = references[family]
    for case in ref.cases:
        inputs = ref.inputs(case)
        logits = np.array(model(**as_mx(inputs)).logits)
        expected = ref.get(case, "logits")
        real = inputs["attention_mask"].astype(bool)  # padded positions carry no meaning
        diff = np.abs(logits[real] - expected[real]).max()
        assert diff <= TOL, f"{family}/{case}: max |logits - reference| = {diff:.2e}"
        assert expected[real].std() > 1.0, "reference logits are near-uniform: the fixture proves nothing"


def test_greedy_tokens_match_transformers(loaded, references: dict[str, Reference]) -> None:
    family, model, _ = loaded
    ref = references[family]
    for case in ref.cases:
        expected = ref.get(case, "greedy")
        if expected is None or ref.get(case, "input_ids").shape[0] != 1:
            continue
        expected = expected.reshape(-1).tolist()
        config = GenerationConfig(max_tokens=len(expected))
        steps = generate_step(model, as_mx(ref.inputs(case)), sampler=make_sampler(SamplingParams()), config=config)
        assert [t for t, _ in steps] == expected, f"{family}/{case}"


def test_processor_matches_transformers(loaded, references: dict[str, Reference]) -> None:
    family, _, processor = loaded
    ref = references[family]
    for case, meta in ref.meta["cases"].items():
        if ref.get(case, "input_ids").shape[0] != 1 or meta.get("videos") or meta.get("sweeps"):
            continue  # cases with videos or synthesised clips: the family's own tests
        images = [FIXTURES / "images" / name for name in meta.get("images", [])]
        case_processor = processor
        if meta.get("pan_and_scan"):  # the reference ran this case with pan-and-scan switched on
            case_processor = copy.copy(processor)
            case_processor.image_processor = dataclasses.replace(processor.image_processor, **ref.meta["pan_and_scan"])
        if meta.get("image_processor"):  # the reference ran this case with these image processor settings
            case_processor = copy.copy(processor)
            case_processor.image_processor = dataclasses.replace(processor.image_processor, **meta["image_processor"])
        audios = [FIXTURES / "audio" / name for name in meta.get("audios", [])]
        ours = case_processor(meta["prompt"], images, audios=audios)
        np.testing.assert_array_equal(ours["input_ids"], ref.get(case, "input_ids"), err_msg=f"{family}/{case}")
        if audios:
            for name in ("input_features_mask", "feature_attention_mask"):  # Gemma 4's name, Qwen2-Audio's
                if ref.get(case, name) is not None:
                    np.testing.assert_array_equal(ours[name], ref.get(case, name), err_msg=f"{family}/{case}/{name}")
            np.testing.assert_allclose(ours["input_features"], ref.get(case, "input_features"), atol=1e-4, rtol=0)
        if images:
            for name in ("image_grid_thw", "image_sizes", "num_crops", "pixel_attention_mask", "image_position_ids"):
                if ref.get(case, name) is not None:
                    np.testing.assert_array_equal(ours[name], ref.get(case, name), err_msg=f"{family}/{case}/{name}")
            np.testing.assert_allclose(ours["pixel_values"], ref.get(case, "pixel_values"), atol=1e-5, rtol=0)


def test_position_ids_match_transformers(loaded, references: dict[str, Reference]) -> None:
    family, model, _ = loaded
    ref = references[family]
    if all(ref.get(case, "position_ids") is None for case in ref.cases):
        pytest.skip(f"{family} positions simply follow the tokens")
    for case in ref.cases:
        expected = ref.get(case, "position_ids")
        if expected is None:
            continue
        prompt = model.embed_prompt(**as_mx(ref.inputs(case)))
        real = ref.get(case, "attention_mask").astype(bool)
        np.testing.assert_array_equal(np.array(prompt.position_ids)[:, real], expected[:, real], err_msg=case)


def test_cached_decode_equals_full_forward(loaded, references: dict[str, Reference]) -> None:
    """Prefill all but the last few tokens, decode the rest one by one: same logits as one full pass."""
    family, model, _ = loaded
    if family in PREFIX_LM:
        pytest.skip("prefix-LM: the prompt's last tokens see each other both ways; see test_paligemma.py")
    ref = references[family]
    for case in ref.cases:
        inputs = as_mx(ref.inputs(case))
        if inputs["input_ids"].shape[0] != 1:
            continue
        full = model(**inputs).logits
        prompt = model.embed_prompt(**inputs)
        n, tail = prompt.inputs_embeds.shape[1], 4
        cache = model.make_cache()
        prefix: dict[str, mx.array] = {}
        if prompt.position_ids is not None:
            prefix["position_ids"] = prompt.position_ids[..., : n - tail]
        if prompt.attention_groups is not None:
            prefix["attention_groups"] = prompt.attention_groups[:, : n - tail]
        hidden = model.hidden_states(prompt.inputs_embeds[:, : n - tail], cache=cache, **prefix)
        steps = [model.compute_logits(hidden[:, -1])]
        for i in range(n - tail, n - 1):
            h = model.hidden_states(model.embed_tokens(inputs["input_ids"][:, i : i + 1]), cache=cache)
            steps.append(model.compute_logits(h[:, -1]))
        decoded = mx.stack(steps, axis=1)
        diff = mx.abs(decoded - full[:, n - tail - 1 : n - 1]).max().item()
        assert diff <= TOL, f"{family}/{case}: cached decode differs by {diff:.2e}"


def test_sanitize_is_idempotent(loaded) -> None:
    family, model, _ = loaded
    for layout in FAMILY_LAYOUTS[family]:
        raw = {}
        for file in sorted((FIXTURES / family / layout).glob("*.safetensors")):
            raw.update(mx.load(str(file)))
        raw_keys = set(raw)
        once = model.sanitize(raw)
        twice = model.sanitize(once)
        assert set(raw) == raw_keys, "sanitize must not change its input"
        assert once.keys() == twice.keys()
        assert all(mx.array_equal(once[k], twice[k]).item() for k in once)
