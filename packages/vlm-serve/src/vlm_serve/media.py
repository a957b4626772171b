"""Images, videos and audio clips named in requests, fetched under the server's policy: http(s) from public addresses (see
``fetching``) with a size cap and a total timeout, ``data:`` URLs, and local files only under
``--allow-local-media``. Audio arrives inline (OpenAI's ``input_audio``: base64 and a format), carried here as a
``data:audio/<format>;base64,`` URL, and is bounded in bytes and, from its header, in seconds."""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlm_models.audio import audio_duration
from vlm_models.processors.image import ImageLoadError, ImageTooLarge, PixelBudget, load_image

from .errors import APIError
from .fetching import AddressPolicy, FetchError, fetch
from .settings import ServeSettings

__all__ = ["AudioBudget", "audio_data_url", "fetch_audio", "fetch_image", "fetch_video", "is_audio", "pixel_budget"]

AUDIO_FORMAT = re.compile(r"[a-z0-9]{1,16}")


def pixel_budget(settings: ServeSettings) -> PixelBudget:
    """A fresh budget for one request's images."""
    return PixelBudget(settings.max_image_pixels, settings.max_request_pixels)


async def fetch_image(source: str, settings: ServeSettings, budget: PixelBudget) -> Image.Image:
    """The picture ``source`` names, decoded within ``budget``, or a 400 saying why not."""
    if not isinstance(source, str) or not source:
        raise APIError(400, "an image source must be a non-empty string")
    scheme = (
        urllib.parse.urlsplit(source).scheme.lower() if "://" in source[:16] or source[:5].lower() == "data:" else ""
    )
    try:
        if source[:5].lower() == "data:":
            if len(source) * 3 // 4 > settings.max_media_bytes:
                raise APIError(413, f"data URL image is larger than {settings.max_media_bytes} bytes")
            return await asyncio.to_thread(load_image, source, budget)
        if scheme in ("http", "https"):
            data = await _download(source, settings, "image")
            return await _decode_remote(data, source, budget)
        if scheme == "file":
            path = _local_path(urllib.parse.unquote(urllib.parse.urlsplit(source).path), settings)
            return await asyncio.to_thread(load_image, path, budget)
        if scheme:
            raise APIError(400, f"unsupported image URL scheme {scheme!r}: use http(s) or a data: URL")
        return await asyncio.to_thread(load_image, _local_path(source, settings), budget)
    except ImageTooLarge as e:
        raise APIError(400, str(e), code="image_too_large") from e
    except ImageLoadError as e:
        raise APIError(400, str(e), code="invalid_image") from e


async def fetch_video(source: str, settings: ServeSettings) -> bytes | Path:
    """The bytes or the local file of the video ``source`` names, or a 400 saying why not; it is decoded later,
    by the processor, into the frames it samples."""
    if not isinstance(source, str) or not source:
        raise APIError(400, "a video source must be a non-empty string")
    if source[:5].lower() == "data:":
        return _video_data_url(source, settings)
    scheme = urllib.parse.urlsplit(source).scheme.lower() if "://" in source[:16] else ""
    if scheme in ("http", "https"):
        return await _download(source, settings, "video")
    if scheme == "file":
        return _local_path(urllib.parse.unquote(urllib.parse.urlsplit(source).path), settings, "video")
    if scheme:
        raise APIError(400, f"unsupported video URL scheme {scheme!r}: use http(s) or a data: URL")
    return _local_path(source, settings, "video")


async def _decode_remote(data: bytes, url: str, budget: PixelBudget) -> Image.Image:
    """Decoded without echoing what the remote sent (its size, its format) back to the client."""
    try:
        return await asyncio.to_thread(load_image, data, budget)
    except ImageTooLarge as e:
        message = f"the image at {url[:200]} has more pixels than this server takes ({budget.per_image} per image)"
        raise APIError(400, message, code="image_too_large") from e
    except ImageLoadError as e:
        raise APIError(400, f"the data at {url[:200]} is not an image", code="invalid_image") from e


