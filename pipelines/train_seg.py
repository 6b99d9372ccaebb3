"""`ctsynth train-seg`: the 3D U-Net nodule segmenter on Ray Train, evaluated on whole real volumes, in MLflow.

Run folder::

    RUN/model.pt, RUN/model.json     the segmenter (state dict + architecture, patch size)
    RUN/pred/<volume_id>.nii.gz      predicted masks of the validation volumes (latest evaluation)
    RUN/metrics.csv                  per-volume scores of the latest evaluation (ctsynth score's columns)
    RUN/evals/iter-<iteration>.csv   every evaluation's scores, and iter-<iteration>.png: predictions vs truth
    RUN/ray/                         Ray Train's checkpoints (one per evaluation)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ctsynth_ray.pipelines.tracking import absolute_uri, default_tracking_uri
from ctsynth_ray.pipelines.training import check_run_dir, fit, load_state, report, start_tracked_run
from ctsynth_ray.segmentation import absolute_spec, parse_spec, select_volumes

RAY_RUN_NAME = "train-seg"


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
    import numpy as np

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
    with_nodule = [r for r in rows if r["nodule_present"]]
    summary = {f"val_{m}": float(np.nanmean([r[m] for r in with_nodule])) if with_nodule else float("nan")
               for m in ("sensitivity", "dice", "f2")}  # fmt: skip
    summary["val_accuracy"] = float(np.mean([r["accuracy"] for r in rows]))
    png = _prediction_png(run_dir / "evals" / f"iter-{step:07d}.png", shown)
    return rows, summary, csv_path, png


def _prediction_png(path: Path, shown) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(3.6 * max(len(shown), 1), 3.8), squeeze=False)
    for ax, (vid, ct, mask, pred) in zip(axes[0], shown):
        z = int(np.argmax(mask.sum(axis=(0, 1)))) if mask.any() else ct.shape[2] // 2
        ax.imshow((ct[::-1, ::-1, z] * 2000).T, cmap="gray", vmin=-1350, vmax=150)
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


def _train_loop(loop_config: dict) -> None:
    import mlflow
    import ray.train
    import ray.train.torch
    import torch

    from ctsynth_ray.models.gan import average_gradients
    from ctsynth_ray.segmentation import UNet, VolumeCache, dice_ce_loss, prefetch

    options = TrainSegOptions(**loop_config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    volumes = select_volumes([parse_spec(s) for s in options.train], options.seed)
    val_dataset, val_rows = _val_rows(options.val)
    torch.manual_seed(options.seed)
    model = UNet(3, 1, 2, tuple(options.features)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), options.lr)
    step = 0
    state = load_state(device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
    cache = VolumeCache()
    run_dir = Path(options.run_dir)
    if rank == 0:
        start_tracked_run(run_dir, options.tracking_uri, options.experiment, state is not None,
                          {"train": " + ".join(options.train), "val": options.val, "iterations": options.iterations,
                           "patch": options.patch, "samples_per_volume": options.samples_per_volume,
                           "batch": options.batch, "features": "-".join(map(str, options.features)),
                           "lr": options.lr, "seed": options.seed, "workers": world,
                           "train_volumes": len(volumes), "val_volumes": len(val_rows)})  # fmt: skip
        print(f"train-seg: {len(volumes)} training volume(s), {len(val_rows)} validation volume(s), "
              f"{world} worker(s), iterations {step} -> {options.iterations}", flush=True)  # fmt: skip
    started, first, warm = time.monotonic(), step, None
    batches = prefetch(lambda k: _patch_batch(options, volumes, cache, k, rank, world), range(step, options.iterations))
    for ct, mask in batches:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(torch.from_numpy(ct).to(device))
        loss = dice_ce_loss(logits.float(), torch.from_numpy(mask).to(device))
        loss.backward()
        average_gradients([model])
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
        if step % options.eval_every == 0 or step == options.iterations:
            saved = None
            if rank == 0:
                _, summary, csv_path, png = _evaluate(model, options, val_dataset, val_rows, cache, device, step)
                metrics.update(summary)
                mlflow.log_metrics(summary, step=step)
                mlflow.log_artifact(str(csv_path), artifact_path="evals")
                mlflow.log_artifact(str(png), artifact_path="evals")
                print(f"train-seg: evaluation at {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()),
                      flush=True)  # fmt: skip
                saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
            report(metrics, saved)
    if rank == 0:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, run_dir / "model.pt")
        (run_dir / "model.json").write_text(json.dumps({"architecture": "unet", "spatial_dims": 3, "in_channels": 1,
                                                        "out_channels": 2, "features": list(options.features),
                                                        "patch": options.patch, "hu_scale": 2000.0,
                                                        "iterations": step}, indent=2))  # fmt: skip
        mlflow.log_artifact(str(run_dir / "metrics.csv"))
        mlflow.log_artifact(str(run_dir / "model.json"))
        mlflow.end_run()


def train_seg(options: TrainSegOptions, *, resume: bool = False, address: str | None = None):
    """Train on Ray Train; returns the Ray ``Result``. Datasets and specs are checked before Ray starts."""
    select_volumes([parse_spec(s) for s in options.train], options.seed)
    _val_rows(options.val)
    run_dir = check_run_dir(options.run_dir, RAY_RUN_NAME, resume, "model.pt")
    # Ray Train workers run in another working directory: every path they see is absolute.
    absolute = {"run_dir": str(run_dir), "train": tuple(absolute_spec(s) for s in options.train),
                "val": absolute_spec(options.val),
                "tracking_uri": absolute_uri(options.tracking_uri or default_tracking_uri())}  # fmt: skip
    return fit(_train_loop, {**options.__dict__, **absolute}, run_dir, RAY_RUN_NAME,
               workers=options.workers, cpus_per_worker=options.cpus_per_worker,
               gpus_per_worker=options.gpus_per_worker, address=address)  # fmt: skip
