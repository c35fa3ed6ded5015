"""The Model Registry: each stage's HF model directory as a version of `omnilong-<family>`.

Versions point at the logged `save_pretrained` directory itself (not an MLflow flavour), so
`models:/omnilong-qwen2_5_vl@stage3` downloads to a directory that plain transformers loads:

    path = mlflow.artifacts.download_artifacts("models:/omnilong-qwen2_5_vl@stage3")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
"""

from __future__ import annotations

import json
from pathlib import Path

from omnilong.config import TrackingParams
from omnilong.tracking.secrets import redact_uri
from omnilong.tracking.store import check_reachable, set_tracking_uri, tracking_uri

MODEL_ARTIFACT = "model"


def registered_name(family: str, variant: str | None = None) -> str:
    return f"omnilong-{family}" + (f"-{variant}" if variant else "")


def register_stage_model(
    run_id: str, model_dir: Path, name: str, alias: str, tags: dict[str, str] | None = None
) -> str:
    """Log `model_dir` under the run, register it as a new version of `name`, point `alias` at it.

    A run registers its model once: a retried stage whose earlier attempt registered it before
    crashing (the retry resumes from the final checkpoint and exports the same weights) keeps that
    version, and the files it points at are not logged over."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    registered = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if registered:
        version = min(registered, key=lambda v: int(v.version)).version
        client.set_registered_model_alias(name, alias, version)
        return version
    client.log_artifacts(run_id, str(model_dir), artifact_path=MODEL_ARTIFACT)
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags or {})
    client.set_registered_model_alias(name, alias, version.version)
    return version.version


class ModelNotFound(ValueError):
    """A registry URI that names no model of the tracking store."""


def resolve_model_dir(model: str, tracking: TrackingParams) -> Path:
    """A local directory, or a `models:/name@alias` / `runs:/...` URI downloaded from the store
    `tracking` names (the project's by default) to one. Raises TrackingUnreachable when that
    store's server does not answer, ModelNotFound when it holds no such model."""
    if "://" not in model and not model.startswith("models:/"):
        return Path(model)
    check_reachable(tracking)
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(tracking, Path("."))
    set_tracking_uri(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(model))
    except MlflowException as exc:
        raise ModelNotFound(
            f"{model}: not found in the tracking store {redact_uri(uri)} ({exc.message}); expected "
            "models:/NAME@ALIAS of a registered model and one of its aliases (the MLflow UI lists them)"
        ) from None


REGISTRATION_FILE = "registration.json"


def lineage_of(init_dir: Path, stage: str) -> list[str]:
    """The stages a model went through: its initial model's lineage, then this stage."""
    registration = init_dir.parent / REGISTRATION_FILE
    if registration.is_file():
        return [*json.loads(registration.read_text())["lineage"], stage]
    return ["base", stage]


def register_stage(
    run_id: str, out_dir: Path, *, family: str, stage: str, variant: str | None, init_dir: Path
) -> dict[str, object]:
    """Register `out_dir/model` with alias `stage` and record the result in `out_dir/registration.json`."""
    from mlflow import MlflowClient

    from omnilong import atomic

    name = registered_name(family, variant)
    lineage = lineage_of(init_dir, stage)
    tags = {"omnilong.stage": stage, "omnilong.lineage": ">".join(lineage), "omnilong.init": str(init_dir)}
    version = register_stage_model(run_id, out_dir / "model", name, stage, tags)
    for key, value in tags.items():
        MlflowClient().set_tag(run_id, key, value)
    record = {"name": name, "version": version, "alias": stage, "run_id": run_id, "lineage": lineage}
    atomic.write_text(out_dir / REGISTRATION_FILE, json.dumps(record, indent=1) + "\n")
    return record
