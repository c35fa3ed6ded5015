"""Step logs of a training stage: a console line per step on rank 0, metrics in MLflow.

Each line shows loss, learning rate, tokens/s and the peak memory of every rank. Rank 0 owns the
stage's MLflow run: one run per stage, however many attempts it takes (omnilong/tracking/attempts.py).
Step metrics reach MLflow only once a checkpoint holds their steps: rank 0 buffers them and the
runner flushes them when a checkpoint commits, so the steps a crash loses (those after the last
checkpoint) were never logged, and their redo logs each once. The checkpoint also carries the
buffer it commits (`pending`), for a crash between the commit and the flush; and a step already in
the run is never logged again (a resume from an older checkpoint than the newest flushed one).
With `tracking.enabled: false` nothing goes to MLflow and the loss curve holds this process's steps.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from omnilong import atomic
from omnilong.config import Params, StageParams
from omnilong.tracking import attempts
from omnilong.tracking.runs import create_run, log_metrics
from omnilong.tracking.secrets import log_redacted_yaml, redact
from omnilong.tracking.store import use_experiment

TRACKED_PACKAGES = ("torch", "transformers", "deepspeed", "peft", "mlflow", "dvc", "prefect", "omnilong")


def peak_memory_mb() -> float:
    """Peak memory of this rank: allocated on the GPU, resident set size on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # ru_maxrss is in KiB


def flatten(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: json.dumps(value) if isinstance(value, list | tuple) else str(value)}


