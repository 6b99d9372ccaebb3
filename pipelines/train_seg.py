"""`ctsynth train-seg`: the 3D U-Net nodule segmenter on Ray Train, evaluated on whole real volumes, in MLflow.

Data parallel the standard way: ``ray.train.torch.prepare_model`` wraps the U-Net in DDP (bucketed all-reduce of
gradients). Before Ray starts, the training set is checked against the validation set: a training volume that is
a validation volume, or a synthetic volume cut from one, is refused.

Run folder::

    RUN/model.pt, RUN/model.json     the segmenter (ctsynth_ray.models.registry.load_segmenter)
    RUN/pred/<volume_id>.nii.gz      predicted masks of the validation volumes (latest evaluation)
    RUN/metrics.csv                  per-volume scores of the latest evaluation (ctsynth score's columns)
    RUN/evals/iter-<iteration>.csv   every evaluation's scores, and iter-<iteration>.png: predictions vs truth
    RUN/ray/                         Ray Train's checkpoints (one per evaluation)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ctsynth_ray.errors import CtsynthWarning
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
from ctsynth_ray.segmentation import (
    absolute_spec,
    check_no_leakage,
    gan_overlap_warnings,
    parse_spec,
    select_volumes,
)

RAY_RUN_NAME = "train-seg"
#: What a --resume may change; anything else would make it another run.
MAY_CHANGE = {"iterations", "eval_every", "cpus_per_worker", "gpus_per_worker", "tracking_uri", "experiment"}


@dataclass(frozen=True)
class TrainSegOptions:
    train: tuple[str, ...]
    val: str
    run_dir: str
    iterations: int = 1000
    patch: int = 96
    samples_per_volume: int = 8
    batch: int = 2
    features: tuple[int, ...] = (32, 64, 128, 256)
    lr: float = 3e-4
    seed: int = 0
    eval_every: int = 500
    workers: int = 1
    cpus_per_worker: int = 1  # Ray gives a worker this many threads (OMP_NUM_THREADS)
    gpus_per_worker: float = 0.0
    tracking_uri: str = ""
    experiment: str = "ctsynth-seg"

    def __post_init__(self):
        if min(self.iterations, self.batch, self.samples_per_volume, self.eval_every, self.cpus_per_worker) < 1:
            raise ValueError("iterations, batch, samples_per_volume, eval_every and cpus_per_worker must be at least 1")
        if self.patch % 2 ** (len(self.features) - 1):
            raise ValueError(f"patch {self.patch} must be divisible by {2 ** (len(self.features) - 1)} "
                             f"for a {len(self.features)}-level U-Net")  # fmt: skip


def _val_rows(val: str) -> tuple[Path, list[dict]]:
    spec = parse_spec(val)
    return spec.dataset, [row for _, row in select_volumes([spec], 0)]


def _patch_batch(options: TrainSegOptions, volumes, cache, step: int, rank: int, world: int):
    """The batch of global step ``step`` on worker ``rank``: patch j of epoch e is drawn by (seed, e, j) from
    volume order[j // samples_per_volume], so a resumed run draws exactly the same patches."""
    import numpy as np

    from ctsynth_ray.segmentation import sample_patches

    per_epoch = len(volumes) * options.samples_per_volume
    cts, masks = [], []
    for slot in range(options.batch):
        j_global = (step * world + rank) * options.batch + slot
        epoch, j = divmod(j_global, per_epoch)
        order = np.random.default_rng((options.seed, epoch)).permutation(per_epoch)
        dataset, row = volumes[order[j] // options.samples_per_volume]
        volume = cache.get(dataset, row)
        rng = np.random.default_rng((options.seed, epoch, int(order[j])))
        c, m = sample_patches(rng, volume.ct, volume.mask, options.patch, 1, volume.nodule_voxels)
        cts.append(c)
        masks.append(m)
    return np.concatenate(cts)[:, None], np.concatenate(masks)


def _evaluate(model, options: TrainSegOptions, val_dataset: Path, val_rows: list[dict], cache, device, step: int):
    """Segment every validation volume, write RUN/pred and the CSVs; returns (rows, summary, png)."""

    from ctsynth_ray.dataset import read_nifti, write_nifti
    from ctsynth_ray.seg_metrics import volume_scores, write_scores_csv
    from ctsynth_ray.segmentation import segment

    run_dir = Path(options.run_dir)
    rows, shown = [], []
    for row in val_rows:
        volume = cache.get(val_dataset, row)
        ct, mask = volume.ct, volume.mask
        pred = segment(model, ct, options.patch, device)
        affine = read_nifti(val_dataset / row["mask"])[1]
        write_nifti(run_dir / "pred" / f"{row['volume_id']}.nii.gz", pred, affine)
        rows.append({"volume_id": row["volume_id"], **volume_scores(pred, mask)})
        if len(shown) < 3:
            shown.append((row["volume_id"], ct, mask, pred))
    write_scores_csv(run_dir / "metrics.csv", rows)
    csv_path = write_scores_csv(run_dir / "evals" / f"iter-{step:07d}.csv", rows)
    png = _prediction_png(run_dir / "evals" / f"iter-{step:07d}.png", shown)
    return rows, validation_summary(rows), csv_path, png


def validation_summary(rows: list[dict]) -> dict[str, float]:
    """The metrics an evaluation reports: sensitivity, Dice and F2 averaged over the volumes with a nodule,
    accuracy over every volume."""
    import numpy as np

    with_nodule = [r for r in rows if r["nodule_present"]]
    summary = {f"val_{m}": float(np.nanmean([r[m] for r in with_nodule])) if with_nodule else float("nan")
               for m in ("sensitivity", "dice", "f2")}  # fmt: skip
    summary["val_accuracy"] = float(np.mean([r["accuracy"] for r in rows]))
    return summary


def _prediction_png(path: Path, shown) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ctsynth_ray.labels import network_to_hu

    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(3.6 * max(len(shown), 1), 3.8), squeeze=False)
    for ax, (vid, ct, mask, pred) in zip(axes[0], shown):
        z = int(np.argmax(mask.sum(axis=(0, 1)))) if mask.any() else ct.shape[2] // 2
        ax.imshow(network_to_hu(ct[::-1, ::-1, z]).T, cmap="gray", vmin=-1350, vmax=150)
        for outline, colour in ((mask, "red"), (pred, "lime")):
            if outline[:, :, z].any():
                ax.contour(outline[::-1, ::-1, z].T, levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(f"{vid} z={z}\ntruth red, prediction green", fontsize=7)
        ax.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def replica_divergence(model) -> float:
    """The largest difference of any weight between the workers (0.0 when DDP keeps them in step)."""
    import torch
    import torch.distributed as dist

    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    high, low = flat.clone(), -flat
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MAX)
    return float((high + low).max())


def _train_loop(loop_config: dict) -> None:
    import mlflow
    import ray.train
    import ray.train.torch
    import torch

    from ctsynth_ray.segmentation import UNet, VolumeCache, dice_ce_loss, prefetch

    quiet_worker_logs()
    options = TrainSegOptions(**loop_config["options"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    volumes = select_volumes([parse_spec(s) for s in options.train], options.seed)
    val_dataset, val_rows = _val_rows(options.val)
    torch.manual_seed(options.seed)  # the initial weights depend on the seed (DDP copies rank 0's to the others)
    network = UNet(3, 1, 2, tuple(options.features))
    optimizer = torch.optim.Adam(network.parameters(), options.lr)
    step = 0
    state = load_state(device)
    if state is not None:
        network.load_state_dict(state["model"])
        step = int(state["step"])
    model = ray.train.torch.prepare_model(network)  # to the device; DDP when there are several workers
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    cache = VolumeCache()
    run_dir = Path(options.run_dir)
    with attached_run(options.tracking_uri, loop_config["mlflow_run_id"], rank == 0):
        if rank == 0:
            if state is None:
                mlflow.log_params({"train": " + ".join(options.train), "val": options.val,
                                   "iterations": options.iterations, "patch": options.patch,
                                   "samples_per_volume": options.samples_per_volume, "batch": options.batch,
                                   "features": "-".join(map(str, options.features)), "lr": options.lr,
                                   "seed": options.seed, "workers": world, "train_volumes": len(volumes),
                                   "val_volumes": len(val_rows)})  # fmt: skip
            print(f"train-seg: {len(volumes)} training volume(s), {len(val_rows)} validation volume(s), "
                  f"{world} worker(s), iterations {step} -> {options.iterations}", flush=True)  # fmt: skip
        started, first, warm = time.monotonic(), step, None
        batches = prefetch(
            lambda k: _patch_batch(options, volumes, cache, k, rank, world), range(step, options.iterations)
        )
        for ct, mask in batches:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(torch.from_numpy(ct).to(device))
            loss = dice_ce_loss(logits.float(), torch.from_numpy(mask).to(device))
            loss.backward()  # DDP averages the gradients over the workers here
            optimizer.step()
            step += 1
            metrics = {"loss": loss.item(), "step": step}
            if warm is None:
                warm = (time.monotonic(), step)
            elif step == options.iterations:
                metrics["train_steps_per_s"] = (step - warm[1]) / (time.monotonic() - warm[0])
            if rank == 0:
                mlflow.log_metric("loss", metrics["loss"], step=step)
                if step % 10 == 0 or step == options.iterations:
                    print(f"train-seg: iteration {step}/{options.iterations} loss {metrics['loss']:.4f} "
                          f"({(step - first) / (time.monotonic() - started):.2f} it/s)", flush=True)  # fmt: skip
            if step == options.iterations:
                metrics["replica_max_abs_diff"] = replica_divergence(network)
            if step % options.eval_every == 0 or step == options.iterations:
                saved = None
                if rank == 0:
                    _, summary, csv_path, png = _evaluate(network, options, val_dataset, val_rows, cache, device, step)
                    metrics.update(summary)
                    mlflow.log_metrics(summary, step=step)
                    mlflow.log_artifact(str(csv_path), artifact_path="evals")
                    mlflow.log_artifact(str(png), artifact_path="evals")
                    print(f"train-seg: evaluation at {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()),
                          flush=True)  # fmt: skip
                    saved = {"model": network.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
                report(metrics, saved)
        if rank == 0:
            _export(run_dir, network, options, volumes, step)
            mlflow.log_artifact(str(run_dir / "metrics.csv"))
            mlflow.log_artifact(str(run_dir / "model.json"))


def _export(run_dir: Path, network, options: TrainSegOptions, volumes, step: int) -> None:
    """RUN/model.pt + RUN/model.json through the network registry, with what applying the model needs."""
    import numpy as np

    from ctsynth_ray.labels import HU_SCALE
    from ctsynth_ray.models.registry import SEGMENTER_STEM, NetworkSpec, export_network

    spec = NetworkSpec("segmenter", 3, 1, 2, {"features": list(options.features)})
    spacing = np.median([[row[f"spacing_{a}"] for a in "xyz"] for _, row in volumes], axis=0)
    info = {
        "patch": options.patch,
        "hu_normalisation": {"scale": HU_SCALE, "formula": "network = HU / scale"},
        "spacing_mm": [float(v) for v in spacing],
        "training": {"train": list(options.train), "val": options.val, "seed": options.seed},
        "iterations": step,
    }
    export_network(run_dir, SEGMENTER_STEM, network, spec, info)


def train_seg(options: TrainSegOptions, *, resume: bool = False, address: str | None = None, verbose: bool = False):
    """Train on Ray Train; returns the Ray ``Result``. Datasets and specs are checked before Ray starts: a
    training set that leaks the validation set is refused (CtsynthError), and a mixed set whose real part trained
    the GAN gives a CtsynthWarning."""
    volumes = select_volumes([parse_spec(s) for s in options.train], options.seed)
    _, val_rows = _val_rows(options.val)
    check_no_leakage(volumes, val_rows)
    for message in gan_overlap_warnings(volumes):
        warnings.warn(message, CtsynthWarning, stacklevel=2)
    run_dir = check_run_dir(options.run_dir, RAY_RUN_NAME, resume, "model.pt")
    # Ray Train workers run in another working directory: every path they see is absolute.
    absolute = {"run_dir": str(run_dir), "train": tuple(absolute_spec(s) for s in options.train),
                "val": absolute_spec(options.val),
                "tracking_uri": absolute_uri(options.tracking_uri or default_tracking_uri())}  # fmt: skip
    check_run_options(run_dir, {**options.__dict__, **absolute}, resume, MAY_CHANGE)
    with tracked_run(run_dir, absolute["tracking_uri"], options.experiment, resume) as run_id:
        loop_config = {"options": {**options.__dict__, **absolute}, "mlflow_run_id": run_id}
        return fit(_train_loop, loop_config, run_dir, RAY_RUN_NAME, workers=options.workers,
                   cpus_per_worker=options.cpus_per_worker, gpus_per_worker=options.gpus_per_worker,
                   address=address, verbose=verbose)  # fmt: skip
