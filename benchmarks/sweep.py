"""Ray Tune's overhead in `ctsynth sweep`: the same trials as a sweep and one after another in one process.

    .venv/bin/python benchmarks/sweep.py [--seeds 2] [--iterations 30]

Data: 8 small phantoms (128 x 96 x 64; train split for the real part, test split to validate on) and 6 volumes
generated with an untrained tiny pix2pix generator (speed does not depend on its weights). Trials: the ratio
preset, total 2, fractions 0 / 0.5 / 1, ``--seeds`` seeds, a tiny U-Net (4-8-16, patch 32).

Three runs of the same trials, each trial's Train worker on 1 CPU:

- sequential: ``train_seg`` (Ray Train, no Tune) for each trial, one after another, from this process;
- sweep, 1 at a time: ``ctsynth sweep --max-concurrent 1``: Tune's overhead against the sequential run;
- sweep, as many at a time as there are CPUs (the default).

Prints the wall time of each (for the sweeps, ``Tuner.fit`` alone, and the whole command with its comparisons,
MLflow logging and report) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctsynth_ray.models.gan import GanConfig, GanTrainer
from ctsynth_ray.phantom import PhantomConfig
from ctsynth_ray.pipelines.generate import GenerateOptions, generate
from ctsynth_ray.pipelines.phantoms import make_phantom_dataset
from ctsynth_ray.pipelines.prepare import prepare
from ctsynth_ray.pipelines.runtime import RayOptions, ensure_ray
from ctsynth_ray.pipelines.sweep import SweepOptions, plan_sweep, run_sweep
from ctsynth_ray.pipelines.train_gan import TrainGanOptions, export_generator
from ctsynth_ray.pipelines.train_seg import TrainSegOptions, train_seg

QUIET = RayOptions(progress=False)


def data(work: Path) -> tuple[Path, Path]:
    """(phantom dataset, generated dataset)."""
    real = work / "ds"
    make_phantom_dataset(real, 8, config=PhantomConfig(shape=(128, 96, 64)), seed=21, split_fractions=(0.5, 0.0, 0.5),
                         ray_options=QUIET)  # fmt: skip
    prepare(real, work / "gan", scheme="body", size=32, n_templates=4, ray_options=QUIET)
    description = json.loads((work / "gan" / "gan_data.json").read_text())
    trainer = GanTrainer(GanConfig(model="pix2pix", unet_width=4, unet_downs=5), 2, 1, 1)
    export_generator(work / "generator", trainer, TrainGanOptions(gandata=str(work / "gan"), run_dir=str(work / "generator")),
                     description)  # fmt: skip
    synthetic = work / "synth"
    generate(
        GenerateOptions(n=6, model=str(work / "generator"), out=str(synthetic), chunk=2), QUIET, echo=lambda *_: None
    )
    return real, synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ctsynth-bench-sweep-") as folder:
        work = Path(folder)
        ensure_ray(num_cpus=os.cpu_count())
        real, synthetic = data(work)
        base = SweepOptions(real=f"{real}:train", synthetic=str(synthetic), val=f"{real}:test", out="", preset="ratio",
                            total=2, fractions=(0.0, 0.5, 1.0), seeds=args.seeds, iterations=args.iterations,
                            tracking_uri=f"sqlite:///{work / 'mlflow.db'}", experiment="bench-sweep", patch=32,
                            batch=2, features=(4, 8, 16), lr=1e-3)  # fmt: skip
        _, trials, _ = plan_sweep(base)
        results = {"machine": {"cpus": os.cpu_count()}, "trials": len(trials), "iterations": args.iterations}

        started = time.monotonic()
        for trial in trials:
            train_seg(TrainSegOptions(train=trial.train, val=base.val, run_dir=str(work / "sequential" / trial.name),
                                      iterations=base.iterations, patch=base.patch, batch=base.batch,
                                      features=base.features, lr=base.lr, seed=trial.seed, eval_every=base.iterations,
                                      samples_per_volume=base.samples_per_volume, tracking_uri=base.tracking_uri,
                                      experiment="bench-sequential"))  # fmt: skip
        results["sequential_s"] = time.monotonic() - started

        for name, concurrent in (("sweep_one_at_a_time_s", 1), ("sweep_concurrent_s", None)):
            summary = run_sweep(replace(base, out=str(work / name), max_concurrent=concurrent), echo=lambda *_: None)
            assert summary.finished == len(trials), summary.failed
            results[name] = summary.tune_seconds  # Tuner.fit: the trials, without the comparisons and report
            results[name.replace("_s", "_with_report_s")] = summary.seconds
        results["tune_overhead_one_at_a_time"] = results["sweep_one_at_a_time_s"] / results["sequential_s"] - 1
        results["speedup_concurrent_vs_sequential"] = results["sequential_s"] / results["sweep_concurrent_s"]
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
