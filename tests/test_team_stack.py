"""The team's services (docker-compose.yml's, started natively: tests/services.py) refuse requests
without credentials; prefect.yaml's deployments are on the team's pool. The pipeline's run through
them is conftest.tiny_pipeline (tests/test_pipeline.py)."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import REPO, WORK_POOL
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


def test_prefect_yaml_put_both_deployments_on_the_teams_pool(tiny_pipeline, team_stack):
    """`prefect deploy --all` (tiny_pipeline ran it in the project, as the README says) registered
    prefect.yaml's two deployments on the pool, each changing into the project's folder as the
    worker's environment names it (OMNILONG_PROJECT_DIR, unset where they were deployed), and
    left prefect.yaml as it was."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    async def read_back():
        async with get_client() as client:
            return [await client.read_deployment_by_name(name)
                    for name in ("omnilong/full", "omnilong/ablation-no-stage2")]

    with temporary_settings(updates={PREFECT_API_URL: team_stack.prefect_api,
                                     PREFECT_API_AUTH_STRING: team_stack.prefect_auth_string}):
        full, ablation = asyncio.run(read_back())
    assert (full.work_pool_name, full.parameters) == (WORK_POOL, {"variant": "full"})
    assert (ablation.work_pool_name, ablation.parameters) == (WORK_POOL, {"variant": "no-stage2"})
    assert full.entrypoint == ablation.entrypoint == "flows/pipeline.py:omnilong_pipeline"
    assert full.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
        "directory": "{{ $OMNILONG_PROJECT_DIR }}"}}]
    assert (tiny_pipeline / "prefect.yaml").read_bytes() == (REPO / "prefect.yaml").read_bytes()
