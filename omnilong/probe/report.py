"""The probe's report: one line per stage (a rich table and Markdown), every trial as JSON, an MLflow run."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from omnilong import atomic
from omnilong.config import Params
from omnilong.probe.run import GIB, StageProbe

COLUMNS = ("stage", "longest fitting seq_len", "peak GiB per rank there", "tokens/s there")


def cap_text(cap_bytes: int | None, on_gpu: bool) -> str:
    given = None if cap_bytes is None else f"{cap_bytes / GIB:g} GiB (--cap-gib)"
    if not on_gpu:
        return given
    return "the GPU's memory" + (f", at most {given}" if given else "")


def device_text(on_gpu: bool, nproc: int) -> str:
    if on_gpu:
        import torch

        return f"{nproc} x {torch.cuda.get_device_name(0)}"
    return f"{nproc} CPU ranks"


def summary_rows(probes: list[StageProbe]) -> list[tuple[str, str, str, str]]:
    rows = []
    for probe in probes:
        trial = probe.at_longest
        if trial is None:
            rows.append((probe.stage, f"none (not even {probe.lowest})", "-", "-"))
            continue
        # At --max-seq-len the search stopped, not the memory: the stage may fit longer rows.
        longest = f">= {probe.longest} (--max-seq-len)" if probe.stopped_at_max else str(probe.longest)
        rows.append((probe.stage, longest, " / ".join(f"{b / GIB:.2f}" for b in trial.peak_bytes),
                     f"{trial.tokens_per_s:,.0f}"))
    return rows


def rich_table(probes: list[StageProbe], cap_text: str) -> Table:
    table = Table(*COLUMNS, title=f"omnilong probe (cap per rank: {cap_text})")
    for row in summary_rows(probes):
        table.add_row(*row)
    return table


def markdown_table(probes: list[StageProbe], cap_text: str) -> str:
    lines = [f"# omnilong probe (cap per rank: {cap_text})", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(probes)]
    return "\n".join(lines) + "\n"


def write_report(probes: list[StageProbe], out: Path, cap_text: str, device: str) -> tuple[Path, Path]:
    """`probe.json` (every trial) and `probe.md` (the table) in `out`, each written atomically."""
    records = {"device": device, "cap": cap_text, "stages": [probe.to_json() for probe in probes],
               "trials": [asdict(trial) for probe in probes for trial in probe.trials]}
    json_path, markdown_path = out / "probe.json", out / "probe.md"
    atomic.write_text(json_path, json.dumps(records, indent=1) + "\n")
    atomic.write_text(markdown_path, markdown_table(probes, cap_text))
    return json_path, markdown_path


def log_to_mlflow(params: Params, probes: list[StageProbe], files: tuple[Path, ...], device: str) -> str | None:
    """A `probe` run in the tracking experiment: per stage the longest fitting length (0: none),
    the peak of the largest rank and the tokens/s there; the report files as artifacts. None when
    `tracking.enabled` is false."""
    if not params.tracking.enabled:
        return None
    from mlflow import MlflowClient

    from omnilong.tracking.runs import create_run

    run_id = create_run(params, "probe", {"omnilong.probe": ",".join(probe.stage for probe in probes)})
    client = MlflowClient()
    client.log_param(run_id, "device", device)
    for probe in probes:
        trial = probe.at_longest
        client.log_metric(run_id, f"probe.{probe.stage}.longest_seq_len", probe.longest or 0)
        if trial is not None:
            client.log_metric(run_id, f"probe.{probe.stage}.peak_gib", max(trial.peak_bytes) / GIB)
            client.log_metric(run_id, f"probe.{probe.stage}.tokens_per_s", trial.tokens_per_s)
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id
