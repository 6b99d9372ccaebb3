"""Time the ingest of one LIDC case per stage (single-threaded numpy code, so one core): DICOM read, XML + consensus, resample, write.

    .venv/bin/python benchmarks/ingest_lidc.py [CASE_DIR]   (default ../shared/data/lidc/LIDC-IDRI-0001)

Prints seconds per stage, the total, and its ratio to the one-minute target.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ctsynth_ray.dataset import TARGET_SPACING_MM, Volume, describe_nodule, write_volume
from ctsynth_ray.ingest.cases import _rescaled_affine, find_lidc_cases
from ctsynth_ray.ingest.dicom import read_series
from ctsynth_ray.ingest.lidc_xml import consensus_masks, group_annotations, parse_lidc_xml, rasterise
from ctsynth_ray.resample import clean_hu, resample_linear, resample_mask

TARGET_SECONDS = 60.0


def main() -> None:
    data = Path(os.environ.get("CTSYNTH_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else data / "lidc" / "LIDC-IDRI-0001"
    times: dict[str, float] = {}
    t = time.perf_counter()
    (case,), _ = find_lidc_cases(src)
    ct = read_series(case.series)
    times["find + read DICOM (HU)"] = time.perf_counter() - t

    t = time.perf_counter()
    annotations = []
    for xml in case.xml_paths:
        reading = parse_lidc_xml(xml)
        annotations += rasterise(reading, ct.sop_uids, ct.z_positions_mm, ct.hu.shape)
    masks = consensus_masks(annotations, group_annotations(annotations, ct.spacing_mm), ct.hu.shape, 3)
    times["XML + consensus masks"] = time.perf_counter() - t

    t = time.perf_counter()
    hu = clean_hu(resample_linear(ct.hu, ct.spacing_mm, TARGET_SPACING_MM))
    affine = _rescaled_affine(ct.affine, TARGET_SPACING_MM)
    mask = np.zeros(hu.shape, np.uint8)
    nodules = []
    for nodule_mask, n in masks:
        resampled = resample_mask(nodule_mask, ct.spacing_mm, TARGET_SPACING_MM, hu.shape)
        nodules.append({**describe_nodule(resampled, affine), "n_readers": n})
        mask |= resampled
    times["resample CT + masks"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        write_volume(out, Volume(case.volume_id, hu, mask, affine), split="train", source="lidc", nodules=nodules)
        times["write NIfTI (gzip level 1)"] = time.perf_counter() - t

    total = sum(times.values())
    print(f"ingest of {case.volume_id}: {ct.hu.shape} at {tuple(round(s, 3) for s in ct.spacing_mm)} mm "
          f"-> {hu.shape} at {TARGET_SPACING_MM} mm")  # fmt: skip
    for stage, seconds in times.items():
        print(f"  {stage:<28} {seconds:6.2f} s  ({seconds / total:5.1%})")
    print(f"  {'total':<28} {total:6.2f} s  = {total / TARGET_SECONDS:.2f} x the {TARGET_SECONDS:.0f} s target")


if __name__ == "__main__":
    main()
