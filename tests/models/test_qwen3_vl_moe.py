"""Qwen3-VL-MoE beyond the shared parity suites: the router picks the experts transformers' picks (and the fixture's
routing is not degenerate), the sparse layers are those transformers builds, every checkpoint layout of the experts
(fused in either orientation, one MLP per expert, MLX-community, quantized) loads, and the stacked-expert MLP's
invariants (sorted and unsorted dispatch agree, layouts map to one form, idempotently)."""

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

from vlm_models import load
from vlm_models.convert import ConvertOptions, convert
from vlm_models.loading import ModelLoadError
from vlm_models.models.qwen3_vl_moe import Model
from vlm_models.nn import moe
from vlm_models.nn.moe import MoEConfig, QuantizedSwitchLinear, SparseMoE, SwitchGLU, expert_weights
from vlm_models.quantize import QuantizeOptions, dequantize_model

from .conftest import (
    FIXTURES,
    Reference,
    check_chunked_prefill,
    check_quantized_fixture,
    checkpoint_with_config,
    inputs_of,
    logits_of,
)

FAMILY = "qwen3_vl_moe"
ROOT = FIXTURES / FAMILY
TOL = 1e-4


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference(FAMILY)


@pytest.fixture(scope="module")
def model():
    return load(ROOT / "hf4")[0]


def sparse_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.language_model.layers) if isinstance(layer.mlp, SparseMoE)]


def routed_experts(model, inputs: dict) -> dict[int, np.ndarray]:
    """The experts each sparse layer's router picks for every prompt token (sorted per token)."""
    chosen: dict[int, np.ndarray] = {}
    layers = model.model.language_model.layers
    originals = {i: layers[i].mlp.route for i in sparse_layers(model)}

    def recorder(i: int):
        def route(x: mx.array):
            experts, weights = originals[i](x)
            chosen[i] = np.sort(np.array(experts).reshape(-1, experts.shape[-1]), axis=-1)
            return experts, weights

        return route

    try:
        for i in originals:
            layers[i].mlp.route = recorder(i)
        model(**inputs)
    finally:
        for i, route in originals.items():
            layers[i].mlp.route = route
    return chosen


def test_router_picks_the_experts_transformers_picks(model, ref: Reference) -> None:
    """Per case and sparse layer, the same experts for every token; and tokens do pick different experts (every
    expert serves some token, and several distinct pairs occur), so the parity tests exercise real routing."""
    assert sparse_layers(model) == [0, 2]
    for case in ref.cases:
        ours = routed_experts(model, inputs_of(ref, case))
        for layer, chosen in ours.items():
            expected = ref.get(case, f"experts/{layer}")
            np.testing.assert_array_equal(chosen, expected, err_msg=f"{case}, layer {layer}")
            assert set(chosen.reshape(-1).tolist()) == set(range(4)), (case, layer)
            assert len({tuple(row) for row in chosen.tolist()}) >= 3, (case, layer)


def test_the_experts_matter(model, ref: Reference) -> None:
    """Routing every token to the same two experts moves the logits far past the tolerance."""
    layer = model.model.language_model.layers[0].mlp
    original = layer.route

    def fixed(x: mx.array):
        chosen, weights = original(x)
        return mx.zeros_like(chosen) + mx.array([0, 1]), weights

    try:
        layer.route = fixed
        diff = np.abs(logits_of(model, ref, "text") - ref.get("text", "logits")).max()
    finally:
        layer.route = original
    assert diff > 100 * TOL


@pytest.mark.parametrize("step", [5, 16])
def test_chunked_prefill_matches(model, ref: Reference, step: int) -> None:
    for case in ("one_image", "two_images"):
        check_chunked_prefill(model, ref, case, step)


