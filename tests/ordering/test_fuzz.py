"""API fuzzing: schemathesis generates requests from the app's OpenAPI document; none may answer 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from ordering_fixtures import make_tokens, seed_fleet
from schemathesis.checks import not_a_server_error

from fleetwatch.db import upgrade
from functions.db import make_engine, make_sessions
from ordering.api import create_app


@pytest.fixture(scope="module")
def app_and_tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, str]]]:
    """The app over a seeded SQLite database and one token per role."""
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessions(engine)
    seed_fleet(sessions)
    yield create_app(sessions), make_tokens(sessions)
    engine.dispose()


def test_no_generated_request_makes_the_api_fail(app_and_tokens: tuple[Any, dict[str, str]]) -> None:
    app, tokens = app_and_tokens
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    answered: dict[str, set[int]] = {}
    for operation in operations:
        label = operation.label

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def fuzz(case: Any) -> None:
            for secret in (tokens["admin"], "fw_garbage"):
                response = case.call_and_validate(headers={"Authorization": f"Bearer {secret}"},
                                                  checks=[not_a_server_error])
                answered.setdefault(label, set()).add(response.status_code)  # noqa: B023 (called at once)

        fuzz()
    # the admin token got the fuzzer past authentication everywhere, and to real answers on most operations
    assert not [op for op, codes in answered.items() if codes <= {401}], answered
    assert len([op for op, codes in answered.items() if any(c < 300 for c in codes)]) >= 11, answered
