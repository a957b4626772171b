"""`vlm convert`: every family and layout round-trips through the MLX-community layout; quantized conversions
load as written and stay within their quantization's error; dequantizing undoes them; sharding, the CLI, bad input."""

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
from mlx.utils import tree_flatten

from vlm_models import load
from vlm_models.cli import main
from vlm_models.convert import ConvertOptions, _shard, convert, save_model
from vlm_models.nn.moe import QuantizedSwitchLinear
from vlm_models.quantize import QuantizeError, QuantizeOptions, dequantize_model, float_reason, is_vision_tower

from .conftest import FAMILIES, FAMILY_LAYOUTS, FIXTURES, Reference, media_case, published

TOL = 1e-4


def cases_of(ref: Reference) -> tuple[str, ...]:
    """The case with one image (one clip for a family that only hears), and the text-only one."""
    return (media_case(ref), "text")


# The logits' relative error may be at most this many times the relative error quantization put into the weights.
# To first order a network's output moves by the sum, over the weight matrices on its path, of each matrix's
# relative change times that layer's gain; the fixtures put about four to six such layers in series (vision
# blocks, projector, decoder layers, head), and the measured ratios lie between 2.7 and 5.7 over every family and
# mode (2-8 bits), so 8 leaves room without letting a wrong scale or a misplaced tensor (ratios far above) pass.
ERROR_GAIN = 8.0
# Gemma 4's 26B-A4B shape puts a dense MLP and the experts side by side in every layer and attends with normed,
# unscaled queries and keys (sharper than the other fixtures): its measured ratio is 9.5 at 4 bits.
FAMILY_ERROR_GAIN = {"gemma4_moe": 12.0}
# Qwen3.5's gated delta-net layers normalise every key and turn in_proj_a's output into a decay exponent, so its tiny
# random fixtures measure 10 (dense) and 17 (MoE, whose routing also flips) at 8 bits: they round-trip at 8 bits
# (a misplaced tensor would be ~200 there) with room to 24. 4 bits are checked in test_qwen3_5.py.
ROUND_TRIP_OF = {"qwen3_5": (8, 24.0), "qwen3_5_moe": (8, 24.0)}
# Gemma 4 MoE's fixture: at 8 bits as at 4, the fifth token's logits move by about their own size (0.96 vs 1.03
# relative) while its first four move by 2-4% -- a discrete change (a near-tied expert choice flips), not one that
# scales with the weights' error -- so its 8-bit modes are held to this floor (measured 0.36 affine, 0.40 mxfp8),
# still below its 4-bit error (0.6) and far below a broken quantization's.
ROUTING_FLIP_FLOOR = {"gemma4_moe": 0.5}


def logits(model: nn.Module, ref: Reference, case: str) -> np.ndarray:
    inputs = {k: mx.array(v) for k, v in ref.inputs(case).items()}
    return np.array(model(**inputs).logits.astype(mx.float32))


def assert_same_logits(model: nn.Module, expected: nn.Module, ref: Reference) -> None:
    for case in cases_of(ref):
        diff = np.abs(logits(model, ref, case) - logits(expected, ref, case)).max()
        assert diff <= TOL, f"{ref.family}/{case}: max |logits difference| = {diff:.2e}"


