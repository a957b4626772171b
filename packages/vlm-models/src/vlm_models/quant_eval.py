"""What each quantization format costs a model: ``vlm eval-quant`` converts a float checkpoint into each format
(in a temporary folder, through ``convert``, so what is measured is what a user would load), then compares the
quantized model's next-token distributions with the float model's, teacher-forced on the float model's own greedy
continuations of a fixed multimodal prompt set, and times decoding."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .chat import apply_chat_template
from .convert import ConvertOptions, convert
from .loading import load, resolve_model_path
from .quantize import QuantizeError, QuantizeOptions, is_quantized
from .recipes import RECIPES, recipe_by_name

__all__ = ["EvalPrompt", "QuantResult", "evaluate_quantization", "load_prompt_set", "parse_modes"]

DEFAULT_MODES = "affine4,affine8,mxfp4,mxfp8,nvfp4"
DECODE_RUNS = 5


@dataclass(frozen=True)
class QuantMode:
    name: str
    quantize: QuantizeOptions
    recipe: str | None = None


def parse_mode(name: str) -> QuantMode:
    """``affine<bits>``, ``mxfp4``, ``mxfp8``, ``nvfp4`` or ``recipe:<preset>`` (a preset over affine 4 bits)."""
    if name.startswith("recipe:"):
        recipe = name.removeprefix("recipe:")
        recipe_by_name(recipe)  # refuses an unknown preset
        return QuantMode(name, QuantizeOptions.for_mode("affine"), recipe)
    if name.startswith("affine") and name != "affine":
        bits = name.removeprefix("affine")
        if not bits.isdigit():
            raise QuantizeError(f"--modes {name}: write affine<bits>, e.g. affine4")
        return QuantMode(name, QuantizeOptions.for_mode("affine", int(bits)))
    if name in ("mxfp4", "mxfp8", "nvfp4"):
        return QuantMode(name, QuantizeOptions.for_mode(name))
    presets = ", ".join(f"recipe:{r}" for r in RECIPES)
    raise QuantizeError(f"--modes {name!r}: choose from affine2..affine8, mxfp4, mxfp8, nvfp4, {presets}")


def parse_modes(text: str) -> list[QuantMode]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise QuantizeError("--modes is empty: name at least one format, e.g. affine4")
    return [parse_mode(n) for n in names]


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    images: tuple[Path, ...] = ()


def load_prompt_set(file: Path, images: Sequence[str] = ()) -> list[EvalPrompt]:
    """The prompts of ``file`` (``{"prompts": [{"prompt": ..., "images": [names relative to the file]}]}``); with
    ``images``, every prompt that takes images is asked of each of these instead."""
    entries = json.loads(Path(file).read_text())["prompts"]
    prompts = []
    for entry in entries:
        own = tuple(Path(file).parent / name for name in entry.get("images", []))
        if images and own:
            prompts += [EvalPrompt(entry["prompt"], (Path(image),)) for image in images]
        else:
            prompts.append(EvalPrompt(entry["prompt"], own))
    for prompt in prompts:
        for image in prompt.images:
            if not image.is_file():
                raise FileNotFoundError(f"image {image} of the prompt set does not exist")
    return list(dict.fromkeys(prompts))


@dataclass
class QuantResult:
    mode: str
    size_bytes: int
    mean_kl: float
    max_kl: float
    top1_agreement: float
    decode_tps: float
    quantized_layers: int = 0
    float_layers: int = 0


@dataclass(frozen=True)
class _Case:
    inputs: dict[str, mx.array]
    continuation: list[int]
    """The float model's greedy tokens after the prompt: the teacher-forced targets."""


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _prepare(model: nn.Module, processor: Any, prompt: EvalPrompt, tokens: int) -> _Case:
    from vlm_runtime import GenerationConfig, GenerationSettings, stream_generate

    text = apply_chat_template(processor, None, prompt.prompt, num_images=len(prompt.images))
    settings = GenerationSettings(config=GenerationConfig(max_tokens=tokens, ignore_eos=True))
    images = [str(i) for i in prompt.images]
    continuation = [r.token for r in stream_generate(model, processor, text, image=images, settings=settings)]
    return _Case(processor.prepare_inputs(text, images), [t for t in continuation if t is not None])


