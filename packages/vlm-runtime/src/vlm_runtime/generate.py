"""The generation loop: chunked prefill, then double-buffered decode.

Double buffering: while Python hands token n to the caller, the device already computes token n+1
(``mx.async_eval``), so per-token Python overhead hides behind device work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import numpy as np

from .cache import Cache
from .cache_settings import CacheSettings, make_prompt_cache
from .prompt_cache import PromptCache, media_key
from .protocols import GenerativeModel, PromptEmbedding, PromptProcessor
from .sampling import (
    LogitsProcessor,
    Sampler,
    SamplingParams,
    greedy,
    make_logits_processors,
    make_sampler,
    top_logprobs,
)
from .text_output import TextDelta, TextOutput
from .thinking import ThinkingBudget, ThinkingConfig, prompt_opens_thinking, resolve_thinking_tokens

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "GenerationSettings",
    "generation_settings",
    "generate",
    "generate_step",
    "prefill",
    "run_generation",
    "stream_generate",
]

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 256
    prefill_step_size: int = 2048
    ignore_eos: bool = False
    """Generate exactly max_tokens (benchmarks)."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; they are never part of the text."""
    logprobs: bool = False
    """Report each token's log-probability (under the distribution after penalties, before temperature)."""
    top_logprobs: int = 0
    """Also report this many most likely alternatives per token (0 to 20; implies logprobs)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be >= 1, got {self.prefill_step_size}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0


@dataclass(frozen=True)
class GenerationResult:
    text: str
    """The answer text this token completed: may be empty while a character or a possible stop string is held
    back (the whole answer for ``generate``)."""
    token: int | None
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory: float
    """Peak device memory in GB since the request started."""
    finish_reason: str | None = None
    """None while streaming; then "stop" (an EOS token or a stop string) or "length" (max_tokens)."""
    reasoning: str = ""
    """Text inside the thinking block that this token completed (all of it for ``generate``)."""
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    """(token, logprob) alternatives, most likely first."""
    cached_tokens: int = 0
    """Prompt tokens reused from the prompt cache instead of being computed."""


def _slice_positions(position_ids: mx.array | None, start: int, stop: int) -> mx.array | None:
    return None if position_ids is None else position_ids[..., start:stop]


def prefill(model: GenerativeModel, prompt: PromptEmbedding, cache: list[Cache], step_size: int) -> mx.array:
    """Run the prompt through the decoder in chunks of ``step_size`` tokens; return the last position's logits.

    Chunking bounds the attention scores' memory on long prompts; evaluating each chunk before building the
    next keeps the graph small.
    """
    embeds, positions, groups = prompt.inputs_embeds, prompt.position_ids, prompt.attention_groups
    length = embeds.shape[1]
    start = 0
    while length - start > step_size:
        stop = _chunk_end(groups, start + step_size)
        if stop >= length:
            break
        model.hidden_states(
            embeds[:, start:stop],
            cache=cache,
            position_ids=_slice_positions(positions, start, stop),
            attention_mask=None if prompt.attention_mask is None else prompt.attention_mask[:, :stop],
            **_groups_slice(groups, start, stop),
        )
        mx.eval([c.state for c in cache])
        start = stop
    hidden = model.hidden_states(
        embeds[:, start:],
        cache=cache,
        position_ids=_slice_positions(positions, start, length),
        attention_mask=prompt.attention_mask,
        **_groups_slice(groups, start, length),
    )
    return model.compute_logits(hidden[:, -1, :])


def _chunk_end(groups: mx.array | None, stop: int) -> int:
    """Move a chunk boundary past any bidirectional group it would split: the group's early tokens must see
    its later ones, so a group is prefilled in one piece."""
    if groups is None:
        return stop
    row = np.asarray(groups)
    while stop < row.shape[1] and ((row[:, stop] >= 0) & (row[:, stop] == row[:, stop - 1])).any():
        stop += 1
    return stop


def _groups_slice(groups: mx.array | None, start: int, stop: int) -> dict[str, mx.array]:
    return {} if groups is None else {"attention_groups": groups[:, start:stop]}


def embed(model: GenerativeModel, inputs: dict[str, mx.array], vision_cache: Any = None) -> PromptEmbedding:
    """``model.embed_prompt``, handing it the vision feature cache where one is given."""
    if vision_cache is None:
        return model.embed_prompt(**inputs)
    return model.embed_prompt(**inputs, vision_cache=vision_cache)


def drop_prefix(prompt: PromptEmbedding, n: int) -> PromptEmbedding:
    """The prompt without its first ``n`` tokens (those a prompt cache already holds)."""
    if n == 0:
        return prompt
    mask = prompt.attention_mask
    length = prompt.inputs_embeds.shape[1]
    return PromptEmbedding(
        prompt.inputs_embeds[:, n:],
        _slice_positions(prompt.position_ids, n, length),
        mask,
        None if prompt.attention_groups is None else prompt.attention_groups[:, n:length],
    )


def _decode_logits(model: GenerativeModel, tokens: mx.array, cache: list[Cache]) -> mx.array:
    hidden = model.hidden_states(model.embed_tokens(tokens[:, None]), cache=cache)
    return model.compute_logits(hidden[:, -1, :])


def _sample(sampler: Sampler, logits: mx.array) -> tuple[mx.array, mx.array]:
    if sampler is greedy:
        # argmax needs no normalisation; the log-softmax is left lazy and costs nothing unless read.
        return mx.argmax(logits, axis=-1), logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sampler(logprobs), logprobs


TokenOverride = Callable[[int | None], int | None]
"""Called with each emitted token (None before the first); returns a token to emit next instead of the model's
choice, or None. The thinking budget uses it to close the block."""


def generate_step(
    model: GenerativeModel,
    inputs: dict[str, mx.array],
    *,
    sampler: Sampler,
    config: GenerationConfig = GenerationConfig(),
    cache: list[Cache] | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    override: TokenOverride | None = None,
    vision_cache: Any = None,
    cached_prefix: int = 0,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) for up to ``config.max_tokens`` tokens. Stops only on the count; callers stop
    on EOS by closing the generator.

    ``cached_prefix``: how many leading prompt tokens ``cache`` already holds; only the rest is computed.
    """
    if config.max_tokens == 0:
        return
    if cache is None:
        cache = model.make_cache()
    history = inputs["input_ids"].astype(mx.int32) if logits_processors else None
    generated = 0

    def next_token(logits: mx.array) -> tuple[mx.array, mx.array]:
        for process in logits_processors:
            logits = process(logits, history, generated)
        token, logprobs = _sample(sampler, logits)
        if config.wants_logprobs:
            mx.async_eval(token, logprobs)
        else:
            mx.async_eval(token)
        return token, logprobs

    prompt = drop_prefix(embed(model, inputs, vision_cache), cached_prefix)
    token, logprobs = next_token(prefill(model, prompt, cache, config.prefill_step_size))
    forced = override(None) if override is not None else None
    while True:
        if forced is not None:
            token = mx.array([forced], mx.int32)
        generated += 1
        if history is not None:
            history = mx.concatenate([history, token[:, None].astype(mx.int32)], axis=1)
        if generated < config.max_tokens:
            # Queued before the caller sees this token: the device works while Python handles it.
            next_pair = next_token(_decode_logits(model, token, cache))
        value = token.item()
        yield value, logprobs
        if generated == config.max_tokens:
            return
        forced = override(value) if override is not None else None
        token, logprobs = next_pair


