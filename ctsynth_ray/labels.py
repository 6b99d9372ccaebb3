"""Label maps from HU (the thesis' tissue bins) and their encodings for networks; the one HU normalisation.

Classes (uint8)::

    0 other         HU < -200: air and lung (in the ``body`` scheme: only inside the body)
    1 fat           -200 <= HU < 0
    2 water         HU == 0
    3 soft tissue   0 < HU <= 500 (muscle, organs, blood)
    4 bone          HU > 500
    5 nodule        from the nodule mask; overrides HU
    6 outside air   only in the ``body`` scheme: class 0 outside the body

The ``thesis`` scheme cannot tell lung from the air around the patient, which is how the thesis came to
paste nodules outside the body; the ``body`` scheme splits class 0 with a body mask.

Network encodings: ``scalar`` (the thesis: label / 3 - 1, one channel) and ``onehot`` (one channel per
class). CT goes to networks as HU / 2000 (:func:`hu_to_network`) and comes back by
:func:`network_to_hu`: training and generation both use these two functions.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
from scipy import ndimage

SCHEMES = ("thesis", "body")
ENCODINGS = ("scalar", "onehot")
HU_SCALE = 2000.0
AIR_HU = -1000  # air: what crops, patches and sliding windows are padded with
BODY_THRESHOLD_HU = -500.0
SLAB_VOXELS = 1 << 23  # voxels per slab of the body mask's slab-wise labelling (~8 M: tens of MB of labels)


class Tissue(IntEnum):
    OTHER = 0
    FAT = 1
    WATER = 2
    SOFT_TISSUE = 3
    BONE = 4
    NODULE = 5
    OUTSIDE_AIR = 6


def n_classes(scheme: str) -> int:
    """Number of label classes of a scheme (6 for ``thesis``, 7 for ``body``)."""
    _check_scheme(scheme)
    return 7 if scheme == "body" else 6


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def body_mask(hu: np.ndarray, *, slab_slices: int | None = None) -> np.ndarray:
    """The patient's body in (x, y, z) HU ``hu``: the largest 6-connected 3D component above -500 HU, with every
    axial slice's holes (lungs, airways, bowel gas) filled; bool, laid out like ``hu``.

    Worked out ``slab_slices`` axial slices at a time (default: about 8 M voxels), exactly as one whole-volume
    labelling would: of equally large components, the one whose first voxel in C order comes first wins.
    """
    body = np.empty_like(hu, dtype=bool)
    for z0, z1, slab in _body_slabs(hu, slab_slices):
        body[:, :, z0:z1] = slab
    return body


def label_map(
    hu: np.ndarray, mask: np.ndarray, scheme: str = "thesis", *, slab_slices: int | None = None
) -> np.ndarray:
    """uint8 label map of int HU ``hu`` and nodule ``mask`` (same (x, y, z) shape) in ``scheme`` (see the module
    doc), laid out like ``hu``; made ``slab_slices`` axial slices at a time (see :func:`body_mask`)."""
    _check_scheme(scheme)
    if hu.shape != mask.shape:
        raise ValueError(f"hu shape {hu.shape} differs from mask shape {mask.shape}")
    label = np.empty_like(hu, dtype=np.uint8)
    if scheme == "body":
        slabs = _body_slabs(hu, slab_slices)
    else:
        slabs = ((z0, z1, None) for z0, z1 in _slab_bounds(hu.shape, slab_slices))
    for z0, z1, body in slabs:
        h, out = hu[:, :, z0:z1], label[:, :, z0:z1]
        # Bone (4) less one for each bound the HU are under: <= 500 soft tissue 3, <= 0 water 2, < 0 fat 1,
        # < -200 other 0 (and NaN bone, as assigning class by class gave).
        out[...] = Tissue.BONE
        for below in (h <= 500, h <= 0, h < 0, h < -200):
            out -= below
        if body is not None:
            out[(out == Tissue.OTHER) & ~body] = Tissue.OUTSIDE_AIR
        out[mask[:, :, z0:z1] > 0] = Tissue.NODULE
    return label


# Background connectivity within an axial slice only, as binary_fill_holes uses per slice (axes: z, y, x).
_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def _slab_bounds(shape: tuple[int, ...], slab_slices: int | None) -> list[tuple[int, int]]:
    if slab_slices is None:
        slab_slices = max(1, SLAB_VOXELS // max(1, shape[0] * shape[1]))
    if slab_slices < 1:
        raise ValueError(f"slab_slices must be positive, got {slab_slices}")
    return [(z0, min(z0 + slab_slices, shape[2])) for z0 in range(0, shape[2], slab_slices)]


def _tissue_components(hu_slab: np.ndarray) -> tuple[np.ndarray, int]:
    """6-connected components above -500 HU of an (x, y, z) slab, labelled on its (z, y, x) transpose: C-ordered
    for a slab of a Fortran-ordered (NIfTI) volume, which labels ~2x faster than the (x, y, z) view."""
    return ndimage.label(np.ascontiguousarray((hu_slab > BODY_THRESHOLD_HU).T))


# Slab-wise body mask. A whole-volume labelling of an adult chest CT is a 4-byte label per voxel (720 MB for
# 736 x 736 x 331); slabs of SLAB_VOXELS keep it to tens of MB. Pass 1 labels each slab, counts its components and
# joins those that touch across a slab boundary; pass 2 labels each slab again (the same labels: it is
# deterministic) and keeps the largest joined component.
def _body_slabs(hu: np.ndarray, slab_slices: int | None):
    """Yield (z0, z1, body mask of hu[:, :, z0:z1]) for each slab, as :func:`body_mask` defines it."""
    # Imported on use: it takes a few hundred ms, and most users of this module need none.
    from scipy.sparse import coo_matrix, csgraph

    bounds = _slab_bounds(hu.shape, slab_slices)
    # Pass 1: component sizes by global id (local label + the slab's offset), and the ids touching across slabs.
    offsets, sizes, edges = [], [np.zeros(1, np.int64)], []
    last_plane, total = None, 0
    for z0, z1 in bounds:
        labels, count = _tissue_components(hu[:, :, z0:z1])
        sizes.append(np.bincount(labels.ravel(), minlength=count + 1)[1:])
        if last_plane is not None:
            touching = (last_plane > 0) & (labels[0] > 0)
            pairs = np.unique(last_plane[touching].astype(np.int64) * (count + 1) + labels[0][touching])
            edges.append(np.stack([pairs // (count + 1) + offsets[-1], pairs % (count + 1) + total]))
        offsets.append(total)
        last_plane, total = labels[-1].copy(), total + count
    if total == 0:
        for z0, z1 in bounds:
            yield z0, z1, np.zeros(hu[:, :, z0:z1].shape, bool)
        return
    edges = np.concatenate([np.zeros((2, 0), np.int64), *edges], axis=1)
    graph = coo_matrix((np.ones(edges.shape[1], np.int8), tuple(edges)), shape=(total + 1, total + 1))
    component = csgraph.connected_components(graph, directed=False)[1]
    size = np.bincount(component, weights=np.concatenate(sizes))  # exact: integers far below 2**53
    size[component[0]] = 0  # id 0 is the background
    tied = np.flatnonzero(size == size.max())
    body = tied[0] if len(tied) == 1 else _first_in_c_order(hu, bounds, offsets, component, tied)
    # Pass 2: keep the body's voxels, then fill each slice's holes.
    for (z0, z1), offset in zip(bounds, offsets):
        labels, count = _tissue_components(hu[:, :, z0:z1])
        keep = np.concatenate([[False], component[offset + 1 : offset + count + 1] == body])
        yield z0, z1, _fill_holes_in_plane(keep[labels]).T


def _first_in_c_order(hu, bounds, offsets, component, tied) -> int:
    """Of equally large components, the one holding the first voxel in C order of the whole (x, y, z) volume: the
    one a whole-volume ``ndimage.label`` numbers first, and so ``np.argmax`` over its sizes picks."""
    _, ny, nz = hu.shape
    rank = np.full(component.max() + 1, -1)
    rank[tied] = np.arange(len(tied))
    rank_of_id = rank[component]
    rank_of_id[0] = -1  # the background
    first = np.full(len(tied), np.iinfo(np.int64).max)
    for (z0, z1), offset in zip(bounds, offsets):
        labels, count = _tissue_components(hu[:, :, z0:z1])
        ranks = np.concatenate([[-1], rank_of_id[offset + 1 : offset + count + 1]])[labels].T  # (x, y, z - z0)
        x, y, z = np.nonzero(ranks >= 0)
        np.minimum.at(first, ranks[x, y, z], (x * ny + y) * nz + z + z0)
    return int(tied[np.argmin(first)])


def _fill_holes_in_plane(body: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes`` of each axial slice of a (z, y, x) mask, in one labelling: a background
    component (4-connected in its slice) is a hole unless it touches the slice's border.

    Only the mask's bounding box is labelled: from a background voxel on the box's edge a straight line outwards
    reaches the border through background, so a component touching the box's edge is no hole either."""
    present = [np.flatnonzero(body.any(axis=other)) for other in ((0, 2), (0, 1))]
    if not len(present[0]):
        return body
    box = (slice(None), *(slice(p[0], p[-1] + 1) for p in present))
    background, count = ndimage.label(~body[box], structure=_IN_PLANE)
    hole = np.ones(count + 1, bool)
    for edge in (background[:, 0], background[:, -1], background[:, :, 0], background[:, :, -1]):
        hole[edge] = False
    body[box] |= hole[background]
    return body


