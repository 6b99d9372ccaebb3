"""The one dataset layout of ctsynth, and its one reader and writer.

Every stage (phantoms, ingest, label maps, generation) reads and writes::

    DATASET/manifest.parquet       one row per volume, paths relative to DATASET
    DATASET/images/<id>.nii.gz     int16 HU
    DATASET/masks/<id>.nii.gz      uint8 nodule mask, values {0, 1}
    DATASET/labels/<id>.nii.gz     uint8 label map (where made)

Arrays are indexed (x, y, z) and every NIfTI carries a RAS+ affine (x to the patient's right, y anterior,
z superior) in millimetres. Files are written under a temporary name and renamed, so a reader never
sees half a file; a whole new dataset is built in a staging folder and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from isal import igzip
from scipy import ndimage

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.storage import Remote, location, remote_dataset

MANIFEST_NAME = "manifest.parquet"
#: What ``prepare`` last did with a dataset: its GAN data, template bank and the volumes that trained the GAN.
PREPARE_RECORD = "prepare.json"
TARGET_SPACING_MM: tuple[float, float, float] = (0.48828125, 0.48828125, 1.0)
SPLITS = ("train", "val", "test")
SOURCES = ("lidc", "nifti", "phantom", "synthetic")

NODULE_TYPE = pa.struct(
    [
        ("center_x_mm", pa.float64()),
        ("center_y_mm", pa.float64()),
        ("center_z_mm", pa.float64()),
        ("volume_mm3", pa.float64()),
        ("diameter_mm", pa.float64()),
        ("n_readers", pa.int32()),  # LIDC: readers who marked it (null elsewhere)
    ]
)

#: Columns every manifest has, with their Arrow types. Extra columns are allowed and kept.
REQUIRED_COLUMNS: dict[str, pa.DataType] = {
    "volume_id": pa.string(),
    "image": pa.string(),  # null for label-only volumes (synth-labels, before generation)
    "mask": pa.string(),
    "label": pa.string(),  # null until a label map is made
    "split": pa.string(),
    "source": pa.string(),
    "shape_x": pa.int32(),
    "shape_y": pa.int32(),
    "shape_z": pa.int32(),
    "spacing_x": pa.float64(),
    "spacing_y": pa.float64(),
    "spacing_z": pa.float64(),
    "n_nodules": pa.int32(),
    "nodule_voxels": pa.int64(),
}
#: Optional columns with a fixed type (so an all-empty column still has the right type).
TYPED_OPTIONAL_COLUMNS: dict[str, pa.DataType] = {"nodules": pa.list_(NODULE_TYPE)}


@dataclass
class Volume:
    """One CT volume of the dataset layout: HU image, nodule mask, optional label map, RAS affine.

    Arrays are (x, y, z); ``hu`` int16, ``mask`` uint8 in {0, 1}, ``label`` uint8.
    """

    volume_id: str
    hu: np.ndarray | None
    mask: np.ndarray
    affine: np.ndarray
    label: np.ndarray | None = None

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (the column norms of the affine's 3x3 part)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def centred_affine(shape: Sequence[int], spacing_mm: Sequence[float]) -> np.ndarray:
    """A RAS+ affine with the given voxel size whose world origin is the centre of the grid."""
    affine = np.diag([*map(float, spacing_mm), 1.0])
    affine[:3, 3] = -(np.asarray(shape, float) - 1) / 2 * np.asarray(spacing_mm, float)
    return affine


# --------------------------------------------------------------------------------------------- files


def _temp_sibling(path: Path) -> Path:
    # Keeps the real suffixes (.nii.gz) so writers pick the right format, and a leading dot so a
    # listing of the folder never shows it as a finished file.
    return path.with_name(f".{uuid.uuid4().hex[:12]}.tmp.{path.name}")


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, timings: dict | None = None) -> None:
    """Write ``array`` with ``affine`` to ``path`` (.nii or .nii.gz) atomically: temp name, then rename.

    The array's dtype is stored as is (no scaling): int16 HU stay int16 HU. Header and voxels stream to the file
    one z-plane at a time (Fortran order; a C-ordered array is transposed plane by plane), through ISA-L's gzip
    for .nii.gz, so no encoded copy of the volume is ever held; on an object store the file is one object, built
    in memory. ``timings``, when given, gains the seconds spent encoding, compressing and writing the temp file
    (``compression``) and renaming it into place or uploading it (``write``).
    """
    started = time.perf_counter()
    path = location(path)
    image = nib.Nifti1Image(array, np.asarray(affine, float))
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm")
    image.set_qform(np.asarray(affine, float), code=1)
    image.set_sform(np.asarray(affine, float), code=1)

    def encode(stream) -> None:
        if path.name.endswith(".gz"):
            # ISA-L's gzip (standard gzip output) at level 1 writes ~2.5x faster than zlib's level 1. No name and
            # no time stamp in the gzip header: the same volume, the same bytes.
            with igzip.IGzipFile(filename="", mode="wb", compresslevel=1, fileobj=stream, mtime=0) as gz:
                image.to_stream(gz)
        else:
            image.to_stream(stream)

    if isinstance(path, Remote):
        buffer = io.BytesIO()
        encode(buffer)
        encoded = time.perf_counter()
        path.write_bytes(buffer.getvalue())
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = _temp_sibling(path)
        try:
            with open(temp, "wb") as stream:
                encode(stream)
            encoded = time.perf_counter()
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
    if timings is not None:
        timings["compression"] = timings.get("compression", 0.0) + encoded - started
        timings["write"] = timings.get("write", 0.0) + time.perf_counter() - encoded


def write_bytes(path: Path | Remote, data: bytes) -> None:
    """Write ``data`` to ``path`` whole: a temp name then a rename locally, one object on an object store."""
    if isinstance(path, Remote):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(path)
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def read_nifti(path: str | os.PathLike | Remote) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file as (array in its on-disk dtype, 4x4 affine). Raises CtsynthError if unreadable.

    A gzipped NIfTI-1 file with unscaled voxels (what :func:`write_nifti` makes) is inflated by ISA-L straight into
    the array, 8 MB at a time; any other file (scaled voxels, plain .nii, NIfTI-2) is read by nibabel. Either way
    the array and the affine are what ``nib.load`` gives.
    """
    path = location(path)
    if not path.is_file():
        raise CtsynthError(f"{path}: file not found")
    try:
        data = path.read_bytes() if isinstance(path, Remote) else None
        gzipped = path.name.endswith(".gz") if data is None else data[:2] == b"\x1f\x8b"
        array = None
        if gzipped:
            with igzip.open(path if data is None else io.BytesIO(data), "rb") as gz:
                raw = gz.read(348)
                # A NIfTI-1 single file (sizeof_hdr 348 in either byte order, magic "n+1"), as nibabel sniffs it.
                if raw[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c") and raw[344:] == b"n+1\x00":
                    header = nib.Nifti1Header(raw)
                    if header.get_slope_inter() in ((None, None), (1.0, 0.0)):
                        gz.seek(int(header.get_data_offset()))
                        array = np.empty(header.get_data_shape(), header.get_data_dtype(), order="F")
                        voxels = array.reshape(-1, order="F").view(np.uint8)  # its bytes in file order
                        for start in range(0, len(voxels), 1 << 23):
                            chunk = voxels[start : start + (1 << 23)]
                            if gz.readinto(chunk) != len(chunk):
                                raise EOFError("the voxel data ends early")
                        affine = header.get_best_affine()
        if array is None:
            if data is None:
                image = nib.load(path)
            else:
                image = nib.Nifti1Image.from_bytes(igzip.decompress(data) if gzipped else data)
            array, affine = np.asarray(image.dataobj), image.affine
    except Exception as exc:  # nibabel raises many types for damaged files
        raise CtsynthError(f"{path}: not a readable NIfTI file ({exc})") from None
    if array.ndim != 3:
        raise CtsynthError(f"{path}: expected a 3D volume, found shape {array.shape}")
    return array, np.asarray(affine, float)


def write_parquet(path: Path | Remote, table: pa.Table) -> None:
    """Write a Parquet file atomically (creating its folder)."""
    if isinstance(path, Remote):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        path.write_bytes(sink.getvalue().to_pybytes())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(path)
    try:
        pq.write_table(table, temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def crop_cube(array: np.ndarray, origin, size: int, fill) -> np.ndarray:
    """A ``size``^3 cube (a ``size``^2 square for a 2D array) of ``array`` whose first voxel is ``origin``; parts
    outside the array are ``fill``."""
    origin = np.asarray(origin, int)
    out = np.full((size,) * array.ndim, fill, array.dtype)
    lo, hi = np.maximum(origin, 0), np.minimum(origin + size, array.shape)
    if np.all(hi > lo):
        out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))] = array[
            tuple(slice(a, b) for a, b in zip(lo, hi))
        ]
    return out


