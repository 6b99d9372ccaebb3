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


#: Display colours and names of the label classes (ctsynth_ray.labels.Tissue order).
LABEL_COLOURS = ("#1b1b3a", "#f2d04b", "#4bb3f2", "#d9534f", "#f7f7f7", "#3df25b", "#000000")
LABEL_NAMES = ("other (air, lung)", "fat", "water", "soft tissue", "bone", "nodule", "outside air")


def write_preview(root: str | Path, png: str | Path, max_volumes: int = 4) -> Path:
    """Write a montage of up to ``max_volumes`` volumes (those with nodules first) to ``png``, atomically.

    Each row is one volume: an axial and a coronal CT slice through its largest nodule (or its centre) in a
    lung window with the mask outlined, and, where a label map exists, its axial slice in colour with a legend.
    Label-only volumes (no image) show the label map alone.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch
    from scipy import ndimage

    root = Path(root)
    rows = sorted(read_manifest(root), key=lambda r: (r["n_nodules"] == 0, r["volume_id"]))[:max_volumes]
    with_images = any(r.get("image") for r in rows)
    with_labels = any(r.get("label") for r in rows)
    n_cols = 2 * with_images + with_labels
    n_rows = max(len(rows), 1)
    fig, axes = plt.subplots(n_rows, max(n_cols, 1), figsize=(4.5 * max(n_cols, 1), 3.6 * n_rows), squeeze=False)
    colours = ListedColormap(LABEL_COLOURS)
    norm = BoundaryNorm(np.arange(len(LABEL_COLOURS) + 1) - 0.5, len(LABEL_COLOURS))
    for ax_row, row in zip(axes, rows):
        mask, spacing = _canonical(root / row["mask"])
        if mask.any():
            labelled, count = ndimage.label(mask)
            largest = 1 + int(np.argmax(ndimage.sum_labels(mask, labelled, range(1, count + 1))))
            _, y, z = np.round(ndimage.center_of_mass(labelled == largest)).astype(int)
        else:
            _, y, z = (s // 2 for s in mask.shape)
        panels = []
        if row.get("image"):
            hu = _canonical(root / row["image"])[0].astype(np.float32)
            panels += [("ct", _axial(hu, z), _axial(mask, z), spacing[1] / spacing[0], f"{row['volume_id']}  axial z={z}"),
                       ("ct", _coronal(hu, y), _coronal(mask, y), spacing[2] / spacing[0], f"coronal y={y}")]  # fmt: skip
        elif with_images:
            panels += [None, None]
        if row.get("label"):
            label = _canonical(root / row["label"])[0]
            panels.append(
                ("label", _axial(label, z), None, spacing[1] / spacing[0], f"{row['volume_id']}  labels z={z}")
            )
        for ax, panel in zip(ax_row, panels):
            if panel is None:
                continue
            kind, image, outline, aspect, title = panel
            if kind == "ct":
                ax.imshow(image, cmap="gray", vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1], aspect=aspect,
                          interpolation="nearest")  # fmt: skip
                if outline.any():
                    ax.contour(outline, levels=[0.5], colors="red", linewidths=0.8)
            else:
                ax.imshow(image, cmap=colours, norm=norm, aspect=aspect, interpolation="nearest")
            ax.set_title(title, fontsize=8)
        for ax in ax_row:
            ax.set_axis_off()
    for ax in axes.ravel()[n_cols * len(rows) :]:
        ax.set_axis_off()
    if with_labels:
        legend = [Patch(facecolor=c, edgecolor="grey", label=f"{k} {name}") for k, (c, name) in
                  enumerate(zip(LABEL_COLOURS, LABEL_NAMES))]  # fmt: skip
        fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"{root.name}: CT in a lung window (L -600, W 1500), nodule mask in red", fontsize=9)
    fig.tight_layout(rect=(0, 0.05 if with_labels else 0, 1, 0.97))
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
