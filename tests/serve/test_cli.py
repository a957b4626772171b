"""``vlm serve`` is registered through the entry point; bad flags fail in one line with exit code 2."""

from __future__ import annotations

import pytest

from vlm_models.cli import build_parser
from vlm_models.cli import main as vlm_main
from vlm_serve.cli import main as serve_main


def test_vlm_serve_subcommand_and_defaults() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model, args.max_concurrency) == ("127.0.0.1", 8080, None, 32)


def test_turboquant_cache_flags_reach_the_settings() -> None:
    from vlm_serve.cli import settings_from

    args = build_parser().parse_args(["serve", "--model", "m", "--kv-bits", "3.5", "--kv-quant-scheme", "turboquant"])
    cache = settings_from(args).cache
    assert (cache.kv_quant_scheme, cache.turboquant_bits) == ("turboquant", (3, 4))
    args = build_parser().parse_args(
        ["serve", "--model", "m", "--kv-quant-scheme", "turboquant", "--kv-key-bits", "2.5"] + ["--kv-value-bits", "4"]
    )
    assert settings_from(args).cache.turboquant_bits == (2.5, 4)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--model", "/no/such/model"], "no model folder"),
        ([], "nothing to serve"),
        (["--model", "m", "--api-key", ""], "API key is empty"),
        (["--model", "m", "--api-key", "  "], "API key is empty"),
        (["--models-dir", "/no/such/dir"], "not a folder"),
        (["--kv-bits", "4", "--max-kv-size", "64"], "cannot be combined"),
        (["--max-kv-size", "0"], "max_kv_size"),
        (["--model", "m", "--kv-bits", "3.5"], "turboquant"),
        (["--model", "m", "--kv-quant-scheme", "turboquant", "--kv-key-bits", "3"], "both"),
        (["--model", "m", "--allow-local-media", "/no/such/dir"], "not a folder"),
        (["--model", "m", "--max-concurrency", "0"], "max-concurrency"),
    ],
)
def test_bad_flags(capsys, argv, says) -> None:
    assert serve_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("vlm-serve: error: ") and says in err.splitlines()[-1]
    assert vlm_main(["serve", *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("vlm serve: error: ")


def test_an_empty_key_in_the_environment_is_refused_too(capsys, monkeypatch) -> None:
    monkeypatch.setenv("VLM_API_KEY", "")
    from vlm_serve.cli import main

    assert main(["--model", "m"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "API key is empty" in lines[0]
