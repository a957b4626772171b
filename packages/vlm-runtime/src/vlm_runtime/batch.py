"""Batched generation: several requests share each decode step.

``BatchGenerator`` is the core a serving engine drives: requests are submitted at any time, each is prefilled
alone (its own images, its own length), then joins the running batch between two decode steps; a finished or
cancelled request leaves at the next step. Rows are left-padded to a common length inside batched caches
(``batch_cache``), which also carry each row's rotary position, so a row's tokens are what it would get
generated alone. Each row is a ``RequestState``: the same per-token rules as single-stream generation.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx

from .batch_cache import batch_cache_like, can_batch, merge_caches
from .batch_speculative import BatchDrafting, rows_can_roll_back
from .cache import Cache
from .cache_settings import CacheSettings, make_layer_caches
from .generate import as_drafter, media_list
from .prefill import drop_prefix, prefill_with_layers
from .prefix_cache import PrefixCache, PrefixMatch
from .protocols import GenerativeModel, PromptEmbedding, PromptProcessor
from .request import GenerationResult, Request, RequestState
from .settings import GenerationSettings, generation_settings
from .speculative import Drafter, refuse_blind_target

__all__ = ["BatchGenerator", "batch_generate"]


@dataclass
class _Pending:
    uid: int
    request: Request

    @property
    def prompt_tokens(self) -> int:
        ids = self.request.inputs.get("input_ids")
        return int(getattr(ids, "size", 0))


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
        prefix_cache: PrefixCache | None = None,
        drafter: Drafter | None = None,
    ) -> None:
        """``cache_settings`` (a sliding window, or quantized keys/values) hold for every row: the rows share
        their caches' buffers. With a ``prefix_cache``, each prompt starts from the blocks it holds of it and
        is prefilled alone over the blocks it found; prompts it has no block of are prefilled together as
        usual, and their blocks cut from their rows. With a ``drafter``, rows decode speculatively (each
        request gets its own ``drafter.spawn()``), where the model's caches can take proposals back; a model
        with recurrent layers decodes plainly (one warning)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.processor = model, processor
        self.cache_settings = cache_settings
        self.max_batch_size = max_batch_size
        self.prefill_step_size = prefill_step_size
        self.vision_cache = vision_cache
        self.prefix_cache = prefix_cache
        self._misses: dict[int, PrefixMatch] = {}
        """Prefix-cache misses of the requests being admitted (uid -> match), until their blocks are kept."""
        self._uids = itertools.count()
        self._pending: list[_Pending] = []
        self._rows: list[RequestState] = []
        self._cache: list[Any] | None = None
        self._cancelled: set[int] = set()
        self._drafting: BatchDrafting | None = None
        if drafter is not None:
            refuse_blind_target(model, drafter)
            if rows_can_roll_back(make_layer_caches(model, cache_settings)):
                self._drafting = BatchDrafting(drafter)
            else:
                warnings.warn(
                    "speculative decoding is off: this model's batched caches cannot take proposed tokens back "
                    "(recurrent layers); requests decode plainly",
                    stacklevel=2,
                )

    @property
    def drafting(self) -> bool:
        """Whether rows decode speculatively."""
        return self._drafting is not None

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def has_work(self) -> bool:
        return bool(self._rows or self._pending)

    def submit(self, request: Request) -> int:
        """Queue one request (one prompt); returns its uid. It joins at the next ``step``."""
        request.prompt_ids  # noqa: B018 -- refuses a batch of prompts now, not at the next step
        uid = next(self._uids)
        self._pending.append(_Pending(uid, request))
        return uid

    def cancel(self, uid: int) -> None:
        """Stop a request: the next step frees its slot and reports it with finish_reason "cancelled"."""
        self._cancelled.add(uid)

    def step(self) -> list[GenerationResult]:
        """Admit waiting requests (each gives its first token), then one decode step for the running rows."""
        events: list[GenerationResult] = []
        self._drop_cancelled(events)
        if self._rows:
            events.extend(self._decode())
        joining: list[tuple[list[RequestState], list[Cache]]] = []
        group: list[tuple[RequestState, PromptEmbedding]] = []
        while self._pending and len(self._rows) + sum(len(r) for r, _ in joining) + len(group) < self.max_batch_size:
            pending = self._pending.pop(0)
            try:
                state = RequestState.start(pending.request, self.processor, uid=pending.uid)
                if state.config.max_tokens == 0:
                    events.append(state.end("length"))
                    continue
                if self._drafting is not None:
                    self._drafting.admit(state, pending.request.inputs)
                prompt = self.model.embed_prompt(vision_cache=self.vision_cache, **pending.request.inputs)
                match = self._look_up(pending.request, prompt)
            except Exception as exc:  # one bad prompt fails alone; the batch keeps running
                events.append(
                    GenerationResult.ended(pending.uid, "error", prompt_tokens=pending.prompt_tokens, error=exc)
                )
                continue
            if match is not None and (match.cached_tokens > 0 or match.snapshot_at):
                # Alone: over the blocks it found, or to keep its recurrent layers' state at a block boundary.
                joining.extend(self._prefill_matched(state, prompt, match, events))
                continue
            if match is not None:
                self._misses[state.uid] = match  # prefilled with the others; its blocks kept afterwards
            if group and not self._fits(group, prompt):
                joining.extend(self._prefill_apart_on_error(group, events))
                group = []
            group.append((state, prompt))
        if group:
            joining.extend(self._prefill_apart_on_error(group, events))
        self._release_misses()
        self._join(joining)
        self._drop_finished()
        if self._drafting is not None:
            self._drafting.saw(events)
        return events

    # -- the prefix cache
    def _look_up(self, request: Request, prompt: PromptEmbedding) -> PrefixMatch | None:
        """The prefix cache's match for ``request``, or None without a cache (or for a model it skips)."""
        if self.prefix_cache is None:
            return None
        match = self.prefix_cache.lookup(
            self.model, self.cache_settings, request.prompt_ids, request.inputs, prompt, request.prefix_cache_tenant
        )
        return match if match.enabled else None

    def _prefill_matched(
        self, state: RequestState, prompt: PromptEmbedding, match: PrefixMatch, events: list[GenerationResult]
    ) -> list[tuple[list[RequestState], list[Cache]]]:
        """Prefill one prompt over the blocks ``match`` restored, then keep its blocks."""
        assert self.prefix_cache is not None
        state.cached_tokens = match.cached_tokens
        try:
            return self._prefill_group([(state, prompt)], events, match)
        except Exception as exc:
            events.append(state.end("error", exc))
            return []
        finally:
            self.prefix_cache.release(match)

    def _keep_blocks(
        self, group: list[tuple[RequestState, PromptEmbedding]], cache: list[Any], match: PrefixMatch | None
    ) -> None:
        """Hand the prefix cache the blocks of the prompts just prefilled (a batch's rows one by one)."""
        if self.prefix_cache is None:
            return
        for row, (state, _) in enumerate(group):
            found = match if match is not None else self._misses.pop(state.uid, None)
            if found is None:
                continue
            layers = cache if len(group) == 1 else [layer.extract(row) for layer in cache]
            self.prefix_cache.store(found, layers)
            self.prefix_cache.release(found)

    def _release_misses(self) -> None:
        """Release the misses whose prefill failed (their blocks were never kept)."""
        if self.prefix_cache is not None:
            for found in self._misses.values():
                self.prefix_cache.release(found)
        self._misses.clear()

    # -- joining
    def _fits(self, group: list[tuple[RequestState, PromptEmbedding]], prompt: PromptEmbedding) -> bool:
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
        self, group: list[tuple[RequestState, PromptEmbedding]], events: list[GenerationResult]
    ) -> list[tuple[list[RequestState], list[Cache]]]:
        """``_prefill_group``; if the group fails, each prompt again alone, so that one bad prompt fails alone."""
        try:
            return self._prefill_group(group, events)
        except Exception as exc:
            if len(group) == 1:
                events.append(group[0][0].end("error", exc))
                return []
        return [joined for member in group for joined in self._prefill_apart_on_error([member], events)]

    def _prefill_group(
        self,
        group: list[tuple[RequestState, PromptEmbedding]],
        events: list[GenerationResult],
        match: PrefixMatch | None = None,
    ) -> list[tuple[list[RequestState], list[Cache]]]:
        """Prefill the group's prompts as one left-padded batch and emit each row's first token; return the
        rows still running with their cache, to join (one request alone keeps a plain cache). ``match``: a lone
        request's prefix-cache match, whose layers already hold the start of its prompt."""
        layers = make_layer_caches(self.model, self.cache_settings) if match is None else match.layers
        unbatchable = sorted({type(c).__name__ for c in layers if not can_batch(c)})
        if unbatchable:
            raise ValueError(f"batched generation cannot hold {', '.join(unbatchable)} layers")
        if len(group) == 1:
            cache: list[Any] = layers
            prompt = group[0][1] if match is None else drop_prefix(group[0][1], match.cached_tokens)
        else:
            prompt, padding = _left_padded_batch([p for _, p in group])
            cache = [batch_cache_like(layer, padding) for layer in layers]
        taps = self._drafting.layers if self._drafting is not None else ()
        logits, features = prefill_with_layers(self.model, prompt, cache, self.prefill_step_size, taps)
        if features is not None and self._drafting is not None:
            offsets = padding if len(group) > 1 else [0]
            for row, ((state, _), start) in enumerate(zip(group, offsets)):
                self._drafting.prefilled(state.uid, features[row : row + 1, start:])
        self._keep_blocks(group, cache, match)
        chosen = {
            i: pair
            for i, (state, _) in enumerate(group)
            if (pair := self._choose_or_fail(state, logits, i, events)) is not None
        }
        if not chosen:
            return []
        tokens = mx.concatenate([token.reshape(-1) for token, _ in chosen.values()]).tolist()
        keep = []
        for (i, (_, logprobs)), token in zip(chosen.items(), tokens):
            state = group[i][0]
            events.append(state.emit(state.resolve(token), logprobs))
            if state.finish is None:
                keep.append(i)
        if not keep:
            return []
        if len(keep) < len(group):
            for layer in cache:
                layer.filter(keep)  # only batched caches get here: a lone request either runs or is done
        return [([group[i][0] for i in keep], cache)]

    def _join(self, joining: list[tuple[list[RequestState], list[Cache]]]) -> None:
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
    def _decode(self) -> list[GenerationResult]:
        assert self._cache is not None
        if self._drafting is not None:
            return self._drafting.step(self.model, self._cache, self._rows)
        tokens = mx.array([state.last_token for state in self._rows], mx.int32)
        hidden = self.model.hidden_states(self.model.embed_tokens(tokens[:, None]), cache=self._cache)
        logits = self.model.compute_logits(hidden[:, -1, :])
        if all(state.plain for state in self._rows):
            chosen = mx.argmax(logits, axis=-1).tolist()
            return [state.emit(state.resolve(token)) for state, token in zip(self._rows, chosen)]
        events: list[GenerationResult] = []
        for i, state in enumerate(self._rows):
            pair = self._choose_or_fail(state, logits, i, events)
            if pair is not None:
                token, logprobs = pair
                events.append(state.emit(state.resolve(token.item()), logprobs))
        return events

    @staticmethod
    def _choose_or_fail(
        state: RequestState, logits: mx.array, index: int, events: list[GenerationResult]
    ) -> tuple[mx.array, mx.array] | None:
        """``state.choose`` on row ``index`` of ``logits``; if the request's own processor (a grammar, say)
        fails, that request ends with an "error" event and None comes back: the others go on."""
        try:
            return state.choose(logits[index : index + 1])
        except Exception as exc:
            events.append(state.end("error", exc))
            return None

    # -- leaving
    def _drop_cancelled(self, events: list[GenerationResult]) -> None:
        if not self._cancelled:
            return
        for pending in self._pending:
            if pending.uid in self._cancelled:
                events.append(GenerationResult.ended(pending.uid, "cancelled", prompt_tokens=pending.prompt_tokens))
        self._pending = [p for p in self._pending if p.uid not in self._cancelled]
        for state in self._rows:
            if state.uid in self._cancelled and state.finish is None:
                events.append(state.end("cancelled"))
        self._cancelled.clear()
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = [i for i, state in enumerate(self._rows) if state.finish is None]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = None
            return
        assert self._cache is not None
        for layer in self._cache:
            layer.filter(keep)


