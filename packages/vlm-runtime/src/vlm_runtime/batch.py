"""Batched generation: several requests share each decode step.

``BatchGenerator`` is the core a serving engine drives: requests are submitted at any time, each is prefilled
alone (its own images, its own length), then joins the running batch between two decode steps; a finished or
cancelled request leaves at the next step. Rows are left-padded to a common length inside batched caches
(``BatchKVCache`` and its sliding-window and quantized kin),
which also carries each row's rotary position, so a row's tokens are what it would get generated alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .cache import Cache, batch_cache_like, can_batch, merge_caches
from .cache_settings import CacheSettings, make_prompt_cache
from .generate import (
    GenerationConfig,
    GenerationResult,
    _as_list,
    _read_logprobs,
    _sample,
    embed,
    generation_settings,
    prefill,
)
from .protocols import GenerativeModel, PromptEmbedding, PromptProcessor
from .sampling import LogitsProcessor, Sampler, SamplingParams, greedy, make_logits_processors, make_sampler
from .text_output import TextOutput
from .thinking import ThinkingBudget, ThinkingConfig, prompt_opens_thinking, resolve_thinking_tokens

__all__ = ["BatchEvent", "BatchGenerator", "batch_generate"]


@dataclass(frozen=True)
class BatchEvent:
    """One generated token of one request."""

    uid: int
    token: int
    text: str
    reasoning: str
    finish_reason: str | None
    """None while the request runs; "stop", "length", "cancelled" or "error" on its last event."""
    prompt_tokens: int
    generation_tokens: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    stop_string: str | None = None
    """The stop string that ended the request, when one did."""
    error: str | None = None
    """Why the request failed, on its last event when finish_reason is "error"."""


@dataclass
class _Row:
    uid: int
    config: GenerationConfig
    sampler: Sampler
    processors: list[LogitsProcessor]
    text: TextOutput
    override: ThinkingBudget | None
    eos: frozenset[int]
    prompt_tokens: int
    history: mx.array | None
    token: int = -1
    """The last emitted token: fed to the model at the next step."""
    generated: int = 0
    finish: str | None = None


@dataclass
class _Pending:
    uid: int
    inputs: dict[str, mx.array]
    sampling: SamplingParams
    config: GenerationConfig
    thinking: ThinkingConfig
    constraints: tuple[LogitsProcessor, ...] = ()
    rows: list[_Row] = field(default_factory=list)


class BatchGenerator:
    """Decode several requests together. Not thread-safe: one thread owns it (and the model) and calls
    ``submit``, ``cancel`` and ``step``."""

    def __init__(
        self,
        model: GenerativeModel,
        processor: PromptProcessor,
        *,
        max_batch_size: int = 32,
        prefill_step_size: int = 2048,
        vision_cache: Any = None,
        cache_settings: CacheSettings = CacheSettings(),
    ) -> None:
        """``cache_settings`` (a sliding window, or quantized keys/values) hold for every row: the rows share
        their caches' buffers."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.processor = model, processor
        self.cache_settings = cache_settings
        self.max_batch_size = max_batch_size
        self.prefill_step_size = prefill_step_size
        self.vision_cache = vision_cache
        self._uids = itertools.count()
        self._pending: list[_Pending] = []
        self._rows: list[_Row] = []
        self._cache: list[Any] | None = None
        self._cancelled: set[int] = set()

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def has_work(self) -> bool:
        return bool(self._rows or self._pending)

    def submit(
        self,
        inputs: dict[str, mx.array],
        *,
        sampling: SamplingParams = SamplingParams(),
        config: GenerationConfig = GenerationConfig(),
        thinking: ThinkingConfig = ThinkingConfig(),
        constraints: Sequence[LogitsProcessor] = (),
    ) -> int:
        """Queue one prepared prompt (batch of one); returns its uid. It joins at the next ``step``.

        ``constraints``: this request's own logits processors (a grammar, say), run after the sampling ones;
        each sees the request's token history, so it may keep state across steps.
        """
        ids = inputs["input_ids"]
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError("submit one prompt at a time (input_ids of shape (1, length))")
        uid = next(self._uids)
        self._pending.append(_Pending(uid, inputs, sampling, config, thinking, tuple(constraints)))
        return uid

    def cancel(self, uid: int) -> None:
        """Stop a request: the next step frees its slot and reports it with finish_reason "cancelled"."""
        self._cancelled.add(uid)

    def step(self) -> list[BatchEvent]:
        """Admit waiting requests (each gives its first token), then one decode step for the running rows."""
        events: list[BatchEvent] = []
        self._drop_cancelled(events)
        if self._rows:
            events.extend(self._decode())
        joining: list[tuple[list[_Row], list[Cache]]] = []
        group: list[tuple[_Row, PromptEmbedding]] = []
        while self._pending and len(self._rows) + sum(len(r) for r, _ in joining) + len(group) < self.max_batch_size:
            request = self._pending.pop(0)
            try:
                row = self._new_row(request, request.inputs["input_ids"][0].tolist())
                if request.config.max_tokens == 0:
                    events.append(self._event(row, -1, None, "length"))
                    continue
                prompt = embed(self.model, request.inputs, self.vision_cache)
            except Exception as exc:  # one bad prompt fails alone; the batch keeps running
                events.append(error_event(request.uid, exc, int(request.inputs["input_ids"].size)))
                continue
            if group and not self._fits(group, prompt):
                joining.extend(self._prefill_apart_on_error(group, events))
                group = []
            group.append((row, prompt))
        if group:
            joining.extend(self._prefill_apart_on_error(group, events))
        self._join(joining)
        self._drop_finished()
        return events

    # -- joining
    def _fits(self, group: list[tuple[_Row, PromptEmbedding]], prompt: PromptEmbedding) -> bool:
        """Whether ``prompt`` may be prefilled together with ``group``: the padded batch stays within one
        prefill chunk of tokens (bounding the attention scores' memory), and the prompts carry nothing but
        embeddings and positions (no padding mask of their own)."""
        if any(_has_own_mask(p) for p in (prompt, *(p for _, p in group))):
            return False
        if (prompt.position_ids is None) != (group[0][1].position_ids is None):
            return False
        longest = max(prompt.inputs_embeds.shape[1], *(p.inputs_embeds.shape[1] for _, p in group))
        return longest * (len(group) + 1) <= self.prefill_step_size

    def _prefill_apart_on_error(
        self, group: list[tuple[_Row, PromptEmbedding]], events: list[BatchEvent]
    ) -> list[tuple[list[_Row], list[Cache]]]:
        """``_prefill_group``; if the group fails, each prompt again alone, so that one bad prompt fails alone."""
        try:
            return self._prefill_group(group, events)
        except Exception as exc:
            if len(group) == 1:
                row = group[0][0]
                row.finish = "error"
                events.append(error_event(row.uid, exc, row.prompt_tokens))
                return []
        return [joined for member in group for joined in self._prefill_apart_on_error([member], events)]

    def _prefill_group(
        self, group: list[tuple[_Row, PromptEmbedding]], events: list[BatchEvent]
    ) -> list[tuple[list[_Row], list[Cache]]]:
        """Prefill the group's prompts as one left-padded batch and emit each row's first token; return the
        rows still running with their cache, to join (one request alone keeps a plain cache)."""
        layers = make_prompt_cache(self.model, self.cache_settings)
        unbatchable = sorted({type(c).__name__ for c in layers if not can_batch(c)})
        if unbatchable:
            raise ValueError(f"batched generation cannot hold {', '.join(unbatchable)} layers (recurrent state)")
        if len(group) == 1:
            cache: list[Any] = layers
            prompt = group[0][1]
        else:
            prompt, padding = _left_padded_batch([p for _, p in group])
            cache = [batch_cache_like(layer, padding) for layer in layers]
        logits = prefill(self.model, prompt, cache, self.prefill_step_size)
        chosen = {
            i: pair
            for i, (row, _) in enumerate(group)
            if (pair := self._choose_or_fail(row, logits, i, events)) is not None
        }
        if not chosen:
            return []
        tokens = mx.concatenate([token.reshape(-1) for token, _ in chosen.values()]).tolist()
        keep = []
        for (i, (_, logprobs)), token in zip(chosen.items(), tokens):
            row = group[i][0]
            first = row.override(None) if row.override is not None else None
            events.append(self._emit(row, first if first is not None else token, logprobs))
            if row.finish is None:
                keep.append(i)
        if not keep:
            return []
        if len(keep) < len(group):
            for layer in cache:
                layer.filter(keep)  # only batched caches get here: a lone request either runs or is done
        return [([group[i][0] for i in keep], cache)]

    def _new_row(self, request: _Pending, prompt_list: list[int]) -> _Row:
        processor = self.processor
        marks = resolve_thinking_tokens(request.thinking, processor.encode) if hasattr(processor, "encode") else None
        inside = marks is not None and prompt_opens_thinking(prompt_list, marks)
        budget = None
        if marks is not None and request.thinking.budget is not None:
            budget = ThinkingBudget(marks, request.thinking.budget, inside=inside)
        processors = make_logits_processors(request.sampling) + list(request.constraints)
        return _Row(
            uid=request.uid,
            config=request.config,
            sampler=make_sampler(request.sampling),
            processors=processors,
            text=TextOutput(processor.decode, thinking=marks, inside_thinking=inside, stop=request.config.stop),
            override=budget,
            eos=frozenset() if request.config.ignore_eos else processor.eos_token_ids,
            prompt_tokens=len(prompt_list),
            history=mx.array([prompt_list], mx.int32) if processors else None,
        )

    def _join(self, joining: list[tuple[list[_Row], list[Cache]]]) -> None:
        """Add the rows admitted in one step with one merge per layer, evaluated now: joining them one by one
        would copy the growing batch once per request, and a lazy merge would stall the next decode step."""
        if not joining:
            return
        layers = zip(*(cache for _, cache in joining))
        running = self._cache or [None] * len(joining[0][1])
        self._cache = [
            merge_caches(([old] if old is not None else []) + list(new)) for old, new in zip(running, layers)
        ]
        mx.eval([layer.state for layer in self._cache])
        for rows, _ in joining:
            self._rows.extend(rows)

    # -- decoding
    def _decode(self) -> list[BatchEvent]:
        assert self._cache is not None
        tokens = mx.array([row.token for row in self._rows], mx.int32)
        hidden = self.model.hidden_states(self.model.embed_tokens(tokens[:, None]), cache=self._cache)
        logits = self.model.compute_logits(hidden[:, -1, :])
        plain = all(not r.processors and not r.config.wants_logprobs and r.sampler is greedy for r in self._rows)
        if plain:
            chosen = mx.argmax(logits, axis=-1).tolist()
            return [self._emit(row, self._overridden(row, t), None) for row, t in zip(self._rows, chosen)]
        events: list[BatchEvent] = []
        for i, row in enumerate(self._rows):
            pair = self._choose_or_fail(row, logits, i, events)
            if pair is not None:
                token, logprobs = pair
                events.append(self._emit(row, self._overridden(row, token.item()), logprobs))
        return events

    def _choose_or_fail(
        self, row: _Row, logits: mx.array, index: int, events: list[BatchEvent]
    ) -> tuple[mx.array, mx.array] | None:
        """``_choose`` on row ``index`` of ``logits``; if the request's own processor (a grammar, say) fails,
        that request ends with an "error" event and None comes back: the others go on."""
        try:
            return self._choose(row, logits[index : index + 1])
        except Exception as exc:
            row.finish = "error"
            events.append(error_event(row.uid, exc, row.prompt_tokens, row.generated))
            return None

    def _choose(self, row: _Row, logits: mx.array) -> tuple[mx.array, mx.array]:
        for process in row.processors:
            logits = process(logits, row.history, row.generated)
        return _sample(row.sampler, logits)

    @staticmethod
    def _overridden(row: _Row, token: int) -> int:
        forced = row.override(row.token) if row.override is not None else None
        return token if forced is None else forced

    def _emit(self, row: _Row, token: int, logprobs: mx.array | None) -> BatchEvent:
        row.token = token
        if row.history is not None:
            row.history = mx.concatenate([row.history, mx.array([[token]], mx.int32)], axis=1)
        lp = _read_logprobs(logprobs, token, row.config) if row.config.wants_logprobs and logprobs is not None else None
        if token in row.eos:
            delta, finish = row.text.finish(), "stop"
        else:
            row.generated += 1
            delta = row.text.add(token)
            finish = "stop" if delta.stopped else None
            if finish is None and row.generated >= row.config.max_tokens:
                tail = row.text.finish()
                delta = type(delta)(delta.text + tail.text, delta.reasoning + tail.reasoning)
                finish = "length"
        row.finish = finish
        return self._event(row, token, lp, finish, delta.text, delta.reasoning)

    @staticmethod
    def _event(row: _Row, token: int, lp: Any, finish: str | None, text: str = "", reasoning: str = "") -> BatchEvent:
        chosen, top = lp if lp is not None else (None, ())
        return BatchEvent(
            uid=row.uid,
            token=token,
            text=text,
            reasoning=reasoning,
            finish_reason=finish,
            prompt_tokens=row.prompt_tokens,
            generation_tokens=row.generated,
            logprob=chosen,
            top_logprobs=top,
            stop_string=row.text.matched_stop if finish == "stop" else None,
        )

    # -- leaving
    def _drop_cancelled(self, events: list[BatchEvent]) -> None:
        if not self._cancelled:
            return
        for request in self._pending:
            if request.uid in self._cancelled:
                prompt_tokens = int(request.inputs["input_ids"].size)
                events.append(BatchEvent(request.uid, -1, "", "", "cancelled", prompt_tokens, 0))
        self._pending = [p for p in self._pending if p.uid not in self._cancelled]
        for row in self._rows:
            if row.uid in self._cancelled and row.finish is None:
                row.finish = "cancelled"
                events.append(self._event(row, row.token, None, "cancelled"))
        self._cancelled.clear()
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if row.finish is None]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = None
            return
        assert self._cache is not None
        for layer in self._cache:
            layer.filter(keep)


