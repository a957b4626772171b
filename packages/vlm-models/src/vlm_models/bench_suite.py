"""``vlm bench --suite``: the measurements a user compares models and machines by, in one run.

For one checkpoint (a folder, or a random one of a real shape from ``bench_shapes``):

* vision encode: seconds to embed a prompt with one synthetic image per size (448² and 1344² by default);
* prefill: prompt tok/s and time to first token for text prompts of 512 and 8,192 tokens;
* decode: tok/s at batch 1 (one 448² image, greedy, EOS ignored) and aggregate generated tok/s of the batching
  engine at batch 8 and 32 (prefill included, as a server sees it);
* peak memory of each measurement.

Each figure is the median of ``runs`` timed runs after ``warmup`` untimed ones (the first run of a shape
compiles kernels). With ``--peer mlx-vlm``, batch-1 decode is also timed through mlx-vlm on the same checkpoint,
in this process, alternating run by run, and the ratio of the medians is reported; mlx-vlm is never a dependency
(it is imported only then, from the running Python).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

__all__ = ["SuiteOptions", "SuiteResult", "check_peer", "format_suite", "run_suite"]

_WORDS = (
    "the river runs past a red barn where three horses stand near a wooden fence under a grey morning sky while "
    "birds sing in tall trees and a farmer walks along the muddy path carrying two buckets of fresh water"
).split()


@dataclass(frozen=True)
class SuiteOptions:
    image_sizes: tuple[int, ...] = (448, 1344)
    prefill_tokens: tuple[int, ...] = (512, 8192)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    decode_tokens: int = 128
    runs: int = 3
    warmup: int = 1
    peer: str | None = None
    """"mlx-vlm": time batch-1 decode through it too, alternating."""


@dataclass
class SuiteResult:
    model: str
    device: str
    mlx: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    """One per measurement: name, value, unit, peak_gb, and its own details."""

    def add(self, name: str, value: float, unit: str, peak_gb: float, **details: Any) -> None:
        self.rows.append({"name": name, "value": value, "unit": unit, "peak_gb": peak_gb, **details})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def synthetic_image(size: int, seed: int = 0) -> Any:
    """A size x size RGB picture of smooth colour fields with noise (content does not change the cost)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    base = np.stack([x, y, (x + y) / 2], axis=-1) * 200 + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def text_of_tokens(processor: Any, n_tokens: int, salt: int = 0) -> str:
    """Plain words whose encoding is ``n_tokens`` tokens long (cut at a word, then topped up one word at a time)."""
    words: list[str] = []
    i = salt
    while len(processor.encode(" ".join(words))) < n_tokens:
        words.extend(_WORDS[(i + j) % len(_WORDS)] for j in range(64))
        i += 7
    while words and len(processor.encode(" ".join(words))) > n_tokens:
        words.pop()
    return " ".join(words)


def _timed_runs(options: SuiteOptions, once: Callable[[], float]) -> tuple[float, float]:
    """The median of ``once()``'s values over the timed runs, and the peak memory (GB) they reached."""
    values = []
    mx.reset_peak_memory()
    for run in range(options.warmup + options.runs):
        value = once()
        if run >= options.warmup:
            values.append(value)
    return statistics.median(values), mx.get_peak_memory() / 1e9


def run_suite(
    model: Any,
    processor: Any,
    model_name: str,
    options: SuiteOptions = SuiteOptions(),
    progress: Callable[[str], None] | None = None,
) -> SuiteResult:
    from vlm_runtime import batch_generate, stream_generate

    from .chat import apply_chat_template

    say = progress or (lambda _: None)
    result = SuiteResult(model_name, str(mx.default_device()), mx.__version__)
    image_prompt = apply_chat_template(processor, None, "Describe this image.", num_images=1)
    can_see = processor.image_processor is not None

    if can_see:
        for size in options.image_sizes:
            say(f"vision encode {size}x{size}")
            picture = synthetic_image(size)
            inputs = processor.prepare_inputs(image_prompt, [picture])

            def encode(inputs: Any = inputs) -> float:
                start = time.perf_counter()
                mx.eval(model.embed_prompt(**inputs).inputs_embeds)
                return time.perf_counter() - start

            seconds, peak = _timed_runs(options, encode)
            result.add(f"vision encode {size}x{size}", seconds, "s", peak, prompt_tokens=int(inputs["input_ids"].size))

    for n_tokens in options.prefill_tokens:
        say(f"prefill {n_tokens} tokens")
        texts = [text_of_tokens(processor, n_tokens, salt) for salt in range(options.warmup + options.runs)]
        speeds: list[float] = []
        firsts: list[float] = []

        def prefill_once(texts: list[str] = texts, speeds: list[float] = speeds, firsts: list[float] = firsts) -> float:
            start = time.perf_counter()
            stream = stream_generate(model, processor, texts[len(speeds)], max_tokens=1)
            event = next(iter(stream))
            first = time.perf_counter() - start
            for _ in stream:
                pass
            speeds.append(event.prompt_tokens / first)
            firsts.append(first)
            return speeds[-1]

        tps, peak = _timed_runs(options, prefill_once)
        ttft = statistics.median(firsts[options.warmup :])
        result.add(f"prefill {n_tokens} tokens", tps, "tok/s", peak, time_to_first_token_s=ttft)

    for batch in options.batch_sizes:
        say(f"decode at batch {batch}")
        if batch == 1:

            def decode_once() -> float:
                last = None
                images = [synthetic_image(448)] if can_see else None
                prompt = image_prompt if can_see else "Tell me a story."
                for last in stream_generate(  # noqa: B007
                    model, processor, prompt, image=images, max_tokens=options.decode_tokens, ignore_eos=True
                ):
                    pass
                assert last is not None
                return last.generation_tps

            tps, peak = _timed_runs(options, decode_once)
            result.add("decode batch 1", tps, "tok/s", peak, tokens=options.decode_tokens, image=can_see)
            if options.peer:
                result.rows[-1].update(_peer_decode(model_name, image_prompt if can_see else None, options, say))
            continue
        prompts = [
            apply_chat_template(processor, None, f"Question {i}: {text_of_tokens(processor, 32, i)}?")
            for i in range(batch)
        ]

        def batch_once(prompts: list[str] = prompts, batch: int = batch) -> float:
            start = time.perf_counter()
            results = batch_generate(
                model, processor, prompts, max_tokens=options.decode_tokens, ignore_eos=True, max_batch_size=batch
            )
            return sum(r.generation_tokens for r in results) / (time.perf_counter() - start)

        tps, peak = _timed_runs(options, batch_once)
        result.add(f"decode batch {batch}", tps, "tok/s", peak, tokens=options.decode_tokens, aggregate=True)
    return result


