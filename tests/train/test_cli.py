"""`vlm train`, `vlm train fuse`, `vlm train shapes`, `vlm generate --adapter-path` and `vlm-train` end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vlm_models.cli import main as vlm
from vlm_train.cli import main as vlm_train

from .conftest import FLOAT_MODEL, IMAGE, chat, small_dataset, write_jsonl


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_train_generate_and_fuse(tmp_path: Path, capsys) -> None:
    data = small_dataset(tmp_path / "data")
    out = tmp_path / "adapter"
    code = vlm(
        [
            "train",
            "--model",
            str(FLOAT_MODEL),
            "--data",
            str(data),
            "--output",
            str(out),
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--learning-rate",
            "1e-2",
            "--val-every",
            "2",
            "--save-every",
            "2",
            "--rank",
            "4",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    for field in ("loss=", "lr=", "tok/s=", "peak_GB=", "val="):  # the progress bar
        assert field in err
    assert "trained 4 steps" in err and "validation loss" in err
    assert (out / "adapters.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "checkpoints" / "step_0000002" / "optimizer.safetensors").is_file()
    with Image.open(out / "loss.png") as curve:
        assert curve.format == "PNG" and curve.size[0] > 100
        colours = np.unique(np.asarray(curve.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 3  # something was drawn

    question = ["--image", str(IMAGE), "--prompt", "What is item 3?", "--max-tokens", "8"]
    assert vlm(["generate", "--model", str(FLOAT_MODEL), *question]) == 0
    plain = capsys.readouterr().out
    code = vlm(["generate", "--model", str(FLOAT_MODEL), "--adapter-path", str(out), *question])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "generation:" in captured.err
    assert captured.out != plain, "the adapter should change the greedy answer"
    assert (
        vlm(
            [
                "train",
                "fuse",
                "--model",
                str(FLOAT_MODEL),
                "--adapter-path",
                str(out),
                "--output",
                str(tmp_path / "fused-float"),
            ]
        )
        == 0
    )
    assert vlm(["generate", "--model", str(tmp_path / "fused-float"), *question]) == 0
    assert capsys.readouterr().out == captured.out  # the fused model answers as the adapter does

    code = vlm(
        [
            "train",
            "fuse",
            "--model",
            str(FLOAT_MODEL),
            "--adapter-path",
            str(out),
            "--output",
            str(tmp_path / "fused"),
            "--quantize",
            "--q-group-size",
            "32",
        ]
    )
    assert code == 0, capsys.readouterr().err
    code = vlm(["generate", "--model", str(tmp_path / "fused"), "--prompt", "Hello", "--max-tokens", "3"])
    assert code == 0, capsys.readouterr().err


def test_standalone_script_and_resume(tmp_path: Path, capsys) -> None:
    data = small_dataset(tmp_path / "data")
    out = tmp_path / "adapter"
    common = ["--model", str(FLOAT_MODEL), "--data", str(data), "--output", str(out), "--no-progress"]
    assert vlm_train([*common, "--steps", "2", "--save-every", "1"]) == 0
    code = vlm_train([*common, "--steps", "3", "--resume-from", str(out / "checkpoints" / "step_0000001")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "trained 3 steps" in err


def test_bad_samples_on_the_command_line(tmp_path: Path, capsys) -> None:
    file = write_jsonl(tmp_path / "train.jsonl", [chat("Fine?", "Yes."), chat("Where?", "There.", "gone.png")])
    out = tmp_path / "adapter"
    args = [
        "train",
        "--model",
        str(FLOAT_MODEL),
        "--data",
        str(file),
        "--output",
        str(out),
        "--steps",
        "1",
        "--no-progress",
    ]
    code = vlm([*args, "--on-bad-sample", "error"])
    one_line_error(code, capsys.readouterr().err, f"{file}:2", "gone.png")
    assert not out.exists(), "nothing is written when the data is rejected"
    code = vlm(args)
    err = capsys.readouterr().err
    assert code == 0
    assert f"skipping {file}:2" in err and "1 bad sample(s) skipped" in err


def test_usage_errors_are_one_line(tmp_path: Path, capsys) -> None:
    one_line_error(vlm_train(["--model", str(FLOAT_MODEL)]), capsys.readouterr().err, "--data")
    code = vlm(["train", "--model", str(FLOAT_MODEL), "--data", str(tmp_path / "none.jsonl")])
    one_line_error(code, capsys.readouterr().err, "none.jsonl")
    code = vlm(["generate", "--model", str(FLOAT_MODEL), "--adapter-path", str(tmp_path), "--prompt", "Hi"])
    one_line_error(code, capsys.readouterr().err, "adapter_config.json")
    code = vlm(["train", "--model", str(FLOAT_MODEL), "--data", str(tmp_path), "--rank", "0"])
    one_line_error(code, capsys.readouterr().err, "rank")


def test_shapes_data_trains(tmp_path: Path, capsys) -> None:
    assert vlm(["train", "shapes", "--output", str(tmp_path / "shapes"), "--count", "6", "--val-count", "2"]) == 0
    assert (tmp_path / "shapes" / "train.jsonl").is_file() and (tmp_path / "shapes" / "valid.jsonl").is_file()
    code = vlm(
        [
            "train",
            "--model",
            str(FLOAT_MODEL),
            "--data",
            str(tmp_path / "shapes"),
            "--output",
            str(tmp_path / "adapter"),
            "--steps",
            "2",
            "--no-progress",
            "--on-bad-sample",
            "error",
        ]
    )
    assert code == 0, capsys.readouterr().err


def test_init_refuses_a_pixel_cap_below_the_minimum(tmp_path: Path, capsys) -> None:
    code = vlm(
        [
            "train",
            "init",
            "--like",
            str(FLOAT_MODEL),
            "--output",
            str(tmp_path / "fresh"),
            "--hidden-size",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--intermediate-size",
            "64",
            "--vision-embed-dim",
            "16",
            "--vision-heads",
            "2",
            "--vision-depth",
            "1",
            "--max-pixels",
            "100",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--max-pixels 100 is below the processor's min_pixels 3136" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "fresh").exists()


def test_init_writes_a_fresh_model_that_trains_from_scratch(tmp_path: Path, capsys) -> None:
    from vlm_models import load

    out = tmp_path / "fresh"
    code = vlm(
        [
            "train",
            "init",
            "--like",
            str(FLOAT_MODEL),
            "--output",
            str(out),
            "--hidden-size",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--intermediate-size",
            "64",
            "--vision-embed-dim",
            "16",
            "--vision-heads",
            "2",
            "--vision-depth",
            "1",
            "--max-pixels",
            "3136",
        ]
    )
    assert code == 0, capsys.readouterr().err
    model, processor = load(out)
    assert model.config.text.hidden_size == 32 and len(model.model.language_model.layers) == 1
    # --max-pixels: a large image becomes as few image tokens as a 56x56 one
    large = processor.image_processor([Image.new("RGB", (224, 224))])
    assert large["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert model.config.vision.embed_dim == 16 and model.config.mrope_section == (2, 3, 3)
    data = small_dataset(tmp_path / "data")
    code = vlm(
        [
            "train",
            "--model",
            str(out),
            "--data",
            str(data),
            "--output",
            str(tmp_path / "trained"),
            "--fine-tune-type",
            "full",
            "--steps",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    code = vlm(
        [
            "train",
            "fuse",
            "--model",
            str(out),
            "--adapter-path",
            str(tmp_path / "trained"),
            "--output",
            str(tmp_path / "fused"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert load(tmp_path / "fused")[0].config.text.hidden_size == 32
