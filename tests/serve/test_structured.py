"""Structured outputs: the grammar holds the (random-weight) model to the schema; every answer parses and
validates with a real JSON-schema validator, streamed or not."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key="x", max_retries=0)


def ask(client, server, response_format, prompt: str, **extra):
    return client.chat.completions.create(
        model=server.model_id,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=extra.pop("max_tokens", 120),
        response_format=response_format,
        **extra,
    )


@pytest.mark.parametrize("prompt", ["Who is Ada?", "Describe a user", "JSON!"])
def test_json_schema_validates(server, client, prompt) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    response = ask(client, server, fmt, prompt, temperature=0.8, seed=len(prompt))
    text = response.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert response.choices[0].finish_reason == "stop"


def test_json_schema_streaming(server, client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    chunks = ask(client, server, fmt, "stream a person", stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object(server, client) -> None:
    response = ask(client, server, {"type": "json_object"}, "any object", max_tokens=400)
    assert response.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_bad_schema_is_a_400(server) -> None:
    body = {
        "model": server.model_id,
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}},
    }
    response = httpx.post(f"{server.base}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and "schema" in response.json()["error"]["message"]
    body["response_format"] = {"type": "xml"}
    response = httpx.post(f"{server.base}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and "xml" in response.json()["error"]["message"]
