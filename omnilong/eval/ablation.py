"""The deck's ablation slide: the full recipe's stage-3 model beside the one trained without stage 2.

Reads the two evaluations' `metrics.json` (omnilong/eval/report.py), writes a markdown table and
grouped bars of the headline metrics (the base model as the baseline), and logs both to MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

from omnilong import atomic
from omnilong.config import Params
from omnilong.eval.plots import save_grouped_bars
from omnilong.eval.report import HEADLINE_METRICS, metric_label
from omnilong.tracking.runs import create_run, log_metrics

FULL, ABLATION = "stage3", "stage3-no-stage2"


def _metrics(evaluation_dir: Path, label: str) -> dict[str, float]:
    path = evaluation_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; run the evaluation first (`dvc repro` of its stage)")
    metrics = json.loads(path.read_text())
    if label not in metrics:
        raise ValueError(f"{path}: expected the scores of model {label!r}, found {', '.join(metrics)}")
    return metrics[label]


def ablation_report(params: Params, full_dir: Path, ablation_dir: Path, out_dir: Path) -> dict[str, dict[str, float]]:
    columns = {
        "base": _metrics(full_dir, "base"),
        "full recipe (stages 1, 2, 3)": _metrics(full_dir, FULL),
        "without stage 2 (stages 1, 3)": _metrics(ablation_dir, ABLATION),
    }
    names = [name for name in HEADLINE_METRICS if all(name in scores for scores in columns.values())]
    header = "| metric | " + " | ".join(columns) + " |"
    rows = [f"| {name} | " + " | ".join(f"{scores[name]:.3f}" for scores in columns.values()) + " |" for name in names]
    table = "\n".join(["# Ablation: the recipe without stage 2", "", header,
                       "|" + "---|" * (len(columns) + 1), *rows, ""])
    atomic.write_text(out_dir / "ablation.md", table)
    atomic.write_text(out_dir / "ablation.json", json.dumps({k: {n: v[n] for n in names} for k, v in columns.items()},
                                                            indent=1) + "\n")
    save_grouped_bars({label: [scores[name] for name in names] for label, scores in columns.items()},
                      [metric_label(name) for name in names],
                      "Ablation: full recipe vs without stage 2", out_dir / "ablation.png")
    from mlflow import MlflowClient

    run_id = create_run(params, "ablation-report", {"omnilong.evaluation": "ablation"})
    client = MlflowClient()
    log_metrics(client, run_id, {f"{label.split(' (')[0].replace(' ', '_')}.{name}": scores[name]
                                 for label, scores in columns.items() for name in names})
    for name in ("ablation.md", "ablation.json", "ablation.png"):
        client.log_artifact(run_id, str(out_dir / name))
    client.set_terminated(run_id)
    print(table)
    return columns
