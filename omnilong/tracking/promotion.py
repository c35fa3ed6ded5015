"""The promotion gate: a new stage-3 model becomes `champion` only if it scores no worse.

Scores are compared under the same evaluation settings only. Each score is recorded on its
model version as the tag `omnilong.gate.<metric>.<settings digest>` (the digest of
`omnilong.eval.suite.evaluation_settings`), so a champion scored under other settings is scored
again, now, under the candidate's settings before the comparison, and that score is recorded too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

CHAMPION = "champion"


def gate_tag(metric: str, digest: str) -> str:
    return f"omnilong.gate.{metric}.{digest}"


def promote_if_not_worse(
    name: str, version: str, score: float, *, metric: str, digest: str,
    score_model: Callable[[Path], float],
) -> dict:
    """Record `score` on `name` version `version`; give it the `champion` alias unless the
    current champion's score on `metric` under the same settings (`digest`) is higher.

    `score_model(model_dir)` scores the current champion when it has no score under these
    settings yet. Returns the decision, with both scores.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    tag = gate_tag(metric, digest)
    client.set_model_version_tag(name, version, tag, repr(score))
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    decision = {"model": name, "version": str(version), "metric": metric, "settings_digest": digest, "score": score,
                "champion_before": None, "champion_score": None}
    if champion is not None and str(champion.version) != str(version):
        decision["champion_before"] = str(champion.version)
        recorded = champion.tags.get(tag)
        if recorded is None:
            champion_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{CHAMPION}"))
            recorded = repr(score_model(champion_dir))
            client.set_model_version_tag(name, champion.version, tag, recorded)
        decision["champion_score"] = float(recorded)
    decision["promoted"] = decision["champion_score"] is None or score >= decision["champion_score"]
    if decision["promoted"]:
        client.set_registered_model_alias(name, CHAMPION, version)
    return decision
