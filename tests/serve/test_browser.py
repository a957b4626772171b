"""Browser-side attacks: a page on another site cannot reach the server through DNS rebinding (Host is checked),
nor change its state with a form or a text/plain fetch (POST needs JSON or the key); CORS is off unless asked."""

from __future__ import annotations

import httpx
import pytest

from .conftest import API_KEY, make_server


@pytest.fixture(scope="module")
def named(loaded_model):
    yield from make_server(
        loaded_model, allowed_hosts=("vlm.internal", ".lab.example"), cors_origins=("https://ui.example",)
    )


def port_of(server) -> str:
    return server.url.rsplit(":", 1)[1]


@pytest.mark.parametrize("path", ["/v1/models", "/health", "/metrics"])
def test_a_foreign_host_is_refused(server, path) -> None:
    response = httpx.get(f"{server.url}{path}", headers={"Host": f"attacker.example:{port_of(server)}"})
    assert response.status_code == 400 and "Host" in response.json()["error"]["message"]


def test_a_rebound_name_cannot_post(server) -> None:
    body = {"model": server.model_id, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    for path in ("/v1/chat/completions", "/v1/messages", "/unload"):
        response = httpx.post(f"{server.url}{path}", json=body, headers={"Host": "rebind.attacker.example"})
        assert response.status_code == 400, (path, response.text)
    assert httpx.get(f"{server.url}/health").json()["loaded"] is True


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "10.0.0.7", ""])
def test_addresses_and_local_names_are_served(server, host) -> None:
    headers = {"Host": f"{host}:{port_of(server)}" if host else ""}
    assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 200


def test_listed_names_are_served(named) -> None:
    for host, status in (("vlm.internal", 200), ("gpu3.lab.example", 200), ("lab.example.evil", 400)):
        assert httpx.get(f"{named.url}/v1/models", headers={"Host": host}).status_code == status, host


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_state_changing_routes_need_json(server, content_type) -> None:
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/unload", "/v1/chat/completions", "/v1/responses", "/v1/messages"):
        response = httpx.post(f"{server.url}{path}", content=b'{"force": true}', headers=headers)
        assert response.status_code == 415, (path, response.text)
    assert httpx.get(f"{server.url}/health").json()["loaded"] is True  # the text/plain unload did nothing
    anthropic = httpx.post(f"{server.url}/v1/messages", content=b"{}", headers=headers)
    assert anthropic.json()["type"] == "error"


def test_json_with_parameters_is_json(server) -> None:
    body = b'{"max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}'
    for content_type in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json"):
        response = httpx.post(f"{server.base}/chat/completions", content=body, headers={"content-type": content_type})
        assert response.status_code == 200, (content_type, response.text)


def test_with_an_api_key_the_key_is_what_counts(keyed_server) -> None:
    body = b'{"max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}'
    keyed = httpx.post(
        f"{keyed_server.base}/chat/completions",
        content=body,
        headers={"content-type": "text/plain", "Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    # Past the guard (a browser cannot attach the key cross-site without a preflight); FastAPI then reads only
    # JSON bodies, so this one is a plain 400, not the guard's 415.
    assert keyed.status_code == 400 and "body" in keyed.json()["error"]["message"], keyed.text
    anonymous = httpx.post(
        f"{keyed_server.base}/chat/completions", content=body, headers={"content-type": "text/plain"}
    )
    assert anonymous.status_code == 401


def test_cors_is_off_unless_configured(server, named) -> None:
    origin = {"Origin": "https://ui.example"}
    assert "access-control-allow-origin" not in httpx.get(f"{server.url}/v1/models", headers=origin).headers
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    assert (
        "access-control-allow-origin" not in httpx.options(f"{server.base}/chat/completions", headers=preflight).headers
    )
    allowed = httpx.get(f"{named.url}/v1/models", headers=origin)
    assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
    answered = httpx.options(f"{named.base}/chat/completions", headers=preflight)
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == "https://ui.example"
    other = httpx.get(f"{named.url}/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
