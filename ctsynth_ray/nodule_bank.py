"""The nodule template bank: nodules (>= 3 mm) cut from the train split with their label and CT neighbourhood.

The thesis pasted one of 15 such templates into each new label volume; ``n_templates=None`` keeps all.
A bank is stored as one Parquet file (one row per template, arrays as bytes with their shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import ndimage

from ctsynth_ray.dataset import Volume, load_volume, read_manifest, spacing_from_affine, write_parquet
from ctsynth_ray.errors import CtsynthError

MIN_DIAMETER_MM = 3.0
MARGIN_VOX = 3  # neighbourhood kept around each nodule


@dataclass
class NoduleTemplate:
    """One nodule: ``mask`` (uint8, the nodule alone), ``label`` and ``hu`` of its neighbourhood, all (x, y, z)."""

    template_id: str
    source_volume_id: str
    diameter_mm: float
    mask: np.ndarray
    label: np.ndarray
    hu: np.ndarray


def train_rows(root: str | Path) -> list[dict]:
    """The train split's rows; CtsynthError when there are none."""
    rows = [r for r in read_manifest(root) if r["split"] == "train"]
    if not rows:
        raise CtsynthError(f"{root}: the train split is empty")
    return rows


def nodule_components(mask: np.ndarray, margin_vox: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """26-connected components of nodule ``mask`` (x, y, z), labelled in its bounding box grown by ``margin_vox``
    (clipped to the volume) instead of the whole volume: nodules are small, an int32 label per voxel of an adult
    chest CT is 720 MB. Returns (the box's first voxel, int32 labels of the box, count); the numbering is a
    whole-volume ``ndimage.label``'s (by first voxel in C order). An empty mask gives count 0 and an empty box.
    """
    mask = np.asarray(mask)
    # z first: the x and y extents then only look at the slices with nodule.
    z = np.flatnonzero(mask.any(axis=(0, 1)))
    if not len(z):
        return np.zeros(3, int), np.zeros((0, 0, 0), np.int32), 0
    slab = mask[:, :, z[0] : z[-1] + 1]
    x, y = np.flatnonzero(slab.any(axis=(1, 2))), np.flatnonzero(slab.any(axis=(0, 2)))
    lo = np.array([max(p[0] - margin_vox, 0) for p in (x, y, z)])
    hi = np.array([min(p[-1] + 1 + margin_vox, n) for p, n in zip((x, y, z), mask.shape)])
    labelled, count = ndimage.label(mask[tuple(map(slice, lo, hi))] > 0, structure=np.ones((3, 3, 3), bool))
    return lo, labelled, count


def volume_templates(volume: Volume) -> list[NoduleTemplate]:
    """One volume's template candidates: each nodule component >= 3 mm (26-connected), in label order (by first
    voxel in C order), with its label map and HU ``MARGIN_VOX`` around. Raises CtsynthError when ``volume`` has no
    HU or no label map."""
    if volume.label is None or volume.hu is None:
        raise CtsynthError(f"{volume.volume_id}: needs an image and a label map (run `ctsynth prepare` first)")
    voxel_mm3 = float(np.prod(spacing_from_affine(volume.affine)))
    origin, labelled, count = nodule_components(volume.mask, MARGIN_VOX)
    if not count:
        return []
    candidates = []
    for k, box in enumerate(ndimage.find_objects(labelled), start=1):
        component = labelled[box] == k
        diameter = float((6 * component.sum() * voxel_mm3 / np.pi) ** (1 / 3))
        if diameter < MIN_DIAMETER_MM:
            continue
        # Clipping to the box is clipping to the volume: the box has the margin already, where the volume has it.
        grown = tuple(
            slice(max(s.start - MARGIN_VOX, 0), min(s.stop + MARGIN_VOX, n)) for s, n in zip(box, labelled.shape)
        )
        where = tuple(slice(g.start + o, g.stop + o) for g, o in zip(grown, origin))
        candidates.append(
            NoduleTemplate(
                template_id=f"{volume.volume_id}#{k}",
                source_volume_id=volume.volume_id,
                diameter_mm=diameter,
                mask=(labelled[grown] == k).astype(np.uint8),
                label=volume.label[where].copy(),
                hu=volume.hu[where].copy(),
            )
        )
    return candidates


def choose_templates(
    candidates: list[NoduleTemplate], n_templates: int | None, seed: int, where: str | Path
) -> list[NoduleTemplate]:
    """``n_templates`` of ``candidates`` chosen by ``seed`` (all when None), in their order. The choice depends on
    the order: pass the train split's candidates in manifest order, each volume's as :func:`volume_templates`
    gives them. Raises CtsynthError naming ``where`` (the dataset) when there are none."""
    if not candidates:
        raise CtsynthError(
            f"{where}: no nodule >= {MIN_DIAMETER_MM:g} mm in the train split (the template bank is empty)"
        )
    if n_templates is None or n_templates >= len(candidates):
        return candidates
    chosen = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,))).choice(
        len(candidates), n_templates, replace=False
    )
    return [candidates[k] for k in sorted(chosen)]