def _as_list(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


@dataclass(frozen=True)
class GenerationSettings:
    """The keyword options of ``stream_generate``, sorted into the typed settings the runtime passes around."""

    sampling: SamplingParams
    config: GenerationConfig
    thinking: ThinkingConfig
    cache: CacheSettings


def generation_settings(
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    repetition_context_size: int = 20,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int, float] | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
    logprobs: bool = False,
    top_logprobs: int = 0,
    thinking_budget: int | None = None,
    thinking_start_token: str = "<think>",
    thinking_end_token: str = "</think>",
    max_kv_size: int | None = None,
    kv_bits: float | None = None,
    kv_group_size: int = 64,
    kv_quant_scheme: str = "affine",
    kv_key_bits: float | None = None,
    kv_value_bits: float | None = None,
    prefill_step_size: int = 2048,
    ignore_eos: bool = False,
) -> GenerationSettings:
    """Validate the familiar keyword options once; an unknown name is a TypeError, a bad value a ValueError."""
    return GenerationSettings(
        sampling=SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            repetition_context_size=repetition_context_size,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logit_bias=logit_bias,
            seed=seed,
        ),
        config=GenerationConfig(
            max_tokens=max_tokens,
            prefill_step_size=prefill_step_size,
            ignore_eos=ignore_eos,
            stop=stop,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        ),
        thinking=ThinkingConfig(thinking_budget, thinking_start_token, thinking_end_token),
        cache=CacheSettings(
            max_kv_size, kv_bits, kv_group_size, kv_quant_scheme, kv_key_bits=kv_key_bits, kv_value_bits=kv_value_bits
        ),
    )


