"""`ctsynth synth-labels`: N new label volumes in the dataset layout, in chunks of Ray tasks."""

from __future__ import annotations

import warnings
from pathlib import Path

from ctsynth_ray.dataset import dataset_fingerprint, read_prepare_record, staged_dataset, write_manifest
from ctsynth_ray.errors import CtsynthError, CtsynthWarning
from ctsynth_ray.nodule_bank import load_bank
from ctsynth_ray.pipelines.runtime import RayOptions, parallel_map
from ctsynth_ray.storage import as_text, local_copy, resolved
from ctsynth_ray.synth_labels import (
    SourceCache,
    SynthLabelConfig,
    check_sources,
    plan_chunks,
    write_label_volumes,
)

# Per process: a Ray worker decodes each source volume once. Keyed by the dataset's path, manifest fingerprint and
# the cube size, so a dataset rewritten in place, or another size, never reuses the wrong volumes.
_CACHES: dict[tuple[str, str, int], SourceCache] = {}


#: Decoded label maps a worker keeps: work comes grouped by source, so one or two LIDC-size ones are enough.
CACHE_BYTES = 1 << 30
#: A chunk task's own memory besides its cache (the process, the chunk's cubes while they are written).
TASK_MEMORY = 300 << 20


def source_cache(source: str, fingerprint: str, size: int, max_bytes: int = CACHE_BYTES) -> SourceCache:
    """This process' cache of the train volumes of ``source`` that can give ``size``^3 cubes (decoded volumes
    beyond ``max_bytes`` are dropped, least recently used first)."""
    key = (source, fingerprint, size)
    if key not in _CACHES:
        _CACHES[key] = SourceCache(source, check_sources(source, size), max_bytes)
    return _CACHES[key]


def _chunk_task(out: str, source: str, fingerprint: str, seed: int, indices: list[int], bank,
                config: SynthLabelConfig) -> list[dict]:  # fmt: skip
    local = str(local_copy(source, "source dataset", fingerprint))  # an object-store source: this node's copy
    return write_label_volumes(out, local, seed, indices, bank, config, source_cache(local, fingerprint, config.size))


def resolve_bank(source: Path, bank: Path | None) -> Path:
    """The template bank to paste from: ``bank`` when given, else the one ``prepare`` last saved for ``source``."""
    if bank is not None:
        if not Path(bank).is_file():
            raise CtsynthError(f"{bank}: no such template bank (prepare writes GANDATA/nodule_bank.parquet)")
        return Path(bank).resolve()
    record = read_prepare_record(source)
    bank = record.get("bank") if record else None
    if bank is None or not Path(bank).is_file():
        where = f" (prepare recorded {bank}, which is gone)" if bank else ""
        raise CtsynthError(f"{source}: no template bank{where}: run `ctsynth prepare {source} --out GANDATA` "
                           f"or pass --bank GANDATA/nodule_bank.parquet")  # fmt: skip
    if record.get("fingerprint") not in (None, dataset_fingerprint(source)):
        warnings.warn(f"{source}: the dataset changed since `prepare` saved the template bank {bank}; "
                      f"run prepare again for a bank of its current volumes", CtsynthWarning, stacklevel=2)  # fmt: skip
    return Path(bank)


def synth_labels(
    source: Path | str,
    out: Path | str,
    n: int,
    *,
    config: SynthLabelConfig = SynthLabelConfig(),
    bank: Path | None = None,
    seed: int = 0,
    ray_options: RayOptions = RayOptions(),
    chunk: int = 16,
) -> list[dict]:
    """Write ``n`` label volumes to ``out``, pasting templates of ``bank`` (default: the bank ``prepare`` saved
    for ``source``); returns the manifest rows. Volume i depends only on (seed, i). ``source`` and ``out`` may be
    object-store URIs: each task reads its node's copy of the source and writes straight to ``out``."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    given = resolved(source)  # absolute: Ray workers may run in another working directory
    source = local_copy(given, "source dataset")
    rows = check_sources(source, config.size)
    n_sources = len(rows)
    # Declared to Ray: a worker's cache (at least the largest label map, plus the one being decoded) and the task.
    largest = max(r["shape_x"] * r["shape_y"] * r["shape_z"] for r in rows)
    memory = TASK_MEMORY + max(CACHE_BYTES, largest) + largest
    templates = load_bank(resolve_bank(source, bank)) if config.p_nodule > 0 else []
    fingerprint = dataset_fingerprint(source)
    chunks = plan_chunks(seed, range(n), n_sources, chunk)
    with staged_dataset(out, overwrite=ray_options.overwrite, subfolders=("masks", "labels")) as stage:
        arguments = [(as_text(stage), as_text(given), fingerprint, seed, c, templates, config) for c in chunks]
        results = parallel_map(_chunk_task, arguments, ray_options, description="label volumes", unit="chunk",
                               memory=[memory] * len(arguments))  # fmt: skip
        rows = sorted((row for chunk_rows in results for row in chunk_rows), key=lambda row: row["synth_index"])
        write_manifest(stage, rows)
    return rows
