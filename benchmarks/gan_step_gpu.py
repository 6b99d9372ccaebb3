"""The GAN training step on a GPU: slices/s of the thesis' 2D CycleGAN (and pix2pix) in bf16 autocast with
channels-last, against fp32, and the projection for the thesis' 200 epochs over 8156 slices.

    PYTHONPATH=. python3 benchmarks/gan_step_gpu.py [--batch 32] [--steps 30]

Needs only torch and numpy (it runs where ray, nibabel and mlflow are not installed): the step is
``ctsynth_ray.models.gan.GanTrainer.train_step``, the one the Ray Train loop calls, on random 128x128 data.
"""

from __future__ import annotations

import argparse
import time

import torch

from ctsynth_ray.models.gan import GanConfig, GanTrainer

THESIS_SLICES, THESIS_EPOCHS = 8156, 200


def rate(model: str, batch: int, steps: int, bf16: bool) -> float:
    config = GanConfig(model=model, batch=batch)
    trainer = GanTrainer(config, 2, 1, 1, steps_per_epoch=1000, device="cuda")
    trainer.autocast = bf16
    label = torch.rand(batch, 1, 128, 128, device="cuda") * 2 - 1
    ct = torch.rand(batch, 1, 128, 128, device="cuda") - 0.5
    for _ in range(5):
        losses = trainer.train_step(label, ct, ct.flip(0))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        losses = trainer.train_step(label, ct, ct.flip(0))
    torch.cuda.synchronize()
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for model in ("cyclegan", "pix2pix"):
        fp32 = rate(model, args.batch, args.steps, bf16=False)
        bf16 = rate(model, args.batch, args.steps, bf16=True)
        hours = THESIS_EPOCHS * THESIS_SLICES / bf16 / 3600
        print(f"{model:9s} batch {args.batch}: fp32 {fp32:7.0f} slices/s, bf16 + channels-last {bf16:7.0f} slices/s "
              f"({bf16 / fp32:.2f}x); 200 epochs x 8156 slices: {hours:.2f} h (thesis: 30 h; goal < 1 h)")  # fmt: skip


if __name__ == "__main__":
    main()
