"""Make a phantom dataset, one Ray task per volume when asked for more than one worker."""

from __future__ import annotations

from pathlib import Path

from ctsynth_ray.dataset import staged_dataset, write_manifest
from ctsynth_ray.phantom import PhantomConfig, assign_splits, write_phantom
from ctsynth_ray.pipelines.runtime import parallel_map


def make_phantom_dataset(
    out: Path,
    n: int,
    *,
    config: PhantomConfig = PhantomConfig(),
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    workers: int = 1,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``n`` phantoms to ``out`` in the dataset layout; returns the manifest path.

    Volume i is the same whatever ``workers`` is; nothing is left behind if it fails.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    splits = assign_splits(n, split_fractions, seed)
    with staged_dataset(out, overwrite=overwrite) as stage:
        rows = parallel_map(
            write_phantom,
            [(str(stage), seed, i, config, splits[i]) for i in range(n)],
            workers=workers,
            address=address,
            description="phantoms",
            progress=progress,
        )
        write_manifest(stage, rows)
    return Path(out) / "manifest.parquet"
