"""`ctsynth audit`: realism, diversity and privacy of a synthetic CT set against real CT, on Ray, in MLflow.

The measures are :mod:`ctsynth_ray.audit`'s; this module plans the work, runs it as Ray tasks (one per real
volume, then one per group of synthetic volumes cut from the same source, so a source is decoded once per group),
and writes ``DIR/audit.json``, ``DIR/audit.html``, the figures and, with ``--turing N``, ``DIR/turing.html``.

1. Everything is checked before any volume is read: SYNTH's provenance columns (``source_volume_id``,
   ``cube_origin_*``), one cube size and one grid on both sides, the source dataset (``SYNTH/generate.json``, else
   the real dataset) holding every source volume, and the GAN data (``--gan-data``, else the one the generator was
   trained on, from its ``generator.json``).
2. Real volumes: realism features, cubes cut the way synthetic label volumes are cut (diversity, Turing slices),
   and for the volumes the GAN never trained on, each cube's nearest training crop: the privacy threshold.
3. Synthetic volumes: realism features, the source-copy check against the source cube and the label-only
   rendering (class means from step 2), the nearest training crop.

Every volume draws from its own random stream (seed, side, position): the audit does not depend on ``--workers``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctsynth_ray.audit import (
    AuditConfig,
    SsimOperand,
    TrainingCrops,
    VolumeFeatures,
    class_means,
    cut_cubes,
    diversity_volume,
    mean_pairwise_ssim,
    pooled,
    privacy,
    realism,
    render_labels,
    source_similarities,
    volume_features,
)
from ctsynth_ray.dataset import MANIFEST_NAME, load_volume, read_manifest, read_nifti, staged_dataset
from ctsynth_ray.errors import CtsynthError, CtsynthWarning
from ctsynth_ray.labels import Tissue, label_map
from ctsynth_ray.pipelines.runtime import RayOptions, ensure_ray, parallel_map
from ctsynth_ray.segmentation import name_list, parse_spec
from ctsynth_ray.storage import local_copy, location

PROVENANCE = ("source_volume_id", "cube_origin_x", "cube_origin_y", "cube_origin_z")
SPACING_TOLERANCE_MM = 1e-3
CHUNK = 8  # synthetic volumes per task (all cut from one source)
STAGES = ("read", "realism", "source_copy", "nearest_crop", "held_out")  # seconds, summed over tasks


@dataclass(frozen=True)
class AuditOptions:
    synthetic: str
    real: str  # DATASET[:split]
    out: str
    gan_data: str | None = None
    turing: int = 0
    workers: int = 1
    address: str | None = None
    tracking_uri: str = ""
    experiment: str = "ctsynth-audit"
    seed: int = 0
    top_k: int = 3
    progress: bool = True

    def config(self) -> AuditConfig:
        return AuditConfig(seed=self.seed, top_k=self.top_k, turing=self.turing)


@dataclass
class AuditResult:
    out: Path
    report: dict
    run_id: str | None = None
    files: dict = field(default_factory=dict)

    @property
    def flagged(self) -> list[str]:
        return self.report["privacy"]["flagged"]

    def format(self) -> str:
        from ctsynth_ray.audit_report import summary_lines

        return "\n".join(summary_lines(self.report) + [f"audit: {self.out / 'audit.json'}, {self.out / 'audit.html'}"])


# --------------------------------------------------------------------------------------------------- plan


@dataclass
class _Plan:
    synthetic: Path
    synthetic_rows: list[dict]
    size: int
    scheme: str
    real: Path
    real_rows: list[dict]
    held_out: set[str]
    source: Path
    source_rows: dict[str, dict]
    gan_data: Path | None
    train_volumes: list[str]


def _spacing(row: dict) -> np.ndarray:
    return np.array([row[f"spacing_{a}"] for a in "xyz"], float)


def _check_synthetic(synthetic: Path) -> tuple[list[dict], int, str]:
    rows = read_manifest(synthetic)
    manifest = synthetic / MANIFEST_NAME
    if not rows:
        raise CtsynthError(f"{manifest}: no volumes")
    missing = [c for c in PROVENANCE if c not in rows[0]]
    if missing:
        raise CtsynthError(f"{manifest}: no provenance column(s) {', '.join(missing)}: the audit needs the cube each "
                           f"volume was cut from (sets made by `ctsynth generate` have them)")  # fmt: skip
    without = [
        r["volume_id"]
        for r in rows
        if not r.get("image") or not r.get("label") or any(r[c] is None for c in PROVENANCE)
    ]
    if without:
        raise CtsynthError(f"{manifest}: {name_list(without)} lack an image, a label map or their provenance")
    shapes = {(r["shape_x"], r["shape_y"], r["shape_z"]) for r in rows}
    if len(shapes) > 1 or len(set(next(iter(shapes)))) > 1:
        raise CtsynthError(f"{manifest}: volumes must be cubes of one size, found shapes {sorted(shapes)[:3]}")
    spacings = {tuple(np.round(_spacing(r), 4)) for r in rows}
    if len(spacings) > 1:
        raise CtsynthError(f"{manifest}: volumes on different grids ({sorted(spacings)[:2]})")
    schemes = {r.get("label_scheme") or "thesis" for r in rows}
    if len(schemes) > 1:
        raise CtsynthError(f"{manifest}: label maps of several schemes ({', '.join(sorted(schemes))})")
    return rows, int(next(iter(shapes))[0]), schemes.pop()


def _read_json(path: Path, key: str | None = None):
    """A JSON object (or one of its keys); CtsynthError naming the file when it is unreadable or lacks the key."""
    try:
        value = json.loads(path.read_text())
        if not isinstance(value, dict):
            raise TypeError
        return value if key is None else value[key]
    except (OSError, ValueError, KeyError, TypeError):
        raise CtsynthError(f"{path}: not a readable JSON object{f' with {key!r}' if key else ''}") from None


def _source_dataset(synthetic: Path, real: Path) -> Path:
    """The dataset ``generate`` cut the label cubes from (a local copy when it was an object-store URI)."""
    run = synthetic / "generate.json"
    return local_copy(_read_json(run, "source"), "source dataset") if run.is_file() else real


def _gan_data(options: AuditOptions, synthetic: Path) -> Path | None:
    if options.gan_data:
        path = Path(options.gan_data).resolve()
        if not (path / "gan_data.json").is_file():
            raise CtsynthError(f"{path}: no gan_data.json (is it GAN data made by `ctsynth prepare`?)")
        return path
    run = synthetic / "generate.json"
    recorded = _read_json(run).get("generator") if run.is_file() else None
    generator = location(recorded) / "generator.json" if recorded else None  # a folder or an object-store URI
    if generator and generator.is_file():
        path = (json.loads(generator.read_text()).get("training_data") or {}).get("path")
        if path and (location(path) / "gan_data.json").is_file():
            return local_copy(path, "GAN data")
    return None


def default_real(synthetic: str | Path) -> str:
    """``SOURCE:split`` of the volumes the generator never trained on: the split ``prepare`` kept from the GAN
    (``prepare.json``), of the dataset ``generate`` cut its label volumes from (``SYNTH/generate.json``)."""
    from ctsynth_ray.dataset import read_prepare_record

    run = Path(synthetic) / "generate.json"
    if not run.is_file():
        raise CtsynthError(f"{run}: not found: pass --real DATASET[:split]")
    source = _read_json(run, "source")
    record = read_prepare_record(source) or {}
    return f"{source}:{record.get('gan_val_split', 'test')}"


def plan_audit(options: AuditOptions) -> _Plan:
    """Every check that needs no volume decoded; CtsynthError with one line naming the file and the problem."""
    synthetic = Path(options.synthetic).resolve()
    rows, size, scheme = _check_synthetic(synthetic)
    try:
        spec = parse_spec(options.real)
    except ValueError as exc:
        raise CtsynthError(f"--real {exc}") from None
    if spec.n is not None:
        raise CtsynthError(f"--real {options.real!r}: takes DATASET[:split], not n=")
    real = spec.dataset.resolve()
    real_rows = [r for r in read_manifest(real) if r.get("image") and (spec.split is None or r["split"] == spec.split)]
    if not real_rows:
        raise CtsynthError(f"{real}: no volume with an image{f' in split {spec.split}' if spec.split else ''}")
    grid = _spacing(rows[0])
    other = [r["volume_id"] for r in real_rows if np.abs(_spacing(r) - grid).max() > SPACING_TOLERANCE_MM]
    if other:
        raise CtsynthError(f"{real / MANIFEST_NAME}: {name_list(other)} on another grid than {synthetic} "
                           f"({' x '.join(f'{v:g}' for v in grid)} mm): resample them first (ingest nifti --spacing)")  # fmt: skip
    source = _source_dataset(synthetic, real).resolve()
    if not (source / MANIFEST_NAME).is_file():
        raise CtsynthError(f"{source}: the source dataset of {synthetic} is not there (moved?)")
    source_rows = {r["volume_id"]: r for r in read_manifest(source)}
    absent = sorted({r["source_volume_id"] for r in rows} - {v for v, r in source_rows.items() if r.get("image")})
    if absent:
        raise CtsynthError(f"{source / MANIFEST_NAME}: source volume(s) {name_list(absent)} of {synthetic} missing "
                           f"or without an image")  # fmt: skip
    gan_data = _gan_data(options, synthetic)
    train_volumes: list[str] = []
    if gan_data is not None:
        train_volumes = list((_read_json(gan_data / "gan_data.json").get("volumes") or {}).get("train") or [])
    held_out = {r["volume_id"] for r in real_rows} - set(train_volumes)
    if gan_data is not None and not held_out:
        raise CtsynthError(f"--real {options.real}: every volume trained the GAN ({gan_data}); the privacy threshold "
                           f"needs volumes it never saw (e.g. {real}:test)")  # fmt: skip
    return _Plan(synthetic, rows, size, scheme, real, real_rows, held_out, source, source_rows, gan_data,
                 train_volumes)  # fmt: skip


def load_training_crops(gan_data: Path, size: int, grid: int) -> TrainingCrops:
    """The GAN's training crops: its 3D shards, else cut again from its source dataset as ``prepare`` cut them."""
    import pyarrow.parquet as pq

    from ctsynth_ray.gan_data import nodule_crops, read_description

    description = read_description(gan_data)
    names: list[str] = []
    shards = sorted((gan_data / "train").glob("3d-*.parquet"))
    if shards:  # one array filled shard by shard: 500 crops of 128^3 are 2 GB, held once
        total = sum(pq.read_metadata(shard).num_rows for shard in shards)
        crops = None
        for shard in shards:
            table = pq.read_table(shard, columns=["volume_id", "crop", "hu"])
            hu = table.column("hu").combine_chunks().to_numpy_ndarray()  # one volume's crops
            if crops is None:
                crops = np.empty((total, *hu.shape[1:]), np.int16)
            crops[len(names) : len(names) + len(hu)] = hu
            names += [
                f"{v}#{c}" for v, c in zip(table.column("volume_id").to_pylist(), table.column("crop").to_pylist())
            ]
    else:
        source = local_copy(description["source_dataset"], "source dataset")
        rows = {r["volume_id"]: r for r in read_manifest(source)}
        air = Tissue.OUTSIDE_AIR if description["scheme"] == "body" else Tissue.OTHER
        cut = []
        missing = [v for v in description["volumes"]["train"] if v not in rows]
        if missing:
            raise CtsynthError(f"{gan_data}: has no 3D crops, and its source {source} lacks {name_list(missing)}")
        for vid in description["volumes"]["train"]:
            for k, (_, hu) in enumerate(nodule_crops(load_volume(source, rows[vid]), description["size"], air,
                                                     description.get("crops", "one"))):  # fmt: skip
                names.append(f"{vid}#{k}")
                cut.append(hu)
        crops = np.stack(cut).astype(np.int16) if cut else None
    if crops is None or not len(crops):
        raise CtsynthError(f"{gan_data}: no training crops")
    return TrainingCrops(names, crops, min(size, int(crops.shape[1])), grid)


