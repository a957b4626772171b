"""Sampling: small pure functions over log-probabilities, composed by ``make_sampler``.

Each filter maps (batch, vocab) log-probabilities to log-probabilities with the excluded tokens at -inf; the
final draw is greedy at temperature 0 and categorical otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

__all__ = ["SamplingParams", "make_sampler", "apply_top_p", "apply_top_k", "apply_min_p"]

Sampler = Callable[[mx.array], mx.array]
NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")


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


def make_sampler(params: SamplingParams) -> Sampler:
    """A function (batch, vocab) logprobs -> (batch,) token ids.

    With a seed, draws come from a private key sequence, so results repeat across runs whatever else uses the
    global random state.
    """
    if params.temperature == 0.0:
        return greedy

    filters: list[Callable[[mx.array], mx.array]] = []
    if params.top_k > 0:
        filters.append(lambda lp: apply_top_k(lp, params.top_k))
    if params.top_p < 1.0:
        filters.append(lambda lp: apply_top_p(lp, params.top_p))
    if params.min_p > 0.0:
        filters.append(lambda lp: apply_min_p(lp, params.min_p))

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
