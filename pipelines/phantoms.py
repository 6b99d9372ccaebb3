"""Make a phantom dataset, one Ray task per volume when asked for more than one worker."""

from __future__ import annotations

from pathlib import Path

from ctsynth_ray.dataset import staged_dataset, write_manifest
from ctsynth_ray.phantom import PhantomConfig, assign_splits, write_phantom
from ctsynth_ray.pipelines.runtime import RayOptions, parallel_map
from ctsynth_ray.storage import Remote, as_text, location


def make_phantom_dataset(
    out: Path | Remote | str,
    n: int,
    *,
    config: PhantomConfig = PhantomConfig(),
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    ray_options: RayOptions = RayOptions(),
) -> Path | Remote:
    """Write ``n`` phantoms to ``out`` (a folder or an object-store URI) in the dataset layout; returns the
    manifest's path.

    Volume i is the same whatever the worker count is; nothing is left behind if it fails.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    splits = assign_splits(n, split_fractions, seed)
    with staged_dataset(out, overwrite=ray_options.overwrite) as stage:
        arguments = [(as_text(stage), seed, i, config, splits[i]) for i in range(n)]
        rows = parallel_map(write_phantom, arguments, ray_options, description="phantoms")
        write_manifest(stage, rows)
    return location(out) / "manifest.parquet"
