"""A training stage under torchrun on 2 gloo ranks: resume after a crash, not after a changed input; LoRA."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import project_env

pytestmark = pytest.mark.slow


def _train(root: Path, params: dict, name: str, out: str, ckpt: str) -> subprocess.CompletedProcess:
    params_file = root / f"{name}.yaml"
    params_file.write_text(yaml.safe_dump(params))
    return subprocess.run(
        [sys.executable, "-m", "omnilong.cli", "train", "--stage", "stage1", "--params", str(params_file),
         "--out", out, "--checkpoints", ckpt],
        cwd=root, env=project_env(root), capture_output=True, text=True, timeout=900,
    )


@pytest.fixture(scope="module")
def stage1_setup(tiny_prepared):
    params, root = tiny_prepared("qwen2_5_vl")
    raw = params.model_dump(mode="json")
    raw["stages"]["stage1"]["train"].update(max_steps=4, checkpoint_every=2, warmup_steps=1)
    return raw, root


def _client(root: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    return mlflow.MlflowClient()


@pytest.fixture(scope="module")
def full_run(stage1_setup) -> Path:
    """The checkpoints of the stage run to its end (steps 2 and 4)."""
    raw, root = stage1_setup
    full = _train(root, raw, "resume", "runs/resume-full", "checkpoints/resume-full")
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    return root / "checkpoints/resume-full"


def test_a_crashed_stage_resumes_from_its_last_checkpoint(stage1_setup, full_run):
    raw, root = stage1_setup

    # The same run, crashed after step 2's checkpoint: its step-4 checkpoint never written.
    shutil.copytree(root / "checkpoints/resume-full", root / "checkpoints/resume-crash")
    shutil.rmtree(root / "checkpoints/resume-crash/step0000004")
    (root / "checkpoints/resume-crash/latest").write_text("step0000002")
    resumed = _train(root, raw, "resume", "runs/resume-crash", "checkpoints/resume-crash")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming at step 2" in resumed.stdout
    assert "step 1/4" not in resumed.stdout and "step 3/4" in resumed.stdout

    uninterrupted = load_file(root / "runs/resume-full/model/model.safetensors")
    after_resume = load_file(root / "runs/resume-crash/model/model.safetensors")
    for key, value in uninterrupted.items():
        torch.testing.assert_close(after_resume[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # The resumed stage kept logging to the run it started. Steps after the last checkpoint
    # (here 2 and 3, logged before the "crash") are logged again by the resumed run.
    run_id = json.loads((root / "runs/resume-crash/registration.json").read_text())["run_id"]
    history = _client(root).get_metric_history(run_id, "train/loss")
    assert sorted({m.step for m in history}) == [0, 1, 2, 3]
    assert sorted(m.step for m in history) == [0, 1, 2, 2, 3, 3]


def test_a_changed_seed_sets_the_checkpoints_aside_and_trains_afresh(stage1_setup, full_run):
    """The seed sets the row order: a checkpoint of another seed must not be resumed."""
    raw, root = stage1_setup
    raw = {**raw, "seed": raw["seed"] + 1}
    shutil.copytree(full_run, root / "checkpoints/reseed")
    result = _train(root, raw, "reseed", "runs/reseed", "checkpoints/reseed")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "checkpoints/reseed: not resumed, set aside as checkpoints/reseed.stale-1: seed changed: 1234 -> 1235" in (
        result.stdout)
    assert "resuming" not in result.stdout and "step 1/4" in result.stdout
    assert (root / "checkpoints/reseed.stale-1/step0000004").is_dir()


def test_lora_stage_registers_merged_weights_and_logs_the_adapter(stage1_setup):
    raw, root = stage1_setup
    raw = json.loads(json.dumps(raw))
    raw["stages"]["stage1"]["train"].update(finetune="lora", lr=1e-2)
    result = _train(root, raw, "lora", "runs/lora", "checkpoints/lora")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    base = load_file(root / raw["model"]["path"] / "model.safetensors")
    merged = load_file(root / "runs/lora/model/model.safetensors")
    assert merged.keys() == base.keys()  # plain weights, no LoRA modules left
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    assert changed and all("layers" in key and "visual" not in key for key in changed)
    assert any(key.endswith("q_proj.weight") for key in changed)
    assert (root / "runs/lora/adapter/adapter_config.json").is_file()

    record = json.loads((root / "runs/lora/registration.json").read_text())
    client = _client(root)
    artifacts = {item.path for item in client.list_artifacts(record["run_id"])}
    assert {"adapter", "model"} <= artifacts


@pytest.fixture(scope="module")
def tied_model_dir(stage1_setup):
    """The tiny model with its LM head tied to the input embeddings (as in Qwen2.5-VL-3B)."""
    from omnilong.models.loading import load_model

    raw, root = stage1_setup
    source = root / raw["model"]["path"]
    model = load_model(source, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.config.get_text_config().tie_word_embeddings = True
    model.tie_weights()
    target = root / "tied-model"
    model.save_pretrained(target)
    for item in source.iterdir():
        if not (target / item.name).exists():
            shutil.copy2(item, target / item.name)
    return target


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_chunked_and_reference_losses_train_the_same_weights(stage1_setup, tied_model_dir, tied):
    """3 optimizer steps under ZeRO-3 on 2 ranks: the chunked loss leaves the weights the
    reference loss (full logits) leaves, tied head or not."""
    raw, root = stage1_setup
    raw = json.loads(json.dumps(raw))
    raw["stages"]["stage1"]["train"].update(max_steps=3, checkpoint_every=3)
    if tied:
        raw["model"]["path"] = str(tied_model_dir.relative_to(root))
    weights = {}
    for impl in ("chunked", "reference"):
        raw["stages"]["stage1"]["loss"] = {"impl": impl, "chunk_tokens": 64}
        name = f"loss-{impl}-{'tied' if tied else 'untied'}"
        result = _train(root, raw, name, f"runs/{name}", f"checkpoints/{name}")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        weights[impl] = load_file(root / f"runs/{name}/model/model.safetensors")
    initial = load_file(root / raw["model"]["path"] / "model.safetensors")
    assert weights["chunked"].keys() == weights["reference"].keys()
    for key, value in weights["reference"].items():
        torch.testing.assert_close(weights["chunked"][key], value, rtol=1e-4, atol=2e-5, msg=key)
    head = "lm_head.weight" if "lm_head.weight" in initial else "model.embed_tokens.weight"
    assert not torch.equal(weights["chunked"][head], initial[head])  # the head did train
    if tied:
        assert "lm_head.weight" not in weights["chunked"] or torch.equal(
            weights["chunked"]["lm_head.weight"], weights["chunked"]["model.embed_tokens.weight"])
