"""Mixed quantization in `vlm convert`: the named recipes and predicate files raise or keep exactly the layers they
name, every per-layer setting is written into config.json under the MLX-community names, and the folder loads back
computing what its stored weights say."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.nn as nn
import pytest

from vlm_models import load
from vlm_models.convert import ConvertOptions, convert
from vlm_models.nn.moe import QuantizedSwitchLinear
from vlm_models.quantize import QuantizeOptions, dequantize_model, is_vision_tower
from vlm_models.recipes import edge_layers

from .conftest import FIXTURES, published
from .test_convert import assert_one_line_error, assert_same_logits, cases_of, logits, vlm

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)


def settings_of(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    return {p: (m.mode, m.bits, m.group_size) for p, m in model.named_modules() if isinstance(m, QUANTIZED)}


def mixed(tmp_path: Path, family: str, options: QuantizeOptions, **kwargs) -> tuple[Path, dict]:
    report = convert(published(family), tmp_path / "q", ConvertOptions(quantize=options, **kwargs))
    return report.destination, json.loads((report.destination / "config.json").read_text())["quantization"]


def assert_loads_as_written(out: Path, family: str, references) -> nn.Module:
    """The loaded model computes what its own dequantized weights compute (each layer read with its settings)."""
    model, _ = load(out)
    twin, _ = load(out)
    dequantize_model(twin)
    assert_same_logits(model, twin, references[family])
    return model


def relative_error(model: nn.Module, float_model: nn.Module, ref) -> float:
    worst = 0.0
    for case in cases_of(ref):
        a, b = logits(float_model, ref, case), logits(model, ref, case)
        worst = max(worst, float(abs(a - b).mean() / abs(a).mean()))
    return worst


def test_vision_recipe_raises_the_towers_embeddings_and_routers(tmp_path: Path, references) -> None:
    family = "qwen3_vl_moe"
    base = QuantizeOptions.for_mode("affine", 4, 32)
    out, entry = mixed(tmp_path, family, base, recipe="vision-8bit")
    model = assert_loads_as_written(out, family, references)
    eight = [p for p, s in settings_of(model).items() if s == ("affine", 8, 32)]
    four = [p for p, s in settings_of(model).items() if s == ("affine", 4, 32)]
    assert eight and four and len(eight) + len(four) == len(settings_of(model))
    for path in eight:
        assert is_vision_tower(path) or path.endswith(("embed_tokens", "lm_head", ".mlp.gate")), path
    assert any(p.endswith(".mlp.gate") for p in eight) and any(is_vision_tower(p) for p in eight)
    assert all(not is_vision_tower(p) and not p.endswith((".mlp.gate", "embed_tokens", "lm_head")) for p in four)
    # config.json: the defaults, then each raised layer under its MLX-community name (how mlx-community writes them).
    assert {k: entry[k] for k in ("group_size", "bits", "mode")} == base.entry()
    own = {k: v for k, v in entry.items() if isinstance(v, dict)}
    assert len(own) == len(eight) and all(v == {"group_size": 32, "bits": 8, "mode": "affine"} for v in own.values())
    assert "language_model.lm_head" in own or "lm_head" in own
    # Raising what feeds everything else costs less than quantizing all of it at 4 bits.
    float_model, _ = load(published(family))
    uniform, _ = load(convert(published(family), tmp_path / "u", ConvertOptions(quantize=base)).destination)
    ref = references[family]
    assert relative_error(model, float_model, ref) < relative_error(uniform, float_model, ref)


def test_edges_recipe_raises_the_first_and_last_decoder_layers(tmp_path: Path, references) -> None:
    family = "qwen2_vl"
    out, entry = mixed(tmp_path, family, QuantizeOptions.for_mode("affine", 4, 32), recipe="edges-8bit")
    model = assert_loads_as_written(out, family, references)
    count = len(model.model.language_model.layers)
    assert count >= 2
    for path, (_, bits, _) in settings_of(model).items():
        edge = path.startswith(("model.language_model.layers.0.", f"model.language_model.layers.{count - 1}."))
        assert bits == (8 if edge else 4), path
    assert any(k.startswith("model.layers.0.") or ".layers.0." in k for k, v in entry.items() if isinstance(v, dict))


def test_edge_layers_are_the_language_models() -> None:
    paths = [f"model.visual.blocks.{i}.attn.qkv" for i in range(5)]
    paths += [f"model.language_model.layers.{i}.mlp.up_proj" for i in range(3)]
    paths += ["mtp.layers.0.fc", "model.visual.layers.7.fc"]
    assert edge_layers(paths) == {"model.language_model.layers.0.", "model.language_model.layers.2."}
    assert edge_layers(["lm_head"]) == set()


def test_routers_recipe_with_a_microscaling_base_raises_them_to_mxfp8(tmp_path: Path, references) -> None:
    family = "qwen3_vl_moe"
    out, entry = mixed(tmp_path, family, QuantizeOptions.for_mode("nvfp4"), recipe="routers-8bit")
    model = assert_loads_as_written(out, family, references)
    settings = settings_of(model)
    routers = {p for p in settings if p.endswith(".mlp.gate")}
    assert routers and all(settings[p] == ("mxfp8", 8, 32) for p in routers)
    assert all(s == ("nvfp4", 4, 16) for p, s in settings.items() if p not in routers)
    assert sum(isinstance(v, dict) and v["mode"] == "mxfp8" for v in entry.values()) == len(routers)


def test_predicate_file_chooses_per_pattern_and_keeps_float(tmp_path: Path, references) -> None:
    family = "qwen3_vl_moe"
    rules = {
        "*.switch_mlp.gate_proj": {"bits": 8},  # the MLX-community name only (ours: mlp.experts.gate_proj)
        "*.self_attn.*": {"bits": 8},
        "*lm_head": False,
        "*.mlp.experts.*": {"mode": "mxfp4"},
        "*.visual.*": {"bits": 6, "group_size": 64},
    }
    file = tmp_path / "predicate.json"
    file.write_text(json.dumps(rules))
    out, entry = mixed(tmp_path, family, QuantizeOptions.for_mode("affine", 4, 32), predicate_file=file)
    model = assert_loads_as_written(out, family, references)
    settings = settings_of(model)
    assert "lm_head" not in settings and not isinstance(model.lm_head, nn.QuantizedLinear)
    assert [v for k, v in entry.items() if k.endswith("lm_head")] == [False]
    for path, setting in settings.items():
        if ".self_attn." in path or path.endswith(".mlp.experts.gate_proj"):
            assert setting == ("affine", 8, 32), path
        elif ".mlp.experts." in path:
            assert setting == ("mxfp4", 4, 32), path
        elif ".visual." in path:
            assert setting == ("affine", 6, 64), path
        else:
            assert setting == ("affine", 4, 32), path
    assert {s for s in settings.values()} == {("affine", 8, 32), ("mxfp4", 4, 32), ("affine", 6, 64), ("affine", 4, 32)}


def test_the_cli_writes_and_reports_a_recipe(tmp_path: Path, capsys, references) -> None:
    dst = tmp_path / "dst"
    code, _, err = vlm(
        capsys,
        "convert",
        "--hf-path",
        str(published("qwen2_vl")),
        "--mlx-path",
        str(dst),
        "-q",
        "--q-group-size",
        "32",
        "--quant-recipe",
        "edges-8bit",
    )
    assert code == 0, err
    assert "quantized at affine, 8 bits, group size 32: " in err and "layers.0." in err
    assert_loads_as_written(dst, "qwen2_vl", references)


QWEN = FIXTURES / "qwen2_vl" / "hf4"


@pytest.mark.parametrize(
    "flags,predicate,needle",
    [
        (["-q", "--quant-recipe", "fancy"], None, "--quant-recipe 'fancy': choose from routers-8bit"),
        (["--quant-recipe", "vision-8bit"], None, "drop --quant-recipe or add -q"),
        (["-q", "--quant-predicate"], "{not json", "not JSON"),
        (["-q", "--quant-predicate"], '{"*": 4}', "must map to false or an object of bits, group_size and mode"),
        (["-q", "--quant-predicate"], '{"*": {"mode": "mxfp4", "bits": 8}}', "mxfp4 bits is fixed at 4"),
        (["-q", "--quant-predicate"], '{"*": {"mode": "int3"}}', "unknown mode 'int3'"),
        (["-q", "--quant-recipe", "edges-8bit", "--quant-predicate"], '{"*": false}', "give one"),
    ],
    ids=["unknown-recipe", "recipe-without-q", "bad-json", "bad-value", "bad-bits", "bad-mode", "both"],
)
def test_bad_recipes_are_one_line(tmp_path: Path, capsys, flags, predicate, needle) -> None:
    if predicate is not None:
        file = tmp_path / "p.json"
        file.write_text(predicate)
        flags = [*flags, str(file)]
    dst = tmp_path / "dst"
    code, _, err = vlm(capsys, "convert", "--hf-path", str(QWEN), "--mlx-path", str(dst), *flags)
    assert_one_line_error(code, err, needle)
    assert not dst.exists()