def test_sparse_layers_follow_transformers(ref: Reference) -> None:
    """transformers' choice of sparse layers under several decoder_sparse_step / mlp_only_layers settings (recorded
    by the fixture script) is ours, in the rule and in the model built from such a config."""
    settings_ = ref.meta["sparse_layers"]
    assert len({tuple(s["sparse_layers"]) for s in settings_}) == len(settings_)
    config = json.loads((ROOT / "hf5" / "config.json").read_text())
    for setting in settings_:
        text = {**config["text_config"], **{k: v for k, v in setting.items() if k != "sparse_layers"}}
        built = Model.from_hf_config({**config, "text_config": text})
        assert sparse_layers(built) == setting["sparse_layers"], setting
        dense = [i for i in range(setting["num_hidden_layers"]) if i not in setting["sparse_layers"]]
        assert all(not isinstance(built.model.language_model.layers[i].mlp, SparseMoE) for i in dense)


def test_norm_topk_prob_false_still_renormalises_as_transformers_does(tmp_path: Path, ref: Reference) -> None:
    """transformers' Qwen3-VL-MoE router always renormalises the top-k probabilities (its config drops the flag)."""
    path = checkpoint_with_config(tmp_path, FAMILY, lambda c: c["text_config"].update(norm_topk_prob=False))
    loaded, _ = load(path)
    assert np.abs(logits_of(loaded, ref, "one_image") - ref.get("one_image", "logits")).max() <= TOL


def test_per_expert_layout_loads(tmp_path: Path, ref: Reference) -> None:
    """The older layout of one MLP per expert (``experts.<i>.gate_proj.weight``, ...: what transformers' MoE
    converters merge into the fused tensors), written here from the hf5 fixture's fused tensors."""
    path = Path(shutil.copytree(ROOT / "hf5", tmp_path / "model"))
    weights = dict(mx.load(str(path / "model.safetensors")))
    inter = ref.meta["text_config"]["moe_intermediate_size"]
    split: dict[str, mx.array] = {}
    for key, value in weights.items():
        if key.endswith("experts.gate_up_proj"):
            prefix = key.removesuffix("gate_up_proj")
            for e in range(value.shape[0]):
                split[f"{prefix}{e}.gate_proj.weight"] = value[e, :inter]
                split[f"{prefix}{e}.up_proj.weight"] = value[e, inter:]
        elif key.endswith("experts.down_proj"):
            for e in range(value.shape[0]):
                split[f"{key.removesuffix('down_proj')}{e}.down_proj.weight"] = value[e]
        else:
            split[key] = value
    assert any(".experts.3.up_proj.weight" in k for k in split)
    mx.save_safetensors(str(path / "model.safetensors"), split)
    loaded, _ = load(path)
    for case in ("text", "one_image"):
        assert np.abs(logits_of(loaded, ref, case) - ref.get(case, "logits")).max() <= TOL, case


def test_missing_expert_settings_are_a_clear_error(tmp_path: Path) -> None:
    path = checkpoint_with_config(tmp_path, FAMILY, lambda c: c["text_config"].pop("num_experts"))
    with pytest.raises(ModelLoadError, match="config.json: qwen3_vl_moe: the text config has no num_experts"):  # noqa: RUF043
        load(path)


def test_quantized_mlx_community_checkpoint_loads(ref: Reference) -> None:
    """Our converter's 4-bit folder (``--skip-vision``, see make_mlx_community_llava.py) and mlx-vlm's: the experts
    come back as quantized stacked layers (their 48-wide down projections stay float at group size 32, recorded as
    ``false`` in the config), and the model computes what its dequantized weights compute, near the reference."""
    check_quantized_fixture(FAMILY, ref)
    entry = json.loads((ROOT / "mlx_community_4bit" / "config.json").read_text())["quantization"]
    assert entry["language_model.model.layers.0.mlp.switch_mlp.down_proj"] is False
    for folder in ("mlx_community_4bit", "mlx_vlm_4bit"):
        quantized, _ = load(ROOT / folder)
        for i in (0, 2):
            experts = quantized.model.language_model.layers[i].mlp.experts
            assert isinstance(experts.gate_proj, QuantizedSwitchLinear), folder
            assert isinstance(experts.up_proj, QuantizedSwitchLinear), folder
            assert not isinstance(experts.down_proj, QuantizedSwitchLinear), folder