def stored(folder: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    return weights


def layout_weights(model: nn.Module) -> dict[str, mx.array]:
    """What the MLX-community layout holds for ``model`` (float source: our reference for names and values)."""
    params = dict(tree_flatten(model.parameters()))
    return model.mlx_community_names(params) if hasattr(model, "mlx_community_names") else params


def quantized_layers(weights: dict[str, mx.array]) -> list[str]:
    return sorted(k.removesuffix(".scales") for k in weights if k.endswith(".scales"))


# --- float: convert -> load computes what the source computes ------------------------------------------------


@pytest.mark.parametrize(
    "family,layout", [(f, l) for f, ls in FAMILY_LAYOUTS.items() for l in ls], ids=lambda p: str(p)
)
def test_float_round_trip_every_layout(tmp_path: Path, family: str, layout: str, references) -> None:
    source = FIXTURES / family / layout
    report = convert(source, tmp_path / "out", ConvertOptions())
    ref = references[family]
    original, original_processor = load(source)
    converted, processor = load(report.destination)
    assert_same_logits(converted, original, ref)
    case = media_case(ref)
    np.testing.assert_allclose(logits(converted, ref, case), ref.get(case, "logits"), atol=TOL)
    assert not report.quantized and "quantization" not in json.loads((report.destination / "config.json").read_text())
    # The MLX-community names, and exactly the tensors the layout holds for this model.
    written = stored(report.destination)
    expected = layout_weights(original)
    assert set(written) == set(expected)
    for key, value in expected.items():
        assert mx.array_equal(written[key], value), key
    peer = FIXTURES / family / "mlx_community"  # for Qwen, mlx-vlm's own conversion: ours is the same, bit for bit
    if peer.is_dir():
        theirs = stored(peer)
        assert set(theirs) == set(written) and all(mx.array_equal(written[k], theirs[k]) for k in theirs)
    # Tokenizer, processor and chat template travel: the converted folder formats and tokenizes a prompt the same.
    meta = ref.meta["cases"][case]
    images = [FIXTURES / "images" / name for name in meta.get("images", [])]
    audios = [FIXTURES / "audio" / name for name in meta.get("audios", [])]
    ours = processor(meta["prompt"], images, audios=audios)
    theirs = original_processor(meta["prompt"], images, audios=audios)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    assert processor.chat_template == original_processor.chat_template


@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_community_output_is_a_fixed_point(tmp_path: Path, family: str) -> None:
    """Converting a conversion changes nothing: the writer emits exactly the layout the reader takes."""
    first = convert(published(family), tmp_path / "a", ConvertOptions()).destination
    second = convert(first, tmp_path / "b", ConvertOptions()).destination
    a, b = stored(first), stored(second)
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]) for k in a)
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())


@pytest.mark.parametrize("family", [f for f in FAMILIES if (FIXTURES / f / "mlx_community_4bit").is_dir()])
def test_quantized_source_passes_through(tmp_path: Path, family: str, references) -> None:
    """Without -q or --dequantize a quantized checkpoint is rewritten as it is: same tensors, same entry."""
    source = FIXTURES / family / "mlx_community_4bit"
    report = convert(source, tmp_path / "out", ConvertOptions())
    assert not report.quantized and not report.dequantized
    written, original = stored(report.destination), stored(source)
    assert set(written) == set(original) and all(mx.array_equal(written[k], original[k]) for k in written)
    quantization = json.loads((source / "config.json").read_text())["quantization"]
    assert json.loads((report.destination / "config.json").read_text())["quantization"] == quantization
    assert_same_logits(load(report.destination)[0], load(source)[0], references[family])


# --- quantized: load is exact, the weights are MLX's quantization of the source's, the logits stay close ---------


def check_quantized(
    out: Path, source: Path, options: QuantizeOptions, ref: Reference, gain: float = ERROR_GAIN
) -> float:
    """Asserts the three facts of a quantized conversion; returns the logits' relative error."""
    original, _ = load(source)
    quantized, _ = load(out)
    written = stored(out)
    expected = layout_weights(original)
    layers = quantized_layers(written)
    assert layers, "nothing was quantized"
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert {k: config[k] for k in ("group_size", "bits", "mode")} == options.entry()
    # 1. The stored tensors: MLX's own quantization of the source weights, bit for bit; every other tensor as is.
    num = den = 0.0
    for layer in layers:
        w = expected[f"{layer}.weight"]
        parts = mx.quantize(w, options.group_size, options.bits, mode=options.mode)
        names = ("weight", "scales", "biases")[: len(parts)]
        for name, part in zip(names, parts):
            assert mx.array_equal(written[f"{layer}.{name}"], part), f"{layer}.{name}"
        w_hat = mx.dequantize(
            *parts[:2],
            parts[2] if len(parts) == 3 else None,
            options.group_size,
            options.bits,
            mode=options.mode,
            dtype=w.dtype,
        )
        num += float(((w_hat - w) ** 2).sum())
        den += float((w**2).sum())
    floats = {k for k in written if k.rsplit(".", 1)[0] not in layers}
    assert all(mx.array_equal(written[k], expected[k]) for k in floats)
    # 2. Loading honours what was written: the quantized model computes what its dequantized weights compute.
    twin, _ = load(out)
    dequantize_model(twin)
    assert_same_logits(quantized, twin, ref)
    # 3. The logits move no more than the weights' quantization error predicts (see ERROR_GAIN, ``gain``).
    weight_error = (num / den) ** 0.5
    bound = max(gain * weight_error, ROUTING_FLIP_FLOOR.get(ref.family, 0.0))
    return check_quantized_logits(original, quantized, ref, bound, options)


