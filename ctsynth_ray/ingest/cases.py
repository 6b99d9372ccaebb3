"""Ingest cases: find them in a source tree, and turn one case into one volume of the dataset layout.

A case function never raises for bad input: it returns a :class:`CaseResult` whose ``error`` names the
case, the file and the reason, and it removes whatever it had written for that case.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ctsynth_ray.dataset import TARGET_SPACING_MM, Volume, describe_nodule, spacing_from_affine, write_volume
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.ingest.dicom import DicomError, SeriesFiles, find_series, read_series, safe_id, volume_ids
from ctsynth_ray.ingest.lidc_xml import LidcReading, consensus_nodules, group_annotations, parse_lidc_xml, rasterise
from ctsynth_ray.resample import resample_hu, resample_mask, target_shape
from ctsynth_ray.storage import location

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MASK_SUFFIXES = ("_mask", "_seg", "_label")


@dataclass
class CaseResult:
    """The outcome of one case: a manifest row, or an error {case, file, reason}; notes are informational."""

    case: str
    row: dict | None = None
    error: dict | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class LidcCase:
    volume_id: str
    series: SeriesFiles
    xml_paths: list[Path]


@dataclass
class NiftiCase:
    volume_id: str
    image: Path
    mask: Path | None


def split_for(volume_id: str, fractions: Sequence[float]) -> str:
    """A split that depends only on ``volume_id`` (a stable hash), so re-ingesting never reshuffles. Ingest passes
    the patient's id, so that every scan of a patient lands in one split."""
    u = int.from_bytes(hashlib.sha256(volume_id.encode()).digest()[:8], "big") / 2**64
    edges = np.cumsum(fractions)
    for name, edge in zip(("train", "val", "test"), edges):
        if u < edge:
            return name
    return "test"


def error(case: str, file, reason: str) -> dict:
    return {"case": case, "file": str(file), "reason": reason}


# ---------------------------------------------------------------------------------------------- LIDC


