"""Validation of a label-to-CT generator on held-out pairs, and the PNG grid (label | generated | real)."""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ctsynth_ray.image_metrics import interslice_difference, mae_hu, psnr_hu, ssim_hu
from ctsynth_ray.labels import network_to_hu


def batch(pairs, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack items of a :class:`ctsynth_ray.gan_data.GanPairs` into (label, ct) batches."""
    items = [pairs[int(k)] for k in indices]
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])


def generate_hu(generate, pairs, indices, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Generated and real HU (int16 arrays, channel dropped) for ``indices``; ``generate`` maps a label batch
    to CT (HU / 2000)."""
    fakes, reals = [], []
    for start in range(0, len(indices), chunk):
        label, ct = batch(pairs, indices[start : start + chunk])
        fakes.append(network_to_hu(generate(label).numpy()[:, 0]))
        reals.append(network_to_hu(ct.numpy()[:, 0]))
    return np.concatenate(fakes), np.concatenate(reals)


def validate(generate, pairs, max_items: int = 32) -> dict[str, float]:
    """MAE and PSNR (HU), SSIM over up to ``max_items`` held-out pairs; for slice-wise pairs also the
    inter-slice consistency of restacked runs of adjacent slices of one crop: ``interslice_generated`` against
    ``interslice_real`` (mean |slice z+1 - slice z| in HU) and their ratio."""
    indices = np.arange(min(len(pairs), max_items))
    fake, real = generate_hu(generate, pairs, indices)
    metrics = {
        "val_mae_hu": float(np.mean([mae_hu(f, r) for f, r in zip(fake, real)])),
        "val_psnr_db": float(np.mean([psnr_hu(f, r) for f, r in zip(fake, real)])),
        "val_ssim": float(np.mean([ssim_hu(f, r) for f, r in zip(fake, real)])),
    }
    if fake.ndim == 3:  # 2D / 2.5D: restack runs of adjacent slices of one crop
        runs = defaultdict(list)
        for k in indices:
            runs[pairs.volume_ids[k], pairs.crops[k]].append((pairs.z[k], k))
        gen_diffs, real_diffs = [], []
        for members in runs.values():
            members.sort()
            for (z0, a), (z1, b) in itertools.pairwise(members):
                if z1 == z0 + 1:
                    gen_diffs.append(interslice_difference(np.stack([fake[a], fake[b]], axis=2)))
                    real_diffs.append(interslice_difference(np.stack([real[a], real[b]], axis=2)))
        if gen_diffs:
            metrics["interslice_generated"] = float(np.mean(gen_diffs))
            metrics["interslice_real"] = float(np.mean(real_diffs))
            metrics["interslice_ratio"] = metrics["interslice_generated"] / max(metrics["interslice_real"], 1e-6)
    return metrics


def write_sample_grid(path: str | Path, generate, pairs, n: int = 4) -> Path:
    """A PNG of ``n`` held-out pairs: label input (centre slice) | generated CT | real CT (lung window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    indices = np.linspace(0, len(pairs) - 1, min(n, len(pairs))).astype(int)
    fake, real = generate_hu(generate, pairs, indices)
    fig, axes = plt.subplots(len(indices), 3, figsize=(7.5, 2.6 * len(indices)), squeeze=False)
    for row, k in enumerate(indices):
        label = pairs.labels[k]
        label = label[label.shape[0] // 2] if label.ndim == 3 and fake.ndim == 3 else label
        if label.ndim == 3:  # 3D: show the centre axial slice of everything
            label, f, r = (
                label[:, :, label.shape[2] // 2],
                fake[row][:, :, label.shape[2] // 2],
                real[row][:, :, label.shape[2] // 2],
            )
        else:
            f, r = fake[row], real[row]
        for ax, image, title, kwargs in (
            (axes[row, 0], label, "label", {"cmap": "tab10", "vmin": 0, "vmax": 9}),
            (axes[row, 1], f, "generated", {"cmap": "gray", "vmin": -1350, "vmax": 150}),
            (axes[row, 2], r, "real", {"cmap": "gray", "vmin": -1350, "vmax": 150}),
        ):
            ax.imshow(image.T[::-1, ::-1], interpolation="nearest", **kwargs)
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path
