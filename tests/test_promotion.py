"""The promotion gate on a real MLflow registry (SQLite store): a lower score keeps the champion,
an equal or higher one takes the alias, and a champion scored under other settings is re-scored."""

from __future__ import annotations

import pytest

from omnilong.tracking.promotion import CHAMPION, gate_tag, promote_if_not_worse

NAME, METRIC = "omnilong-test", "videomme.with_subtitles.overall.official.accuracy"


@pytest.fixture
def registry(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("gate", artifact_location=str(tmp_path / "artifacts"))
    client.create_registered_model(NAME)
    versions = []
    for number in range(3):
        run = client.create_run(experiment)
        model_dir = tmp_path / f"model{number}"
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{}")
        client.log_artifacts(run.info.run_id, str(model_dir), artifact_path="model")
        source = f"{run.info.artifact_uri}/model"
        versions.append(client.create_model_version(NAME, source, run.info.run_id).version)
    yield client, versions
    mlflow.set_tracking_uri(None)


def _never_called(model_dir):
    raise AssertionError(f"the champion should not need re-scoring ({model_dir})")


def test_lower_score_keeps_the_champion_and_equal_takes_it(registry):
    client, (first, second, third) = (registry[0], [str(v) for v in registry[1]])
    decision = promote_if_not_worse(NAME, first, 0.5, metric=METRIC, digest="aaa", score_model=_never_called)
    assert decision["promoted"] and decision["champion_before"] is None
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == first

    decision = promote_if_not_worse(NAME, second, 0.4, metric=METRIC, digest="aaa", score_model=_never_called)
    assert not decision["promoted"] and decision["champion_score"] == 0.5 and decision["champion_before"] == first
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == first
    assert client.get_model_version(NAME, second).tags[gate_tag(METRIC, "aaa")] == "0.4"

    decision = promote_if_not_worse(NAME, third, 0.5, metric=METRIC, digest="aaa", score_model=_never_called)
    assert decision["promoted"]
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == third


def test_champion_scored_under_other_settings_is_rescored_under_the_candidates(registry):
    client, (first, second, _) = (registry[0], [str(v) for v in registry[1]])
    promote_if_not_worse(NAME, first, 0.9, metric=METRIC, digest="old", score_model=_never_called)
    rescored = []

    def score_model(model_dir):
        assert (model_dir / "config.json").is_file()  # the champion's files, downloaded
        rescored.append(model_dir)
        return 0.3

    decision = promote_if_not_worse(NAME, second, 0.35, metric=METRIC, digest="new", score_model=score_model)
    assert len(rescored) == 1
    assert decision["promoted"] and decision["champion_score"] == 0.3
    assert client.get_model_version(NAME, first).tags[gate_tag(METRIC, "new")] == "0.3"
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == second
