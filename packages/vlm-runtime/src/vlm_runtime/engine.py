"""A generation engine for servers: one thread owns the model and a ``BatchGenerator``; callers on any thread
(or asyncio loop) submit requests and read their events from a stream.

Requests join the running batch between two decode steps (each is prefilled alone, images included) and leave
when they finish; a cancelled request, such as one whose client went away, frees its slot at the next step.
The engine knows nothing about HTTP or chat formats: it takes prepared inputs and gives back ``GenerationResult``s.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx

from .batch import BatchGenerator
from .cache_settings import CacheSettings
from .prefix_cache import PrefixCache
from .protocols import GenerativeModel, PromptProcessor
from .request import GenerationResult, Request
from .speculative import Drafter

__all__ = ["Engine", "EngineBusy", "EngineStats", "RequestStream"]

LATENCY_WINDOW = 1024
"""How many finished requests the latency percentiles look back over."""


class EngineBusy(RuntimeError):
    """The engine's waiting queue is full (or the engine is shut down); retry later."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters since it started."""

    requests: int
    finished: int
    cancelled: int
    errors: int
    active: int
    waiting: int
    prompt_tokens: int
    generation_tokens: int
    uptime_s: float
    busy_s: float
    """Seconds spent inside decode steps: generation_tokens / busy_s is the throughput while working."""
    time_to_first_token_s: dict[str, float] = field(default_factory=dict)
    latency_s: dict[str, float] = field(default_factory=dict)
    """Percentiles (p50, p90, p99) over the last LATENCY_WINDOW finished requests."""
    draft_tokens: int = 0
    """With speculative decoding: tokens the drafters proposed for the requests that ended."""
    accepted_draft_tokens: int = 0
    """Of those, the ones the target kept."""


class RequestStream:
    """The events of one request, in order; the last has a ``finish_reason``. Iterate it (``for`` on a plain
    thread, ``async for`` on the asyncio loop it was submitted from); ``cancel()`` stops the request."""

    def __init__(self, engine: Engine, request_id: int, loop: asyncio.AbstractEventLoop | None) -> None:
        self._engine = engine
        self.request_id = request_id
        self._loop = loop
        self._async_queue: asyncio.Queue[GenerationResult] | None = asyncio.Queue() if loop is not None else None
        self._sync_queue: queue.SimpleQueue[GenerationResult] = queue.SimpleQueue()
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.done = False

    @property
    def pending(self) -> int:
        """Events delivered but not read yet."""
        return self._async_queue.qsize() if self._async_queue is not None else self._sync_queue.qsize()

    def cancel(self) -> None:
        """Stop generating; the stream then ends with a "cancelled" event. A no-op once the request is done."""
        if not self.done:
            self._engine._cancel(self)

    def _put(self, event: GenerationResult) -> None:
        """Called on the engine thread (plain streams) or on the stream's loop (asyncio streams)."""
        if self._async_queue is None:
            self._sync_queue.put(event)
        else:
            self._async_queue.put_nowait(event)

    def __iter__(self) -> Iterator[GenerationResult]:
        if self._loop is not None:
            raise TypeError("this stream was submitted from an asyncio loop; use `async for`")
        while not self.done:
            event = self._sync_queue.get()
            self.done = event.finish_reason is not None
            yield event

    async def __aiter__(self) -> AsyncIterator[GenerationResult]:
        if self._async_queue is None:
            raise TypeError("this stream was submitted outside an asyncio loop; use `for`")
        while not self.done:
            event = await self._async_queue.get()
            self.done = event.finish_reason is not None
            yield event


@dataclass
class _Submission:
    stream: RequestStream
    request: Request