def check_quantized_logits(
    original: nn.Module, quantized: nn.Module, ref: Reference, bound: float, options: QuantizeOptions
) -> float:
    """Asserts the quantized model's logits are within ``bound`` (mean relative error) of the float model's, on an
    image case and a text case; returns the error."""
    worst = 0.0
    for case in cases_of(ref):
        a, b = logits(original, ref, case), logits(quantized, ref, case)
        worst = max(worst, float(np.abs(a - b).mean() / np.abs(a).mean()))
    assert 0 < worst <= bound, f"{ref.family} {options}: logits relative error {worst:.4f} above the bound {bound:.4f}"
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_round_trip_every_family(tmp_path: Path, family: str, references) -> None:
    bits, gain = ROUND_TRIP_OF.get(family, (4, FAMILY_ERROR_GAIN.get(family, ERROR_GAIN)))
    options = QuantizeOptions.for_mode("affine", bits, 32)
    source = published(family)
    report = convert(source, tmp_path / "q", ConvertOptions(quantize=options))
    check_quantized(report.destination, source, options, references[family], gain)
    assert sorted(report.quantized) == quantized_layers(stored(report.destination))


@pytest.mark.parametrize(
    "mode,bits,group_size",
    [
        ("affine", 8, 64),
        ("affine", 6, 128),
        ("affine", 3, 32),
        ("affine", 2, 32),
        ("mxfp4", None, None),
        ("mxfp8", None, None),
        ("nvfp4", None, None),
    ],
)
@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_every_quantization_mode(tmp_path: Path, family: str, mode: str, bits, group_size, references) -> None:
    options = QuantizeOptions.for_mode(mode, bits, group_size)
    source = FIXTURES / family / "hf5"
    report = convert(source, tmp_path / "q", ConvertOptions(quantize=options))
    check_quantized(report.destination, source, options, references[family])


MODES = {
    "affine4": ("affine", 4, 32),
    "affine8": ("affine", 8, 32),
    "mxfp4": ("mxfp4", None, None),
    "mxfp8": ("mxfp8", None, None),
    "nvfp4": ("nvfp4", None, None),
}


def generated_tokens(model: nn.Module, processor, ref: Reference, n: int = 5) -> list[int]:
    from vlm_runtime import GenerationConfig, GenerationSettings, stream_generate

    meta = ref.meta["cases"]["one_image"]
    images = [FIXTURES / "images" / name for name in meta["images"]]
    settings = GenerationSettings(config=GenerationConfig(max_tokens=n, ignore_eos=True))
    return [r.token for r in stream_generate(model, processor, meta["prompt"], image=images, settings=settings)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["qwen3_vl_moe", "gemma4_moe"])
def test_every_mode_round_trips_a_moe_model(tmp_path: Path, family: str, mode: str, references) -> None:
    """convert -> load -> generate in each format on the MoE fixtures: the stacked experts are quantized too (bit
    for bit MLX's quantization, see ``check_quantized``), the logits stay within the error bound, and greedy
    generation from the loaded folder is what its dequantized twin generates."""
    options = QuantizeOptions.for_mode(*MODES[mode])
    source = published(family)
    report = convert(source, tmp_path / "q", ConvertOptions(quantize=options))
    ref = references[family]
    check_quantized(report.destination, source, options, ref, FAMILY_ERROR_GAIN.get(family, ERROR_GAIN))
    model, processor = load(report.destination)
    experts = [m for _, m in model.named_modules() if isinstance(m, QuantizedSwitchLinear)]
    assert experts and all(m.mode == options.mode and m.bits == options.bits for m in experts)
    tokens = generated_tokens(model, processor, ref)
    twin, twin_processor = load(report.destination)
    dequantize_model(twin)
    assert len(tokens) == 5 and tokens == generated_tokens(twin, twin_processor, ref)


