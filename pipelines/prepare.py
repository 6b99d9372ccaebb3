"""`ctsynth prepare`: label maps for every volume, the nodule template bank, and the GAN training data.

It records what it did in the dataset (``DATASET/prepare.json``): the GAN data folder, the template bank that
``synth-labels`` and ``generate`` use by default, and which split (and volumes) trained the GAN, so that
``train-seg`` can warn when a mixed set-up's real part overlaps the GAN's training data.
"""

from __future__ import annotations

import json
from pathlib import Path

from ctsynth_ray.dataset import (
    PREPARE_RECORD,
    dataset_fingerprint,
    load_volume,
    read_manifest,
    staged_dataset,
    write_json,
    write_manifest,
    write_nifti,
)
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.gan_data import CROPS, DESCRIPTION, write_volume_shards
from ctsynth_ray.labels import HU_SCALE, Tissue, label_map
from ctsynth_ray.nodule_bank import build_template_bank, save_bank
from ctsynth_ray.pipelines.runtime import RayOptions, parallel_map

BANK_NAME = "nodule_bank.parquet"
#: Which split of the dataset trains the GAN, and which gives its held-out validation pairs.
GAN_PARTS = {"train": "train", "test": "val"}


def _label_task(root: str, row: dict, scheme: str) -> str:
    volume = load_volume(root, row)
    if volume.hu is None:
        raise CtsynthError(f"{row['volume_id']}: no image to make a label map from")
    relative = f"labels/{row['volume_id']}.nii.gz"
    write_nifti(Path(root) / relative, label_map(volume.hu, volume.mask, scheme), volume.affine)
    return relative


def write_label_maps(dataset: Path, scheme: str, ray_options: RayOptions = RayOptions()) -> list[dict]:
    """Write ``labels/<id>.nii.gz`` for every volume with an image and record them (``label``,
    ``label_scheme``) in the manifest; returns the updated rows."""
    rows = read_manifest(dataset)
    todo = [r for r in rows if r.get("image")]
    arguments = [(str(dataset), r, scheme) for r in todo]
    paths = parallel_map(_label_task, arguments, ray_options, description="label maps")
    for row, path in zip(todo, paths):
        row["label"] = path
        row["label_scheme"] = scheme
    write_manifest(dataset, rows)
    return rows


def common_spacing(rows: list[dict], dataset: Path) -> list[float]:
    """The voxel size (mm) every row shares; CtsynthError naming two volumes whose grids differ."""
    spacings = {}
    for row in rows:
        spacings.setdefault(tuple(round(row[f"spacing_{a}"], 4) for a in "xyz"), row)
    if len(spacings) > 1:
        (a, ra), (b, rb) = list(spacings.items())[:2]
        raise CtsynthError(f"{dataset}: GAN data needs one voxel size, but {ra['volume_id']} is {a} mm and "
                           f"{rb['volume_id']} is {b} mm (ingest with one --spacing)")  # fmt: skip
    first = next(iter(spacings.values()))
    return [float(first[f"spacing_{a}"]) for a in "xyz"]


def _shard_task(out: str, dataset: str, row: dict, part: str, kinds, size, stack_slices, air_label, crops):
    volume = load_volume(dataset, row)
    return write_volume_shards(Path(out), part, volume, kinds, size, stack_slices, air_label, crops)


def prepare(
    dataset: Path,
    out: Path,
    *,
    scheme: str = "body",
    size: int = 128,
    kinds: list[str] = ("2d", "2p5d", "3d"),
    stack_slices: int = 3,
    n_templates: int | None = 15,
    crops: str = "one",
    seed: int = 0,
    ray_options: RayOptions = RayOptions(),
) -> dict:
    """Label maps into ``dataset``, then the template bank and GAN data into ``out`` (one ``size``^3 crop per
    volume with nodules, or one per nodule with ``crops="per-nodule"``); records it all in
    ``dataset/prepare.json``; returns the GAN data's description."""
    dataset = Path(dataset).resolve()  # Ray workers may run in another working directory
    if stack_slices < 1 or stack_slices % 2 == 0:
        raise CtsynthError(f"--stack-slices must be odd and positive, got {stack_slices}")
    if crops not in CROPS:
        raise CtsynthError(f"--crops must be one of {', '.join(CROPS)}, got {crops!r}")
    rows = write_label_maps(dataset, scheme, ray_options)
    chosen = [r for r in rows if r["split"] in GAN_PARTS and r["n_nodules"] and r.get("image")]
    if not any(r["split"] == "train" for r in chosen):
        raise CtsynthError(f"{dataset}: no train volume with nodules: nothing to train a GAN on")
    spacing = common_spacing(chosen, dataset)
    air = Tissue.OUTSIDE_AIR if scheme == "body" else Tissue.OTHER
    volumes = {part: [r["volume_id"] for r in chosen if GAN_PARTS[r["split"]] == part] for part in ("train", "val")}
    with staged_dataset(out, overwrite=ray_options.overwrite, subfolders=("train", "val")) as stage:
        bank = build_template_bank(dataset, n_templates, seed)
        save_bank(bank, stage / BANK_NAME)
        arguments = [(str(stage), str(dataset), r, GAN_PARTS[r["split"]], list(kinds), size, stack_slices, int(air),
                      crops) for r in chosen]  # fmt: skip
        counts = parallel_map(_shard_task, arguments, ray_options, description="GAN data")
        totals = {part: {kind: 0 for kind in kinds} for part in ("train", "val")}
        for row, count in zip(chosen, counts):
            for kind, n in count.items():
                totals[GAN_PARTS[row["split"]]][kind] += n
        description = {
            "source_dataset": str(dataset),
            "fingerprint": dataset_fingerprint(dataset),
            "scheme": scheme,
            "size": size,
            "kinds": list(kinds),
            "stack_slices": stack_slices,
            "crops": crops,
            "spacing_mm": spacing,
            "hu_scale": HU_SCALE,
            "counts": totals,
            "volumes": volumes,
            "templates": [{"template_id": t.template_id, "diameter_mm": round(t.diameter_mm, 2)} for t in bank],
        }
        (stage / DESCRIPTION).write_text(json.dumps(description, indent=2))
    out = Path(out).resolve()
    write_json(dataset / PREPARE_RECORD, {
        "gan_data": str(out), "bank": str(out / BANK_NAME), "scheme": scheme, "fingerprint": description["fingerprint"],
        "gan_train_split": "train", "gan_val_split": "test",
        "gan_train_volumes": volumes["train"], "gan_val_volumes": volumes["val"],
    })  # fmt: skip
    return description
