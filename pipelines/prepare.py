"""`ctsynth prepare`: label maps for every volume, the nodule template bank, and the GAN training data.

One task per volume (its memory declared to Ray) decodes the volume once and writes everything made from it; each
finished volume is recorded, so an interrupted run over a whole collection continues with ``--resume``.

It records what it did in the dataset (``DATASET/prepare.json``): the GAN data folder, the template bank that
``synth-labels`` and ``generate`` use by default, and which split (and volumes) trained the GAN, so that
``train-seg`` can warn when a mixed set-up's real part overlaps the GAN's training data.
"""

from __future__ import annotations

import json
from pathlib import Path

from ctsynth_ray.dataset import (
    PREPARE_RECORD,
    Volume,
    dataset_fingerprint,
    read_manifest,
    read_nifti,
    write_json,
    write_manifest,
    write_nifti,
)
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.gan_data import CROPS, DESCRIPTION, write_volume_shards
from ctsynth_ray.labels import HU_SCALE, Tissue, label_map
from ctsynth_ray.nodule_bank import MIN_DIAMETER_MM, choose_templates, load_bank, save_bank, volume_templates
from ctsynth_ray.pipelines.runtime import RayOptions, parallel_map
from ctsynth_ray.progress import (
    PROGRESS,
    StoredFiles,
    begin_run,
    clear_records,
    read_records,
    remove_temporary_files,
    write_record,
)

BANK_NAME = "nodule_bank.parquet"
#: Which split of the dataset trains the GAN, and which gives its held-out validation pairs.
GAN_PARTS = {"train": "train", "test": "val"}
#: The run's settings in GANDATA, which ``--resume`` must match.
RUN_FILE = "prepare_run.json"
#: A volume's nodule template candidates, beside its progress record until the bank is chosen.
TEMPLATES_SUFFIX = ".templates.parquet"
#: Peak memory of one volume's task: the process plus bytes per voxel (int16 HU, uint8 mask and label map, slabs);
#: measured by benchmarks/ingest_prepare_memory.py.
BASE_MEMORY = 300 << 20
BYTES_PER_VOXEL = 5


def _labelled_volume(dataset: str, row: dict, scheme: str) -> tuple[Volume, str]:
    """Decode a volume once (its image and mask, not an older label map), make its label map and write it; the
    volume with its label map, and the map's path relative to ``dataset``."""
    vid = row["volume_id"]
    if not row.get("image"):
        raise CtsynthError(f"{vid}: no image to make a label map from")
    mask, affine = read_nifti(Path(dataset) / row["mask"])
    hu = read_nifti(Path(dataset) / row["image"])[0]
    volume = Volume(vid, hu, mask, affine, label_map(hu, mask, scheme))
    relative = f"labels/{vid}.nii.gz"
    write_nifti(Path(dataset) / relative, volume.label, affine)
    return volume, relative


def _label_task(root: str, row: dict, scheme: str) -> str:
    return _labelled_volume(root, row, scheme)[1]


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


def _volume_task(dataset: str, out: str, row: dict, scheme: str, part: str | None, kinds: list[str], size: int,
                 stack_slices: int, air_label: int, crops: str, templates: bool) -> dict:  # fmt: skip
    """One volume, decoded once: its label map into the dataset, its GAN pairs (``part`` 'train' or 'val', None for
    none) and nodule templates into ``out``; then its progress record, which it returns."""
    volume, relative = _labelled_volume(dataset, row, scheme)
    vid = volume.volume_id
    counts = write_volume_shards(Path(out), part, volume, kinds, size, stack_slices, air_label, crops) if part else {}
    candidates = volume_templates(volume) if templates else []
    if candidates:
        save_bank(candidates, Path(out) / PROGRESS / f"{vid}{TEMPLATES_SUFFIX}")
    record = {"label": relative, "part": part, "counts": counts, "templates": len(candidates)}
    write_record(out, vid, record)
    return record


def volume_memory(row: dict) -> int:
    """Bytes one volume's prepare task needs at its peak (declared to Ray): its int16 HU, uint8 mask and label map,
    slabs in between, and the process itself."""
    return BASE_MEMORY + BYTES_PER_VOXEL * row["shape_x"] * row["shape_y"] * row["shape_z"]


