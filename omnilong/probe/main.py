"""`omnilong probe` as one call: every stage asked for, then the table, `probe.json`, `probe.md` and the MLflow run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from omnilong.config import Params, StageName
from omnilong.probe.report import cap_text, device_text, log_to_mlflow, rich_table, write_report
from omnilong.probe.run import ProbeSettings, StageProbe, probe_stage


@dataclass(frozen=True)
class ProbeReport:
    probes: list[StageProbe]
    json_path: Path
    run_id: str | None
    """The MLflow run; None when tracking is off."""


def probe_and_report(params: Params, params_file: Path, stages: list[StageName], settings: ProbeSettings,
                     on_gpu: bool, console: Console) -> ProbeReport:
    """Probe `stages` in turn (progress on `console`), then print and record the result."""
    def log(line: str) -> None:
        console.print(line, markup=False, highlight=False)  # "[stage1] ..." is text, not a style

    probes = [probe_stage(params, params_file, stage, settings, log) for stage in stages]
    cap, device = cap_text(settings.cap_bytes, on_gpu), device_text(on_gpu, params.parallel.nproc_per_node)
    files = write_report(probes, settings.out, cap, device)
    console.print(rich_table(probes, cap))
    run_id = log_to_mlflow(params, probes, files, device)
    console.print(f"trials: {files[0]}" + (f"; MLflow run {run_id}" if run_id else ""), highlight=False)
    return ProbeReport(probes, files[0], run_id)
