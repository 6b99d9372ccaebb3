"""The audit of a synthetic CT set: is it realistic, is it diverse, does it copy the patients it came from?

Everything here is per volume or per set, in HU, on the label maps' tissue classes (:mod:`ctsynth_ray.labels`):

Realism
    ``hu_wasserstein``: per class, the 1-Wasserstein distance (HU) between the synthetic and the real voxels of
    that class (identical sets: 0; a set shifted by d HU: d). ``frechet_radiomics``: the Frechet distance between
    radiomic features (first-order statistics and grey-level co-occurrence texture) of lung and of nodule-centred
    axial patches, standardised over all patches (the Frechet Radiomics Distance, arXiv 2412.01496), the mean
    of the lung and nodule distances; ``..._real_vs_real`` is the same between two halves of the real volumes, the
    scale a synthetic figure should be read against. ``nodule_contrast``: nodule HU minus the HU of the lung
    around it. ``interslice``: mean |HU difference| of adjacent axial slices inside the body (slice flicker).
Diversity
    Mean SSIM of pairs of synthetic volumes against pairs of real cubes of the same size: mode collapse shows as
    synthetic pairs far more alike than real ones.
Privacy
    Similarity is SSIM of HU in the window -1000..400 (Gaussian window, sigma 1.5 voxels). (1) Source copy: a
    synthetic volume against the real CT of the cube its label map was cut from (``source_similarity``), next to
    that real CT against the label map alone, painted with each class's mean real HU (``label_only_similarity``):
    what the label map reveals anyway. A volume that closes more than ``SOURCE_GAP_FRACTION`` of the gap between
    the label-only rendering and an exact copy (``source_excess``) reproduces its patient. (2) Nearest training
    crop: a coarse search over downsampled embeddings (cosine of 16^3 block means) finds the ``top_k`` nearest GAN
    training crops, exact SSIM re-ranks them. The threshold comes from the data: the highest similarity any real
    held-out cube (cut from volumes the GAN never saw, as synthetic label volumes are cut) reaches against its own
    nearest training crop. A synthetic volume closer to a training crop than any unseen patient is flagged when it
    is also closer to it than its own label-only rendering by more than ``SOURCE_GAP_FRACTION`` of the gap to a
    copy (generated CT is smoother than real CT and SSIM rewards that; see :func:`privacy`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, stats

from ctsynth_ray.dataset import crop_cube
from ctsynth_ray.labels import AIR_HU, Tissue
from ctsynth_ray.synth_labels import cube_accepted

SIMILARITY_WINDOW_HU = (-1000.0, 400.0)
LUNG_WINDOW_HU = (-1350.0, 150.0)  # width 1500, level -600: how radiologists read lung
SSIM_SIGMA = 1.5
#: Flag (1): the synthetic volume closes more than this share of the gap between the label-only rendering's
#: similarity to the source and an exact copy's (1.0).
SOURCE_GAP_FRACTION = 0.5
PATCH = 32  # radiomics: axial patches of 32 x 32 voxels (16 mm at 0.49 mm)
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 2)
FIRST_ORDER = ("mean", "std", "skewness", "kurtosis", "p10", "p50", "p90", "iqr", "entropy")
GLCM_PROPERTIES = ("contrast", "dissimilarity", "homogeneity", "ASM", "correlation")
FEATURES = FIRST_ORDER + tuple(f"glcm_{p}_d{d}" for d in GLCM_DISTANCES for p in GLCM_PROPERTIES)
#: HU painted for a class no real voxel shows (label-only rendering).
DEFAULT_CLASS_HU = {Tissue.OTHER: -850, Tissue.FAT: -100, Tissue.WATER: 0, Tissue.SOFT_TISSUE: 50,
                    Tissue.BONE: 700, Tissue.NODULE: 30, Tissue.OUTSIDE_AIR: -1000}  # fmt: skip


@dataclass(frozen=True)
class AuditConfig:
    """How much of each volume the audit looks at. Counts per volume unless said otherwise."""

    seed: int = 0
    top_k: int = 3  # training crops re-ranked exactly after the coarse search
    embedding_grid: int = 16  # coarse search: volumes as grid^3 block means
    voxels_per_class: int = 4000  # HU samples per class and volume for the Wasserstein distances
    lung_patches: int = 4
    real_cubes: int = 4  # cubes cut from each real volume (diversity, Turing slices, the privacy threshold)
    diversity_volumes: int = 48  # volumes per side whose pairs are compared (in the whole set)
    diversity_pairs: int = 300  # pairs per side at most
    turing: int = 0  # slices per side of the blind test

    def __post_init__(self):
        for name in ("top_k", "embedding_grid", "voxels_per_class", "real_cubes", "diversity_volumes",
                     "diversity_pairs"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lung_patches < 0 or self.turing < 0:
            raise ValueError("lung_patches and turing must be at least 0")


def class_name(tissue: int) -> str:
    return Tissue(tissue).name.lower()


# ------------------------------------------------------------------------------------------------ similarity


def windowed(hu: np.ndarray, window: tuple[float, float] = SIMILARITY_WINDOW_HU) -> np.ndarray:
    """HU clipped to ``window`` and scaled to 0..1 (float32)."""
    low, high = window
    return (np.clip(np.asarray(hu, np.float32), low, high) - low) / (high - low)


class SsimOperand:
    """One image's share of SSIM (Wang 2004; Gaussian window): its windowed values, local means and variances,
    computed once however many images it is compared with. Built from HU, or from windowed values (``of``)."""

    def __init__(self, hu: np.ndarray | None = None, *, x: np.ndarray | None = None):
        self.x = windowed(hu) if x is None else x
        self.mu = _gauss(self.x)
        self.var = _gauss(self.x * self.x) - self.mu * self.mu

    @staticmethod
    def of(image: np.ndarray | SsimOperand, size: int | None = None) -> SsimOperand:
        """``image`` (HU, or an operand) as an operand of its central ``size``^3 cube (all of it by default)."""
        if isinstance(image, SsimOperand):
            if size is None or image.x.shape[0] == size:
                return image
            return SsimOperand(x=central(image.x, size))
        return SsimOperand(central(image, size) if size else image)

    def ssim(self, other: SsimOperand) -> float:
        if other.x.shape != self.x.shape:
            raise ValueError(f"SSIM of shapes {self.x.shape} and {other.x.shape}")
        c1, c2 = 0.01**2, 0.03**2
        cov = _gauss(self.x * other.x) - self.mu * other.mu
        top = (2 * self.mu * other.mu + c1) * (2 * cov + c2)
        return float(np.mean(top / ((self.mu**2 + other.mu**2 + c1) * (self.var + other.var + c2))))


def _gauss(x: np.ndarray) -> np.ndarray:
    # A window of 3.5 sigma each side, as scikit-image's SSIM.
    return ndimage.gaussian_filter(x, SSIM_SIGMA, truncate=3.5)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two HU images of one shape in the similarity window (1: identical)."""
    return SsimOperand(a).ssim(SsimOperand(b))


