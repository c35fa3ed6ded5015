"""End to end: the pipeline's deployments run on a clean copy of the project through the team's
services (conftest.tiny_pipeline), then DVC's and MLflow's view of it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import free_port, project_env
from tests.services import BUCKET

pytestmark = pytest.mark.slow

FAMILY = "qwen2_5_vl"
STAGES = ("stage1", "stage2", "stage3")


def _dvc(project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, env=project_env(project), capture_output=True, text=True
    )


@pytest.fixture(scope="module", autouse=True)
def team_credentials(team_stack, monkeypatch_module):
    """The team's MLflow and S3 credentials in the environment, as a team member exports them (the
    Prefect ones stay out: the last test runs `make serve`'s own server)."""
    for name, value in team_stack.client_env().items():
        if not name.startswith("PREFECT_"):
            monkeypatch_module.setenv(name, value)


@pytest.fixture(scope="module")
def mlflow_client(tiny_pipeline, team_stack, monkeypatch_module):
    import mlflow

    monkeypatch_module.chdir(tiny_pipeline)
    mlflow.set_tracking_uri(team_stack.mlflow_uri)
    return mlflow.MlflowClient()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _download_weights(uri: str, into: Path) -> dict[str, torch.Tensor]:
    import mlflow

    return load_file(Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(into))) / "model.safetensors")


def test_pipeline_produces_every_stage_output(tiny_pipeline):
    assert (tiny_pipeline / "models/tiny/config.json").is_file()
    assert list((tiny_pipeline / "data/raw/default/text").glob("*.jsonl"))
    assert (tiny_pipeline / "data/raw/default/video/qa.jsonl").is_file()
    for stage in STAGES:
        index = json.loads((tiny_pipeline / f"data/packed/{stage}/index.json").read_text())
        assert index["num_rows"] > 0
        assert (tiny_pipeline / f"runs/{stage}/model/model.safetensors").is_file()
        assert (tiny_pipeline / f"runs/{stage}/loss_curve.png").read_bytes().startswith(b"\x89PNG")
        assert list((tiny_pipeline / f"checkpoints/{stage}").glob("step*"))
    heldout = json.loads((tiny_pipeline / "runs/eval-full/heldout.json").read_text())
    assert set(heldout) == {"base", *STAGES}
    assert all(metrics["tokens"] > 0 for stages in heldout.values() for metrics in stages.values())


def test_each_stage_registers_a_loadable_version_that_differs_from_the_last(tiny_pipeline, mlflow_client, tmp_path):
    from omnilong.models.loading import load_model

    previous = load_file(tiny_pipeline / "models/tiny/model.safetensors")
    for stage in STAGES:
        version = mlflow_client.get_model_version_by_alias(f"omnilong-{FAMILY}", stage)
        assert version.tags["omnilong.stage"] == stage
        weights = _download_weights(f"models:/omnilong-{FAMILY}@{stage}", tmp_path / stage)
        assert weights.keys() == previous.keys()
        assert any(not torch.equal(weights[key], previous[key]) for key in weights)
        previous = weights
    model = load_model(tmp_path / "stage3", dtype=torch.float32)
    assert model.config.model_type == FAMILY


def test_step_metrics_are_logged_and_stage1_learns(tiny_pipeline, mlflow_client):
    from omnilong.config import load_params

    params = load_params(tiny_pipeline / "params.yaml")
    for stage in STAGES:
        run_id = json.loads((tiny_pipeline / f"runs/{stage}/registration.json").read_text())["run_id"]
        run = mlflow_client.get_run(run_id)
        assert "mlflow.parentRunId" in run.data.tags
        assert run.data.params["data.version"] != "untracked"
        assert run.data.params["git.commit"] != "unknown"
        assert {"loss_curve.png", "model", "deepspeed_config.json"} <= {
            item.path for item in mlflow_client.list_artifacts(run_id)}
        losses = mlflow_client.get_metric_history(run_id, "train/loss")
        assert [m.step for m in losses] == list(range(params.stages[stage].train.max_steps))
        for metric in ("train/lr", "train/tokens_per_s", "memory/peak_mb_rank0", "memory/peak_mb_rank1"):
            assert len(mlflow_client.get_metric_history(run_id, metric)) == len(losses)
        if stage == "stage1":
            values = [m.value for m in losses]
            assert sum(values[-3:]) / 3 < sum(values[:3]) / 3


