"""The runtime drives any model that follows its protocol: a toy model defined here, no vlm_models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from vlm_runtime import GenerationConfig, SamplingParams, generate, generate_step, make_sampler, stream_generate

from .toy import EOS, ByteProcessor, ToyModel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model() -> ToyModel:
    return ToyModel()


def greedy_reference(model: ToyModel, ids: list[int], n: int) -> list[int]:
    """Greedy tokens by full forward passes over the growing sequence (no cache)."""
    out = []
    for _ in range(n):
        logits = model(mx.array([ids + out]))
        out.append(int(mx.argmax(logits[0, -1]).item()))
    return out


def test_runtime_does_not_import_models() -> None:
    """In a fresh interpreter: the toy model generates, and no model package was ever imported."""
    code = (
        "import sys; from tests.runtime.toy import ByteProcessor, ToyModel; from vlm_runtime import generate; "
        "r = generate(ToyModel(), ByteProcessor(), 'hi', max_tokens=3, ignore_eos=True); "
        "assert r.generation_tokens == 3, r; "
        "assert not [m for m in sys.modules if m.startswith(('vlm_models', 'transformers'))]; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("prefill_step_size", [1, 3, 2048])
def test_cached_greedy_equals_full_forward(model: ToyModel, prefill_step_size: int) -> None:
    inputs = ByteProcessor().prepare_inputs("hello world")
    config = GenerationConfig(max_tokens=12, prefill_step_size=prefill_step_size)
    tokens = [t for t, _ in generate_step(model, inputs, sampler=make_sampler(SamplingParams()), config=config)]
    assert tokens == greedy_reference(model, inputs["input_ids"][0].tolist(), 12)


def test_max_tokens_and_finish_reason(model: ToyModel) -> None:
    result = generate(model, ByteProcessor(), "abc", max_tokens=5, ignore_eos=True)
    assert result.generation_tokens == 5
    assert result.finish_reason == "length"
    assert result.prompt_tokens == 4


def test_zero_max_tokens(model: ToyModel) -> None:
    result = generate(model, ByteProcessor(), "abc", max_tokens=0)
    assert result.generation_tokens == 0 and result.text == ""


def test_stops_on_eos_and_does_not_emit_it(model: ToyModel) -> None:
    processor = ByteProcessor()
    ids = processor.prepare_inputs("abc")["input_ids"][0].tolist()
    first = greedy_reference(model, ids, 1)[0]

    class StopAtFirst(ByteProcessor):
        eos_token_ids = frozenset({first, EOS})

    result = generate(model, StopAtFirst(), "abc", max_tokens=10)
    assert result.finish_reason == "stop"
    assert result.generation_tokens == 0
    assert result.token == first


def test_temperature_zero_is_deterministic(model: ToyModel) -> None:
    a = generate(model, ByteProcessor(), "xyz", max_tokens=8, ignore_eos=True)
    b = generate(model, ByteProcessor(), "xyz", max_tokens=8, ignore_eos=True)
    assert a.text == b.text


def test_seed_reproducible_and_seeds_differ(model: ToyModel) -> None:
    def run(seed: int) -> list[int]:
        return [
            r.token
            for r in stream_generate(
                model, ByteProcessor(), "q", max_tokens=24, temperature=5.0, seed=seed, ignore_eos=True
            )
        ]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_stream_text_concatenates_to_generate_text(model: ToyModel) -> None:
    streamed = "".join(r.text for r in stream_generate(model, ByteProcessor(), "hey", max_tokens=16, ignore_eos=True))
    assert streamed == generate(model, ByteProcessor(), "hey", max_tokens=16, ignore_eos=True).text


def test_stats_are_filled(model: ToyModel) -> None:
    result = generate(model, ByteProcessor(), "stats", max_tokens=6, ignore_eos=True)
    assert result.prompt_tps > 0 and result.generation_tps > 0
    assert result.peak_memory >= 0


@pytest.mark.parametrize(
    "options",
    [{"temperature": -1.0}, {"top_p": 0.0}, {"max_tokens": -1}, {"prefill_step_size": 0}],
)
def test_bad_options_raise(model: ToyModel, options: dict) -> None:
    with pytest.raises(ValueError):
        generate(model, ByteProcessor(), "x", **options)
