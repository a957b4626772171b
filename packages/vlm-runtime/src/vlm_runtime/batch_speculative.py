"""Speculative decoding inside the batching engine: each row drafts, and keeps, its own number of tokens.

One decode step feeds every row its last token and its own proposals (rows that propose fewer are filled out
with repeats, whose logits nobody reads) and reads the target at every position. Each row then accepts as the
single-stream loop does (``speculative``): position i decides the row's token i with the request's own rules
(processors and grammar, sampler, thinking budget, stop strings, logprobs, the length limit), and the first
token that is not the proposal ends its round. Sampling a token and keeping the proposal exactly when the two
agree is the rejection rule for a drafter that proposes deterministically, so sampled rows keep the target's
distribution, drawn from the request's own key sequence.

Afterwards every row drops the positions past what it kept (``trim_rows`` keeps the rows right-aligned), so each
row's cache holds exactly what plain batched decoding would have fed it: greedy rows give the same tokens.
Caches that cannot take tokens back (a recurrent state) decode plainly: the engine says so once.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .batch_cache import batch_cache_like
from .batch_drafter import DraftsRows, RowDraft, RowsDrafter
from .protocols import GenerativeModel
from .request import GenerationResult, RequestState
from .speculative import Drafter, DraftSchedule, SpeculativeStats, draft_mask, target_forward

__all__ = ["BatchDrafting", "rows_can_roll_back"]


def rows_can_roll_back(layers: Sequence[Any]) -> bool:
    """Whether the batched twins of these (single-request) layers can take back each row's rejected proposals."""
    return all(batch_cache_like(layer, [0]).can_trim_rows() for layer in layers)


@dataclass
class _Row:
    drafter: Drafter | None
    """Its own drafter, or None where the batch's drafts together (``batch_drafter``)."""
    inputs: Mapping[str, mx.array]
    schedule: DraftSchedule
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)
    emitted: list[int] = field(default_factory=list)
    begun: bool = False
    prompt_features: mx.array | None = None
    kept: list[mx.array] = field(default_factory=list)
    """The target's features at the positions it kept since the drafter's last proposal (drafters that read
    them)."""

    def prompt_sequence(self) -> list[int]:
        return [int(t) for t in self.inputs["input_ids"][0].tolist()]

    def take_kept(self) -> mx.array | None:
        if not self.kept:
            return None
        features = mx.concatenate(self.kept, axis=1)
        self.kept = []
        return features


