"""One request and the rules it follows token by token, shared by the single-stream loop and the batch engine.

A ``Request`` is what a caller hands the runtime: the processor's inputs and the typed options. A
``RequestState`` applies the per-request rules to each token once it is chosen (the thinking budget's forced
tokens, end of sequence, stop strings, the length limit, log-probabilities, the streamed text) and keeps the
request's counters and clock. ``GenerationResult`` is the one event type every loop emits, one per token.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import mlx.core as mx

from .field_types import check_field_types
from .protocols import PromptProcessor
from .sampling import (
    MAX_TOP_LOGPROBS,
    LogitsProcessor,
    SamplingParams,
    greedy,
    make_logits_processors,
    make_sampler,
    process_and_sample,
    top_logprobs,
)
from .text_output import TextDelta, TextOutput
from .thinking import ThinkingBudget, ThinkingConfig, prompt_opens_thinking, resolve_thinking_tokens

__all__ = ["FinishReason", "GenerationConfig", "GenerationResult", "Request", "RequestState"]

FinishReason = Literal["stop", "length", "cancelled", "error"]
""""stop": an end-of-sequence token or a stop string; "length": max_tokens; "cancelled": the caller (or a
shutdown) stopped it; "error": it failed (``GenerationResult.error`` says why)."""


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
    num_draft_tokens: int = 4
    """With a drafter: the most tokens it proposes per round (``DraftSchedule`` adapts below that)."""
    compile_decode: bool | None = None
    """Decode through a compiled step over fixed-size caches where every layer's cache allows it (the same
    tokens, less host work per token); False builds each step's graph anew. None: where it was measured to be
    faster, the CPU (about 25% less CPU time per token); on an H200 with MLX 0.32.4 the plain step was 5-10%
    faster (the device, not the host, bounds a step there, and the fixed-size caches' masked attention is
    unfused), so GPUs build it anew."""

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be >= 1, got {self.prefill_step_size}")
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")
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
class Request:
    """One prompt to generate from: the processor's inputs (``input_ids`` of shape (1, length), pixel values,
    ...; MLX or numpy arrays) and how to generate. ``constraints`` are the request's own logits processors (a
    grammar, say), run after the sampling ones; each sees the request's token history, so it may keep state."""

    inputs: Mapping[str, Any]
    sampling: SamplingParams = SamplingParams()
    config: GenerationConfig = GenerationConfig()
    thinking: ThinkingConfig = ThinkingConfig()
    constraints: tuple[LogitsProcessor, ...] = ()
    prefix_cache_tenant: str = ""
    """The prefix cache's namespace for this request: blocks are shared only between requests of one tenant."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "constraints", tuple(self.constraints))

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt's token ids; a batch of prompts is refused (one request is one prompt)."""
        ids = self.inputs["input_ids"]
        shape = tuple(getattr(ids, "shape", ()))
        if len(shape) != 2 or shape[0] != 1:
            raise ValueError(f"submit one prompt at a time: input_ids of shape (1, length), got {shape}")
        return [int(t) for t in (ids[0].tolist() if hasattr(ids, "tolist") else ids[0])]


@dataclass(frozen=True)
class GenerationResult:
    """One generated token of one request (for ``generate``: the whole answer)."""

    text: str
    """The answer text this token completed: may be empty while a character or a possible stop string is held
    back (the whole answer for ``generate``)."""
    token: int | None
    """None on an event that carries no token (nothing generated, cancelled, failed)."""
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory: float
    """Peak device memory in GB (since the request started, for single-stream generation)."""
    finish_reason: FinishReason | None = None
    """None while the request runs; set on its last event."""
    reasoning: str = ""
    """Text inside the thinking block that this token completed (all of it for ``generate``)."""
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    """(token, logprob) alternatives, most likely first."""
    cached_tokens: int = 0
    """Prompt tokens reused from the prompt cache instead of being computed."""
    uid: int = 0
    """Which request of a batch engine this event belongs to."""
    stop_string: str | None = None
    """The stop string that ended the request, when one did."""
    error: str | None = None
    """Why the request failed, on its last event when finish_reason is "error"."""
    draft_tokens: int = 0
    """With speculative decoding: tokens the drafter proposed so far."""
    accepted_draft_tokens: int = 0
    """Of those, the ones the target kept (their share is the acceptance rate)."""

    @classmethod
    def ended(
        cls,
        uid: int,
        reason: FinishReason,
        *,
        prompt_tokens: int = 0,
        generated: int = 0,
        error: Exception | str | None = None,
    ) -> GenerationResult:
        """The last event of a request that ends without a token (cancelled, failed, or nothing to generate)."""
        message = error if error is None or isinstance(error, str) else f"{type(error).__name__}: {error}"
        return cls("", None, prompt_tokens, generated, 0.0, 0.0, 0.0, reason, uid=uid, error=message)


