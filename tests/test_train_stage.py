"""A training stage under torchrun on 2 gloo ranks: bit-identical resume after real crashes, not after a changed input; LoRA."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, project_env

pytestmark = pytest.mark.slow


def _train_command(root: Path, params: dict, name: str, out: str, ckpt: str) -> list[str]:
    """`omnilong train` of stage 1 with `params` (written to `<name>.yaml` in `root`)."""
    params_file = root / f"{name}.yaml"
    params_file.write_text(yaml.safe_dump(params))
    return [sys.executable, "-m", "omnilong.cli", "train", "--stage", "stage1", "--params", str(params_file),
            "--out", out, "--checkpoints", ckpt]


def _train(root: Path, params: dict, name: str, out: str, ckpt: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_train_command(root, params, name, out, ckpt), cwd=root, env=env or project_env(root),
                          capture_output=True, text=True, timeout=900)


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


def _weights(root: Path, out: str) -> dict[str, torch.Tensor]:
    return load_file(root / out / "model" / "model.safetensors")


def _losses(root: Path, out: str) -> dict[int, float]:
    """The stage's logged loss of each step (the last value where a resumed run logged it again)."""
    run_id = json.loads((root / out / "registration.json").read_text())["run_id"]
    return {m.step: m.value for m in sorted(_client(root).get_metric_history(run_id, "train/loss"),
                                             key=lambda m: m.timestamp)}


def _assert_bit_identical(root: Path, out: str, reference: str) -> None:
    expected, actual = _weights(root, reference), _weights(root, out)
    assert actual.keys() == expected.keys()
    differ = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not differ, f"{out}: weights differ from {reference} in {differ[:5]}"
    assert _losses(root, out) == _losses(root, reference)


def _lora(raw: dict) -> dict:
    """The stage fine-tuning LoRA adapters with dropout: what it trains depends on every rank's RNG."""
    raw = json.loads(json.dumps(raw))
    raw["stages"]["stage1"]["train"].update(finetune="lora", lr=1e-2, lora={"dropout": 0.1})
    return raw


@pytest.fixture(scope="module")
def lora_run(stage1_setup) -> str:
    """The LoRA stage run to its end: its output folder."""
    raw, root = stage1_setup
    result = _train(root, _lora(raw), "lora", "runs/lora", "checkpoints/lora")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return "runs/lora"


def test_two_uninterrupted_runs_are_bitwise_equal(stage1_setup, lora_run):
    """The precondition of an exact resume: the same stage trained twice (same seed, 2 ranks,
    ZeRO-3 on CPU, LoRA with dropout) leaves the same weights bit for bit and logs the same losses."""
    raw, root = stage1_setup
    again = _train(root, _lora(raw), "lora", "runs/lora-again", "checkpoints/lora-again")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    _assert_bit_identical(root, "runs/lora-again", lora_run)


def test_a_changed_seed_sets_the_checkpoints_aside_and_trains_afresh(stage1_setup, lora_run):
    """The seed sets the row order: a checkpoint of another seed must not be resumed."""
    raw, root = stage1_setup
    raw = {**_lora(raw), "seed": raw["seed"] + 1}
    shutil.copytree(root / "checkpoints/lora", root / "checkpoints/reseed")
    result = _train(root, raw, "reseed", "runs/reseed", "checkpoints/reseed")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "checkpoints/reseed: not resumed, set aside as checkpoints/reseed.stale-1: seed changed: 1234 -> 1235" in (
        result.stdout)
    assert "resuming" not in result.stdout and "step 1/4" in result.stdout
    assert (root / "checkpoints/reseed.stale-1/step0000004").is_dir()


def test_lora_stage_registers_merged_weights_and_logs_the_adapter(stage1_setup, lora_run):
    raw, root = stage1_setup
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


# A flow holding the pipeline's stage task alone (its retries and failure handling), its command
# the stage under torchrun.
ONE_STAGE_FLOW = """
import sys
from pathlib import Path

from prefect import flow

from flows.pipeline import stage_task
from omnilong.config import load_params
from omnilong.tracking.runs import create_run


@flow
def one_stage(params_file: str, out: str, checkpoints: str) -> None:
    parent = create_run(load_params(Path(params_file), check_paths=False), "recovery", {})
    command = [sys.executable, "-m", "omnilong.cli", "train", "--stage", "stage1", "--params", params_file,
               "--out", out, "--checkpoints", checkpoints]
    stage_task.with_options(retry_delay_seconds=0)("train stage1", command, Path("."), parent)


one_stage(*sys.argv[1:])
"""


