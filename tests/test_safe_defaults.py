"""Safe by default: no code a model directory ships is run, pickled weights are not loaded, no
secret of a URI is logged to MLflow or printed, the servers we start listen on loopback only."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import yaml

from omnilong.tracking.secrets import redact, redact_uri
from tests.test_checkpoint import one_rank  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


class _Touch:
    """Unpickling this creates `marker`: what a malicious pickle could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickled_weights_are_never_unpickled(tiny_model_dir, tmp_path):
    from omnilong.models.loading import load_model

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("qwen2_5_vl"), model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Touch(marker)))
    with pytest.raises(OSError, match="model.safetensors"):
        load_model(model)
    assert not marker.exists()


def test_code_shipped_with_a_model_is_never_run(tmp_path):
    from omnilong.models.loading import load_model

    model = tmp_path / "model"
    model.mkdir()
    marker = tmp_path / "ran"
    (model / "configuration_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import PretrainedConfig\nclass CustomConfig(PretrainedConfig):\n    model_type = 'custom'\n"
    )
    (model / "config.json").write_text(json.dumps(
        {"model_type": "custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(model)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://omnilong:s3cret@mlflow.example.com/", "https://omnilong:***@mlflow.example.com/"),
        ("https://s3cret-token@mlflow.example.com", "https://***@mlflow.example.com"),
        ("postgresql://mlflow:s3cret@db:5432/mlflow?sslmode=require",
         "postgresql://mlflow:***@db:5432/mlflow?sslmode=require"),
        ("https://mlflow.example.com/?token=s3cret&x=1", "https://mlflow.example.com/?token=***&x=1"),
        ("https://bucket.s3.amazonaws.com/a.json?X-Amz-Signature=s3cret", "https://bucket.s3.amazonaws.com/a.json"
         "?X-Amz-Signature=***"),
        ("sqlite:////work/mlflow/mlflow.db", "sqlite:////work/mlflow/mlflow.db"),
    ],
)
def test_uris_lose_their_secrets(uri, shown):
    assert redact_uri(uri) == shown


def test_parameter_trees_lose_their_secrets():
    tree = {"tracking": {"uri": "https://u:s3cret@host"}, "x": [{"password": "s3cret", "num_key_value_heads": 2}]}
    assert redact(tree) == {"tracking": {"uri": "https://u:***@host"},
                            "x": [{"password": "***", "num_key_value_heads": 2}]}


def test_a_stage_run_logs_no_secret_to_mlflow(tmp_path, monkeypatch, one_rank):  # noqa: F811
    """The params and the params.yaml artifact of a stage's MLflow run, logged as a training stage
    logs them (StepLogger), with a secret in a URI: the store is the local one, so the secret sits
    in another URI parameter (VideoMME's annotations), which is redacted the same way."""
    import mlflow
    from mlflow import MlflowClient

    from omnilong.config import load_params
    from omnilong.train.runner import StageRun
    from omnilong.train.step_log import StepLogger

    monkeypatch.chdir(tmp_path)
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["eval"]["videomme"] = {"annotations": "https://reader:s3cret@data.example.com/videomme.json"}
    doc["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "secrets"}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(doc))
    params = load_params(params_file)
    run = StageRun("stage1", Path("models/tiny"), tmp_path / "runs" / "stage1", tmp_path / "checkpoints" / "stage1")
    logger = StepLogger(params, run, ds_config={}, params_file=params_file, resumed_run_id=None)
    before = mlflow.get_tracking_uri()
    logger.start(0)  # points MLflow's global client at params' store
    client = MlflowClient()
    mlflow.set_tracking_uri(before)

    logged = client.get_run(logger.run_id).data.params
    assert logged["eval.videomme.annotations"] == "https://reader:***@data.example.com/videomme.json"
    artifact = Path(client.download_artifacts(logger.run_id, "params.yaml", str(tmp_path / "download")))
    assert yaml.safe_load(artifact.read_text())["eval"]["videomme"]["annotations"] == (
        "https://reader:***@data.example.com/videomme.json")
    everything = json.dumps(logged) + artifact.read_text()
    assert "s3cret" not in everything


def test_the_servers_we_start_listen_on_loopback():
    from flows import serve

    assert serve.HOST == "127.0.0.1"
    ui = re.search(r"^\t.*mlflow ui .*$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert ui and "--host 127.0.0.1" in ui.group(0)