def stream_generate(
    model: GenerativeModel,
    processor: PromptProcessor,
    prompt: str,
    *,
    image: Any = None,
    videos: Any = None,
    video_sampling: Any = None,
    prompt_cache: PromptCache | None = None,
    vision_cache: Any = None,
    **options: Any,
) -> Iterator[GenerationResult]:
    """Generate from an already chat-formatted ``prompt``; yield one result per generated token.

    ``image`` is one image or a list (paths, URLs, PIL images), in the order of the prompt's image slots;
    ``videos`` likewise fill its video slots, sampled as ``video_sampling`` says (both go to the processor,
    whose family must take video).
    ``prompt_cache`` (a ``PromptCache``) is reused where it holds a prefix of this prompt and is left holding
    this conversation afterwards; ``vision_cache`` (a ``VisionFeatureCache``) skips the vision tower for images
    seen before. ``options`` are those of ``generation_settings``: sampling (temperature, top_p, top_k, min_p,
    penalties, logit_bias, seed), length and stopping (max_tokens, stop, ignore_eos), logprobs, the thinking
    budget, and the KV cache (max_kv_size, kv_bits, kv_group_size, kv_quant_scheme, kv_key_bits, kv_value_bits).
    """
    settings = generation_settings(**options)
    media: dict[str, Any] = {"images": _as_list(image)}
    if videos is not None or video_sampling is not None:  # only then: processors without video keep working
        media.update(videos=_as_list(videos), video_sampling=video_sampling)
    inputs = processor.prepare_inputs(prompt, **media)
    yield from run_generation(
        model,
        processor,
        inputs,
        settings,
        prompt_cache=prompt_cache,
        vision_cache=vision_cache,
    )


