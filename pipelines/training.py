"""What the Ray Train pipelines (train-gan, train-seg) share: the run folder rules, the MLflow run, checkpoints as
``state.pt`` through ``ray.train``, and the TorchTrainer set-up.

The driver owns the MLflow run: it creates it (or reopens it on ``--resume``) before the workers start and ends
it in a ``finally``, FINISHED or FAILED (KILLED on Ctrl-C), so a failed or retried run is never left RUNNING and
a worker restarted by Ray logs into the same run.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ctsynth_ray.dataset import write_json
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.pipelines.runtime import ensure_ray, quiet_train_env
from ctsynth_ray.pipelines.tracking import absolute_uri, tracking_setup

STATE_NAME = "state.pt"
RUN_FILE = "mlflow_run.json"
OPTIONS_FILE = "run_options.json"


def check_run_dir(run_dir: str | Path, ray_name: str, resume: bool, finished: str) -> Path:
    """The resolved run folder. Fresh runs refuse one that holds an earlier run (a checkpoint, or the
    ``finished`` output); ``resume`` needs a checkpoint. Ray would otherwise restore silently."""
    run_dir = Path(run_dir).resolve()
    storage = run_dir / "ray" / ray_name
    has_checkpoints = storage.is_dir() and any(storage.rglob(STATE_NAME))
    if resume and not has_checkpoints:
        raise CtsynthError(f"{run_dir}: no checkpoint to resume from")
    if not resume and (has_checkpoints or (run_dir / finished).exists()):
        raise CtsynthError(f"{run_dir}: holds an earlier run (pass --resume to continue it, or choose another --out)")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def check_run_options(run_dir: Path, options: dict, resume: bool, may_change: set[str]) -> None:
    """Record a run's options in ``RUN/run_options.json``; on ``resume``, refuse options that differ from the
    recorded ones (one line naming them), except ``may_change`` (e.g. the number of steps): a resumed run must be
    the same run, or its checkpoints and MLflow parameters would describe another."""
    path = run_dir / OPTIONS_FILE
    options = json.loads(json.dumps(options, default=str))  # tuples as lists, as they come back
    if resume and path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(
            k for k in options.keys() | before.keys() if k not in may_change and before.get(k) != options.get(k)
        )
        if changed:
            raise CtsynthError(f"{run_dir}: --resume continues the same run, but {', '.join(changed)} differ from it "
                               f"(only {', '.join(sorted(may_change))} may change)")  # fmt: skip
    write_json(path, options)


@contextlib.contextmanager
def tracked_run(run_dir: Path, tracking_uri: str, experiment: str, resume: bool, *, run_name: str | None = None,
                tags: dict[str, str] | None = None) -> Iterator[str]:  # fmt: skip
    """The MLflow run of RUN, yielding its id: created (named ``run_name``, default RUN's name, with ``tags``) for
    a fresh run, reopened from ``RUN/mlflow_run.json`` on ``resume``; ended FINISHED when the block ends, FAILED
    when it raises."""
    from mlflow.tracking import MlflowClient

    experiment_id = tracking_setup(tracking_uri, experiment)
    client = MlflowClient(absolute_uri(tracking_uri))
    run_file = run_dir / RUN_FILE
    if resume and run_file.is_file():
        run_id = json.loads(run_file.read_text())["run_id"]
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment_id, run_name=run_name or run_dir.name, tags=tags).info.run_id
        write_json(run_file, {"run_id": run_id})
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run_id, status)


@contextlib.contextmanager
def attached_run(tracking_uri: str, run_id: str, active: bool) -> Iterator[None]:
    """On a worker (``active`` on rank 0): log into the driver's run; a worker that fails leaves it FAILED, not
    FINISHED (MLflow would otherwise end it as FINISHED when the process exits)."""
    if not active:
        yield
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.start_run(run_id=run_id)
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    finally:
        mlflow.end_run(status=status)


def fit(train_loop, loop_config: dict, run_dir: Path, ray_name: str, *, workers: int, cpus_per_worker: float = 1,
        gpus_per_worker: float = 0.0, address: str | None = None, verbose: bool = False, callbacks=None):  # fmt: skip
    """Run ``train_loop`` on a TorchTrainer (gloo on CPU, NCCL on GPU) storing checkpoints under RUN/ray;
    a failed run becomes a CtsynthError naming RUN and the cause. Ray's own report, checkpoint and worker-group
    messages are shown only when ``verbose``. ``callbacks``: Ray Train callbacks (a sweep's trial passes Tune's
    report callback). A run folder that holds checkpoints of ``ray_name`` is continued from the latest."""
    import ray.train
    from ray.train.torch import TorchTrainer

    ensure_ray(address, num_cpus=None if address else max(2, math.ceil(workers * cpus_per_worker)), verbose=verbose)
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=ray_name,
            storage_path=str(run_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=2),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": quiet_train_env(verbose)},
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
            callbacks=callbacks,
        ),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        cause = exc.__cause__ or exc
        raise CtsynthError(f"{run_dir}: training failed ({type(cause).__name__}: {cause})") from None


def load_state(device) -> dict | None:
    """The latest checkpoint's state (``torch.load(..., weights_only=True)``), or None on a fresh run."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_NAME, map_location=device, weights_only=True)


def report(metrics: dict, state: dict | None) -> None:
    """``ray.train.report`` from every worker; rank 0 passes ``state``, saved as the checkpoint."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if state is not None:
            torch.save(state, Path(folder) / STATE_NAME)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