# ---------------------------------------------------------------------------------------------- tasks


def _rng(seed: int, side: int, position: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(side, position)))


def _real_label(hu: np.ndarray, mask: np.ndarray, label: np.ndarray | None, row: dict, scheme: str) -> np.ndarray:
    if label is not None and (row.get("label_scheme") or "thesis") == scheme:
        return label
    return label_map(hu, mask, scheme)


def _real_task(root: str, row: dict, position: int, scheme: str, size: int, config: AuditConfig, held_out: bool,
               crops: TrainingCrops | None, diversity: bool, turing_z: list[int]) -> dict:  # fmt: skip
    """One real volume: its realism features, a diversity cube, Turing slices, and (held out) the similarity of
    each of its cubes to the nearest training crop."""
    times = dict.fromkeys(STAGES, 0.0)
    started = time.perf_counter()
    volume = load_volume(root, row)
    label = _real_label(volume.hu, volume.mask, volume.label, row, scheme)
    times["read"] = time.perf_counter() - started
    rng = _rng(config.seed, 1, position)
    boxes = [tuple(slice(o, o + size) for o in origin) for origin in cut_cubes(label, size, config.real_cubes, rng)]
    cubes = [volume.hu[box] for box in boxes]
    started = time.perf_counter()
    # Measured on cubes cut as the synthetic ones are (nodules on the whole volume): like against like.
    features = volume_features(row["volume_id"], volume.hu, label, volume.mask, rng, config, boxes)
    times["realism"] = time.perf_counter() - started
    nearest = []
    started = time.perf_counter()
    if held_out and crops is not None:
        nearest = [crops.nearest(cube, config.top_k)[1] for cube in cubes]
    times["held_out"] = time.perf_counter() - started
    slices = [(row["volume_id"], z, np.array(cubes[k % len(cubes)][:, :, z])) for k, z in enumerate(turing_z) if cubes]
    return {"features": features, "nearest": nearest, "cubes": len(cubes),
            "diversity": diversity_volume(cubes[0]) if diversity and cubes else None, "turing": slices,
            "times": times}  # fmt: skip


