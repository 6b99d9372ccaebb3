"""Training slices/s of the 2D CycleGAN through Ray Train (one worker) against a plain single-process PyTorch
loop of the same model and data, in the same run.

    .venv/bin/python benchmarks/train_gan_ray_overhead.py [--steps 40] [--batch 4]

Both run one thread (a Ray Train worker with 1 CPU gets OMP_NUM_THREADS=1) on GAN data prepared from
phantoms (128x128 slices), the thesis generator (32-64-128, 6 residual blocks). Rates are measured after the
first step. Prints both rates and Ray's overhead; the target is under 10 %.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ctsynth_ray.gan_data import GanPairs
from ctsynth_ray.models.gan import GanConfig, GanTrainer, epoch_batches
from ctsynth_ray.models.validation import batch
from ctsynth_ray.pipelines.phantoms import make_phantom_dataset
from ctsynth_ray.pipelines.prepare import prepare
from ctsynth_ray.pipelines.runtime import RayOptions
from ctsynth_ray.pipelines.train_gan import TrainGanOptions, train_gan

QUIET = RayOptions(progress=False)


def plain_loop(gandata: Path, config: GanConfig, steps: int) -> float:
    torch.set_num_threads(1)
    pairs = GanPairs(gandata, "train", "2d")
    spe = len(epoch_batches(len(pairs), config.batch, 0, config.seed))
    trainer = GanTrainer(config, 2, 1, 1, spe)
    start = None
    while trainer.step < steps:
        epoch, k = divmod(trainer.step, spe)
        label, ct = batch(pairs, epoch_batches(len(pairs), config.batch, epoch, config.seed)[k])
        unpaired = batch(pairs, epoch_batches(len(pairs), config.batch, epoch, config.seed, stream=1)[k])[1]
        trainer.train_step(label, ct, unpaired)
        if start is None:
            start = (time.monotonic(), trainer.step)
    return (trainer.step - start[1]) / (time.monotonic() - start[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    config = GanConfig(model="cyclegan", batch=args.batch, epochs=100, decay_epochs=100)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_phantom_dataset(tmp / "ds", 6, seed=0, split_fractions=(1.0, 0.0, 0.0), ray_options=QUIET)
        prepare(tmp / "ds", tmp / "gan", kinds=["2d"], ray_options=QUIET)
        plain = plain_loop(tmp / "gan", config, args.steps)
        options = TrainGanOptions(gandata=str(tmp / "gan"), run_dir=str(tmp / "run"), steps=args.steps,
                                  checkpoint_every=args.steps, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                                  log_every=args.steps)  # fmt: skip
        ray_rate = train_gan(options, config).metrics["train_steps_per_s"]
    print(f"2D CycleGAN (32-64-128, 6 blocks), batch {args.batch}, 128x128, 1 thread, {args.steps} steps:")
    print(f"  plain PyTorch loop   {plain * args.batch:6.2f} slices/s")
    print(f"  Ray Train, 1 worker  {ray_rate * args.batch:6.2f} slices/s  (MLflow logging every step included)")
    print(f"  Ray overhead         {1 - ray_rate / plain:6.1%}  (target < 10 %)")


if __name__ == "__main__":
    main()