def _has_own_mask(prompt: PromptEmbedding) -> bool:
    """A padding mask, or spans that attend both ways (images in Gemma 3, PaliGemma's prefix): such a prompt
    is prefilled alone, as its model shapes the mask."""
    return prompt.attention_mask is not None or prompt.attention_groups is not None


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
    audios: Sequence[Any] | None = None,
    videos: Sequence[Any] | None = None,
    video_sampling: Any = None,
    max_batch_size: int = 32,
    draft_model: Any = None,
    settings: GenerationSettings | None = None,
    **options: Any,
) -> list[GenerationResult]:
    """Generate for several chat-formatted prompts in one batch; ``images[i]`` is prompt i's image or list of
    images (or None), and ``audios[i]`` / ``videos[i]`` its clips and videos likewise. Takes ``stream_generate``'s
    ``settings`` and keyword options (and its ``draft_model``: each row drafts and keeps its own tokens); returns
    one result per prompt, holding its whole text and reasoning."""
    per_prompt = {"images": images, "audios": audios, "videos": videos}
    for name, entries in per_prompt.items():
        if entries is not None and len(entries) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(entries)} {name[:-1]} entries")

    def media(name: str, i: int) -> list[Any]:
        entries = per_prompt[name]
        return media_list(entries[i] if entries is not None else None)

    settings = generation_settings(settings, **options)
    engine = BatchGenerator(
        model,
        processor,
        max_batch_size=max_batch_size,
        cache_settings=settings.cache,
        drafter=as_drafter(draft_model),
    )
    order: dict[int, int] = {}
    for i, prompt in enumerate(prompts):
        inputs = processor.prepare_inputs(
            prompt, media("images", i), media("videos", i), video_sampling, media("audios", i)
        )
        order[engine.submit(settings.request(inputs))] = i
    texts: list[list[str]] = [[] for _ in prompts]
    thoughts: list[list[str]] = [[] for _ in prompts]
    last: dict[int, GenerationResult] = {}
    for event in _run(engine):
        i = order[event.uid]
        texts[i].append(event.text)
        thoughts[i].append(event.reasoning)
        last[i] = event
    return [replace(last[i], text="".join(texts[i]), reasoning="".join(thoughts[i])) for i in range(len(prompts))]


def _run(engine: BatchGenerator) -> Iterator[GenerationResult]:
    while engine.has_work():
        yield from engine.step()
