"""Score models, write the metrics file DVC tracks, and log the same numbers to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from omnilong import atomic
from omnilong.config import Params
from omnilong.eval.heldout import evaluate_models
from omnilong.tracking.runs import create_run


def evaluate_and_track(params: Params, models: dict[str, Path], out_dir: Path, *, run_name: str) -> dict:
    from mlflow import MlflowClient

    results = evaluate_models(params, models)
    atomic.write_text(out_dir / "heldout.json", json.dumps(results, indent=1, sort_keys=True) + "\n")
    run_id = create_run(params, run_name, {"omnilong.evaluation": "heldout"})
    client = MlflowClient()
    for label, stages in results.items():
        client.log_param(run_id, f"model.{label}", str(models[label]))
        for stage, metrics in stages.items():
            client.log_metric(run_id, f"heldout.{label}.{stage}.loss", metrics["loss"])
            client.log_metric(run_id, f"heldout.{label}.{stage}.perplexity", metrics["perplexity"])
    client.log_artifact(run_id, str(out_dir / "heldout.json"))
    client.set_terminated(run_id)
    width = max(len(label) for label in results)
    for label, stages in results.items():
        cells = "  ".join(f"{stage} {m['loss']:.3f} (ppl {m['perplexity']:.1f})" for stage, m in stages.items())
        print(f"held-out loss  {label:<{width}}  {cells}")
    return results
