"""vlm_runtime: model-agnostic generation for vision-language models on MLX."""

from .batch import BatchGenerator, batch_generate
from .cache import (
    ArraysCache,
    BatchKVCache,
    BatchQuantizedKVCache,
    BatchRotatingKVCache,
    Cache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
)
from .cache_io import load_prompt_cache, save_prompt_cache
from .cache_settings import CacheSettings, make_prompt_cache
from .engine import Engine, EngineBusy, RequestStream
from .generate import GenerationConfig, GenerationResult, generate, generate_step, stream_generate
from .prompt_cache import PromptCache
from .protocols import GenerativeModel, PromptEmbedding, PromptProcessor
from .sampling import SamplingParams, make_sampler
from .thinking import ThinkingConfig
from .turboquant_cache import BatchTurboQuantKVCache, TurboQuantKVCache
from .vision_cache import VisionFeatureCache

__version__ = "0.1.0"
__all__ = [
    "ArraysCache",
    "BatchGenerator",
    "BatchKVCache",
    "BatchQuantizedKVCache",
    "BatchRotatingKVCache",
    "BatchTurboQuantKVCache",
    "Cache",
    "CacheSettings",
    "Engine",
    "EngineBusy",
    "GenerationConfig",
    "GenerationResult",
    "GenerativeModel",
    "KVCache",
    "PromptCache",
    "PromptEmbedding",
    "PromptProcessor",
    "QuantizedKVCache",
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
    "make_prompt_cache",
    "make_sampler",
    "save_prompt_cache",
    "stream_generate",
]
