"""Property-based API tests generated from the service's own OpenAPI schema (schemathesis): whatever a client sends,
valid by the schema (positive mode) or not (negative mode), the service never answers 5xx."""
from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.kgrec.conftest_serve import serve_app, serve_recommender  # noqa: F401  (fixtures)

# Bounded: this many generated requests per operation and mode (11 operations x 2 modes).
MAX_EXAMPLES = int(os.environ.get("KGREC_SCHEMA_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def api_schema(serve_app):
    return schemathesis.openapi.from_asgi("/openapi.json", serve_app)


def test_schema_covers_every_endpoint(api_schema):
    ops = {(o.ok().method.upper(), o.ok().path) for o in api_schema.get_all_operations()}
    assert {("GET", "/recommend"), ("GET", "/search"), ("POST", "/search"), ("GET", "/similar"), ("GET", "/explain"),
            ("GET", "/items/{item_id}"), ("GET", "/items/{item_id}/image"), ("GET", "/health"),
            ("GET", "/users")} <= ops


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_no_server_errors(api_schema, mode):
    statuses: dict[str, set[int]] = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call_and_validate(checks=[not_a_server_error])
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
            assert "Traceback" not in response.text
            statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

        try:
            run()
        except Unsatisfiable:
            # negative mode cannot break an operation whose inputs are unconstrained strings (/items/{item_id})
            # or that has none (/health)
            assert mode == GenerationMode.NEGATIVE, operation.path
    assert len(statuses) >= (9 if mode == GenerationMode.POSITIVE else 5)
    if mode == GenerationMode.POSITIVE:  # valid requests reach real answers, not only validation errors
        assert any(200 in codes for codes in statuses.values())
