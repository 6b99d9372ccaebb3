"""GAN training data: nodule-centred crops of label maps and CT, as 2D pairs, 2.5D stacks and 3D crops.

One crop per volume by default, centred on its largest nodule, as the thesis (``crops="one"``);
``crops="per-nodule"`` cuts one around every nodule.

Written as Parquet shards with Arrow fixed-shape tensor columns, one shard per volume and kind, readable
by Ray Data (``ray.data.read_parquet``) and by :class:`GanPairs`, a plain PyTorch dataset::

    GANDATA/gan_data.json                description: source, scheme, size, kinds, counts, fingerprint
    GANDATA/nodule_bank.parquet          the template bank (see ctsynth_ray.nodule_bank)
    GANDATA/train/<kind>-<volume>.parquet   from the train split
    GANDATA/val/<kind>-<volume>.parquet     held-out pairs from the test split, for validation metrics

Kinds: ``2d`` (label slice -> CT slice), ``2p5d`` (k neighbouring label slices -> centre CT slice) and ``3d``
(label crop -> CT crop). Every shard has ``volume_id``, ``crop`` (the crop's number in its volume), ``z`` (slice
index in the crop; -1 for 3D), ``label`` (uint8) and ``hu`` (int16). Labels and HU are stored raw; :class:`GanPairs` encodes them for a network with
the one shared encoder (:mod:`ctsynth_ray.labels`: label / 3 - 1 or one-hot, HU / 2000).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import ndimage

from ctsynth_ray.dataset import Volume, crop_cube, write_parquet
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.labels import AIR_HU, Tissue, encode_labels, hu_to_network
from ctsynth_ray.nodule_bank import nodule_components

KINDS = {"2": "2d", "2.5": "2p5d", "3": "3d"}
CROPS = ("one", "per-nodule")
DESCRIPTION = "gan_data.json"


def parse_dims(text: str) -> list[str]:
    """'2,2.5,3' -> ['2d', '2p5d', '3d']; ValueError naming a bad entry."""
    kinds = []
    for part in text.split(","):
        part = part.strip()
        if part not in KINDS:
            raise ValueError(f"dims must be from 2, 2.5, 3; got {part!r}")
        kinds.append(KINDS[part])
    return kinds


def nodule_crops(volume: Volume, size: int, air_label: int, crops: str = "one") -> list[tuple[np.ndarray, np.ndarray]]:
    """(label, hu) crops of ``size``^3 (padded with air at borders): ``one`` centred on the largest nodule
    component (26-connected), or ``per-nodule`` one centred on each component, largest first (ties in label order:
    by first voxel in C order). A centre is the component's centroid rounded to the nearest voxel."""
    if crops not in CROPS:
        raise ValueError(f"crops must be one of {CROPS}, got {crops!r}")
    origin, labelled, count = nodule_components(volume.mask)
    if count == 0:
        return []
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable") + 1
    boxes = ndimage.find_objects(labelled)
    out = []
    for k in order[:1] if crops == "one" else order:
        box = boxes[k - 1]
        where = np.nonzero(labelled[box] == k)
        # Integer coordinate sums, then one division: the same float as ndimage.center_of_mass over the volume.
        centre = [(int(w.sum()) + len(w) * (s.start + o)) / len(w) for w, s, o in zip(where, box, origin)]
        corner = np.rint(centre).astype(int) - size // 2
        out.append((crop_cube(volume.label, corner, size, air_label), crop_cube(volume.hu, corner, size, AIR_HU)))
    return out


