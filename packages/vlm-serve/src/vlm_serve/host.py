"""The model the server runs: loaded up front or on the first request that names it, one at a time, together
with the runtime ``Engine`` that batches its requests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_runtime import Engine, VisionFeatureCache

from .errors import APIError
from .grammar import GrammarFactory
from .settings import ServeSettings

__all__ = ["LoadedModel", "ServingEngine"]

DEFAULT_CONTEXT = 4096
"""Context length for checkpoints whose config does not say."""


@dataclass
class LoadedModel:
    model_id: str
    model: Any
    processor: Any
    engine: Engine
    context_length: int
    vision_cache: VisionFeatureCache | None
    created: int = 0
    grammars: GrammarFactory | None = None
    vocabulary_size: int = 0
    """Width of the model's logits: the bound on token ids a request may name (logit_bias)."""

    def __post_init__(self) -> None:
        if self.grammars is None:
            self.grammars = GrammarFactory(self.processor)


def context_length_of(config: dict[str, Any]) -> int:
    """max_position_embeddings of the text model, wherever the config keeps it."""
    for section in (config, config.get("text_config") or {}):
        value = section.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CONTEXT


class ServingEngine:
    """Owns at most one loaded model and its engine. ``get`` is called from the event loop."""

    def __init__(self, settings: ServeSettings, loaded: LoadedModel | None = None) -> None:
        self.settings = settings
        self._loaded = loaded
        self._lock = asyncio.Lock()

    @classmethod
    def from_model(
        cls, model_id: str, model: Any, processor: Any, settings: ServeSettings, *, context_length: int
    ) -> ServingEngine:
        """Serve an already loaded model (tests, embedding the server in a program)."""
        return cls(settings, _start(model_id, model, processor, settings, context_length))

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def served_ids(self) -> list[str]:
        if self._loaded is not None:
            return [self._loaded.model_id]
        return [self.settings.model] if self.settings.model else []

    def _accepts(self, requested: str, served: str) -> bool:
        return requested in (served, Path(served).name)

    async def get(self, requested: str | None) -> LoadedModel:
        """The model for a request naming ``requested``; loads it when needed (404 when it cannot be)."""
        fixed = self.settings.model
        current = self._loaded
        if current is not None and (not requested or self._accepts(requested, current.model_id)):
            return current
        if fixed is not None and requested and not self._accepts(requested, fixed):
            raise APIError(
                404,
                f"model {requested!r} is not served here (this server runs {fixed!r})",
                param="model",
                code="model_not_found",
            )
        target = fixed or requested
        if not target:
            raise APIError(400, "no model is loaded; name one in the request's 'model' field", param="model")
        async with self._lock:
            current = self._loaded
            if current is not None and self._accepts(target, current.model_id):
                return current
            if current is not None:
                await asyncio.to_thread(self._unload)  # joining the engine thread must not stall the loop
            self._loaded = await asyncio.to_thread(self._load, target)
            return self._loaded

    def _load(self, target: str) -> LoadedModel:
        from vlm_models import load
        from vlm_models.loading import load_config, resolve_model_path

        try:
            model, processor = load(
                target, adapter_path=self.settings.adapter_path, trust_remote_code=self.settings.trust_remote_code
            )
            config = load_config(resolve_model_path(target))
        except (ValueError, OSError) as e:
            raise APIError(404, f"cannot load model {target!r}: {e}", param="model", code="model_not_found") from e
        context = self.settings.context_length or context_length_of(config)
        return _start(target, model, processor, self.settings, context)

    async def unload(self) -> str | None:
        async with self._lock:
            return await asyncio.to_thread(self._unload)

    def _unload(self) -> str | None:
        current, self._loaded = self._loaded, None
        if current is None:
            return None
        current.engine.close()
        return current.model_id

    def close(self) -> None:
        self._unload()


def _start(model_id: str, model: Any, processor: Any, settings: ServeSettings, context_length: int) -> LoadedModel:
    import time

    cache = VisionFeatureCache(settings.vision_cache_size) if settings.vision_cache_size else None
    engine = Engine(
        model,
        processor,
        max_batch_size=settings.max_concurrency,
        max_waiting=settings.max_waiting,
        vision_cache=cache,
        cache_settings=settings.cache,
    )
    return LoadedModel(
        model_id,
        model,
        processor,
        engine,
        settings.context_length or context_length,
        cache,
        int(time.time()),
        vocabulary_size=_vocabulary_size(model),
    )


def _vocabulary_size(model: Any) -> int:
    """The logits' width, from shapes alone: MLX knows an expression's shape without evaluating it."""
    import mlx.core as mx

    return int(model.compute_logits(model.embed_tokens(mx.zeros((1, 1), dtype=mx.int32))).shape[-1])
