"""`ctsynth submit` and `ctsynth jobs`: any ctsynth command as a Ray job on a cluster.

A job runs ``python -m ctsynth_ray.cli.main <command>`` on the cluster's head in a runtime environment whose
``py_modules`` carry this checkout's ``ctsynth_ray`` (with ``cli`` and ``pipelines`` under it), so the job runs
the submitter's code with the cluster's Python and packages (the image of ``deploy/docker``). Inside the job,
``RAY_ADDRESS`` names the cluster: every Ray stage of the command runs there (``ensure_ray``).

Token authentication (Ray >= 2.52; ``authOptions`` in KubeRay): with ``RAY_AUTH_MODE=token`` Ray's client sends
the token from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; a token given in
``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` alone turns the mode on. A refused or missing token is one line.
The token travels in clear over plain http: reach the dashboard through a port-forward or an SSH tunnel.
"""

from __future__ import annotations

import importlib
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.pipelines.runtime import MLFLOW_ENV
from ctsynth_ray.storage import has_credentials, masked

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
#: How the job runs the CLI with the cluster's Python (its environment first on PATH, as in deploy/docker).
ENTRYPOINT = "python -m ctsynth_ray.cli.main"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
POLL_SECONDS = 1.0


def dashboard_address(address: str | None) -> str:
    """The Jobs API to talk to: ``address``, else ``RAY_API_SERVER_ADDRESS``, else an http ``RAY_ADDRESS``, else
    the local default; ``HOST:PORT`` gets ``http://``."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not address and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address = os.environ["RAY_ADDRESS"]
    address = (address or DEFAULT_DASHBOARD).rstrip("/")
    return address if "://" in address else f"http://{address}"


def _token_mode() -> None:
    """A token given explicitly (``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``) is meant to be sent."""
    if not os.environ.get("RAY_AUTH_MODE") and (
        os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    ):
        os.environ["RAY_AUTH_MODE"] = "token"


def _explain(address: str, exc: BaseException) -> CtsynthError:
    """One line for what went wrong talking to the Jobs API at ``address``."""
    from ray.exceptions import AuthenticationError

    text = str(exc).strip()
    if isinstance(exc, AuthenticationError) or "Unauthorized" in text or "Forbidden" in text:
        if "Invalid authentication token" in text or "Forbidden" in text:
            return CtsynthError(f"{address}: the cluster refused the authentication token (check RAY_AUTH_TOKEN or "
                                f"~/.ray/auth_token against the cluster's)")  # fmt: skip
        return CtsynthError(f"{address}: the cluster requires token authentication and no token was sent (export "
                            f"RAY_AUTH_MODE=token with RAY_AUTH_TOKEN, or the cluster's token in ~/.ray/auth_token)")  # fmt: skip
    if isinstance(exc, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return CtsynthError(f"{address}: no Ray dashboard answers there (is the cluster up, the port forwarded?)")
    if "does not exist" in text:
        return CtsynthError(f"{address}: {text.splitlines()[0].split(': ', 1)[-1].rstrip('.')}")
    first = text.splitlines()[0] if text else type(exc).__name__
    return CtsynthError(f"{address}: the Jobs API failed ({first})")


class JobsClient:
    """Ray's ``JobSubmissionClient`` with one-line errors."""

    def __init__(self, address: str | None = None):
        _token_mode()
        self.address = dashboard_address(address)
        self._client = self._call(self._connect)

    def _connect(self):
        import logging

        from ray.job_submission import JobSubmissionClient

        for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
            logging.getLogger(name).setLevel(logging.WARNING)  # "Uploading package ..." at every submit
        return JobSubmissionClient(self.address)

    def _call(self, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CtsynthError:
            raise
        except Exception as exc:  # requests, Ray and auth errors: one line each
            raise _explain(self.address, exc) from None

    def submit(self, **kwargs) -> str:
        return self._call(self._client.submit_job, **kwargs)

    def info(self, job_id: str):
        return self._call(self._client.get_job_info, job_id)

    def logs(self, job_id: str) -> str:
        return self._call(self._client.get_job_logs, job_id)

    def stop(self, job_id: str) -> bool:
        self.info(job_id)  # an unknown id is named, not reported as "not running"
        return self._call(self._client.stop_job, job_id)

    def list(self) -> list:
        return self._call(self._client.list_jobs)


def project_modules(into: Path) -> Path:
    """This installation's ``ctsynth_ray`` as one folder (``cli`` and ``pipelines`` inside it, as installed),
    for a runtime environment's ``py_modules``."""
    package = into / "ctsynth_ray"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("ctsynth_ray", "ctsynth_ray.cli", "ctsynth_ray.pipelines"):
        source = Path(importlib.import_module(name).__path__[0])
        target = package / name.partition(".")[2].replace(".", "/") if "." in name else package
        shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
    return package


@dataclass(frozen=True)
class SubmitOptions:
    command: tuple[str, ...]
    address: str | None = None
    gpus: float = 0.0
    wait: bool = True
    submission_id: str | None = None


#: Options whose value is a path or URI (the CLI's dataset, model and output options).
PATH_OPTIONS = ("--out", "--model", "--source", "--bank", "--gan-data", "--synthetic", "--real", "--val", "--train",
                "--audit-real", "--preview")  # fmt: skip


def _relative_paths(command: Sequence[str]) -> list[str]:
    """Values of path options (and path-like positionals) in ``command`` that are relative local paths."""
    found = []
    for before, arg in zip(("", *command), command):
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        is_path = before in PATH_OPTIONS or (arg.startswith(tuple(f"{o}=" for o in PATH_OPTIONS)))
        is_path = is_path or (
            not arg.startswith("-") and not before.startswith("-") and ("/" in arg or Path(arg).exists())
        )
        if is_path and "://" not in value and not Path(value.split(":")[0]).is_absolute():
            found.append(value)
    return found


def entrypoint(command: Sequence[str]) -> str:
    return f"{ENTRYPOINT} {shlex.join(command)}"


def submit(options: SubmitOptions, echo=print, write=None) -> int:
    """Submit ``options.command`` as a Ray job; with ``wait``, stream its logs through ``write`` and return the exit
    code the command had on the cluster (0 on success). Without ``wait``, return 0 once submitted."""
    if not options.command:
        raise CtsynthError("nothing to submit: give a ctsynth command after --, e.g. ctsynth submit -- generate ...")
    if options.command[0] in ("submit", "jobs"):
        raise CtsynthError(f"ctsynth {options.command[0]} runs where you are, not as a job")
    secret = next((arg for arg in options.command if has_credentials(arg)), None)
    if secret is not None:
        raise CtsynthError(f"{masked(secret)}: a credential in a URI would be stored in the job's record on the "
                           f"cluster: give the nodes credentials through their environment (see docs/deploy.md)")  # fmt: skip
    client = JobsClient(options.address)
    for arg in _relative_paths(options.command):
        echo(f"note: {arg} is a relative path: the job resolves it on the cluster, in the job's own working folder "
             f"(give an absolute path on shared storage, or a URI)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ctsynth-job-") as folder:
        runtime_env = {
            "py_modules": [str(project_modules(Path(folder)))],
            "env_vars": {**MLFLOW_ENV, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"},
        }
        job_id = client.submit(
            entrypoint=entrypoint(options.command),
            runtime_env=runtime_env,
            submission_id=options.submission_id,
            entrypoint_num_gpus=options.gpus or None,
            metadata={"ctsynth.command": options.command[0]},
        )
    echo(f"submitted job {job_id} to {client.address}: ctsynth {shlex.join(options.command)}")
    if not options.wait:
        echo(f"follow it with: ctsynth jobs logs {job_id} --follow --address {client.address}")
        return 0
    return follow(client, job_id, echo, write)


def follow(client: JobsClient, job_id: str, echo=print, write=None) -> int:
    """Print a job's log as it grows until the job ends; its exit code (1 for a failure without one)."""
    write = write or (lambda text: print(text, end="", flush=True))
    shown = 0
    try:
        while True:
            info = client.info(job_id)
            text = client.logs(job_id)
            if len(text) > shown:
                write(text[shown:])
                shown = len(text)
            if _status(info) in TERMINAL:
                break
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        echo(f"stopped following; job {job_id} keeps running (ctsynth jobs stop {job_id})")
        return 130
    status = _status(info)
    code = getattr(info, "driver_exit_code", None)
    message = (info.message or "").strip().split(", last available logs")[0].splitlines()
    echo(f"job {job_id} {status}" + (f": {message[0]}" if status != "SUCCEEDED" and message else ""))
    if status == "SUCCEEDED":
        return 0
    return code if isinstance(code, int) and code > 0 else 1


def _status(job) -> str:
    return str(getattr(job.status, "value", job.status))


def job_rows(client: JobsClient) -> list[str]:
    """One line per job, newest first: id, status, start time, entrypoint."""
    jobs = [j for j in client.list() if j.submission_id]  # submitted jobs, not every driver that connected
    jobs.sort(key=lambda j: j.start_time or 0, reverse=True)
    lines = []
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000))
        command = job.entrypoint.removeprefix(f"{ENTRYPOINT} ")
        lines.append(f"{job.submission_id or job.job_id:<32} {_status(job):<10} {started}  {command}")
    return lines
