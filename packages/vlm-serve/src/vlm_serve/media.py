"""Images named in requests, fetched under the server's policy: http(s) with a size cap and a total timeout,
``data:`` URLs, and local files only under ``--allow-local-media``."""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path

import httpx
from PIL import Image
from vlm_models.processors.image import ImageLoadError, load_image

from .errors import APIError
from .settings import ServeSettings

__all__ = ["fetch_image"]


async def fetch_image(source: str, settings: ServeSettings) -> Image.Image:
    """The picture ``source`` names, or a 400 saying why not."""
    if not isinstance(source, str) or not source:
        raise APIError(400, "an image source must be a non-empty string")
    scheme = urllib.parse.urlsplit(source).scheme.lower() if "://" in source[:16] or source[:5].lower() == "data:" else ""
    try:
        if source[:5].lower() == "data:":
            if len(source) * 3 // 4 > settings.max_media_bytes:
                raise APIError(413, f"data URL image is larger than {settings.max_media_bytes} bytes")
            return await asyncio.to_thread(load_image, source)
        if scheme in ("http", "https"):
            data = await _download(source, settings)
            return await asyncio.to_thread(load_image, data)
        if scheme == "file":
            return await asyncio.to_thread(load_image, _local_path(urllib.parse.unquote(urllib.parse.urlsplit(source).path), settings))
        if scheme:
            raise APIError(400, f"unsupported image URL scheme {scheme!r}: use http(s) or a data: URL")
        return await asyncio.to_thread(load_image, _local_path(source, settings))
    except ImageLoadError as e:
        raise APIError(400, str(e), code="invalid_image") from e


def _local_path(raw: str, settings: ServeSettings) -> Path:
    root = settings.allow_local_media
    if root is None:
        raise APIError(400, "local image paths are not allowed on this server (start it with --allow-local-media DIR)")
    path = Path(raw).expanduser()
    resolved = (root / path if not path.is_absolute() else path).resolve()
    if not resolved.is_relative_to(root):
        raise APIError(403, "local image paths must be inside the folder given to --allow-local-media")
    return resolved


async def _download(url: str, settings: ServeSettings) -> bytes:
    cap = settings.max_media_bytes
    try:
        async with asyncio.timeout(settings.media_timeout_s):
            async with httpx.AsyncClient(follow_redirects=True, max_redirects=5) as client:
                async with client.stream("GET", url, headers={"Accept": "image/*", "User-Agent": "vlm-serve"}) as response:
                    if response.status_code >= 400:
                        raise APIError(400, f"cannot fetch image {url[:200]}: HTTP {response.status_code}")
                    length = response.headers.get("content-length", "")
                    if length.isdigit() and int(length) > cap:
                        raise APIError(413, f"image at {url[:200]} is larger than {cap} bytes")
                    chunks, size = [], 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > cap:
                            raise APIError(413, f"image at {url[:200]} is larger than {cap} bytes")
                        chunks.append(chunk)
    except TimeoutError as e:
        raise APIError(400, f"fetching image {url[:200]} took longer than {settings.media_timeout_s} s") from e
    except httpx.HTTPError as e:
        raise APIError(400, f"cannot fetch image {url[:200]}: {type(e).__name__}: {e}") from e
    return b"".join(chunks)