def find_lidc_cases(src: str | os.PathLike) -> tuple[list[LidcCase], list[dict]]:
    """CT series under ``src`` matched to LIDC XMLs by SeriesInstanceUID.

    Returns the cases and the problems found while searching: unreadable headers, unreadable XML, and
    XMLs whose series is not in ``src`` (orphans). Byte-identical copies of an XML count once.
    """
    src = Path(src)
    if not src.is_dir():
        raise CtsynthError(f"{src}: not a folder")
    series, header_problems = find_series(src)
    problems = [error(str(Path(p.file).parent.name), p.file, p.reason) for p in header_problems]
    readings: list[LidcReading] = []
    seen: set[bytes] = set()
    for xml in sorted(src.rglob("*.xml")):
        # A second copy of one XML (the series folder's and the XML zip's) is not a second reading round: it
        # would double every reader and let --min-readers 3 keep nodules two radiologists marked.
        digest = hashlib.sha256(xml.read_bytes()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        try:
            reading = parse_lidc_xml(xml)
        except CtsynthError as exc:
            problems.append(error(xml.stem, xml, str(exc).split(": ", 1)[-1]))
            continue
        if reading is not None:
            readings.append(reading)
    ids = volume_ids(series)
    cases = [
        LidcCase(vid, s, [r.path for r in readings if r.series_uid == s.series_uid and s.series_uid])
        for vid, s in zip(ids, series)
    ]
    known = {s.series_uid for s in series}
    for reading in readings:
        if reading.series_uid not in known:
            problems.append(
                error(
                    reading.path.stem,
                    reading.path,
                    f"no DICOM series with SeriesInstanceUID {reading.series_uid} in {src}",
                )
            )
    return cases, problems


def ingest_lidc_case(
    root: str | os.PathLike,
    case: LidcCase,
    *,
    spacing_mm: Sequence[float] = TARGET_SPACING_MM,
    min_readers: int = 3,
    split: str = "train",
) -> CaseResult:
    """Read one LIDC case (series + its XMLs), make the consensus mask, resample, write; see the module doc."""
    result = CaseResult(case=case.volume_id)
    try:
        ct = read_series(case.series)
        annotations, n_readers = [], 0
        for xml in case.xml_paths:
            reading = parse_lidc_xml(xml)
            # Several XMLs for one series are several reading rounds: readers are numbered per file.
            for a in rasterise(reading, ct.sop_uids, ct.z_positions_mm, ct.hu.shape):
                a.reader += n_readers
                annotations.append(a)
            n_readers += reading.n_readers
        if not case.xml_paths:
            result.notes.append(
                f"{case.volume_id}: no LIDC reader XML for series {ct.series_uid or '(no SeriesInstanceUID)'}: empty mask"
            )
        groups = group_annotations(annotations, ct.spacing_mm)
        shape = target_shape(ct.hu.shape, ct.spacing_mm, spacing_mm)
        mask = np.zeros(shape, np.uint8)
        affine = _rescaled_affine(ct.affine, spacing_mm)
        nodules = []
        # The masks before the image: the peak is then the series, the mask and the image, one float32 plane aside.
        for nodule in consensus_nodules(annotations, groups, min_readers):
            resampled = resample_mask(
                nodule.mask, ct.spacing_mm, spacing_mm, shape, origin=nodule.origin, source_shape=ct.hu.shape
            )
            if resampled.any():
                nodules.append({**describe_nodule(resampled, affine), "n_readers": nodule.n_readers})
                mask |= resampled
        hu = resample_hu(ct.hu, ct.spacing_mm, spacing_mm, shape)
        volume = Volume(case.volume_id, hu, mask, affine)
        result.row = write_volume(
            root, volume, split=split, source="lidc", nodules=nodules, series_uid=ct.series_uid,
            patient_id=ct.patient_id, n_readers=n_readers, n_slices_dicom=len(ct.sop_uids),
            source_spacing_x=ct.spacing_mm[0], source_spacing_y=ct.spacing_mm[1], source_spacing_z=ct.spacing_mm[2],
        )  # fmt: skip
    except DicomError as exc:
        result.error = error(case.volume_id, exc.file, exc.reason)
    except CtsynthError as exc:
        file, _, reason = str(exc).partition(": ")
        result.error = error(case.volume_id, file, reason)
    except Exception as exc:  # a bug or an unforeseen file: report it for this case, go on with the others
        result.error = error(case.volume_id, case.series.files[0].parent, f"{type(exc).__name__}: {exc}")
    if result.error is not None:
        _remove_case_files(root, case.volume_id)
    return result


def _rescaled_affine(affine: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """The same grid origin and directions with a new voxel size (what :func:`resample_hu` makes)."""
    out = np.array(affine, float)
    out[:3, :3] = out[:3, :3] / np.linalg.norm(out[:3, :3], axis=0) * np.asarray(spacing_mm, float)
    return out


def _remove_case_files(root, volume_id: str) -> None:
    for sub in ("images", "masks", "labels"):
        (location(root) / sub / f"{volume_id}.nii.gz").unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- NIfTI


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_nifti_cases(src: str | os.PathLike) -> tuple[list[NiftiCase], list[dict]]:
    """Image / mask pairs under ``src``: ``images/<id>.nii.gz`` with ``masks/<id>.nii.gz``, or
    ``<id>.nii.gz`` with ``<id>_mask.nii.gz`` (``_seg``, ``_label`` too) in one folder."""
    src = Path(src)
    if not src.is_dir():
        raise CtsynthError(f"{src}: not a folder")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    masks = {}
    images = []
    for path in files:
        stem = _stem(path)
        if path.parent.name == "masks":
            masks[(path.parent.parent, stem)] = path
        elif stem.endswith(MASK_SUFFIXES):
            masks[(path.parent, stem.rsplit("_", 1)[0])] = path
        else:
            images.append(path)
    cases, problems = [], []
    for image in images:
        stem = _stem(image)
        base = image.parent.parent if image.parent.name == "images" else image.parent
        mask = masks.get((base, stem)) or masks.get((image.parent, stem))
        if mask is None:
            problems.append(
                error(stem, image, f"no mask: expected {base / 'masks' / image.name} or {stem}_mask.nii.gz")
            )
            continue
        cases.append(NiftiCase(safe_id(stem), image, mask))
    return cases, problems


def ingest_nifti_case(
    root: str | os.PathLike, case: NiftiCase, *, spacing_mm: Sequence[float] = TARGET_SPACING_MM, split: str = "train"
) -> CaseResult:
    """Reorient an image / mask pair to RAS+, clean HU, resample to ``spacing_mm`` when it differs, write."""
    result = CaseResult(case=case.volume_id)
    current = case.image
    try:
        image = _load_canonical(case.image)
        current = case.mask
        mask_image = _load_canonical(case.mask)
        if mask_image.shape != image.shape or not np.allclose(mask_image.affine, image.affine, atol=1e-3):
            raise CtsynthError(f"{case.mask}: mask grid {mask_image.shape} does not match the image grid {image.shape}")
        current = case.image
        source_spacing = spacing_from_affine(image.affine)
        # Unscaled voxels stay in their stored type (int16 CT: half a float32 volume); resample_hu makes each plane
        # float32 exactly as converting the whole volume would. Scaled ones take nibabel's float32 scaling as before.
        scaled = nib.is_proxy(image.dataobj) and (image.dataobj.slope, image.dataobj.inter) != (1, 0)
        data = np.asarray(image.dataobj, np.float32) if scaled else np.asarray(image.dataobj)
        marked = np.asarray(mask_image.dataobj) != 0
        if np.allclose(source_spacing, spacing_mm, atol=1e-4):
            hu, mask = resample_hu(data, source_spacing, source_spacing), marked.astype(np.uint8)
        else:
            hu = resample_hu(data, source_spacing, spacing_mm)
            mask = resample_mask(
                marked, source_spacing, spacing_mm, target_shape(data.shape, source_spacing, spacing_mm)
            )
        affine = _rescaled_affine(image.affine, spacing_mm)
        result.row = write_volume(
            root, Volume(case.volume_id, hu, mask, affine), split=split, source="nifti",
            source_file=str(case.image), source_spacing_x=source_spacing[0], source_spacing_y=source_spacing[1],
            source_spacing_z=source_spacing[2],
        )  # fmt: skip
    except CtsynthError as exc:
        file, _, reason = str(exc).partition(": ")
        result.error = error(case.volume_id, file, reason)
    except Exception as exc:
        result.error = error(case.volume_id, current, f"{type(exc).__name__}: {exc}")
    if result.error is not None:
        _remove_case_files(root, case.volume_id)
    return result


def _load_canonical(path: Path):
    try:
        image = nib.as_closest_canonical(nib.load(path))
        if len(image.shape) != 3:
            raise CtsynthError(f"{path}: expected a 3D volume, found shape {image.shape}")
        return image
    except CtsynthError:
        raise
    except Exception as exc:
        raise CtsynthError(f"{path}: not a readable NIfTI file ({exc})") from None
