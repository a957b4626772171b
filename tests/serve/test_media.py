"""Remote images: fetched over http with a size cap and a total timeout; pixel budgets checked from image headers;
a lazily loaded model; /unload."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from .conftest import IMAGES, MODEL, make_server
from .test_limits import peak_rise_mb, post

PNG = (IMAGES / "rgb_56x56.png").read_bytes()


# path -> (status, headers, body chunks, delay before answering)
ROUTES: dict[str, tuple[int, dict[str, str], list[bytes], float]] = {
    "/ok.png": (200, {"Content-Type": "image/png", "Content-Length": str(len(PNG))}, [PNG], 0.0),
    "/big.png": (200, {"Content-Type": "image/png", "Content-Length": "300000"}, [b"\0" * 300_000], 0.0),
    "/big-unsized.png": (200, {"Content-Type": "image/png"}, [b"\0" * 10_000] * 40, 0.0),  # no length: counted
    "/slow.png": (200, {"Content-Type": "image/png", "Content-Length": str(len(PNG))}, [PNG], 3.0),
    "/redirect": (302, {"Location": "/ok.png", "Content-Length": "0"}, [], 0.0),
    "/page": (200, {"Content-Type": "text/html", "Content-Length": "18"}, [b"<html>hello</html>"], 0.0),
}


class MediaHost(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, headers, chunks, delay = ROUTES.get(self.path, (404, {"Content-Length": "0"}, [], 0.0))
        time.sleep(delay)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(chunk)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def media_host() -> Iterator[str]:
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MediaHost)
    serving = threading.Thread(target=host.serve_forever, daemon=True)
    serving.start()
    try:
        yield f"http://127.0.0.1:{host.server_address[1]}"
    finally:
        host.shutdown()
        serving.join(10)


@pytest.fixture(scope="module")
def capped(loaded_model):
    yield from make_server(
        loaded_model, max_media_bytes=200_000, media_timeout_s=1.0, allowed_url_networks=("127.0.0.1/32",)
    )


def ask(server, url: str) -> httpx.Response:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
    body = {"model": server.model_id, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    return httpx.post(f"{server.base}/chat/completions", json=body, timeout=30)


def test_remote_images(capped, media_host) -> None:
    assert ask(capped, f"{media_host}/ok.png").status_code == 200
    assert ask(capped, f"{media_host}/redirect").status_code == 200
    for path, status, says in [
        ("/big.png", 413, "larger than"),
        ("/big-unsized.png", 413, "larger than"),
        ("/slow.png", 400, "longer than"),
        ("/page", 400, "not an image"),
        ("/missing.png", 400, "HTTP 404"),
    ]:
        response = ask(capped, media_host + path)
        assert response.status_code == status and says in response.json()["error"]["message"], (path, response.text)
    assert "allow-local-media" in ask(capped, str(IMAGES / "rgb_56x56.png")).json()["error"]["message"]


def test_unload_then_lazy_reload(capped) -> None:
    lines: list[str] = []
    body = {
        "model": capped.model_id,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }

    def long_stream() -> None:
        with httpx.stream("POST", f"{capped.base}/chat/completions", json=body, timeout=30) as response:
            lines.extend(line for line in response.iter_lines() if line)

    reader = threading.Thread(target=long_stream)
    reader.start()
    deadline = time.monotonic() + 10
    while httpx.get(f"{capped.url}/metrics").json()["engine"]["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    refused = httpx.post(f"{capped.url}/unload", json={})  # it would cancel the stream: not without force
    assert refused.status_code == 409 and "force" in refused.json()["error"]["message"]
    assert httpx.post(f"{capped.url}/unload", json={"force": True}).json() == {"unloaded": capped.model_id}
    reader.join(30)
    # The stream in flight is told, in its own format, and still ends properly.
    assert "unloaded" in lines[-2] and '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
    assert httpx.get(f"{capped.url}/health").json()["loaded"] is False
    assert [m["id"] for m in httpx.get(f"{capped.base}/models").json()["data"]] == [capped.model_id]
    body = {"model": capped.model_id, "messages": [{"role": "user", "content": "back?"}], "max_tokens": 2}
    assert httpx.post(f"{capped.base}/chat/completions", json=body, timeout=60).status_code == 200
    assert httpx.get(f"{capped.url}/health").json()["loaded"] is True


def test_models_named_by_requests_come_from_the_models_dir() -> None:
    """Without --model, a request may name a model folder under --models-dir (by its path inside it); anything
    else, existing or not, gets the same 404, which names no path."""
    from vlm_serve import ServeSettings, create_app

    from .conftest import start

    root = MODEL.parents[1]  # tests/fixtures
    app = create_app(None, ServeSettings(context_length=512, models_dir=root))
    server, thread, url = start(app)
    try:
        listed = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        assert "qwen2_vl/hf4" in listed and not any(name.startswith("/") for name in listed)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 400 and "model" in response.json()["error"]["message"]
        messages = set()
        for name in (
            "/no/such/model",
            str(MODEL),  # exists, but outside what was allowed by name
            "../fixtures/qwen2_vl/hf4",
            "qwen2_vl/../qwen2_vl/hf4",
            "qwen2_vl",  # a folder without a config.json
            "qwen2_vl/nothing",
            "~/x",
        ):
            missing = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": name}, timeout=30)
            error = missing.json()["error"]
            assert missing.status_code == 404 and error["code"] == "model_not_found", (name, missing.text)
            messages.add(error["message"].replace(repr(name[:200]), "NAME"))
        assert len(messages) == 1 and str(root) not in messages.pop()  # one text, whatever exists
        loaded = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": "qwen2_vl/hf4"}, timeout=60)
        assert loaded.status_code == 200 and loaded.json()["usage"]["completion_tokens"] == 2
        assert loaded.json()["model"] == "qwen2_vl/hf4"
        assert httpx.get(f"{url}/health").json()["model"] == "qwen2_vl/hf4"
        metrics = httpx.get(f"{url}/metrics").json()
        assert metrics["engine"]["finished"] == 1 and metrics["engine"]["generation_tokens"] == 2
        assert metrics["http_statuses"]["404"] == 7
    finally:
        server.should_exit = True
        thread.join(20)


def test_naming_another_model_cancels_no_one() -> None:
    """While the loaded model streams to one client, a request for another model is refused with a 503 to
    retry, not served by unloading the first; once the first is done, the switch happens."""
    from vlm_serve import ServeSettings, create_app

    from .conftest import start

    app = create_app(None, ServeSettings(context_length=512, models_dir=MODEL.parents[1]))
    server, thread, url = start(app)
    try:
        first = {"model": "qwen2_vl/hf4", "messages": [{"role": "user", "content": "x"}], "max_tokens": 400}
        assert httpx.post(f"{url}/v1/chat/completions", json=first, timeout=60).status_code == 200
        lines: list[str] = []

        def long_stream() -> None:
            body = {**first, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
                lines.extend(line for line in response.iter_lines() if line)

        reader = threading.Thread(target=long_stream)
        reader.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/metrics").json()["engine"]["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        other = {**first, "model": "qwen2_5_vl/hf4", "max_tokens": 2}
        busy = httpx.post(f"{url}/v1/chat/completions", json=other, timeout=30)
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1, busy.text
        assert "busy" in busy.json()["error"]["message"]
        reader.join(60)
        assert lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in lines[-2]  # finished, not cancelled
        switched = httpx.post(f"{url}/v1/chat/completions", json=other, timeout=60)
        assert switched.status_code == 200 and switched.json()["model"] == "qwen2_5_vl/hf4"
    finally:
        server.should_exit = True
        thread.join(20)


def bomb(side: int = 13000) -> str:
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_pixel_bombs_are_refused_from_their_headers(server) -> None:
    image = {"type": "image_url", "image_url": {"url": bomb()}}
    content = [image, image, image, {"type": "text", "text": "?"}]
    body = json.dumps({"model": server.model_id, "max_tokens": 1, "messages": [{"role": "user", "content": content}]})
    response, rise = peak_rise_mb(lambda: post(server, body.encode()))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "image_too_large" and "13000x13000" in error["message"]
    assert rise < 300, rise  # before: 3.9 GB for these three 21 KB PNGs


def test_a_large_jpeg_photo_gets_through_at_a_reduced_scale(loaded_model) -> None:
    from .conftest import make_server

    buffer = io.BytesIO()
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(buffer, format="JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    servers = make_server(loaded_model, max_image_pixels=1_000_000, max_request_pixels=2_000_000)
    small = next(servers)
    try:
        image = {"type": "image_url", "image_url": {"url": url}}
        one = {"model": small.model_id, "max_tokens": 1, "messages": [{"role": "user", "content": [image]}]}
        assert httpx.post(f"{small.base}/chat/completions", json=one, timeout=60).status_code == 200
        # 4000x3000 at 1/4 is 1000x750 = 0.75 M pixels: two fit in 2 M, three do not.
        three = {**one, "messages": [{"role": "user", "content": [image, image, image]}]}
        refused = httpx.post(f"{small.base}/chat/completions", json=three, timeout=60)
        assert refused.status_code == 400 and "2000000 pixels in all" in refused.json()["error"]["message"]
        png = io.BytesIO()
        Image.new("RGB", (1200, 1000)).save(png, format="PNG")
        other = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        body = {**one, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": other}}]}]}
        refused = httpx.post(f"{small.base}/chat/completions", json=body, timeout=60)
        assert refused.status_code == 400 and "1200x1000" in refused.json()["error"]["message"]
    finally:
        next(servers, None)
