"""The single-stream generation loop: chunked prefill, then double-buffered decode.

Double buffering: while Python hands token n to the caller, the device already computes token n+1
(``mx.async_eval``), so per-token Python overhead hides behind device work. The rules a request follows per
token (end of sequence, stop strings, length, thinking budget, logprobs) live in ``request.RequestState``,
which the batch engine drives too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import mlx.core as mx

from .cache import Cache
from .cache_settings import CacheSettings, make_layer_caches
from .compiled_decode import CAPACITY_STEP, CompiledDecode, compiled_decode
from .prefill import drop_prefix, prefill, prefill_with_layers
from .prefix_cache import PrefixCache, PrefixMatch
from .prompt_cache import PromptCache, media_key
from .protocols import GenerativeModel, PromptEmbedding, PromptProcessor
from .request import GenerationConfig, GenerationResult, Request, RequestState
from .sampling import LogitsProcessor, Sampler, process_and_sample
from .settings import GenerationSettings, generation_settings
from .speculative import (
    Drafter,
    DraftSchedule,
    ModelDrafter,
    SpeculativeStats,
    refuse_blind_target,
    refuse_untrimmable,
    speculative_step,
)

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "GenerationSettings",
    "generate",
    "generate_step",
    "generation_settings",
    "media_list",
    "prefill",
    "run_generation",
    "stream_generate",
]


def _decode_logits(model: GenerativeModel, tokens: mx.array, cache: list[Cache]) -> mx.array:
    hidden = model.hidden_states(model.embed_tokens(tokens[:, None]), cache=cache)
    return model.compute_logits(hidden[:, -1, :])


TokenOverride = Callable[[int | None], int | None]
"""Called with each emitted token (None before the first); returns a token to emit next instead of the model's
choice, or None. The thinking budget uses it to close the block."""


def generate_step(
    model: GenerativeModel,
    inputs: Mapping[str, mx.array],
    *,
    sampler: Sampler,
    config: GenerationConfig = GenerationConfig(),
    cache: list[Cache] | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    override: TokenOverride | None = None,
    vision_cache: Any = None,
    cached_prefix: int = 0,
    embedded: PromptEmbedding | None = None,
    on_prefilled: Callable[[], None] | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) for up to ``config.max_tokens`` tokens. Stops only on the count; callers stop
    on EOS by closing the generator.

    ``cached_prefix``: how many leading prompt tokens ``cache`` already holds; only the rest is computed.
    ``embedded``: the prompt already embedded (else it is embedded here); ``on_prefilled`` runs once the
    prompt is in ``cache``, before decoding (the prefix cache keeps its blocks then).
    """
    if config.max_tokens == 0:
        return
    if cache is None:
        cache = model.make_cache()
    history = inputs["input_ids"].astype(mx.int32) if logits_processors else None
    generated = 0

    def next_token(logits: mx.array) -> tuple[mx.array, mx.array]:
        token, logprobs = process_and_sample(logits, logits_processors, history, generated, sampler)
        if config.wants_logprobs:
            mx.async_eval(token, logprobs)
        else:
            mx.async_eval(token)
        return token, logprobs

    if embedded is None:
        embedded = model.embed_prompt(vision_cache=vision_cache, **inputs)
    token, logprobs = next_token(prefill(model, drop_prefix(embedded, cached_prefix), cache, config.prefill_step_size))
    if on_prefilled is not None:
        on_prefilled()
    decode = _decoder(model, cache, config)
    forced = override(None) if override is not None else None
    try:
        while True:
            if forced is not None:
                token = mx.array([forced], mx.int32)
            generated += 1
            if history is not None:
                history = mx.concatenate([history, token[:, None].astype(mx.int32)], axis=1)
            if generated < config.max_tokens:
                # Queued before the caller sees this token: the device works while Python handles it.
                next_pair = next_token(decode(token))
            value = token.item()
            yield value, logprobs
            if generated == config.max_tokens:
                return
            forced = override(value) if override is not None else None
            token, logprobs = next_pair
    finally:
        decode.finish()