def _finished(dataset: Path, out: Path) -> dict[str, dict]:
    """{volume_id: record} of the volumes an earlier run finished: label map, shards and templates all there."""

    def complete(vid: str, record: dict, stored: StoredFiles) -> bool:
        shards = [f"{record['part']}/{kind}-{vid}.parquet" for kind, n in record["counts"].items() if n]
        return ((dataset / record["label"]).is_file() and all(s in stored for s in shards)
                and (not record["templates"] or f"{PROGRESS}/{vid}{TEMPLATES_SUFFIX}" in stored))  # fmt: skip

    return read_records(out, complete)


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
    resume: bool = False,
    ray_options: RayOptions = RayOptions(),
) -> dict:
    """Label maps into ``dataset``, then the template bank and GAN data into ``out`` (one ``size``^3 crop per
    volume with nodules, or one per nodule with ``crops="per-nodule"``); records it all in
    ``dataset/prepare.json``; returns the GAN data's description.

    One task per volume decodes it once and writes all of its outputs, then its progress record; ``gan_data.json``,
    written last, marks ``out`` finished. ``resume`` keeps what an earlier run with the same settings finished.
    """
    dataset = Path(dataset).resolve()  # Ray workers may run in another working directory
    out = Path(out).resolve()
    if stack_slices < 1 or stack_slices % 2 == 0:
        raise CtsynthError(f"--stack-slices must be odd and positive, got {stack_slices}")
    if crops not in CROPS:
        raise CtsynthError(f"--crops must be one of {', '.join(CROPS)}, got {crops!r}")
    if out == dataset or dataset in out.parents or out in dataset.parents:
        raise CtsynthError(f"{out}: --out and DATASET overlap: the GAN data needs a folder of its own")
    rows = read_manifest(dataset)
    imaged = [r for r in rows if r.get("image")]
    chosen = [r for r in imaged if r["split"] in GAN_PARTS and r["n_nodules"]]
    if not any(r["split"] == "train" for r in chosen):
        raise CtsynthError(f"{dataset}: no train volume with nodules: nothing to train a GAN on")
    if not any(
        n["diameter_mm"] >= MIN_DIAMETER_MM for r in chosen if r["split"] == "train" for n in r["nodules"] or []
    ):
        raise CtsynthError(f"{dataset}: no nodule >= {MIN_DIAMETER_MM:g} mm in the train split (the template bank "
                           f"would be empty)")  # fmt: skip
    spacing = common_spacing(chosen, dataset)
    air = Tissue.OUTSIDE_AIR if scheme == "body" else Tissue.OTHER
    settings = {"dataset": str(dataset), "scheme": scheme, "size": size, "kinds": list(kinds),
                "stack_slices": stack_slices, "crops": crops, "n_templates": n_templates, "seed": seed,
                "volumes": [r["volume_id"] for r in imaged]}  # fmt: skip
    begin_run(out, RUN_FILE, settings, resume=resume, overwrite=ray_options.overwrite, commit=DESCRIPTION)
    if resume and (out / DESCRIPTION).is_file():  # the run had finished: nothing to redo
        description = json.loads((out / DESCRIPTION).read_text())
        _record(dataset, out, description)
        clear_records(out)
        return description
    remove_temporary_files(out, GAN_PARTS.values())  # left by tasks killed in an earlier run
    remove_temporary_files(dataset, ("labels",))
    done = _finished(dataset, out) if resume else {}
    todo = [r for r in imaged if r["volume_id"] not in done]
    gan_volumes = {r["volume_id"] for r in chosen}
    arguments = [(str(dataset), str(out), r, scheme, GAN_PARTS[r["split"]] if r["volume_id"] in gan_volumes else None,
                  list(kinds), size, stack_slices, int(air), crops, r["split"] == "train" and bool(r["n_nodules"]))
                 for r in todo]  # fmt: skip

    def failed(k: int, exc: BaseException) -> dict:  # a worker that died: one line, and --resume goes on from here
        raise CtsynthError(
            f"{dataset / todo[k]['image']}: the task preparing {todo[k]['volume_id']} failed "
            f"({type(exc).__name__}); the volumes finished so far are kept: run again with --resume"
        )

    records = parallel_map(_volume_task, arguments, ray_options, description="label maps + GAN data",
                           memory=[volume_memory(r) for r in todo], on_failure=failed)  # fmt: skip
    done.update({r["volume_id"]: record for r, record in zip(todo, records)})
    for row in imaged:
        row["label"] = done[row["volume_id"]]["label"]
        row["label_scheme"] = scheme
    write_manifest(dataset, rows)
    candidates = [template for r in imaged if done[r["volume_id"]]["templates"]
                  for template in load_bank(out / PROGRESS / f"{r['volume_id']}{TEMPLATES_SUFFIX}")]  # fmt: skip
    bank = choose_templates(candidates, n_templates, seed, dataset)
    save_bank(bank, out / BANK_NAME)
    totals = {part: {kind: 0 for kind in kinds} for part in ("train", "val")}
    for row in chosen:
        for kind, n in done[row["volume_id"]]["counts"].items():
            totals[GAN_PARTS[row["split"]]][kind] += n
    volumes = {part: [r["volume_id"] for r in chosen if GAN_PARTS[r["split"]] == part] for part in ("train", "val")}
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
    write_json(out / DESCRIPTION, description)  # last: out is GAN data from here on
    _record(dataset, out, description)
    clear_records(out)
    return description


def _record(dataset: Path, out: Path, description: dict) -> None:
    """``DATASET/prepare.json``: where the GAN data and bank are, and which volumes trained the GAN."""
    volumes = description["volumes"]
    write_json(dataset / PREPARE_RECORD, {
        "gan_data": str(out), "bank": str(out / BANK_NAME), "scheme": description["scheme"],
        "fingerprint": description["fingerprint"], "gan_train_split": "train", "gan_val_split": "test",
        "gan_train_volumes": volumes["train"], "gan_val_volumes": volumes["val"],
    })  # fmt: skip
