"""`ctsynth segment`: apply a trained U-Net to whole CT volumes, one Ray task per volume.

Writes ``PRED/<volume_id>.nii.gz`` (uint8 masks) on each volume's own grid, ready for ``ctsynth score``. PRED is
built in a staging folder and renamed into place, so a failed run leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctsynth_ray.dataset import load_volume, read_manifest, staged_dataset, write_nifti
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.labels import HU_SCALE
from ctsynth_ray.pipelines.runtime import RayOptions, parallel_map
from ctsynth_ray.storage import as_text, local_copy, location, resolved

SPACING_TOLERANCE = 0.05  # relative: a volume on another grid than the model's training data is refused


_MODELS: dict[str, tuple] = {}  # per process: a Ray worker loads a model once for all the volumes it segments


def _segment_task(model_run: str, dataset: str, row: dict, out: str) -> str:
    import torch

    from ctsynth_ray.labels import hu_to_network
    from ctsynth_ray.models.registry import load_segmenter
    from ctsynth_ray.segmentation import segment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if model_run not in _MODELS:  # an object-store run: this node's copy
        _MODELS[model_run] = load_segmenter(local_copy(model_run, "train-seg run"), device)
    model, info = _MODELS[model_run]
    volume = load_volume(dataset, row)  # a folder or an object-store URI, read where the task runs
    pred = segment(model, hu_to_network(volume.hu), info["patch"], device)
    write_nifti(location(out) / f"{row['volume_id']}.nii.gz", pred, volume.affine)
    return row["volume_id"]


def segment_dataset(model_run: Path | str, dataset: Path | str, out: Path | str, *, split: str | None = None,
                    ray_options: RayOptions = RayOptions()) -> list[str]:  # fmt: skip
    """Segment every volume with an image of ``dataset`` (of ``split`` when given) with the U-Net of
    ``model_run``; returns the volume ids written. CtsynthError, one line per volume, for volumes whose voxel
    size differs from the model's training data."""
    from ctsynth_ray.models.registry import load_segmenter

    model_run, dataset = resolved(model_run), resolved(dataset)  # folders or object-store URIs
    _, info = load_segmenter(local_copy(model_run, "train-seg run"))  # a clear error before any work
    scale = info.get("hu_normalisation", {}).get("scale")
    if scale != HU_SCALE:
        raise CtsynthError(f"{model_run / 'model.json'}: trained on CT scaled by 1/{scale}, ctsynth scales by "
                           f"1/{HU_SCALE:g}")  # fmt: skip
    rows = [r for r in read_manifest(dataset) if r.get("image") and (split is None or r["split"] == split)]
    if not rows:
        raise CtsynthError(f"{dataset}: no volume with an image{f' in split {split}' if split else ''}")
    trained = np.asarray(info["spacing_mm"], float)
    problems = []
    for row in rows:
        spacing = np.array([row[f"spacing_{a}"] for a in "xyz"], float)
        if np.any(np.abs(spacing / trained - 1) > SPACING_TOLERANCE):
            problems.append(f"{row['volume_id']}: voxel size {' x '.join(f'{v:g}' for v in spacing)} mm, but the model "
                            f"was trained at {' x '.join(f'{v:g}' for v in trained)} mm (re-ingest with --spacing)")  # fmt: skip
    if problems:
        raise CtsynthError("\n".join(problems))
    with staged_dataset(out, overwrite=ray_options.overwrite, subfolders=()) as stage:
        arguments = [(as_text(model_run), as_text(dataset), row, as_text(stage)) for row in rows]
        return parallel_map(_segment_task, arguments, ray_options, description="segment")
