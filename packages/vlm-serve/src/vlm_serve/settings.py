"""The server's options, one frozen dataclass built from the command line (or directly, in tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlm_runtime import CacheSettings

__all__ = ["ServeSettings"]


@dataclass(frozen=True)
class ServeSettings:
    model: str | None = None
    """Served model (local folder or Hugging Face repo id); None: load the one the first request names."""
    adapter_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    """When set, every endpoint but /health needs ``Authorization: Bearer <key>`` or ``x-api-key: <key>``."""
    max_concurrency: int = 32
    """Requests decoded together; more wait in the queue."""
    max_waiting: int = 256
    """Requests allowed to wait for a slot; beyond that the server answers 503 (OpenAI) / 529 (Anthropic)."""
    max_tokens_limit: int = 4096
    """Upper bound on a request's max_tokens (larger requests are clipped to it)."""
    context_length: int | None = None
    """Prompt plus generation limit in tokens; None: the model config's max_position_embeddings."""
    vision_cache_size: int = 32
    """Images whose vision features are kept (0 turns the cache off)."""
    cache: CacheSettings = field(default_factory=CacheSettings)
    """Every request's KV cache: a sliding window (``max_kv_size``) or quantized keys/values (``kv_bits``,
    affine or turboquant)."""
    enable_thinking: bool = False
    """Default for requests that do not say: open a thinking block in the chat template."""
    thinking_budget: int | None = None
    top_logprobs_k: int = 20
    """Most alternatives a request may ask for per token."""
    allow_local_media: Path | None = None
    """Local image paths are read only under this folder; None refuses them all."""
    max_body_bytes: int = 64 * 1024 * 1024
    max_media_bytes: int = 20 * 1024 * 1024
    """Cap on one fetched image."""
    media_timeout_s: float = 10.0
    """Total time allowed for fetching one remote image."""
    log_level: str = "info"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "max_tokens_limit", "top_logprobs_k", "max_body_bytes", "max_media_bytes"):
            if getattr(self, name) < 1 and name != "top_logprobs_k":
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.top_logprobs_k <= 20:
            raise ValueError(f"top-logprobs-k must be in 0..20, got {self.top_logprobs_k}")
        if self.max_waiting < 0 or self.vision_cache_size < 0:
            raise ValueError("max-waiting and vision-cache-size must be >= 0")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context-length must be >= 2, got {self.context_length}")
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise ValueError(f"thinking-budget must be >= 0, got {self.thinking_budget}")
        if self.media_timeout_s <= 0:
            raise ValueError("media timeout must be positive")
        if self.allow_local_media is not None:
            object.__setattr__(self, "allow_local_media", Path(self.allow_local_media).expanduser().resolve())
