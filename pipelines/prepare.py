"""`ctsynth prepare`: label maps for every volume, the nodule template bank, and the GAN training data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ctsynth_ray.dataset import MANIFEST_NAME, load_volume, read_manifest, staged_dataset, write_manifest, write_nifti
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.gan_data import DESCRIPTION, write_volume_shards
from ctsynth_ray.labels import Tissue, label_map
from ctsynth_ray.nodule_bank import build_template_bank, save_bank
from ctsynth_ray.pipelines.runtime import parallel_map


def _label_task(root: str, row: dict, scheme: str) -> str:
    volume = load_volume(root, row)
    if volume.hu is None:
        raise CtsynthError(f"{row['volume_id']}: no image to make a label map from")
    relative = f"labels/{row['volume_id']}.nii.gz"
    write_nifti(Path(root) / relative, label_map(volume.hu, volume.mask, scheme), volume.affine)
    return relative


def write_label_maps(dataset: Path, scheme: str, *, workers: int = 1, address: str | None = None,
                     progress: bool = True) -> list[dict]:  # fmt: skip
    """Write ``labels/<id>.nii.gz`` for every volume with an image and record them (``label``,
    ``label_scheme``) in the manifest; returns the updated rows."""
    rows = read_manifest(dataset)
    todo = [r for r in rows if r.get("image")]
    paths = parallel_map(_label_task, [(str(dataset), r, scheme) for r in todo], workers=workers, address=address,
                         description="label maps", progress=progress)  # fmt: skip
    for row, path in zip(todo, paths):
        row["label"] = path
        row["label_scheme"] = scheme
    write_manifest(dataset, rows)
    return rows


def _shard_task(out: str, dataset: str, row: dict, part: str, kinds, size, stack_slices, air_label):
    return write_volume_shards(Path(out), part, load_volume(dataset, row), kinds, size, stack_slices, air_label)


def prepare(
    dataset: Path,
    out: Path,
    *,
    scheme: str = "body",
    size: int = 128,
    kinds: list[str] = ("2d", "2p5d", "3d"),
    stack_slices: int = 3,
    n_templates: int | None = 15,
    seed: int = 0,
    workers: int = 1,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Label maps into ``dataset``, then the template bank and GAN data into ``out``; returns the description."""
    dataset = Path(dataset).resolve()  # Ray workers may run in another working directory
    if stack_slices < 1 or stack_slices % 2 == 0:
        raise CtsynthError(f"--stack-slices must be odd and positive, got {stack_slices}")
    rows = write_label_maps(dataset, scheme, workers=workers, address=address, progress=progress)
    parts = {"train": "train", "test": "val"}
    chosen = [r for r in rows if r["split"] in parts and r["n_nodules"] and r.get("image")]
    if not any(r["split"] == "train" for r in chosen):
        raise CtsynthError(f"{dataset}: no train volume with nodules: nothing to train a GAN on")
    air = Tissue.OUTSIDE_AIR if scheme == "body" else Tissue.OTHER
    with staged_dataset(out, overwrite=overwrite, subfolders=("train", "val")) as stage:
        bank = build_template_bank(dataset, n_templates, seed)
        save_bank(bank, stage / "nodule_bank.parquet")
        counts = parallel_map(
            _shard_task,
            [(str(stage), str(dataset), r, parts[r["split"]], list(kinds), size, stack_slices, int(air)) for r in chosen],
            workers=workers, address=address, description="GAN data", progress=progress,
        )  # fmt: skip
        totals = {part: {kind: 0 for kind in kinds} for part in ("train", "val")}
        for row, count in zip(chosen, counts):
            for kind, n in count.items():
                totals[parts[row["split"]]][kind] += n
        description = {
            "source_dataset": str(Path(dataset).resolve()),
            "fingerprint": hashlib.sha256((Path(dataset) / MANIFEST_NAME).read_bytes()).hexdigest()[:16],
            "scheme": scheme,
            "size": size,
            "kinds": list(kinds),
            "stack_slices": stack_slices,
            "hu_scale": 2000.0,
            "counts": totals,
            "volumes": {
                part: [r["volume_id"] for r in chosen if parts[r["split"]] == part] for part in ("train", "val")
            },
            "templates": [{"template_id": t.template_id, "diameter_mm": round(t.diameter_mm, 2)} for t in bank],
        }
        (stage / DESCRIPTION).write_text(json.dumps(description, indent=2))
    return description
