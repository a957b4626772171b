"""Video input over the OpenAI API: ``video_url`` parts (a local file under --allow-local-media, a data URL) for
a model that takes video give what generate gives; a model without video, a bad video or a path outside the
allowed folder get a 4xx JSON error."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from vlm_models import apply_chat_template, load
from vlm_runtime import generate

from .conftest import ROOT, Server, make_server

VIDEOS = ROOT / "tests" / "fixtures" / "videos"
CLIP = VIDEOS / "clip_80x56.mov"


@pytest.fixture(scope="module")
def qwen3_vl() -> tuple[Any, Any]:
    return load(ROOT / "tests" / "fixtures" / "qwen3_vl" / "hf4")


@pytest.fixture(scope="module")
def video_server(qwen3_vl) -> Iterator[Server]:
    yield from make_server(qwen3_vl, allow_local_media=VIDEOS, max_media_bytes=100_000)


@pytest.fixture(scope="module")
def image_only_server() -> Iterator[Server]:
    yield from make_server(load(ROOT / "tests" / "fixtures" / "llava" / "hf4"), allow_local_media=VIDEOS)


def ask(server: Server, url: str, max_tokens: int = 6) -> httpx.Response:
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]
    body = {"model": server.model_id, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return httpx.post(f"{server.base}/chat/completions", json=body, timeout=60)


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def family_server(request, qwen3_vl) -> Iterator[tuple[Server, tuple[Any, Any]]]:
    loaded = qwen3_vl if request.param == "qwen3_vl" else load(ROOT / "tests" / "fixtures" / request.param / "hf4")
    for server in make_server(loaded, allow_local_media=VIDEOS, max_media_bytes=100_000):
        yield server, loaded


def test_video_url_matches_generate(family_server) -> None:
    video_server, (model, processor) = family_server
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    prompt = apply_chat_template(processor, None, messages)
    expected = generate(model, processor, prompt, videos=[CLIP], max_tokens=6)
    data_url = "data:video/quicktime;base64," + base64.b64encode(CLIP.read_bytes()).decode()
    for url in (str(CLIP), data_url):
        response = ask(video_server, url)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["message"]["content"] == expected.text
        assert body["usage"]["prompt_tokens"] == expected.prompt_tokens


def test_bad_video_requests_get_4xx(video_server, image_only_server) -> None:
    for target, url, status, says in [
        (image_only_server, str(CLIP), 400, "does not take video input"),  # LLaVA: images only
        (video_server, str(ROOT / "README.md"), 403, "inside the folder"),
        (video_server, "data:video/mp4;base64,bm90IGEgdmlkZW8=", 400, "cannot read video"),
        (video_server, "data:image/png;base64,AAAA", 400, "expected 'data:video/"),
        (video_server, "data:video/mp4;base64," + "A" * 200_000, 413, "larger than"),
        (video_server, str(VIDEOS / "missing.mov"), 400, "video not found"),
        (video_server, "ftp://example.invalid/v.mp4", 400, "unsupported video URL scheme"),
    ]:
        response = ask(target, url)
        assert response.status_code == status, (url[:60], response.text)
        assert says in response.json()["error"]["message"], (url[:60], response.text)
