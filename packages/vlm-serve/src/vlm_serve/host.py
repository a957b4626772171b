"""The model the server runs, one at a time, together with the runtime ``Engine`` that batches its requests:
``--model`` loaded up front, or a model a request names, if the operator allowed it (``--allow-model``, or a
folder under ``--models-dir``). Clients see models by public names, never by paths, and cannot tell a missing
model from a forbidden one; a request for another model waits for no one and cancels no one: while the current
model has work, it is refused with a 503 to retry."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_runtime import Engine, VisionFeatureCache
from vlm_runtime.prefix_cache import PrefixCache

from .errors import APIError
from .grammar import GrammarFactory
from .settings import ServeSettings

__all__ = ["LoadedModel", "ModelCatalog", "ModelHost", "public_name"]

DEFAULT_CONTEXT = 4096
"""Context length for checkpoints whose config does not say."""
MAX_LISTED = 1000
"""Most models /v1/models lists from --models-dir."""

_log = logging.getLogger("vlm_serve")


@dataclass
class LoadedModel:
    model_id: str
    """The public name: what clients send and see."""
    model: Any
    processor: Any
    engine: Engine
    context_length: int
    vision_cache: VisionFeatureCache | None
    created: int = 0
    grammars: GrammarFactory | None = None
    vocabulary_size: int = 0
    """Width of the model's logits: the bound on token ids a request may name (logit_bias)."""
    source: str = ""
    """Where it was loaded from (a path or a repo id); requests may name it by that too."""
    holds: int = 0
    """Requests between choosing this model and handing their prompt to its engine."""
    prefix_cache: PrefixCache | None = None
    draft_kind: str | None = None
    """The kind of drafter its engine decodes speculatively with (None: it decodes plainly)."""

    def __post_init__(self) -> None:
        if self.grammars is None:
            self.grammars = GrammarFactory(self.processor)

    def answers_to(self, requested: str) -> bool:
        return requested in (self.model_id, self.source)

    def busy(self) -> bool:
        stats = self.engine.stats()
        return self.holds > 0 or stats.active + stats.waiting > 0

    def close(self) -> None:
        """Stop the engine, then the prefix cache (its disk writer finishes the shards queued)."""
        self.engine.close()
        if self.prefix_cache is not None:
            self.prefix_cache.close()


def context_length_of(config: dict[str, Any]) -> int:
    """max_position_embeddings of the text model, wherever the config keeps it."""
    for section in (config, config.get("text_config") or {}):
        value = section.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CONTEXT


def public_name(source: str) -> str:
    """What clients call a model: a local folder by its name, a Hugging Face repo by its id."""
    return Path(source).name if Path(source).exists() else source


@dataclass(frozen=True)
class ModelChoice:
    name: str
    source: str


class ModelCatalog:
    """The models clients may name: ``--model``, each ``--allow-model``, and the folders under ``--models-dir``
    that hold a config.json (named by their path inside it, such as ``Qwen/Qwen2-VL-2B-Instruct``)."""

    def __init__(self, settings: ServeSettings) -> None:
        listed = [settings.model] if settings.model else []
        self._fixed = [ModelChoice(public_name(s), s) for s in dict.fromkeys([*listed, *settings.allowed_models])]
        self._root = settings.models_dir

    def find(self, requested: str) -> ModelChoice | None:
        for choice in self._fixed:
            if requested in (choice.name, choice.source):
                return choice
        relative = self._inside_root(requested)
        if relative is None:
            return None
        return ModelChoice(relative, str(self._root / relative))

    def names(self) -> list[str]:
        names = [c.name for c in self._fixed]
        if self._root is not None:
            found = sorted({str(c.parent.relative_to(self._root)) for c in self._configs()})
            names += found[:MAX_LISTED]
        return list(dict.fromkeys(names))

    def _inside_root(self, requested: str) -> str | None:
        """``requested`` as a folder under the root holding a model, or None: absolute paths, ``..``, empty or
        odd parts are never looked up, so nothing outside the root can be named or probed."""
        if self._root is None or not requested or "\0" in requested or "\\" in requested:
            return None
        parts = requested.split("/")
        if any(part in ("", ".", "..") or part.startswith("~") for part in parts):
            return None
        try:
            found = (self._root.joinpath(*parts) / "config.json").is_file()
        except (OSError, ValueError):
            return None
        return "/".join(parts) if found else None

    def _configs(self) -> list[Path]:
        assert self._root is not None
        return [*self._root.glob("*/config.json"), *self._root.glob("*/*/config.json")]


