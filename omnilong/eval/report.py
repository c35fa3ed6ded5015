"""Score models, write the metrics files DVC tracks, log the same to MLflow, and gate promotion.

Every model given (the base model, each stage's) gets the held-out loss and the evaluation
suite (text NIAH, V-NIAH, VideoMME) with the same settings. The gate's candidate (stage 3 by
default) becomes its registered model's `champion` only if it scores no worse
(omnilong/tracking/promotion.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from omnilong import atomic
from omnilong.config import Params
from omnilong.digest import json_digest
from omnilong.eval.heldout import evaluate_models
from omnilong.eval.suite import evaluate_model, evaluation_settings
from omnilong.infer.prefill import from_first_rank
from omnilong.tracking.registry import REGISTRATION_FILE
from omnilong.tracking.runs import create_run, log_metrics
from omnilong.tracking.secrets import redact

HEADLINE_METRICS = ("niah.accuracy", "vniah.teacher_forced", "vniah.generation",
                    "videomme.without_subtitles.overall.official.accuracy",
                    "videomme.with_subtitles.overall.official.accuracy")


def evaluate_and_track(params: Params, models: dict[str, Path], out_dir: Path, *, run_name: str,
                       group: dist.ProcessGroup | None = None) -> dict:
    """Under a sequence-parallel `group` every rank calls this: they run the evaluation suite
    (and the gate's rescoring of the champion) together; the first rank alone then scores the
    held-out loss, writes the files and logs to MLflow, and the others return the suite only."""
    from mlflow import MlflowClient

    suite = {label: evaluate_model(params, directory, out_dir / label, group=group)
             for label, directory in models.items()}
    if group is not None and dist.get_rank(group) != 0:
        _follow_champion_scoring(params, group)
        return {"suite": suite}
    settings = evaluation_settings(params)
    # Also points MLflow at the project's store, where the gate finds the registered models.
    run_id = create_run(params, run_name, {"omnilong.evaluation": "heldout+niah+vniah+videomme",
                                           "omnilong.eval.settings_digest": json_digest(settings)})
    gate = params.eval.gate
    registration = models[gate.candidate].parent / REGISTRATION_FILE if gate.candidate in models else None
    decision = None
    if registration is not None and registration.is_file():
        decision = _gate(params, json.loads(registration.read_text()), suite[gate.candidate], settings, group)
    if group is not None:
        from_first_rank(None, group)  # no more champions to score: the other ranks are done
    heldout = evaluate_models(params, models)
    atomic.write_text(out_dir / "heldout.json", json.dumps(heldout, indent=1, sort_keys=True) + "\n")
    atomic.write_text(out_dir / "metrics.json", json.dumps(suite, indent=1, sort_keys=True) + "\n")
    save_comparison(suite, out_dir / "comparison.png", f"{run_name}: base model and each stage")

    client = MlflowClient()
    client.log_dict(run_id, redact(settings), "evaluation_settings.json")
    for label in heldout:
        client.log_param(run_id, f"model.{label}", str(models[label]))
    log_metrics(client, run_id, {
        **{f"heldout.{label}.{stage}.{key}": metrics[key]
           for label, stages in heldout.items() for stage, metrics in stages.items() for key in ("loss", "perplexity")},
        **{f"{label}.{name}": value for label, metrics in suite.items() for name, value in metrics.items()},
    })
    for label in suite:
        client.log_artifacts(run_id, str(out_dir / label), artifact_path=label)
    for name in ("heldout.json", "metrics.json", "comparison.png"):
        client.log_artifact(run_id, str(out_dir / name))

    if decision is not None:
        atomic.write_text(out_dir / "promotion.json", json.dumps(decision, indent=1) + "\n")
        client.log_artifact(run_id, str(out_dir / "promotion.json"))
        client.set_tag(run_id, "omnilong.promoted", str(decision["promoted"]).lower())
        verdict = "is the new champion" if decision["promoted"] else "stays behind the champion"
        print(f"promotion: {decision['model']} version {decision['version']} {verdict} "
              f"({gate.metric} {decision['score']:.4f}, champion's {decision['champion_score']})")
    client.set_terminated(run_id)
    _print_summary(heldout, suite)
    return {"heldout": heldout, "suite": suite}


def _gate(params: Params, registration: dict, metrics: dict[str, float], settings: dict,
          group: dist.ProcessGroup | None) -> dict:
    from omnilong.tracking.promotion import promote_if_not_worse

    metric = params.eval.gate.metric
    if metric not in metrics:
        raise ValueError(f"eval.gate.metric: expected one of the evaluation's metrics ({', '.join(sorted(metrics))}), "
                         f"given {metric!r}")

    def score_champion(model_dir: Path) -> float:
        if group is not None:
            from_first_rank(str(model_dir), group)  # the other ranks score it with this one
        return _score_champion(params, Path(model_dir), group)[metric]

    return promote_if_not_worse(registration["name"], str(registration["version"]), metrics[metric], metric=metric,
                                digest=json_digest(settings), score_model=score_champion)


def _score_champion(params: Params, model_dir: Path, group: dist.ProcessGroup | None) -> dict[str, float]:
    return evaluate_model(params, model_dir, model_dir.parent / "champion-rescored", group=group)


def _follow_champion_scoring(params: Params, group: dist.ProcessGroup) -> None:
    """The other ranks' part of the gate: score each champion the first rank names, until it names none."""
    while (model_dir := from_first_rank(None, group)) is not None:
        _score_champion(params, Path(model_dir), group)


def save_comparison(suite: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """Grouped bars of the headline metrics, one bar per model."""
    from omnilong.eval.plots import save_grouped_bars

    metrics = [name for name in HEADLINE_METRICS if all(name in scores for scores in suite.values())]
    save_grouped_bars({label: [scores[name] for name in metrics] for label, scores in suite.items()},
                      [metric_label(name) for name in metrics], title, path)


def metric_label(name: str) -> str:
    """A headline metric's name as a short two-line plot label."""
    return name.replace(".overall.official.accuracy", "").replace("_", " ").replace(".", "\n", 1)


def _print_summary(heldout: dict, suite: dict) -> None:
    width = max(len(label) for label in heldout)
    for label, stages in heldout.items():
        cells = "  ".join(f"{stage} {m['loss']:.3f} (ppl {m['perplexity']:.1f})" for stage, m in stages.items())
        print(f"held-out loss  {label:<{width}}  {cells}")
    for label, metrics in suite.items():
        cells = "  ".join(f"{name} {metrics[name]:.3f}" for name in HEADLINE_METRICS if name in metrics)
        print(f"evaluation     {label:<{width}}  {cells}")
