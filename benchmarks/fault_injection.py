"""Kill-and-resume cycles of the tiny stage: no committed step is lost, the weights end bit-identical.

    python -m benchmarks.fault_injection [--quick] [--cycles N] [--seed S] [--work DIR] [--out FILE]

A tiny Qwen2.5-VL is trained on stage 1 of a small synthetic corpus (`omnilong train`: torchrun,
2 gloo ranks, DeepSpeed ZeRO-3, sequence-parallel over both, LoRA with dropout so that every
rank's RNG matters) twice, in the same project:

- once uninterrupted: the reference weights and per-step losses;
- once through N faults at steps and ranks drawn from `--seed`, each the next run's: a rank
  SIGKILLed mid-step (omnilong/train/faults.py `OMNILONG_TEST_KILL`), or, at a checkpoint step,
  the whole job SIGKILLed after every rank wrote the checkpoint and before it was published
  (`OMNILONG_TEST_KILL_BEFORE_PUBLISH`). Each rerun resumes from the newest complete checkpoint;
  the last one runs to the end.

A cycle survived when the run after it resumed where it had to (the step after the newest
complete checkpoint) and the stage ended. `steps_lost`: steps of the uninterrupted run missing from
the resumed stage's MLflow history; `steps_recomputed`: finished steps done again because they came
after the last complete checkpoint (the steps the stage logged over all its runs, less its
steps; a step a kill interrupted is not counted); `weights_identical`: torch.equal over
every exported tensor; `losses_identical`: each step's last logged loss equals the uninterrupted
run's. The last line printed is one JSON object: {"benchmark": "fault_injection", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from benchmarks.measure import emit_summary
from omnilong.train.faults import KILL_BEFORE_PUBLISH_ENV, KILL_ENV

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


def project_params(max_steps: int, checkpoint_every: int) -> dict:
    return {
        "model": {"family": "qwen2_5_vl", "path": "models/tiny"},
        "data": {"synth": {
            "text": {"num_documents": 6, "min_chars": 500, "max_chars": 3000},
            "instruct": {"num_samples": 4, "context_chars": 800},
            "video": {"num_videos": 3, "num_frames": 12, "height": 48, "width": 64, "fps": 4,
                      "long": {"num_videos": 0}},
        }},
        "stages": {
            "stage1": {"seq_len": 1024, "sp_size": 2, "train": {
                "max_steps": max_steps, "checkpoint_every": checkpoint_every, "warmup_steps": 1,
                "finetune": "lora", "lr": 1e-2, "lora": {"dropout": 0.1},
            }},
            # Not trained here; sizes as the tests' tiny project has them.
            "stage2": {"seq_len": 1024, "sp_size": 2},
            "stage3": {"seq_len": 576, "sp_size": 1, "video_frames": {"num_frames": 8}},
        },
        "eval": {"heldout_documents": 1},
    }


def make_project(project: Path, raw: dict) -> None:
    """The corpus, the tiny model and stage 1's packed rows, as `make run` would make them."""
    from omnilong.config import parse_params
    from omnilong.data.pack import pack_stage
    from omnilong.data.prepare import prepare_corpora
    from omnilong.data.synth import synthesize_default_corpus
    from omnilong.models.tiny import build_tiny_model

    params = parse_params(raw)
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    synthesize_default_corpus(params.data.synth, project / params.data.raw_dir / "default")
    build_tiny_model(params.model.family, params.model.tiny, params.model.video,
                     project / params.data.raw_dir / "default", project / params.model.path)
    prepare_corpora(params, project)
    pack_stage(params, "stage1", project, rows_per_shard=2)


def train(project: Path, name: str, fault: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(fault or {}), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "omnilong.cli", "train", "--stage", "stage1", "--out", f"runs/{name}",
         "--checkpoints", f"checkpoints/{name}"],
        cwd=project, env=env, capture_output=True, text=True, timeout=900,
    )