# ------------------------------------------------------------------------------------------- nodules


def measure_nodules(mask: np.ndarray, affine: np.ndarray) -> list[dict]:
    """Connected nodule components of ``mask`` (26-connected), each as :func:`describe_nodule` gives it."""
    present = [np.flatnonzero(np.asarray(mask).any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(p.size == 0 for p in present):
        return []
    # Label only the mask's bounding box: nodules are small, volumes are not.
    offset = np.array([p[0] for p in present])
    crop = np.asarray(mask)[tuple(slice(p[0], p[-1] + 1) for p in present)] > 0
    labelled, _ = ndimage.label(crop, structure=np.ones((3, 3, 3), bool))
    records = []
    for k, box in enumerate(ndimage.find_objects(labelled), start=1):
        where = np.nonzero(labelled[box] == k)
        centre = offset + [w.mean() + s.start for w, s in zip(where, box)]
        records.append(_nodule_record(float(len(where[0])), centre, affine))
    return records


def describe_nodule(mask: np.ndarray, affine: np.ndarray) -> dict:
    """All voxels of ``mask`` as one nodule: centroid (RAS mm), volume (mm^3), equal-volume diameter (mm)."""
    voxels = np.argwhere(mask > 0)
    return _nodule_record(float(len(voxels)), voxels.mean(0), affine)


def _nodule_record(n_voxels: float, centre_index, affine: np.ndarray) -> dict:
    world = np.asarray(affine, float) @ np.array([*centre_index, 1.0])
    volume = n_voxels * float(np.prod(spacing_from_affine(affine)))
    return {
        "center_x_mm": float(world[0]),
        "center_y_mm": float(world[1]),
        "center_z_mm": float(world[2]),
        "volume_mm3": volume,
        "diameter_mm": float((6 * volume / np.pi) ** (1 / 3)),
    }


# ------------------------------------------------------------------------------------------ manifest


def write_volume(root: str | os.PathLike, volume: Volume, split: str, source: str, timings: dict | None = None,
                 **extra) -> dict:  # fmt: skip
    """Write a volume's files under ``root`` and return its manifest row (paths relative to root).

    ``extra`` becomes extra manifest columns; ``nodules`` (a list of dicts as from
    :func:`measure_nodules`) is computed from the mask unless given. ``timings`` as :func:`write_nifti`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    root = location(root)
    vid = volume.volume_id
    row: dict = {"volume_id": vid, "image": None, "mask": f"masks/{vid}.nii.gz", "label": None}
    if volume.hu is not None:
        _check_array(vid, "image", volume.hu, np.int16, volume.mask.shape)
        row["image"] = f"images/{vid}.nii.gz"
        write_nifti(root / row["image"], volume.hu, volume.affine, timings)
    _check_array(vid, "mask", volume.mask, np.uint8, volume.mask.shape)
    write_nifti(root / row["mask"], volume.mask, volume.affine, timings)
    if volume.label is not None:
        _check_array(vid, "label", volume.label, np.uint8, volume.mask.shape)
        row["label"] = f"labels/{vid}.nii.gz"
        write_nifti(root / row["label"], volume.label, volume.affine, timings)
    nodules = extra.pop("nodules", None)
    if nodules is None:
        nodules = measure_nodules(volume.mask, volume.affine)
    spacing = volume.spacing_mm
    row.update(
        split=split,
        source=source,
        shape_x=int(volume.mask.shape[0]),
        shape_y=int(volume.mask.shape[1]),
        shape_z=int(volume.mask.shape[2]),
        spacing_x=spacing[0],
        spacing_y=spacing[1],
        spacing_z=spacing[2],
        n_nodules=len(nodules),
        nodule_voxels=int(np.count_nonzero(volume.mask)),
        nodules=nodules,
    )
    row.update(extra)
    return row


def _check_array(vid: str, kind: str, array: np.ndarray, dtype, shape) -> None:
    if array.dtype != dtype:
        raise ValueError(f"{vid}: {kind} must be {np.dtype(dtype).name}, got {array.dtype}")
    if array.shape != shape:
        raise ValueError(f"{vid}: {kind} shape {array.shape} differs from the mask's {shape}")


def manifest_table(rows: Sequence[dict]) -> pa.Table:
    """Rows (dicts) as an Arrow table with the manifest schema; extra columns keep inferred types."""
    columns = list(REQUIRED_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    fields = []
    arrays = []
    for name in columns:
        values = [row.get(name) for row in rows]
        dtype = REQUIRED_COLUMNS.get(name) or TYPED_OPTIONAL_COLUMNS.get(name)
        array = pa.array(values, type=dtype) if dtype is not None else pa.array(values)
        fields.append(pa.field(name, array.type))
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_manifest(root: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write ``root/manifest.parquet`` atomically. Volume ids must be unique."""
    ids = [row["volume_id"] for row in rows]
    duplicates = sorted({v for v in ids if ids.count(v) > 1})
    if duplicates:
        raise CtsynthError(f"{root}: duplicate volume_id {duplicates[0]!r}")
    path = location(root) / MANIFEST_NAME
    write_parquet(path, manifest_table(rows))
    return path


def dataset_fingerprint(root: str | os.PathLike) -> str:
    """A short hash of ``root``'s manifest: it changes whenever a volume, a split or a label map changes."""
    path = location(root) / MANIFEST_NAME
    if not path.is_file():
        raise CtsynthError(f"{path}: no manifest (is {root} a ctsynth dataset?)")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def write_json(path: str | os.PathLike, value) -> Path:
    """Write ``value`` as indented JSON, atomically (temp name, then rename)."""
    path = location(path)
    write_bytes(path, json.dumps(value, indent=2, default=str).encode())
    return path


def read_prepare_record(root: str | os.PathLike) -> dict | None:
    """``root/prepare.json`` (written by ``ctsynth prepare``), or None when the dataset was never prepared."""
    path = location(root) / PREPARE_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CtsynthError(f"{path}: not readable JSON ({exc})") from None


def read_manifest(root: str | os.PathLike) -> list[dict]:
    """Read ``root/manifest.parquet`` as a list of row dicts. Raises CtsynthError naming the problem."""
    path = location(root) / MANIFEST_NAME
    if not path.is_file():
        raise CtsynthError(f"{path}: no manifest (is {root} a ctsynth dataset?)")
    try:
        table = pq.read_table(pa.BufferReader(path.read_bytes()) if isinstance(path, Remote) else path)
    except Exception as exc:
        raise CtsynthError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise CtsynthError(f"{path}: missing column(s) {', '.join(missing)}")
    return table.to_pylist()


def load_volume(root: str | os.PathLike, row: dict, *, with_image: bool = True) -> Volume:
    """Load one manifest row's arrays (image only when asked and present)."""
    root = location(root)
    mask, affine = read_nifti(root / row["mask"])
    hu = read_nifti(root / row["image"])[0] if with_image and row.get("image") else None
    label = read_nifti(root / row["label"])[0] if row.get("label") else None
    return Volume(row["volume_id"], hu, mask, affine, label)


@contextlib.contextmanager
def staged_dataset(
    out: str | os.PathLike | Remote,
    *,
    overwrite: bool = False,
    subfolders: Sequence[str] = ("images", "masks", "labels"),
) -> Iterator[Path | Remote]:
    """Build a new dataset (or any output folder) in a staging folder beside ``out``; rename it to ``out`` on
    success. Empty ``subfolders`` are removed before the rename.

    On any exception the staging folder is removed and ``out`` is untouched. An existing non-empty
    ``out`` is an error unless ``overwrite``. On an object store (no rename) the prefix itself is written to and
    the manifest, written last by the block, commits it (``storage.remote_dataset``). Pass
    ``storage.as_text(stage)`` to Ray tasks.
    """
    if isinstance(location(out), Remote):
        with remote_dataset(location(out), overwrite=overwrite) as stage:
            yield stage
        return
    out = Path(out).resolve()  # absolute: Ray workers may run in another working directory
    if out.exists() and not out.is_dir():
        raise CtsynthError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CtsynthError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    for sub in subfolders:
        (stage / sub).mkdir(parents=True)
    try:
        yield stage
        for sub in subfolders:
            with contextlib.suppress(OSError):
                (stage / sub).rmdir()  # only removes it when empty
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(stage, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
