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
    hu = np.asarray(hu, np.float32)
    air = hu < MIN_VALID_HU
    if out_of_field is not None:
        air |= out_of_field
    hu = np.where(air, AIR_HU, hu)
    hu = np.where(hu > HU_CEILING, SOFT_TISSUE_HU, hu)
    return np.rint(hu).astype(np.int16)


def target_shape(shape: Sequence[int], spacing_mm: Sequence[float], new_spacing_mm: Sequence[float]) -> tuple:
    """Voxels of the new grid that cover the old one: same first voxel centre, no extrapolation."""
    return tuple(
        int(np.floor((n - 1) * old / new + 1e-6)) + 1 for n, old, new in zip(shape, spacing_mm, new_spacing_mm)
    )


def _interpolate_axis(array: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``array`` along ``axis`` at fractional indices ``coords`` (clamped)."""
    coords = np.clip(coords, 0, array.shape[axis] - 1)
    low = np.floor(coords).astype(np.intp)
    high = np.minimum(low + 1, array.shape[axis] - 1)
    view = [1] * array.ndim
    view[axis] = -1
    weight = (coords - low).astype(np.float32).reshape(view)
    return array.take(low, axis=axis) * (1 - weight) + array.take(high, axis=axis) * weight


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
    for axis in range(3):
        if shape[axis] == out.shape[axis] and np.isclose(spacing_mm[axis], new_spacing_mm[axis]):
            continue
        out = _interpolate_axis(out, axis, np.arange(shape[axis]) * (new_spacing_mm[axis] / spacing_mm[axis]))
    return out


def resample_mask(
    mask: np.ndarray, spacing_mm: Sequence[float], new_spacing_mm: Sequence[float], new_shape: Sequence[int]
) -> np.ndarray:
    """Resample a binary mask as fractions and threshold at 0.5 (uint8 {0, 1}) onto ``new_shape``.

    Only the mask's bounding box is interpolated, so this costs little for small nodules in big volumes.
    """
    out = np.zeros(new_shape, np.uint8)
    nonzero = np.argwhere(mask)
    if nonzero.size == 0:
        return out
    ratio = np.asarray(spacing_mm, float) / np.asarray(new_spacing_mm, float)
    lo_old = np.maximum(nonzero.min(0) - 1, 0)
    hi_old = np.minimum(nonzero.max(0) + 2, mask.shape)
    lo_new = np.ceil(lo_old * ratio - 1e-6).astype(int)
    hi_new = np.minimum(np.floor((hi_old - 1) * ratio + 1e-6).astype(int) + 1, new_shape)
    if np.any(hi_new <= lo_new):
        return out
    fractions = mask[lo_old[0] : hi_old[0], lo_old[1] : hi_old[1], lo_old[2] : hi_old[2]].astype(np.float32)
    for axis in range(3):
        # New index n sits at old index n / ratio, i.e. n / ratio - lo_old inside the crop.
        coords = np.arange(lo_new[axis], hi_new[axis]) / ratio[axis] - lo_old[axis]
        fractions = _interpolate_axis(fractions, axis, coords)
    out[lo_new[0] : hi_new[0], lo_new[1] : hi_new[1], lo_new[2] : hi_new[2]] = fractions >= 0.5
    return out