def central(array: np.ndarray, size: int) -> np.ndarray:
    """The central ``size``^3 cube of a cube-shaped array (itself when it is that size)."""
    lo = [(n - size) // 2 for n in array.shape]
    return array[tuple(slice(o, o + size) for o in lo)]


def block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Means of ``factor``^3 blocks (the array trimmed to a multiple of ``factor``)."""
    shape = [n // factor for n in array.shape]
    trimmed = np.asarray(array, np.float32)[tuple(slice(0, n * factor) for n in shape)]
    return trimmed.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))


def embedding(hu: np.ndarray, grid: int, *, x: np.ndarray | None = None) -> np.ndarray:
    """A cube as a unit vector for the coarse search: windowed HU (or its windowed values ``x``) as ``grid``^3
    block means, centred."""
    x = windowed(hu) if x is None else x
    vector = block_mean(x, max(1, x.shape[0] // grid)).ravel()
    vector = vector - vector.mean()
    return (vector / (np.linalg.norm(vector) + 1e-9)).astype(np.float32)


@dataclass
class TrainingCrops:
    """The GAN's training crops (int16 HU, (n, s, s, s)), compared at ``size`` (their central cube), with their
    coarse-search embeddings. Volumes come as HU or as :class:`SsimOperand` (computed once for several checks)."""

    names: list[str]
    hu: np.ndarray
    size: int
    grid: int
    embeddings: np.ndarray = field(init=False)

    def __post_init__(self):
        self.embeddings = np.stack([embedding(central(crop, self.size), self.grid) for crop in self.hu])

    def coarse_order(self, image: np.ndarray | SsimOperand) -> np.ndarray:
        """Every crop's position, nearest first by the coarse embeddings' cosine."""
        if isinstance(image, SsimOperand):
            probe = embedding(None, self.grid, x=central(image.x, self.size))
        else:
            probe = embedding(central(image, self.size), self.grid)
        return np.argsort(-(self.embeddings @ probe), kind="stable")

    def nearest(self, image: np.ndarray | SsimOperand, top_k: int,
                rendering: np.ndarray | SsimOperand | None = None) -> tuple[str, float, float | None]:  # fmt: skip
        """(name, SSIM) of the training crop nearest to ``image``: the coarse search's ``top_k``, re-ranked exactly;
        and, given ``rendering`` (the image's label map painted), the rendering's SSIM to that crop (else None)."""
        operand = SsimOperand.of(image, self.size)
        candidates = self.coarse_order(operand)[:top_k]
        crops = [SsimOperand(central(self.hu[k], self.size)) for k in candidates]
        similarities = [operand.ssim(crop) for crop in crops]
        best = int(np.argmax(similarities))
        label_only = None if rendering is None else SsimOperand.of(rendering, self.size).ssim(crops[best])
        return self.names[candidates[best]], similarities[best], label_only

    def exhaustive_best(self, image: np.ndarray | SsimOperand) -> int:
        """The position of the crop with the highest SSIM to ``image`` over every crop (the search's recall)."""
        operand = SsimOperand.of(image, self.size)
        return int(np.argmax([operand.ssim(SsimOperand(central(crop, self.size))) for crop in self.hu]))


# ------------------------------------------------------------------------------------------------- realism


def class_samples(hu: np.ndarray, label: np.ndarray, rng: np.random.Generator, cap: int) -> dict[int, np.ndarray]:
    """{class: HU of at most ``cap`` of its voxels, drawn by ``rng``} (all voxels of a class that has fewer)."""
    order = "F" if np.isfortran(label) else "C"  # NIfTI arrays are Fortran-ordered: no copy of the label map
    flat_label, flat_hu = np.asarray(label).ravel(order=order), np.asarray(hu).ravel(order=order)
    out = {}
    for tissue in np.unique(flat_label):
        where = np.flatnonzero(flat_label == tissue)
        if len(where) > cap:
            where = where[rng.choice(len(where), cap, replace=False)]
        out[int(tissue)] = flat_hu[where].astype(np.int16)
    return out


def pooled(samples: Sequence[dict[int, np.ndarray]]) -> dict[int, np.ndarray]:
    classes = sorted({k for s in samples for k in s})
    return {k: np.concatenate([s[k] for s in samples if k in s]) for k in classes}


def hu_wasserstein(synthetic: dict[int, np.ndarray], real: dict[int, np.ndarray]) -> dict[str, float]:
    """{class name: 1-Wasserstein distance in HU} for every class both sides have."""
    return {class_name(k): float(stats.wasserstein_distance(synthetic[k], real[k]))
            for k in sorted(set(synthetic) & set(real))}  # fmt: skip


def class_means(real: dict[int, np.ndarray]) -> np.ndarray:
    """HU to paint each class with (a lookup table over label values): the real mean, else a default."""
    table = np.zeros(256, np.int16)
    for tissue in Tissue:
        values = real.get(int(tissue))
        table[int(tissue)] = (
            round(float(values.mean())) if values is not None and len(values) else DEFAULT_CLASS_HU[tissue]
        )
    return table


def render_labels(label: np.ndarray, means: np.ndarray) -> np.ndarray:
    """A label map painted with each class's mean HU: what the label map alone says about the CT."""
    return means[np.asarray(label)]


def radiomic_features(patch: np.ndarray) -> np.ndarray:
    """:data:`FEATURES` of a 2D HU patch: first-order statistics (HU), histogram entropy, and grey-level
    co-occurrence properties (similarity window in 32 levels, distances 1 and 2, mean over 4 directions)."""
    from skimage.feature import graycomatrix, graycoprops

    values = np.asarray(patch, np.float64).ravel()
    p10, p25, p50, p75, p90 = np.percentile(values, [10, 25, 50, 75, 90])
    spread = values.std()
    histogram = np.histogram(values, bins=GLCM_LEVELS, range=SIMILARITY_WINDOW_HU)[0] / values.size
    nonzero = histogram[histogram > 0]
    first = [values.mean(), spread, stats.skew(values) if spread > 0 else 0.0,
             stats.kurtosis(values) if spread > 0 else 0.0, p10, p50, p90, p75 - p25,
             float(-(nonzero * np.log2(nonzero)).sum())]  # fmt: skip
    levels = np.minimum((windowed(patch) * GLCM_LEVELS).astype(np.uint8), GLCM_LEVELS - 1)
    matrix = graycomatrix(levels, GLCM_DISTANCES, (0, np.pi / 4, np.pi / 2, 3 * np.pi / 4), levels=GLCM_LEVELS,
                          symmetric=True, normed=True)  # fmt: skip
    texture = [np.nan_to_num(graycoprops(matrix, p)[d].mean(), nan=1.0)
               for d in range(len(GLCM_DISTANCES)) for p in GLCM_PROPERTIES]  # fmt: skip
    return np.array(first + texture, np.float64)


def _axial_patch(array: np.ndarray, centre, fill, size: int = PATCH) -> np.ndarray:
    """The ``size`` x ``size`` axial patch of ``array`` centred on voxel ``centre`` (``fill`` beyond the volume)."""
    x, y, z = (round(float(c)) for c in centre)
    return crop_cube(array[:, :, z], (x - size // 2, y - size // 2), size, fill)


def lung_patches(hu: np.ndarray, label: np.ndarray, rng: np.random.Generator, n: int, tries: int = 40) -> list:
    """Up to ``n`` axial patches at least 70 % lung (class 0), centred on lung voxels drawn by ``rng``."""
    order = "F" if np.isfortran(label) else "C"
    lung = np.flatnonzero(np.asarray(label).ravel(order=order) == Tissue.OTHER)
    patches = []
    for _ in range(tries if len(lung) else 0):
        if len(patches) == n:
            break
        centre = np.unravel_index(lung[rng.integers(len(lung))], label.shape, order=order)
        if np.mean(_axial_patch(label, centre, 255) == Tissue.OTHER) >= 0.7:
            patches.append(_axial_patch(hu, centre, AIR_HU))
    return patches


def nodule_patches(hu: np.ndarray, mask: np.ndarray) -> list:
    """One axial patch centred on each nodule (26-connected component of ``mask``); only the mask's bounding box
    is labelled (nodules are small, real volumes are not)."""
    nodule = np.asarray(mask) > 0
    present = [np.flatnonzero(nodule.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    if any(len(p) == 0 for p in present):
        return []
    offset = np.array([p[0] for p in present])
    crop = nodule[tuple(slice(p[0], p[-1] + 1) for p in present)]
    labelled, count = ndimage.label(crop, structure=np.ones((3, 3, 3), bool))
    centres = ndimage.center_of_mass(crop, labelled, range(1, count + 1))
    return [_axial_patch(hu, np.asarray(c) + offset, AIR_HU) for c in centres]


def features_of(patches: list) -> np.ndarray:
    return np.stack([radiomic_features(p) for p in patches]) if patches else np.zeros((0, len(FEATURES)))


def frechet_distance(a: np.ndarray, b: np.ndarray, reference: np.ndarray | None = None) -> float | None:
    """Frechet distance between Gaussians fitted to feature rows ``a`` and ``b``, each feature standardised by
    ``reference``'s mean and standard deviation (default: ``a`` and ``b`` together); None with fewer than two rows
    on a side. A small ridge keeps the matrix square root defined when features outnumber rows."""
    import warnings

    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        return None
    reference = np.concatenate([a, b]) if reference is None else reference
    mean, scale = reference.mean(0), reference.std(0)
    scale[scale < 1e-9] = 1.0
    a, b = (a - mean) / scale, (b - mean) / scale
    ridge = 1e-6 * np.eye(a.shape[1])
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)) + ridge, np.atleast_2d(np.cov(b, rowvar=False)) + ridge
    with warnings.catch_warnings():  # "singular matrix" for few rows: the ridge already handles it
        warnings.simplefilter("ignore")
        root = np.real(linalg.sqrtm(cov_a @ cov_b))
    distance = float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b - 2 * root))
    return max(distance, 0.0)


def nodule_contrast(hu: np.ndarray, mask: np.ndarray, label: np.ndarray) -> float | None:
    """Mean HU of the nodule voxels minus mean HU of the lung (class 0) within 3 voxels of them; None without a
    nodule or without lung around it."""
    nodule = np.asarray(mask) > 0
    if not nodule.any():
        return None
    lo = [max(0, int(np.flatnonzero(nodule.any(axis=tuple(a for a in range(3) if a != k)))[0]) - 4) for k in range(3)]
    hi = [int(np.flatnonzero(nodule.any(axis=tuple(a for a in range(3) if a != k)))[-1]) + 5 for k in range(3)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    core = nodule[box]
    ring = ndimage.binary_dilation(core, iterations=3) & ~core & (np.asarray(label)[box] == Tissue.OTHER)
    if not ring.any():
        return None
    return float(hu[box][core].mean() - hu[box][ring].mean())


def interslice(hu: np.ndarray, label: np.ndarray) -> float:
    """Mean |HU difference| between adjacent axial slices, over voxel pairs both inside the body (not class 6;
    in the thesis scheme every voxel). Slice by slice: a whole real volume is never copied."""
    total, count = 0.0, 0
    for z in range(hu.shape[2] - 1):
        both = (label[:, :, z] != Tissue.OUTSIDE_AIR) & (label[:, :, z + 1] != Tissue.OUTSIDE_AIR)
        difference = np.abs(hu[:, :, z + 1].astype(np.float32) - hu[:, :, z])
        total += float(difference[both].sum())
        count += int(both.sum())
    return total / count if count else 0.0


@dataclass
class VolumeFeatures:
    """What realism needs of one volume (synthetic volume or real volume)."""

    volume_id: str
    samples: dict[int, np.ndarray]
    lung: np.ndarray  # radiomic features of lung patches (rows)
    nodule: np.ndarray  # radiomic features of nodule-centred patches
    contrast: float | None
    interslice: float


def volume_features(volume_id: str, hu: np.ndarray, label: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                    config: AuditConfig, boxes: Sequence[tuple] = ()) -> VolumeFeatures:  # fmt: skip
    """What realism needs of one volume: HU samples, lung patches and inter-slice difference of the whole volume,
    or of its cubes ``boxes`` (tuples of slices: a real volume measured as synthetic cubes are); nodule patches and
    contrast always of the whole volume (a random cube seldom holds one of its nodules)."""
    boxes = list(boxes) or [tuple(slice(0, n) for n in hu.shape)]
    return VolumeFeatures(
        volume_id,
        pooled([class_samples(hu[b], label[b], rng, config.voxels_per_class) for b in boxes]),
        features_of([p for b in boxes for p in lung_patches(hu[b], label[b], rng, config.lung_patches)]),
        features_of(nodule_patches(hu, mask)),
        nodule_contrast(hu, mask, label),
        float(np.mean([interslice(hu[b], label[b]) for b in boxes])),
    )


def _halves(features: Sequence[VolumeFeatures], seed: int) -> tuple[list, list]:
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,))).permutation(len(features))
    half = len(order) // 2
    return [features[k] for k in order[:half]], [features[k] for k in order[half:]]


def _stacked(features: Sequence[VolumeFeatures], kind: str) -> np.ndarray:
    rows = [getattr(f, kind) for f in features]
    return np.concatenate(rows) if rows else np.zeros((0, len(FEATURES)))


def _mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def frechet_radiomics(synthetic: Sequence[VolumeFeatures], real: Sequence[VolumeFeatures],
                      seed: int) -> dict:  # fmt: skip
    """The Frechet radiomics distances (lung, nodule, their mean) of synthetic against real, and of one half of the
    real volumes against the other, both on one feature scale (every patch's mean and standard deviation)."""
    first, second = _halves(real, seed)
    parts, baseline = {}, {}
    for kind in ("lung", "nodule"):
        # One scale for both figures: every patch, real and synthetic (a feature constant in the real set alone
        # would otherwise blow the synthetic distance up without bound).
        reference = np.concatenate([_stacked(real, kind), _stacked(synthetic, kind)])
        parts[kind] = frechet_distance(_stacked(real, kind), _stacked(synthetic, kind), reference)
        baseline[kind] = frechet_distance(_stacked(first, kind), _stacked(second, kind), reference)
    # The headline figures average the same parts: those both have (else whatever the synthetic side has).
    both = [k for k in parts if parts[k] is not None and baseline[k] is not None]
    used = both or [k for k in parts if parts[k] is not None]
    return {
        "frechet_radiomics": _mean_or_none(parts[k] for k in used),
        "frechet_radiomics_real_vs_real": _mean_or_none(baseline[k] for k in both),
        "frechet_radiomics_parts": {"synthetic": parts, "real_vs_real": baseline},
    }


def realism(synthetic: Sequence[VolumeFeatures], real: Sequence[VolumeFeatures], seed: int) -> dict:
    """The realism section of audit.json."""
    return {
        "hu_wasserstein": hu_wasserstein(pooled([f.samples for f in synthetic]), pooled([f.samples for f in real])),
        **frechet_radiomics(synthetic, real, seed),
        "nodule_contrast": {
            "synthetic": _mean_or_none(f.contrast for f in synthetic),
            "real": _mean_or_none(f.contrast for f in real),
        },
        "interslice": {
            "synthetic": _mean_or_none(f.interslice for f in synthetic),
            "real": _mean_or_none(f.interslice for f in real),
        },
    }


# ------------------------------------------------------------------------------------------------ diversity


def mean_pairwise_ssim(volumes: Sequence[np.ndarray], max_pairs: int, seed: int) -> float | None:
    """Mean SSIM over pairs of ``volumes`` (HU, one shape): all pairs, or ``max_pairs`` drawn by ``seed``."""
    pairs = [(i, j) for i in range(len(volumes)) for j in range(i + 1, len(volumes))]
    if not pairs:
        return None
    if len(pairs) > max_pairs:
        chosen = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3,))).choice(len(pairs), max_pairs,
                                                                                             replace=False)  # fmt: skip
        pairs = [pairs[k] for k in sorted(chosen)]
    operands: dict[int, SsimOperand] = {}
    for k in sorted({k for pair in pairs for k in pair}):
        operands[k] = SsimOperand(volumes[k])
    return float(np.mean([operands[i].ssim(operands[j]) for i, j in pairs]))