def test_convert_quantizes_experts_and_router_and_reports_the_rest(tmp_path: Path) -> None:
    """``vlm convert -q``: stacked experts and the router quantize like any linear layer where their width allows;
    the down projections (48 wide) stay float with the reason, under their MLX-community names."""
    options = ConvertOptions(quantize=QuantizeOptions.for_mode("affine", 4, 32))
    report = convert(ROOT / "hf5", tmp_path / "q", options)
    prefix = "language_model.model.layers.0.mlp."
    assert {prefix + "gate", prefix + "switch_mlp.gate_proj", prefix + "switch_mlp.up_proj"} <= set(report.quantized)
    assert report.kept_float[prefix + "switch_mlp.down_proj"] == "input width 48 is not a multiple of the group size 32"
    options = ConvertOptions(quantize=QuantizeOptions.for_mode("nvfp4"))  # group 16: the down projections too
    report = convert(ROOT / "hf5", tmp_path / "nvfp4", options)
    assert prefix + "switch_mlp.down_proj" in report.quantized
    model, _ = load(report.destination)
    assert model.model.language_model.layers[2].mlp.experts.down_proj.mode == "nvfp4"
    twin, _ = load(report.destination)
    dequantize_model(twin)
    ref = Reference(FAMILY)
    np.testing.assert_allclose(logits_of(model, ref, "one_image"), logits_of(twin, ref, "one_image"), atol=TOL, rtol=0)


# -- the stacked-expert MLP and its layouts


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 40), experts=st.integers(2, 6), data=st.data())
def test_sorted_and_unsorted_dispatch_agree(tokens: int, experts: int, data) -> None:
    """Sorting the (token, expert) pairs by expert (prefill) computes what the per-token gather (decode) does,
    float and quantized; and that is each token's experts applied one by one."""
    top_k = data.draw(st.integers(1, experts))
    seed = data.draw(st.integers(0, 2**16))
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    mlp = SwitchGLU(32, 16, experts)
    x = mx.random.normal((tokens, 32))
    indices = mx.array(np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)]))
    for layer in (mlp, quantized_twin(mlp)):
        unsorted, sorted_ = dispatch(layer, x, indices, threshold=10**9), dispatch(layer, x, indices, threshold=0)
        np.testing.assert_allclose(np.array(sorted_), np.array(unsorted), atol=1e-5, rtol=1e-5)
    expected = np.stack(
        [np.stack([one_expert(mlp, int(e), x[t]) for e in np.array(indices[t])]) for t in range(tokens)]
    )
    np.testing.assert_allclose(np.array(dispatch(mlp, x, indices, 10**9)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threshold", [0, 10**9])
def test_half_precision_experts_run_on_the_cpu(threshold: int) -> None:
    """MLX's CPU gather_mm takes float32 only: bfloat16 experts still run there (both dispatch paths), close to the
    float32 result."""
    mx.random.seed(3)
    mlp = SwitchGLU(32, 16, 4)
    x = mx.random.normal((20, 32))
    indices = mx.array(np.stack([np.random.default_rng(i).permutation(4)[:2] for i in range(20)]))
    expected = np.array(dispatch(mlp, x, indices, threshold))
    mlp.set_dtype(mx.bfloat16)
    out = dispatch(mlp, x.astype(mx.bfloat16), indices, threshold)
    assert out.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), expected, atol=0.1, rtol=0.05)


def quantized_twin(mlp: SwitchGLU) -> SwitchGLU:
    twin = SwitchGLU(32, 16, mlp.gate_proj.weight.shape[0])
    twin.update(mlp.parameters())
    nn.quantize(
        twin, group_size=32, bits=8, class_predicate=lambda p, m: hasattr(m, "to_quantized") and p != "down_proj"
    )
    assert isinstance(twin.gate_proj, QuantizedSwitchLinear)
    return twin


