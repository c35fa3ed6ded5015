"""MLflow plugins that misbehave outside their own platform, kept quiet there.

The `team` extra's SageMaker SDK installs `sagemaker-mlflow`, whose request-header provider
claims every request (its `in_context()` is always true) and fails on any tracking URI that is
not a SageMaker ARN; MLflow logs each failure as a warning, one per request to the server. Only
those failures are dropped: the provider's failures under an ARN, and every other provider's,
are still reported.
"""

from __future__ import annotations

import importlib.util
import logging

# mlflow.tracking.request_header.registry.resolve_request_headers logs each provider's failure so.
HEADER_LOGGER = "mlflow.tracking.request_header.registry"
HEADER_FAILURE = "Encountered unexpected error during resolving request headers: %s"
PLUGIN = "sagemaker_mlflow"


def _raised_in_plugin(error: BaseException) -> bool:
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_globals.get("__name__", "").startswith(PLUGIN + "."):
            return True
        frame = frame.tb_next
    return False


class SageMakerHeadersOffArn(logging.Filter):
    """Drops the SageMaker header provider's failures while the tracking URI is not an ARN."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != HEADER_FAILURE or not record.args:
            return True
        error = record.args[0] if isinstance(record.args, tuple) else None
        if not isinstance(error, BaseException) or not _raised_in_plugin(error):
            return True
        import mlflow

        # The provider reads the same global URI (mlflow.get_tracking_uri) on every request.
        return mlflow.get_tracking_uri().startswith("arn:")


def quiet_sagemaker_headers_off_arn() -> None:
    """Install the filter once per process, where the plugin is installed."""
    if importlib.util.find_spec(PLUGIN) is None:
        return
    logger = logging.getLogger(HEADER_LOGGER)
    if not any(isinstance(existing, SageMakerHeadersOffArn) for existing in logger.filters):
        logger.addFilter(SageMakerHeadersOffArn())
