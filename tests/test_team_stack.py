"""The team's services (docker-compose.yml's, started natively: tests/services.py) refuse requests
without credentials. The pipeline's run through them is conftest.tiny_pipeline (tests/test_pipeline.py)."""

from __future__ import annotations

import pytest

from tests.services import basic_auth, http_status

pytestmark = pytest.mark.slow


def test_unauthenticated_requests_are_refused(team_stack):
    search = f"{team_stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(search, timeout_s=30) == 401
    assert http_status(search, basic_auth(*team_stack.mlflow_admin), timeout_s=30) == 200
    assert http_status(search, basic_auth(team_stack.mlflow_admin[0], "wrong"), timeout_s=30) == 401

    # Prefect's clients send PREFECT_API_AUTH_STRING as HTTP basic credentials.
    flows = f"{team_stack.prefect_api}/flows/filter"
    user, _, password = team_stack.prefect_auth_string.partition(":")
    assert http_status(flows, timeout_s=30, json_body=b"{}") == 401
    assert http_status(flows, basic_auth(user, password), timeout_s=30, json_body=b"{}") == 200
    assert http_status(flows, basic_auth(user, "wrong"), timeout_s=30, json_body=b"{}") == 401
