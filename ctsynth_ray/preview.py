"""A PNG montage of a dataset: axial and coronal slices in a lung window with the nodule mask outlined."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np

from ctsynth_ray.dataset import read_manifest

LUNG_WINDOW_HU = (-1350.0, 150.0)  # level -600, width 1500


def _canonical(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Array reoriented to RAS+ (so the display convention below holds for any affine) and its spacing."""
    image = nib.as_closest_canonical(nib.load(path))
    return np.asarray(image.dataobj), tuple(float(z) for z in image.header.get_zooms()[:3])


def _axial(volume: np.ndarray, z: int) -> np.ndarray:
    # Radiological display: anterior at the top, the patient's right on the viewer's left.
    return volume[::-1, ::-1, z].T


def _coronal(volume: np.ndarray, y: int) -> np.ndarray:
    # Superior at the top, the patient's right on the viewer's left.
    return volume[::-1, y, ::-1].T


def write_preview(root: str | Path, png: str | Path, max_volumes: int = 4) -> Path:
    """Write a montage of up to ``max_volumes`` volumes (those with nodules first) to ``png``, atomically.

    Each row is one volume: an axial and a coronal slice through its largest nodule (or its centre).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    rows = [r for r in read_manifest(root) if r.get("image")]
    rows.sort(key=lambda r: (r["n_nodules"] == 0, r["volume_id"]))
    rows = rows[:max_volumes]
    fig, axes = plt.subplots(max(len(rows), 1), 2, figsize=(9, 3.6 * max(len(rows), 1)), squeeze=False)
    for (ax_axial, ax_coronal), row in zip(axes, rows):
        hu, spacing = _canonical(root / row["image"])
        hu = hu.astype(np.float32)
        mask = _canonical(root / row["mask"])[0]
        if mask.any():
            from scipy import ndimage

            labelled, count = ndimage.label(mask)
            largest = 1 + int(np.argmax(ndimage.sum_labels(mask, labelled, range(1, count + 1))))
            x, y, z = np.round(ndimage.center_of_mass(labelled == largest)).astype(int)
        else:
            x, y, z = (s // 2 for s in hu.shape)
        for ax, image, outline, aspect, title in (
            (ax_axial, _axial(hu, z), _axial(mask, z), spacing[1] / spacing[0], f"{row['volume_id']}  axial z={z}"),
            (ax_coronal, _coronal(hu, y), _coronal(mask, y), spacing[2] / spacing[0], f"coronal y={y}"),
        ):
            ax.imshow(image, cmap="gray", vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1], aspect=aspect,
                      interpolation="nearest")  # fmt: skip
            if outline.any():
                ax.contour(outline, levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    for ax in axes.ravel()[2 * len(rows) :]:
        ax.set_axis_off()
    fig.suptitle(f"{root.name}: lung window (L -600, W 1500), nodule mask in red", fontsize=9)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    temp = png.with_name(f".{uuid.uuid4().hex[:8]}.tmp.{png.name}")
    try:
        fig.savefig(temp, dpi=80, format="png")
        os.replace(temp, png)
    finally:
        plt.close(fig)
        temp.unlink(missing_ok=True)
    return png