def build_template_bank(root: str | Path, n_templates: int | None = 15, seed: int = 0) -> list[NoduleTemplate]:
    """Cut every nodule component >= 3 mm of the train split of the dataset at ``root`` (label maps must exist),
    then keep ``n_templates`` of them chosen by ``seed`` (all when None): :func:`volume_templates` of each train
    volume with nodules, in manifest order, then :func:`choose_templates`. Raises CtsynthError when there are none.
    """
    candidates = [
        template
        for row in train_rows(root)
        if row["n_nodules"]
        for template in volume_templates(load_volume(root, row))
    ]
    return choose_templates(candidates, n_templates, seed, root)


def augment_template(template: NoduleTemplate, rng: np.random.Generator) -> np.ndarray:
    """A random variant of a template's mask: flips on every axis, a 90-degree turn in the axial plane (the
    grid is anisotropic across planes), and a scale within +-20 %. Returns a uint8 mask."""
    mask = template.mask
    for axis in range(3):
        if rng.random() < 0.5:
            mask = np.flip(mask, axis)
    mask = np.rot90(mask, k=int(rng.integers(4)), axes=(0, 1))
    scale = rng.uniform(0.8, 1.2)
    scaled = ndimage.zoom(mask.astype(np.float32), scale, order=1) >= 0.5
    return (scaled if scaled.any() else mask > 0).astype(np.uint8)


def save_bank(bank: list[NoduleTemplate], path: str | Path) -> Path:
    """Write a bank as Parquet: provenance, size, and the arrays as bytes with their shape."""
    path = Path(path)
    rows = [
        {
            "template_id": t.template_id,
            "source_volume_id": t.source_volume_id,
            "diameter_mm": t.diameter_mm,
            "shape": list(t.mask.shape),
            "mask": t.mask.tobytes(),
            "label": t.label.tobytes(),
            "hu": t.hu.astype(np.int16).tobytes(),
        }
        for t in bank
    ]
    write_parquet(path, pa.Table.from_pylist(rows))
    return path


def load_bank(path: str | Path) -> list[NoduleTemplate]:
    """Read a bank written by :func:`save_bank`; CtsynthError naming the file when it is not one, or is empty."""
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise CtsynthError(f"{path}: not a readable template bank ({exc})") from None
    missing = {"template_id", "source_volume_id", "diameter_mm", "shape", "mask", "label", "hu"} - set(
        rows[0] if rows else {}
    )
    if not rows or missing:
        raise CtsynthError(
            f"{path}: not a template bank ({'no templates' if not rows else 'no ' + ', '.join(sorted(missing))})"
        )
    bank = []
    for row in rows:
        shape = tuple(row["shape"])
        bank.append(
            NoduleTemplate(
                template_id=row["template_id"],
                source_volume_id=row["source_volume_id"],
                diameter_mm=row["diameter_mm"],
                mask=np.frombuffer(row["mask"], np.uint8).reshape(shape).copy(),
                label=np.frombuffer(row["label"], np.uint8).reshape(shape).copy(),
                hu=np.frombuffer(row["hu"], np.int16).reshape(shape).copy(),
            )
        )
    return bank