@dataclass
class RequestState:
    """A running request: its sampler and logits processors, text output, thinking budget and counters.

    Build it with ``RequestState.start``. Loops call ``choose`` for the model's token (or sample elsewhere),
    ``resolve`` for the token to emit in its place (the thinking budget may force one), then ``emit``, which
    applies the stopping rules and returns the event; ``finish`` is set once the request is done.
    """

    uid: int
    config: GenerationConfig
    sampler: Any
    processors: list[LogitsProcessor]
    text: TextOutput
    budget: ThinkingBudget | None
    eos: frozenset[int]
    prompt_tokens: int
    history: mx.array | None
    """Prompt and emitted tokens, (1, n), kept only where a logits processor reads it."""
    cached_tokens: int = 0
    generated: int = 0
    last_token: int | None = None
    """The last emitted token: what the model is fed at the next step."""
    finish: FinishReason | None = None
    draft_stats: Any = None
    """A ``speculative.SpeculativeStats`` while a drafter proposes tokens for this request."""
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    prompt_tps: float = 0.0

    @classmethod
    def start(
        cls, request: Request, processor: PromptProcessor, *, uid: int = 0, cached_tokens: int = 0
    ) -> RequestState:
        """The state of ``request`` before its first token; the clock starts now. Raises ValueError for a
        request that cannot run (a batch of prompts, thinking tokens the tokenizer does not know)."""
        prompt = request.prompt_ids
        marks = resolve_thinking_tokens(request.thinking, processor.encode, processor.thinking_markers)
        inside = marks is not None and prompt_opens_thinking(prompt, marks)
        budget = None
        if marks is not None and request.thinking.budget is not None:
            budget = ThinkingBudget(marks, request.thinking.budget, inside=inside)
        processors = make_logits_processors(request.sampling) + list(request.constraints)
        config = request.config
        return cls(
            uid=uid,
            config=config,
            sampler=make_sampler(request.sampling),
            processors=processors,
            text=TextOutput(processor.decode, thinking=marks, inside_thinking=inside, stop=config.stop),
            budget=budget,
            eos=frozenset() if config.ignore_eos else processor.eos_token_ids,
            prompt_tokens=len(prompt),
            history=mx.array([prompt], mx.int32) if processors else None,
            cached_tokens=cached_tokens,
        )

    @property
    def plain(self) -> bool:
        """Greedy with nothing to process or report: a batch's argmax over all rows serves it."""
        return not self.processors and not self.config.wants_logprobs and self.sampler is greedy

    def choose(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """The model's choice for this request's next token, and the log-probabilities it was drawn from."""
        return process_and_sample(logits, self.processors, self.history, self.generated, self.sampler)

    def resolve(self, chosen: int) -> int:
        """The token to emit instead of ``chosen`` (the thinking budget closing its block), or ``chosen``.
        Call it once per emitted token, before ``emit``."""
        forced = self.budget(self.last_token) if self.budget is not None else None
        return chosen if forced is None else forced

    def emit(self, token: int, logprobs: mx.array | None = None) -> GenerationResult:
        """Emit ``token``: the stopping rules decide whether the request ends with it."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            self.prompt_tps = (self.prompt_tokens - self.cached_tokens) / max(now - self.started, 1e-9)
        self.last_token = token
        if self.history is not None:
            self.history = mx.concatenate([self.history, mx.array([[token]], mx.int32)], axis=1)
        lp = self._read_logprobs(logprobs, token) if logprobs is not None and self.config.wants_logprobs else None
        if token in self.eos:
            delta, finish = self.text.finish(), "stop"
        else:
            self.generated += 1
            delta = self.text.add(token)
            finish = "stop" if delta.stopped else None
            if finish is None and self.generated >= self.config.max_tokens:
                tail = self.text.finish()
                delta, finish = TextDelta(delta.text + tail.text, delta.reasoning + tail.reasoning), "length"
        self.finish = finish
        return self._result(delta, token, finish, lp, now)

    def end(self, reason: FinishReason, error: Exception | str | None = None) -> GenerationResult:
        """End the request without a token: nothing to generate ("length" at max_tokens 0), cancelled, failed."""
        self.finish = reason
        return GenerationResult.ended(
            self.uid, reason, prompt_tokens=self.prompt_tokens, generated=self.generated, error=error
        )

    def _result(
        self, delta: TextDelta, token: int, finish: FinishReason | None, lp: Any, now: float
    ) -> GenerationResult:
        chosen, top = lp if lp is not None else (None, ())
        decode_time = now - (self.first_token_at or now)
        return GenerationResult(
            text=delta.text,
            token=token,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generated,
            prompt_tps=self.prompt_tps,
            generation_tps=(self.generated - 1) / decode_time if self.generated > 1 and decode_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            reasoning=delta.reasoning,
            logprob=chosen,
            top_logprobs=top,
            cached_tokens=self.cached_tokens,
            uid=self.uid,
            stop_string=self.text.matched_stop if finish == "stop" else None,
            draft_tokens=self.draft_stats.drafted if self.draft_stats is not None else 0,
            accepted_draft_tokens=self.draft_stats.accepted if self.draft_stats is not None else 0,
        )

    def _read_logprobs(self, logprobs: mx.array, token: int) -> tuple[float, tuple[tuple[int, float], ...]]:
        chosen = logprobs[0, token].item()
        if self.config.top_logprobs == 0:
            return chosen, ()
        ids, values = top_logprobs(logprobs, self.config.top_logprobs)
        return chosen, tuple(zip(ids[0].tolist(), values[0].tolist()))