def run_generation(
    model: GenerativeModel,
    processor: PromptProcessor,
    inputs: dict[str, mx.array],
    settings: GenerationSettings,
    *,
    prompt_cache: PromptCache | None = None,
    vision_cache: Any = None,
) -> Iterator[GenerationResult]:
    """``stream_generate`` on already prepared inputs, with the options as typed settings."""
    sampling, config, thinking = settings.sampling, settings.config, settings.thinking
    cache_settings = settings.cache
    prompt_ids = inputs["input_ids"]
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] != 1:
        raise ValueError("stream_generate takes one prompt; use batch_generate for several")
    prompt_list = prompt_ids[0].tolist()
    prompt_tokens = len(prompt_list)
    marks = resolve_thinking_tokens(thinking, processor.encode) if hasattr(processor, "encode") else None
    if marks is None and thinking.budget is not None:
        raise ValueError("a thinking budget needs a processor with encode() to find the thinking tokens")
    inside = marks is not None and prompt_opens_thinking(prompt_list, marks)
    text = TextOutput(processor.decode, thinking=marks, inside_thinking=inside, stop=config.stop)
    budget = None
    if marks is not None and thinking.budget is not None:
        budget = ThinkingBudget(marks, thinking.budget, inside=inside)
    eos = frozenset() if config.ignore_eos else processor.eos_token_ids

    if prompt_cache is None:
        cache, reused = make_prompt_cache(model, cache_settings), 0
    else:
        media = media_key(inputs)
        cache, reused = prompt_cache.reuse(model, cache_settings, prompt_list, media)

    mx.reset_peak_memory()
    started = time.perf_counter()
    first_token_at = started
    prompt_tps = 0.0
    count = 0
    fed: list[int] = []

    def result(delta: TextDelta, token: int | None, finish: str | None, lp: Any = None) -> GenerationResult:
        decode_time = time.perf_counter() - first_token_at
        chosen, top = lp if lp is not None else (None, ())
        return GenerationResult(
            text=delta.text,
            token=token,
            prompt_tokens=prompt_tokens,
            generation_tokens=count,
            prompt_tps=prompt_tps,
            generation_tps=(count - 1) / decode_time if count > 1 and decode_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            reasoning=delta.reasoning,
            logprob=chosen,
            top_logprobs=top,
            cached_tokens=reused,
        )

    steps = generate_step(
        model,
        inputs,
        sampler=make_sampler(sampling),
        config=config,
        cache=cache,
        logits_processors=make_logits_processors(sampling),
        override=budget,
        vision_cache=vision_cache,
        cached_prefix=reused,
    )
    try:
        for token, logprobs in steps:
            if count == 0:
                first_token_at = time.perf_counter()
                prompt_tps = (prompt_tokens - reused) / (first_token_at - started)
            fed.append(token)
            lp = _read_logprobs(logprobs, token, config) if config.wants_logprobs else None
            if token in eos:
                yield result(text.finish(), token, "stop", lp)
                return
            count += 1
            delta = text.add(token)
            if delta.stopped:
                yield result(delta, token, "stop", lp)
                return
            if count == config.max_tokens:
                yield result(_merge(delta, text.finish()), token, "length", lp)
                return
            yield result(delta, token, None, lp)
        # max_tokens == 0: nothing generated.
        yield result(TextDelta(), None, "length")
    finally:
        steps.close()
        if prompt_cache is not None:
            prompt_cache.record(cache, prompt_list + fed, media)


def _merge(a: TextDelta, b: TextDelta) -> TextDelta:
    return TextDelta(a.text + b.text, a.reasoning + b.reasoning, a.stopped or b.stopped)


def _read_logprobs(logprobs: mx.array, token: int, config: GenerationConfig) -> tuple[float, tuple]:
    chosen = logprobs[0, token].item()
    if config.top_logprobs == 0:
        return chosen, ()
    ids, values = top_logprobs(logprobs, config.top_logprobs)
    return chosen, tuple(zip(ids[0].tolist(), values[0].tolist()))


def generate(
    model: GenerativeModel,
    processor: PromptProcessor,
    prompt: str,
    **options: Any,
) -> GenerationResult:
    """Run ``stream_generate`` to the end and return one result holding the whole text and reasoning.

    Takes the same keyword options as ``stream_generate``; ``logprob``/``top_logprobs`` are the last token's.
    """
    parts: list[str] = []
    thoughts: list[str] = []
    last: GenerationResult | None = None
    for last in stream_generate(model, processor, prompt, **options):
        parts.append(last.text)
        thoughts.append(last.reasoning)
    assert last is not None  # stream_generate always yields a final result
    return replace(last, text="".join(parts), reasoning="".join(thoughts))