def git_commit(root: Path = Path(".")) -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def packed_data_version(packed_dir: Path) -> str:
    """The DVC hash of the packed shards, as recorded in dvc.lock (`untracked` when run outside DVC)."""
    import yaml

    lock = Path("dvc.lock")
    if not lock.is_file():
        return "untracked"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if Path(out["path"]) == packed_dir:
                return out.get("md5", "untracked")
    return "untracked"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[f"version.{name}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[f"version.{name}"] = "absent"
    return versions


def log_packed_mixture(client, run_id: str, packed_dir: Path, stage_params: StageParams) -> None:
    """The mixture the stage's packed data was drawn with, if any: metrics `mixture/<corpus>/...`
    (target weight, achieved share, tokens, repeated tokens, tokens per length bucket) and the
    whole record as `packed_mixture.json`."""
    from omnilong.data.mixture import mixture_metrics
    from omnilong.data.packed_summary import stage_mixture

    if stage_params.mixture is None:
        return
    mixture = stage_mixture(packed_dir, stage_params)
    log_metrics(client, run_id, mixture_metrics(mixture))
    client.log_dict(run_id, mixture.model_dump(mode="json"), "packed_mixture.json")


class StepLogger:
    def __init__(
        self, params: Params, run, *, ds_config: dict, params_file: Path, resumed_run_id: str | None,
        committed: list | None = None,
    ):
        """`resumed_run_id`, `committed`: the run and the `pending` steps the resumed checkpoint holds."""
        self.params = params
        self.run = run
        self.ds_config = ds_config
        self.params_file = params_file
        self.is_main = dist.get_rank() == 0
        self.tracked = params.tracking.enabled
        self.run_id: str | None = resumed_run_id
        self.pending: list = list(committed or [])
        """Rank 0's steps not yet in MLflow: [step, time in ms, {metric: value}] each."""
        self._logged_through = -1  # the run's last step in MLflow
        self._curve: dict[str, dict[int, float]] = {"train/loss": {}, "train/seq_len": {}}  # tracking off

    def start(self, start_step: int) -> None:
        if self.is_main and not self.tracked:
            print(f"[{self.run.stage}] {'resuming at step ' + str(start_step) if start_step else 'starting'}; "
                  "tracking off", flush=True)
        elif self.is_main:
            experiment_id = use_experiment(self.params.tracking, Path("."))  # also for a resumed run's calls
            stage_name = self.run.stage + (f"-{self.run.variant}" if self.run.variant else "")
            task_run = os.environ.get(attempts.TASK_RUN_ENV)
            if self.run_id is None and task_run:
                # An earlier attempt of this task that crashed before its first checkpoint.
                self.run_id = attempts.run_of_task(experiment_id, task_run)
            if self.run_id is None:
                tags = {"omnilong.stage": self.run.stage, "omnilong.init": str(self.run.init_dir),
                        **attempts.first_attempt_tags(task_run)}
                if self.run.variant:
                    tags["omnilong.variant"] = self.run.variant
                self.run_id = create_run(self.params, stage_name, tags)
                self._log_run_inputs()
                opened = f"MLflow run {self.run_id}"
            else:
                opened = f"MLflow run {self.run_id} reopened: {attempts.reopen(self.run_id, task_run)}"
                self._logged_through = attempts.last_logged_step(self.run_id, "train/loss")
            print(
                f"[{stage_name}] {'resuming at step ' + str(start_step) if start_step else 'starting'}; {opened}",
                flush=True,
            )
            self.flush()  # what the resumed checkpoint committed, if a crash came before its flush
        if self.tracked:
            self.run_id = _broadcast(self.run_id)

    def _log_run_inputs(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        client = MlflowClient()
        packed_dir = Path(self.params.data.packed_dir) / self.run.stage
        params = {
            **flatten("", redact(self.params.model_dump(mode="json"))),
            "run.init": str(self.run.init_dir),
            "run.world_size": str(dist.get_world_size()),
            "data.version": packed_data_version(packed_dir),
            "git.commit": git_commit(),
            **package_versions(),
        }
        entries = [Param(key, value[:6000]) for key, value in params.items()]
        for start in range(0, len(entries), 100):  # MLflow takes at most 100 params per call
            client.log_batch(self.run_id, params=entries[start : start + 100])
        client.log_dict(self.run_id, self.ds_config, "deepspeed_config.json")
        log_redacted_yaml(client, self.run_id, self.params_file)
        log_packed_mixture(client, self.run_id, packed_dir, self.params.stages[self.run.stage])

    def step(
        self, step: int, *, seq_len: int, loss: float, lr: float, tokens: float, seconds: float, grad_norm,
        skipped_rows: int = 0, update_skipped: bool = False, nonfinite_steps: int = 0, video_frames: int | None = None,
    ) -> None:
        """`skipped_rows`: rows skipped so far because a video could not be read. `update_skipped`:
        this step's loss or gradient was non-finite (omnilong/train/nonfinite.py); `nonfinite_steps`:
        such steps so far in this attempt. `video_frames` (video stages): the most frames of any
        video the step trained on, on any rank."""
        memory = _gather_floats(peak_memory_mb())
        if not self.is_main:
            return
        metrics = {
            "train/loss": loss,
            "train/lr": lr,
            "train/tokens": tokens,
            "train/tokens_per_s": tokens / seconds,
            "train/step_seconds": seconds,
            "train/seq_len": seq_len,
            "data/skipped_rows": skipped_rows,
            "train/nonfinite_steps": nonfinite_steps,
            **{f"memory/peak_mb_rank{rank}": mb for rank, mb in enumerate(memory)},
        }
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if video_frames is not None:
            metrics["data/video_frames"] = video_frames
        if not self.tracked:
            for key, points in self._curve.items():
                points[step] = metrics[key]
        else:
            self.pending.append([step, int(time.time() * 1000), metrics])
        memory_text = " ".join(f"r{rank}:{mb:.0f}MB" for rank, mb in enumerate(memory))
        print(
            f"[{self.run.stage}] step {step + 1}/{self.params.stages[self.run.stage].train.max_steps} "
            f"seq {seq_len}" + (f" frames {video_frames}" if video_frames is not None else "")
            + f" loss {loss:.4f} lr {lr:.2e} {tokens / seconds:,.0f} tok/s peak {memory_text}"
            + (f" skipped rows {skipped_rows}" if skipped_rows else "")
            + (f" non-finite loss or gradient: update skipped on every rank ({nonfinite_steps} so far)"
               if update_skipped else ""),
            flush=True,
        )

    def flush(self) -> None:
        """Log the buffered steps to MLflow (rank 0): call it once a checkpoint holding them committed."""
        if not (self.is_main and self.tracked and self.pending):
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        points = [
            Metric(key, value, timestamp, step)
            for step, timestamp, metrics in self.pending if step > self._logged_through
            for key, value in metrics.items()
        ]
        log_metrics(MlflowClient(), self.run_id, points)
        self._logged_through = max(self._logged_through, self.pending[-1][0])
        self.pending = []

    def finish(self) -> None:
        """Log what is still buffered and register the exported model (rank 0) as a version with
        the stage's alias."""
        if not self.is_main:
            return
        self.flush()
        if not self.tracked:
            print(f"[{self.run.stage}] loss curve: {self._plot_loss_curve()} (tracking off: nothing registered)",
                  flush=True)
            return
        from omnilong.tracking.registry import register_stage

        record = register_stage(
            self.run_id, self.run.out_dir, family=self.params.model.family, stage=self.run.stage,
            variant=self.run.variant, init_dir=self.run.init_dir,
        )
        from mlflow import MlflowClient

        curve = self._plot_loss_curve()
        MlflowClient().log_artifact(self.run_id, str(curve))
        adapter = self.run.out_dir / "adapter"
        if adapter.is_dir():  # a LoRA stage: the adapter alone, beside the merged model
            MlflowClient().log_artifacts(self.run_id, str(adapter), artifact_path="adapter")
        MlflowClient().set_terminated(self.run_id)
        print(f"[{self.run.stage}] registered {record['name']} version {record['version']} "
              f"as @{record['alias']} (lineage {' > '.join(record['lineage'])})", flush=True)


    def _plot_loss_curve(self) -> Path:
        """The stage's loss (and context length) per step, as a PNG: what MLflow recorded (every
        attempt of a resumed stage), or this process's steps when tracking is off."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def recorded(key: str) -> dict[int, float]:
            if not self.tracked:
                return self._curve[key]
            from mlflow import MlflowClient

            history = sorted(MlflowClient().get_metric_history(self.run_id, key), key=lambda m: m.timestamp)
            return {m.step: m.value for m in history}

        def latest_per_step(key: str) -> tuple[list[int], list[float]]:
            points = recorded(key)
            steps = sorted(points)
            return [step + 1 for step in steps], [points[step] for step in steps]

        figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=120)
        loss_axis.plot(*latest_per_step("train/loss"), marker=".", color="tab:blue")
        loss_axis.set_xlabel("optimizer step")
        loss_axis.set_ylabel("loss (per valid token)", color="tab:blue")
        context_axis = loss_axis.twinx()
        context_axis.step(*latest_per_step("train/seq_len"), where="post", color="tab:gray", alpha=0.6)
        context_axis.set_ylabel("context length (tokens)", color="tab:gray")
        loss_axis.set_title(f"{self.run.stage}{'-' + self.run.variant if self.run.variant else ''}: training loss")
        figure.tight_layout()
        image = io.BytesIO()
        figure.savefig(image, format="png")
        plt.close(figure)
        path = self.run.out_dir / "loss_curve.png"
        atomic.write_bytes(path, image.getvalue())
        return path


def _broadcast(value: str | None) -> str | None:
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _gather_floats(value: float) -> list[float]:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return [float(v) for v in gathered]