def double_scales(folder: Path, mode: str) -> None:
    """Break a quantized folder the way a misread scale layout would: every other layer's scales doubled (the fp
    modes' byte scales one binade up: E8M0 +1, nvfp4's E4M3 +8)."""
    step = {"mxfp4": 1, "mxfp8": 1, "nvfp4": 8}.get(mode)
    for file in folder.glob("*.safetensors"):
        weights = mx.load(str(file))
        for key in sorted(k for k in weights if k.endswith(".scales"))[::2]:
            s = weights[key]
            weights[key] = s * 2 if step is None else mx.minimum(s.astype(mx.int32) + step, 254).astype(mx.uint8)
        mx.save_safetensors(str(file), weights, metadata={"format": "mlx"})


def weight_error(out: Path, original: nn.Module, options: QuantizeOptions) -> float:
    """The relative error an honest quantization puts into the quantized layers' weights (all of them together)."""
    expected = layout_weights(original)
    num = den = 0.0
    for layer in quantized_layers(stored(out)):
        w = expected[f"{layer}.weight"]
        parts = mx.quantize(w, options.group_size, options.bits, mode=options.mode)
        biases = parts[2] if len(parts) == 3 else None
        w_hat = mx.dequantize(*parts[:2], biases, options.group_size, options.bits, mode=options.mode, dtype=w.dtype)
        num += float(((w_hat - w) ** 2).sum())
        den += float((w**2).sum())
    return (num / den) ** 0.5


@pytest.mark.parametrize("mode", MODES)
def test_the_bound_fails_for_a_broken_quantization(tmp_path: Path, mode: str, references) -> None:
    """The logits bound of ``check_quantized`` is not vacuous: the same conversion with its scales perturbed (what a
    misread layout does) is caught, while the intact one passes. Measured on this fixture (intact / bound / broken):
    affine4 0.48 / 0.65 / 2.8, affine8 0.026 / 0.038 / 3.0, mxfp4 0.51 / 0.93 / 1.7, mxfp8 0.18 / 0.21 / 1.7,
    nvfp4 0.48 / 0.76 / 1.7."""
    family = "qwen3_vl_moe"
    options = QuantizeOptions.for_mode(*MODES[mode])
    source = published(family)
    out = convert(source, tmp_path / "q", ConvertOptions(quantize=options)).destination
    ref = references[family]
    check_quantized(out, source, options, ref)
    original, _ = load(source)
    double_scales(out, options.mode)
    broken, _ = load(out)
    with pytest.raises(AssertionError, match="logits relative error"):
        check_quantized_logits(original, broken, ref, ERROR_GAIN * weight_error(out, original, options), options)


def test_mode_defaults_follow_mlx() -> None:
    assert QuantizeOptions.for_mode("affine") == QuantizeOptions(4, 64, "affine")
    assert QuantizeOptions.for_mode("mxfp4") == QuantizeOptions(4, 32, "mxfp4")
    assert QuantizeOptions.for_mode("mxfp8") == QuantizeOptions(8, 32, "mxfp8")
    assert QuantizeOptions.for_mode("nvfp4") == QuantizeOptions(4, 16, "nvfp4")
    for mode, bits, group_size, message in [
        ("mxfp4", 8, None, "mxfp4 bits is fixed at 4"),
        ("mxfp8", None, 64, "mxfp8 group size is fixed at 32"),
        ("nvfp4", None, 32, "nvfp4 group size is fixed at 16"),
        ("affine", 7, None, "must be one of"),
        ("int4", None, None, "unknown quantization mode"),
    ]:
        with pytest.raises(QuantizeError, match=message):
            QuantizeOptions.for_mode(mode, bits, group_size)


def mlx_quantizes(mode: str, bits: int, group_size: int) -> bool:
    try:
        mx.eval(mx.quantize(mx.ones((2, 256)), group_size, bits, mode=mode))
        return True
    except ValueError:
        return False