def dispatch(mlp: SwitchGLU, x: mx.array, indices: mx.array, threshold: int) -> mx.array:
    saved, moe.SORT_THRESHOLD = moe.SORT_THRESHOLD, threshold
    try:
        return mlp(x, indices)
    finally:
        moe.SORT_THRESHOLD = saved


def one_expert(mlp: SwitchGLU, e: int, x: mx.array) -> np.ndarray:
    gate, up, down = (p.weight[e] for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    return np.array((nn.silu(x @ gate.T) * (x @ up.T)) @ down.T)


@settings(max_examples=30, deadline=None)
@given(
    experts=st.integers(1, 4),
    hidden=st.sampled_from([4, 6, 8]),
    inter=st.sampled_from([2, 3, 4, 8]),
    seed=st.integers(0, 99),
)
def test_every_expert_layout_maps_to_one_form(experts: int, hidden: int, inter: int, seed: int) -> None:
    """transformers 5's fused tensors, the published (transposed) ones, one MLP per expert and MLX-community's
    switch_mlp all give the same stacked weights; the result maps to itself. Square fused tensors (hidden equal to
    2 * inter, or inter for down_proj) are taken in transformers 5's orientation, as transformers does."""
    rng = np.random.default_rng(seed)
    gate, up = rng.normal(size=(2, experts, inter, hidden)).astype(np.float32)
    down = rng.normal(size=(experts, hidden, inter)).astype(np.float32)
    p = "model.language_model.layers.0.mlp.experts."
    expected = {p + "gate_proj.weight": gate, p + "up_proj.weight": up, p + "down_proj.weight": down}
    fused = np.concatenate([gate, up], axis=1)
    layouts = {
        "hf5": {p + "gate_up_proj": fused, p + "down_proj": down},
        "per_expert": {f"{p}{e}.{n}.weight": w[e] for e in range(experts) for n, w in expected_by_name(gate, up, down)},
        "mlx_community": {k.replace(".experts.", ".switch_mlp."): v for k, v in expected.items()},
    }
    if hidden != 2 * inter and hidden != inter:
        layouts["hf4"] = {p + "gate_up_proj": fused.transpose(0, 2, 1), p + "down_proj": down.transpose(0, 2, 1)}
    for name, weights in layouts.items():
        out = expert_weights({k: mx.array(v) for k, v in weights.items()}, hidden=hidden, intermediate=inter)
        assert set(out) == set(expected), name
        for key, value in expected.items():
            np.testing.assert_array_equal(np.array(out[key]), value, err_msg=f"{name} {key}")
        again = expert_weights(out, hidden=hidden, intermediate=inter)
        assert set(again) == set(out) and all(mx.array_equal(again[k], out[k]) for k in out), name


def expected_by_name(gate: np.ndarray, up: np.ndarray, down: np.ndarray):
    return (("gate_proj", gate), ("up_proj", up), ("down_proj", down))


def test_bad_expert_tensors_are_refused() -> None:
    with pytest.raises(ValueError, match="fits neither"):
        expert_weights({"a.experts.down_proj": mx.zeros((2, 5, 7))}, hidden=4, intermediate=3)
    with pytest.raises(ValueError, match="not numbered"):
        expert_weights({"a.experts.1.up_proj.weight": mx.zeros((3, 4))}, hidden=4, intermediate=3)


def test_moe_config_is_checked() -> None:
    with pytest.raises(ValueError, match="num_experts_per_tok 5"):
        MoEConfig(num_experts=4, num_experts_per_tok=5, moe_intermediate_size=8)
    config = MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, mlp_only_layers=[1])
    assert [config.is_sparse(i) for i in range(3)] == [True, False, True]