def _synthetic_task(root: str, rows: list[dict], positions: list[int], source_root: str, source_row: dict,
                    means: np.ndarray, config: AuditConfig, crops: TrainingCrops | None, diversity: set[int],
                    turing: dict[int, list[int]], exhaustive: bool = False) -> list[dict]:  # fmt: skip
    """Synthetic volumes cut from one source: realism features, the source-copy check, the nearest training crop."""
    times = dict.fromkeys(STAGES, 0.0)
    started = time.perf_counter()
    source_hu, _ = read_nifti(Path(source_root) / source_row["image"])
    times["read"] += time.perf_counter() - started
    results = []
    for row, position in zip(rows, positions):
        started = time.perf_counter()
        volume = load_volume(root, row)
        size = volume.hu.shape[0]
        origin = [int(row[f"cube_origin_{a}"]) for a in "xyz"]
        if any(o < 0 or o + size > n for o, n in zip(origin, source_hu.shape)):
            raise CtsynthError(f"{root}: {row['volume_id']}'s cube at {origin} is not inside its source "
                               f"{row['source_volume_id']} {source_hu.shape}")  # fmt: skip
        source_cube = source_hu[tuple(slice(o, o + size) for o in origin)]
        times["read"] += time.perf_counter() - started
        started = time.perf_counter()
        features = volume_features(row["volume_id"], volume.hu, volume.label, volume.mask,
                                   _rng(config.seed, 0, position), config)  # fmt: skip
        times["realism"] += time.perf_counter() - started
        started = time.perf_counter()
        # Each image's share of SSIM once, for the source check and the nearest-crop search alike.
        synthetic, rendering = SsimOperand(volume.hu), SsimOperand(render_labels(volume.label, means))
        source_similarity, label_only = source_similarities(synthetic, source_cube, rendering)
        times["source_copy"] += time.perf_counter() - started
        record = {"volume_id": row["volume_id"], "source_volume_id": row["source_volume_id"],
                  "source_similarity": source_similarity, "label_only_similarity": label_only,
                  "nearest_train_volume": None, "nearest_train_crop": None,
                  "nearest_train_similarity": None,
                  "label_only_train_similarity": None}  # fmt: skip
        search = None
        if crops is not None:
            started = time.perf_counter()
            name, best, rendered = crops.nearest(synthetic, config.top_k, rendering)
            volume_id, _, crop = name.rpartition("#")
            record.update(nearest_train_volume=volume_id, nearest_train_crop=int(crop), nearest_train_similarity=best,
                          label_only_train_similarity=rendered)  # fmt: skip
            times["nearest_crop"] += time.perf_counter() - started
            if exhaustive:  # the coarse search's recall: the best crop by exact SSIM over every crop
                search = (crops.coarse_order(synthetic).tolist(), crops.exhaustive_best(synthetic))
        results.append({
            "features": features, "privacy": record, "search": search,
            "diversity": diversity_volume(volume.hu) if position in diversity else None,
            "turing": [(row["volume_id"], z, np.array(volume.hu[:, :, z])) for z in turing.get(position, [])],
        })  # fmt: skip
    results[-1]["times"] = times
    return results


