"""`ctsynth synth-labels`: N new label volumes in the dataset layout, in chunks of Ray tasks."""

from __future__ import annotations

from pathlib import Path

from ctsynth_ray.dataset import staged_dataset, write_manifest
from ctsynth_ray.nodule_bank import build_template_bank
from ctsynth_ray.pipelines.runtime import parallel_map
from ctsynth_ray.synth_labels import SourceCache, SynthLabelConfig, check_sources, write_label_volumes

_CACHES: dict[str, SourceCache] = {}  # per process: a Ray worker decodes each source volume once


def _chunk_task(out: str, source: str, seed: int, indices: list[int], bank, config: SynthLabelConfig) -> list[dict]:
    cache = _CACHES.get(source)
    if cache is None:
        cache = _CACHES[source] = SourceCache(source, check_sources(source, config.size))
    return write_label_volumes(out, source, seed, indices, bank, config, cache)


def synth_labels(
    source: Path,
    out: Path,
    n: int,
    *,
    config: SynthLabelConfig = SynthLabelConfig(),
    n_templates: int | None = 15,
    seed: int = 0,
    workers: int = 1,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    chunk: int = 16,
) -> list[dict]:
    """Write ``n`` label volumes to ``out``; returns the manifest rows. Volume i depends only on (seed, i)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    source = Path(source).resolve()  # Ray workers may run in another working directory
    check_sources(source, config.size)
    bank = build_template_bank(source, n_templates, seed) if config.p_nodule > 0 else []
    chunks = [list(range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    with staged_dataset(out, overwrite=overwrite, subfolders=("masks", "labels")) as stage:
        results = parallel_map(_chunk_task, [(str(stage), str(source), seed, c, bank, config) for c in chunks],
                               workers=workers, address=address, description="label volumes",
                               progress=progress, unit="chunk")  # fmt: skip
        rows = [row for chunk_rows in results for row in chunk_rows]
        write_manifest(stage, rows)
    return rows