def test_every_model_is_evaluated_with_heatmaps_and_stage3_is_gated(tiny_pipeline, mlflow_client):
    from PIL import Image

    metrics = json.loads((tiny_pipeline / "runs/eval-full/metrics.json").read_text())
    assert set(metrics) == {"base", *STAGES}
    for label, scores in metrics.items():
        for name in ("niah.accuracy", "vniah.teacher_forced", "vniah.generation",
                     "videomme.without_subtitles.overall.official.accuracy",
                     "videomme.with_subtitles.overall.strict.accuracy"):
            assert 0.0 <= scores[name] <= 1.0, (label, name)
        for plot in ("niah/niah.png", "vniah/vniah_teacher_forced.png", "videomme/videomme_accuracy_by_duration.png"):
            with Image.open(tiny_pipeline / "runs/eval-full" / label / plot) as image:
                assert image.format == "PNG" and min(image.size) > 100
    promotion = json.loads((tiny_pipeline / "runs/eval-full/promotion.json").read_text())
    assert promotion["model"] == f"omnilong-{FAMILY}" and promotion["promoted"]  # the first stage 3: no champion yet
    champion = mlflow_client.get_model_version_by_alias(f"omnilong-{FAMILY}", "champion")
    assert str(champion.version) == promotion["version"]
    assert str(mlflow_client.get_model_version_by_alias(f"omnilong-{FAMILY}", "stage3").version) == promotion["version"]
    [evaluation] = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name("omnilong").experiment_id], "attributes.run_name = 'evaluate'")
    assert evaluation.data.tags["omnilong.promoted"] == "true"
    assert f"stage3.{promotion['metric']}" in evaluation.data.metrics
    artifacts = {item.path for item in mlflow_client.list_artifacts(evaluation.info.run_id, "stage3/niah")}
    assert "stage3/niah/niah.png" in artifacts


def test_ablation_skips_stage2_and_keeps_its_own_name(tiny_ablation, mlflow_client):
    ablation = mlflow_client.get_model_version_by_alias(f"omnilong-{FAMILY}-no-stage2", "stage3")
    assert ablation.tags["omnilong.lineage"] == "base>stage1>stage3"
    main = mlflow_client.get_model_version_by_alias(f"omnilong-{FAMILY}", "stage3")
    assert main.tags["omnilong.lineage"] == "base>stage1>stage2>stage3"
    stage1 = json.loads((tiny_ablation / "runs/stage1/registration.json").read_text())
    # stage 1 is shared: the ablation reused the version the full pipeline registered.
    assert len(mlflow_client.search_model_versions(f"name='omnilong-{FAMILY}'")) == 3
    assert stage1["version"] == mlflow_client.get_model_version_by_alias(f"omnilong-{FAMILY}", "stage1").version


def test_ablation_report_sets_both_recipes_side_by_side(tiny_ablation):
    table = (tiny_ablation / "runs/ablation/ablation.md").read_text()
    assert "full recipe (stages 1, 2, 3)" in table and "without stage 2 (stages 1, 3)" in table
    assert (tiny_ablation / "runs/ablation/ablation.png").read_bytes().startswith(b"\x89PNG")
    scores = json.loads((tiny_ablation / "runs/ablation/ablation.json").read_text())
    assert scores["full recipe (stages 1, 2, 3)"]["niah.accuracy"] == json.loads(
        (tiny_ablation / "runs/eval-full/metrics.json").read_text())["stage3"]["niah.accuracy"]


def test_dvc_is_clean_and_a_second_repro_does_nothing(tiny_ablation):
    status = _dvc(tiny_ablation, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == {}

    again = _dvc(tiny_ablation, "repro")
    assert again.returncode == 0, again.stderr
    assert "Running stage" not in again.stdout
    assert "up to date" in again.stdout


def test_registry_is_in_postgresql_and_artifacts_in_the_bucket(tiny_ablation, team_stack, mlflow_client):
    for stage in STAGES:
        record = json.loads((tiny_ablation / f"runs/{stage}/registration.json").read_text())
        version = mlflow_client.get_model_version_by_alias(f"omnilong-{FAMILY}", stage)
        assert str(version.version) == str(record["version"])
    experiment = mlflow_client.get_experiment_by_name("omnilong")
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")  # the server stores them
    parents = mlflow_client.search_runs([experiment.experiment_id], "attributes.run_name LIKE 'pipeline-%'")
    assert sorted((run.info.run_name, run.info.status) for run in parents) == [
        ("pipeline-full", "FINISHED"), ("pipeline-no-stage2", "FINISHED")]
    # No local store was made: the registry is the server's, in PostgreSQL.
    assert not (tiny_ablation / "mlflow" / "mlflow.db").exists()
    from contextlib import closing

    import psycopg2

    with closing(psycopg2.connect(team_stack.database_uri("mlflow"))) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT name FROM registered_models ORDER BY name")
        assert [row[0] for row in cursor.fetchall()] == [f"omnilong-{FAMILY}", f"omnilong-{FAMILY}-no-stage2"]
    keys = [item["Key"] for page in team_stack.s3().get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix="mlflow/") for item in page.get("Contents", [])]
    stage3 = mlflow_client.get_model_version_by_alias(f"omnilong-{FAMILY}", "stage3")
    assert any(stage3.run_id in key and key.endswith("model.safetensors") for key in keys), keys[:20]
    assert any(key.endswith("niah.png") for key in keys), keys[:20]


