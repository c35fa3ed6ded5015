"""The team's services (docker-compose.yml's, started natively: tests/services.py) refuse requests
without credentials; prefect.yaml's deployments are on the team's pool; the README's promotion
lines work against them. The pipeline's run through them is conftest.tiny_pipeline
(tests/test_pipeline.py)."""

from __future__ import annotations

import asyncio
import re
import subprocess

import pytest

from tests.conftest import REPO, WORK_POOL, project_env
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


def _readme_promotion_commands() -> list[str]:
    """The command lines of the README's "Promoting a model" block, as a team member pastes them."""
    section = (REPO / "README.md").read_text().split("**Promoting a model.**", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_promotion_commands_read_and_move_the_champion(tiny_pipeline, team_stack, monkeypatch):
    """The README's two promotion lines, verbatim, against the basic-auth MLflow server after the
    `full` deployment run: the first prints the gate's decision (the champion's version and its
    gate score tag), the second moves `champion` to the version it names."""
    import ast

    from mlflow import MlflowClient

    read, move = _readme_promotion_commands()
    [(name, target)] = re.findall(r"set_registered_model_alias\('([^']+)', 'champion', (\d+)\)", move)
    # As the README's section exports them: the server's address, the basic-auth user from .env.
    credentials = {"MLFLOW_TRACKING_URI": team_stack.mlflow_uri,
                   "MLFLOW_TRACKING_USERNAME": team_stack.mlflow_admin[0],
                   "MLFLOW_TRACKING_PASSWORD": team_stack.mlflow_admin[1]}
    for variable, value in credentials.items():
        monkeypatch.setenv(variable, value)
    env = {**project_env(tiny_pipeline), **credentials}

    def run(line: str) -> str:
        result = subprocess.run(["bash", "-c", line], cwd=tiny_pipeline, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr[-3000:]}"
        return result.stdout

    client = MlflowClient(team_stack.mlflow_uri)
    champion = client.get_model_version_by_alias(name, "champion")
    version, _, tags = run(read).strip().partition(" ")
    assert (version, ast.literal_eval(tags)) == (str(champion.version), champion.tags)
    assert any(tag.startswith("omnilong.gate.") for tag in champion.tags)  # the gate's recorded score

    # Away from the README's version first, so that its line has something to move.
    elsewhere = next(str(v.version) for v in client.search_model_versions(f"name = '{name}'")
                     if str(v.version) != target)
    client.set_registered_model_alias(name, "champion", elsewhere)
    try:
        run(move)
        assert str(client.get_model_version_by_alias(name, "champion").version) == target
    finally:  # the tests after this one read the gate's own decision
        client.set_registered_model_alias(name, "champion", champion.version)