def test_the_mode_rules_are_what_mlx_accepts() -> None:
    """Every (mode, bits, group size) we accept MLX quantizes; the fp modes' fixed settings are exactly MLX's.
    (Affine's 1 bit, which MLX also takes, is left out: nothing useful survives it.)"""
    for mode in ("affine", "mxfp4", "mxfp8", "nvfp4"):
        for bits in range(1, 9):
            for group_size in (16, 32, 64, 128):
                try:
                    QuantizeOptions.for_mode(mode, bits, group_size)
                    accepted = True
                except QuantizeError:
                    accepted = False
                expected = mlx_quantizes(mode, bits, group_size) and not (mode == "affine" and bits == 1)
                assert accepted == expected, (mode, bits, group_size)


def test_layers_that_cannot_be_quantized_stay_float_and_are_recorded(tmp_path: Path, references) -> None:
    """Group size 128: the 32- and 64-wide layers (and Qwen's 1176-wide patch embedding, a convolution in the
    layout) stay float, the report says why, and the config records each as ``false``."""
    source = FIXTURES / "qwen2_vl" / "hf4"
    report = convert(source, tmp_path / "q", ConvertOptions(quantize=QuantizeOptions.for_mode("affine", 4, 128)))
    written = stored(report.destination)
    assert report.kept_float and report.quantized
    assert "vision_tower.patch_embed.proj" in report.kept_float
    for layer, reason in report.kept_float.items():
        assert f"{layer}.scales" not in written and "not a multiple of the group size 128" in reason
    for layer in report.quantized:
        assert written[f"{layer}.scales"].shape[-1] * 128 == written[f"{layer}.weight"].shape[-1] * 32 // 4
    config = json.loads((report.destination / "config.json").read_text())
    assert {k for k, v in config["quantization"].items() if v is False} == set(report.kept_float)
    assert config["quantization_config"] == config["quantization"]
    check_quantized(report.destination, source, QuantizeOptions(4, 128, "affine"), references["qwen2_vl"])


def test_a_layer_the_layout_stores_as_a_convolution_stays_float(tmp_path: Path) -> None:
    """Qwen's patch embedding is a linear layer here but a 5-D convolution kernel in the MLX-community layout; a
    group size that divides its width must still not quantize it (readers would find packed integers)."""
    source = FIXTURES / "qwen2_vl" / "hf4"
    model, _ = load(source)
    width = model.model.visual.patch_embed.proj.weight.shape[-1]
    group = next(g for g in (8, 4, 2) if width % g == 0)  # mx.quantize takes no group this small: check the rule
    reason = float_reason(model, "model.visual.patch_embed.proj", model.model.visual.patch_embed.proj, group)
    assert reason is not None and "another shape" in reason
    assert (
        float_reason(
            model, "model.language_model.layers.0.mlp.up_proj", model.model.language_model.layers[0].mlp.up_proj, 32
        )
        is None
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_vision_keeps_the_vision_tower_float(tmp_path: Path, family: str, references) -> None:
    source = published(family)
    options = QuantizeOptions.for_mode("affine", 4, 32)
    report = convert(source, tmp_path / "q", ConvertOptions(quantize=options, skip_vision=True))
    written = stored(report.destination)
    layers = quantized_layers(written)
    assert layers and not any(is_vision_tower(layer) for layer in layers)
    vision = {layer for layer, reason in report.kept_float.items() if "--skip-vision" in reason}
    assert vision and all(is_vision_tower(layer) for layer in vision)
    # The vision tower's tensors are the source's, untouched.
    expected = layout_weights(load(source)[0])
    for key in written:
        if is_vision_tower(key):
            assert mx.array_equal(written[key], expected[key]), key
    model, _ = load(report.destination)
    twin, _ = load(report.destination)
    dequantize_model(twin)
    assert_same_logits(model, twin, references[family])


def test_load_honours_per_layer_entries(tmp_path: Path, references) -> None:
    """A layer quantized with its own settings loads through its config entry, keyed by the layout's name; a
    ``false`` entry over stored scales is refused rather than read as float."""
    source = FIXTURES / "llava" / "hf4"
    model, _ = load(source)
    special = "model.language_model.layers.0.mlp.down_proj"
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda p, m: p == special)
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    config = json.loads((source / "config.json").read_text())
    entry = {"group_size": 32, "bits": 4, "mode": "affine", special: {"group_size": 32, "bits": 8}}
    out = save_model(model, tmp_path / "mixed", source=source, config=config, quantization=entry)
    written_entry = json.loads((out / "config.json").read_text())["quantization"]
    assert "language_model.model.layers.0.mlp.down_proj" in written_entry  # the layout's name, not ours
    loaded, _ = load(out)
    assert loaded.model.language_model.layers[0].mlp.down_proj.bits == 8
    assert loaded.model.language_model.layers[1].mlp.down_proj.bits == 4
    twin, _ = load(out)
    dequantize_model(twin)
    assert_same_logits(loaded, twin, references["llava"])

    written_entry["language_model.model.layers.0.mlp.down_proj"] = False
    config_file = out / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "quantization": written_entry}))
    with pytest.raises(ValueError, match=r"unexpected weights: .*down_proj\.(biases|scales)"):
        load(out)


