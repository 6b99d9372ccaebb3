"""`ctsynth train-gan`: CycleGAN / pix2pix on Ray Train (TorchTrainer), tracked in MLflow, exported at the end.

Layout of a run folder::

    RUN/generator.pt, RUN/generator.json   the exported generator (ctsynth_ray.models.registry)
    RUN/samples/epoch-<epoch>.png          label | generated | real, per epoch (also in MLflow)
    RUN/ray/                               Ray Train's storage: checkpoints (every --checkpoint-every steps)
    RUN/mlflow_run.json                    the MLflow run (resumed by --resume)
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.gan_data import read_description
from ctsynth_ray.labels import n_classes
from ctsynth_ray.models.gan import GanConfig
from ctsynth_ray.pipelines.runtime import quiet_worker_logs
from ctsynth_ray.pipelines.tracking import absolute_uri, default_tracking_uri
from ctsynth_ray.pipelines.training import (
    attached_run,
    check_run_dir,
    check_run_options,
    fit,
    load_state,
    report,
    tracked_run,
)

DIMS = {"2": "2d", "2.5": "2p5d", "3": "3d"}
RAY_RUN_NAME = "train-gan"
#: What a --resume may change; anything else would make it another run.
MAY_CHANGE = {"steps", "checkpoint_every", "log_every", "gpus_per_worker", "tracking_uri", "experiment"}


@dataclass(frozen=True)
class TrainGanOptions:
    """Everything about a run that is not a GAN hyper-parameter."""

    gandata: str
    run_dir: str
    dims: str = "2"
    encoding: str = "scalar"
    steps: int | None = None  # cap on optimiser steps (smoke runs)
    checkpoint_every: int = 200
    workers: int = 1
    gpus_per_worker: float = 0.0
    tracking_uri: str = ""
    experiment: str = "ctsynth-gan"
    log_every: int = 10

    def __post_init__(self):
        if self.dims not in DIMS:
            raise ValueError(f"dims must be one of {sorted(DIMS)}, got {self.dims!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.checkpoint_every < 1 or self.workers < 1:
            raise ValueError("checkpoint_every and workers must be at least 1")


def _train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import mlflow
    import ray.train
    import ray.train.torch

    from ctsynth_ray.gan_data import GanPairs
    from ctsynth_ray.models.gan import GanTrainer, epoch_batches
    from ctsynth_ray.models.validation import batch, validate, write_sample_grid

    quiet_worker_logs()
    options = TrainGanOptions(**loop_config["options"])
    config = GanConfig(**{**loop_config["gan"], "generator_widths": tuple(loop_config["gan"]["generator_widths"])})
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    kind = DIMS[options.dims]
    description = read_description(options.gandata)
    train = GanPairs(options.gandata, "train", kind, options.encoding)
    has_val = any((Path(options.gandata) / "val").glob(f"{kind}-*.parquet"))
    val = GanPairs(options.gandata, "val", kind, options.encoding) if has_val else None
    label_channels = int(train[0][0].shape[0])
    spatial_dims = 3 if kind == "3d" else 2
    # The U-Net halves the crop down to 1 voxel at most (the reference: 7 levels for 128).
    config = dataclasses.replace(config, unet_downs=min(config.unet_downs, int(math.log2(description["size"]))))
    steps_per_epoch = len(epoch_batches(len(train), config.batch, 0, config.seed, rank, world))
    if steps_per_epoch == 0:
        raise CtsynthError(
            f"{options.gandata}: {len(train)} training pairs are fewer than one batch of {config.batch} per worker"
        )
    trainer = GanTrainer(config, spatial_dims, label_channels, 1, steps_per_epoch, device)
    state = load_state(device)
    if state is not None:
        trainer.load_state_dict(state)
    last = trainer.total_steps() if options.steps is None else min(trainer.total_steps(), options.steps)
    run_dir = Path(options.run_dir)
    with attached_run(options.tracking_uri, loop_config["mlflow_run_id"], rank == 0):
        if rank == 0:
            if state is None:
                mlflow.log_params({**{f"gan.{k}": v for k, v in config.to_dict().items()},
                                   "dims": options.dims, "encoding": options.encoding, "workers": world,
                                   "pairs_train": len(train), "pairs_val": len(val) if val else 0,
                                   "steps_per_epoch": steps_per_epoch, "label_scheme": description["scheme"],
                                   "data_fingerprint": description["fingerprint"]})  # fmt: skip
            print(f"train-gan: {config.model} {options.dims}D, {len(train)} pairs, {world} worker(s), "
                  f"{steps_per_epoch} steps/epoch, steps {trainer.step} -> {last}", flush=True)  # fmt: skip
        started, first_step, warm = time.monotonic(), trainer.step, None
        while trainer.step < last:
            epoch, k = divmod(trainer.step, steps_per_epoch)
            indices = epoch_batches(len(train), config.batch, epoch, config.seed, rank, world)[k]
            unpaired = epoch_batches(len(train), config.batch, epoch, config.seed, rank, world, stream=1)[k]
            label, ct = batch(train, indices)
            losses = trainer.train_step(label, ct, batch(train, unpaired)[1])
            metrics = {**losses, "epoch": epoch}
            if warm is None:  # throughput is measured from the end of the first step (compilation, warm-up)
                warm = (time.monotonic(), trainer.step)
            elif trainer.step == last:
                metrics["train_steps_per_s"] = (trainer.step - warm[1]) / (time.monotonic() - warm[0])
            end_of_epoch = trainer.step % steps_per_epoch == 0 or trainer.step == last
            if rank == 0:
                mlflow.log_metrics(losses, step=trainer.step)
                if trainer.step % options.log_every == 0 or trainer.step == last:
                    rate = (trainer.step - first_step) / max(time.monotonic() - started, 1e-6)
                    print(f"train-gan: step {trainer.step}/{last} epoch {epoch} loss_G {losses['loss_G']:.3f} "
                          f"lr {losses['lr']:.2e} ({rate:.1f} steps/s)", flush=True)  # fmt: skip
                if end_of_epoch and val is not None:
                    val_metrics = validate(trainer.generate, val)
                    mlflow.log_metrics(val_metrics, step=trainer.step)
                    metrics.update(val_metrics)
                    grid = write_sample_grid(run_dir / "samples" / f"epoch-{epoch:04d}.png", trainer.generate, val)
                    mlflow.log_artifact(str(grid), artifact_path="samples")
            if trainer.step % options.checkpoint_every == 0 or trainer.step == last:
                report({**metrics, "step": trainer.step}, trainer.state_dict() if rank == 0 else None)
        if rank == 0:
            export_generator(run_dir, trainer, options, description)
            mlflow.log_artifact(str(run_dir / "generator.json"))
            mlflow.log_artifact(str(run_dir / "generator.pt"))


def export_generator(run_dir: Path, trainer, options: TrainGanOptions, description: dict) -> Path:
    """RUN/generator.pt + RUN/generator.json: G_A and what generating with it needs (``load_generator``)."""
    from ctsynth_ray.labels import HU_SCALE
    from ctsynth_ray.models.registry import GENERATOR_STEM, export_network
    from ctsynth_ray.pipelines.prepare import BANK_NAME

    config = trainer.config
    info = {
        "model": config.model, "dims": options.dims, "label_scheme": description["scheme"],
        "label_encoding": options.encoding, "stack_slices": description.get("stack_slices"),
        "hu_normalisation": {"scale": HU_SCALE, "formula": "network = HU / scale"},
        "spacing_mm": description["spacing_mm"], "size": description["size"],
        "training_data": {"path": str(options.gandata), "fingerprint": description["fingerprint"],
                          "source_dataset": description["source_dataset"],
                          "bank": str(Path(options.gandata) / BANK_NAME)},
        "gan": config.to_dict(), "steps": trainer.step,
        "inference": "eval mode: dropout off, batch norm with its running statistics",
    }  # fmt: skip
    return export_network(run_dir, GENERATOR_STEM, trainer.G_A, trainer.spec, info)


def train_gan(options: TrainGanOptions, config: GanConfig, *, resume: bool = False, address: str | None = None,
              verbose: bool = False):  # fmt: skip
    """Train on Ray Train; returns the Ray ``Result``. Fresh runs refuse a RUN with checkpoints; ``resume``
    continues from the latest one (the same data order, no step repeated or skipped)."""
    description = read_description(options.gandata)  # a clear error before Ray starts
    if DIMS[options.dims] not in description["kinds"]:
        raise CtsynthError(f"{options.gandata}: has no {DIMS[options.dims]} pairs (prepare --dims {options.dims})")
    if config.lambda_identity > 0:
        channels = (n_classes(description["scheme"]) if options.encoding == "onehot" else 1) * (
            description.get("stack_slices", 1) if options.dims == "2.5" else 1
        )
        if config.model != "cyclegan" or channels != 1:
            raise CtsynthError(f"--lambda-identity: the identity loss is CycleGAN's and needs one label channel, as "
                               f"the CT has (scalar encoding, --dims 2 or 3); here {config.model} with {channels}")  # fmt: skip
    pairs = description["counts"]["train"][DIMS[options.dims]]
    if pairs // options.workers < config.batch:
        raise CtsynthError(f"{options.gandata}: {pairs} training pairs are fewer than one batch of {config.batch} "
                           f"per worker ({options.workers} worker(s))")  # fmt: skip
    if "spacing_mm" not in description:
        raise CtsynthError(f"{options.gandata}: made by an older ctsynth (no spacing_mm): run `ctsynth prepare` again")
    run_dir = check_run_dir(options.run_dir, RAY_RUN_NAME, resume, "generator.json")
    # Ray Train workers run in another working directory: every path they see is absolute.
    absolute = {"run_dir": str(run_dir), "gandata": str(Path(options.gandata).resolve()),
                "tracking_uri": absolute_uri(options.tracking_uri or default_tracking_uri())}  # fmt: skip
    check_run_options(run_dir, {**options.__dict__, **absolute, "gan": config.to_dict()}, resume, MAY_CHANGE)
    with tracked_run(run_dir, absolute["tracking_uri"], options.experiment, resume) as run_id:
        loop_config = {"options": {**options.__dict__, **absolute}, "gan": config.to_dict(), "mlflow_run_id": run_id}
        return fit(_train_loop, loop_config, run_dir, RAY_RUN_NAME, workers=options.workers,
                   gpus_per_worker=options.gpus_per_worker, address=address, verbose=verbose)  # fmt: skip