def error_event(uid: int, problem: Exception | str, prompt_tokens: int = 0, generated: int = 0) -> BatchEvent:
    """The last event of a request that failed (``finish_reason`` "error"), saying why."""
    message = problem if isinstance(problem, str) else f"{type(problem).__name__}: {problem}"
    return BatchEvent(uid, -1, "", "", "error", prompt_tokens, generated, error=message)


def _has_own_mask(prompt: PromptEmbedding) -> bool:
    """A padding mask, or spans that attend both ways (images in Gemma 3, PaliGemma's prefix): such a prompt
    is prefilled alone, as its model shapes the mask."""
    return prompt.attention_mask is not None or getattr(prompt, "attention_groups", None) is not None


def _left_padded_batch(prompts: list[PromptEmbedding]) -> tuple[PromptEmbedding, list[int]]:
    """Single prompts stacked into one batch, each left-padded to the longest; padding columns get zero
    embeddings and position 0 (the cache's mask hides them). Returns the batch and each row's padding."""
    longest = max(p.inputs_embeds.shape[1] for p in prompts)
    padding = [longest - p.inputs_embeds.shape[1] for p in prompts]
    embeds = mx.concatenate(
        [mx.pad(p.inputs_embeds, [(0, 0), (pad, 0), (0, 0)]) for p, pad in zip(prompts, padding)], axis=0
    )
    positions = None
    if prompts[0].position_ids is not None:
        # The sequence is the last axis and the batch the one before it: (batch, length) or (3, batch, length).
        rows = []
        for p, pad in zip(prompts, padding):
            widths = [(0, 0)] * (p.position_ids.ndim - 1) + [(pad, 0)]
            rows.append(mx.pad(p.position_ids, widths))
        positions = mx.concatenate(rows, axis=-2)
    return PromptEmbedding(embeds, positions), padding


