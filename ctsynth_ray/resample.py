"""HU clean-up and resampling to ctsynth's grid, shared by every ingest path."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctsynth_ray.labels import AIR_HU

#: Values above this are metal or detector saturation, not tissue (the thesis' rule) ...
HU_CEILING = 1900
#: ... and become this documented soft-tissue value.
SOFT_TISSUE_HU = 50
MIN_VALID_HU = -1024


def clean_hu(hu: np.ndarray, out_of_field: np.ndarray | None = None) -> np.ndarray:
    """int16 HU by the thesis' rules: out-of-field voxels (``out_of_field`` where given, and anything
    below -1024 HU) become air (-1000); values above 1900 HU become soft tissue (50 HU)."""
    hu = np.array(hu, np.float32)
    clean_hu_in_place(hu, out_of_field)
    return hu.astype(np.int16)


def clean_hu_in_place(hu: np.ndarray, out_of_field: np.ndarray | None = None) -> None:
    """:func:`clean_hu` on a float32 array of one's own, in place, rounded (half to even) but still float32:
    assigning it to an int16 array gives what :func:`clean_hu` returns."""
    air = hu < MIN_VALID_HU
    if out_of_field is not None:
        air |= out_of_field
    np.copyto(hu, AIR_HU, where=air)
    np.copyto(hu, SOFT_TISSUE_HU, where=hu > HU_CEILING)
    np.rint(hu, out=hu)


def target_shape(shape: Sequence[int], spacing_mm: Sequence[float], new_spacing_mm: Sequence[float]) -> tuple:
    """Voxels of the new grid that cover the old one: same first voxel centre, no extrapolation."""
    return tuple(
        int(np.floor((n - 1) * old / new + 1e-6)) + 1 for n, old, new in zip(shape, spacing_mm, new_spacing_mm)
    )


def _neighbours(size: int, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For fractional indices ``coords`` into an axis of ``size`` (clamped): the lower and upper neighbour
    indices and the float32 weight of the upper one."""
    coords = np.clip(coords, 0, size - 1)
    low = np.floor(coords).astype(np.intp)
    high = np.minimum(low + 1, size - 1)
    return low, high, (coords - low).astype(np.float32)


