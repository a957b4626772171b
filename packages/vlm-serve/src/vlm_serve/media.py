"""Images and videos named in requests, fetched under the server's policy: http(s) with a size cap and a total
timeout, ``data:`` URLs, and local files only under ``--allow-local-media``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import urllib.parse
from pathlib import Path

import httpx
from PIL import Image

from vlm_models.processors.image import ImageLoadError, ImageTooLarge, PixelBudget, load_image

from .errors import APIError
from .settings import ServeSettings

__all__ = ["fetch_image", "fetch_video", "pixel_budget"]


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
            return await asyncio.to_thread(load_image, data, budget)
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
    cap = settings.max_media_bytes
    try:
        async with asyncio.timeout(settings.media_timeout_s):
            async with httpx.AsyncClient(follow_redirects=True, max_redirects=5) as client:
                headers = {"Accept": f"{kind}/*", "User-Agent": "vlm-serve"}
                async with client.stream("GET", url, headers=headers) as response:
                    if response.status_code >= 400:
                        raise APIError(400, f"cannot fetch {kind} {url[:200]}: HTTP {response.status_code}")
                    length = response.headers.get("content-length", "")
                    if length.isdigit() and int(length) > cap:
                        raise APIError(413, f"{kind} at {url[:200]} is larger than {cap} bytes")
                    chunks, size = [], 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > cap:
                            raise APIError(413, f"{kind} at {url[:200]} is larger than {cap} bytes")
                        chunks.append(chunk)
    except TimeoutError as e:
        raise APIError(400, f"fetching {kind} {url[:200]} took longer than {settings.media_timeout_s} s") from e
    except httpx.HTTPError as e:
        raise APIError(400, f"cannot fetch {kind} {url[:200]}: {type(e).__name__}: {e}") from e
    return b"".join(chunks)