class ModelHost:
    """Owns at most one loaded model and its engine. Used from the event loop."""

    def __init__(self, settings: ServeSettings, loaded: LoadedModel | None = None) -> None:
        self.settings = settings
        self.catalog = ModelCatalog(settings)
        self._loaded = loaded
        self._lock = asyncio.Lock()

    @classmethod
    def from_model(
        cls,
        model_id: str,
        model: Any,
        processor: Any,
        settings: ServeSettings,
        *,
        context_length: int,
        drafter: Any = None,
        draft_kind: str = "draft",
    ) -> ModelHost:
        """Serve an already loaded model (tests, embedding the server in a program), speculatively with
        ``drafter`` (a ``vlm_runtime.speculative.Drafter``) where given."""
        draft = (drafter, draft_kind) if drafter is not None else None
        return cls(settings, _start(model_id, model, processor, settings, context_length, draft=draft))

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def served_ids(self) -> list[str]:
        names = [self._loaded.model_id] if self._loaded is not None else []
        return list(dict.fromkeys([*names, *self.catalog.names()]))

    async def preload(self) -> None:
        """Load ``--model`` now (the command does, before it listens); failures raise as they are, for the
        operator to read."""
        if self.settings.model:
            choice = self.catalog.find(self.settings.model)
            assert choice is not None
            self._loaded = await asyncio.to_thread(self._open, choice)

    @asynccontextmanager
    async def use(self, requested: str | None) -> AsyncIterator[LoadedModel]:
        """The model for a request naming ``requested`` (loaded when needed), held so that no other request
        swaps it out until the block ends; by then the request is in its engine, whose work also holds it."""
        loaded = await self._get(requested or "")
        loaded.holds += 1  # no await since _get returned: nothing can have swapped it in between
        try:
            yield loaded
        finally:
            loaded.holds -= 1

    async def _get(self, requested: str) -> LoadedModel:
        current = self._loaded
        if current is not None and (not requested or current.answers_to(requested)):
            return current
        if not requested:
            raise APIError(400, "no model is loaded; name one in the request's 'model' field", param="model")
        choice = self.catalog.find(requested)
        if choice is None:
            raise APIError(
                404,
                f"model {requested[:200]!r} is not available on this server (the models endpoint lists those that are)",
                param="model",
                code="model_not_found",
            )
        async with self._lock:
            current = self._loaded
            if current is not None and current.answers_to(choice.name):
                return current
            if current is not None:
                if current.busy():
                    raise APIError(
                        503,
                        f"this server is busy with model {current.model_id!r}; {choice.name!r} can be loaded once "
                        "its requests are done",
                        param="model",
                    )
                self._loaded = None  # at once: no request picks the old model up from here on
                await asyncio.to_thread(current.close)  # joining its thread must not stall the loop
            self._loaded = await asyncio.to_thread(self._load, choice)
            return self._loaded

    def _load(self, choice: ModelChoice) -> LoadedModel:
        try:
            return self._open(choice)
        except (ValueError, OSError) as e:  # the reason may name paths: for the operator, not the client
            _log.error("cannot load model %s from %s: %s", choice.name, choice.source, e)
            raise APIError(500, f"model {choice.name!r} could not be loaded (the server's log says why)") from e

    def _open(self, choice: ModelChoice) -> LoadedModel:
        from vlm_models import load
        from vlm_models.loading import load_config, resolve_model_path

        settings = self.settings
        model, processor = load(
            choice.source,
            adapter_path=settings.adapter_path,
            trust_remote_code=settings.trust_remote_code,
            quantize_activations=settings.quantize_activations,
        )
        context = settings.context_length or context_length_of(load_config(resolve_model_path(choice.source)))
        draft = self._drafter(choice, model, processor)
        return _start(choice.source, model, processor, settings, context, name=choice.name, draft=draft)

    def _drafter(self, choice: ModelChoice, model: Any, processor: Any) -> tuple[Any, str] | None:
        """``--draft-model`` for this model, or None. A drafter that cannot serve ``--model`` stops the server
        (one line); one that cannot serve a model a request names (another tokenizer) leaves it decoding plainly."""
        from vlm_models.drafting import DrafterError, load_drafter

        settings = self.settings
        if settings.draft_model is None:
            return None
        try:
            return load_drafter(
                settings.draft_model, target_processor=processor, kind=settings.draft_kind, target=model
            )
        except DrafterError as e:
            if choice.source == settings.model:
                raise ValueError(f"--draft-model: {e}") from None
            _log.warning("model %s decodes without speculation: %s", choice.name, e)
            return None

    async def unload(self, *, force: bool = False) -> str | None:
        """Unload the model; refused (409) while it has work, unless ``force``, which cancels that work."""
        async with self._lock:
            current = self._loaded
            if current is None:
                return None
            if current.busy() and not force:
                raise APIError(
                    409,
                    f"model {current.model_id!r} has requests in flight; unloading it would cancel them "
                    '(send {"force": true} to do that)',
                )
            self._loaded = None
            await asyncio.to_thread(current.close)
            return current.model_id

    def close(self) -> None:
        current, self._loaded = self._loaded, None
        if current is not None:
            current.close()