def _interpolate_axis(array: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``array`` along ``axis`` at fractional indices ``coords`` (clamped)."""
    low, high, weight = _neighbours(array.shape[axis], coords)
    view = [1] * array.ndim
    view[axis] = -1
    weight = weight.reshape(view)
    return array.take(low, axis=axis) * (1 - weight) + array.take(high, axis=axis) * weight


def _resampled_axes(
    shape: Sequence[int], spacing_mm: Sequence[float], new_spacing_mm: Sequence[float], new_shape: Sequence[int]
) -> list:
    """Per axis, the fractional old indices of the new voxels, or None where the axis keeps its grid."""
    return [
        None
        if new_shape[axis] == shape[axis] and np.isclose(spacing_mm[axis], new_spacing_mm[axis])
        else np.arange(new_shape[axis]) * (new_spacing_mm[axis] / spacing_mm[axis])
        for axis in range(3)
    ]


def resample_linear(
    array: np.ndarray, spacing_mm: Sequence[float], new_spacing_mm: Sequence[float], shape: Sequence[int] | None = None
) -> np.ndarray:
    """Trilinear resampling of ``array`` (float32 result) onto a grid with ``new_spacing_mm``.

    New voxel n along an axis sits at old index ``n * new / old`` (the first centres coincide), so the
    affine keeps its origin and only its spacing changes. Separable 1D passes keep it fast and light.
    """
    if shape is None:
        shape = target_shape(array.shape, spacing_mm, new_spacing_mm)
    out = np.asarray(array, np.float32)
    for axis, coords in enumerate(_resampled_axes(array.shape, spacing_mm, new_spacing_mm, shape)):
        if coords is not None:
            out = _interpolate_axis(out, axis, coords)
    return out


def resample_hu(
    array: np.ndarray, spacing_mm: Sequence[float], new_spacing_mm: Sequence[float], shape: Sequence[int] | None = None
) -> np.ndarray:
    """``clean_hu(resample_linear(array, ...))``, bit for bit, one output z-plane at a time: an int16 array in
    Fortran order (z-planes contiguous, as NIfTI stores them).

    Beside the input and the output it holds a few float32 planes, never a float32 volume. The in-plane passes
    (x, then y) run once per input z-plane, the z pass once per output plane, each with the float32 operations
    :func:`resample_linear` applies to the whole volume, so every voxel rounds the same way.
    """
    if shape is None:
        shape = target_shape(array.shape, spacing_mm, new_spacing_mm)
    coords = _resampled_axes(array.shape, spacing_mm, new_spacing_mm, shape)
    in_plane = [None if c is None else _neighbours(array.shape[axis], c) for axis, c in enumerate(coords[:2])]

    def resampled_plane(z: int) -> np.ndarray:
        plane = array[:, :, z].astype(np.float32)  # a copy: the caller's array is never cleaned in place
        for axis, neighbours in enumerate(in_plane):
            if neighbours is not None:
                low, high, weight = neighbours
                weight = weight[:, None] if axis == 0 else weight[None, :]
                plane = plane.take(low, axis=axis) * (1 - weight) + plane.take(high, axis=axis) * weight
        return plane

    out = np.empty(shape, np.int16, order="F")
    if coords[2] is not None:
        z_low, z_high, z_weight = _neighbours(array.shape[2], coords[2])
        z_keep = 1 - z_weight
    planes: dict[int, np.ndarray] = {}  # in-plane resampled input planes still ahead (z_low never decreases)
    for k in range(shape[2]):
        if coords[2] is None:
            plane = resampled_plane(k)
        else:
            for z in (z_low[k], z_high[k]):
                if z not in planes:
                    planes[z] = resampled_plane(z)
            plane = planes[z_low[k]] * z_keep[k] + planes[z_high[k]] * z_weight[k]
            for z in [z for z in planes if z < z_low[k]]:
                del planes[z]
        clean_hu_in_place(plane)
        out[:, :, k] = plane
    return out


def resample_mask(
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    new_spacing_mm: Sequence[float],
    new_shape: Sequence[int],
    *,
    origin: Sequence[int] = (0, 0, 0),
    source_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample a binary mask as fractions and threshold at 0.5 (uint8 {0, 1}) onto ``new_shape``.

    ``mask`` may be a crop whose first voxel is ``origin`` in a source grid of ``source_shape`` (the mask's own
    shape by default): voxels outside it count as 0, and the result is the same as for the whole-grid mask.
    Only the mask's bounding box is interpolated, so this costs little for small nodules in big volumes.
    """
    out = np.zeros(new_shape, np.uint8)
    nonzero = np.argwhere(mask)
    if nonzero.size == 0:
        return out
    origin = np.asarray(origin, int)
    nonzero += origin
    source_shape = mask.shape if source_shape is None else source_shape
    ratio = np.asarray(spacing_mm, float) / np.asarray(new_spacing_mm, float)
    lo_old = np.maximum(nonzero.min(0) - 1, 0)
    hi_old = np.minimum(nonzero.max(0) + 2, source_shape)
    lo_new = np.ceil(lo_old * ratio - 1e-6).astype(int)
    hi_new = np.minimum(np.floor((hi_old - 1) * ratio + 1e-6).astype(int) + 1, new_shape)
    if np.any(hi_new <= lo_new):
        return out
    # The box [lo_old, hi_old) as float32 fractions, from the part of it that ``mask`` covers.
    fractions = np.zeros(hi_old - lo_old, np.float32)
    lo = np.maximum(lo_old, origin)
    hi = np.minimum(hi_old, origin + mask.shape)
    fractions[tuple(slice(a, b) for a, b in zip(lo - lo_old, hi - lo_old))] = mask[
        tuple(slice(a, b) for a, b in zip(lo - origin, hi - origin))
    ]
    for axis in range(3):
        # New index n sits at old index n / ratio, i.e. n / ratio - lo_old inside the box.
        coords = np.arange(lo_new[axis], hi_new[axis]) / ratio[axis] - lo_old[axis]
        fractions = _interpolate_axis(fractions, axis, coords)
    out[lo_new[0] : hi_new[0], lo_new[1] : hi_new[1], lo_new[2] : hi_new[2]] = fractions >= 0.5
    return out
