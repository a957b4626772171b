"""Speculative decoding: a drafter proposes a few tokens, the target checks them all in one forward pass.

Each round feeds the target the last emitted token and the drafter's proposals ``d1..dk`` together, and reads
its distribution at every position. Position i decides token i exactly as plain decoding would (the logits
processors see the tokens accepted so far, the thinking budget may force a token): under greedy decoding a
proposal is kept while it equals the target's choice; when sampling, a proposal d is kept with probability
p(d) (the drafter proposes deterministically, so this is the rejection rule that leaves the target's
distribution p unchanged) and a rejected one is replaced by a draw from p with d's mass removed. The first
token that is not the proposal (or the token after the last proposal) ends the round; the target's cache drops
the positions past it, so it holds exactly what plain decoding would have fed it.

So the output follows the target alone: greedy text equals plain greedy decoding, sampled text is drawn from
the target's distribution. What the drafter changes is speed, through how many proposals it gets right; a
drafter that keeps missing is switched off for a while (``DraftSchedule``), so a bad one costs little.

Caches must be able to drop the rejected positions (``Cache.can_trim_after``): plain and quantized KV caches
can; a sliding window only while nothing has left it (drafts then get shorter, and decoding goes on plainly once
it has wrapped); a recurrent state cannot (refused up front, with one line).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx

from .cache import Cache
from .prefill import prefill
from .protocols import ExposesLayers, GenerativeModel
from .request import GenerationConfig
from .sampling import LogitsProcessor, Sampler, SamplingParams, make_distribution

__all__ = [
    "DraftMask",
    "DraftSchedule",
    "Drafter",
    "ForkableProcessor",
    "draft_mask",
    "masked_argmax",
    "ModelDrafter",
    "SpeculativeStats",
    "refuse_blind_target",
    "refuse_untrimmable",
    "speculative_step",
    "target_forward",
]


class Drafter(Protocol):
    """Proposes tokens continuing a request's sequence; keeps whatever state it needs (a small model's caches)."""

    target_layers: tuple[int, ...]
    """The target's layers whose hidden states the drafter reads (the target must be ``ExposesLayers``); empty
    for a drafter that reads tokens only."""

    def spawn(self) -> Drafter:
        """A drafter of the same model holding no request's state: the batching engine gives each row its own."""
        ...

    def begin(self, inputs: Mapping[str, mx.array], features: mx.array | None = None) -> None:
        """Take the request's prompt (with its media, for drafters that see them) before the first proposal.
        ``features``: with ``target_layers``, the target's hidden states at the prompt positions it computed,
        (1, m, width): the last m positions (a prefix cache may have held the first ones)."""
        ...

    def propose(
        self, emitted: Sequence[int], n: int, features: mx.array | None = None, mask: DraftMask | None = None
    ) -> list[int]:
        """Up to ``n`` tokens continuing prompt + ``emitted`` (every token emitted so far, in order).
        ``features``: with ``target_layers``, the target's hidden states at the positions it fed and kept since
        the last call, in order (by now it has fed every token but the last emitted one). ``mask``: applied to
        the drafter's logits before each choice (the request's grammar), given the proposals before it."""
        ...


DraftMask = Callable[[mx.array, Sequence[int]], "mx.array | None"]
"""(logits (1, vocab), the proposals before this one) -> the logits with what the request's constraints forbid
there masked out (a drafter that proposes within a grammar proposes what the target may keep), or None where the
constraints cannot say (drafting stops there)."""


@runtime_checkable
class ForkableProcessor(Protocol):
    """A stateful logits processor (a grammar) that can hand out an independent copy in its present state: the
    copy masks the drafter's proposals while the original goes on deciding the emitted tokens."""

    def fork(self) -> LogitsProcessor: ...


def draft_mask(processors: Sequence[LogitsProcessor], history: mx.array | None, generated: int) -> DraftMask | None:
    """The mask for one round's proposals: forks of the request's forkable processors (its constraints), which
    see the history, then the proposals; None where the request has none."""
    if history is None:
        return None
    forks = [p.fork() for p in processors if isinstance(p, ForkableProcessor)]
    if not forks:
        return None

    def mask(logits: mx.array, drafted: Sequence[int]) -> mx.array | None:
        tokens = mx.concatenate([history, mx.array([list(drafted)], mx.int32)], axis=1) if drafted else history
        try:
            for fork in forks:
                logits = fork(logits, tokens, generated + len(drafted))
        except Exception:  # a fork in an error state only ends the draft; the request's own grammar decides
            return None
        return logits

    return mask


