"""U-Net training steps per second on a GPU (the plain model step and ctsynth's whole loop with its data
pipeline) and sliding-window inference per volume.

    PYTHONPATH=. python3 benchmarks/unet_step_gpu.py [--steps 50]

3D U-Net 32-64-128-256, batch 2 of 96^3 patches, bf16 autocast, Adam, Dice + cross-entropy. "plain" feeds the
same tensors every step; "with data" draws every batch with ctsynth's balanced patch sampler
(``sample_patches``, in a prefetch thread) from decoded volumes held in memory (the VolumeCache's job) of
512 x 512 x 300, as the Ray Train loop does. The goal: 100,000 iterations in about 75 minutes (23 steps/s).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ctsynth_ray.segmentation import UNet, dice_ce_loss, prefetch, sample_patches, segment

GOAL_ITERATIONS = 100_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--patch", type=int, default=96)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = UNet(3, 1, 2).to(device)
    optimizer = torch.optim.Adam(model.parameters(), 3e-4)
    rng = np.random.default_rng(0)
    volumes = []
    for _ in range(2):
        ct = (rng.standard_normal((512, 512, 300), dtype=np.float32) * 0.1).astype(np.float32)
        mask = np.zeros(ct.shape, np.uint8)
        mask[200:220, 240:260, 100:115] = 1
        volumes.append((ct, mask, np.argwhere(mask)))  # as the VolumeCache holds them

    def step(ct: torch.Tensor, mask: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ct)
        loss = dice_ce_loss(logits.float(), mask)
        loss.backward()
        optimizer.step()
        return loss

    def draw(k: int):
        ct, mask, nodule_voxels = volumes[k % len(volumes)]
        c, m = sample_patches(np.random.default_rng((0, k)), ct, mask, args.patch, args.batch, nodule_voxels)
        return torch.from_numpy(c[:, None]).to(device, non_blocking=True), torch.from_numpy(m).to(device)

    fixed = draw(0)
    for _ in range(5):
        step(*fixed)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(*fixed)
    torch.cuda.synchronize()
    plain = args.steps / (time.perf_counter() - start)
    start = time.perf_counter()
    for batch in prefetch(draw, range(args.steps)):  # as the Ray Train loop: sampling overlaps the step
        step(*batch)
    torch.cuda.synchronize()
    loop = args.steps / (time.perf_counter() - start)
    start = time.perf_counter()
    segment(model, volumes[0][0], args.patch, device)  # sliding window, 50 % overlap, Gaussian weights
    torch.cuda.synchronize()
    inference = time.perf_counter() - start
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; 3D U-Net 32-64-128-256, "
          f"batch {args.batch} x {args.patch}^3, bf16")  # fmt: skip
    for name, rate in (("plain step", plain), ("with data (sampler)", loop)):
        print(
            f"  {name:<20} {rate:6.2f} steps/s: {GOAL_ITERATIONS} iterations in {GOAL_ITERATIONS / rate / 60:5.0f} min"
        )
    print(f"  sliding-window inference of a 512 x 512 x 300 volume: {inference:.1f} s")


if __name__ == "__main__":
    main()
