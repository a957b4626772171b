"""Sampling: small pure functions over log-probabilities, composed by ``make_sampler``.

Each filter maps (batch, vocab) log-probabilities to log-probabilities with the excluded tokens at -inf; the
final draw is greedy at temperature 0 and categorical otherwise.

Logits processors run before that, on the raw (batch, vocab) logits, and see each row's token history: a
(batch, T) int32 array of prompt + generated tokens, left-padded with -1 for shorter rows, whose last
``n_generated`` columns are the generated tokens. They use mx ops only (no host sync), so the decode loop can
keep pipelining.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import mlx.core as mx

from .field_types import check_field_types

__all__ = [
    "LogitsProcessor",
    "Sampler",
    "SamplingParams",
    "apply_logit_bias",
    "apply_min_p",
    "apply_presence_frequency",
    "apply_repetition_penalty",
    "apply_top_k",
    "apply_top_p",
    "greedy",
    "make_distribution",
    "make_logits_processors",
    "make_sampler",
    "process_and_sample",
    "top_logprobs",
    "MAX_TOP_LOGPROBS",
]

Sampler = Callable[[mx.array], mx.array]
# (logits (B, V), tokens (B, T) int32 left-padded with -1, n_generated) -> logits (B, V)
LogitsProcessor = Callable[[mx.array, mx.array, int], mx.array]
LogitBias = tuple[tuple[int, float], ...]
NEG_INF = float("-inf")
MAX_TOP_LOGPROBS = 20


def _normalize_logit_bias(bias: Mapping[int, float] | Iterable[tuple[int, float]] | None) -> LogitBias | None:
    """A sorted tuple of (token id, bias) pairs, or None when empty, so the params stay hashable and equal
    whether given as a dict or as pairs."""
    if bias is None:
        return None
    pairs = list(bias.items()) if isinstance(bias, Mapping) else list(bias)
    out: dict[int, float] = {}
    for pair in pairs:
        try:
            raw_id, raw_value = pair
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias entries must be (token_id, bias) pairs, got {pair!r}") from None
        if isinstance(raw_id, bool):
            raise ValueError(f"logit_bias token ids must be integers, got {raw_id!r}")
        try:
            token = operator.index(raw_id)
        except TypeError:
            raise ValueError(f"logit_bias token ids must be integers, got {raw_id!r}") from None
        if token < 0:
            raise ValueError(f"logit_bias token ids must be >= 0, got {token}")
        if token in out:
            raise ValueError(f"logit_bias has token id {token} more than once")
        value = float(raw_value)
        # -inf bans a token; +inf or NaN would turn the whole row into NaN after normalisation.
        if math.isnan(value) or value == math.inf:
            raise ValueError(f"logit_bias for token {token} must be finite or -inf, got {value}")
        out[token] = value
    return tuple(sorted(out.items())) or None


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    # CTRL / Hugging Face rule over the last ``repetition_context_size`` tokens, prompt included; 1.0 = off.
    repetition_penalty: float = 1.0
    repetition_context_size: int = 20
    # OpenAI rules over the generated tokens only; 0.0 = off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Given as a mapping or (id, bias) pairs; stored as a sorted tuple of pairs (None when empty).
    logit_bias: Mapping[int, float] | LogitBias | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.repetition_context_size < 1:
            raise ValueError(f"repetition_context_size must be >= 1, got {self.repetition_context_size}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:  # also rejects NaN
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        # Frozen: normalise through object.__setattr__ so the stored form is hashable.
        object.__setattr__(self, "logit_bias", _normalize_logit_bias(self.logit_bias))


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens."""
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    drop = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logprobs, drop, mx.array(NEG_INF, logprobs.dtype), axis=-1)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.exp(sorted_lp)
    # A token stays if the mass strictly before it is still short of p.
    mass_before = mx.cumsum(probs, axis=-1) - probs
    sorted_kept = mx.where(mass_before < p, sorted_lp, NEG_INF)
    inverse = mx.argsort(order, axis=-1)
    return mx.take_along_axis(sorted_kept, inverse, axis=-1)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep tokens whose probability is at least min_p times the top token's."""
    if min_p <= 0.0:
        return logprobs
    threshold = logprobs.max(axis=-1, keepdims=True) + mx.log(mx.array(min_p, logprobs.dtype))
    return mx.where(logprobs >= threshold, logprobs, NEG_INF)


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def top_logprobs(logprobs: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k most likely token ids (B, k) and their logprobs (B, k), most likely first.

    Partitions first and sorts only the k survivors: O(V + k log k) rather than a full vocabulary sort.
    """
    vocab = logprobs.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOP_LOGPROBS:
        raise ValueError(f"k must be an int in [1, {MAX_TOP_LOGPROBS}], got {k!r}")
    if k > vocab:
        raise ValueError(f"k={k} exceeds the vocabulary size {vocab}")
    ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)


# --- logits processors ---------------------------------------------------------------------------------------


def _check_history(logits: mx.array, tokens: mx.array) -> None:
    if logits.ndim != 2 or tokens.ndim != 2 or tokens.shape[0] != logits.shape[0]:
        raise ValueError(f"expected logits (B, V) and tokens (B, T), got {logits.shape} and {tokens.shape}")


def _scatter_index(tokens: mx.array, vocab: int) -> mx.array:
    """Token ids with padding (< 0) and out-of-vocabulary ids sent to a spare column ``vocab``, which the
    callers scatter into and then slice away: ignoring them without a host-side filter."""
    return mx.where((tokens < 0) | (tokens >= vocab), vocab, tokens)


def apply_repetition_penalty(logits: mx.array, tokens: mx.array, penalty: float, context_size: int) -> mx.array:
    """CTRL-style penalty (as in Hugging Face) on each distinct token among the last ``context_size`` columns:
    a positive logit is divided by ``penalty``, a negative one multiplied, so penalty > 1 always discourages."""
    if not (math.isfinite(penalty) and penalty > 0):
        raise ValueError(f"penalty must be a finite number > 0, got {penalty}")
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    _check_history(logits, tokens)
    if penalty == 1.0 or tokens.shape[1] == 0:
        return logits
    batch, vocab = logits.shape
    window = _scatter_index(tokens[:, -context_size:], vocab)
    # A set, not a count: put (not add) makes repeats in the window count once.
    seen = mx.put_along_axis(mx.zeros((batch, vocab + 1), mx.bool_), window, mx.array(True), axis=-1)[:, :vocab]
    penalized = mx.where(logits < 0, logits * penalty, logits / penalty)
    return mx.where(seen, penalized, logits)


def apply_presence_frequency(
    logits: mx.array, tokens: mx.array, n_generated: int, presence: float, frequency: float
) -> mx.array:
    """OpenAI's rule over the generated tokens only: logit - presence * [count > 0] - frequency * count."""
    _check_history(logits, tokens)
    if not 0 <= n_generated <= tokens.shape[1]:
        raise ValueError(f"n_generated must be in [0, {tokens.shape[1]}], got {n_generated}")
    if n_generated == 0 or (presence == 0.0 and frequency == 0.0):
        return logits
    batch, vocab = logits.shape
    generated = _scatter_index(tokens[:, tokens.shape[1] - n_generated :], vocab)
    # Counts in float32: exact well past bfloat16's 256, cast once at the end.
    counts = mx.zeros((batch, vocab + 1), mx.float32).at[mx.arange(batch)[:, None], generated].add(1.0)[:, :vocab]
    penalty = presence * (counts > 0).astype(mx.float32) + frequency * counts
    return logits - penalty.astype(logits.dtype)


def _bias_arrays(bias: Mapping[int, float] | Iterable[tuple[int, float]]) -> tuple[mx.array, mx.array, int]:
    pairs = _normalize_logit_bias(bias) or ()
    ids = mx.array([t for t, _ in pairs], mx.int32)
    values = mx.array([v for _, v in pairs], mx.float32)
    return ids, values, max((t for t, _ in pairs), default=-1)


def _add_bias(logits: mx.array, ids: mx.array, values: mx.array, max_id: int) -> mx.array:
    if max_id < 0:
        return logits
    if max_id >= logits.shape[-1]:
        raise ValueError(f"logit_bias token id {max_id} is outside the vocabulary of size {logits.shape[-1]}")
    # Ids are distinct (normalised), so a scatter-add is a plain per-column add.
    return logits.at[:, ids].add(values.astype(logits.dtype))


def apply_logit_bias(logits: mx.array, bias: Mapping[int, float] | Iterable[tuple[int, float]]) -> mx.array:
    """Add ``bias[token]`` to every row's logit for each token id in ``bias`` (-inf bans a token)."""
    return _add_bias(logits, *_bias_arrays(bias))


def make_logits_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """The active processors for ``params``, in application order; empty when all are off, so unused
    features cost nothing.

    Order: repetition penalty first, on the model's own logits (its sign-dependent rule is meant for those),
    then presence/frequency, then the user's logit bias last so that a -inf ban survives.
    """
    processors: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        penalty, context = params.repetition_penalty, params.repetition_context_size
        processors.append(lambda logits, tokens, n: apply_repetition_penalty(logits, tokens, penalty, context))
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        presence, frequency = params.presence_penalty, params.frequency_penalty
        processors.append(lambda logits, tokens, n: apply_presence_frequency(logits, tokens, n, presence, frequency))
    if params.logit_bias:
        # Built once, not per step.
        ids, values, max_id = _bias_arrays(params.logit_bias)
        processors.append(lambda logits, tokens, n: _add_bias(logits, ids, values, max_id))
    return processors


def _filters(params: SamplingParams) -> list[Callable[[mx.array], mx.array]]:
    filters: list[Callable[[mx.array], mx.array]] = []
    if params.top_k > 0:
        filters.append(lambda lp: apply_top_k(lp, params.top_k))
    if params.top_p < 1.0:
        filters.append(lambda lp: apply_top_p(lp, params.top_p))
    if params.min_p > 0.0:
        filters.append(lambda lp: apply_min_p(lp, params.min_p))
    return filters


def make_sampler(params: SamplingParams) -> Sampler:
    """A function (batch, vocab) logprobs -> (batch,) token ids.

    With a seed, draws come from a private key sequence, so results repeat across runs whatever else uses the
    global random state.
    """
    if params.temperature == 0.0:
        return greedy

    filters = _filters(params)
    key = [mx.random.key(params.seed)] if params.seed is not None else None
    inv_temp = 1.0 / params.temperature

    def sample(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        if key is None:
            return mx.random.categorical(logprobs * inv_temp, axis=-1)
        key[0], draw_key = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inv_temp, axis=-1, key=draw_key)

    return sample


def make_distribution(params: SamplingParams) -> Callable[[mx.array], mx.array]:
    """A function (batch, vocab) logprobs -> (batch, vocab) float32 probabilities: exactly the distribution
    ``make_sampler(params)`` draws from (one-hot on the argmax at temperature 0). Speculative decoding's
    rejection step needs it explicitly."""
    if params.temperature == 0.0:
        return lambda logprobs: (
            mx.arange(logprobs.shape[-1])[None] == mx.argmax(logprobs, axis=-1, keepdims=True)
        ).astype(mx.float32)
    filters = _filters(params)
    inv_temp = 1.0 / params.temperature

    def distribution(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        return mx.softmax(logprobs.astype(mx.float32) * inv_temp, axis=-1)

    return distribution


def process_and_sample(
    logits: mx.array,
    processors: Iterable[LogitsProcessor],
    history: mx.array | None,
    n_generated: int,
    sampler: Sampler,
) -> tuple[mx.array, mx.array]:
    """Run the logits processors, then draw: (token ids, the log-probabilities they were drawn from)."""
    for process in processors:
        logits = process(logits, history, n_generated)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if sampler is greedy:
        # argmax needs no normalisation; the log-softmax stays lazy and costs nothing unless read.
        return mx.argmax(logits, axis=-1), logprobs
    return sampler(logprobs), logprobs
