"""Schemathesis over the server's OpenAPI document, against a live server on loopback, with its response checks on:
whatever it sends, the answer is no 5xx, its status is one the document lists for that route, its content type
and body match what the document says for that status (each API's own error shape included), documented headers
are there (Retry-After), and a body that breaks the schema is refused. Bounded in examples and time."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import make_server

pytestmark = pytest.mark.slow  # schema fuzzing: about 10 s per mode

EXAMPLES = 20
SECONDS_PER_OPERATION = 60
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzzed(loaded_model):
    """A server that answers fast: a small context, at most 3 tokens, a 1 s media timeout."""
    yield from make_server(loaded_model, max_tokens_limit=3, media_timeout_s=1.0)


@pytest.fixture(scope="module")
def fuzz_schema(fuzzed):
    return schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")


def test_the_document_lists_every_route_and_no_422(fuzz_schema, fuzzed) -> None:
    import httpx

    document = httpx.get(f"{fuzzed.url}/openapi.json").json()
    assert len(document["paths"]) == 11
    for path, operations in document["paths"].items():
        for operation in operations.values():
            assert "422" not in operation["responses"] and "400" in operation["responses"], path
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["503"]["headers"]["Retry-After"]["required"] is True
    assert "529" in document["paths"]["/v1/messages"]["post"]["responses"]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "n": 1,
                "logprobs": True,
                "top_logprobs": 2,
                "stream_options": {"include_usage": True},
            },
        ),
        ("/v1/messages", {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}], "stream": True}),
        ("/v1/responses", {"input": "hi", "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/messages", {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/responses", {"input": "hi", "instructions": "be brief"}),
    ],
)
def test_answers_streamed_or_not_match_the_document(fuzz_schema, fuzzed, path, body) -> None:
    """Generated cases seldom get as far as a stream (most are refused for something): these do, and each event
    is checked against the document's event schema."""
    case = fuzz_schema[path]["POST"].Case(body=body, media_type="application/json")
    response = case.call(base_url=fuzzed.url, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"][0].startswith(
        "text/event-stream" if body.get("stream") else "application/json"
    )
    case.validate_response(response, checks=CHECKS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_answers_conform_to_the_document(fuzz_schema, fuzzed, mode) -> None:
    """Positive: data that fits the schema (it generates, within 3 tokens); negative: data that breaks it."""
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert len(operations) == 11  # every route is in the schema
    checks = CHECKS
    if mode is GenerationMode.NEGATIVE:  # only a body can be wrong: the other routes take no input
        operations = [op for op in operations if len(op.body) > 0]
        assert len(operations) == 6
        checks = [*CHECKS, negative_data_rejection]
    for operation in operations:
        fuzz(operation, mode, checks, fuzzed.url)


def fuzz(operation, mode: GenerationMode, checks: list, url: str) -> None:
    deadline = time.monotonic() + SECONDS_PER_OPERATION

    @given(operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def call(case) -> None:
        if time.monotonic() > deadline:
            return  # bounded in time as well as in examples on a slow machine
        if isinstance(case.body, dict) and mode is GenerationMode.POSITIVE:
            if operation.path == "/unload":
                case.body = {**case.body, "force": False}  # an unload would only slow the next cases down
            elif "model" in case.body:
                case.body = {**case.body, "model": ""}  # the served model, so that cases get past the lookup
        response = case.call(base_url=url, timeout=30)
        case.validate_response(response, checks=checks)

    call()
