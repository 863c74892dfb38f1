"""MLflow set-up done once, before any worker starts."""

from __future__ import annotations

import logging
from pathlib import Path

from qlib_ext.errors import ConfigError

logger = logging.getLogger(__name__)


def check_tracking_uri(uri: str) -> str:
    """Refuse tracking URIs MLflow 3 will refuse later, inside every worker, with a clear message."""
    if uri.startswith(("sqlite:", "http://", "https://", "postgresql", "mysql", "databricks")):
        return uri
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(
            f"MLflow tracking URI {uri!r}: MLflow 3 refuses the file store ('./mlruns') that Qlib uses by "
            f"default; use sqlite:///ABS/PATH/mlflow.db or an MLflow server URL such as http://host:5000")
    return uri


def ensure_experiment(uri: str, name: str) -> str:
    """Create the tracking DB (schema migration) and the experiment once; return the experiment id.

    Several workers doing MLflow's first-use migration of a fresh sqlite DB at the same moment fail,
    so the process that starts the workers does it first.
    """
    import mlflow

    check_tracking_uri(uri)
    artifacts = None
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the DB: MLflow would otherwise put them under the caller's cwd.
        root = Path(uri[len("sqlite:///"):]).parent
        root.mkdir(parents=True, exist_ok=True)
        artifacts = (root / "mlartifacts").resolve().as_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except mlflow.exceptions.MlflowException:  # created meanwhile by another submitter
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