def batch_generate(
    model: GenerativeModel,
    processor: PromptProcessor,
    prompts: Sequence[str],
    *,
    images: Sequence[Any] | None = None,
    max_batch_size: int = 32,
    **options: Any,
) -> list[GenerationResult]:
    """Generate for several chat-formatted prompts in one batch; ``images[i]`` is prompt i's image or list of
    images (or None). Takes ``stream_generate``'s sampling and length options; returns one result per prompt."""
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} image entries")
    settings = generation_settings(**options)
    sampling, config, thinking = settings.sampling, settings.config, settings.thinking
    engine = BatchGenerator(model, processor, max_batch_size=max_batch_size, cache_settings=settings.cache)
    order: dict[int, int] = {}
    for i, prompt in enumerate(prompts):
        inputs = processor.prepare_inputs(prompt, images=_as_list(images[i] if images is not None else None))
        order[engine.submit(inputs, sampling=sampling, config=config, thinking=thinking)] = i
    texts: list[list[str]] = [[] for _ in prompts]
    thoughts: list[list[str]] = [[] for _ in prompts]
    last: dict[int, BatchEvent] = {}
    for event in _run(engine):
        i = order[event.uid]
        texts[i].append(event.text)
        thoughts[i].append(event.reasoning)
        last[i] = event
    return [
        GenerationResult(
            text="".join(texts[i]),
            token=last[i].token if last[i].token >= 0 else None,
            prompt_tokens=last[i].prompt_tokens,
            generation_tokens=last[i].generation_tokens,
            prompt_tps=0.0,
            generation_tps=0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=last[i].finish_reason,
            reasoning="".join(thoughts[i]),
        )
        for i in range(len(prompts))
    ]


def _run(engine: BatchGenerator) -> Iterator[BatchEvent]:
    while engine.has_work():
        yield from engine.step()