def masked_argmax(logits: mx.array, mask: DraftMask | None, drafted: Sequence[int]) -> int | None:
    """The drafter's greedy choice at one position, within the mask; None where the mask allows none of the
    drafter's tokens (a reduced draft vocabulary, say): the draft ends before it."""
    if mask is None:
        return int(mx.argmax(logits, axis=-1).item())
    masked = mask(logits, drafted)
    if masked is None:
        return None
    best = mx.argmax(masked, axis=-1)
    allowed = masked[0, best[0]] > -mx.inf
    mx.eval(best, allowed)
    return int(best.item()) if allowed.item() else None


class ModelDrafter:
    """The ``draft`` kind: a separate, smaller model sharing the target's tokenizer, decoding greedily.

    It keeps its own caches in step with the accepted sequence: each proposal first trims them back to what
    is still accepted, feeds the tokens it has not seen, then drafts. A drafter that cannot take the prompt's
    media drafts from its text alone (one warning): that only costs acceptance, never correctness.
    """

    target_layers: tuple[int, ...] = ()

    def __init__(self, model: GenerativeModel) -> None:
        self.model = model
        self._cache: list[Cache] = []
        self._fed: list[int] = []
        self._prompt: list[int] = []
        self._pending: mx.array | None = None
        """Logits after the last fed token, while no token has been fed since."""

    def spawn(self) -> ModelDrafter:
        return ModelDrafter(self.model)

    def for_batch(self) -> Any:
        """Drafting for a whole batch in shared passes (``batch_drafter.BatchedModelDrafter``)."""
        from .batch_drafter import BatchedModelDrafter

        return BatchedModelDrafter(self.model)

    def begin(self, inputs: Mapping[str, mx.array], features: mx.array | None = None) -> None:
        ids = inputs["input_ids"]
        self._prompt = [int(t) for t in ids[0].tolist()]
        self._cache = self.model.make_cache()
        if not all(layer.can_trim_after(1) for layer in self._cache):
            raise ValueError("the draft model's caches cannot take rejected tokens back (recurrent layers)")
        try:
            prompt = self.model.embed_prompt(**inputs)
        except (TypeError, ValueError) as exc:
            warnings.warn(
                f"the draft model does not take this prompt's media ({exc}); it drafts from the text", stacklevel=3
            )
            prompt = self.model.embed_prompt(input_ids=ids)
        self._pending = prefill(self.model, prompt, self._cache, 2048)
        self._fed = list(self._prompt)

    def propose(
        self, emitted: Sequence[int], n: int, features: mx.array | None = None, mask: DraftMask | None = None
    ) -> list[int]:
        sequence = self._prompt + list(emitted)
        common = _common_prefix(self._fed, sequence)
        if common < len(self._fed):
            common = min(common, len(sequence) - 1)  # a sequence it drafted past: its last token again, for logits
            for layer in self._cache:
                layer.trim(len(self._fed) - common)
            self._fed = self._fed[:common]
            self._pending = None
        unseen = sequence[common:]
        logits = self._pending
        if unseen:
            logits = self._step(unseen)
        assert logits is not None, "the drafter holds no logits for a sequence it has fully seen"
        proposals: list[int] = []
        for i in range(n):
            token = masked_argmax(logits, mask, proposals)
            if token is None:
                break
            proposals.append(token)
            if i + 1 < n:
                logits = self._step([token])
        self._pending = logits if n == 0 else None
        return proposals

    def _step(self, tokens: list[int]) -> mx.array:
        ids = mx.array([tokens], mx.int32)
        hidden = self.model.hidden_states(self.model.embed_tokens(ids), cache=self._cache)
        self._fed.extend(tokens)
        return self.model.compute_logits(hidden[:, -1, :])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class SpeculativeStats:
    drafted: int = 0
    """Tokens the drafter proposed."""
    accepted: int = 0
    """Of those, the ones the target kept."""
    rounds: int = 0


