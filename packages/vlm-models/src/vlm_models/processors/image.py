"""Image loading and the numpy/PIL primitives shared by image processors.

Numerics follow transformers' PIL backend (``image_transforms.resize/rescale/normalize``) step for step, so the
outputs are bit-identical to the Hugging Face "slow" processors given the same Pillow version. Only numpy, Pillow
and the standard library are imported here: no torch, no mlx.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import math
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageLoadError",
    "ImageSource",
    "ImageTooLarge",
    "MAX_IMAGE_BYTES",
    "PixelBudget",
    "SampleBatching",
    "concatenate_padded",
    "image_settings",
    "URL_TIMEOUT_S",
    "read_url",
    "torch_bicubic_resize",
    "RepeatsImageTokens",
    "load_image",
    "rescale_and_normalize",
    "resize",
    "to_rgb",
]

ImageSource = Union[Image.Image, str, Path, bytes, bytearray, memoryview]  # noqa: UP007

MAX_IMAGE_BYTES = 32 * 1024 * 1024
"""Cap on fetched or base64-embedded image payloads."""
URL_TIMEOUT_S = 10.0

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_DATA_URL = re.compile(r"^data:([^,]*),", re.DOTALL)


class ImageLoadError(ValueError):
    """An image source could not be turned into a picture; the message names the source."""


class ImageTooLarge(ImageLoadError):
    """An image holds more pixels than a ``PixelBudget`` allows."""


def _describe(source: object) -> str:
    """A short, printable name for ``source`` (data URLs and raw bytes can be megabytes long)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    text = str(source)
    limit = 80 if text[:5].lower() == "data:" else 1000  # a data URL is its payload; paths and URLs stay whole
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} chars)"


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB conversion exactly as transformers' ``convert_to_rgb`` (the processors' ``do_convert_rgb`` step).

    Anything with transparency (an alpha band, or a ``transparency`` entry as palette/L/RGB images may carry) is
    composited onto white; everything else goes through a plain ``convert("RGB")``.
    """
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


class PixelBudget:
    """How many pixels images may decode to, checked from their headers before any pixel is decoded: at most
    ``per_image`` each (a JPEG over it is decoded at 1/2, 1/4 or 1/8 scale instead, by libjpeg's DCT scaling,
    when that brings it under) and, when ``total`` is set, at most that many for all the images drawn from one
    budget together (a server makes one per request). Thread-safe: a request's images decode in parallel."""

    def __init__(self, per_image: int, total: int | None = None) -> None:
        if per_image < 1 or (total is not None and total < 1):
            raise ValueError(f"pixel budgets must be >= 1, got {per_image} and {total}")
        self.per_image, self.total = per_image, total
        self._left = total
        self._lock = threading.Lock()

    def admit(self, image: Image.Image, name: str) -> None:
        """Fit an opened (not yet decoded) ``image`` into the budget, or raise ``ImageLoadError``."""
        width, height = image.size
        if width * height > self.per_image:
            scale = _draft_scale(width, height, self.per_image) if image.format == "JPEG" else None
            if scale is None or image.draft(None, (width // scale, height // scale)) is None:
                raise ImageTooLarge(
                    f"image {name} is {width}x{height} pixels; at most {self.per_image} pixels per image are allowed"
                )
            width, height = image.size
        with self._lock:
            if self._left is not None:
                if width * height > self._left:
                    raise ImageTooLarge(
                        f"image {name} ({width}x{height}) would take the request past {self.total} pixels in all"
                    )
                self._left -= width * height


def _draft_scale(width: int, height: int, limit: int) -> int | None:
    """The smallest JPEG decoding scale (1/2, 1/4, 1/8) that brings ``width`` x ``height`` within ``limit``."""
    for scale in (2, 4, 8):
        if -(-width // scale) * -(-height // scale) <= limit:
            return scale
    return None


def _decode(data: bytes, name: str, budget: PixelBudget | None = None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{name} is not an image (unrecognised format, {len(data)} bytes)") from e
    except Image.DecompressionBombError as e:  # Pillow's own bound, far above any budget's default
        raise ImageTooLarge(f"image {name} has too many pixels to decode: {e}") from e
    except Exception as e:  # Pillow raises a zoo of types (OSError, SyntaxError, ...)
        raise ImageLoadError(f"cannot decode image {name}: {e}") from e
    if budget is not None:
        budget.admit(image, name)
    try:
        image.load()  # force the full decode so truncated/corrupt files fail here, not later
    except Exception as e:
        raise ImageLoadError(f"cannot decode image {name}: {e}") from e
    return image


def read_url(
    url: str, kind: str = "image", max_bytes: int | None = None, error: type[Exception] = ImageLoadError
) -> tuple[bytes, str]:
    """The body (at most ``max_bytes``, MAX_IMAGE_BYTES by default) and Content-Type of an http(s) URL; failures
    are ``error``, one line naming the URL (``kind``: what is fetched, for the messages)."""
    name = _describe(url)
    max_bytes = MAX_IMAGE_BYTES if max_bytes is None else max_bytes
    request = urllib.request.Request(url, headers={"User-Agent": "vlm/0.1", "Accept": f"{kind}/*"})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT_S) as response:
            final = urllib.parse.urlsplit(response.geturl()).scheme.lower()
            if final not in ("http", "https"):  # urllib would follow a redirect to ftp://
                raise error(f"{kind} URL {name} redirected to an unsupported scheme {final!r}")
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise error(f"{kind} at {name} is too large ({length} bytes > {max_bytes})")
            data = response.read(max_bytes + 1)  # bounded even when Content-Length lies or is absent
            content_type = response.headers.get_content_type()
    except error:
        raise
    except urllib.error.HTTPError as e:
        raise error(f"cannot fetch {kind} {name}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise error(f"cannot fetch {kind} {name}: {e.reason}") from e
    except (OSError, http.client.HTTPException, ValueError) as e:  # timeouts, resets, malformed URLs
        raise error(f"cannot fetch {kind} {name}: {type(e).__name__}: {e}") from e
    if len(data) > max_bytes:
        raise error(f"{kind} at {name} is too large (> {max_bytes} bytes)")
    return data, content_type


def _read_data_url(url: str) -> bytes:
    name = _describe(url)
    match = _DATA_URL.match(url)
    if match is None:
        raise ImageLoadError(f"malformed data URL {name}: expected 'data:image/<type>;base64,<data>'")
    params = match.group(1).split(";")
    if not params[0].lower().startswith("image/") or "base64" not in (p.strip().lower() for p in params[1:]):
        raise ImageLoadError(f"unsupported data URL {name}: expected 'data:image/<type>;base64,<data>'")
    payload = url[match.end() :]
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
        raise ImageLoadError(f"data URL {name} is too large (> {MAX_IMAGE_BYTES} bytes)")
    try:
        # Whitespace (line-wrapped base64) is tolerated; any other non-alphabet character is an error.
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageLoadError(f"invalid base64 in data URL {name}: {e}") from e


def _read_file(path: Path) -> bytes:
    path = path.expanduser()
    if not path.exists():
        raise ImageLoadError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageLoadError(f"image path is not a file: {path}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageLoadError(f"cannot read image file {path}: {e.strerror or e}") from e


def load_image(source: ImageSource, budget: PixelBudget | None = None) -> Image.Image:
    """Open an image from a PIL image, a path, an http(s) URL, a ``data:image/...;base64,`` URL or raw bytes.

    The result is RGB, upright (the EXIF orientation is applied, as transformers' ``load_image`` does) and
    transparency is composited onto white (as the processors' ``convert_to_rgb`` does). Every failure is an
    :class:`ImageLoadError` naming the source. With a ``budget``, an encoded image's size is checked against it
    from the header, before decoding (a PIL image is already decoded and passes as it is).
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode(bytes(source), _describe(source), budget)
    elif isinstance(source, Path):
        image = _decode(_read_file(source), str(source), budget)
    elif isinstance(source, str):
        scheme = _SCHEME.match(source)
        if source[:5].lower() == "data:":
            image = _decode(_read_data_url(source), _describe(source), budget)
        elif scheme is not None:
            if scheme.group(1).lower() not in ("http", "https"):
                raise ImageLoadError(f"unsupported URL scheme {scheme.group(1)!r} in {_describe(source)}")
            data, content_type = read_url(source)
            try:
                image = _decode(data, _describe(source), budget)
            except ImageLoadError as e:
                if content_type.startswith("image/") or isinstance(e, ImageTooLarge):
                    raise
                raise ImageLoadError(
                    f"URL {_describe(source)} did not return an image (Content-Type {content_type})"
                ) from e
        else:
            image = _decode(_read_file(Path(source)), source, budget)
    else:
        raise ImageLoadError(f"unsupported image source type {type(source).__name__}: {_describe(source)}")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a corrupt EXIF block: keep the pixels as stored rather than reject a decodable picture
        pass
    return to_rgb(image)


def resize(image: Image.Image, size: tuple[int, int], resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """Resize to ``(height, width)`` with Pillow; uint8 HWC, as transformers' ``image_transforms.resize``."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), resample=resample)
    return np.asarray(image, dtype=np.uint8)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _int16_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's antialiased bicubic taps for one axis: per output, the source indices, the weights as int16-range
    integers, and their fixed-point precision (the most bits that keep the largest weight under 2^15)."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    stretch = 1.0 / scale if scale >= 1.0 else 1.0
    taps = np.arange(math.ceil(support) * 2 + 1)
    centers = scale * (np.arange(n_out) + 0.5)
    first = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centers + support + 0.5).astype(np.int64), n_in)
    weights = _cubic((taps[None, :] + first[:, None] - centers[:, None] + 0.5) * stretch)
    weights = np.where(taps[None, :] < (last - first)[:, None], weights, 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = weights / np.where(total == 0, 1.0, total)
    precision = 0
    while precision < 22 and int(0.5 + weights.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
    return np.minimum(first[:, None] + taps[None, :], n_in - 1), fixed, precision


def _resize_axis(array: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    index, weights, precision = _int16_taps(array.shape[axis], n_out)
    source = np.moveaxis(array.astype(np.int64), axis, 0)
    shape = (-1,) + (1,) * (source.ndim - 1)
    total = np.full((n_out, *source.shape[1:]), 1 << (precision - 1), dtype=np.int64)
    for tap in range(index.shape[1]):
        total += source[index[:, tap]] * weights[:, tap].reshape(shape)
    return np.moveaxis(np.clip(total >> precision, 0, 255).astype(np.uint8), 0, axis)


def torch_bicubic_resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 HWC -> uint8 ``(height, width)``, as torch's antialiased bicubic resize of uint8 images on CPU
    (what transformers' torchvision image processors run): separable passes, width first, each with weights in
    int16 fixed point and its result rounded to 8 bits. Pillow's (22-bit weights) differs by a level or more on a
    few percent of pixels."""
    height, width = size
    if array.shape[1] != width:
        array = _resize_axis(array, 1, width)
    if array.shape[0] != height:
        array = _resize_axis(array, 0, height)
    return array


def rescale_and_normalize(
    array: np.ndarray,
    scale: float | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    *,
    rescale_dtype: type = np.float64,
) -> np.ndarray:
    """HWC image -> float32 CHW, ``(array * scale - mean) / std``; ``None`` skips a step.

    The dtype path is transformers': the rescale multiplies in float64 (``rescale_dtype``; its torchvision
    processors multiply in float32) and then casts to float32, the normalize subtracts and divides in float32
    with float32 mean/std. Any other order differs in the last ulp.
    """
    if scale is not None:
        out = (array.astype(rescale_dtype) * rescale_dtype(scale)).astype(np.float32)
    else:
        out = array.astype(np.float32)
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError("normalizing needs both mean and std")
        channels = out.shape[-1]
        mean32 = np.asarray(_per_channel(mean, channels, "mean"), dtype=np.float32)
        std32 = np.asarray(_per_channel(std, channels, "std"), dtype=np.float32)
        out = (out - mean32) / std32
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def _per_channel(values: float | Sequence[float], channels: int, what: str) -> list[float]:
    if isinstance(values, (int, float)):
        return [float(values)] * channels
    values = list(values)
    if len(values) != channels:
        raise ValueError(f"image {what} has {len(values)} values but the image has {channels} channels")
    return values


def image_settings(cfg: dict, int_keys: Sequence[str] = (), bool_keys: Sequence[str] = ()) -> dict:
    """The settings image processor configs spell alike (``resample``, the ``do_*`` switches, rescale factor,
    mean and std) plus ``int_keys`` / ``bool_keys``, as keyword arguments; a missing or null value is left to
    the default."""
    kwargs: dict = {}
    for key in ("resample", *int_keys):
        if cfg.get(key) is not None:
            kwargs[key] = int(cfg[key])
    for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb", *bool_keys):
        if cfg.get(key) is not None:
            kwargs[key] = bool(cfg[key])
    if cfg.get("rescale_factor") is not None:
        kwargs["rescale_factor"] = float(cfg["rescale_factor"])
    for key in ("image_mean", "image_std"):
        if cfg.get(key) is not None:
            value = cfg[key]
            kwargs[key] = tuple(float(v) for v in (value if isinstance(value, Sequence) else [value] * 3))
    return kwargs


class RepeatsImageTokens:
    """For image processors whose prompt expansion repeats each image's slot token once per feature: they
    give ``image_token_counts(outputs)``, this gives ``expand_prompt``. Processors that write more than the
    repeated token (row breaks, end markers) override ``image_placeholders`` instead."""

    def image_token_counts(self, outputs: dict[str, np.ndarray]) -> list[int]:
        raise NotImplementedError

    def image_placeholders(self, image_token: str, outputs: dict[str, np.ndarray]) -> list[str]:
        """What each image's slot in the prompt becomes."""
        return [image_token * count for count in self.image_token_counts(outputs)]

    def expand_prompt(self, prompt: str, image_token: str, outputs: dict[str, np.ndarray]) -> str:
        placeholders = self.image_placeholders(image_token, outputs)
        pieces = prompt.split(image_token)
        if len(pieces) - 1 != len(placeholders):
            raise ValueError(f"the prompt has {len(pieces) - 1} image slot(s) for {len(placeholders)} image(s)")
        out = [pieces[0]]
        for placeholder, piece in zip(placeholders, pieces[1:]):
            out.append(placeholder)
            out.append(piece)
        return "".join(out)


def concatenate_padded(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Arrays of one rank joined along the first axis, each zero-padded at the end of every other axis to the
    largest size there."""
    if len({a.ndim for a in arrays}) != 1:
        raise ValueError(f"cannot batch arrays of ranks {sorted({a.ndim for a in arrays})}")
    largest = np.max([a.shape for a in arrays], axis=0)
    padded = [np.pad(a, [(0, 0), *((0, int(n) - s) for n, s in zip(largest[1:], a.shape[1:]))]) for a in arrays]
    return np.concatenate(padded)


class SampleBatching:
    """How an image processor's outputs for several training samples (each a call over that sample's images)
    form one batch, and what per-token inputs a training sequence needs besides its ids.

    The default joins each output along its first axis and zero-pads the other axes to the largest, which is how
    the processors batch the images of one prompt: LLaVA-NeXT pads the tile axis, Pixtral the image sides,
    Idefics3 the frames (marked in ``pixel_attention_mask``; its first axis is the prompt, and the model drops
    all-zero frames), while Qwen's patches, CLIP's and SigLIP's fixed-size images need no padding."""

    def collate(self, outputs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """One batch's image inputs from the outputs of the samples that have images, in batch order."""
        if not outputs:
            return {}
        names = set(outputs[0])
        if any(set(o) != names for o in outputs):
            raise ValueError(f"samples' image inputs differ in names: {sorted({k for o in outputs for k in o})}")
        return {name: concatenate_padded([o[name] for o in outputs]) for name in outputs[0]}

    def answer_inputs(self, answer: np.ndarray) -> dict[str, np.ndarray]:
        """Per-token model inputs for a training batch, from ``answer`` (batch, length) bool: True from each row's
        first answer token on (padding included). None by default: the prompt's own inputs say everything."""
        return {}
