"""How big a case is before it is read: its voxels in the source and on ctsynth's grid, from one header.

A scheduler uses it to declare each ingest task's memory, so that a node never runs more cases at once than fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import pydicom

from ctsynth_ray.ingest.cases import LidcCase, NiftiCase

#: Slice spacing assumed for a series whose first header gives none (thin slices: the larger volume).
DEFAULT_SLICE_MM = 1.0


def _slice_step(case: LidcCase, first) -> float:
    """The slice step: SpacingBetweenSlices where given; else the gap between the first two files (named in
    order in TCIA's downloads), never above the slice thickness, so that the estimate errs on the large side
    (overlapping reconstructions step less than their thickness; an unordered pair gaps more than one step)."""
    thickness = float(first.get("SliceThickness") or DEFAULT_SLICE_MM)
    if first.get("SpacingBetweenSlices"):
        return float(first.SpacingBetweenSlices)
    if len(case.series.files) > 1:
        second = pydicom.dcmread(case.series.files[1], stop_before_pixels=True, specific_tags=["ImagePositionPatient"])
        gap = abs(float(second.ImagePositionPatient[2]) - float(first.ImagePositionPatient[2]))
        if gap > 0:
            return min(gap, thickness)
    return thickness


def case_voxels(case: LidcCase | NiftiCase, spacing_mm: Sequence[float]) -> tuple[int, int]:
    """(voxels of the source volume, voxels after resampling to ``spacing_mm``), from the first DICOM header or
    the NIfTI header; (0, 0) when the header cannot be read (the case itself will report why)."""
    try:
        if isinstance(case, NiftiCase):
            header = nib.load(case.image).header
            shape, source_mm = header.get_data_shape()[:3], header.get_zooms()[:3]
        else:
            ds = pydicom.dcmread(case.series.files[0], stop_before_pixels=True)
            shape = (int(ds.Columns), int(ds.Rows), len(case.series.files))
            source_mm = (float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]), _slice_step(case, ds))
    except Exception:  # an unreadable header: the case fails on its own, with the file and the reason
        return 0, 0
    source = int(np.prod(shape, dtype=np.int64))
    output = int(np.prod([np.ceil(n * s / t) for n, s, t in zip(shape, source_mm, spacing_mm)]))
    return source, output
