"""`vlm eval-quant`: the divergence measures are right on known distributions, a coarser format scores worse than
a finer one on the shipped demo model and prompt set, the JSON holds what the table shows, bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_models.quant_eval import compare, load_prompt_set, parse_modes

from .conftest import FIXTURES
from .test_convert import vlm

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "examples" / "eval_quant_prompts.json"


def log_softmax(x: np.ndarray) -> mx.array:
    x = x - x.max(-1, keepdims=True)
    return mx.array(x - np.log(np.exp(x).sum(-1, keepdims=True)))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), positions=st.integers(1, 6), vocab=st.integers(2, 12))
def test_compare_is_the_kl_divergence_and_argmax_agreement(seed: int, positions: int, vocab: int) -> None:
    rng = np.random.default_rng(seed)
    p_logits, q_logits = rng.normal(size=(positions, vocab)) * 3, rng.normal(size=(positions, vocab)) * 3
    p, q = log_softmax(p_logits), log_softmax(q_logits)
    mean_kl, max_kl, top1 = compare([p], [q])
    pn, qn = np.array(p, dtype=np.float64), np.array(q, dtype=np.float64)
    kl = (np.exp(pn) * (pn - qn)).sum(-1)
    assert mean_kl == pytest.approx(kl.mean(), rel=1e-4, abs=1e-6)
    assert max_kl == pytest.approx(kl.max(), rel=1e-4, abs=1e-6)
    assert top1 == pytest.approx((p_logits.argmax(-1) == q_logits.argmax(-1)).mean())
    same = compare([p], [p])
    assert same[0] == 0.0 and same[1] == 0.0 and same[2] == 1.0


def test_modes_parse_and_refuse() -> None:
    modes = parse_modes("affine4, affine8,mxfp4,mxfp8,nvfp4,recipe:vision-8bit")
    assert [m.name for m in modes] == ["affine4", "affine8", "mxfp4", "mxfp8", "nvfp4", "recipe:vision-8bit"]
    assert (modes[0].quantize.bits, modes[1].quantize.bits, modes[4].quantize.group_size) == (4, 8, 16)
    assert modes[5].recipe == "vision-8bit"
    for text, needle in [("affine7", "must be one of"), ("int4", "choose from"), ("recipe:x", "--quant-recipe 'x'")]:
        with pytest.raises(ValueError, match=needle):
            parse_modes(text)


def test_the_shipped_prompt_set_is_multimodal_and_its_images_exist() -> None:
    prompts = load_prompt_set(PROMPTS)
    assert len(prompts) >= 6
    assert any(p.images for p in prompts) and any(not p.images for p in prompts)
    images = {i.name for p in prompts for i in p.images}
    assert images <= {f.name for f in (REPO / "examples").glob("*.png")} and len(images) >= 3
    image = FIXTURES / "images" / "rgb_112x168.png"
    replaced = load_prompt_set(PROMPTS, [str(image)])
    assert {i for p in replaced for i in p.images} == {image}
    assert len([p for p in replaced if not p.images]) == len([p for p in prompts if not p.images])


def test_eval_quant_on_the_demo_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "eq.json"
    code, table, err = vlm(
        capsys,
        "eval-quant",
        "--modes",
        "affine8,affine2,recipe:edges-8bit",
        "--tokens",
        "8",
        "--decode-tokens",
        "4",
        "--json",
        str(out),
    )
    assert code == 0, err
    assert "[3/3] recipe:edges-8bit: scoring" in err  # progress
    report = json.loads(out.read_text())
    rows = {r["mode"]: r for r in report["results"]}
    assert list(rows) == ["float", "affine8", "affine2", "recipe:edges-8bit"]
    assert rows["float"]["mean_kl"] == 0.0 and rows["float"]["top1_agreement"] == 1.0
    # Two bits lose far more than eight, in divergence and agreement; both shrink the checkpoint.
    assert 0 < rows["affine8"]["mean_kl"] < rows["affine2"]["mean_kl"] / 10
    assert rows["affine8"]["top1_agreement"] >= rows["affine2"]["top1_agreement"]
    assert rows["affine2"]["size_bytes"] < rows["affine8"]["size_bytes"] < rows["float"]["size_bytes"]
    assert all(r["max_kl"] >= r["mean_kl"] and r["decode_tps"] > 0 for r in rows.values())
    assert len(report["prompts"]) == len(load_prompt_set(PROMPTS))
    for mode, row in rows.items():
        line = next(line for line in table.splitlines() if line.split()[0] == mode)
        assert f"{row['mean_kl']:.5f}" in line and f"{row['size_bytes'] / 1e6:.3f}" in line


def test_eval_quant_refuses_a_quantized_model_and_bad_modes(capsys) -> None:
    code, _, err = vlm(capsys, "eval-quant", "--model", str(FIXTURES / "qwen2_vl" / "mlx_community_4bit"))
    assert code == 2 and "already quantized" in err and len(err.strip().splitlines()) == 1
    code, _, err = vlm(capsys, "eval-quant", "--modes", "fp3")
    assert code == 2 and "choose from affine2..affine8" in err and len(err.strip().splitlines()) == 1
