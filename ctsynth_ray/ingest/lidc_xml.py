"""LIDC-IDRI reader XML: parse the four readers' nodule outlines, group them into physical nodules, and
make the consensus mask.

Conventions, following the LIDC documentation:

- One ``readingSession`` per reader. An ``unblindedReadNodule`` whose outline has more than one edge point
  is a nodule >= 3 mm; single-point marks (nodules < 3 mm) and ``nonNodule`` marks are ignored.
- An ROI finds its slice by ``imageSOP_UID``, or by ``imageZposition`` where the UID matches no slice.
- Contour pixels: LIDC readers were asked to draw the outline *just outside* the nodule, so the nodule is
  the pixels inside the outline, the outline pixels themselves excluded. Where that leaves nothing (an
  outline of a few pixels) the outline and its inside are kept. ``inclusion`` FALSE outlines cut holes:
  the pixels inside them (outline excluded) are removed from that reader's nodule on that slice.
- Annotations of different readers are one physical nodule when their masks overlap or their centroids
  are closer than half the larger diameter (transitively). A nodule is kept when at least
  ``min_readers`` distinct readers marked it; its consensus mask is the voxels marked by at least half of
  that nodule's readers.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.path import Path as Polygon

from ctsynth_ray.errors import CtsynthError


@dataclass
class Roi:
    sop_uid: str
    z_position_mm: float | None
    inclusion: bool
    points: np.ndarray  # (n, 2) pixel (x = column, y = row)


@dataclass
class ReaderNodule:
    reader: int
    nodule_id: str
    rois: list[Roi]


@dataclass
class LidcReading:
    """One XML file: the series it annotates, how many readers read it, and their nodules >= 3 mm."""

    path: Path
    series_uid: str
    n_readers: int
    nodules: list[ReaderNodule] = field(default_factory=list)


@dataclass
class Annotation:
    """One reader's nodule rasterised on the series grid: voxel indices (n, 3) as (x, y, z)."""

    reader: int
    voxels: np.ndarray


@dataclass
class ConsensusNodule:
    """One physical nodule kept by the readers' vote: its uint8 {0, 1} consensus ``mask`` is a crop of the series
    grid whose first voxel is ``origin`` (x, y, z); ``n_readers`` readers marked it."""

    origin: np.ndarray
    mask: np.ndarray
    n_readers: int

    @property
    def box(self) -> tuple[slice, ...]:
        """Where the crop sits in the series grid."""
        return tuple(slice(o, o + n) for o, n in zip(self.origin.tolist(), self.mask.shape))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(element, name: str):
    for child in element:
        if _local(child.tag) == name:
            return child
    return None


def _children(element, name: str):
    return [child for child in element if _local(child.tag) == name]


def _text(element, name: str, default: str = "") -> str:
    child = _child(element, name)
    return (child.text or "").strip() if child is not None and child.text else default


