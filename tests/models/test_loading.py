"""Loading: every layout gives the same model; bad checkpoints fail with messages that name the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from vlm_models import ModelLoadError, load
from vlm_models.convert import save_model
from vlm_models.quantize import dequantize_model, quantize_model
from vlm_models.registry import UnsupportedModelError

from .conftest import FIXTURES, Reference

FAMILY = "qwen2_vl"


def copy_fixture(tmp_path: Path, family: str = FAMILY, layout: str = "hf4") -> Path:
    return Path(shutil.copytree(FIXTURES / family / layout, tmp_path / "model"))


def one_image_logits(model, ref: Reference) -> np.ndarray:
    inputs = {k: mx.array(v) for k, v in ref.inputs("one_image").items()}
    return np.array(model(**inputs).logits)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_mlx_community_layout_round_trip(tmp_path: Path, family: str, references) -> None:
    src = FIXTURES / family / "hf5"
    model, _ = load(src)
    config = json.loads((src / "config.json").read_text())
    out = save_model(model, tmp_path / "mlx", source=src, config=config)
    names = set(mx.load(str(out / "model.safetensors")))
    assert any(n.startswith("language_model.model.") for n in names)
    assert any(n.startswith("vision_tower.") for n in names)
    reloaded, _ = load(out)
    np.testing.assert_allclose(
        one_image_logits(reloaded, references[family]), references[family].get("one_image", "logits"), atol=1e-4
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_loads_and_stays_close(tmp_path: Path, bits: int, references) -> None:
    src = FIXTURES / FAMILY / "hf4"
    model, _ = load(src)
    quantization = quantize_model(model, bits=bits, group_size=32)
    config = json.loads((src / "config.json").read_text())
    out = save_model(model, tmp_path / "q", source=src, config=config, quantization=quantization)
    assert json.loads((out / "config.json").read_text())["quantization"] == {
        "group_size": 32,
        "bits": bits,
        "mode": "affine",
    }
    stored = mx.load(str(out / "model.safetensors"))
    assert any(k.endswith(".scales") for k in stored), "nothing was quantized"
    reloaded, _ = load(out)
    ref = references[FAMILY]
    ours = one_image_logits(reloaded, ref)
    # Loading is exact: the quantized model computes what its dequantized weights compute in float.
    float_twin, _ = load(out)
    dequantize_model(float_twin)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in float_twin.named_modules())
    np.testing.assert_allclose(ours, one_image_logits(float_twin, ref), atol=1e-4)
    # And quantization costs little: the logits track transformers' float32 ones.
    expected = ref.get("one_image", "logits")
    rel = np.abs(ours - expected).mean() / np.abs(expected).mean()
    agree = (ours.argmax(-1) == expected.argmax(-1)).mean()
    print(f"{bits}-bit: relative error {rel:.4f}, argmax agreement {agree:.3f}")
    assert rel < {8: 0.05, 4: 0.5}[bits], f"{bits}-bit relative error {rel:.3f}"
    assert agree > {8: 0.9, 4: 0.5}[bits], f"{bits}-bit argmax agreement {agree:.2f}"


def test_missing_config(tmp_path: Path) -> None:
    path = copy_fixture(tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):  # noqa: RUF043
        load(path)


def test_malformed_config(tmp_path: Path) -> None:
    path = copy_fixture(tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load(path)


def test_unknown_model_type(tmp_path: Path) -> None:
    path = copy_fixture(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "no_such_model"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="no_such_model"):
        load(path)


def _rewrite_weights(path: Path, change) -> None:
    file = next(path.glob("*.safetensors"))
    weights = dict(mx.load(str(file)))
    change(weights)
    mx.save_safetensors(str(file), weights)


def test_missing_weight_is_named(tmp_path: Path) -> None:
    path = copy_fixture(tmp_path)
    victim = "model.layers.1.mlp.down_proj.weight"
    _rewrite_weights(path, lambda w: w.pop(victim))
    with pytest.raises(ModelLoadError, match=r"missing weights: .*layers\.1\.mlp\.down_proj\.weight"):
        load(path)


def test_extra_weight_is_named(tmp_path: Path) -> None:
    path = copy_fixture(tmp_path)
    _rewrite_weights(path, lambda w: w.__setitem__("model.surprise.weight", mx.zeros((2,))))
    with pytest.raises(ModelLoadError, match=r"unexpected weights: .*surprise"):
        load(path)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    path = copy_fixture(tmp_path)
    key = "model.norm.weight"
    _rewrite_weights(path, lambda w: w.__setitem__(key, mx.ones((3,))))
    with pytest.raises(ModelLoadError, match="wrong shape"):
        load(path)


def test_no_weight_files(tmp_path: Path) -> None:
    path = copy_fixture(tmp_path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load(path)


def test_not_a_folder_nor_repo(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model folder"):
        load(tmp_path / "nowhere")


def test_hub_repo_id_resolves_from_the_local_cache(tmp_path: Path, monkeypatch) -> None:
    """The real download path, offline: a repo id is found in a Hugging Face cache laid out as the hub does."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny--qwen2-vl" / "snapshots" / "0123456789abcdef"
    shutil.copytree(FIXTURES / FAMILY / "hf4", snapshot)
    (cache / "models--tiny--qwen2-vl" / "refs").mkdir(parents=True)
    (cache / "models--tiny--qwen2-vl" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model, _processor = load("tiny/qwen2-vl")
    assert model.config.model_type == "qwen2_vl"
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load("tiny/absent-model")


@pytest.mark.parametrize("variant", ["mlx_community", "mlx_community_4bit"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_peer_converted_checkpoints_compute_what_the_peer_computes(family: str, variant: str, references) -> None:
    """Checkpoints written by mlx-vlm's own converter (tests/fixtures/make_mlx_community_fixtures.py) load and
    give the logits mlx-vlm gives on them, quantized ones included."""
    model, _ = load(FIXTURES / family / variant)
    if variant.endswith("4bit"):
        assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    peer = np.load(FIXTURES / family / "mlx_community_logits.npz")
    for case in ("one_image", "text"):
        inputs = {k: mx.array(v) for k, v in references[family].inputs(case).items()}
        ours = np.array(model(**inputs).logits)
        diff = np.abs(ours - peer[f"{variant}/{case}"]).max()
        assert diff <= 1e-4, f"{family}/{variant}/{case}: {diff:.2e}"
