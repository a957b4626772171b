"""A schemathesis pass over the server's OpenAPI schema: whatever it sends, no answer is a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from .conftest import MODEL


@pytest.fixture(scope="module")
def fuzz_schema(loaded_model):
    from vlm_serve import ServeSettings, ServingEngine, create_app

    options = ServeSettings(
        model=str(MODEL), context_length=256, max_tokens_limit=3, media_timeout_s=1.0, allowed_hosts=("testserver",)
    )
    engine = ServingEngine.from_model(str(MODEL), *loaded_model, options, context_length=256)
    app = create_app(engine, options)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(fuzz_schema, mode) -> None:
    """Positive: data that fits the schema (it generates, within 3 tokens); negative: data that breaks it."""
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert len(operations) == 9  # every route is in the schema
    if mode is GenerationMode.NEGATIVE:  # only a body can be wrong: the other routes take no input
        operations = [op for op in operations if len(op.body) > 0]
        assert len(operations) == 5
    for operation in operations:

        @given(operation.as_strategy(mode))
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case) -> None:
            response = case.call()
            case.validate_response(response, checks=[not_a_server_error])

        call()