def must_succeed(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        raise SystemExit(f"{what} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


@dataclass(frozen=True)
class Fault:
    step: int
    """The step (from 0) the fault strikes in; for `publish`, the checkpoint's next step."""
    kind: str
    """`rank`: one rank SIGKILLed mid-step; `publish`: the job SIGKILLed before publishing a checkpoint."""
    rank: int

    def env(self) -> dict[str, str]:
        if self.kind == "rank":
            return {KILL_ENV: f"{self.rank}:{self.step}"}
        return {KILL_BEFORE_PUBLISH_ENV: str(self.step)}

    def resume_step(self, checkpoint_every: int) -> int:
        """Where the run after this fault must resume: the newest checkpoint published before it."""
        if self.kind == "rank":
            return self.step // checkpoint_every * checkpoint_every
        return self.step - checkpoint_every


def draw_faults(rng: random.Random, cycles: int, max_steps: int, checkpoint_every: int) -> list[Fault]:
    """`cycles` faults at increasing steps, each after the previous one's resume point, none
    before the first checkpoint is written (there would be nothing to resume)."""
    steps = sorted(rng.sample(range(checkpoint_every, max_steps), cycles))
    faults = []
    for step in steps:
        if (step % checkpoint_every == 0 and step - checkpoint_every >= checkpoint_every
                and rng.random() < 0.5):
            faults.append(Fault(step, "publish", 0))
        else:
            faults.append(Fault(step, "rank", rng.randrange(WORLD)))
    return faults


def logged_losses(project: Path, name: str) -> dict[int, float]:
    """Each step's last logged loss in the stage's MLflow run."""
    import mlflow

    run_id = json.loads((project / f"runs/{name}/registration.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


def run(args: argparse.Namespace) -> dict:
    max_steps, every = (6, 2) if args.quick else (16, 2)
    cycles = args.cycles or (2 if args.quick else 5)
    if cycles > max_steps - every:
        raise SystemExit(f"--cycles: at most {max_steps - every} faults fit in {max_steps} steps, given {cycles}")
    started = time.perf_counter()
    project = Path(args.work or tempfile.mkdtemp(prefix="omnilong-faults-"))
    project.mkdir(parents=True, exist_ok=True)
    make_project(project, project_params(max_steps, every))

    clock = time.perf_counter()
    must_succeed(train(project, "uninterrupted"), "the uninterrupted run")
    uninterrupted_s = time.perf_counter() - clock
    print(f"[fault_injection] uninterrupted run: {uninterrupted_s:.0f} s", file=sys.stderr, flush=True)

    faults = draw_faults(random.Random(args.seed), cycles, max_steps, every)
    survived, logged_steps, cycles_seen = 0, 0, []
    expected_start = 0
    for fault in [*faults, None]:  # each fault's run, then the run to the end
        clock = time.perf_counter()
        result = train(project, "faulty", fault.env() if fault else None)
        resumed = re.search(r"resuming at step (\d+)", result.stdout)
        start = int(resumed.group(1)) if resumed else 0
        logged_steps += len(re.findall(rf"\] step \d+/{max_steps} ", result.stdout))
        print(f"[fault_injection] {fault or 'run to the end'}: exit {result.returncode}, resumed at step {start}, "
              f"{time.perf_counter() - clock:.0f} s", file=sys.stderr, flush=True)
        if cycles_seen:
            # The previous fault survived if this run took over from its newest complete checkpoint.
            cycles_seen[-1]["resumed_at"] = start
            survived += start == expected_start
        if fault is None:
            must_succeed(result, "the run after the last fault")
            break
        if result.returncode == 0:
            raise SystemExit(f"{fault} did not stop the run:\n{result.stdout[-3000:]}")
        expected_start = fault.resume_step(every)
        cycles_seen.append({"kind": fault.kind, "step": fault.step, "rank": fault.rank if fault.kind == "rank" else None,
                            "expected_resume": expected_start, "run_s": round(time.perf_counter() - clock, 1)})

    reference = load_file(project / "runs/uninterrupted/model/model.safetensors")
    resumed_weights = load_file(project / "runs/faulty/model/model.safetensors")
    identical = reference.keys() == resumed_weights.keys() and all(
        torch.equal(resumed_weights[key], value) for key, value in reference.items())
    reference_losses, resumed_losses = logged_losses(project, "uninterrupted"), logged_losses(project, "faulty")
    return {
        "benchmark": "fault_injection",
        "cycles": len(faults),
        "survived": survived,
        "steps_lost": len(set(reference_losses) - set(resumed_losses)),
        "steps_recomputed": logged_steps - max_steps,
        "weights_identical": identical,
        "losses_identical": resumed_losses == reference_losses,
        "max_steps": max_steps, "checkpoint_every": every, "world_size": WORLD, "seed": args.seed,
        "faults": cycles_seen,
        "uninterrupted_run_s": round(uninterrupted_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "quick": args.quick,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 steps and 2 faults.")
    parser.add_argument("--cycles", type=int, default=None, help="Faults (default: 2 with --quick, else 5).")
    parser.add_argument("--seed", type=int, default=0, help="Draws the faults' steps, kinds and ranks.")
    parser.add_argument("--work", type=Path, default=None, help="Project directory (default: a new temporary one).")
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON line here.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    emit_summary(run(args), args.out)


if __name__ == "__main__":
    main()
