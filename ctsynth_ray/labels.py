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


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient's body: the largest 3D component above -500 HU, with every axial slice's holes (lungs,
    airways, bowel gas) filled."""
    tissue = hu > BODY_THRESHOLD_HU
    labelled, count = ndimage.label(tissue)
    if count == 0:
        return np.zeros(hu.shape, bool)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    body = labelled == int(np.argmax(sizes))
    for z in range(body.shape[2]):
        if body[:, :, z].any():
            body[:, :, z] = ndimage.binary_fill_holes(body[:, :, z])
    return body


def label_map(hu: np.ndarray, mask: np.ndarray, scheme: str = "thesis") -> np.ndarray:
    """uint8 label map of int HU ``hu`` and nodule ``mask`` (same shape) in ``scheme`` (see the module doc)."""
    _check_scheme(scheme)
    if hu.shape != mask.shape:
        raise ValueError(f"hu shape {hu.shape} differs from mask shape {mask.shape}")
    label = np.full(hu.shape, Tissue.BONE, np.uint8)
    label[hu <= 500] = Tissue.SOFT_TISSUE
    label[hu == 0] = Tissue.WATER
    label[hu < 0] = Tissue.FAT
    label[hu < -200] = Tissue.OTHER
    if scheme == "body":
        label[(label == Tissue.OTHER) & ~body_mask(hu)] = Tissue.OUTSIDE_AIR
    label[mask > 0] = Tissue.NODULE
    return label


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