class _Decoder:
    """The decode step of one generation: compiled over static caches where every layer has a static twin,
    else the plain graph over the caches themselves."""

    def __init__(
        self, model: GenerativeModel, cache: list[Cache], compiled: CompiledDecode | None, remaining: int
    ) -> None:
        self.model, self.cache, self.compiled = model, cache, compiled
        self.remaining = remaining
        """Decode steps the generation may still ask for (its max_tokens)."""

    def __call__(self, token: mx.array) -> mx.array:
        self.remaining -= 1
        if self.compiled is not None and self.compiled.room == 0:
            # The buffers are sized a bucket at a time (attention reads all of them every step): grow by one.
            self.compiled.write_back(self.cache)
            self.compiled = compiled_decode(self.model, self.cache, _capacity(self.cache, self.remaining + 1))
        if self.compiled is not None:
            try:
                return self.compiled(token)
            except Exception as exc:  # a layer the static caches cannot serve shows up when the step is traced
                if self.compiled.steps_taken:
                    raise
                self.compiled.give_up(exc)
                self.compiled = None
        return _decode_logits(self.model, token, self.cache)

    def finish(self) -> None:
        """Hand the decoded tokens back to the caches (the prompt cache may keep them)."""
        if self.compiled is not None:
            self.compiled.write_back(self.cache)


def _decoder(model: GenerativeModel, cache: list[Cache], config: GenerationConfig) -> _Decoder:
    compiled = None
    wanted = config.compile_decode if config.compile_decode is not None else mx.default_device() == mx.cpu
    if wanted and config.max_tokens > 1 and cache:
        compiled = compiled_decode(model, cache, _capacity(cache, config.max_tokens))
    return _Decoder(model, cache, compiled, config.max_tokens)


def _capacity(cache: list[Cache], tokens: int) -> int:
    """Static buffers for the next ``tokens`` decode steps, at most one bucket beyond what the caches hold: a
    generation allowed 100k tokens that stops after 50 must not attend over 100k empty slots each step."""
    return cache[0].offset + min(tokens, CAPACITY_STEP)


def media_list(media: Any) -> list[Any]:
    """One image (or video) or a list of them, as a list; None as an empty one."""
    if media is None:
        return []
    if isinstance(media, (list, tuple)):
        return list(media)
    return [media]


def stream_generate(
    model: GenerativeModel,
    processor: PromptProcessor,
    prompt: str,
    *,
    image: Any = None,
    videos: Any = None,
    video_sampling: Any = None,
    audio: Any = None,
    audios: Any = None,
    prompt_cache: PromptCache | None = None,
    prefix_cache: PrefixCache | None = None,
    prefix_cache_tenant: str = "",
    vision_cache: Any = None,
    draft_model: Any = None,
    settings: GenerationSettings | None = None,
    **options: Any,
) -> Iterator[GenerationResult]:
    """Generate from an already chat-formatted ``prompt``; yield one result per generated token.

    ``image`` is one image or a list (paths, URLs, PIL images), in the order of the prompt's image slots;
    ``videos`` likewise fill its video slots, sampled as ``video_sampling`` says (the processor's family must
    take video); ``audio`` (one clip or a list) or ``audios`` fill its audio slots (files, their bytes or
    samples; the family must hear). ``prompt_cache`` (a ``PromptCache``) is reused where it holds a prefix of
    this prompt and is left holding this conversation afterwards; ``prefix_cache`` (a ``PrefixCache``, shared
    by any number of conversations) reuses the longest run of whole blocks computed before for the same
    content (images included) under the same ``prefix_cache_tenant``, and keeps this prompt's; ``vision_cache`` (a ``VisionFeatureCache``)
    skips the vision tower for images seen before. How to generate is ``settings`` (a ``GenerationSettings``),
    with any keyword ``options`` applied on top (``vlm_runtime.settings.generation_settings`` lists them:
    sampling, length and stopping, logprobs, the thinking budget, the KV cache). ``draft_model`` (a
    ``speculative.Drafter``, or a smaller model sharing the target's tokenizer) turns on speculative decoding:
    the same tokens (greedy) or the same distribution (sampling), faster where the drafter agrees with the
    target; ``num_draft_tokens`` bounds each draft.
    """
    settings = generation_settings(settings, **options)
    inputs = processor.prepare_inputs(
        prompt, media_list(image), media_list(videos), video_sampling, media_list(audio) + media_list(audios)
    )
    yield from run_generation(
        model,
        processor,
        replace(settings.request(inputs), prefix_cache_tenant=prefix_cache_tenant),
        settings.cache,
        prompt_cache=prompt_cache,
        prefix_cache=prefix_cache,
        vision_cache=vision_cache,
        drafter=as_drafter(draft_model),
    )


def as_drafter(draft: Any) -> Drafter | None:
    """A ``Drafter`` as is; a model (anything with ``make_cache``) as the ``draft`` kind; None as None."""
    if draft is None or callable(getattr(draft, "propose", None)):
        return draft
    return ModelDrafter(draft)


