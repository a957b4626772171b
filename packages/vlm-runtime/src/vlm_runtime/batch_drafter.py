"""A draft model drafting for every row of a batch in shared forward passes.

Per-row drafters (``Drafter.spawn``) each run the draft model at batch 1, one row after another; a drafter that
is a separate model can instead keep all the rows in one batched cache (``batch_cache``) and step them together:
one pass feeds every row the tokens it has not seen, then each draft step feeds every row its last proposal.
Rows feed different numbers of real tokens, so the shorter ones are filled out with filler columns afterwards
taken back by ``trim_rows``, which keeps the rows right-aligned. A row's cache holds exactly the tokens recorded
as fed to it (its proposals included, until a later round finds the target kept something else and trims them).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx

from .batch_cache import batch_cache_like, merge_caches
from .prefill import prefill
from .protocols import GenerativeModel
from .speculative import DraftMask, masked_argmax

__all__ = ["BatchedModelDrafter", "DraftsRows", "RowDraft", "RowsDrafter"]


@dataclass
class RowDraft:
    """What one row asks of a round: its prompt inputs (media included), every token so far, how many to draft."""

    uid: int
    inputs: Mapping[str, mx.array]
    sequence: list[int]
    """The prompt and every emitted token, in order."""
    n: int
    mask: DraftMask | None = None


class RowsDrafter(Protocol):
    def propose_rows(self, rows: Sequence[RowDraft]) -> list[list[int]]:
        """Each row's proposals (up to its ``n``); the rows not named any more are forgotten."""
        ...


@runtime_checkable
class DraftsRows(Protocol):
    """A drafter that can draft for a whole batch at once (the batching engine then prefers it to ``spawn``)."""

    def for_batch(self) -> RowsDrafter: ...


FILLER = 0
"""The token fed where a row has nothing to feed; its columns are taken back before anyone reads them."""


class BatchedModelDrafter:
    """The ``draft`` kind's batched form: one batched cache for the draft model over the engine's rows."""

    def __init__(self, model: GenerativeModel, prefill_step_size: int = 2048) -> None:
        """Raises ValueError for a draft model whose batched caches cannot take tokens back (recurrent layers)."""
        try:
            trimmable = all(batch_cache_like(layer, [0]).can_trim_rows() for layer in model.make_cache())
        except TypeError:  # a cache kind that cannot be batched at all
            trimmable = False
        if not trimmable:
            raise ValueError("the draft model's batched caches cannot take proposals back (recurrent layers)")
        self.model = model
        self.prefill_step_size = prefill_step_size
        self._cache: list[Any] | None = None
        self._uids: list[int] = []
        self._fed: dict[int, list[int]] = {}

    def propose_rows(self, rows: Sequence[RowDraft]) -> list[list[int]]:
        self._follow(rows)
        by_uid = {row.uid: row for row in rows}
        order = [by_uid[uid] for uid in self._uids]
        logits = self._catch_up(order)
        if logits is None:
            return [[] for _ in rows]
        proposals = self._draft(order, logits)
        return [proposals[uid] for uid in (row.uid for row in rows)]

    # -- membership
    def _follow(self, rows: Sequence[RowDraft]) -> None:
        """Forget the rows that left; prefill the ones that joined, each alone, and merge them in."""
        wanted = {row.uid for row in rows}
        keep = [i for i, uid in enumerate(self._uids) if uid in wanted]
        if len(keep) < len(self._uids):
            for uid in self._uids:
                if uid not in wanted:
                    del self._fed[uid]
            self._uids = [self._uids[i] for i in keep]
            if not keep:
                self._cache = None
            else:
                assert self._cache is not None
                for layer in self._cache:
                    layer.filter(keep)
        joining = [row for row in rows if row.uid not in self._fed]
        if not joining:
            return
        prefilled = [self._prefill(row) for row in joining]
        layers = zip(*prefilled)
        running = self._cache or [None] * len(prefilled[0])
        self._cache = [
            merge_caches(([old] if old is not None else []) + list(new)) for old, new in zip(running, layers)
        ]
        for row in joining:
            self._uids.append(row.uid)
            self._fed[row.uid] = [int(t) for t in row.inputs["input_ids"][0].tolist()]

    def _prefill(self, row: RowDraft) -> list[Any]:
        cache = self.model.make_cache()
        ids = row.inputs["input_ids"]
        try:
            prompt = self.model.embed_prompt(**row.inputs)
        except (TypeError, ValueError) as exc:
            warnings.warn(
                f"the draft model does not take this prompt's media ({exc}); it drafts from the text", stacklevel=3
            )
            prompt = self.model.embed_prompt(input_ids=ids)
        prefill(self.model, prompt, cache, self.prefill_step_size)
        return cache

    # -- feeding
    def _feed(self, columns: list[list[int]]) -> mx.array:
        """Feed one (row, token) grid; returns the logits at every column."""
        ids = mx.array(columns, mx.int32)
        hidden = self.model.hidden_states(self.model.embed_tokens(ids), cache=self._cache)
        return self.model.compute_logits(hidden)

    def _trim(self, dropped: list[int]) -> None:
        if any(dropped):
            assert self._cache is not None
            for layer in self._cache:
                layer.trim_rows(dropped)

    def _catch_up(self, order: list[RowDraft]) -> mx.array | None:
        """Take back what each drafting row fed past what the target kept, feed what it has not seen; returns
        each row's logits after its last token (None when no row drafts)."""
        unseen: list[list[int]] = []
        dropped: list[int] = []
        for row in order:
            fed = self._fed[row.uid]
            if row.n <= 0:
                unseen.append([])
                dropped.append(0)
                continue
            common = min(_common_prefix(fed, row.sequence), len(row.sequence) - 1)  # its last token: for logits
            dropped.append(len(fed) - common)
            self._fed[row.uid] = fed[:common]
            unseen.append(row.sequence[common:])
        width = max(map(len, unseen))
        if width == 0:
            return None
        self._trim(dropped)
        logits = self._feed([u + [FILLER] * (width - len(u)) for u in unseen])
        self._trim([width - len(u) for u in unseen])
        for row, tokens in zip(order, unseen):
            self._fed[row.uid].extend(tokens)
        last = mx.array([max(len(u) - 1, 0) for u in unseen])
        return mx.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]

    def _draft(self, order: list[RowDraft], logits: mx.array) -> dict[int, list[int]]:
        """Greedy drafts, every row stepping together. A row's last proposal is fed only while another row still
        drafts; a row that is done feeds filler, taken back at the end (its columns are all after its real ones)."""
        proposals: dict[int, list[int]] = {row.uid: [] for row in order}
        active = [row.n > 0 for row in order]
        filler = [0] * len(order)
        for _ in range(max(row.n for row in order)):
            columns: list[int | None] = []
            for b, row in enumerate(order):
                token = masked_argmax(logits[b : b + 1], row.mask, proposals[row.uid]) if active[b] else None
                if token is None:
                    active[b] = False
                else:
                    proposals[row.uid].append(token)
                    active[b] = len(proposals[row.uid]) < row.n
                columns.append(token)
            if not any(active):
                break
            logits = self._feed([[FILLER if t is None else t] for t in columns])[:, 0]
            for b, (row, token) in enumerate(zip(order, columns)):
                if token is None:
                    filler[b] += 1
                else:
                    self._fed[row.uid].append(token)
        self._trim(filler)
        return proposals


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
