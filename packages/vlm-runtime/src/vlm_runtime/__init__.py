"""vlm_runtime: model-agnostic generation for vision-language models on MLX."""

from .cache import Cache, KVCache
from .generate import GenerationConfig, GenerationResult, generate, generate_step, stream_generate
from .protocols import GenerativeModel, PromptEmbedding, PromptProcessor
from .sampling import SamplingParams, make_sampler

__version__ = "0.1.0"
__all__ = [
    "Cache",
    "GenerationConfig",
    "GenerationResult",
    "GenerativeModel",
    "KVCache",
    "PromptEmbedding",
    "PromptProcessor",
    "SamplingParams",
    "__version__",
    "generate",
    "generate_step",
    "make_sampler",
    "stream_generate",
]
