"""The server's options, one frozen dataclass built from the command line (or directly, in tests)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from vlm_runtime import CacheSettings
from vlm_runtime.prefix_cache import PrefixCacheSettings

__all__ = ["ServeSettings"]


@dataclass(frozen=True)
class ServeSettings:
    model: str | None = None
    """Model loaded up front (local folder or Hugging Face repo id)."""
    allowed_models: tuple[str, ...] = ()
    """Other models (folders or repo ids) a request may name; the server loads them one at a time."""
    models_dir: Path | None = None
    """A folder whose model folders (``NAME/config.json`` or ``ORG/NAME/config.json``) a request may name."""
    adapter_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    allowed_hosts: tuple[str, ...] = ()
    """Names the Host header may carry besides IP literals, localhost and ``host`` (DNS-rebinding defence);
    ``.example.com`` matches its subdomains, ``*`` anything."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the API (CORS); none by default."""
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
    prefix_cache: PrefixCacheSettings | None = field(default_factory=PrefixCacheSettings)
    """Automatic prefix caching (blocks in memory, and on disk with ``disk_dir``); None turns it off."""
    enable_thinking: bool = False
    """Default for requests that do not say: open a thinking block in the chat template."""
    thinking_budget: int | None = None
    top_logprobs_k: int = 20
    """Most alternatives a request may ask for per token."""
    allow_local_media: Path | None = None
    """Local image paths are read only under this folder; None refuses them all."""
    max_body_bytes: int = 64 * 1024 * 1024
    body_timeout_s: float = 30.0
    """Time a request's body may take to arrive once its headers have (408 after)."""
    max_header_bytes: int = 64 * 1024
    """Size of a request's line and headers together (400 and the connection closed beyond)."""
    header_timeout_s: float = 10.0
    """Time a connection may take to send a request's headers (closed after)."""
    max_connections: int = 512
    """Open connections; one more is answered 503 and closed."""
    max_media_bytes: int = 20 * 1024 * 1024
    """Cap on one fetched image."""
    max_image_pixels: int = 36_000_000
    """Pixels one image may decode to, checked from its header (an 8K screenshot is 33 M); a JPEG above it is
    decoded at 1/2, 1/4 or 1/8 scale when that fits (a 48 MP photo at 1/2), anything else is refused."""
    max_request_pixels: int = 100_000_000
    """Pixels all the images of one request may decode to together."""
    max_audio_seconds: float = 600.0
    """Seconds one audio clip may hold, read from its header before it is decoded (the byte cap is
    ``max_media_bytes``)."""
    max_request_audio_seconds: float = 1800.0
    """Seconds all the audio clips of one request may hold together."""
    media_timeout_s: float = 10.0
    """Total time allowed for fetching one remote image."""
    allow_private_urls: bool = False
    """Fetch remote media from loopback, private, link-local and other non-public addresses too."""
    allowed_url_networks: tuple[str, ...] = ()
    """Non-public networks (CIDR) remote media may still come from, such as an internal image store."""
    response_store_bytes: int = 256 * 2**20
    """Memory the Responses API may keep for ``previous_response_id`` (images once per content digest); 0 keeps
    nothing."""
    chat_page: bool = True
    """Serve the chat page at ``/`` (static files; it talks to this server's own API)."""
    log_level: str = "info"
    trust_remote_code: bool = False
    quantize_activations: bool | None = None
    """``-qa``: the model's mxfp8 / nvfp4 linear layers activation-quantized (None: where the backend needs it)."""
    draft_model: str | None = None
    """Speculative decoding: the drafter (folder or repo id) of every model served whose tokenizer it shares."""
    draft_kind: str | None = None
    """The drafter's kind (``vlm_models.drafting.DRAFT_KINDS``); None reads it from its config."""
    num_draft_tokens: int = 4
    """Most tokens a request's drafter proposes per round (the schedule adapts below it)."""

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError(
                "the API key is empty (--api-key or VLM_API_KEY): give a key, or leave both unset to serve without one"
            )
        for name in (
            "max_concurrency",
            "max_tokens_limit",
            "max_body_bytes",
            "max_media_bytes",
            "max_image_pixels",
            "max_request_pixels",
            "max_header_bytes",
            "max_connections",
            "num_draft_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.top_logprobs_k <= 20:
            raise ValueError(f"top-logprobs-k must be in 0..20, got {self.top_logprobs_k}")
        if self.response_store_bytes < 0:
            raise ValueError(f"response-store-mb must be >= 0, got {self.response_store_bytes // 2**20}")
        if self.max_waiting < 0 or self.vision_cache_size < 0:
            raise ValueError("max-waiting and vision-cache-size must be >= 0")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context-length must be >= 2, got {self.context_length}")
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise ValueError(f"thinking-budget must be >= 0, got {self.thinking_budget}")
        if not min(self.max_audio_seconds, self.max_request_audio_seconds) > 0:
            raise ValueError("max-audio-seconds and max-request-audio-seconds must be positive")
        if min(self.media_timeout_s, self.body_timeout_s, self.header_timeout_s) <= 0:
            raise ValueError("timeouts must be positive")
        for network in self.allowed_url_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"allow-url-network {network!r} is not a network (such as 10.1.0.0/16)") from None
        object.__setattr__(self, "allowed_hosts", tuple(h.strip().lower() for h in self.allowed_hosts if h.strip()))
        for name in ("allow_local_media", "models_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)).expanduser().resolve())
