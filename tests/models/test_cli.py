"""`vlm generate` end to end, and one clear line with exit code 2 for bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vlm_models.cli import main

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
