"""vlm_runtime: model-agnostic generation for vision-language models on MLX."""

from .batch import BatchGenerator, batch_generate
from .batch_cache import BatchKVCache, BatchQuantizedKVCache, BatchRotatingKVCache
from .cache import ArraysCache, Cache, KVCache, QuantizedKVCache, RotatingKVCache
from .cache_io import load_prompt_cache, save_prompt_cache
from .cache_settings import CacheSettings, make_layer_caches
from .engine import Engine, EngineBusy, RequestStream
from .generate import generate, generate_step, stream_generate
from .prefix_cache import PrefixCache, PrefixCacheSettings
from .prompt_cache import PromptCache
from .protocols import GenerativeModel, PromptEmbedding, PromptProcessor
from .recurrent_cache import BatchRecurrentCache, RecurrentCache
from .request import FinishReason, GenerationConfig, GenerationResult, Request
from .sampling import SamplingParams, make_sampler
from .settings import GenerationSettings
from .thinking import ThinkingConfig
from .turboquant_cache import BatchTurboQuantKVCache, TurboQuantKVCache
from .vision_cache import VisionFeatureCache

make_prompt_cache = make_layer_caches
"""mlx-lm's name for ``make_layer_caches`` (one cache per layer; ``PromptCache`` is a whole conversation's)."""

__version__ = "0.1.0"
__all__ = [
    "ArraysCache",
    "BatchGenerator",
    "BatchKVCache",
    "BatchQuantizedKVCache",
    "BatchRecurrentCache",
    "BatchRotatingKVCache",
    "BatchTurboQuantKVCache",
    "Cache",
    "CacheSettings",
    "Engine",
    "EngineBusy",
    "FinishReason",
    "GenerationConfig",
    "GenerationResult",
    "GenerationSettings",
    "GenerativeModel",
    "KVCache",
    "PrefixCache",
    "PrefixCacheSettings",
    "PromptCache",
    "PromptEmbedding",
    "PromptProcessor",
    "QuantizedKVCache",
    "Request",
    "RecurrentCache",
    "RequestStream",
    "RotatingKVCache",
    "SamplingParams",
    "ThinkingConfig",
    "TurboQuantKVCache",
    "VisionFeatureCache",
    "__version__",
    "batch_generate",
    "generate",
    "generate_step",
    "load_prompt_cache",
    "make_layer_caches",
    "make_prompt_cache",
    "make_sampler",
    "save_prompt_cache",
    "stream_generate",
]