@dataclass
class DraftSchedule:
    """How many tokens to draft next: grows while whole drafts are kept, shrinks on misses, and pauses drafting
    for ``pause`` tokens when the last ``window`` proposals were mostly wrong (a bad drafter then costs one
    probe round now and then instead of a slower decode)."""

    most: int = 4
    window: int = 8
    min_rate: float = 0.25
    pause: int = 96

    def __post_init__(self) -> None:
        if self.most < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {self.most}")
        self.n = self.most
        self._recent: list[bool] = []
        self.paused_for = 0

    def next(self) -> int:
        """Tokens to draft in the next round (0 while paused)."""
        if self.paused_for > 0:
            self.paused_for -= 1
            return 0
        return self.n

    def take_pause(self) -> int:
        """The tokens left in a pause, ending it: the caller decodes them plainly."""
        pause, self.paused_for = self.paused_for, 0
        return pause

    def record(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self._recent = (self._recent + [True] * accepted + [False] * (drafted - accepted))[-self.window :]
        self.n = min(self.most, self.n + 1) if accepted == drafted else max(1, accepted + 1)
        if len(self._recent) >= self.window and sum(self._recent) < self.min_rate * len(self._recent):
            self.paused_for, self._recent, self.n = self.pause, [], 1


def target_forward(
    model: GenerativeModel, embeds: mx.array, cache: list[Cache], layers: Sequence[int]
) -> tuple[mx.array, mx.array | None]:
    """The target's hidden states over ``embeds``, and with ``layers`` its features there (``ExposesLayers``)."""
    if not layers:
        return model.hidden_states(embeds, cache=cache), None
    return model.hidden_states_and_layers(embeds, cache=cache, layers=layers)  # type: ignore[attr-defined]


def refuse_blind_target(model: GenerativeModel, drafter: Drafter) -> None:
    """One clear line where the drafter reads hidden states the target does not hand out."""
    if drafter.target_layers and not isinstance(model, ExposesLayers):
        raise ValueError(
            f"this drafter reads the target's hidden states (layers {list(drafter.target_layers)}), which "
            f"{type(model).__name__} does not expose"
        )


def refuse_untrimmable(cache: Sequence[Cache]) -> None:
    """One clear line where a layer could not take a proposal back (checked before and after the prefill)."""
    stuck = sorted({type(layer).__name__ for layer in cache if not layer.can_trim_after(2)})
    if stuck:
        raise ValueError(
            f"speculative decoding needs caches that can take proposed tokens back: this request's {', '.join(stuck)}"
            " layers cannot (a recurrent state never can, a sliding window not once the prompt has filled it)"
        )


def speculative_step(
    model: GenerativeModel,
    drafter: Drafter,
    inputs: Mapping[str, mx.array],
    first: tuple[mx.array, mx.array],
    *,
    cache: list[Cache],
    config: GenerationConfig,
    sampling: SamplingParams,
    sampler: Sampler,
    logits_processors: Sequence[LogitsProcessor] = (),
    override: Any = None,
    schedule: DraftSchedule | None = None,
    stats: SpeculativeStats | None = None,
    prompt_features: mx.array | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) like ``generate_step``, several per target forward pass.

    ``first``: the prompt's (token, logprobs), chosen from the prefilled ``cache``. The processors run once per
    emitted token, in order, on the tokens emitted so far, and the thinking budget (``override``) is asked once
    per emitted token. While the schedule pauses drafting, tokens come from plain decoding, double-buffered as
    in ``generate_step`` (``sampler`` draws them). When the caller stops early, the cache is trimmed back to
    what plain decoding would hold (every emitted token but the last). ``prompt_features``: the prompt's
    hidden states at the drafter's ``target_layers`` (``prefill_with_layers``), for drafters that read them.
    """
    refuse_untrimmable(cache)
    layers = tuple(drafter.target_layers)
    kept: list[mx.array] = []
    """The target's features at the positions it kept since the drafter's last proposal."""
    schedule = schedule or DraftSchedule()
    stats = stats if stats is not None else SpeculativeStats()
    distribution = make_distribution(sampling)
    key = [mx.random.key(sampling.seed)] if sampling.seed is not None else None
    history = inputs["input_ids"].astype(mx.int32)
    emitted: list[int] = []
    start = cache[0].offset if cache else 0
    drafter.begin(inputs, prompt_features)

    def forced() -> int | None:
        return override(emitted[-1] if emitted else None) if override is not None else None

    def processed(logits: mx.array, tokens: mx.array, n_generated: int) -> mx.array:
        """Log-probabilities after the request's processors, which see ``tokens`` (prompt + generated)."""
        for process in logits_processors:
            logits = process(logits, tokens, n_generated)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def target(logits: mx.array, proposal: int | None) -> tuple[mx.array, mx.array]:
        logprobs = processed(logits, history, len(emitted))
        return _choice(logprobs, proposal, distribution, sampling, key), logprobs

    def decode(tokens: list[int] | mx.array) -> mx.array:
        """The target's logits after each of ``tokens`` (their features kept for the drafter)."""
        ids = tokens.reshape(1, -1) if isinstance(tokens, mx.array) else mx.array([tokens], mx.int32)
        hidden, features = target_forward(model, model.embed_tokens(ids), cache, layers)
        if features is not None:
            kept.append(features)
        return model.compute_logits(hidden[0])

    def kept_features() -> mx.array | None:
        if not kept:
            return None
        features = mx.concatenate(kept, axis=1)
        kept.clear()
        return features

    def emit(value: int, row: mx.array | None = None) -> None:
        nonlocal history
        emitted.append(value)
        history = mx.concatenate([history, mx.array([[value]], mx.int32) if row is None else row], axis=1)

    def plain(count: int, token: mx.array, logprobs: mx.array) -> Iterator[tuple[int, mx.array]]:
        """``count`` tokens of plain decoding from the chosen, still lazy ``token``: each step is queued before
        Python reads the token it follows. The last one is emitted, not fed."""
        for i in range(count):
            override_token = forced()
            if override_token is not None:
                token = mx.array([override_token], mx.int32)
            row = token.reshape(1, 1).astype(mx.int32)
            if i + 1 < count:
                following = mx.concatenate([history, row], axis=1)
                next_logprobs = processed(decode(token)[-1:], following, len(emitted) + 1)
                next_token = sampler(next_logprobs)
                mx.async_eval(next_token, next_logprobs)
            emit(int(token.item()), row)
            yield emitted[-1], logprobs
            if i + 1 < count:
                token, logprobs = next_token, next_logprobs

    token, logprobs = first
    decided: int | None = None
    """The next token when verification already decided it (and asked the budget)."""
    try:
        while len(emitted) < config.max_tokens:
            pause = schedule.take_pause() if emitted and decided is None else 0
            if pause:
                yield from plain(min(pause, config.max_tokens - len(emitted)), token, logprobs)
                if len(emitted) < config.max_tokens:
                    token, logprobs = target(decode([emitted[-1]])[-1:], None)
                continue
            if decided is None:
                override_token = forced()
                decided = int(token.item()) if override_token is None else override_token
            emit(decided)
            yield decided, logprobs
            value, decided = emitted[-1], None
            left = config.max_tokens - len(emitted)
            if left <= 0:
                return
            # The round's last token comes from the target itself; no more proposals than every layer can take
            # back (a sliding window only while nothing has left it).
            n = min(schedule.next(), left - 1)
            while n > 0 and not all(layer.can_trim_after(n + 1) for layer in cache):
                n -= 1
            proposals = []
            if n > 0:
                mask = draft_mask(logits_processors, history, len(emitted))
                proposals = drafter.propose(emitted, n, kept_features() if layers else None, mask)
            all_logits = decode([value, *proposals])
            accepted = 0
            for i, proposal in enumerate(proposals):
                token, logprobs = target(all_logits[i : i + 1], proposal)
                override_token = forced()
                choice = int(token.item()) if override_token is None else override_token
                if choice != proposal:
                    decided = choice  # emitted at the top of the next round
                    break
                accepted += 1
                emit(choice)
                yield choice, logprobs
            else:
                token, logprobs = target(all_logits[len(proposals) :][:1], None)
            stats.rounds += 1
            stats.drafted += len(proposals)
            stats.accepted += accepted
            schedule.record(len(proposals), accepted)
            if kept:  # the positions past the last kept one leave the cache, and their features with them
                kept[-1] = kept[-1][:, : 1 + accepted]
            if accepted < len(proposals):  # fed to the target after the last kept position
                for layer in cache:
                    layer.trim(len(proposals) - accepted)
    finally:
        surplus = (cache[0].offset if cache else 0) - (start + max(len(emitted) - 1, 0))
        if surplus > 0:
            for layer in cache:
                layer.trim(surplus)


def _choice(
    logprobs: mx.array, proposal: int | None, distribution: Any, sampling: SamplingParams, key: list[mx.array] | None
) -> mx.array:
    """The target's token at one verified position. Greedy: its argmax, which keeps a proposal exactly when the
    two agree. Sampling: the proposal with probability p(proposal), else a draw from p without it (from p itself
    after the last proposal)."""
    if sampling.temperature == 0.0:
        return mx.argmax(logprobs, axis=-1)
    p = distribution(logprobs)
    if proposal is not None and proposal < p.shape[-1]:
        if _uniform(key) < p[0, proposal].item():
            return mx.array([proposal], mx.int32)
        p = mx.where(mx.arange(p.shape[-1])[None] == proposal, 0.0, p)
    return _draw(p, key)


def _uniform(key: list[mx.array] | None) -> float:
    if key is None:
        return float(mx.random.uniform().item())
    key[0], draw = mx.random.split(key[0])
    return float(mx.random.uniform(key=draw).item())


def _draw(p: mx.array, key: list[mx.array] | None) -> mx.array:
    logits = mx.log(p)
    if key is None:
        return mx.random.categorical(logits, axis=-1)
    key[0], draw = mx.random.split(key[0])
    return mx.random.categorical(logits, axis=-1, key=draw)
