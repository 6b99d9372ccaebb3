"""Generation: label volumes to CT with a trained generator, and the writer that puts each volume on disk once.

:class:`Translator` runs an exported generator (``ctsynth_ray.models.registry.load_generator``) the way it was
trained: every axial slice of several volumes in one batch for 2D models, k-slice label stacks for 2.5D, whole
volumes for 3D; labels encoded and CT decoded by the one encoder of :mod:`ctsynth_ray.labels`; bf16 autocast (on
GPUs, and on CPUs with native bf16) and channels-last on GPUs, ``torch.compile`` on request. A slice's output
does not depend on which other slices share its batch (the generator runs in eval mode), so on a CPU the same
labels give bitwise the same CT whatever the batch size or the number of workers.

:class:`VolumeWriter` writes a generated volume's image, mask and label map (each under a temporary name, then
renamed to a name fixed by (seed, i)) and, last, its manifest row as ``.progress/<volume_id>.json``: a volume
is finished exactly when that file exists, so a killed run leaves nothing that looks finished and is not.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctsynth_ray.dataset import Volume, write_volume
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.labels import Tissue, encode_labels_tensor, n_classes, network_to_hu_tensor
from ctsynth_ray.progress import read_records, write_record
from ctsynth_ray.storage import Remote, local_copy, location
from ctsynth_ray.synth_labels import make_label_volume, synthetic_volume_id

#: Default slices per forward pass: on a GPU, 512 (the H200's rate levels off there); on a CPU, 16 (the default
#: CycleGAN generator ran 29 slices/s at 8-32 and 20 at 128-256 on the 2-core development machine).
GPU_BATCH, CPU_BATCH = 512, 16


def generator_fingerprint(run_dir: str | os.PathLike) -> str:
    """A short hash of a generator's weights and description: which generator made a volume."""
    run_dir = Path(run_dir)
    digest = hashlib.sha256()
    for name in ("generator.pt", "generator.json"):
        digest.update((run_dir / name).read_bytes())
    return digest.hexdigest()[:16]


def check_generator_fits(info: dict, size: int, scheme: str) -> None:
    """CtsynthError naming the problem when ``size``^3 cubes of a ``scheme`` label map cannot go through the
    generator described by ``info`` (its generator.json)."""
    network = info["network"]
    if info["label_scheme"] != scheme:
        raise CtsynthError(f"the generator was trained on {info['label_scheme']} label maps, the source has {scheme} "
                           f"ones (prepare the source with --scheme {info['label_scheme']})")  # fmt: skip
    stack = (info.get("stack_slices") or 1) if info["dims"] == "2.5" else 1
    per_slice = n_classes(scheme) if info["label_encoding"] == "onehot" else 1
    if network["in_channels"] != per_slice * stack:
        raise CtsynthError(f"the generator takes {network['in_channels']} input channels, but {info['label_encoding']} "
                           f"{scheme} labels of {stack} slice(s) make {per_slice * stack}")  # fmt: skip
    # The U-Net halves a size n_down times; the ResNet generator twice (two stride-2 convolutions).
    multiple = 2 ** network["arguments"]["n_down"] if network["architecture"] == "unet" else 4
    if size % multiple:
        raise CtsynthError(f"--size {size} does not fit the generator ({network['architecture']}: sizes must be "
                           f"multiples of {multiple}; it was trained on {info.get('size')})")  # fmt: skip