def _next_token_logprobs(model: nn.Module, case: _Case) -> mx.array:
    """Log-probabilities, in float32, at each position that predicts a continuation token ([tokens, vocab])."""
    inputs = dict(case.inputs)
    prompt_length = inputs["input_ids"].shape[1]
    extra = mx.array([case.continuation[:-1]], dtype=inputs["input_ids"].dtype)
    inputs["input_ids"] = mx.concatenate([inputs["input_ids"], extra], axis=1)
    if "attention_mask" in inputs:
        inputs["attention_mask"] = mx.ones(inputs["input_ids"].shape, dtype=inputs["attention_mask"].dtype)
    logits = model(**inputs).logits[0, prompt_length - 1 :].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _decode_tps(model: nn.Module, processor: Any, prompt: EvalPrompt, tokens: int) -> float:
    from vlm_runtime import GenerationConfig, GenerationSettings, stream_generate

    text = apply_chat_template(processor, None, prompt.prompt, num_images=len(prompt.images))
    settings = GenerationSettings(config=GenerationConfig(max_tokens=tokens, ignore_eos=True))
    images = [str(i) for i in prompt.images]
    speeds = []
    for _ in range(1 + DECODE_RUNS):  # the first run compiles and warms the caches
        last = None
        for last in stream_generate(model, processor, text, image=images, settings=settings):  # noqa: B007
            pass
        assert last is not None
        speeds.append(last.generation_tps)
    return sorted(speeds[1:])[len(speeds[1:]) // 2]  # the median: one busy moment moves it least


def compare(reference: Sequence[mx.array], candidate: Sequence[mx.array]) -> tuple[float, float, float]:
    """Mean and max per-token KL(reference || candidate) and the top-1 agreement, over every position."""
    kls, agree = [], []
    for p, q in zip(reference, candidate, strict=True):
        kls.append(mx.sum(mx.exp(p) * (p - q), axis=-1))
        agree.append(mx.argmax(p, axis=-1) == mx.argmax(q, axis=-1))
    kl = mx.maximum(mx.concatenate(kls), 0.0)  # rounding can take a zero divergence a hair below zero
    same = mx.concatenate(agree)
    return kl.mean().item(), kl.max().item(), same.astype(mx.float32).mean().item()


def evaluate_quantization(
    model_path: str | Path,
    modes: Sequence[QuantMode],
    prompts: Sequence[EvalPrompt],
    *,
    tokens: int = 32,
    decode_tokens: int = 64,
    progress: Callable[[str], None] | None = None,
) -> list[QuantResult]:
    """One row for the float model, then one per mode (see the module docstring)."""
    say = progress or (lambda _: None)
    float_model, processor = load(model_path)
    if is_quantized(float_model):
        raise QuantizeError(f"{model_path} is already quantized; eval-quant compares formats against a float model")
    say(f"float: greedy continuations of {len(prompts)} prompts ({tokens} tokens each)")
    cases = [_prepare(float_model, processor, p, tokens) for p in prompts]
    reference = [_next_token_logprobs(float_model, c) for c in cases]
    mx.eval(reference)
    size = _folder_bytes(resolve_model_path(model_path))
    float_row = QuantResult(
        "float", size, 0.0, 0.0, 1.0, _decode_tps(float_model, processor, prompts[0], decode_tokens)
    )
    rows = [float_row]
    del float_model
    for i, mode in enumerate(modes, 1):
        with tempfile.TemporaryDirectory(prefix="vlm-eval-quant-") as tmp:
            say(f"[{i}/{len(modes)}] {mode.name}: converting")
            options = ConvertOptions(quantize=mode.quantize, recipe=mode.recipe)
            report = convert(model_path, Path(tmp) / mode.name.replace(":", "-"), options)
            model, _ = load(report.destination)
            say(f"[{i}/{len(modes)}] {mode.name}: scoring {sum(len(c.continuation) for c in cases)} positions")
            candidate = [_next_token_logprobs(model, c) for c in cases]
            mean_kl, max_kl, top1 = compare(reference, candidate)
            say(f"[{i}/{len(modes)}] {mode.name}: timing decode ({decode_tokens} tokens)")
            rows.append(
                QuantResult(
                    mode.name,
                    _folder_bytes(report.destination),
                    mean_kl,
                    max_kl,
                    top1,
                    _decode_tps(model, processor, prompts[0], decode_tokens),
                    len(report.quantized),
                    len(report.kept_float),
                )
            )
    return rows


def format_table(rows: Sequence[QuantResult]) -> str:
    base = rows[0].size_bytes
    lines = [
        f"{'mode':<20} {'size MB':>8} {'vs float':>8} {'mean KL':>9} {'max KL':>9} {'top-1':>7} {'decode tok/s':>12}"
    ]
    for r in rows:
        lines.append(
            f"{r.mode:<20} {r.size_bytes / 1e6:>8.3f} {r.size_bytes / base:>8.3f} {r.mean_kl:>9.5f} {r.max_kl:>9.5f} "
            f"{r.top1_agreement:>7.1%} {r.decode_tps:>12.1f}"
        )
    return "\n".join(lines)


def _shown(path: str | Path) -> str:
    """A path relative to the working folder where it lies inside it (a report written in a repo stays portable)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else str(path)


def report_json(model: str, prompts: Sequence[EvalPrompt], tokens: int, rows: Sequence[QuantResult]) -> dict[str, Any]:
    return {
        "model": _shown(model) if Path(model).exists() else model,
        "prompts": [{"prompt": p.prompt, "images": [_shown(i) for i in p.images]} for p in prompts],
        "teacher_forced_tokens_per_prompt": tokens,
        "device": str(mx.default_device()),
        "results": [asdict(r) for r in rows],
    }


def progress_to_stderr(line: str) -> None:
    print(f"eval-quant: {line}", file=sys.stderr, flush=True)
