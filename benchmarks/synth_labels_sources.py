"""`synth-labels` from 50 real-sized sources against the same from one: does grouping by source keep the rate?

    .venv/bin/python benchmarks/synth_labels_sources.py [--n 2000] [--sources 50]

Ingests the real LIDC-IDRI-0001 (736 x 736 x 331) and makes its label map (not timed), then lays out two source
datasets: the one volume, and ``--sources`` copies of it under other ids (each decoded on its own, as different
volumes would be). Times ``synth_labels`` of N 128^3 volumes from each, in one process (one core), and prints
both rates and their ratio (goal: the many-source rate within 2x of the one-source rate).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from ctsynth_ray.dataset import read_manifest, write_manifest
from ctsynth_ray.nodule_bank import build_template_bank, save_bank
from ctsynth_ray.pipelines.ingest import ingest
from ctsynth_ray.pipelines.prepare import write_label_maps
from ctsynth_ray.pipelines.runtime import RayOptions
from ctsynth_ray.pipelines.synth_labels import synth_labels

QUIET = RayOptions(progress=False)
GOAL = 2.0


def copies(real: Path, out: Path, n: int) -> Path:
    """A dataset of ``n`` train volumes, each the real volume's files under its own id (links, not bytes)."""
    (row,) = read_manifest(real)
    rows = []
    for k in range(n):
        vid = f"copy-{k:03d}"
        copy = {**row, "volume_id": vid}
        for column in ("image", "mask", "label"):
            copy[column] = f"{column}s/{vid}.nii.gz"
            (out / f"{column}s").mkdir(parents=True, exist_ok=True)
            (out / copy[column]).symlink_to(real / row[column])
        rows.append(copy)
    write_manifest(out, rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--sources", type=int, default=50)
    args = parser.parse_args()
    data = Path(os.environ.get("CTSYNTH_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with tempfile.TemporaryDirectory() as tmp:
        real = Path(tmp) / "real"
        ingest("lidc", data / "lidc" / "LIDC-IDRI-0001", real, ray_options=QUIET)
        write_label_maps(real, "body", QUIET)
        bank = save_bank(build_template_bank(real, 15), Path(tmp) / "bank.parquet")
        rates = {}
        for n_sources in (1, args.sources):
            source = copies(real, Path(tmp) / f"sources-{n_sources}", n_sources)
            started = time.perf_counter()
            synth_labels(source, Path(tmp) / f"out-{n_sources}", args.n, bank=bank, ray_options=QUIET)
            rates[n_sources] = args.n / (time.perf_counter() - started)
            print(
                f"{n_sources:>3} source(s): {args.n} volumes of 128^3 at {rates[n_sources]:.1f} volumes/s on one core"
            )
    ratio = rates[1] / rates[args.sources]
    print(f"one source / {args.sources} sources = {ratio:.2f} (goal <= {GOAL:.0f})")


if __name__ == "__main__":
    main()
