"""DICOM CT series: find them in a folder tree, check them, and read them as HU with a RAS affine."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.resample import clean_hu_in_place

#: Files never read as DICOM while searching a tree.
_NOT_DICOM_SUFFIXES = {".xml", ".txt", ".json", ".csv", ".md", ".nii", ".gz", ".png", ".jpg", ".zip", ".parquet"}
_HEADER_TAGS = [
    "SeriesInstanceUID", "PatientID", "Modality", "ImageType", "SOPInstanceUID",
]  # fmt: skip
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DicomError(CtsynthError):
    """A problem with one DICOM file or series: ``file`` names the culprit, ``reason`` says what is wrong."""

    def __init__(self, file: str | os.PathLike, reason: str):
        self.file = str(file)
        self.reason = reason
        super().__init__(f"{file}: {reason}")


@dataclass
class SeriesFiles:
    """The files of one CT series found in a tree (localizers and other modalities left out)."""

    series_uid: str
    patient_id: str
    files: list[Path] = field(default_factory=list)


@dataclass
class CtSeries:
    """A CT series read and checked: ``hu`` int16 (x = column, y = row, z = slice along the normal)."""

    hu: np.ndarray
    affine: np.ndarray  # RAS+, mm
    sop_uids: list[str]  # per z index
    z_positions_mm: np.ndarray  # ImagePositionPatient z per z index (LIDC XML's imageZposition)
    series_uid: str
    patient_id: str

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def find_series(src: str | os.PathLike) -> tuple[list[SeriesFiles], list[DicomError]]:
    """All CT series under ``src`` grouped by SeriesInstanceUID (by folder where the UID is empty).

    Returns the series and the files whose header could not be read (non-DICOM files are ignored).
    """
    groups: dict[str, SeriesFiles] = {}
    problems: list[DicomError] = []
    for path in sorted(Path(src).rglob("*")):
        if not path.is_file() or path.suffix.lower() in _NOT_DICOM_SUFFIXES or path.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except InvalidDicomError:
            continue
        except Exception as exc:  # a damaged header: pydicom raises several types
            problems.append(DicomError(path, f"unreadable DICOM header ({exc})"))
            continue
        if str(ds.get("Modality", "")) != "CT":
            continue
        if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        key = uid or f"folder:{path.parent}"
        if key not in groups:
            groups[key] = SeriesFiles(series_uid=uid, patient_id=str(ds.get("PatientID", "") or ""))
        groups[key].files.append(path)
    return list(groups.values()), problems


def _required(ds, name: str, path: Path):
    value = ds.get(name)
    if value is None or value == "":
        raise DicomError(path, f"missing {name}")
    return value


def read_series(series: SeriesFiles) -> CtSeries:
    """Read, sort and check a series; HU = stored x RescaleSlope + RescaleIntercept, cleaned by
    :func:`ctsynth_ray.resample.clean_hu` (padding and < -1024 HU become air, > 1900 HU soft tissue), held as
    int16 in Fortran order (each z-plane contiguous) and built one plane at a time.

    Raises DicomError naming the file for: unreadable or truncated pixel data, an undecodable transfer
    syntax, missing rescale or geometry tags, a non-axial or mixed orientation, differing pixel
    spacing or size, two slices at one position, a missing slice, or uneven slice spacing.
    """
    slices = []
    for path in series.files:
        try:
            # Pixel data stays in the file until its slice is decoded: the series is never held twice.
            ds = pydicom.dcmread(path, defer_size="64 KB")
        except Exception as exc:
            raise DicomError(path, f"unreadable DICOM ({exc})") from None
        orientation = np.array(_required(ds, "ImageOrientationPatient", path), float)
        position = np.array(_required(ds, "ImagePositionPatient", path), float)
        spacing = np.array(_required(ds, "PixelSpacing", path), float)
        for tag in ("RescaleSlope", "RescaleIntercept"):
            _required(ds, tag, path)
        slices.append((path, ds, orientation, position, spacing))
    if len(slices) < 2:
        raise DicomError(series.files[0], "a series needs at least 2 slices")

    path0, ds0, orientation0, _, spacing0 = slices[0]
    for path, ds, orientation, _, spacing in slices[1:]:
        if not np.allclose(orientation, orientation0, atol=1e-4):
            raise DicomError(path, "ImageOrientationPatient differs from the rest of the series")
        if not np.allclose(spacing, spacing0, atol=1e-4) or (ds.Rows, ds.Columns) != (ds0.Rows, ds0.Columns):
            raise DicomError(path, "pixel spacing or image size differs from the rest of the series")
    row_dir, col_dir = orientation0[:3], orientation0[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(normal[2]) < 0.99:
        raise DicomError(path0, f"not an axial series (slice normal {np.round(normal, 3).tolist()})")

    slices.sort(key=lambda s: float(s[3] @ normal))
    along = np.array([s[3] @ normal for s in slices])
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        k = int(np.argmin(gaps))
        raise DicomError(slices[k + 1][0], f"two slices at the same position {along[k]:.2f} mm")
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > max(0.01 * step, 0.01))
    if bad.size:
        k = int(bad[0])
        if gaps[k] > 1.5 * step:
            raise DicomError(
                slices[k + 1][0],
                f"missing slice: a {gaps[k]:.2f} mm gap between {along[k]:.2f} and {along[k + 1]:.2f} mm "
                f"where the series steps {step:.2f} mm",
            )
        raise DicomError(slices[k + 1][0], f"uneven slice spacing ({gaps[k]:.2f} mm against {step:.2f} mm)")

    sop_uids = [str(s[1].get("SOPInstanceUID", "")) for s in slices]
    positions = [s[3] for s in slices]
    hu = np.empty((int(ds0.Columns), int(ds0.Rows), len(slices)), np.int16, order="F")  # z-planes contiguous
    for k, (path, ds, *_) in enumerate(slices):
        slices[k] = None  # and leaves memory once decoded
        try:
            stored = ds.pixel_array
        except Exception as exc:
            syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
            raise DicomError(path, f"pixel data cannot be decoded (transfer syntax {syntax}: {exc})") from None
        plane = stored.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        out_of_field = None
        padding = ds.get("PixelPaddingValue")
        if padding is not None:
            if int(ds.get("PixelRepresentation", 0)) == 1 and padding > 32767:
                padding -= 65536  # a signed image's padding value stored as unsigned
            out_of_field = stored == padding
        clean_hu_in_place(plane, out_of_field)
        hu[:, :, k] = plane.T  # (rows, cols) -> (x = column, y = row)

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * spacing0[1]  # along a row = increasing column index
    affine_lps[:3, 1] = col_dir * spacing0[0]
    affine_lps[:3, 2] = normal * step
    affine_lps[:3, 3] = positions[0]
    return CtSeries(
        hu=hu,
        affine=LPS_TO_RAS @ affine_lps,
        sop_uids=sop_uids,
        z_positions_mm=np.array([p[2] for p in positions]),
        series_uid=series.series_uid,
        patient_id=series.patient_id,
    )


def volume_ids(series: list[SeriesFiles]) -> list[str]:
    """volume_id per series: the PatientID (the series' folder name where it is empty), suffixed
    ``_1``, ``_2``, ... in SeriesInstanceUID order when a patient has several series."""
    names = [safe_id(s.patient_id or s.files[0].parent.name) for s in series]
    ids = list(names)
    for name in set(names):
        members = [k for k, n in enumerate(names) if n == name]
        if len(members) > 1:
            for n, k in enumerate(sorted(members, key=lambda k: series[k].series_uid), start=1):
                ids[k] = f"{name}_{n}"
    return ids


def safe_id(text: str) -> str:
    """A volume id usable as a file name: letters, digits, '.', '_' and '-' only."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")
    return cleaned or "volume"
