"""Numpy/Pillow image processors (no torch, no mlx), output-identical to the Hugging Face PIL processors."""

from .clip import CLIPImageProcessor, LlavaNextImageProcessor
from .image import ImageLoadError, load_image, rescale_and_normalize, resize, to_rgb
from .qwen2_vl import Qwen2VLImageProcessor, smart_resize

__all__ = [
    "CLIPImageProcessor",
    "LlavaNextImageProcessor",
    "ImageLoadError",
    "Qwen2VLImageProcessor",
    "load_image",
    "rescale_and_normalize",
    "resize",
    "smart_resize",
    "to_rgb",
]
