"""`ctsynth ui`: MLflow's UI on 127.0.0.1 for the project's tracking store, and where its runs are.

MLflow 3's UI opens on its GenAI overview, where a user sees no runs: the command prints the address of each
experiment's runs table (``http://127.0.0.1:PORT/#/experiments/<id>/runs``) before it starts the server, and warns
about an experiment whose artifacts live in a temporary folder (Ray's, for one), which the next reboot empties.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.pipelines.runtime import LOOPBACK, MLFLOW_ENV
from ctsynth_ray.pipelines.tracking import absolute_uri, default_tracking_uri

TEMPORARY = ("/tmp/ray", "/tmp/ctsynth-ray", "session_", "/ray/session")


@dataclass(frozen=True)
class ExperimentLink:
    """An experiment's runs table, and MLflow's compare view of each sweep's trials in it ({sweep run: url})."""

    name: str
    experiment_id: str
    runs: int
    url: str
    artifact_location: str
    sweeps: dict[str, str]


def experiment_links(tracking_uri: str, port: int) -> list[ExperimentLink]:
    """Every experiment of the store that holds runs, with the address of its runs table."""
    from mlflow.tracking import MlflowClient

    uri = absolute_uri(tracking_uri or default_tracking_uri())
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise CtsynthError(f"{uri}: no MLflow store there yet (train a model or run a sweep first)")
    client = MlflowClient(uri)
    base = f"http://{LOOPBACK}:{port}/#"
    links = []
    for experiment in client.search_experiments():
        runs = client.search_runs([experiment.experiment_id], max_results=10000)
        if not runs and experiment.name == "Default":
            continue
        sweeps = {}
        for parent in (r for r in runs if r.data.tags.get("ctsynth.kind") == "sweep"):
            children = [r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
            if children:
                query = urlencode({"runs": json.dumps(children), "experiments": json.dumps([experiment.experiment_id])})
                sweeps[parent.data.tags.get("mlflow.runName", parent.info.run_id)] = f"{base}/compare-runs?{query}"
        links.append(ExperimentLink(experiment.name, experiment.experiment_id, len(runs),
                                    f"{base}/experiments/{experiment.experiment_id}/runs", experiment.artifact_location,
                                    sweeps))  # fmt: skip
    return links


def temporary_artifacts(links: list[ExperimentLink]) -> list[str]:
    """Warnings for experiments whose artifacts are kept in a temporary (e.g. Ray session) folder."""
    return [f"experiment {link.name!r} keeps its artifacts in {link.artifact_location}, a temporary folder that a "
            f"reboot empties (a store made by an older ctsynth or another tool; MLflow cannot move an experiment's "
            f"artifacts: copy what you need, or start a new store)"
            for link in links if any(part in link.artifact_location for part in TEMPORARY)]  # fmt: skip


def server_command(tracking_uri: str, port: int) -> list[str]:
    """``mlflow server`` for the store on 127.0.0.1 only, one worker."""
    uri = absolute_uri(tracking_uri or default_tracking_uri())
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--registry-store-uri", uri,
               "--host", LOOPBACK, "--port", str(port), "--workers", "1"]  # fmt: skip
    if uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///") :]).parent / "artifacts"
        command += ["--default-artifact-root", artifacts.resolve().as_uri()]
    return command


def start_server(tracking_uri: str, port: int, **popen) -> subprocess.Popen:
    """Start the MLflow server (telemetry off) and return its process."""
    env = {**os.environ, **MLFLOW_ENV, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    return subprocess.Popen(server_command(tracking_uri, port), env=env, **popen)
