"""Peak memory and wall time per case of `ingest lidc` and `prepare`, on the real case and adult-size phantoms.

    .venv/bin/python benchmarks/ingest_prepare_memory.py [--cases real,adult,thin]

Cases: ``real`` = LIDC-IDRI-0001 from the shared test data (133 slices of 0.703 mm pixels, 2.5 mm apart: 736 x 736
x 331 after resampling); ``adult`` = an adult-size phantom on the same grid, exported as an LIDC-style case
(DICOM + 4-reader XML); ``thin`` = an adult-size phantom with 0.8 mm slices (a thin-slice scan: 733 x 733 x 320).
Each command runs as a user runs it (``ctsynth ingest lidc CASE --out DATASET``, then ``ctsynth prepare DATASET``)
in a process of its own on one core (``taskset -c 0``, one thread), started by a small process that reads its
peak resident memory with ``os.wait4``. Prints, per case and command, wall seconds and peak GB, with their ratios to the goals (1.5 GB for
both; prepare 15 s on one core).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ctsynth_ray.dataset import read_manifest
from ctsynth_ray.ingest.export import export_lidc_case
from ctsynth_ray.phantom import PhantomConfig, make_phantom

MEMORY_GOAL = 1.5e9
PREPARE_SECONDS_GOAL = 15.0
#: (seed, index, config) of each adult-size phantom: ones with nodules, so that prepare has GAN data to cut.
PHANTOMS = {
    "adult": (0, 1, PhantomConfig(shape=(512, 512, 133), spacing_mm=(0.703125, 0.703125, 2.5))),
    "thin": (3, 2, PhantomConfig(shape=(512, 512, 400), spacing_mm=(0.7, 0.7, 0.8))),
}
ONE_CORE = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


#: Runs a command and writes its peak resident memory (KiB) to a file. A child forked from this process (which
#: has made phantoms) would count this process' pages as its own, Linux keeping the larger high-water mark across
#: exec, so each command is started by a small Python process of its own.
PEAK_OF = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, s, u = os.wait4(p.pid, 0); "
           "open(sys.argv[1], 'w').write(str(u.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(s))")  # fmt: skip


def measured(args: list[str], folder: Path) -> tuple[float, float]:
    """(wall seconds, peak resident bytes) of a ctsynth command on one core."""
    peak = folder / "peak"
    command = ["taskset", "-c", "0", sys.executable, "-m", "ctsynth_ray.cli.main", *args]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_OF, str(peak), *command], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env={**os.environ, **ONE_CORE})  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr.decode()[-2000:]}")
    return time.perf_counter() - started, int(peak.read_text()) * 1024.0


def make_case(name: str, folder: Path, data: Path) -> Path:
    """A source folder holding the one case ``name``."""
    src = folder / f"src-{name}"
    src.mkdir()
    if name == "real":
        shutil.copytree(data / "lidc" / "LIDC-IDRI-0001", src / "LIDC-IDRI-0001")  # a search does not follow links
        return src
    phantom = make_phantom(*PHANTOMS[name])
    phantom.volume.volume_id = f"phantom-{name}"
    export_lidc_case(phantom.volume, src)
    return src


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="real,adult,thin")
    args = parser.parse_args()
    data = Path(os.environ.get("CTSYNTH_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    print(f"{'case':<6} {'grid after ingest':<20} {'command':<8} {'wall s':>7} {'peak GB':>8} "
          f"{'/ 1.5 GB':>9} {'/ 15 s':>7}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            src = make_case(name, Path(tmp), data)
            dataset, gan = Path(tmp) / f"real-{name}", Path(tmp) / f"gan-{name}"
            ingest = measured(["ingest", "lidc", str(src), "--out", str(dataset)], Path(tmp))
            (row,) = read_manifest(dataset)
            prepare = measured(["prepare", str(dataset), "--out", str(gan)], Path(tmp))
            grid = f"{row['shape_x']} x {row['shape_y']} x {row['shape_z']}"
            for command, (wall, peak) in (("ingest", ingest), ("prepare", prepare)):
                per_core = f"{wall / PREPARE_SECONDS_GOAL:7.2f}" if command == "prepare" else f"{'':7}"
                print(f"{name:<6} {grid:<20} {command:<8} {wall:7.1f} {peak / 1e9:8.2f} {peak / MEMORY_GOAL:9.2f} "
                      f"{per_core}")  # fmt: skip


if __name__ == "__main__":
    main()