def diversity_volume(hu: np.ndarray) -> np.ndarray:
    """A volume as the diversity check compares it: 2 x 2 x 2 block means (int16 HU), to keep pairs cheap."""
    return np.rint(block_mean(hu, 2)).astype(np.int16)


# -------------------------------------------------------------------------------------------------- privacy


def cut_cubes(label: np.ndarray, size: int, n: int, rng: np.random.Generator, tries: int = 40) -> list[np.ndarray]:
    """Origins of up to ``n`` ``size``^3 cubes of a real volume, drawn by ``rng`` and accepted by the rule
    synthetic label volumes are cut by (:func:`ctsynth_ray.synth_labels.cube_accepted`)."""
    shape = np.asarray(label.shape)
    if np.any(shape < size):
        return []
    origins = []
    for _ in range(tries):
        if len(origins) == n:
            break
        origin = np.array([rng.integers(0, s - size + 1) for s in shape])
        if cube_accepted(label[tuple(slice(o, o + size) for o in origin)]):
            origins.append(origin)
    return origins


def source_similarities(synthetic: np.ndarray | SsimOperand, source: np.ndarray | SsimOperand,
                        rendering: np.ndarray | SsimOperand) -> tuple[float, float]:  # fmt: skip
    """(synthetic vs its source cube, the label-only ``rendering`` vs the source cube): SSIM both (HU or operands)."""
    source = SsimOperand.of(source)
    return SsimOperand.of(synthetic).ssim(source), SsimOperand.of(rendering).ssim(source)


