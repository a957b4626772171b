"""The generation loop: chunked prefill, then double-buffered decode.

Double buffering: while Python hands token n to the caller, the device already computes token n+1
(``mx.async_eval``), so per-token Python overhead hides behind device work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import mlx.core as mx

from .cache import Cache
from .detokenizer import StreamingDetokenizer
from .protocols import GenerativeModel, PromptEmbedding, PromptProcessor
from .sampling import Sampler, SamplingParams, greedy, make_sampler

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "generate",
    "generate_step",
    "prefill",
    "stream_generate",
]


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 256
    prefill_step_size: int = 2048
    ignore_eos: bool = False
    """Generate exactly max_tokens (benchmarks)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be >= 1, got {self.prefill_step_size}")


@dataclass(frozen=True)
class GenerationResult:
    text: str
    """The text this token completed: may be empty while a character is still partial (the whole text for
    ``generate``)."""
    token: int | None
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory: float
    """Peak device memory in GB since the request started."""
    finish_reason: str | None = None
    """None while streaming; then "stop" (an EOS token) or "length" (max_tokens)."""


def _slice_positions(position_ids: mx.array | None, start: int, stop: int) -> mx.array | None:
    return None if position_ids is None else position_ids[..., start:stop]


def prefill(
    model: GenerativeModel, prompt: PromptEmbedding, cache: list[Cache], step_size: int
) -> mx.array:
    """Run the prompt through the decoder in chunks of ``step_size`` tokens; return the last position's logits.

    Chunking bounds the attention scores' memory on long prompts; evaluating each chunk before building the
    next keeps the graph small.
    """
    embeds, positions = prompt.inputs_embeds, prompt.position_ids
    length = embeds.shape[1]
    start = 0
    while length - start > step_size:
        stop = start + step_size
        model.hidden_states(
            embeds[:, start:stop],
            cache=cache,
            position_ids=_slice_positions(positions, start, stop),
            attention_mask=None if prompt.attention_mask is None else prompt.attention_mask[:, :stop],
        )
        mx.eval([c.state for c in cache])
        start = stop
    hidden = model.hidden_states(
        embeds[:, start:],
        cache=cache,
        position_ids=_slice_positions(positions, start, length),
        attention_mask=prompt.attention_mask,
    )
    return model.compute_logits(hidden[:, -1, :])


def _decode_logits(model: GenerativeModel, tokens: mx.array, cache: list[Cache]) -> mx.array:
    hidden = model.hidden_states(model.embed_tokens(tokens[:, None]), cache=cache)
    return model.compute_logits(hidden[:, -1, :])


def _sample(sampler: Sampler, logits: mx.array) -> tuple[mx.array, mx.array]:
    if sampler is greedy:
        # argmax needs no normalisation; the log-softmax is left lazy and costs nothing unless read.
        return mx.argmax(logits, axis=-1), logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sampler(logprobs), logprobs


def generate_step(
    model: GenerativeModel,
    inputs: dict[str, mx.array],
    *,
    sampler: Sampler,
    config: GenerationConfig = GenerationConfig(),
    cache: list[Cache] | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) for up to ``config.max_tokens`` tokens. Stops only on the count; callers stop
    on EOS by closing the generator."""
    if config.max_tokens == 0:
        return
    if cache is None:
        cache = model.make_cache()
    logits = prefill(model, model.embed_prompt(**inputs), cache, config.prefill_step_size)
    token, logprobs = _sample(sampler, logits)
    mx.async_eval(token)
    produced = 0
    while True:
        produced += 1
        if produced < config.max_tokens:
            next_token, next_logprobs = _sample(sampler, _decode_logits(model, token, cache))
            mx.async_eval(next_token)
        yield token.item(), logprobs
        if produced == config.max_tokens:
            return
        token, logprobs = next_token, next_logprobs


def _as_list(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def stream_generate(
    model: GenerativeModel,
    processor: PromptProcessor,
    prompt: str,
    *,
    image: Any = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    prefill_step_size: int = 2048,
    ignore_eos: bool = False,
) -> Iterator[GenerationResult]:
    """Generate from an already chat-formatted ``prompt``; yield one result per generated token.

    ``image`` is one image or a list (paths, URLs, PIL images), in the order of the prompt's image slots.
    """
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    config = GenerationConfig(max_tokens=max_tokens, prefill_step_size=prefill_step_size, ignore_eos=ignore_eos)
    inputs = processor.prepare_inputs(prompt, images=_as_list(image))
    yield from _stream(model, processor, inputs, sampling, config)


def _stream(
    model: GenerativeModel,
    processor: PromptProcessor,
    inputs: dict[str, mx.array],
    sampling: SamplingParams,
    config: GenerationConfig,
) -> Iterator[GenerationResult]:
    prompt_tokens = int(inputs["input_ids"].size)
    detokenizer = StreamingDetokenizer(processor.decode)
    eos = frozenset() if config.ignore_eos else processor.eos_token_ids
    mx.reset_peak_memory()
    started = time.perf_counter()
    first_token_at = started
    prompt_tps = 0.0
    count = 0

    def result(text: str, token: int | None, finish: str | None) -> GenerationResult:
        decode_time = time.perf_counter() - first_token_at
        return GenerationResult(
            text=text,
            token=token,
            prompt_tokens=prompt_tokens,
            generation_tokens=count,
            prompt_tps=prompt_tps,
            generation_tps=(count - 1) / decode_time if count > 1 and decode_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
        )

    steps = generate_step(model, inputs, sampler=make_sampler(sampling), config=config)
    for token, _ in steps:
        if count == 0:
            first_token_at = time.perf_counter()
            prompt_tps = prompt_tokens / (first_token_at - started)
        if token in eos:
            steps.close()
            yield result(detokenizer.finalize(), token, "stop")
            return
        count += 1
        text = detokenizer.add_token(token)
        if count == config.max_tokens:
            yield result(text + detokenizer.finalize(), token, "length")
            return
        yield result(text, token, None)
    # max_tokens == 0: nothing generated.
    yield result("", None, "length")


def generate(
    model: GenerativeModel,
    processor: PromptProcessor,
    prompt: str,
    **options: Any,
) -> GenerationResult:
    """Run ``stream_generate`` to the end and return one result holding the whole text.

    Takes the same keyword options as ``stream_generate``.
    """
    parts: list[str] = []
    last: GenerationResult | None = None
    for last in stream_generate(model, processor, prompt, **options):
        parts.append(last.text)
    assert last is not None  # stream_generate always yields a final result
    return replace(last, text="".join(parts))