def run_generation(
    model: GenerativeModel,
    processor: PromptProcessor,
    request: Request,
    cache_settings: CacheSettings = CacheSettings(),
    *,
    prompt_cache: PromptCache | None = None,
    prefix_cache: PrefixCache | None = None,
    vision_cache: Any = None,
    drafter: Drafter | None = None,
) -> Iterator[GenerationResult]:
    """``stream_generate`` for a prepared ``Request``, its KV cache stored as ``cache_settings`` say; with a
    ``drafter``, decoded speculatively."""
    inputs, config = request.inputs, request.config
    prompt_list = request.prompt_ids
    if prompt_cache is not None and prefix_cache is not None:
        raise ValueError("pass prompt_cache (one conversation) or prefix_cache (shared blocks), not both")
    mx.reset_peak_memory()
    state = RequestState.start(request, processor)  # the clock starts here, before any embedding or lookup
    embedded, match = None, None
    if prefix_cache is not None:
        embedded = model.embed_prompt(vision_cache=vision_cache, **inputs)
        match = prefix_cache.lookup(model, cache_settings, prompt_list, inputs, embedded, request.prefix_cache_tenant)
        cache, reused = match.layers, match.cached_tokens
    elif prompt_cache is None:
        cache, reused = make_layer_caches(model, cache_settings), 0
    else:
        media = media_key(inputs)
        cache, reused = prompt_cache.reuse(model, cache_settings, prompt_list, media)
    state.cached_tokens = reused
    on_prefilled = None if match is None else lambda: _keep_prefix(prefix_cache, match, cache)
    fed: list[int] = []
    if drafter is None:
        steps = generate_step(
            model,
            inputs,
            sampler=state.sampler,
            config=config,
            cache=cache,
            logits_processors=state.processors,
            override=state.budget,
            vision_cache=vision_cache,
            cached_prefix=reused,
            embedded=embedded,
            on_prefilled=on_prefilled,
        )
    else:
        state.draft_stats = SpeculativeStats()
        steps = _speculative(model, drafter, request, state, cache, vision_cache, reused, embedded, on_prefilled)
    try:
        for token, logprobs in steps:
            fed.append(token)
            event = state.emit(token, logprobs)
            yield event
            if state.finish is not None:
                return
        yield state.end("length")  # max_tokens == 0: nothing generated
    finally:
        steps.close()
        if prompt_cache is not None:
            prompt_cache.record(cache, prompt_list + fed, media)
        if match is not None:
            prefix_cache.release(match)  # type: ignore[union-attr]


def _keep_prefix(prefix_cache: PrefixCache, match: PrefixMatch, cache: list[Cache]) -> None:
    prefix_cache.store(match, cache)
    prefix_cache.release(match)


def _speculative(
    model: GenerativeModel,
    drafter: Drafter,
    request: Request,
    state: RequestState,
    cache: list[Cache],
    vision_cache: Any,
    cached_prefix: int,
    embedded: PromptEmbedding | None = None,
    on_prefilled: Callable[[], None] | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Prefill, choose the first token as plain decoding does, then decode speculatively."""
    inputs, config = request.inputs, request.config
    if config.max_tokens == 0:
        return
    refuse_untrimmable(cache)
    refuse_blind_target(model, drafter)
    if embedded is None:
        embedded = model.embed_prompt(vision_cache=vision_cache, **inputs)
    logits, features = prefill_with_layers(
        model, drop_prefix(embedded, cached_prefix), cache, config.prefill_step_size, drafter.target_layers
    )
    if on_prefilled is not None:
        on_prefilled()
    history = inputs["input_ids"].astype(mx.int32)
    first = process_and_sample(logits, state.processors, history, 0, state.sampler)
    yield from speculative_step(
        model,
        drafter,
        inputs,
        first,
        cache=cache,
        config=config,
        sampling=request.sampling,
        sampler=state.sampler,
        logits_processors=state.processors,
        override=state.budget,
        schedule=DraftSchedule(most=config.num_draft_tokens),
        stats=state.draft_stats,
        prompt_features=features,
    )


def generate(
    model: GenerativeModel,
    processor: PromptProcessor,
    prompt: str,
    **options: Any,
) -> GenerationResult:
    """Run ``stream_generate`` to the end and return one result holding the whole text and reasoning.

    Takes the same keyword arguments as ``stream_generate``; ``logprob``/``top_logprobs`` are the last token's.
    """
    parts: list[str] = []
    thoughts: list[str] = []
    last: GenerationResult | None = None
    for last in stream_generate(model, processor, prompt, **options):
        parts.append(last.text)
        thoughts.append(last.reasoning)
    assert last is not None  # stream_generate always yields a final result
    return replace(last, text="".join(parts), reasoning="".join(thoughts))
