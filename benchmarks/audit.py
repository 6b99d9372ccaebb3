"""Audit speed: ``ctsynth audit`` of N synthetic 128^3 volumes against M GAN training crops, per volume and stage,
and the coarse search's recall against an exhaustive search.

The data is built first (not timed): phantom sources (train split) and held-out real phantoms (test split) with
body label maps; GAN data of M 128^3 crops cut from the sources (3D shards, as ``prepare`` writes them); N
synthetic volumes cut from the sources with provenance, painted from their label maps with tissue HU and smooth
noise, of which every 100th is its source cube plus 3 HU of noise and every 100th + 1 a training crop plus 3 HU of
noise (planted copies: the audit should flag them and little else).

    .venv/bin/python benchmarks/audit.py [--n 1000] [--crops 500] [--sources 12] [--real 8] [--workers 2]
                                         [--recall-n 20] [--recall-crops 60] [--keep DIR]

Prints the audit's wall time, seconds per volume for each stage (summed over workers), how many planted copies
were flagged and how many other volumes, and the recall of the coarse search (top 1, 3, 5) against exact SSIM
over every crop, on ``--recall-n`` volumes (half of them noisy crop copies) and ``--recall-crops`` crops.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctsynth_ray.audit import TrainingCrops, coarse_recall, cut_cubes
from ctsynth_ray.dataset import Volume, load_volume, read_manifest, write_json, write_manifest, write_volume
from ctsynth_ray.gan_data import write_shard

SIZE = 128
PAINT = np.zeros(256, np.int16)
PAINT[:7] = [-850, -100, 0, 50, 700, 30, -1000]


def _sources(root: Path, n_sources: int, n_real: int) -> list[dict]:
    from ctsynth_ray.pipelines.phantoms import make_phantom_dataset
    from ctsynth_ray.pipelines.prepare import write_label_maps
    from ctsynth_ray.pipelines.runtime import RayOptions

    total = n_sources + n_real
    options = RayOptions(workers=2, progress=False)
    make_phantom_dataset(root, total, seed=3, split_fractions=(n_sources / total, 0.0, n_real / total),
                         ray_options=options)  # fmt: skip
    write_label_maps(root, "body", options)
    return read_manifest(root)


def _gan_data(root: Path, source: Path, train: list[dict], n_crops: int) -> Path:
    """``n_crops`` 128^3 crops of the train volumes as 3D shards (one per volume) and a gan_data.json."""
    rng = np.random.default_rng(1)
    per_volume = np.array_split(np.arange(n_crops), len(train))
    for row, crops in zip(train, per_volume):
        volume = load_volume(source, row)
        origins = cut_cubes(volume.label, SIZE, len(crops), rng, tries=400)
        pairs = [(k, -1, volume.label[tuple(slice(o, o + SIZE) for o in origin)],
                  volume.hu[tuple(slice(o, o + SIZE) for o in origin)]) for k, origin in enumerate(origins)]  # fmt: skip
        write_shard(root / "train" / f"3d-{row['volume_id']}.parquet", row["volume_id"], pairs)
    write_json(root / "gan_data.json", {"source_dataset": str(source), "scheme": "body", "size": SIZE, "kinds": ["3d"],
                                        "volumes": {"train": [r["volume_id"] for r in train], "val": []}})  # fmt: skip
    return root


def _synthetic_volume(args) -> dict:
    index, source, row, out, crop = args
    rng = np.random.default_rng(index)
    volume = load_volume(source, row)
    (origin,) = cut_cubes(volume.label, SIZE, 1, rng, tries=400)
    box = tuple(slice(o, o + SIZE) for o in origin)
    label, mask = volume.label[box], volume.mask[box]
    if index % 100 == 0:  # a source copy
        hu = volume.hu[box] + rng.normal(0, 3, label.shape)
    elif index % 100 == 1:  # a training-crop copy
        hu = crop + rng.normal(0, 3, label.shape)
    else:  # honest: the label map's tissue HU and smooth noise
        hu = PAINT[label] + ndimage.gaussian_filter(rng.normal(0, 40, label.shape).astype(np.float32), 0.7)
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ origin + volume.affine[:3, 3]
    synthetic = Volume(f"synth-s0-{index:06d}", np.rint(hu).astype(np.int16), mask, affine, label)
    return write_volume(out, synthetic, "train", "synthetic", source_volume_id=row["volume_id"],
                        cube_origin_x=int(origin[0]), cube_origin_y=int(origin[1]), cube_origin_z=int(origin[2]),
                        label_scheme="body")  # fmt: skip


def _recall(crops: TrainingCrops, n: int) -> dict[int, float]:
    """Coarse-search recall at 1, 3 and 5 against exact SSIM over every crop, on n volumes (half noisy crop copies,
    half other crops shifted by 8 voxels: near, but not the same)."""
    rng = np.random.default_rng(2)
    records = []
    for k in range(n):
        crop = crops.hu[int(rng.integers(len(crops.names)))].astype(np.float32)
        volume = crop + rng.normal(0, 3, crop.shape) if k % 2 == 0 else np.roll(crop, 8, axis=int(rng.integers(3)))
        volume = np.rint(volume).astype(np.int16)
        records.append((crops.coarse_order(volume).tolist(), crops.exhaustive_best(volume)))
    return {k: coarse_recall(records, k) for k in (1, 3, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--crops", type=int, default=500)
    parser.add_argument("--sources", type=int, default=12)
    parser.add_argument("--real", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--recall-n", type=int, default=20)
    parser.add_argument("--recall-crops", type=int, default=60)
    parser.add_argument("--keep", type=Path, default=None, help="build the data here and keep it")
    args = parser.parse_args()

    from ctsynth_ray.pipelines.audit import AuditOptions, load_training_crops, run_audit

    root = args.keep or Path(tempfile.mkdtemp(prefix="ctsynth-audit-bench-"))
    started = time.monotonic()
    try:
        source = root / "ds"
        rows = read_manifest(source) if (source / "manifest.parquet").is_file() else _sources(source, args.sources,
                                                                                              args.real)  # fmt: skip
        train = [r for r in rows if r["split"] == "train"]
        gan = root / "gan"
        if not (gan / "gan_data.json").is_file():
            _gan_data(gan, source, train, args.crops)
        synthetic = root / "synth"
        if not (synthetic / "manifest.parquet").is_file():
            crops = load_training_crops(gan, SIZE, 16)
            jobs = [(i, source, train[i % len(train)], synthetic, crops.hu[i % len(crops.names)] if i % 100 == 1 else None)
                    for i in range(args.n)]  # fmt: skip
            with ProcessPoolExecutor(2) as pool:
                written = list(pool.map(_synthetic_volume, jobs, chunksize=8))
            write_manifest(synthetic, written)
            write_json(synthetic / "generate.json", {"source": str(source)})
            del crops
        print(f"data: {args.n} synthetic volumes, {args.crops} crops, {args.real} held-out real phantoms "
              f"({time.monotonic() - started:.0f} s to build)", flush=True)  # fmt: skip

        options = AuditOptions(synthetic=str(synthetic), real=f"{source}:test", out=str(root / "audit"),
                               gan_data=str(gan), workers=args.workers,
                               tracking_uri=f"sqlite:///{root / 'mlflow.db'}", progress=False)  # fmt: skip
        result = run_audit(options, echo=lambda line: print(line, flush=True))
        report = result.report
        seconds = report["seconds"]
        planted = {f"synth-s0-{i:06d}" for i in range(args.n) if i % 100 in (0, 1)}
        flagged = set(report["privacy"]["flagged"])
        print(f"\naudit wall time: {seconds['wall']:.0f} s for {args.n} volumes against {args.crops} crops on "
              f"{args.workers} worker(s): {seconds['wall'] / args.n:.2f} s per volume")  # fmt: skip
        per_volume = {k: seconds[k] / args.n for k in ("read", "realism", "source_copy", "nearest_crop")}
        print("seconds per synthetic volume by stage (summed over workers): "
              + ", ".join(f"{k} {v:.3f}" for k, v in per_volume.items()))  # fmt: skip
        print(f"real volumes: {seconds['real_volumes']:.0f} s, of which the held-out threshold {seconds['held_out']:.0f} s "
              f"for {report['privacy']['held_out_cubes']} cubes; diversity pairs: {seconds['diversity']:.0f} s")  # fmt: skip
        print(f"planted copies flagged: {len(planted & flagged)} of {len(planted)}; other volumes flagged: "
              f"{len(flagged - planted)} of {args.n - len(planted)}")  # fmt: skip

        crops = load_training_crops(gan, SIZE, 16)
        small = TrainingCrops(crops.names[: args.recall_crops], crops.hu[: args.recall_crops], SIZE, 16)
        del crops
        recall = _recall(small, args.recall_n)
        print(f"coarse search recall against exhaustive SSIM ({args.recall_n} volumes, {args.recall_crops} crops): "
              + ", ".join(f"top-{k} {v:.2f}" for k, v in recall.items()))  # fmt: skip
        print(json.dumps({"n": args.n, "crops": args.crops, "seconds": seconds, "recall": recall,
                          "planted_flagged": len(planted & flagged), "planted": len(planted),
                          "others_flagged": len(flagged - planted)}))  # fmt: skip
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