def test_the_flow_retries_a_killed_rank_and_a_killed_job_into_a_bit_identical_run(stage1_setup, lora_run, team_stack):
    """The LoRA stage (dropout: every rank's RNG matters) under the flow's stage task, which
    retries it twice:

    1. attempt 1: rank 1 SIGKILLed in step 4 of 4, after step 2's checkpoint;
    2. attempt 2 resumes at step 2; the whole job is SIGKILLed once every rank wrote step 4's
       checkpoint, before it was published;
    3. attempt 3 passes over that checkpoint, resumes at step 2 again and ends with the
       uninterrupted run's weights, bit for bit, and its losses.

    Each failed attempt's task marks the stage's one MLflow run FAILED, each retry reopens it, and
    the run holds each step once: steps 3 and 4 of the killed attempts were never committed."""
    from omnilong.train.checkpoint import MANIFEST
    from omnilong.train.faults import KILL_BEFORE_PUBLISH_ENV, KILL_ENV, MARKS_ENV

    raw, root = stage1_setup
    ckpt = root / "checkpoints/lora-kill"
    params_file = root / "lora-kill.yaml"
    params_file.write_text(yaml.safe_dump(_lora(raw)))
    # Each fault once: the first is met in attempt 1, the second (past the first's step) in attempt 2.
    env = {**project_env(root), KILL_ENV: "1:3", KILL_BEFORE_PUBLISH_ENV: "4", MARKS_ENV: str(root / "fault-marks")}
    # The team's Prefect server (the suite's, already up), not a temporary one started for the flow.
    env.update({key: value for key, value in team_stack.client_env().items() if key.startswith("PREFECT_API")})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # flows/
    result = subprocess.run(
        [sys.executable, "-c", ONE_STAGE_FLOW, params_file.name, "runs/lora-kill", str(ckpt)],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]

    assert output.count(f"[rank 1] {KILL_ENV}: killed in step 3: SIGKILL") == 1
    assert f"{KILL_BEFORE_PUBLISH_ENV}: checkpoint for step 4 written, not published" in output
    assert f"resuming from step0000002, passing over: {ckpt / 'step0000004'}: incomplete" in output
    # Steps 1 and 2 once; step 3 in every attempt; step 4 in the two that reached it.
    assert [output.count(f"step {n}/4") for n in range(1, 5)] == [1, 1, 3, 2], output[-5000:]
    _assert_bit_identical(root, "runs/lora-kill", lora_run)
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step0000002", "step0000004"]
    assert (ckpt / "step0000004" / MANIFEST).is_file()

    run_id = json.loads((root / "runs/lora-kill/registration.json").read_text())["run_id"]
    for attempt in (1, 2):
        assert f"MLflow run {run_id} marked FAILED (try {attempt})" in output
        assert (f"resuming at step 2; MLflow run {run_id} reopened: attempt {attempt + 1}; it was FAILED after "
                f"attempt {attempt} (attempt {attempt}: `omnilong.cli train --stage stage1") in output
    client = _client(root)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["omnilong.attempts"] == "3"
    siblings = client.search_runs([run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run.data.tags['mlflow.parentRunId']}'")
    assert [other.info.run_id for other in siblings] == [run_id]  # one run for the stage
    for metric in ("train/loss", "train/lr", "memory/peak_mb_rank1"):
        assert sorted(m.step for m in client.get_metric_history(run_id, metric)) == [0, 1, 2, 3], metric


def test_a_text_stage_runs_without_mlflow_or_video_decoders(stage1_setup, tmp_path):
    """As on a bare GPU machine: mlflow, decord and PyAV cannot be imported, tracking is off."""
    raw, root = stage1_setup
    raw = json.loads(json.dumps(raw))
    raw["stages"]["stage1"]["train"].update(max_steps=2, checkpoint_every=2)
    raw["tracking"] = {"enabled": False}
    blocked = tmp_path / "blocked"
    for name in ("mlflow", "decord", "av"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    env = project_env(root)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocked), env.get("PYTHONPATH")]))
    result = _train(root, raw, "untracked", "runs/untracked", "checkpoints/untracked", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tracking off" in result.stdout and "step 2/2" in result.stdout
    assert (root / "runs/untracked/model/model.safetensors").is_file()
    assert (root / "runs/untracked/loss_curve.png").stat().st_size > 0
    assert not (root / "runs/untracked/registration.json").exists()


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


def _three_step_run(impl: str, tied: bool, offload: bool, memory_saving: bool = False) -> str:
    """The name of the run `three_step_weights` trains for a setting (its runs/ and checkpoints/ folder)."""
    return (f"three-steps-{impl}-{'tied' if tied else 'untied'}{'-offload' if offload else ''}"
            f"{'-tiled-offloaded-activations' if memory_saving else ''}")


# Each rank holds 512 of a row's 1,024 tokens (sp_size 2): tiles of 200, 200 and 112 tokens.
MEMORY_SAVING = {"tiled_mlp": {"enabled": True, "tile_tokens": 200}, "offload_activations": True}


@pytest.fixture(scope="module")
def three_step_weights(stage1_setup, tied_model_dir):
    """`three_step_weights(impl=, tied=, offload=, memory_saving=)`: the weights after 3 optimizer
    steps of stage 1 under ZeRO-3 on 2 ranks (fp32 on CPU), each setting trained once per module,
    so tests that compare against the same setting share its run; `three_step_weights.stdout[name]`
    is the run's output. `memory_saving`: tiled MLPs and offloaded checkpoints (MEMORY_SAVING)."""
    raw, root = stage1_setup
    done: dict[tuple[str, bool, bool, bool], dict[str, torch.Tensor]] = {}

    def weights(
        *, impl: str = "chunked", tied: bool = False, offload: bool = False, memory_saving: bool = False
    ) -> dict[str, torch.Tensor]:
        key = (impl, tied, offload, memory_saving)
        if key not in done:
            params = json.loads(json.dumps(raw))
            params["stages"]["stage1"]["train"].update(
                max_steps=3, checkpoint_every=3, offload_optimizer=offload, offload_params=offload,
                **(MEMORY_SAVING if memory_saving else {}),
            )
            params["stages"]["stage1"]["loss"] = {"impl": impl, "chunk_tokens": 64}
            if tied:
                params["model"]["path"] = str(tied_model_dir.relative_to(root))
            name = _three_step_run(*key)
            result = _train(root, params, name, f"runs/{name}", f"checkpoints/{name}")
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            weights.stdout[name] = result.stdout
            done[key] = load_file(root / f"runs/{name}/model/model.safetensors")
        return done[key]

    weights.stdout = {}
    return weights


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_chunked_and_reference_losses_train_the_same_weights(stage1_setup, tied_model_dir, three_step_weights, tied):
    """3 optimizer steps under ZeRO-3 on 2 ranks: the chunked loss leaves the weights the
    reference loss (full logits) leaves, tied head or not."""
    raw, root = stage1_setup
    weights = {impl: three_step_weights(impl=impl, tied=tied) for impl in ("chunked", "reference")}
    initial = load_file((tied_model_dir if tied else root / raw["model"]["path"]) / "model.safetensors")
    assert weights["chunked"].keys() == weights["reference"].keys()
    for key, value in weights["reference"].items():
        torch.testing.assert_close(weights["chunked"][key], value, rtol=1e-4, atol=2e-5,
                                   msg=lambda message, key=key: f"{key}: {message}")
    head = "lm_head.weight" if "lm_head.weight" in initial else "model.embed_tokens.weight"
    assert not torch.equal(weights["chunked"][head], initial[head])  # the head did train
    if tied:
        assert "lm_head.weight" not in weights["chunked"] or torch.equal(
            weights["chunked"]["lm_head.weight"], weights["chunked"]["model.embed_tokens.weight"])


def test_cpu_offload_trains_the_same_weights(stage1_setup, three_step_weights):
    """ZeRO-3 with the optimizer states and the parameters offloaded to the CPU: after 3 steps,
    the weights of the run without offload (the chunked, untied run the test above trains).

    On this CPU-only machine both devices are the CPU: the test runs DeepSpeed's offload paths
    (fp32 partitions and gradients in CPU buffers, the torch AdamW step on them), not real
    transfers, and the optimizer is the runner's torch AdamW (no DeepSpeedCPUAdam to compile).
    fp32 throughout; the offload path rounds differently, so the weights agree to rounding, not
    bit for bit: atol 1e-6 is a thousandth of one step's update (AdamW moves a weight by about
    lr = 1e-3), rtol 1e-5. Measured: at most 2.3e-7 (the k_proj biases, whose small gradients
    AdamW's normalisation magnifies), 1 ulp elsewhere.
    """
    raw, root = stage1_setup
    initial = load_file(root / raw["model"]["path"] / "model.safetensors")
    without = three_step_weights()
    offloaded = three_step_weights(offload=True)
    states = torch.load(
        root / "checkpoints" / _three_step_run("chunked", False, True) / "step0000003"
        / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu", weights_only=False,
    )
    zero = states["ds_config"]["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert offloaded.keys() == without.keys()
    for key, value in without.items():
        torch.testing.assert_close(offloaded[key], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda message, key=key: f"{key}: {message}")
    trained = {key for key in initial if not torch.equal(offloaded[key], initial[key])}
    assert "lm_head.weight" in trained and any(".layers." in key for key in trained)


def test_two_nodes_of_one_rank_train_the_weights_of_one_node_of_two(stage1_setup, three_step_weights, tmp_path):
    """Two `omnilong train`, as on two nodes (nnodes 2, nproc_per_node 1): their torchrun agents
    meet at a c10d rendezvous on 127.0.0.1 and train the 3 steps of the plain run above (one
    agent, 2 ranks): its weights, bit for bit (the same ranks do the same work; only how they
    met differs). Hierarchical partitioning is on: DeepSpeed ran with it (the checkpoint's
    config holds it), over one rank per node, where it is inert."""
    from tests.conftest import free_port

    raw, root = stage1_setup
    plain = three_step_weights()
    params = json.loads(json.dumps(raw))
    params["stages"]["stage1"]["train"].update(max_steps=3, checkpoint_every=3)
    params["stages"]["stage1"]["loss"] = {"impl": "chunked", "chunk_tokens": 64}
    params["parallel"].update(nnodes=2, nproc_per_node=1, rdzv_endpoint=f"127.0.0.1:{free_port()}",
                              hierarchical_partition=True)
    command = _train_command(root, params, "two-nodes", "runs/two-nodes", "checkpoints/two-nodes")
    logs = [tmp_path / f"node{node}.log" for node in range(2)]
    nodes = []
    try:
        for log in logs:
            with log.open("w") as output:
                nodes.append(subprocess.Popen(command, cwd=root, env=project_env(root), stdout=output,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        exit_codes = [node.wait(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)  # the node's agent and rank with it
    outputs = [log.read_text() for log in logs]
    assert exit_codes == [0, 0], "\n".join(output[-3000:] for output in outputs)
    assert sum("step 3/3" in output for output in outputs) == 1  # one job: rank 0 logs its steps

    two_nodes = _weights(root, "runs/two-nodes")
    assert two_nodes.keys() == plain.keys()
    differ = [key for key in plain if not torch.equal(two_nodes[key], plain[key])]
    assert not differ, f"weights differ from one node's run in {differ[:5]}"
    states = torch.load(root / "checkpoints/two-nodes/step0000003/zero_pp_rank_0_mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    assert states["ds_config"]["zero_optimization"]["zero_hpz_partition_size"] == 1


def test_tiled_mlps_and_offloaded_checkpoints_train_the_same_weights(stage1_setup, three_step_weights):
    """Tiled MLPs (DeepSpeed's TiledMLP under ZeRO-3, with ring attention at sp_size 2) and
    activation checkpoints offloaded to host memory: after 3 steps, the weights of the plain run.

    Tiles sum the weight gradients tile by tile (a different order from one matmul): the weights
    agree to rounding, not bit for bit: rtol 1e-5, atol 2e-5, a fiftieth of one step's update
    (AdamW moves a weight by about lr = 1e-3). Measured: at most 1.2e-6 (the embeddings, whose
    rare tokens' small gradients AdamW's normalisation magnifies), 3.3e-7 elsewhere, on an earlier
    install; on transformers 5.25, one element of 8,192 in a gate_proj off by 5.3e-6. A weight
    whose gradient ZeRO-3 reduced before the last tile, or never, would be off by a whole update.
    """
    raw, root = stage1_setup
    initial = load_file(root / raw["model"]["path"] / "model.safetensors")
    plain = three_step_weights()
    saved = three_step_weights(memory_saving=True)
    stdout = three_step_weights.stdout[_three_step_run("chunked", False, False, memory_saving=True)]
    assert "offloaded to host memory" in stdout and "MLPs of 2 layers and 5 RMSNorms tiled (200 tokens a tile)" in stdout
    assert saved.keys() == plain.keys()
    for key, value in plain.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=2e-5,
                                   msg=lambda message, key=key: f"{key}: {message}")
    trained = {key for key in initial if not torch.equal(saved[key], initial[key])}
    assert any(".mlp.gate_proj." in key for key in trained)


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor in a nested checkpoint structure, in a fixed order."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [tensor for key in sorted(value, key=str) for tensor in _tensors(value[key])]
    if isinstance(value, list | tuple):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def test_nonfinite_steps_skip_their_update_on_every_rank_and_too_many_in_a_row_stop_the_stage(stage1_setup):
    """Through the runner's test-only injection point, rank 1's loss is NaN at step 2 and rank 0's
    at step 3, with train.max_nonfinite_steps 2. At step 2 neither rank updates anything (its fp32
    weights and AdamW states after step 2 are those after step 1), the LR schedule still advances,
    the step is logged as skipped and counted, and training goes on; step 3 makes two in a row: the
    stage stops there, naming the step and the count, and exports nothing."""
    from omnilong.train.checkpoint import MANIFEST
    from omnilong.train.faults import NONFINITE_LOSS_ENV

    raw, root = stage1_setup
    raw = json.loads(json.dumps(raw))
    raw["stages"]["stage1"]["train"].update(checkpoint_every=1, keep_checkpoints=4, max_nonfinite_steps=2)
    env = {**project_env(root), NONFINITE_LOSS_ENV: "2@1,3@0"}
    result = _train(root, raw, "nonfinite", "runs/nonfinite", "checkpoints/nonfinite", env=env)
    assert result.returncode != 0
    assert "update skipped" not in result.stdout.split("step 2/4")[0]
    assert "non-finite loss or gradient: update skipped on every rank (1 so far)" in result.stdout
    assert ("step 3/4: 2 optimizer steps in a row had a non-finite loss or gradient norm "
            "(train.max_nonfinite_steps: 2); stopping the stage") in result.stderr
    assert "step 4/4" not in result.stdout
    assert not (root / "runs/nonfinite/model").exists()

    ckpt = root / "checkpoints/nonfinite"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step0000001", "step0000002"]
    for rank in range(2):
        optimizer = [
            torch.load(ckpt / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                       weights_only=False)["optimizer_state_dict"]
            for tag in ("step0000001", "step0000002")
        ]
        before, after = _tensors(optimizer[0]), _tensors(optimizer[1])
        assert len(before) == len(after) > 0
        for old, new in zip(before, after):
            assert torch.equal(old, new), f"rank {rank}: the optimizer updated a state at the skipped step"
    schedulers = [
        torch.load(ckpt / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu",
                   weights_only=False)["lr_scheduler"]["last_epoch"]
        for tag in ("step0000001", "step0000002")
    ]
    assert schedulers == [1, 2]

    # Flushed when step 2's checkpoint committed; step 3 was never committed.
    run_id = json.loads((ckpt / "step0000002" / MANIFEST).read_text())["mlflow_run_id"]
    client = _client(root)
    counted = {m.step: m.value for m in client.get_metric_history(run_id, "train/nonfinite_steps")}
    assert counted == {0: 0, 1: 1}
    norms = {m.step: m.value for m in client.get_metric_history(run_id, "train/grad_norm")}
    assert norms[0] > 0 and norms[1] != norms[1]  # NaN at the skipped step
