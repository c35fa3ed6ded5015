"""Where runs are tracked: the project's SQLite store by default, or `tracking.uri`."""

from __future__ import annotations

from pathlib import Path

from omnilong.config import TrackingParams
from omnilong.tracking.plugins import quiet_sagemaker_headers_off_arn
from omnilong.tracking.secrets import redact_uri


class TrackingUnreachable(ConnectionError):
    """`tracking.uri` names a server that does not answer."""


# MLflow's client retries a server that does not answer for minutes; a preflight fails in seconds.
PREFLIGHT_TIMEOUT_S = 5.0


def check_reachable(tracking: TrackingParams, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Raise TrackingUnreachable unless the http(s) server `tracking.uri` names answers within
    `timeout_s` (any HTTP answer will do: an authenticating server answers 401). Other stores
    (the local SQLite one, a database URI) are opened directly by MLflow and fail fast."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    uri = tracking.uri or ""
    if not uri.startswith(("http://", "https://")):
        return
    parts = urlsplit(uri)
    # Without the user info, which urllib would read as part of the host name.
    health = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/") + "/health", "", ""))
    try:
        urllib.request.urlopen(health, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnreachable(
            f"tracking.uri: expected a reachable MLflow tracking server, given {redact_uri(uri)!r}, which did not "
            f"answer within {timeout_s:g} s ({reason}); start it, fix the URI, or leave tracking.uri unset for "
            "the project's local store"
        ) from None


def set_tracking_uri(uri: str) -> None:
    """`mlflow.set_tracking_uri`, with the SageMaker plugin's header warnings kept to SageMaker's
    servers (omnilong/tracking/plugins.py)."""
    import mlflow

    quiet_sagemaker_headers_off_arn()
    mlflow.set_tracking_uri(uri)


def tracking_uri(tracking: TrackingParams, root: Path) -> str:
    if tracking.uri:
        return tracking.uri
    return f"sqlite:///{(root / 'mlflow' / 'mlflow.db').resolve()}"


def artifact_root(root: Path) -> str:
    """Artifacts of the local store live beside it, under the project."""
    return str((root / "mlflow" / "artifacts").resolve())


def use_experiment(tracking: TrackingParams, root: Path) -> str:
    """Point MLflow at the store and return the experiment id, creating it on first use."""
    import mlflow

    check_reachable(tracking)  # fails in seconds where MLflow's client would retry for minutes
    set_tracking_uri(tracking_uri(tracking, root))
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None if tracking.uri else artifact_root(root)
    return mlflow.create_experiment(tracking.experiment, artifact_location=location)
