"""A real uvicorn server on 127.0.0.1 serving the tiny Qwen2-VL fixture, in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests" / "fixtures" / "qwen2_vl" / "hf4"
IMAGES = ROOT / "tests" / "fixtures" / "images"
API_KEY = "test-key"
CONTEXT = 1024


@dataclass
class Server:
    url: str
    model_id: str
    app: Any

    @property
    def base(self) -> str:
        return f"{self.url}/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(app: Any) -> tuple[Any, threading.Thread, str]:
    """``app`` served as the command serves it (its settings' connection limits), on a free loopback port."""
    import dataclasses

    import uvicorn

    from vlm_serve.listening import uvicorn_config

    port = free_port()
    settings = dataclasses.replace(app.state.settings, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(uvicorn_config(app, settings, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def loaded_model() -> tuple[Any, Any]:
    from vlm_models import load

    return load(MODEL)


def make_server(
    loaded_model: tuple[Any, Any],
    context_length: int = CONTEXT,
    drafter: Any = None,
    draft_kind: str = "draft",
    **options: Any,
) -> Iterator[Server]:
    from vlm_serve import ModelHost, ServeSettings, create_app

    settings = ServeSettings(model=str(MODEL), context_length=context_length, **options)
    model, processor = loaded_model
    engine = ModelHost.from_model(
        str(MODEL), model, processor, settings, context_length=context_length, drafter=drafter, draft_kind=draft_kind
    )
    app = create_app(engine, settings)
    server, thread, url = start(app)
    try:
        yield Server(url, MODEL.name, app)  # clients see the folder's name, never its path
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.fixture(scope="session")
def server(loaded_model: tuple[Any, Any]) -> Iterator[Server]:
    """Open server (no API key), local media allowed under the fixture images."""
    yield from make_server(loaded_model, allow_local_media=IMAGES, max_body_bytes=2 * 1024 * 1024)


@pytest.fixture(scope="module")
def keyed_server(loaded_model: tuple[Any, Any]) -> Iterator[Server]:
    yield from make_server(loaded_model, api_key=API_KEY)