def check_peer(peer: str) -> None:
    """Raise RuntimeError (one line) unless ``peer`` can be imported here: asked before anything is measured."""
    if peer != "mlx-vlm":
        raise RuntimeError(f"unknown peer {peer!r}: only mlx-vlm")
    try:
        import mlx_vlm  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            f"--peer mlx-vlm needs mlx-vlm importable in this Python ({error}); it is never a dependency: install "
            "it in a scratch environment with this project's packages on PYTHONPATH"
        ) from None


def _peer_decode(model_name: str, prompt: str | None, options: SuiteOptions, say: Callable[[str], None]) -> dict:
    """Batch-1 decode through mlx-vlm on the same checkpoint, alternating with ours run by run."""
    check_peer(options.peer or "")
    import mlx_vlm
    from mlx_vlm import load as peer_load
    from mlx_vlm import stream_generate as peer_stream

    from vlm_runtime import stream_generate

    from .loading import load

    say(f"decode at batch 1 through mlx-vlm {mlx_vlm.__version__}, alternating")
    ours_model, ours_processor = load(model_name)
    peer_model, peer_processor = peer_load(model_name)
    _pad_peer_detokenizer(peer_processor, peer_model)
    text = prompt or "Tell me a story."
    images = [synthetic_image(448)] if prompt else None

    def timed(stream: Any) -> float:
        first = last = None
        n = 0
        for event in stream:
            if getattr(event, "token", None) is None:
                continue
            now = time.perf_counter()
            first = now if first is None else first
            last, n = now, n + 1
        return (n - 1) / (last - first) if n > 1 and last and first and last > first else 0.0

    ours_runs, peer_runs = [], []
    tokenizer = getattr(peer_processor, "tokenizer", peer_processor)
    for run in range(options.warmup + options.runs):
        ours = timed(
            stream_generate(
                ours_model, ours_processor, text, image=images, max_tokens=options.decode_tokens, ignore_eos=True
            )
        )
        tokenizer.stopping_criteria = lambda token: False  # exactly max_tokens, as ours with ignore_eos
        peer = timed(
            peer_stream(
                peer_model, peer_processor, text, image=images, max_tokens=options.decode_tokens, temperature=0.0
            )
        )
        if run >= options.warmup:
            ours_runs.append(ours)
            peer_runs.append(peer)
    ours_median, peer_median = statistics.median(ours_runs), statistics.median(peer_runs)
    return {
        "peer": f"mlx-vlm {mlx_vlm.__version__}",
        "ours_paired_tok_s": ours_median,
        "peer_tok_s": peer_median,
        "ratio_vs_peer": ours_median / peer_median if peer_median else None,
    }


def _pad_peer_detokenizer(processor: Any, model: Any) -> None:
    """mlx-vlm's streaming detokenizer indexes a list of the tokenizer's tokens; a random model's vocabulary is
    larger than its tokenizer, so ids past the list get a placeholder (trained weights never pick them)."""
    detokenizer = getattr(processor, "detokenizer", None)
    tokenmap = getattr(detokenizer, "tokenmap", None)
    config = getattr(model.config, "text_config", None) or model.config
    vocab = getattr(config, "vocab_size", None)
    if isinstance(tokenmap, list) and vocab and len(tokenmap) < vocab:
        tokenmap.extend(["?"] * (vocab - len(tokenmap)))


def format_suite(result: SuiteResult) -> str:
    lines = [
        f"model: {result.model} | {result.device} | mlx {result.mlx}",
        f"{'measurement':<26} {'value':>12}  {'unit':<6} {'peak GB':>8}  notes",
    ]
    for row in result.rows:
        notes = []
        if "time_to_first_token_s" in row:
            notes.append(f"time to first token {row['time_to_first_token_s']:.3f} s")
        if "prompt_tokens" in row:
            notes.append(f"{row['prompt_tokens']} prompt tokens")
        if row.get("aggregate"):
            notes.append("aggregate, prefill included")
        if row.get("ratio_vs_peer") is not None:
            notes.append(
                f"{row['peer']}: {row['peer_tok_s']:.1f} tok/s, ours paired {row['ours_paired_tok_s']:.1f} "
                f"({row['ratio_vs_peer']:.2f}x)"
            )
        value = f"{row['value']:.4f}" if row["unit"] == "s" else f"{row['value']:.1f}"
        lines.append(f"{row['name']:<26} {value:>12}  {row['unit']:<6} {row['peak_gb']:>8.3f}  {'; '.join(notes)}")
    return "\n".join(lines)