def audio_data_url(data: object, audio_format: object) -> str:
    """An ``input_audio`` part (base64 ``data`` and a ``format`` such as "wav" or "mp3") as the data URL the
    request carries it in; a 400 for a part that is not one."""
    if not isinstance(data, str) or not data:
        raise APIError(400, "input_audio needs its base64 data as a non-empty string", param="messages")
    if not isinstance(audio_format, str) or not AUDIO_FORMAT.fullmatch(audio_format.lower()):
        raise APIError(400, "input_audio needs a format such as 'wav' or 'mp3'", param="messages")
    return f"data:audio/{audio_format.lower()};base64,{data}"


def is_audio(source: str) -> bool:
    """Whether a media source of a stored conversation is an audio clip (else an image)."""
    return source[:11].lower() == "data:audio/"


@dataclass
class AudioBudget:
    """Seconds of audio one request may hold: per clip and in all, checked from each clip's header."""

    per_clip: float
    per_request: float
    used: float = 0.0

    def admit(self, seconds: float | None) -> None:
        if seconds is None:
            return  # the container does not say: the byte cap bounds it
        if seconds > self.per_clip:
            raise APIError(
                400,
                f"an audio clip is {seconds:.1f} s; this server takes at most {self.per_clip:g} s per clip",
                code="audio_too_long",
            )
        self.used += seconds
        if self.used > self.per_request:
            raise APIError(400, f"the request's audio is over {self.per_request:g} s in all", code="audio_too_long")


def fetch_audio(source: str, settings: ServeSettings, budget: AudioBudget) -> bytes:
    """The encoded bytes of an ``input_audio`` clip (a ``data:audio/`` URL), within the byte and duration caps;
    the processor decodes them."""
    header, _, payload = source.partition(",")
    if not is_audio(source) or "base64" not in header.lower():
        raise APIError(400, "unsupported audio source: expected base64 input_audio data", param="messages")
    if len(payload) * 3 // 4 > settings.max_media_bytes:
        raise APIError(413, f"an audio clip is larger than {settings.max_media_bytes} bytes")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"invalid base64 in input_audio data: {e}", param="messages") from e
    if not data:
        raise APIError(400, "an input_audio clip is empty", param="messages", code="invalid_audio")
    budget.admit(audio_duration(data))
    return data


def _video_data_url(url: str, settings: ServeSettings) -> bytes:
    header, _, payload = url.partition(",")
    params = header[5:].split(";")
    if not params[0].lower().startswith("video/") or "base64" not in (p.strip().lower() for p in params[1:]):
        raise APIError(400, "unsupported video data URL: expected 'data:video/<type>;base64,<data>'")
    if len(payload) * 3 // 4 > settings.max_media_bytes:
        raise APIError(413, f"data URL video is larger than {settings.max_media_bytes} bytes")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"invalid base64 in the video data URL: {e}") from e


def _local_path(raw: str, settings: ServeSettings, kind: str = "image") -> Path:
    root = settings.allow_local_media
    if root is None:
        raise APIError(
            400, f"local {kind} paths are not allowed on this server (start it with --allow-local-media DIR)"
        )
    if "\0" in raw:
        raise APIError(400, f"a local {kind} path cannot hold a NUL byte")
    path = Path(raw)
    try:
        resolved = (root / path if not path.is_absolute() else path).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a symlink loop, a name the file system refuses
        raise APIError(400, f"cannot use the local {kind} path {raw[:200]!r}") from e
    if not resolved.is_relative_to(root):
        raise APIError(403, f"local {kind} paths must be inside the folder given to --allow-local-media")
    return resolved


async def _download(url: str, settings: ServeSettings, kind: str) -> bytes:
    try:
        return await fetch(
            url,
            policy=address_policy(settings),
            max_bytes=settings.max_media_bytes,
            timeout_s=settings.media_timeout_s,
            kind=kind,
        )
    except FetchError as e:
        raise APIError(e.status, str(e)) from e


def address_policy(settings: ServeSettings) -> AddressPolicy:
    networks = tuple(ipaddress.ip_network(n, strict=False) for n in settings.allowed_url_networks)
    return AddressPolicy(settings.allow_private_urls, networks)
