"""Generation on one node against two, each node one CPU, in one run: the scaling efficiency of ``ctsynth generate``
submitted as a Ray job (``ctsynth submit``) to a multi-node cluster.

Two loopback clusters (``ctsynth_ray.pipelines.loopback_cluster``: every node its own ``ray start`` on its own
127.0.0.x, token authentication on): one node of 1 CPU, then two nodes of 1 CPU each. With ``--pin`` (default) each
node's processes run on a core of their own (``taskset``), so a one-CPU node computes on one core as a machine of its
own would. Both generate the same ``--n`` volumes (128^3, ctsynth's default CycleGAN generator, untrained: speed does
not depend on the weights) from the same adult-size phantom sources, to a ``file://`` folder. Prints each rate:
volumes over ``generate``'s own wall time (its start-up, actors and model loads included; the job's process start
is shown apart), and efficiency = rate(2 nodes) / (2 x rate(1 node)).

    .venv/bin/python benchmarks/cluster_scaling.py [--n 48] [--chunk 2] [--no-pin] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import make_generator, make_sources  # benchmarks/generate.py: the same sources and generator

from ctsynth_ray.dataset import read_manifest
from ctsynth_ray.pipelines.loopback_cluster import LoopbackCluster

CTSYNTH = str(Path(sys.executable).parent / "ctsynth")


def run(nodes: int, pin: bool, work: Path, args) -> dict:
    cores = tuple(str(k % (os.cpu_count() or 1)) for k in range(nodes)) if pin else None
    out = work / f"synth-{nodes}"
    shutil.rmtree(out, ignore_errors=True)
    with LoopbackCluster(node_cpus=(1,) * nodes, cores=cores) as cluster:
        started = time.monotonic()
        done = subprocess.run([CTSYNTH, "submit", "--address", cluster.dashboard, "--", "generate", "--n", str(args.n),
                               "--chunk", str(args.chunk), "--model", str(work / "gan"), "--source", str(work / "sources"),
                               "--bank", str(work / "sources" / "bank.parquet"), "--out", f"file://{out}"],
                              env=cluster.env(), capture_output=True, text=True)  # fmt: skip
        wall = time.monotonic() - started
    if done.returncode:
        sys.exit(f"{nodes} node(s): the job failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    assert len(read_manifest(out)) == args.n
    stages = re.search(r"seconds per stage.*", done.stdout).group(0)
    generate_wall = float(re.search(r"wall ([\d.]+)", stages).group(1))
    return {"nodes": nodes, "rate": args.n / generate_wall, "submit_wall": wall, "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=48, help="volumes per run")
    parser.add_argument("--chunk", type=int, default=2, help="volumes per label task and actor call")
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="let nodes share every core")
    parser.add_argument("--keep", type=Path, help="keep the sources, generator and outputs here")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="ctsynth-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not (work / "sources" / "manifest.parquet").is_file():
            make_sources(work / "sources", args.sources, (320, 240, 160))
        if not (work / "gan" / "generator.json").is_file():
            make_generator(work / "gan")
        results = [run(nodes, args.pin, work, args) for nodes in (1, 2)]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {os.cpu_count()} cores; {args.n} volumes of 128^3 per run, chunk {args.chunk}, "
          f"nodes pinned to a core each: {args.pin}")  # fmt: skip
    for r in results:
        print(f"{r['nodes']} node(s) x 1 CPU: {r['rate']:.3f} volumes/s (submit to exit, the job's start included: "
              f"{r['submit_wall']:.1f} s); "
              f"{r['stages']}")  # fmt: skip
    one, two = results
    print(f"scaling efficiency, 2 nodes vs 1: {two['rate'] / (2 * one['rate']):.2f} (aim: >= 0.8)")


if __name__ == "__main__":
    main()