# --- dequantize -----------------------------------------------------------------------------------------------


def quantized_sources() -> list[tuple[str, str]]:
    """Our own quantized conversion of every family, and the peer-written 4-bit folders where a family has one."""
    peers = [(f, "mlx_community_4bit") for f in FAMILIES if (FIXTURES / f / "mlx_community_4bit").is_dir()]
    return [(f, "own") for f in FAMILIES] + peers


@pytest.mark.parametrize("family,source_kind", quantized_sources(), ids=lambda p: str(p))
def test_dequantize_round_trip(tmp_path: Path, family: str, source_kind: str, references) -> None:
    if source_kind == "own":
        options = ConvertOptions(quantize=QuantizeOptions.for_mode("affine", 4, 32))
        source = convert(published(family), tmp_path / "q", options).destination
    else:
        source = FIXTURES / family / source_kind
    report = convert(source, tmp_path / "dq", ConvertOptions(dequantize=True))
    assert report.dequantized > 0
    written = stored(report.destination)
    assert not any(k.endswith((".scales", ".biases")) for k in written)
    config = json.loads((report.destination / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    dense, _ = load(report.destination)
    twin, _ = load(source)
    dequantize_model(twin)
    assert_same_logits(dense, twin, references[family])


def test_dequantize_of_a_microscaling_checkpoint_keeps_the_float_dtype(tmp_path: Path, references) -> None:
    source = FIXTURES / "qwen2_vl" / "hf4"
    q = convert(source, tmp_path / "q", ConvertOptions(quantize=QuantizeOptions.for_mode("mxfp8"))).destination
    dq = convert(q, tmp_path / "dq", ConvertOptions(dequantize=True)).destination
    assert {v.dtype for v in stored(dq).values()} == {mx.float32}
    dense, _ = load(dq)
    twin, _ = load(q)
    dequantize_model(twin)
    assert_same_logits(dense, twin, references["qwen2_vl"])


# --- dtype, sharding and the index ----------------------------------------------------------------------------


def test_dtype_casts_the_float_weights(tmp_path: Path, references) -> None:
    source = FIXTURES / "gemma3" / "hf5"
    report = convert(source, tmp_path / "bf16", ConvertOptions(dtype="bfloat16"))
    assert {v.dtype for v in stored(report.destination).values()} == {mx.bfloat16}
    config = json.loads((report.destination / "config.json").read_text())
    source_config = json.loads((source / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        if key in source_config:
            assert config[key] == "bfloat16"
    ref = references["gemma3"]
    model, _ = load(report.destination)
    original, _ = load(source)
    for case in cases_of(ref):
        a, b = logits(original, ref, case), logits(model, ref, case)
        # bfloat16 keeps 8 significant bits: a relative error of a few 2^-8 through the network.
        assert np.abs(a - b).mean() / np.abs(a).mean() < 0.05


def test_sharding_and_index(tmp_path: Path, references) -> None:
    source = FIXTURES / "qwen2_5_vl" / "hf4"
    limit = 96 << 10
    report = convert(source, tmp_path / "sharded", ConvertOptions(max_shard_bytes=limit))
    out = report.destination
    files = sorted(out.glob("*.safetensors"))
    assert len(files) >= 3 and report.shards == len(files)
    assert [f.name for f in files] == [
        f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    seen: dict[str, str] = {}
    total = 0
    for file in files:
        shard = mx.load(str(file))
        size = sum(v.nbytes for v in shard.values())
        assert size <= limit or len(shard) == 1, f"{file.name} holds {size} bytes"
        total += size
        for key in shard:
            assert key not in seen, f"{key} in two shards"
            seen[key] = file.name
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total
    model, _ = load(out)
    assert_same_logits(model, load(source)[0], references["qwen2_5_vl"])


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 400), min_size=1, max_size=30), limit=st.integers(1, 1000))
def test_shards_are_full_sorted_and_within_the_limit(sizes: list[int], limit: int) -> None:
    weights = {f"t{i:02d}": mx.zeros((n,), dtype=mx.uint8) for i, n in enumerate(sizes)}
    shards = _shard(weights, limit)
    assert [k for s in shards for k in s] == sorted(weights)
    for i, shard in enumerate(shards):
        size = sum(v.nbytes for v in shard.values())
        assert shard and (size <= limit or len(shard) == 1)
        if i + 1 < len(shards):  # greedy: the next tensor did not fit
            assert size + next(iter(shards[i + 1].values())).nbytes > limit


# --- the CLI --------------------------------------------------------------------------------------------------


def vlm(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_end_to_end(tmp_path: Path, capsys, references) -> None:
    source = tmp_path / "src"
    shutil.copytree(FIXTURES / "qwen2_vl" / "hf5", source)
    dst = tmp_path / "dst"
    code, out, err = vlm(
        capsys,
        "convert",
        "--hf-path",
        str(source),
        "--mlx-path",
        str(dst),
        "-q",
        "--q-group-size",
        "64",
        "--max-shard-size",
        "64KB",
    )
    assert code == 0, err
    assert f"wrote {dst}" in out and "shard(s)" in out
    assert "converting" in err and "tensor" in err  # the progress bar
    assert "kept in float (input width 32 is not a multiple of the group size 64): vision_tower." in err
    config = json.loads((dst / "config.json").read_text())
    assert (
        config["quantization"]["group_size"] == 64 and config["quantization"]["vision_tower.patch_embed.proj"] is False
    )
    assert len(list(dst.glob("model-*-of-*.safetensors"))) > 1
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        assert (dst / name).is_file() == (source / name).is_file(), name
    check_quantized(dst, source, QuantizeOptions(4, 64, "affine"), references["qwen2_vl"])
    code, out, err = vlm(
        capsys,
        "generate",
        "--model",
        str(dst),
        "--image",
        str(FIXTURES / "images" / "rgb_112x168.png"),
        "--prompt",
        "Hi",
        "--max-tokens",
        "4",
    )
    assert code == 0 and out.strip(), err


def test_cli_reads_a_hub_repo_id_through_the_download_path(tmp_path: Path, capsys, monkeypatch) -> None:
    """Offline, from a Hugging Face cache laid out as the hub does: the repo id resolves as `load` resolves it."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny--llava" / "snapshots" / "0123456789abcdef"
    shutil.copytree(FIXTURES / "llava" / "hf4", snapshot)
    (cache / "models--tiny--llava" / "refs").mkdir(parents=True)
    (cache / "models--tiny--llava" / "refs" / "main").write_text("0123456789abcdef")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    code, _out, err = vlm(capsys, "convert", "--hf-path", "tiny/llava", "--mlx-path", str(tmp_path / "dst"))
    assert code == 0, err
    assert load(tmp_path / "dst")[0].config.model_type == "llava"
    code, _, err = vlm(capsys, "convert", "--hf-path", "tiny/absent", "--mlx-path", str(tmp_path / "dst2"))
    assert code == 2 and "not in the local Hugging Face cache" in err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("vlm convert: error: ") and needle in lines[0], lines[0]


def fixture_copy(tmp_path: Path, family: str = "qwen2_vl", layout: str = "hf4") -> Path:
    return Path(shutil.copytree(FIXTURES / family / layout, tmp_path / "src"))


def without_weights(tmp_path: Path) -> Path:
    source = fixture_copy(tmp_path)
    for file in source.glob("*.safetensors"):
        file.unlink()
    (source / "pytorch_model.bin").write_bytes(b"")
    return source


def unsupported(tmp_path: Path) -> Path:
    source = fixture_copy(tmp_path)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "no_such_vlm"}))
    return source


def without_config(tmp_path: Path) -> Path:
    source = fixture_copy(tmp_path)
    (source / "config.json").unlink()
    return source


def not_empty(tmp_path: Path) -> Path:
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    return FIXTURES / "qwen2_vl" / "hf4"


QWEN = FIXTURES / "qwen2_vl" / "hf4"


@pytest.mark.parametrize(
    "make_source,flags,needle",
    [
        (without_weights, [], "no *.safetensors weight files (only PyTorch *.bin files"),
        (unsupported, [], "unsupported model_type 'no_such_vlm'"),
        (without_config, [], "has no config.json"),
        (lambda tmp: tmp / "nowhere", [], "no model folder"),
        (lambda tmp: QWEN, ["-q", "--dequantize"], "quantize or dequantize, not both"),
        (lambda tmp: QWEN, ["--q-bits", "4"], "without -q there is nothing to quantize: drop --q-bits or add -q"),
        (lambda tmp: QWEN, ["--skip-vision"], "drop --skip-vision or add -q"),
        (lambda tmp: QWEN, ["-q", "--q-mode", "mxfp4", "--q-bits", "8"], "mxfp4 bits is fixed at 4"),
        (lambda tmp: QWEN, ["-q", "--q-mode", "nvfp4", "--q-group-size", "64"], "nvfp4 group size is fixed at 16"),
        (lambda tmp: FIXTURES / "qwen2_vl" / "mlx_community_4bit", ["-q"], "already quantized"),
        (lambda tmp: QWEN, ["--dequantize"], "is not quantized"),
        (not_empty, [], "already exists and is not empty"),
    ],
    ids=[
        "no-weights",
        "unsupported",
        "no-config",
        "no-folder",
        "q-and-dequantize",
        "q-bits-alone",
        "skip-vision-alone",
        "mxfp4-bits",
        "nvfp4-group",
        "requantize",
        "dequantize-float",
        "dst-not-empty",
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys, make_source, flags, needle) -> None:
    source = make_source(tmp_path)
    dst = tmp_path / "dst"
    existed = dst.exists()
    code, _, err = vlm(capsys, "convert", "--hf-path", str(source), "--mlx-path", str(dst), *flags)
    assert_one_line_error(code, err, needle)
    assert existed or not dst.exists(), "a failed conversion left a folder behind"


def test_destination_must_not_be_the_source(tmp_path: Path, capsys) -> None:
    source = fixture_copy(tmp_path)
    code, _, err = vlm(capsys, "convert", "--hf-path", str(source), "--mlx-path", str(source))
    assert_one_line_error(code, err, "is the source folder")


def test_bad_shard_size_is_refused_by_the_parser(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--hf-path", str(QWEN), "--mlx-path", str(tmp_path / "d"), "--max-shard-size", "lots"])
    assert exit_info.value.code == 2
    assert "not a size like 5GB" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["-q"], ["--dtype", "float16"]])
def test_a_score_of_the_source_weights_is_not_copied(tmp_path: Path, capsys, flags: list[str]) -> None:
    # The demo model's demo_score.json was measured on its float weights; new weights have not earned it.
    source = Path(shutil.copytree(FIXTURES / "qwen2_vl" / "hf4", tmp_path / "source"))
    (source / "demo_score.json").write_text(json.dumps({"accuracy": 0.99}))
    out = tmp_path / "out"
    assert main(["convert", "--hf-path", str(source), "--mlx-path", str(out), *flags]) == 0, capsys.readouterr().err
    companions = {p.name for p in source.glob("*.json")} - {"config.json", "model.safetensors.index.json"}
    copied = {p.name for p in out.glob("*.json")}
    assert "demo_score.json" not in copied
    assert companions - {"demo_score.json"} <= copied