def lung_like(label: np.ndarray) -> np.ndarray:
    """Where a nodule may be pasted: class 0 (in the ``body`` scheme that is inside the body only)."""
    return label == Tissue.OTHER


def encode_labels(label: np.ndarray, scheme: str, encoding: str = "scalar") -> np.ndarray:
    """Label map (..., spatial) -> float32 network input: ``scalar`` adds a channel axis in front
    (label / 3 - 1), ``onehot`` one channel per class."""
    if encoding == "scalar":
        return (label.astype(np.float32) / 3.0 - 1.0)[None]
    if encoding == "onehot":
        return (np.arange(n_classes(scheme), dtype=np.uint8).reshape(-1, *([1] * label.ndim)) == label[None]).astype(
            np.float32
        )
    raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")


def encode_labels_tensor(label, scheme: str, encoding: str = "scalar"):
    """:func:`encode_labels` for a torch tensor of labels (batch, *spatial), on its device: (batch, channels,
    *spatial) float32, the same values bit for bit."""
    import torch

    if encoding == "scalar":
        return (label.to(torch.float32) / 3.0 - 1.0).unsqueeze(1)
    if encoding == "onehot":
        classes = torch.arange(n_classes(scheme), dtype=label.dtype, device=label.device)
        return (label.unsqueeze(1) == classes.reshape(1, -1, *([1] * (label.ndim - 1)))).to(torch.float32)
    raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")


def network_to_hu_tensor(values):
    """:func:`network_to_hu` for a torch tensor, on its device: int16 HU, the same values bit for bit."""
    import torch

    return torch.clamp(torch.round(values.to(torch.float32) * HU_SCALE), -1024, 3071).to(torch.int16)


def hu_to_network(hu: np.ndarray) -> np.ndarray:
    """HU -> network scale (HU / 2000, float32)."""
    return np.asarray(hu, np.float32) / HU_SCALE


def network_to_hu(values: np.ndarray) -> np.ndarray:
    """Network scale -> int16 HU (rounded, clipped to the int16 CT range -1024..3071)."""
    return np.clip(np.rint(np.asarray(values, np.float32) * HU_SCALE), -1024, 3071).astype(np.int16)
