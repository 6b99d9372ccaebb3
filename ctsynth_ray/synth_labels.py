"""New label volumes that belong to no patient: a random cube of a random training volume, with (at
probability ``p_nodule``) a nodule template pasted where enough of it lies on lung.

Volume ``index`` of run ``seed`` depends only on (seed, index) and the inputs: its generator is
``numpy.random.default_rng((seed, index))``, whatever the batching or worker count.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctsynth_ray.dataset import Volume, read_nifti, write_volume
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.labels import Tissue, lung_like
from ctsynth_ray.nodule_bank import NoduleTemplate, augment_template, train_rows

MIN_BODY_FRACTION = 0.15  # cubes with less tissue than this are rejected (mostly air)
TRIES_PER_SOURCE = 10  # rejected cubes in a row before another source volume is drawn


@dataclass(frozen=True)
class SynthLabelConfig:
    """How new label volumes are drawn. Sizes in voxels; fractions in [0, 1]."""

    size: int = 128
    p_nodule: float = 0.8
    lung_fraction: float = 0.8
    augment: bool = False
    cube_tries: int = 50
    paste_tries: int = 200

    def __post_init__(self):
        if self.size < 8:
            raise ValueError(f"size must be at least 8 voxels, got {self.size}")
        if not 0 <= self.p_nodule <= 1:
            raise ValueError(f"p_nodule must be in [0, 1], got {self.p_nodule}")
        if not 0 < self.lung_fraction <= 1:
            raise ValueError(f"lung_fraction must be in (0, 1], got {self.lung_fraction}")
        if self.cube_tries < 1 or self.paste_tries < 1:
            raise ValueError("cube_tries and paste_tries must be at least 1")


@dataclass
class Source:
    """A training volume's label map, as the cubes are cut from it. Its nodule mask is where the label map says
    nodule (``prepare`` puts the class exactly there), so only the label map is decoded."""

    volume_id: str
    label: np.ndarray
    affine: np.ndarray
    scheme: str


class SourceCache:
    """Training volumes' label maps decoded once per process (gzip is the slow part), least recently used dropped
    first beyond ``max_bytes``."""

    def __init__(self, root: str | Path, rows: list[dict], max_bytes: int = 4 << 30):
        self.root = Path(root)
        self.rows = rows
        self.max_bytes = max_bytes
        self._cache: OrderedDict[str, Source] = OrderedDict()

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, k: int) -> Source:
        row = self.rows[k]
        vid = row["volume_id"]
        if vid in self._cache:
            self._cache.move_to_end(vid)
            return self._cache[vid]
        if not row.get("label"):
            raise CtsynthError(f"{vid}: no label map (run `ctsynth prepare {self.root}` first)")
        label, affine = read_nifti(self.root / row["label"])
        source = Source(vid, label, affine, row.get("label_scheme") or "thesis")
        self._cache[vid] = source
        while len(self._cache) > 1 and sum(s.label.nbytes for s in self._cache.values()) > self.max_bytes:
            self._cache.popitem(last=False)
        return source


def check_sources(root: str | Path, size: int) -> list[dict]:
    """Train rows that can give a ``size`` cube; CtsynthError for an empty train split or a cube larger than
    every train volume."""
    rows = train_rows(root)
    if not all(r.get("label") for r in rows):
        raise CtsynthError(
            f"{root}: the train split has volumes without label maps (run `ctsynth prepare {root}` first)"
        )
    fitting = [r for r in rows if min(r["shape_x"], r["shape_y"], r["shape_z"]) >= size]
    if not fitting:
        largest = max(rows, key=lambda r: min(r["shape_x"], r["shape_y"], r["shape_z"]))
        raise CtsynthError(
            f"{root}: a {size}^3 cube is larger than every train volume "
            f"(the largest is {largest['shape_x']} x {largest['shape_y']} x {largest['shape_z']})"
        )
    return fitting


def cube_accepted(label: np.ndarray) -> bool:
    """Whether a label cube may become a volume: enough tissue (``MIN_BODY_FRACTION``) and tissue in every axial
    slice (the thesis' generator collapsed on empty slices). The audit cuts its real cubes by the same rule."""
    tissue = (label != Tissue.OTHER) & (label != Tissue.OUTSIDE_AIR)
    return bool(tissue.mean() >= MIN_BODY_FRACTION and tissue.any(axis=(0, 1)).all())


def synthetic_volume_id(seed: int, index: int) -> str:
    """The name of volume ``index`` of run ``seed``, in synth-labels and generate alike."""
    return f"synth-s{seed}-{index:06d}"


def planned_source(seed: int, index: int, n_sources: int) -> int:
    """The source volume (a position in the sources' rows) that volume ``index`` of run ``seed`` is cut from: the
    first draw of its generator, known before any volume is decoded, so that work can be grouped by source."""
    return int(np.random.default_rng((seed, index)).integers(n_sources))


def plan_chunks(seed: int, indices, n_sources: int, chunk: int) -> list[list[int]]:
    """``indices`` grouped by the source each is cut from (:func:`planned_source`), each group in chunks of at
    most ``chunk``: a task decodes a source once for all its volumes, however many sources there are."""
    groups: dict[int, list[int]] = {}
    for index in indices:
        groups.setdefault(planned_source(seed, index, n_sources), []).append(index)
    return [group[k : k + chunk] for _, group in sorted(groups.items()) for k in range(0, len(group), chunk)]


def make_label_volume(
    seed: int, index: int, sources: SourceCache, bank: list[NoduleTemplate], config: SynthLabelConfig
) -> tuple[Volume, dict]:
    """Draw new label volume ``index`` of run ``seed``: (Volume with label + mask and no image, manifest extras).

    The source is :func:`planned_source`; only after ``TRIES_PER_SOURCE`` rejected cubes in a row is another
    source drawn. Raises CtsynthError when ``cube_tries`` cubes in a row are rejected (empty axial slices or too
    little body).
    """
    rng = np.random.default_rng((seed, index))
    size = config.size
    for attempt in range(config.cube_tries):
        if attempt % TRIES_PER_SOURCE == 0:
            source = sources.get(int(rng.integers(len(sources))))
        shape = np.asarray(source.label.shape)
        origin = np.array([rng.integers(0, n - size + 1) for n in shape])  # sources are at least size^3
        box = tuple(slice(o, o + size) for o in origin)
        label = source.label[box].copy(order="K")  # keep NIfTI's Fortran order: fast copy and write
        if not cube_accepted(label):
            continue
        mask = (label == Tissue.NODULE).astype(np.uint8)  # before pasting: the source's mask in this cube
        break
    else:
        raise CtsynthError(
            f"volume {index}: {config.cube_tries} cubes in a row had an empty axial slice or too little body "
            f"(is --size {size} right for these volumes?)"
        )
    extras = {
        "source_volume_id": source.volume_id,
        "cube_origin_x": int(origin[0]),
        "cube_origin_y": int(origin[1]),
        "cube_origin_z": int(origin[2]),
        "inserted_nodule": False,
        "template_id": None,
        "nodule_center_x": None,
        "nodule_center_y": None,
        "nodule_center_z": None,
        "paste_failed": False,
        "label_scheme": source.scheme,
    }
    if bank and rng.random() < config.p_nodule:
        template = bank[int(rng.integers(len(bank)))]
        nodule = augment_template(template, rng) if config.augment else template.mask
        placed = _paste(rng, label, mask, nodule, config)
        if placed is None:
            extras["paste_failed"] = True
        else:
            extras.update(
                inserted_nodule=True, template_id=template.template_id, nodule_center_x=int(placed[0]),
                nodule_center_y=int(placed[1]), nodule_center_z=int(placed[2]),
            )  # fmt: skip
    affine = source.affine.copy()
    affine[:3, 3] = source.affine[:3, :3] @ origin + source.affine[:3, 3]  # the cube's first voxel, in the source
    return Volume(synthetic_volume_id(seed, index), None, mask, affine, label), extras


def _paste(rng, label: np.ndarray, mask: np.ndarray, nodule: np.ndarray, config: SynthLabelConfig):
    """Paste ``nodule`` (uint8) where >= lung_fraction of its voxels lie on lung; returns its centre or None."""
    size = label.shape[0]
    extent = np.asarray(nodule.shape)
    if np.any(extent >= size):
        return None
    lung = lung_like(label)
    voxels = nodule > 0
    needed = config.lung_fraction * voxels.sum()
    for _ in range(config.paste_tries):
        start = np.array([rng.integers(0, size - e + 1) for e in extent])  # = centre - extent // 2
        if not lung[tuple(start + extent // 2)]:
            continue  # the centre must lie on lung
        box = tuple(slice(s, s + e) for s, e in zip(start, extent))
        if np.count_nonzero(lung[box] & voxels) >= needed:
            mask[box] |= voxels.astype(np.uint8)
            label[box][voxels] = Tissue.NODULE
            return start + extent // 2
    return None


def write_label_volumes(
    root: str | Path, source_root: str | Path, seed: int, indices: list[int], bank: list[NoduleTemplate],
    config: SynthLabelConfig, cache: SourceCache | None = None,
) -> list[dict]:  # fmt: skip
    """Make and write label volumes ``indices`` under ``root``; returns their manifest rows."""
    cache = cache or SourceCache(source_root, check_sources(source_root, config.size))
    rows = []
    for index in indices:
        volume, extras = make_label_volume(seed, index, cache, bank, config)
        rows.append(write_volume(root, volume, split="train", source="synthetic", synth_seed=seed, synth_index=index,
                                 **extras))  # fmt: skip
    return rows
