"""MLflow: a local sqlite store by default (MLflow 3 refuses its file store), artifacts beside it."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_FOLDER = "ctsynth-mlflow"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/ctsynth-mlflow/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_FOLDER / 'mlflow.db'}"


def absolute_uri(uri: str) -> str:
    """A sqlite URI with a relative path made absolute (Ray workers run in another working directory)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def tracking_setup(uri: str, experiment: str) -> str:
    """Point MLflow at ``uri`` and make ``experiment`` current (created with its artifacts beside a sqlite
    store, not in the working directory); returns the experiment id. Telemetry stays off."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = absolute_uri(uri or default_tracking_uri())
    artifacts = None
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///") :])
        database.parent.mkdir(parents=True, exist_ok=True)
        artifacts = (database.parent / "artifacts").resolve().as_uri()
        if not database.exists():
            # MLflow creates the "Default" experiment with the store, its artifacts in ./mlruns of whichever process
            # came first (a Ray worker's is Ray's temporary folder): create the store here, artifacts beside it.
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            SqlAlchemyStore(uri, artifacts)
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id