def pairs_from_crop(label: np.ndarray, hu: np.ndarray, kind: str, stack_slices: int, air_label: int):
    """Yield (z, label array, hu array) training pairs of one crop: 2D / 2.5D for each axial slice holding
    nodule, or the whole crop for 3D."""
    if kind == "3d":
        yield -1, label, hu
        return
    half = stack_slices // 2
    padded = np.pad(label, ((0, 0), (0, 0), (half, half)), constant_values=air_label) if kind == "2p5d" else None
    for z in np.flatnonzero((label == Tissue.NODULE).any(axis=(0, 1))):
        if kind == "2d":
            yield int(z), label[:, :, z], hu[:, :, z]
        else:  # k label slices, channel first, around the target slice
            yield int(z), np.moveaxis(padded[:, :, z : z + stack_slices], 2, 0), hu[:, :, z]


def write_shard(path: Path, volume_id: str, pairs: list[tuple[int, int, np.ndarray, np.ndarray]]) -> int:
    """One Parquet shard of (crop, z, label, hu) pairs with tensor columns; returns the number of rows."""
    if not pairs:
        return 0
    labels = np.stack([p[2] for p in pairs])
    hus = np.stack([p[3] for p in pairs]).astype(np.int16)
    table = pa.table(
        {
            "volume_id": pa.array([volume_id] * len(pairs)),
            "crop": pa.array([p[0] for p in pairs], pa.int32()),
            "z": pa.array([p[1] for p in pairs], pa.int32()),
            "label": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(labels)),
            "hu": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(hus)),
        }
    )
    write_parquet(path, table)
    return len(pairs)


def write_volume_shards(out: Path, part: str, volume: Volume, kinds: list[str], size: int, stack_slices: int,
                        air_label: int, crops: str = "one") -> dict[str, int]:  # fmt: skip
    """All kinds of pairs of one volume into ``out/part/<kind>-<volume_id>.parquet``; rows per kind."""
    cubes = nodule_crops(volume, size, air_label, crops)
    counts = {}
    for kind in kinds:
        pairs = [(k, *p) for k, (label, hu) in enumerate(cubes)
                 for p in pairs_from_crop(label, hu, kind, stack_slices, air_label)]  # fmt: skip
        counts[kind] = write_shard(Path(out) / part / f"{kind}-{volume.volume_id}.parquet", volume.volume_id, pairs)
    return counts


def read_description(gandata: str | Path) -> dict:
    path = Path(gandata) / DESCRIPTION
    if not path.is_file():
        raise CtsynthError(f"{path}: not found (is {gandata} made by `ctsynth prepare`?)")
    return json.loads(path.read_text())


class GanPairs:
    """A PyTorch-style dataset over GAN training data: item k is (label input, CT target) as float32 tensors.

    ``part`` 'train' or 'val', ``kind`` '2d', '2p5d' or '3d'. The label input is encoded (``scalar``: one channel
    per slice; ``onehot``: classes x slices for 2.5D) and the CT target is HU / 2000 with a channel axis.
    """

    def __init__(self, gandata: str | Path, part: str = "train", kind: str = "2d", encoding: str = "scalar"):
        description = read_description(gandata)
        self.scheme = description["scheme"]
        self.encoding = encoding
        self.kind = kind
        shards = sorted((Path(gandata) / part).glob(f"{kind}-*.parquet"))
        if not shards:
            raise CtsynthError(f"{gandata}: no {kind} shards in {part}/")
        tables = [pq.read_table(s) for s in shards]
        self.labels = np.concatenate([t.column("label").combine_chunks().to_numpy_ndarray() for t in tables])
        self.hu = np.concatenate([t.column("hu").combine_chunks().to_numpy_ndarray() for t in tables])
        self.volume_ids = [v for t in tables for v in t.column("volume_id").to_pylist()]
        self.crops = [c for t in tables for c in t.column("crop").to_pylist()]
        self.z = [z for t in tables for z in t.column("z").to_pylist()]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, k: int):
        import torch

        label = encode_labels(self.labels[k], self.scheme, self.encoding)
        if self.kind == "2p5d":  # (channels, k, x, y) -> (channels * k, x, y)
            label = label.reshape(-1, *label.shape[2:])
        return torch.from_numpy(label), torch.from_numpy(hu_to_network(self.hu[k])[None])