class Engine:
    """Continuous batching on a thread of its own. ``submit`` and ``cancel`` are thread-safe; everything that
    touches the model happens on the engine thread."""

    def __init__(
        self,
        model: GenerativeModel,
        processor: PromptProcessor,
        *,
        max_batch_size: int = 32,
        max_waiting: int = 1024,
        prefill_step_size: int = 2048,
        vision_cache: Any = None,
        cache_settings: CacheSettings = CacheSettings(),
        prefix_cache: PrefixCache | None = None,
        drafter: Drafter | None = None,
    ) -> None:
        """``prefix_cache``: shared prompt prefixes reuse its blocks (the engine's thread is its only writer;
        ``prefix_cache.stats()`` and ``reset()`` may be called from any thread). ``drafter``: decode
        speculatively, each request with its own ``drafter.spawn()`` (``BatchGenerator``)."""
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.model, self.processor = model, processor
        # MLX streams belong to the thread that made them: arrays still lazy from loading (weights, rotary
        # tables) would be evaluated on the engine thread against the loading thread's stream, which MLX refuses.
        mx.eval(list(_arrays_in(model)), list(_arrays_in(drafter)) if drafter is not None else [])
        self.max_batch_size, self.max_waiting = max_batch_size, max_waiting
        self.vision_cache = vision_cache
        self.prefix_cache = prefix_cache
        self._make_generator = lambda: BatchGenerator(
            model,
            processor,
            max_batch_size=max_batch_size,
            prefill_step_size=prefill_step_size,
            vision_cache=vision_cache,
            cache_settings=cache_settings,
            prefix_cache=prefix_cache,
            drafter=drafter,
        )
        self._generator = self._make_generator()
        self.drafting = self._generator.drafting
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: list[_Submission] = []
        self._cancels: list[RequestStream] = []
        self._streams: dict[int, RequestStream] = {}
        self._closing = False
        self._started = time.perf_counter()
        self._counts = dict(
            requests=0,
            finished=0,
            cancelled=0,
            errors=0,
            prompt_tokens=0,
            generation_tokens=0,
            draft_tokens=0,
            accepted_draft_tokens=0,
        )
        self._busy_s = 0.0
        self._ttft: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._latency: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._active = 0
        self._waiting = 0
        self._thread = threading.Thread(target=self._run, name="vlm-engine", daemon=True)
        self._thread.start()

    # -- the callers' side
    def submit(self, request: Request) -> RequestStream:
        """Queue one request. Its inputs may be numpy arrays: they become MLX arrays on the engine thread, where
        its ``constraints`` run too. Raises ``EngineBusy`` when the waiting queue is full."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            if self._closing:
                raise EngineBusy("the engine is shut down")
            if self._waiting + len(self._incoming) >= self.max_waiting + max(0, self.max_batch_size - self._active):
                raise EngineBusy(f"too many requests waiting ({self.max_waiting}); retry later")
            stream = RequestStream(self, next(self._ids), loop)
            self._incoming.append(_Submission(stream, request))
            self._counts["requests"] += 1
            self._wake.notify()
        return stream

    def _cancel(self, stream: RequestStream) -> None:
        with self._lock:
            self._cancels.append(stream)
            self._wake.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                **self._counts,
                active=self._active,
                waiting=self._waiting + len(self._incoming),
                uptime_s=time.perf_counter() - self._started,
                busy_s=self._busy_s,
                time_to_first_token_s=_percentiles(self._ttft),
                latency_s=_percentiles(self._latency),
            )

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the engine thread; running and waiting requests end with finish_reason "cancelled"."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the engine thread
    def _run(self) -> None:
        uid_of: dict[int, int] = {}  # request id -> generator uid
        while True:
            with self._lock:
                while not (self._incoming or self._cancels or self._closing or self._generator.has_work()):
                    self._wake.wait()
                incoming, self._incoming = self._incoming, []
                cancels, self._cancels = self._cancels, []
                closing = self._closing
            if closing:
                self._shut_down(incoming)
                return
            for submission in incoming:
                self._admit(submission, uid_of)
            for stream in cancels:
                if stream.request_id in uid_of:
                    self._generator.cancel(uid_of[stream.request_id])
            started = time.perf_counter()
            try:
                events = self._generator.step()
            except Exception as exc:  # a failed decode step takes its batch down, never the engine
                events = self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")
            elapsed = time.perf_counter() - started
            self._deliver(events, uid_of, elapsed)

    def _admit(self, submission: _Submission, uid_of: dict[int, int]) -> None:
        stream, request = submission.stream, submission.request
        try:
            inputs = {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in request.inputs.items()}
            uid = self._generator.submit(replace(request, inputs=inputs))
        except Exception as exc:
            self._deliver([GenerationResult.ended(-1, "error", error=exc)], {}, 0.0, direct=stream)
            return
        uid_of[stream.request_id] = uid
        self._streams[uid] = stream

    def _fail_all(self, message: str) -> list[GenerationResult]:
        events = [GenerationResult.ended(uid, "error", error=message) for uid in self._streams]
        self._generator = self._make_generator()
        return events

    def _shut_down(self, incoming: list[_Submission]) -> None:
        events = [GenerationResult.ended(uid, "cancelled") for uid in self._streams]
        self._deliver(events, {}, 0.0)
        for submission in incoming:
            self._deliver([GenerationResult.ended(-1, "cancelled")], {}, 0.0, direct=submission.stream)

    def _deliver(
        self,
        events: list[GenerationResult],
        uid_of: dict[int, int],
        elapsed: float,
        direct: RequestStream | None = None,
    ) -> None:
        """Route events to their streams (``direct``: to that stream, for a request the generator never saw)
        and keep the counters."""
        now = time.perf_counter()
        routed: list[tuple[RequestStream, GenerationResult]] = []
        with self._lock:
            self._busy_s += elapsed
            for event in events:
                stream = direct if direct is not None else self._streams.get(event.uid)
                if stream is None:
                    continue
                if stream.first_token_at is None and event.finish_reason not in ("cancelled", "error"):
                    stream.first_token_at = now
                    self._ttft.append(now - stream.submitted_at)
                if event.finish_reason is not None:
                    if direct is None:
                        del self._streams[event.uid]
                    self._finish(stream, event, uid_of, now)
                routed.append((stream, event))
            self._active = self._generator.active
            self._waiting = self._generator.waiting
        # One wake-up per event loop per step, not one per event: with many streams that is most of the cost.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, GenerationResult]]] = {}
        for stream, event in routed:
            if stream._loop is None:
                stream._put(event)
            else:
                by_loop.setdefault(stream._loop, []).append((stream, event))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_hand_over, batch)
            except RuntimeError:  # that loop has closed: nobody is listening any more
                pass

    def _finish(self, stream: RequestStream, event: GenerationResult, uid_of: dict[int, int], now: float) -> None:
        uid_of.pop(stream.request_id, None)
        counts = self._counts
        counts["prompt_tokens"] += event.prompt_tokens
        counts["generation_tokens"] += event.generation_tokens
        counts["draft_tokens"] += event.draft_tokens
        counts["accepted_draft_tokens"] += event.accepted_draft_tokens
        if event.finish_reason == "cancelled":
            counts["cancelled"] += 1
        elif event.finish_reason == "error":
            counts["errors"] += 1
        else:
            counts["finished"] += 1
            self._latency.append(now - stream.submitted_at)


def _hand_over(batch: list[tuple[RequestStream, GenerationResult]]) -> None:
    """Runs on a caller's event loop: queue a step's events for their streams."""
    for stream, event in batch:
        stream._put(event)


def _arrays_in(root: Any, depth: int = 12) -> Iterator[mx.array]:
    """Every MLX array an object graph holds: attributes, dict values and sequence items, each once."""
    seen: set[int] = set()
    todo: list[tuple[Any, int]] = [(root, 0)]
    while todo:
        obj, level = todo.pop()
        if id(obj) in seen or level > depth:
            continue
        seen.add(id(obj))
        if isinstance(obj, mx.array):
            yield obj
            continue
        children: list[Any] = []
        if isinstance(obj, dict):
            children.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            children.extend(obj)
        if hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(getattr(obj, "__func__", None)):
            children.extend(v for v in vars(obj).values() if not callable(v) or isinstance(v, dict))
        todo.extend((child, level + 1) for child in children)


def _percentiles(values: deque[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}