def _start(
    source: str,
    model: Any,
    processor: Any,
    settings: ServeSettings,
    context_length: int,
    *,
    name: str | None = None,
    draft: tuple[Any, str] | None = None,
) -> LoadedModel:
    import time

    cache = VisionFeatureCache(settings.vision_cache_size) if settings.vision_cache_size else None
    prefix_cache = None
    if settings.prefix_cache is not None:
        prefix_cache = PrefixCache(settings.prefix_cache, model_id=model_identity(source, settings.adapter_path))
    engine = Engine(
        model,
        processor,
        max_batch_size=settings.max_concurrency,
        max_waiting=settings.max_waiting,
        vision_cache=cache,
        cache_settings=settings.cache,
        prefix_cache=prefix_cache,
        drafter=draft[0] if draft is not None else None,
    )
    return LoadedModel(
        name or public_name(source),
        model,
        processor,
        engine,
        settings.context_length or context_length,
        cache,
        int(time.time()),
        vocabulary_size=_vocabulary_size(model),
        source=source,
        prefix_cache=prefix_cache,
        draft_kind=draft[1] if draft is not None and engine.drafting else None,
    )


def model_identity(source: str, adapter_path: str | None) -> str:
    """What names a model's prefix-cache blocks, on disk across restarts too: its folder and adapter with each
    weight file's size and modification time (converted weights at the same path are another model)."""
    parts = []
    for where in (source, adapter_path):
        if where is None:
            continue
        path = Path(where).expanduser()
        if not path.is_dir():
            parts.append(where)
            continue
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
        stamps = ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
        parts.append(f"{path.resolve()}[{stamps}]")
    return "|".join(parts)


def _vocabulary_size(model: Any) -> int:
    """The logits' width, from shapes alone: MLX knows an expression's shape without evaluating it. Through the
    decoder, since a token's embedding may be wider than the hidden states (Gemma 4 appends per-layer inputs)."""
    import mlx.core as mx

    embeds = model.embed_tokens(mx.zeros((1, 1), dtype=mx.int32))
    return int(model.compute_logits(model.hidden_states(embeds, cache=model.make_cache())).shape[-1])
