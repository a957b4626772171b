"""Client errors that once reached the engine or the file system and came back as 500s are now 400s in the API's
own shape, decided at the edge; the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from .conftest import CONTEXT


def chat(server, content="hi", **extra) -> dict:
    return {"model": server.model_id, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def image(url: str) -> list:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]


def raw(url: str) -> bytes:
    """A body with ``url`` spliced in as written: JSON escapes stay escapes."""
    return (
        b'{"max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "'
        + url.encode()
        + b'"}}]}]}'
    )


@pytest.mark.parametrize(
    "body, says",
    [
        (lambda s: chat(s, seed=-1, temperature=1.0), "seed"),
        (lambda s: chat(s, seed=2**64, temperature=1.0), "seed"),
        (lambda s: chat(s, logit_bias={str(10**6): 1.0}), "logit_bias"),
        (lambda s: chat(s, logit_bias={"-3": 1.0}), "logit_bias"),
        (lambda s: chat(s, stream=0), "stream"),
        (lambda s: chat(s, max_tokens="2"), "max_tokens"),
        (lambda s: chat(s, presence_penalty=3.0), "presence_penalty"),
        (lambda s: raw("http://a\\ud800.example/x.png"), "surrogate"),
        (lambda s: raw("a\\udc80b.png"), "surrogate"),
        (lambda s: raw("a\\u0000b.png"), "NUL"),
        (lambda s: raw("file:///x%00y.png"), "NUL"),
        (lambda s: b'{"max_tokens": 2, "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "UTF-8"),
        (lambda s: b'{"max_tokens": 2, "temperature": NaN, "messages": [{"role": "user", "content": "x"}]}', "finite"),
        (lambda s: b"[" * 100_000 + b"]" * 100_000, "pars"),
    ],
)
def test_former_server_errors_are_client_errors(server, body, says) -> None:
    payload = body(server)
    kwargs = {"json": payload} if isinstance(payload, dict) else {"content": payload}
    response = httpx.post(
        f"{server.base}/chat/completions", headers={"content-type": "application/json"}, timeout=30, **kwargs
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and says in error["message"], error


def test_anthropic_errors_keep_anthropics_shape(server) -> None:
    body = b'{"max_tokens": 2, "messages": [{"role": "user", "content": "\\udfff"}]}'
    response = httpx.post(
        f"{server.base}/messages", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400 and response.json()["type"] == "error", response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_paired_surrogates_are_fine(server) -> None:
    body = b'{"max_tokens": 2, "messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}'
    response = httpx.post(
        f"{server.base}/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 200, response.text


def test_logit_bias_inside_the_vocabulary_still_works(server) -> None:
    response = httpx.post(f"{server.base}/chat/completions", json=chat(server, logit_bias={"7": 100.0}), timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def test_405_says_what_is_allowed_and_503_when_to_retry(server, loaded_model) -> None:
    response = httpx.get(f"{server.base}/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    from .conftest import make_server

    servers = make_server(loaded_model, max_concurrency=1, max_waiting=0)
    busy = next(servers)
    try:
        body = {**chat(busy), "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{busy.base}/chat/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()  # held: a dropped iterator closes the stream
            assert next(line for line in lines if line.startswith("data: "))
            for path, status in (("/chat/completions", 503), ("/messages", 529)):
                refused = httpx.post(f"{busy.base}{path}", json=chat(busy), timeout=30)
                assert refused.status_code == status, (path, refused.text)
                assert int(refused.headers["retry-after"]) >= 1
    finally:
        next(servers, None)


def test_no_paths_in_health_or_errors(server) -> None:
    """The served model is named by its folder, not its absolute path, wherever a client can see it."""
    health = httpx.get(f"{server.url}/health").json()
    assert health["model"] == server.model_id and "/" not in health["model"]
    wrong = httpx.post(f"{server.base}/chat/completions", json={**chat(server), "model": "other"}, timeout=30)
    assert wrong.status_code == 404 and "/" not in wrong.json()["error"]["message"]
    long = httpx.post(f"{server.base}/chat/completions", json=chat(server, "word " * (CONTEXT * 2)), timeout=30)
    assert long.status_code == 400 and "/" not in long.json()["error"]["message"]


def test_metrics_do_not_tell_whether_an_image_was_sent_lately(server) -> None:
    import base64

    from .conftest import IMAGES

    url = "data:image/png;base64," + base64.b64encode((IMAGES / "rgb_56x56.png").read_bytes()).decode()
    before = httpx.get(f"{server.url}/metrics").json()["vision_cache"]
    cache = server.app.state.engine.loaded.vision_cache
    hits = cache.hits
    for _ in range(2):
        assert (
            httpx.post(f"{server.base}/chat/completions", json=chat(server, image(url)), timeout=30).status_code == 200
        )
    assert cache.hits > hits  # the second one was a hit
    after = httpx.get(f"{server.url}/metrics").json()["vision_cache"]
    assert after == before and after["window_s"] >= 60  # but /metrics moves once a window, not per request
