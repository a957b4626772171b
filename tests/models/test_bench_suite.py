"""``vlm bench --shape`` and ``--suite``: random checkpoints of real shapes written once and reused, the
suite's measurements and JSON, and the one-line refusals."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import mlx.nn as nn
import pytest

from vlm_models import load
from vlm_models.bench_shapes import SHAPES, qwen2_vl_config, qwen2_vl_weights, shape_checkpoint, token_ids
from vlm_models.cli import SHAPE_NAMES, main
from vlm_models.demo import demo_model_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("VLM_BENCH_CACHE", str(tmp_path / "bench"))
    return tmp_path / "bench"


def test_the_command_line_names_every_shape() -> None:
    assert set(SHAPE_NAMES) == set(SHAPES)


@pytest.mark.parametrize(("shape", "billions"), [("qwen2-vl-2b", 2.209), ("qwen2-vl-7b", 8.291)])
def test_the_real_shapes_have_the_published_parameter_counts(shape: str, billions: float) -> None:
    """Counted from the tensor list, nothing written: Qwen2-VL-2B has 2.21B parameters, 7B 8.29B."""
    config = qwen2_vl_config(SHAPES[shape], token_ids(demo_model_path()), SHAPES[shape]["vocab_size"], "bfloat16")
    total = sum(math.prod(shape_) for _, shape_, _ in qwen2_vl_weights(config))
    assert abs(total / 1e9 - billions) < 0.005


def test_qwen3_vl_4b_has_the_published_parameter_count() -> None:
    """Built by our own modules (nothing evaluated or written): Qwen3-VL-4B has 4.44B parameters."""
    from mlx.utils import tree_flatten

    from vlm_models.bench_shapes import qwen3_vl_config
    from vlm_models.registry import architecture_for

    config = qwen3_vl_config(SHAPES["qwen3-vl-4b"], token_ids(demo_model_path()), 151936, "bfloat16")
    model = architecture_for("qwen3_vl").load_module().Model.from_hf_config(config)
    total = sum(math.prod(a.shape) for _, a in tree_flatten(model.parameters()))
    assert abs(total / 1e9 - 4.438) < 0.005


def test_a_qwen3_vl_shape_loads_and_answers_about_an_image(cache: Path) -> None:
    from vlm_models import apply_chat_template
    from vlm_runtime import generate

    model, processor = load(shape_checkpoint("qwen3-vl-tiny", dtype="float32"))
    prompt = apply_chat_template(processor, None, "Describe this image.", num_images=1)
    result = generate(model, processor, prompt, image=[ROOT / "benchmarks" / "bench_448.png"], max_tokens=4)
    assert result.generation_tokens == 4
    assert result.prompt_tokens > (448 // 32) ** 2  # the 448-px image's 196 tokens are in the prompt


def test_a_shape_checkpoint_is_written_once_and_redone_when_incomplete(cache: Path) -> None:
    lines: list[str] = []
    first = shape_checkpoint("tiny", dtype="float32", progress=lines.append)
    assert (first / "config.json").is_file() and any("writing" in line for line in lines)
    stamp = (first / "config.json").stat().st_mtime_ns
    lines.clear()
    assert shape_checkpoint("tiny", dtype="float32", progress=lines.append) == first and not lines
    assert (first / "config.json").stat().st_mtime_ns == stamp
    (first / ".complete").unlink()  # as after an interrupted write
    shape_checkpoint("tiny", dtype="float32", progress=lines.append)
    assert any("writing" in line for line in lines)
    quantized = shape_checkpoint("tiny", dtype="float32", bits=4)
    model, processor = load(quantized)
    assert json.loads((quantized / "config.json").read_text())["quantization"]["bits"] == 4
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    assert processor.encode("any words at all encode") != []


def test_the_suite_measures_and_writes_json(cache: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "suite.json"
    args = ["bench", "--shape", "tiny", "--dtype", "float32", "--suite", "--runs", "1", "--warmup", "0"]
    args += ["--max-tokens", "4", "--batch-sizes", "1", "2", "--prefill-tokens", "40", "--image-sizes", "56"]
    assert main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["vision encode 56x56", "prefill 40 tokens", "decode batch 1", "decode batch 2"]
    assert all(row["value"] > 0 and row["peak_gb"] > 0 for row in report["rows"])
    assert report["rows"][1]["time_to_first_token_s"] > 0
    assert all(name in printed for name in names)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--json", "x.json"], "add --suite"),
        (["--q-bits", "4"], "need --shape"),
        (["--shape", "tiny", "--model", "somewhere"], "not both"),
        (["--suite", "--peer", "mlx-vlm"], "mlx-vlm importable"),
    ],
)
def test_bad_bench_options_get_one_line(extra: list[str], message: str, capsys, cache: Path) -> None:
    if "--peer" in extra and importlib.util.find_spec("mlx_vlm") is not None:
        pytest.skip("mlx-vlm is importable here (a scratch environment): nothing to refuse")
    assert main(["bench", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not cache.exists()  # refused before anything was written