def test_outputs_round_trip_through_the_bucket(tiny_ablation, team_stack, tmp_path):
    pushed = _dvc(tiny_ablation, "push")
    assert pushed.returncode == 0, pushed.stderr
    assert team_stack.s3().list_objects_v2(Bucket=BUCKET, Prefix="dvc/")["KeyCount"] > 0
    # What a user commits after a run: DVC has staged dvc.lock and its .gitignore entries.
    subprocess.run(["git", "commit", "-q", "-m", "pipeline run"], cwd=tiny_ablation,
                   env=project_env(tiny_ablation), check=True)
    # A second checkout of that commit gets the outputs from the bucket, not by re-running.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(tiny_ablation), str(clone)], check=True)
    pulled = _dvc(clone, "pull")
    assert pulled.returncode == 0, pulled.stderr
    for path in ["data/packed/stage1/index.json", "runs/stage3/model/model.safetensors",
                 "runs/ablation/ablation.json"]:
        assert hashlib.sha256((clone / path).read_bytes()).hexdigest() == \
            hashlib.sha256((tiny_ablation / path).read_bytes()).hexdigest(), path
    status = _dvc(clone, "status", "--json")
    assert json.loads(status.stdout) == {}


def test_deployment_with_overrides_runs_on_a_prefect_server(tiny_ablation, mlflow_client):
    """Last in this module: the experiment moves the @stage3 alias the tests above look at."""
    import os
    import signal
    import time

    port = free_port()
    env = {**project_env(tiny_ablation), "OMNILONG_PREFECT_PORT": str(port),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    params_before = (tiny_ablation / "params.yaml").read_bytes()
    log = tiny_ablation / "serve.log"
    with open(log, "w") as log_file:
        serve = subprocess.Popen([sys.executable, "-m", "flows.serve"], cwd=tiny_ablation, env=env,
                                 stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "prefect deployment run" not in log.read_text() and time.monotonic() < deadline:
            assert serve.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        overrides = {"stages.stage3.train.max_steps": 2}
        run = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "omnilong/full",
             "--params", json.dumps({"overrides": overrides}), "--watch", "--watch-timeout", "900"],
            cwd=tiny_ablation, env=env, capture_output=True, text=True, timeout=1000,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Completed" in run.stdout
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)
    # Stopping the serve process stopped its Prefect server too.
    with pytest.raises(OSError):
        import urllib.request

        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)

    # The override is recorded the DVC way (an experiment), never in the committed params.yaml.
    assert (tiny_ablation / "params.yaml").read_bytes() == params_before
    experiments = _dvc(tiny_ablation, "exp", "show", "--json")
    assert experiments.returncode == 0, experiments.stderr
    assert '"max_steps": 2' in experiments.stdout
    # The experiment's stage 3 trained 2 steps and registered under the main name.
    version = mlflow_client.get_model_version_by_alias(f"omnilong-{FAMILY}", "stage3")
    assert len(mlflow_client.get_metric_history(version.run_id, "train/loss")) == 2

    # Its evaluation gated the new stage 3 against the champion under the same settings.
    from omnilong.tracking.promotion import gate_tag

    before = json.loads((tiny_ablation / "runs/eval-full/promotion.json").read_text())
    tag = gate_tag(before["metric"], before["settings_digest"])
    old = mlflow_client.get_model_version(f"omnilong-{FAMILY}", before["version"])
    new_score, old_score = float(version.tags[tag]), float(old.tags[tag])
    champion = mlflow_client.get_model_version_by_alias(f"omnilong-{FAMILY}", "champion")
    assert str(champion.version) == (str(version.version) if new_score >= old_score else before["version"])
