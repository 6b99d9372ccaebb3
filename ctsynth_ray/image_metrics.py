"""Image similarity of generated CT against real CT, in HU: MAE, PSNR, SSIM, and inter-slice consistency."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

HU_RANGE = (-1024.0, 3071.0)  # the CT range; PSNR's peak and SSIM's dynamic range


def mae_hu(fake: np.ndarray, real: np.ndarray) -> float:
    """Mean absolute error in HU."""
    return float(np.mean(np.abs(np.asarray(fake, np.float64) - np.asarray(real, np.float64))))


def psnr_hu(fake: np.ndarray, real: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) with the CT range (4095 HU) as peak."""
    mse = float(np.mean((np.asarray(fake, np.float64) - np.asarray(real, np.float64)) ** 2))
    peak = HU_RANGE[1] - HU_RANGE[0]
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


def ssim_hu(fake: np.ndarray, real: np.ndarray, sigma: float = 1.5) -> float:
    """Mean structural similarity of two 2D (or 3D) HU images (Gaussian window, sigma 1.5 voxels; Wang 2004)."""
    x = (np.asarray(fake, np.float64) - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0])
    y = (np.asarray(real, np.float64) - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0])
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = ndimage.gaussian_filter(x, sigma), ndimage.gaussian_filter(y, sigma)
    var_x = ndimage.gaussian_filter(x * x, sigma) - mu_x**2
    var_y = ndimage.gaussian_filter(y * y, sigma) - mu_y**2
    cov = ndimage.gaussian_filter(x * y, sigma) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim.mean())


def interslice_difference(volume: np.ndarray) -> float:
    """Mean absolute HU difference between adjacent axial slices of an (x, y, z) volume: flicker shows as a
    larger figure for restacked generated slices than for real CT."""
    volume = np.asarray(volume, np.float64)
    return float(np.mean(np.abs(np.diff(volume, axis=2))))