def parse_lidc_xml(path: str | Path) -> LidcReading | None:
    """Parse one LIDC XML file; None when it is not an ``LidcReadMessage`` (e.g. a chest X-ray read).

    Raises CtsynthError naming the file for malformed XML or a missing SeriesInstanceUid.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise CtsynthError(f"{path}: not readable XML ({exc})") from None
    if _local(root.tag) != "LidcReadMessage":
        return None
    header = _child(root, "ResponseHeader")
    series_uid = _text(header, "SeriesInstanceUid") if header is not None else ""
    if not series_uid:
        raise CtsynthError(f"{path}: no SeriesInstanceUid in the ResponseHeader")
    sessions = _children(root, "readingSession")
    reading = LidcReading(path=path, series_uid=series_uid, n_readers=len(sessions))
    for reader, session in enumerate(sessions):
        for nodule in _children(session, "unblindedReadNodule"):
            rois = []
            for roi in _children(nodule, "roi"):
                points = np.array(
                    [
                        [int(float(_text(e, "xCoord"))), int(float(_text(e, "yCoord")))]
                        for e in _children(roi, "edgeMap")
                    ],
                    dtype=int,
                ).reshape(-1, 2)
                z_text = _text(roi, "imageZposition")
                rois.append(
                    Roi(
                        sop_uid=_text(roi, "imageSOP_UID"),
                        z_position_mm=float(z_text) if z_text else None,
                        inclusion=_text(roi, "inclusion", "TRUE").upper() != "FALSE",
                        points=points,
                    )
                )
            if any(len(r.points) > 1 for r in rois):  # single points mark nodules < 3 mm
                reading.nodules.append(ReaderNodule(reader, _text(nodule, "noduleID"), rois))
    return reading


def outline_to_pixels(points: np.ndarray, shape_xy: tuple[int, int]) -> np.ndarray:
    """Pixels (x, y) inside a closed outline, the outline pixels excluded (see the module docstring)."""
    lo = np.maximum(points.min(0), 0)
    hi = np.minimum(points.max(0) + 1, shape_xy)
    if np.any(hi <= lo):
        return np.zeros((0, 2), int)
    xs, ys = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
    candidates = np.column_stack([xs.ravel(), ys.ravel()])
    inside = Polygon(points.astype(float)).contains_points(candidates)
    on_outline = np.zeros((hi[0] - lo[0], hi[1] - lo[1]), bool)
    keep = (points[:, 0] >= lo[0]) & (points[:, 0] < hi[0]) & (points[:, 1] >= lo[1]) & (points[:, 1] < hi[1])
    on_outline[points[keep, 0] - lo[0], points[keep, 1] - lo[1]] = True
    interior = inside & ~on_outline.ravel()
    if not interior.any():
        interior = inside | on_outline.ravel()
    return candidates[interior]


def rasterise(reading: LidcReading, sop_uids: list[str], z_positions_mm: np.ndarray, shape) -> list[Annotation]:
    """Every reader nodule of ``reading`` as voxels of a series grid of ``shape`` (x, y, z).

    Raises CtsynthError naming the XML when an ROI matches no slice.
    """
    slice_of = {uid: k for k, uid in enumerate(sop_uids) if uid}
    step = float(np.median(np.abs(np.diff(z_positions_mm)))) if len(z_positions_mm) > 1 else 1.0
    annotations = []
    for nodule in reading.nodules:
        per_slice: dict[int, tuple[set, set]] = {}
        for roi in nodule.rois:
            k = slice_of.get(roi.sop_uid)
            if k is None and roi.z_position_mm is not None:
                nearest = int(np.argmin(np.abs(z_positions_mm - roi.z_position_mm)))
                if abs(z_positions_mm[nearest] - roi.z_position_mm) < 0.5 * step:
                    k = nearest
            if k is None:
                raise CtsynthError(
                    f"{reading.path}: an outline of {nodule.nodule_id!r} is on image {roi.sop_uid} "
                    f"(z {roi.z_position_mm} mm), which is not a slice of this series"
                )
            pixels = {tuple(p) for p in outline_to_pixels(roi.points, shape[:2]).tolist()}
            keep, holes = per_slice.setdefault(k, (set(), set()))
            (keep if roi.inclusion else holes).update(pixels)
        voxels = [(x, y, k) for k, (keep, holes) in per_slice.items() for (x, y) in keep - holes]
        if voxels:
            annotations.append(Annotation(nodule.reader, np.array(sorted(voxels), dtype=int)))
    return annotations


def group_annotations(annotations: list[Annotation], spacing_mm) -> list[list[int]]:
    """Indices of ``annotations`` grouped into physical nodules (different readers only are linked)."""
    spacing = np.asarray(spacing_mm, float)
    centres = [a.voxels.mean(0) * spacing for a in annotations]
    diameters = [(6 * len(a.voxels) * np.prod(spacing) / np.pi) ** (1 / 3) for a in annotations]
    sets = [set(map(tuple, a.voxels.tolist())) for a in annotations]
    parent = list(range(len(annotations)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(annotations)):
        for j in range(i + 1, len(annotations)):
            if annotations[i].reader == annotations[j].reader:
                continue
            close = np.linalg.norm(centres[i] - centres[j]) < 0.5 * max(diameters[i], diameters[j])
            if close or not sets[i].isdisjoint(sets[j]):
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(annotations)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def consensus_nodules(annotations: list[Annotation], groups: list[list[int]], min_readers: int):
    """For each group marked by >= ``min_readers`` distinct readers: a :class:`ConsensusNodule` whose mask holds
    the voxels marked by at least half of its readers, cropped to the group's bounding box."""
    results = []
    for group in groups:
        readers = sorted({annotations[i].reader for i in group})
        if len(readers) < min_readers:
            continue
        voxels = np.concatenate([annotations[i].voxels for i in group])
        origin = voxels.min(0)
        votes = np.zeros(voxels.max(0) + 1 - origin, np.uint8)
        for reader in readers:
            marked = np.zeros(votes.shape, bool)
            for i in group:
                if annotations[i].reader == reader:
                    v = annotations[i].voxels - origin
                    marked[v[:, 0], v[:, 1], v[:, 2]] = True
            votes += marked
        mask = (votes.astype(np.int32) * 2 >= len(readers)).astype(np.uint8)
        if mask.any():
            results.append(ConsensusNodule(origin, mask, len(readers)))
    return results


def consensus_masks(annotations: list[Annotation], groups: list[list[int]], shape, min_readers: int):
    """:func:`consensus_nodules` as whole-grid masks of ``shape``: (uint8 mask, number of readers) per nodule."""
    results = []
    for nodule in consensus_nodules(annotations, groups, min_readers):
        mask = np.zeros(shape, np.uint8)
        mask[nodule.box] = nodule.mask
        results.append((mask, nodule.n_readers))
    return results