class BatchDrafting:
    """The drafters of a batch's rows (one per request, spawned from ``drafter``) and the speculative decode step."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.layers = tuple(drafter.target_layers)
        """The target's layers whose hidden states the drafters read (the engine's prefill taps them too)."""
        self._rows: dict[int, _Row] = {}
        self._together: RowsDrafter | None = None
        """One drafter for every row, where the drafter can (a separate model, reading no features)."""
        if isinstance(drafter, DraftsRows) and not self.layers:
            try:
                self._together = drafter.for_batch()
            except ValueError:  # a draft model that cannot draft batched: its rows draft alone (or say why not)
                self._together = None

    def prefilled(self, uid: int, features: mx.array) -> None:
        """The target's features at the prompt positions it just computed for request ``uid``."""
        row = self._rows.get(uid)
        if row is not None:
            row.prompt_features = features

    def admit(self, state: RequestState, inputs: Mapping[str, mx.array]) -> None:
        """Give a request its drafter (it takes the prompt at its first speculative step)."""
        own = None if self._together is not None else self.drafter.spawn()
        row = _Row(own, inputs, DraftSchedule(most=state.config.num_draft_tokens))
        self._rows[state.uid] = row
        state.draft_stats = row.stats

    def saw(self, events: Sequence[GenerationResult]) -> None:
        """Follow the emitted tokens (in order) and forget the requests that ended."""
        for event in events:
            row = self._rows.get(event.uid)
            if row is None:
                continue
            if event.finish_reason is not None:
                del self._rows[event.uid]
            elif event.token is not None:
                row.emitted.append(event.token)

    def step(self, model: GenerativeModel, cache: list[Any], rows: Sequence[RequestState]) -> list[GenerationResult]:
        """One verify pass over every row; returns the events (one or more per row)."""
        proposals = self._propose_together(rows) if self._together is not None else [self._propose(s) for s in rows]
        width = 1 + max(map(len, proposals))
        ids = mx.array(
            [[state.last_token, *p, *[state.last_token] * (width - 1 - len(p))] for state, p in zip(rows, proposals)],
            mx.int32,
        )
        hidden, features = target_forward(model, model.embed_tokens(ids), cache, self.layers)
        logits = model.compute_logits(hidden)
        # Greedy rows with nothing to process take their tokens from one argmax over every position.
        chosen = mx.argmax(logits, axis=-1).tolist() if all(state.plain for state in rows) else None
        events: list[GenerationResult] = []
        kept = [self._accept(state, p, logits, b, chosen, events) for b, (state, p) in enumerate(zip(rows, proposals))]
        if features is not None:
            for b, (state, k) in enumerate(zip(rows, kept)):
                row = self._rows.get(state.uid)
                if row is not None and state.finish is None:
                    row.kept.append(features[b : b + 1, :k])
        running = [k for state, k in zip(rows, kept) if state.finish is None]
        if width > 1 and running:
            most = max(running)  # finished rows leave at this step: keep them as they are, moving nothing
            dropped = [width - (k if state.finish is None else most) for state, k in zip(rows, kept)]
            for layer in cache:
                layer.trim_rows(dropped)
        return events

    def _wanted(self, state: RequestState) -> int:
        """How many tokens the row drafts this round. The round's last token comes from the target itself:
        never more proposals than tokens left after it."""
        row = self._rows.get(state.uid)
        return 0 if row is None else min(row.schedule.next(), state.config.max_tokens - state.generated - 1)

    def _propose_together(self, rows: Sequence[RequestState]) -> list[list[int]]:
        assert self._together is not None
        asks = []
        for state in rows:
            row = self._rows.get(state.uid)
            if row is None:
                continue
            n = self._wanted(state)
            mask = draft_mask(state.processors, state.history, state.generated) if n > 0 else None
            asks.append(RowDraft(state.uid, row.inputs, row.prompt_sequence() + row.emitted, n, mask))
        try:
            drafted = dict(zip((a.uid for a in asks), self._together.propose_rows(asks))) if asks else {}
        except Exception as exc:  # a failing drafter costs the batch its speed-up, never its tokens
            self._together, self._rows = None, {}
            warnings.warn(f"speculative decoding stopped: {type(exc).__name__}: {exc}", stacklevel=2)
            return [[] for _ in rows]
        out = []
        for state, ask in zip(rows, _aligned(rows, asks)):
            proposals = list(drafted.get(state.uid, []))[: ask.n if ask is not None else 0]
            row = self._rows.get(state.uid)
            if row is not None and ask is not None and ask.n > 0:
                row.stats.drafted += len(proposals)
                row.stats.rounds += 1
            out.append(proposals)
        return out

    def _propose(self, state: RequestState) -> list[int]:
        row = self._rows.get(state.uid)
        if row is None:
            return []
        n = self._wanted(state)
        if n <= 0:
            return []
        assert row.drafter is not None
        try:
            if not row.begun:
                row.drafter.begin(row.inputs, row.prompt_features)
                row.begun, row.prompt_features = True, None
            mask = draft_mask(state.processors, state.history, state.generated)
            proposals = list(row.drafter.propose(row.emitted, n, row.take_kept(), mask))[:n]
        except Exception as exc:  # a failing drafter costs its request the speed-up, never its tokens or the batch
            del self._rows[state.uid]
            warnings.warn(f"speculative decoding stopped for a request: {type(exc).__name__}: {exc}", stacklevel=2)
            return []
        row.stats.drafted += len(proposals)
        row.stats.rounds += 1
        return proposals

    def _accept(
        self,
        state: RequestState,
        proposals: list[int],
        logits: mx.array,
        b: int,
        chosen: list[list[int]] | None,
        events: list[GenerationResult],
    ) -> int:
        """Emit row ``b``'s tokens for this round; returns how many of its fed positions stay in the cache."""
        row = self._rows.get(state.uid)
        accepted = 0
        for i in range(len(proposals) + 1):
            logprobs = None
            if chosen is not None:
                choice = chosen[b][i]
            else:
                try:
                    token, logprobs = state.choose(logits[b : b + 1, i])
                except Exception as exc:  # the request's own processor (a grammar) failed: it ends alone
                    events.append(state.end("error", exc))
                    break
                choice = int(token.item())
            value = state.resolve(choice)
            events.append(state.emit(value, logprobs))
            if state.finish is not None or i == len(proposals) or value != proposals[i]:
                break
            accepted += 1
            if row is not None:
                row.stats.accepted += 1
        if row is not None:
            row.schedule.record(len(proposals), accepted)
        return 1 + accepted


def _aligned(rows: Sequence[RequestState], asks: Sequence[RowDraft]) -> list[RowDraft | None]:
    """Each row's ask (None for a row that drafts no more)."""
    by_uid = {ask.uid: ask for ask in asks}
    return [by_uid.get(state.uid) for state in rows]
