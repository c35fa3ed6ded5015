"""End to end: the flow of `make run` on a clean copy of the project, then DVC's view of it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import project_env

pytestmark = pytest.mark.slow


def _dvc(project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, env=project_env(project), capture_output=True, text=True
    )


def test_pipeline_produces_every_stage_output(tiny_pipeline):
    assert (tiny_pipeline / "models/tiny/config.json").is_file()
    assert list((tiny_pipeline / "data/raw/default/text").glob("*.jsonl"))
    assert (tiny_pipeline / "data/raw/default/video/qa.jsonl").is_file()
    for stage in ("stage1", "stage2", "stage3"):
        index = json.loads((tiny_pipeline / f"data/packed/{stage}/index.json").read_text())
        assert index["num_rows"] > 0


def test_dvc_is_clean_and_a_second_repro_does_nothing(tiny_pipeline):
    status = _dvc(tiny_pipeline, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == {}

    again = _dvc(tiny_pipeline, "repro")
    assert again.returncode == 0, again.stderr
    assert "Running stage" not in again.stdout
    assert "up to date" in again.stdout


def test_outputs_round_trip_through_the_local_remote(tiny_pipeline, tmp_path):
    pushed = _dvc(tiny_pipeline, "push")
    assert pushed.returncode == 0, pushed.stderr
    # A second checkout of the same commit gets the outputs from the remote, not by re-running.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(tiny_pipeline), str(clone)], check=True)
    shutil.copy2(tiny_pipeline / "dvc.lock", clone / "dvc.lock")
    remote = (tiny_pipeline / ".dvc-remote").resolve()
    assert _dvc(clone, "remote", "modify", "--local", "local", "url", str(remote)).returncode == 0
    pulled = _dvc(clone, "pull")
    assert pulled.returncode == 0, pulled.stderr
    for stage in ("stage1", "stage2", "stage3"):
        assert (clone / f"data/packed/{stage}/index.json").read_bytes() == (
            tiny_pipeline / f"data/packed/{stage}/index.json"
        ).read_bytes()
    status = _dvc(clone, "status", "--json")
    assert json.loads(status.stdout) == {}


def test_tiny_model_loads_with_from_pretrained(tiny_pipeline):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_pipeline / "models/tiny")
    assert config.model_type == "qwen2_5_vl"
    tokenizer = AutoTokenizer.from_pretrained(tiny_pipeline / "models/tiny")
    assert tokenizer.chat_template
