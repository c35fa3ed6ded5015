"""The `sagemaker-mlflow` plugin's request-header provider (installed by the `team` extra) fails on
every request to a tracking server that is not a SageMaker ARN; omnilong/tracking/plugins.py drops
those warnings only."""

from __future__ import annotations

import logging

import pytest

from omnilong.tracking.plugins import HEADER_FAILURE, HEADER_LOGGER, SageMakerHeadersOffArn
from omnilong.tracking.store import set_tracking_uri

pytest.importorskip("sagemaker_mlflow", reason="the team extra's SageMaker SDK brings the plugin")


@pytest.fixture
def header_warnings(monkeypatch):
    """The header-resolution warnings MLflow logs from here on (its loggers do not propagate to
    pytest's), with the logger's filters restored afterwards."""
    logger = logging.getLogger(HEADER_LOGGER)
    monkeypatch.setattr(logger, "filters", list(logger.filters))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _failures(records: list[logging.LogRecord]) -> list[str]:
    return [record.getMessage() for record in records if record.msg == HEADER_FAILURE]


@pytest.mark.slow
def test_no_header_warning_from_a_real_tracking_server(team_stack, monkeypatch, header_warnings):
    """The same requests to the team's MLflow server warn without the filter, and not once it is
    installed where omnilong sets the tracking URI."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", team_stack.mlflow_admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team_stack.mlflow_admin[1])
    logger = logging.getLogger(HEADER_LOGGER)
    for existing in [f for f in logger.filters if isinstance(f, SageMakerHeadersOffArn)]:
        logger.removeFilter(existing)
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(team_stack.mlflow_uri):
        MlflowClient().search_experiments(max_results=1)
        unfiltered = _failures(header_warnings)
        assert unfiltered, "the plugin's provider no longer fails on a plain server: drop the filter"

        header_warnings.clear()
        set_tracking_uri(team_stack.mlflow_uri)
        MlflowClient().search_experiments(max_results=1)
        MlflowClient().get_experiment_by_name("Default")
        assert _failures(header_warnings) == []


def test_real_header_failures_are_still_reported(monkeypatch, header_warnings):
    """Under a SageMaker ARN the plugin's own failure is reported, and under a plain server
    another provider's is."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.tracking.request_header import registry
    from mlflow.tracking.request_header.abstract_request_header_provider import RequestHeaderProvider

    class Broken(RequestHeaderProvider):
        def in_context(self):
            return True

        def request_headers(self):
            raise RuntimeError("this provider is broken")

    set_tracking_uri("http://127.0.0.1:9")  # installs the filter; nothing is requested
    with _use_tracking_uri("arn:aws:sagemaker:us-east-1:123456789012:no-such-resource/omnilong"):
        registry.resolve_request_headers()
    assert any("Resource type no-such-resource Not supported" in message for message in _failures(header_warnings))

    header_warnings.clear()
    monkeypatch.setattr(registry._request_header_provider_registry, "_registry",
                        [*registry._request_header_provider_registry, Broken()])
    with _use_tracking_uri("http://127.0.0.1:9"):
        registry.resolve_request_headers()
    assert _failures(header_warnings) == ["Encountered unexpected error during resolving request headers: "
                                          "this provider is broken"]
