"""The nodule segmenter: a 3D U-Net (Cicek et al. 2016), balanced patch sampling, Dice + cross-entropy, sliding
window inference, and the training-set specs that mix real and synthetic datasets.

A training spec is ``DATASET[:split][:n=N]``: the volumes of DATASET (of one split when given), N of them
drawn reproducibly by the seed when given. The thesis' set-ups, with the GAN trained on ``real``'s train split::

    real-344                 --train real:train:n=344
    synthetic-344 / -1400    --train synth:n=344              --train synth:n=1400
    real-59 + synthetic-590  --train real:test:n=59 --train synth:n=590   (a split the GAN never trained on)

A seed draws one permutation of each dataset and every spec takes a prefix of it (within its split), so with
one seed ``synth:n=344`` is a subset of ``synth:n=590``, itself a subset of ``synth:n=1400``: set-ups differ
only in what they add.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctsynth_ray.dataset import SPLITS, crop_cube, load_volume, read_manifest, read_prepare_record
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.labels import AIR_HU, hu_to_network
from ctsynth_ray.models.networks import conv, conv_transpose, instance_norm
from ctsynth_ray.storage import location


class UNet(nn.Module):
    """U-Net with ``len(features)`` levels (default 3D, 32-64-128-256 as Cicek et al.): two 3x3 convs with
    instance norm and ReLU per level, max-pool down, transposed conv up, skip connections, 1x1 conv to
    ``out_channels`` logits. Spatial sizes must be divisible by 2**(levels - 1)."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                 features: tuple[int, ...] = (32, 64, 128, 256)):  # fmt: skip
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(features) < 2 or min(features) < 1:
            raise ValueError(f"features must be at least two positive widths, got {tuple(features)}")
        if in_channels < 1 or out_channels < 2:
            raise ValueError(f"in_channels must be >= 1 and out_channels >= 2, got {in_channels}, {out_channels}")
        Conv, ConvT, Norm = conv(spatial_dims), conv_transpose(spatial_dims), instance_norm(spatial_dims)

        # Every convolution but the head feeds an instance norm (the up-convolutions through the next level's
        # first convolution), which removes a per-channel constant: a bias there would get no gradient.
        def double(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(Conv(cin, cout, 3, padding=1, bias=False), Norm(cout, affine=True), nn.ReLU(True),
                                 Conv(cout, cout, 3, padding=1, bias=False), Norm(cout, affine=True), nn.ReLU(True))  # fmt: skip

        self.pool = nn.MaxPool3d(2) if spatial_dims == 3 else nn.MaxPool2d(2)
        self.down = nn.ModuleList([double(in_channels, features[0])])
        self.down.extend(double(a, b) for a, b in itertools.pairwise(features))
        self.up = nn.ModuleList(ConvT(b, a, 2, stride=2, bias=False) for a, b in itertools.pairwise(features))
        self.merge = nn.ModuleList(double(2 * a, a) for a in features[:-1])
        self.head = Conv(features[0], out_channels, 1)
        self.levels = len(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(reversed(self.up), reversed(self.merge)):
            x = merge(torch.cat([skips.pop(), up(x)], 1))
        return self.head(x)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice of the nodule class). ``logits`` (N, 2, ...), ``target`` (N, ...) in {0, 1}."""
    target = target.long()
    ce = F.cross_entropy(logits, target)
    prob = torch.softmax(logits.float(), 1)[:, 1]
    truth = (target == 1).float()
    dims = tuple(range(1, truth.ndim))
    dice = (2 * (prob * truth).sum(dims) + smooth) / (prob.sum(dims) + truth.sum(dims) + smooth)
    return ce + (1 - dice.mean())


# ------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TrainSpec:
    dataset: Path
    split: str | None = None
    n: int | None = None


def parse_spec(text: str) -> TrainSpec:
    """``DATASET[:split][:n=N]`` -> TrainSpec; ValueError saying what is wrong."""
    dataset, rest = split_spec(text)
    if ":" in (urlsplit(dataset).path if "://" in dataset else dataset):  # a URI's host:port is fine, a path's ":" not
        raise ValueError(f"{text!r}: expected DATASET[:split][:n=N] with split one of {', '.join(SPLITS)}")
    split = n = None
    for part in rest:
        if re.fullmatch(r"n=\d+", part):
            n = int(part[2:])
            if n < 1:
                raise ValueError(f"{text!r}: n must be at least 1")
        elif part in SPLITS and split is None:
            split = part
        else:
            raise ValueError(f"{text!r}: expected DATASET[:split][:n=N] with split one of {', '.join(SPLITS)}")
    if not dataset:
        raise ValueError(f"{text!r}: no dataset")
    return TrainSpec(Path(dataset), split, n)


def split_spec(text: str) -> tuple[str, list[str]]:
    """(DATASET, [split and n=N parts]) of a spec: the parts are taken from the right, so a URI's own colons
    (``s3://``, ``host:port``) stay with the dataset."""
    parts = text.split(":")
    tail: list[str] = []
    while len(parts) > 1 and (parts[-1] in SPLITS or re.fullmatch(r"n=\d+", parts[-1])):
        tail.insert(0, parts.pop())
    return ":".join(parts), tail


def absolute_spec(text: str) -> str:
    """The same spec with its dataset path made absolute."""
    dataset, rest = split_spec(text)
    return ":".join([str(Path(dataset).resolve()), *rest])


def draw_order(rows: list[dict], seed: int) -> list[dict]:
    """``rows`` in the order ``seed`` draws them: a permutation of the dataset fixed by (seed, volume_id), so a
    volume's place does not depend on the manifest's order or on which other volumes a spec keeps."""
    return sorted(rows, key=lambda r: hashlib.sha256(f"{seed}/{r['volume_id']}".encode()).digest())


def select_volumes(specs: list[TrainSpec], seed: int) -> list[tuple[Path, dict]]:
    """(dataset, manifest row) for every volume the specs ask for: volumes with an image; with ``n``, the first N
    of the dataset's draw order (:func:`draw_order`) within the spec's split, so larger N add volumes and never
    swap them. CtsynthError when a spec asks for more volumes than it has, or two specs pick the same volume."""
    chosen, seen = [], set()
    for spec in specs:
        rows = [
            r
            for r in read_manifest(spec.dataset)
            if r.get("image") and (spec.split is None or r["split"] == spec.split)
        ]
        where = f" in split {spec.split}" if spec.split else ""
        if not rows:
            raise CtsynthError(f"{spec.dataset}: no volume with an image{where}")
        if spec.n is not None:
            if spec.n > len(rows):
                raise CtsynthError(f"{spec.dataset}: asked for n={spec.n} but it has {len(rows)} volume(s){where}")
            picked = {r["volume_id"] for r in draw_order(rows, seed)[: spec.n]}
            rows = [r for r in rows if r["volume_id"] in picked]
        twice = [r["volume_id"] for r in rows if (str(spec.dataset.resolve()), r["volume_id"]) in seen]
        if twice:
            raise CtsynthError(f"{spec.dataset}: {name_list(twice)} picked by more than one --train spec")
        seen |= {(str(spec.dataset.resolve()), r["volume_id"]) for r in rows}
        chosen += [(spec.dataset, r) for r in rows]
    return chosen


def name_list(names, limit: int = 8) -> str:
    """'a, b, c' or 'a, b, ... (and 12 more)': volume names for a one-line message."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} (and {len(names) - limit} more)"


def check_no_leakage(train: list[tuple[Path, dict]], val_rows: list[dict]) -> None:
    """CtsynthError, one line per kind of leak, when a training volume is a validation volume (by ``volume_id``,
    whichever dataset holds it: a re-ingested copy has the same id), a synthetic training volume was cut from a
    validation volume (its ``source_volume_id``), or carries a nodule template cut from one (its ``template_id``,
    ``<volume_id>#<k>``)."""
    val_ids = {r["volume_id"] for r in val_rows}
    shared = sorted({row["volume_id"] for _, row in train} & val_ids)
    derived = sorted(f"{row['volume_id']} (from {row['source_volume_id']})" for _, row in train
                     if row.get("source_volume_id") in val_ids)  # fmt: skip
    pasted = sorted(f"{row['volume_id']} (template {row['template_id']})" for _, row in train
                    if row.get("template_id") and row["template_id"].rsplit("#", 1)[0] in val_ids)  # fmt: skip
    problems = []
    if shared:
        problems.append(f"{len(shared)} training volume(s) are also validation volumes: {name_list(shared)}")
    if derived:
        problems.append(
            f"{len(derived)} synthetic training volume(s) were cut from validation volumes: {name_list(derived)}"
        )
    if pasted:
        problems.append(
            f"{len(pasted)} synthetic training volume(s) carry a nodule cut from a validation volume: {name_list(pasted)}"
        )
    if problems:
        raise CtsynthError("\n".join(problems))


def gan_training_volumes(train: list[tuple[Path, dict]]) -> dict[str, str]:
    """{volume_id: where that is recorded} of the real volumes that trained the GAN(s) behind a training set: from
    the GAN data of each generator that made its synthetic volumes (``generator`` column -> generator.json ->
    gan_data.json), and from the prepare record of each dataset in it."""
    import json

    found: dict[str, str] = {}
    generators = {row["generator"] for _, row in train if row.get("source") == "synthetic" and row.get("generator")}
    for generator in sorted(generators):
        try:  # folders or object-store URIs, as recorded
            gan_data = location(
                json.loads((location(generator) / "generator.json").read_text())["training_data"]["path"]
            )
            volumes = json.loads((gan_data / "gan_data.json").read_text())["volumes"]["train"]
        except (OSError, ValueError, KeyError, CtsynthError):
            continue  # a generator moved or made elsewhere: its training data are not on this machine
        found.update(dict.fromkeys(volumes, f"GAN data {gan_data}"))
    for dataset in {dataset for dataset, _ in train}:
        record = read_prepare_record(dataset)
        if record:
            found.update(dict.fromkeys(record.get("gan_train_volumes", []), f"prepare --out {record.get('gan_data')}"))
    return found


def gan_overlap_warnings(train: list[tuple[Path, dict]]) -> list[str]:
    """Warnings for a training set that mixes synthetic volumes with real volumes that trained the GAN (by
    ``volume_id``, so re-ingested copies count): the thesis' mixed set-up takes its real part from a split the
    GAN never trained on. Real-only and synthetic-only sets get none."""
    if not any(row.get("source") == "synthetic" for _, row in train):
        return []
    trained = gan_training_volumes(train)
    real: dict[Path, list[str]] = {}
    for dataset, row in train:
        if row.get("source") != "synthetic" and row["volume_id"] in trained:
            real.setdefault(dataset, []).append(row["volume_id"])
    return [
        f"{dataset}: {len(ids)} real training volume(s) trained the GAN ({trained[ids[0]]}): {name_list(sorted(ids))}; "
        f"the thesis' mixed set-up takes its real part from a split the GAN never trained on (e.g. {dataset}:test:n=N)"
        for dataset, ids in real.items()
    ]


@dataclass
class CachedVolume:
    """A decoded volume: CT at network scale (float32), nodule mask (uint8), and the mask's voxel indices
    (found once: scanning a whole mask for every patch would starve a GPU)."""

    ct: np.ndarray
    mask: np.ndarray
    nodule_voxels: np.ndarray


class VolumeCache:
    """Volumes decoded once (gzip is slow) as :class:`CachedVolume`, least recently used dropped first
    beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = 8 << 30):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, CachedVolume] = OrderedDict()
        self._lock = threading.Lock()  # the prefetch thread and evaluation share it

    def get(self, dataset: Path, row: dict) -> CachedVolume:
        with self._lock:
            return self._get(dataset, row)

    def _get(self, dataset: Path, row: dict) -> CachedVolume:
        key = (str(dataset), row["volume_id"])
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        volume = load_volume(dataset, row)
        mask = (volume.mask > 0).astype(np.uint8)
        item = CachedVolume(hu_to_network(volume.hu), mask, np.argwhere(mask))
        self._items[key] = item
        while len(self._items) > 1 and sum(v.ct.nbytes + v.mask.nbytes for v in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)
        return item


AIR = float(hu_to_network(np.float32(AIR_HU)))  # what patches and sliding windows are padded with


def sample_patches(rng: np.random.Generator, ct: np.ndarray, mask: np.ndarray, patch: int, count: int,
                   nodule_voxels: np.ndarray | None = None):  # fmt: skip
    """``count`` patches (ct, mask) of ``patch``^3; each centre is a nodule voxel or a background voxel with
    equal probability (background only when the volume has no nodule). Padded with air / 0 at borders.
    ``nodule_voxels`` (``np.argwhere(mask)``) saves a scan of the mask when known."""
    nodule = np.argwhere(mask > 0) if nodule_voxels is None else nodule_voxels
    nodule = nodule if len(nodule) else None
    cts, masks = [], []
    for _ in range(count):
        if nodule is not None and rng.random() < 0.5:
            centre = nodule[rng.integers(len(nodule))]
        else:
            while True:  # background centre
                centre = np.array([rng.integers(n) for n in mask.shape])
                if not mask[tuple(centre)]:
                    break
        origin = centre - patch // 2
        cts.append(crop_cube(ct, origin, patch, AIR))
        masks.append(crop_cube(mask, origin, patch, 0))
    return np.stack(cts), np.stack(masks)


def prefetch(make, indices, depth: int = 2):
    """Yield ``make(k)`` for each k of ``indices``, computed up to ``depth`` ahead in a background thread, so
    patch sampling (numpy, which releases the GIL) overlaps the training step."""
    from concurrent.futures import ThreadPoolExecutor

    indices = list(indices)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(make, k) for k in indices[:depth]]
        for n in range(len(indices)):
            result = pending.pop(0).result()
            if n + depth < len(indices):
                pending.append(pool.submit(make, indices[n + depth]))
            yield result


# -------------------------------------------------------------------------------------- inference


def gaussian_weight(patch: int, sigma_scale: float = 0.125) -> np.ndarray:
    """Importance map for sliding windows: a Gaussian with sigma = patch / 8, as nnU-Net, floored at 1e-3 of its
    peak so that voxels seen only by window corners are still covered."""
    axis = np.arange(patch) - (patch - 1) / 2
    g = np.exp(-(axis**2) / (2 * (patch * sigma_scale) ** 2))
    weight = g[:, None, None] * g[None, :, None] * g[None, None, :]
    return np.maximum(weight / weight.max(), 1e-3).astype(np.float32)


def sliding_window(volume: np.ndarray, predict, patch: int, overlap: float = 0.5, batch: int = 8,
                   pad_value: float = AIR) -> np.ndarray:  # fmt: skip
    """Whole-volume output of ``predict`` (a function of (N, 1, p, p, p) tensors -> (N, C, p, p, p)) from
    overlapping ``patch``^3 windows averaged with Gaussian weights; returns (C, *volume.shape) float32. A volume
    smaller than a window is padded with ``pad_value`` (air by default; MONAI's ``sliding_window_inference`` calls
    it ``cval``)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    padded_shape = [max(n, patch) for n in volume.shape]
    padded = np.full(padded_shape, pad_value, np.float32)
    padded[: volume.shape[0], : volume.shape[1], : volume.shape[2]] = volume
    step = max(1, int(patch * (1 - overlap)))
    starts = [sorted({*range(0, n - patch + 1, step), n - patch}) for n in padded_shape]
    corners = [(x, y, z) for x in starts[0] for y in starts[1] for z in starts[2]]
    weight = gaussian_weight(patch)
    total, norm = None, np.zeros(padded_shape, np.float32)
    for k in range(0, len(corners), batch):
        chunk = corners[k : k + batch]
        windows = np.stack([padded[x : x + patch, y : y + patch, z : z + patch] for x, y, z in chunk])[:, None]
        out = np.asarray(predict(torch.from_numpy(windows)), np.float32)
        if total is None:
            total = np.zeros((out.shape[1], *padded_shape), np.float32)
        for (x, y, z), o in zip(chunk, out):
            total[:, x : x + patch, y : y + patch, z : z + patch] += o * weight
            norm[x : x + patch, y : y + patch, z : z + patch] += weight
    result = total / np.maximum(norm, 1e-8)
    return result[:, : volume.shape[0], : volume.shape[1], : volume.shape[2]]


def segment(model: nn.Module, ct: np.ndarray, patch: int, device="cpu", overlap: float = 0.5,
            pad_value: float = AIR) -> np.ndarray:  # fmt: skip
    """Nodule mask (uint8) of a network-scaled CT volume by sliding-window softmax, threshold 0.5; windows past
    the volume's edge see air (``pad_value``), as the training patches do."""
    was_training = model.training
    model.eval()

    @torch.no_grad()
    def predict(windows: torch.Tensor) -> np.ndarray:
        with torch.autocast(
            torch.device(device).type, dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"
        ):
            return torch.softmax(model(windows.to(device)).float(), 1).cpu().numpy()

    try:
        return (sliding_window(ct, predict, patch, overlap, pad_value=pad_value)[1] >= 0.5).astype(np.uint8)
    finally:
        model.train(was_training)