def source_excess(source_similarity: float, label_only_similarity: float) -> float:
    """The share of the gap between the label-only rendering and an exact copy (similarity 1) that the synthetic
    volume closes: about 0 for a generator that adds only what the label map says, 1 for a copy."""
    gap = 1.0 - label_only_similarity
    return (source_similarity - label_only_similarity) / gap if gap > 1e-6 else 0.0


def privacy(per_volume: list[dict], held_out: Sequence[float]) -> dict:
    """The privacy section: the threshold from the held-out cubes' nearest-training similarities, each volume's
    flags and the flagged volume ids.

    'source': the volume closes more than ``SOURCE_GAP_FRACTION`` of the gap between its label-only rendering's
    similarity to its source cube and an exact copy's. 'training': it is nearer a training crop than any held-out
    real cube is to its own nearest crop, and (where its rendering was compared with that crop) nearer by more than
    ``SOURCE_GAP_FRACTION`` of the same gap: an honest generator's output, smoother than real CT, can pass the
    threshold on what its label map shares with a crop (a cube overlapping a training crop), a copy passes both.
    """
    threshold = float(max(held_out)) if len(held_out) else None
    for record in per_volume:
        record["source_excess"] = source_excess(record["source_similarity"], record["label_only_similarity"])
        nearest, label_only = record.get("nearest_train_similarity"), record.get("label_only_train_similarity")
        record["train_excess"] = None if nearest is None or label_only is None else source_excess(nearest, label_only)
        flags = []
        if record["source_excess"] > SOURCE_GAP_FRACTION:
            flags.append("source")
        beyond_label = record["train_excess"] is None or record["train_excess"] > SOURCE_GAP_FRACTION
        if threshold is not None and nearest is not None and nearest > threshold and beyond_label:
            flags.append("training")
        record["flags"] = flags
    return {
        "threshold": threshold,
        "threshold_rule": "highest SSIM of a held-out real cube to its nearest GAN training crop",
        "source_gap_fraction": SOURCE_GAP_FRACTION,
        "held_out_cubes": len(held_out),
        "held_out_nearest_similarity": [float(v) for v in held_out],
        "flagged": [r["volume_id"] for r in per_volume if r["flags"]],
        "per_volume": per_volume,
    }


def coarse_recall(records: Sequence[tuple[list[int], int]], top_k: int) -> float:
    """Share of volumes whose exhaustive nearest crop is among the coarse search's first ``top_k``:
    ``records`` holds (coarse order, exhaustive best) per volume."""
    if not records:
        return math.nan
    return float(np.mean([best in order[:top_k] for order, best in records]))