class Translator:
    """Label volumes (uint8, (x, y, z)) to CT (int16 HU, same shape) with an exported generator.

    ``batch`` is slices per forward pass for 2D / 2.5D generators, volumes per pass for 3D ones.
    """

    def __init__(self, generator: nn.Module, info: dict, device: str | torch.device = "cpu", batch: int = 64,
                 compile: bool = False, bf16: bool | None = None):  # fmt: skip
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.dims = info["dims"]
        self.scheme = info["label_scheme"]
        self.encoding = info["label_encoding"]
        self.stack = (info.get("stack_slices") or 1) if self.dims == "2.5" else 1
        self.air = Tissue.OUTSIDE_AIR if self.scheme == "body" else Tissue.OTHER  # what prepare pads with
        self.device = torch.device(device)
        self.batch = batch
        gpu = self.device.type == "cuda"
        # bf16 autocast on GPUs, and on CPUs with native bf16 (AVX-512 BF16, AMX: about twice fp32's speed);
        # either way a slice's output does not depend on its batch.
        native = gpu or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        self.autocast = native if bf16 is None else bf16
        self.memory_format = torch.channels_last if gpu and self.dims != "3" else torch.contiguous_format
        if gpu:
            torch.backends.cudnn.benchmark = True  # the input shape is fixed: let cuDNN pick its fastest kernels
        generator = generator.to(self.device, memory_format=self.memory_format).eval()
        self.generator = torch.compile(generator) if compile else generator

    def _slices(self, label: np.ndarray) -> torch.Tensor:
        """One label volume as the network's uint8 input on the device: (z, x, y) slices, (z, k, x, y) stacks
        (padded with air beyond the volume, as ``prepare`` pads), or the (1, x, y, z) volume. NIfTI volumes are
        Fortran-ordered: their transpose (z, y, x) is contiguous, so nothing is copied on the way in."""
        if self.dims == "3":
            return self._to_device(label)[None]
        zyx = self._to_device(label.T)
        slices = zyx.transpose(1, 2)  # (z, x, y)
        if self.dims == "2":
            return slices
        half = self.stack // 2
        air = torch.full((half, *slices.shape[1:]), int(self.air), dtype=slices.dtype, device=slices.device)
        padded = torch.cat([air, slices, air])
        return padded.unfold(0, self.stack, 1).permute(0, 3, 1, 2)  # (z, k, x, y)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # e.g. read from Ray's object store; torch wants to own writable memory
            array = array.copy()
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    @torch.no_grad()
    def _forward(self, labels: torch.Tensor) -> torch.Tensor:
        """uint8 labels in, int16 HU out, both on the device: encoding and decoding run there too."""
        x = encode_labels_tensor(labels, self.scheme, self.encoding)
        if self.dims == "2.5":  # (n, c, k, x, y) -> (n, c * k, x, y): channels as GanPairs makes them
            x = x.reshape(x.shape[0], -1, *x.shape[3:])
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            y = self.generator(x)
        return network_to_hu_tensor(y[:, 0])

    @torch.no_grad()
    def translate(self, labels: Sequence[np.ndarray]) -> list[np.ndarray]:
        """CT of each label volume, in HU (int16, clipped to -1024..3071), Fortran-ordered (x, y, z) as NIfTI
        stores it. A GPU receives a byte per voxel and returns two; nothing is transposed on the CPU."""
        inputs = [self._slices(label) for label in labels]
        stacked = torch.cat(inputs)
        outputs = torch.cat([self._forward(stacked[k : k + self.batch]) for k in range(0, len(stacked), self.batch)])
        ct, start = [], 0
        for x in inputs:
            part = outputs[start : start + len(x)]
            start += len(x)
            zyx = part[0].permute(2, 1, 0) if self.dims == "3" else part.transpose(1, 2)  # (z, y, x)
            ct.append(zyx.contiguous().cpu().numpy().T)
        return ct


