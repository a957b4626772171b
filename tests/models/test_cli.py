"""`vlm generate` end to end, and one clear line with exit code 2 for bad input."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from vlm_models.cli import main
from vlm_models.video import VideoSampling

from .conftest import FIXTURES, serving

MODEL = FIXTURES / "qwen2_vl" / "hf4"
IMAGE = FIXTURES / "images" / "rgb_112x168.png"


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_streams_text_and_stats(capsys) -> None:
    code, out, err = run(
        capsys, "--model", str(MODEL), "--image", str(IMAGE), "--prompt", "Describe this image.", "--max-tokens", "8"
    )
    assert code == 0
    assert out.strip(), "no text was generated"
    assert "generation:" in err and "tok/s" in err and "peak memory" in err


def test_generate_is_deterministic_at_temperature_zero(capsys) -> None:
    first = run(capsys, "--model", str(MODEL), "--prompt", "Hello", "--max-tokens", "6")[1]
    second = run(capsys, "--model", str(MODEL), "--prompt", "Hello", "--max-tokens", "6")[1]
    assert first == second


def assert_clean_failure(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1, f"expected one line, got: {err}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_missing_image(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "--model", str(MODEL), "--image", str(tmp_path / "nope.png"))
    assert_clean_failure(code, err, "nope.png")


def test_image_that_is_not_an_image(capsys, tmp_path: Path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_text("this is text")
    code, _, err = run(capsys, "--model", str(MODEL), "--image", str(fake))
    assert_clean_failure(code, err, "fake.png")


def test_url_that_is_not_an_image(capsys, tmp_path: Path) -> None:
    (tmp_path / "page.html").write_text("<html>not an image</html>")

    with serving(tmp_path) as base:
        code, _, err = run(capsys, "--model", str(MODEL), "--image", f"{base}/page.html")
    assert_clean_failure(code, err, "page.html")


def test_model_folder_without_config(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "--model", str(tmp_path))
    assert_clean_failure(code, err, "config.json")


def test_unknown_model_type(capsys, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(MODEL, tmp_path / "m"))
    (folder / "config.json").write_text('{"model_type": "mystery"}')
    code, _, err = run(capsys, "--model", str(folder))
    assert_clean_failure(code, err, "mystery")


def test_bad_option_value(capsys) -> None:
    code, _, err = run(capsys, "--model", str(MODEL), "--temperature", "-1")
    assert_clean_failure(code, err, "temperature")


def test_sampling_cache_and_stop_flags(capsys, tmp_path: Path) -> None:
    base = ["--model", str(MODEL), "--prompt", "Hello", "--max-tokens", "12"]
    plain = run(capsys, *base)[1].rstrip("\n")
    assert len(plain) > 4
    stop = plain[2:4]
    code, out, err = run(
        capsys, *base, "--stop", stop, "--top-k", "5", "--min-p", "0.05", "--repetition-penalty", "1.0"
    )
    assert code == 0 and out.rstrip("\n") == plain[: plain.index(stop)] and "finish: stop" in err
    code, out, _ = run(capsys, *base, "--max-kv-size", "512")
    assert code == 0 and out.rstrip("\n") == plain
    code, out, err = run(capsys, *base, "--kv-bits", "3.5", "--kv-quant-scheme", "turboquant")
    assert code == 0 and len(out.strip()) > 4 and "Traceback" not in err
    cache_file = tmp_path / "prompt.safetensors"
    assert run(capsys, *base, "--prompt-cache-file", str(cache_file))[1].rstrip("\n") == plain
    assert cache_file.is_file()
    code, out, err = run(capsys, *base, "--prompt-cache-file", str(cache_file))
    assert code == 0 and out.rstrip("\n") == plain and "from the prompt cache" in err


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--repetition-penalty", "0"], "repetition_penalty"),
        (["--thinking-budget", "5"], "thinking"),
        (["--max-kv-size", "64", "--kv-bits", "8"], "kv"),
        (["--kv-bits", "3"], "turboquant"),
    ],
)
def test_bad_generation_flags_fail_cleanly(capsys, flags: list[str], needle: str) -> None:
    code, _, err = run(capsys, "--model", str(MODEL), "--prompt", "Hi", *flags)
    assert_clean_failure(code, err, needle)


# Issue 19: what can be checked before the model loads is reported before it loads. A model folder that is not
# there fails at once too, so an error that names the flag (not the model) shows the flag was checked first.
@pytest.mark.parametrize("command", ["generate", "bench", "chat"])
@pytest.mark.parametrize("flag", ["--image", "--video", "--audio"])
def test_missing_media_is_reported_before_the_model_loads(capsys, tmp_path: Path, command: str, flag: str) -> None:
    missing = tmp_path / "nowhere" / "clip.bin"
    code = main([command, "--model", str(tmp_path / "no-model"), flag, str(missing)])
    assert_clean_failure(code, capsys.readouterr().err, f"vlm {command}: error: {flag} {missing}")


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(
    "flags, names",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--repetition-penalty", "0"], "repetition_penalty"),
        (["--kv-bits", "3"], "kv_bits"),
        (["--thinking-budget", "-1"], "thinking_budget"),
    ],
)
def test_bad_sampling_values_are_reported_before_the_model_loads(
    capsys, tmp_path: Path, command: str, flags: list[str], names: str
) -> None:
    code = main([command, "--model", str(tmp_path / "no-model"), *flags])
    err = capsys.readouterr().err
    assert_clean_failure(code, err, f"vlm {command}: error: ", names)
    assert "no-model" not in err


@pytest.mark.parametrize("flags", [["--max-tokens", "-1"], ["--prefill-step-size", "0"]])
def test_bad_lengths_are_usage_errors(capsys, tmp_path: Path, flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(tmp_path / "no-model"), *flags])
    assert_clean_failure(exit_.value.code, capsys.readouterr().err, f"vlm generate: error: argument {flags[0]}")


def test_an_image_model_without_an_image_says_so_once(capsys) -> None:
    code, _, err = run(capsys, "--model", str(MODEL), "--prompt", "Hello", "--max-tokens", "2")
    notes = [line for line in err.splitlines() if "--image" in line]
    assert code == 0 and len(notes) == 1 and notes[0].startswith("vlm generate: note: ")
    code, _, err = run(capsys, "--model", str(MODEL), "--image", str(IMAGE), "--prompt", "Hi", "--max-tokens", "2")
    assert code == 0 and "note:" not in err


def test_bench_median_is_per_column(capsys) -> None:
    import re
    import statistics

    argv = ["bench", "--model", str(MODEL), "--image", str(IMAGE), "--prompt", "Hi", "--max-tokens", "3"]
    assert main([*argv, "--runs", "3", "--warmup", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out.index("run  vision_s  prompt_tok/s  gen_tok/s  peak_GB  gen_tokens")
    rows = [[float(v) for v in line.split()] for line in out[header + 1 : header + 4]]
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    # Three runs: each median is one of the printed values, so it prints exactly as they do.
    vision, prompt, generation, peak = (statistics.median(column) for column in list(zip(*rows))[1:5])
    median = next(line for line in out if line.startswith("median:"))
    numbers = [float(v) for v in re.findall(r"\d+\.\d+", median)]
    assert numbers == [vision, prompt, generation, peak]


def test_load_keeps_transformers_advice_quiet_without_changing_the_environment() -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    advice = "PyTorch was not found"
    script = (
        "import os; from vlm_models import load; load({model!r}); "
        "print(os.environ.get('TRANSFORMERS_NO_ADVISORY_WARNINGS'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script.format(model=str(MODEL))], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert advice not in done.stderr and done.stdout.strip() == "None"
    # The check can fail: transformers imported directly still gives its advice in this environment.
    plain = subprocess.run(
        [sys.executable, "-c", "import transformers"], capture_output=True, text=True, env=env, timeout=120
    )
    assert advice in plain.stderr


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(VideoSampling)])
def test_video_sampling_of_the_wrong_type_is_a_value_error(field: str) -> None:
    with pytest.raises(ValueError, match=rf"^video_{field} must be "):
        VideoSampling(**{field: "abc"})