# ------------------------------------------------------------------------------------------------ driver


def _picks(n: int, count: int, size: int, rng: np.random.Generator) -> dict[int, list[int]]:
    """``count`` (position, axial slice) picks for the Turing page, slices from the middle half of a cube."""
    picks: dict[int, list[int]] = {}
    if n == 0 or count == 0:
        return picks
    for position in rng.choice(n, count, replace=count > n):
        picks.setdefault(int(position), []).append(int(rng.integers(size // 4, 3 * size // 4)))
    return picks


def _groups(rows: list[dict]) -> list[tuple[list[int], str]]:
    """Positions of synthetic volumes grouped by source, at most CHUNK per group."""
    by_source: dict[str, list[int]] = {}
    for k, row in enumerate(rows):
        by_source.setdefault(row["source_volume_id"], []).append(k)
    return [(group[i : i + CHUNK], source) for source, group in sorted(by_source.items())
            for i in range(0, len(group), CHUNK)]  # fmt: skip


def run_audit(options: AuditOptions, echo=print, exhaustive: bool = False) -> AuditResult:
    """Audit ``options.synthetic`` against ``options.real`` into ``options.out``; see the module docstring.
    ``exhaustive`` also ranks every training crop exactly (the benchmark's recall of the coarse search)."""
    import warnings

    from ctsynth_ray.audit_report import write_audit

    started = time.monotonic()
    config = options.config()
    plan = plan_audit(options)
    out = Path(options.out).resolve()
    if out.exists() and not out.is_dir():
        raise CtsynthError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "audit.json").is_file():
        raise CtsynthError(f"{out}: exists, is not empty and holds no earlier audit: choose another --out")
    if plan.gan_data is None:
        warnings.warn("no --gan-data (and none recorded by the generator): the nearest-training-crop check is "
                      "skipped", CtsynthWarning, stacklevel=2)  # fmt: skip
    ray_options = RayOptions(workers=options.workers, address=options.address, progress=options.progress)
    crops = load_training_crops(plan.gan_data, plan.size, config.embedding_grid) if plan.gan_data else None
    crops_arg, n_crops = crops, len(crops.names) if crops else 0
    if crops is not None and ray_options.uses_ray:  # into the object store once, read in place by every task
        import ray

        ensure_ray(options.address, num_cpus=None if options.address else options.workers)
        crops_arg = ray.put(crops)
        del crops  # the driver keeps no copy of its own
    picker, diverse = _rng(config.seed, 2, 0), _rng(config.seed, 2, 1)  # --turing leaves the diversity draw alone
    n_real, n_synthetic = len(plan.real_rows), len(plan.synthetic_rows)
    real_turing = _picks(n_real, config.turing, plan.size, picker)
    synthetic_turing = _picks(n_synthetic, config.turing, plan.size, picker)
    real_diversity = set(diverse.permutation(n_real)[: config.diversity_volumes].tolist())
    synthetic_diversity = set(diverse.permutation(n_synthetic)[: config.diversity_volumes].tolist())

    echo(f"audit: {n_synthetic} synthetic volume(s) of {plan.size}^3 against {n_real} real volume(s) of {plan.real} "
         f"({len(plan.held_out)} the GAN never saw); "
         f"{n_crops or 'no'} GAN training crop(s)")  # fmt: skip
    real_results = parallel_map(_real_task, [
        (str(plan.real), row, k, plan.scheme, plan.size, config, row["volume_id"] in plan.held_out, crops_arg,
         k in real_diversity, real_turing.get(k, [])) for k, row in enumerate(plan.real_rows)
    ], ray_options, description="audit real", unit="vol")  # fmt: skip
    held_out = [v for r in real_results for v in r["nearest"]]
    if n_crops and not held_out:
        raise CtsynthError(f"{plan.real}: no {plan.size}^3 cube could be cut from the held-out volumes for the "
                           f"privacy threshold (are they smaller than the synthetic cubes?)")  # fmt: skip
    real_features: list[VolumeFeatures] = [r["features"] for r in real_results]
    means = class_means(pooled([f.samples for f in real_features]))
    groups = _groups(plan.synthetic_rows)
    chunks = parallel_map(_synthetic_task, [
        (str(plan.synthetic), [plan.synthetic_rows[k] for k in positions], positions, str(plan.source),
         plan.source_rows[source], means, config, crops_arg, {k for k in positions if k in synthetic_diversity},
         {k: synthetic_turing[k] for k in positions if k in synthetic_turing}, exhaustive)
        for positions, source in groups
    ], ray_options, description="audit synthetic", unit="chunk")  # fmt: skip
    by_position = {k: r for (positions, _), chunk in zip(groups, chunks) for k, r in zip(positions, chunk)}
    synthetic_results = [by_position[k] for k in range(n_synthetic)]  # the manifest's order
    times = dict.fromkeys(STAGES, 0.0)  # synthetic volumes' stages; the real volumes' tasks apart
    for result in synthetic_results:
        for stage, seconds in result.get("times", {}).items():
            times[stage] += seconds
    times["held_out"] = sum(r["times"]["held_out"] for r in real_results)
    times["real_volumes"] = sum(sum(r["times"].values()) for r in real_results)

    started_pairs = time.perf_counter()
    report = {
        "n_synthetic": n_synthetic,
        "n_real": n_real,
        "synthetic": str(plan.synthetic),
        "real": options.real,
        "source_dataset": str(plan.source),
        "gan_data": str(plan.gan_data) if plan.gan_data else None,
        "n_training_crops": n_crops,
        "config": {
            "seed": config.seed,
            "top_k": config.top_k,
            "embedding_grid": config.embedding_grid,
            "real_cubes": config.real_cubes,
            "size": plan.size,
            "scheme": plan.scheme,
        },
        "realism": realism([r["features"] for r in synthetic_results], real_features, config.seed),
        "diversity": {
            "synthetic_pairwise_ssim": mean_pairwise_ssim(
                [r["diversity"] for r in synthetic_results if r["diversity"] is not None],
                config.diversity_pairs,
                config.seed,
            ),
            "real_pairwise_ssim": mean_pairwise_ssim(
                [r["diversity"] for r in real_results if r["diversity"] is not None],
                config.diversity_pairs,
                config.seed,
            ),
        },
        "privacy": privacy([r["privacy"] for r in synthetic_results], held_out),
    }
    times["diversity"] = time.perf_counter() - started_pairs
    if exhaustive and n_crops:
        from ctsynth_ray.audit import coarse_recall

        report["privacy"]["coarse_search_recall"] = coarse_recall([r["search"] for r in synthetic_results],
                                                                  config.top_k)  # fmt: skip
    slices = {"real": [s for r in real_results for s in r["turing"]],
              "synthetic": [s for r in synthetic_results for s in r["turing"]]}  # fmt: skip
    report["seconds"] = {**{k: round(v, 2) for k, v in times.items()}, "wall": round(time.monotonic() - started, 2)}
    with staged_dataset(out, overwrite=True, subfolders=()) as stage:
        files = write_audit(report, [r["privacy"] for r in synthetic_results], held_out, real_features,
                            [r["features"] for r in synthetic_results], slices, stage, config.seed)  # fmt: skip
    result = AuditResult(out, report, files={k: out / Path(v).name for k, v in files.items()})
    result.run_id = _log_to_mlflow(options, result)
    return result


def _flat_metrics(report: dict) -> dict[str, float]:
    realism_, diversity_ = report["realism"], report["diversity"]
    metrics = {f"hu_wasserstein_{k}": v for k, v in realism_["hu_wasserstein"].items()}
    metrics.update(frechet_radiomics=realism_["frechet_radiomics"],
                   frechet_radiomics_real_vs_real=realism_["frechet_radiomics_real_vs_real"],
                   nodule_contrast_synthetic=realism_["nodule_contrast"]["synthetic"],
                   nodule_contrast_real=realism_["nodule_contrast"]["real"],
                   interslice_synthetic=realism_["interslice"]["synthetic"],
                   interslice_real=realism_["interslice"]["real"], **diversity_,
                   privacy_threshold=report["privacy"]["threshold"],
                   privacy_flagged=len(report["privacy"]["flagged"]))  # fmt: skip
    return {k: float(v) for k, v in metrics.items() if v is not None}


def _log_to_mlflow(options: AuditOptions, result: AuditResult) -> str:
    """One MLflow run per audit (tag ``ctsynth.kind=audit``): parameters, the figures as metrics, the files."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from ctsynth_ray.pipelines.tracking import absolute_uri, default_tracking_uri, tracking_setup

    uri = absolute_uri(options.tracking_uri or default_tracking_uri())
    experiment_id = tracking_setup(uri, options.experiment)
    client = MlflowClient(uri)
    tags = {"ctsynth.kind": "audit", "ctsynth.flagged": str(len(result.flagged))}
    run_id = client.create_run(experiment_id, run_name=f"audit {Path(options.synthetic).name}", tags=tags).info.run_id
    report = result.report
    params = {"synthetic": report["synthetic"], "real": report["real"], "gan_data": report["gan_data"],
              "n_synthetic": report["n_synthetic"], "n_real": report["n_real"], "top_k": options.top_k,
              "seed": options.seed, "turing": options.turing}  # fmt: skip
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()],
                     metrics=[mlflow.entities.Metric(k, v, int(time.time() * 1000), 0)
                              for k, v in _flat_metrics(report).items()])  # fmt: skip
    client.log_artifacts(run_id, str(result.out), artifact_path="audit")
    client.set_terminated(run_id, "FINISHED")
    return run_id
