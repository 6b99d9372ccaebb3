"""What the Ray Train pipelines (train-gan, train-seg) share: the run folder rules, the tracked MLflow run,
checkpoints as ``state.pt`` through ``ray.train``, and the TorchTrainer set-up."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.pipelines.runtime import ensure_ray
from ctsynth_ray.pipelines.tracking import tracking_setup

STATE_NAME = "state.pt"


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


def fit(train_loop, loop_config: dict, run_dir: Path, ray_name: str, *, workers: int, cpus_per_worker: int = 1,
        gpus_per_worker: float = 0.0, address: str | None = None):  # fmt: skip
    """Run ``train_loop`` on a TorchTrainer (gloo on CPU, NCCL on GPU) storing checkpoints under RUN/ray;
    a failed run becomes a CtsynthError naming RUN and the cause."""
    import ray.train
    from ray.train.torch import TorchTrainer

    ensure_ray(address, num_cpus=None if address else max(2, workers * cpus_per_worker))
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


def start_tracked_run(run_dir: Path, tracking_uri: str, experiment: str, resuming: bool, params: dict) -> str:
    """Rank 0: open the run's MLflow run (the same one again when resuming) and log ``params`` once."""
    import mlflow

    tracking_setup(tracking_uri, experiment)
    run_file = run_dir / "mlflow_run.json"
    run_id = json.loads(run_file.read_text())["run_id"] if resuming and run_file.is_file() else None
    mlflow.start_run(run_id=run_id, run_name=None if run_id else run_dir.name)
    if run_id is None:
        run_id = mlflow.active_run().info.run_id
        run_file.write_text(json.dumps({"run_id": run_id}))
        mlflow.log_params(params)
    return run_id
