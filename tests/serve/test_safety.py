"""Bad input gets a 4xx in the API's own error shape and the server keeps serving; auth; media policy."""

from __future__ import annotations

import base64

import anthropic
import httpx
import openai
import pytest

from .conftest import API_KEY, CONTEXT, IMAGES


def post(server, body, path="/v1/chat/completions", **kwargs) -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}",
        timeout=30,
        **kwargs,
        **({"json": body} if not isinstance(body, (bytes, str)) else {"content": body}),
    )


def chat(server, content, **extra):
    return {"model": server.model_id, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def openai_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type"} and isinstance(error["message"], str)
    return error["message"]


def image(url: str) -> list:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]


@pytest.mark.parametrize(
    "body, status, says",
    [
        (b"{not json", 400, "JSON"),
        ({"model": "m", "messages": "hello"}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 400, "max_tokens"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, 400, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "thinking_budget": 3}, 400, "thinking block"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n=1"),
        ({"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]}, 400, "video"),
    ],
)
def test_malformed_requests(server, body, status, says) -> None:
    assert says in openai_error(post(server, body, headers={"content-type": "application/json"}), status)


def test_unknown_model(server) -> None:
    response = post(server, {"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]})
    assert "gpt-17" in openai_error(response, 404)
    assert response.json()["error"]["code"] == "model_not_found"


def test_bad_images(server) -> None:
    not_an_image = "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()
    assert "not an image" in openai_error(post(server, chat(server, image(not_an_image))), 400)
    assert "base64" in openai_error(post(server, chat(server, image("data:image/png;base64,@@@not*base64"))), 400)
    assert "scheme" in openai_error(post(server, chat(server, image("ftp://example.com/a.png"))), 400)
    # Local paths: only under --allow-local-media (the fixture images folder here).
    assert "allow-local-media" in openai_error(post(server, chat(server, image("/etc/passwd"))), 403)
    assert "allow-local-media" in openai_error(post(server, chat(server, image(str(IMAGES / ".." / "README.md")))), 403)
    assert "not found" in openai_error(post(server, chat(server, image(str(IMAGES / "missing.png")))), 400)
    assert "audio" in openai_error(
        post(server, chat(server, [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])), 400
    )


def test_prompt_longer_than_context(server) -> None:
    response = post(server, chat(server, "word " * (CONTEXT + 10)))
    assert "context" in openai_error(response, 400)
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_body_over_the_limit(server) -> None:
    huge = chat(server, "x" * (3 * 1024 * 1024))
    assert "larger than" in openai_error(post(server, huge), 413)
    response = post(
        server,
        {"model": server.model_id, "max_tokens": 1, "messages": [{"role": "user", "content": "x" * (3 * 1024 * 1024)}]},
        path="/v1/messages",
    )
    assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"


def test_wrong_method_and_path(server) -> None:
    assert openai_error(httpx.get(f"{server.base}/chat/completions"), 405)
    assert openai_error(httpx.get(f"{server.base}/nowhere"), 404)
    response = httpx.get(f"{server.url}/v1/messages")
    assert response.status_code == 405 and response.json()["type"] == "error"


def test_server_still_serves_after_bad_input(server) -> None:
    assert post(server, chat(server, "still there?")).status_code == 200


def test_api_key(keyed_server) -> None:
    base = keyed_server.url
    assert httpx.get(f"{base}/health").status_code == 200  # open for liveness probes
    for path in ("/v1/models", "/metrics"):
        response = httpx.get(f"{base}{path}")
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{base}/v1/models", headers={"x-api-key": API_KEY}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.base, api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=keyed_server.base, api_key=API_KEY, max_retries=0)
    reply = good.chat.completions.create(
        model=keyed_server.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.usage.completion_tokens == 2
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(
            model=keyed_server.model_id, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body["type"] == "error"
    message = anthropic.Anthropic(base_url=base, api_key=API_KEY, max_retries=0).messages.create(
        model=keyed_server.model_id, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.usage.output_tokens == 2


def test_a_full_queue_is_overloaded_in_each_apis_own_way(loaded_model) -> None:
    """One slot, no waiting room: while a request streams, the next is refused, 503 for OpenAI's routes and
    Anthropic's own 529 (overloaded_error) for its routes; the running stream is not disturbed."""
    from .conftest import make_server

    # The engine holds the slot until it has generated the whole answer, which the tiny model can do before the
    # next two requests arrive: a model 4 ms slower a token keeps it busy through them.
    model, processor = loaded_model
    servers = make_server((_SlowModel(model), processor), max_concurrency=1, max_waiting=0)
    server = next(servers)
    try:
        body = {
            "model": server.model_id,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 400,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", f"{server.base}/chat/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # it is generating now
            chat = httpx.post(f"{server.base}/chat/completions", json={**body, "stream": False}, timeout=30)
            assert chat.status_code == 503 and chat.json()["error"]["type"] == "server_error"
            message = {"model": server.model_id, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
            overloaded = httpx.post(f"{server.base}/messages", json=message, timeout=30)
            assert overloaded.status_code == 529
            assert overloaded.json()["error"]["type"] == "overloaded_error"
            assert [line for line in lines if line][-1] == "data: [DONE]"
    finally:
        next(servers, None)


class _SlowModel:
    """A model that takes 4 ms longer to give each step's logits (everything else is the model's own)."""

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def compute_logits(self, hidden):
        import time

        time.sleep(0.004)
        return self._model.compute_logits(hidden)