@dataclass
class StageTimes:
    """Seconds spent per stage of generation (summed over workers)."""

    labels: float = 0.0
    inference: float = 0.0
    compression: float = 0.0
    write: float = 0.0

    def add(self, other: StageTimes) -> None:
        for name in ("labels", "inference", "compression", "write"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class LabelItem:
    """One planned volume: its index, label map, the affine of its cube, and its manifest extras."""

    index: int
    label: np.ndarray
    affine: np.ndarray
    extras: dict = field(default_factory=dict)


def label_items(seed: int, indices, sources, bank, config) -> tuple[list[LabelItem], float]:
    """The label volumes ``indices`` of run ``seed`` (``synth_labels.make_label_volume``) as items to translate,
    and the seconds they took."""
    started = time.perf_counter()
    items = []
    for index in indices:
        volume, extras = make_label_volume(seed, index, sources, bank, config)
        items.append(LabelItem(index, volume.label, volume.affine, extras))
    return items, time.perf_counter() - started


class VolumeWriter:
    """Writes generated volumes into ``root`` (the dataset layout) and marks each finished."""

    def __init__(self, root: str | os.PathLike, seed: int, extra: dict):
        self.root = location(root)
        self.seed = seed
        self.extra = extra  # columns every row gets (the generator's fingerprint and run)

    def write(self, item: LabelItem, hu: np.ndarray) -> tuple[dict, StageTimes]:
        """Write one volume (image, mask = label == nodule, label), then its progress row; returns the row."""
        times = {}
        mask = (item.label == Tissue.NODULE).astype(np.uint8)
        volume = Volume(synthetic_volume_id(self.seed, item.index), hu, mask, item.affine, item.label)
        row = write_volume(self.root, volume, split="train", source="synthetic", timings=times, **item.extras,
                           synth_seed=self.seed, synth_index=item.index, **self.extra)  # fmt: skip
        started = time.perf_counter()
        write_record(self.root, volume.volume_id, row)
        times["write"] = times.get("write", 0.0) + time.perf_counter() - started
        return row, StageTimes(compression=times.get("compression", 0.0), write=times["write"])


def finished_rows(root: str | os.PathLike) -> dict[int, dict]:
    """{synth_index: manifest row} of the volumes finished under ``root`` (progress rows whose files exist)."""
    records = read_records(root, lambda _, row, stored: all(row[c] in stored for c in ("image", "mask", "label")))
    return {int(row["synth_index"]): row for row in records.values()}


class VolumeMaker:
    """A generator and a writer pool: what each generator actor of ``ctsynth generate`` is (``ray.remote`` of this
    class), and what a benchmark drives directly on a machine without Ray.

    ``make`` translates a chunk of label items in one go, then compresses and writes the volumes in a thread pool
    (ISA-L's gzip releases the GIL); with two calls in flight (an actor's ``max_concurrency=2``), one call's
    inference overlaps the other's writes, while forward passes take turns. ``batch`` None: 512 slices on a GPU,
    16 on a CPU; for 3D generators 2 volumes on a GPU, 1 on a CPU.
    """

    def __init__(self, model: str | os.PathLike | Remote, out: str | os.PathLike | Remote, seed: int,
                 batch: int | None, compile: bool, threads: int, extra: dict, bf16: bool | None = None):  # fmt: skip
        from ctsynth_ray.models.registry import load_generator

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(threads)
        generator, info = load_generator(local_copy(model, "generator run"), device)
        if batch is None:  # a GPU wants large batches; on a CPU, batches beyond the cache are slower
            batch = (
                (GPU_BATCH if device == "cuda" else CPU_BATCH)
                if info["dims"] != "3"
                else (2 if device == "cuda" else 1)
            )
        self.translator = Translator(generator, info, device, batch, compile, bf16)
        self.inference = threading.Lock()  # one forward pass at a time (torch.compile is not thread-safe)
        self.writer = VolumeWriter(out, seed, extra)
        self.pool = ThreadPoolExecutor(max_workers=max(2, threads), thread_name_prefix="ctsynth-writer")
        self.process = os.getpid()

    def pid(self) -> int:
        return self.process

    def make(self, chunk: tuple[list[LabelItem], float]) -> tuple[list[dict], StageTimes]:
        """Translate a chunk (label items, seconds their synthesis took) and write every volume; returns their
        manifest rows and the time per stage."""
        items, label_seconds = chunk
        with self.inference:
            started = time.perf_counter()
            hus = self.translator.translate([item.label for item in items])
            times = StageTimes(labels=label_seconds, inference=time.perf_counter() - started)
        results = list(self.pool.map(self.writer.write, items, hus))
        for _, written in results:
            times.add(written)
        return [row for row, _ in results], times
