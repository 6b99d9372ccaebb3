"""Write a volume as a DICOM CT series and its nodule mask as an LIDC reader XML.

The inverse of ingest: the demo uses it to show the LIDC ingest on phantoms, tests use it to make series
with exactly the property under test (rescale, padding, slice order, gaps), and users can hand phantoms
to tools that only read DICOM.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import contourpy
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from ctsynth_ray.dataset import Volume, spacing_from_affine
from ctsynth_ray.ingest.dicom import LPS_TO_RAS

LIDC_NAMESPACE = "http://www.nih.gov"
_IN_PLANE = np.zeros((3, 3, 3), bool)  # readers outline slice by slice: grow or shrink in-plane only
_IN_PLANE[:, :, 1] = ndimage.generate_binary_structure(2, 1)


def write_dicom_series(
    volume: Volume,
    folder: str | os.PathLike,
    *,
    patient_id: str,
    series_uid: str | None = None,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    padding_value: int | None = None,
    padding_mask: np.ndarray | None = None,
) -> tuple[str, list[str]]:
    """Write ``volume.hu`` as one axial CT slice per file ``folder/1-001.dcm`` ... (stored = (HU - intercept) /
    slope as int16). Where ``padding_mask`` is set, the stored value is ``padding_value`` (out of field).

    Returns the series UID and the SOP instance UIDs by z index.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    affine_lps = LPS_TO_RAS @ volume.affine  # the flip is its own inverse
    spacing = spacing_from_affine(volume.affine)
    row_dir = affine_lps[:3, 0] / spacing[0]
    col_dir = affine_lps[:3, 1] / spacing[1]
    sop_uids = []
    for k in range(volume.hu.shape[2]):
        stored = np.rint((volume.hu[:, :, k].astype(np.float64) - rescale_intercept) / rescale_slope)
        stored = np.clip(stored, -32768, 32767).astype(np.int16)
        if padding_mask is not None:
            stored[padding_mask[:, :, k]] = padding_value
        ds = _ct_slice(stored.T, patient_id, study_uid, series_uid)
        position = affine_lps @ np.array([0, 0, k, 1.0])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position[:3]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing[1]:.8f}", f"{spacing[0]:.8f}"]  # row spacing, column spacing
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.InstanceNumber = k + 1
        ds.RescaleSlope = f"{rescale_slope:g}"
        ds.RescaleIntercept = f"{rescale_intercept:g}"
        if padding_value is not None:
            ds.PixelPaddingValue = int(padding_value)
        ds.save_as(folder / f"1-{k + 1:03d}.dcm", enforce_file_format=True)
        sop_uids.append(str(ds.SOPInstanceUID))
    return series_uid, sop_uids


def _ct_slice(pixels: np.ndarray, patient_id: str, study_uid: str, series_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def outline_just_outside(mask_2d: np.ndarray) -> list[np.ndarray]:
    """Closed outlines (x, y pixel points, in order) drawn on the pixels just outside each region of a 2D
    mask, as LIDC readers drew them."""
    outlines = []
    padded = np.pad(mask_2d.astype(np.float64), 1)
    for line in contourpy.contour_generator(z=padded.T, name="serial").lines(0.5):
        # Each vertex sits on a grid edge between a pixel inside and one outside: take the outside one.
        points = []
        for x, y in line - 1:
            candidates = [(int(np.floor(x)), int(np.floor(y))), (int(np.ceil(x)), int(np.ceil(y)))]
            outside = [c for c in candidates if not _inside(mask_2d, c)]
            point = outside[0] if outside else candidates[0]
            if not points or points[-1] != point:
                points.append(point)
        if len(points) > 2:
            outlines.append(np.array(points))
    return outlines


def _inside(mask_2d: np.ndarray, point) -> bool:
    x, y = point
    return 0 <= x < mask_2d.shape[0] and 0 <= y < mask_2d.shape[1] and bool(mask_2d[x, y])


def write_lidc_xml(
    path: str | os.PathLike,
    series_uid: str,
    sop_uids: Sequence[str],
    z_positions_mm: Sequence[float],
    reader_masks: Sequence[np.ndarray],
) -> Path:
    """An LIDC ``LidcReadMessage`` with one ``readingSession`` per reader mask (x, y, z uint8 arrays):
    each connected region of a reader's mask becomes one ``unblindedReadNodule`` outlined slice by slice."""
    ET.register_namespace("", LIDC_NAMESPACE)

    def sub(parent, tag, text=None):
        element = ET.SubElement(parent, f"{{{LIDC_NAMESPACE}}}{tag}")
        if text is not None:
            element.text = str(text)
        return element

    root = ET.Element(f"{{{LIDC_NAMESPACE}}}LidcReadMessage")
    header = sub(root, "ResponseHeader")
    sub(header, "SeriesInstanceUid", series_uid)
    for reader, mask in enumerate(reader_masks):
        session = sub(root, "readingSession")
        sub(session, "servicingRadiologistID", f"reader-{reader + 1}")
        labelled, count = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), bool))
        for n in range(1, count + 1):
            nodule = sub(session, "unblindedReadNodule")
            sub(nodule, "noduleID", f"Nodule {n:03d}")
            region = labelled == n
            for k in np.flatnonzero(region.any(axis=(0, 1))):
                for outline in outline_just_outside(region[:, :, k]):
                    roi = sub(nodule, "roi")
                    sub(roi, "imageZposition", f"{z_positions_mm[k]:.6f}")
                    sub(roi, "imageSOP_UID", sop_uids[k])
                    sub(roi, "inclusion", "TRUE")
                    for x, y in outline:
                        edge = sub(roi, "edgeMap")
                        sub(edge, "xCoord", int(x))
                        sub(edge, "yCoord", int(y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, xml_declaration=True, encoding="UTF-8")
    return path


def export_lidc_case(volume: Volume, folder: str | os.PathLike, *, n_readers: int = 4, seed: int = 0) -> Path:
    """Write ``volume`` as a TCIA-style LIDC case: ``folder/<id>/dicom/*.dcm`` and ``folder/<id>/<id>.xml`` with
    ``n_readers`` readers whose outlines differ a little (each grows or shrinks the mask by a voxel at random)."""
    case = Path(folder) / volume.volume_id
    series_uid, sop_uids = write_dicom_series(volume, case / "dicom", patient_id=volume.volume_id)
    affine_lps = LPS_TO_RAS @ volume.affine
    z_positions = [float((affine_lps @ np.array([0, 0, k, 1.0]))[2]) for k in range(volume.hu.shape[2])]
    rng = np.random.default_rng(seed)
    readers = []
    for _ in range(n_readers):
        change = rng.choice(["same", "grow", "shrink"], p=[0.5, 0.25, 0.25])
        mask = volume.mask > 0
        if change == "grow":
            mask = ndimage.binary_dilation(mask, structure=_IN_PLANE)
        elif change == "shrink":
            shrunk = ndimage.binary_erosion(mask, structure=_IN_PLANE)
            if ndimage.label(shrunk)[1] == ndimage.label(mask)[1]:  # never erase a small nodule
                mask = shrunk
        readers.append(mask.astype(np.uint8))
    write_lidc_xml(case / f"{volume.volume_id}.xml", series_uid, sop_uids, z_positions, readers)
    return case
