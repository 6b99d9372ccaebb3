"""`ctsynth demo`: the whole chain, as far as it is built, on built-in phantoms, with a list of every output.

Each step prints one line (``[k/N] what``) and calls the same pipeline functions as the commands. As in the
thesis: the GAN trains on the phantoms' train split; the U-Nets are scored on the val split, which no training
set contains. The closing sweep varies the synthetic share of a fixed-size training set whose real part comes from
the test split, which the GAN never trained on (the thesis' mixed set-up), and whose synthetic part comes from
`generate`; it runs as Ray Tune trials, compares each set-up with real-only and writes the thesis-style report.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.pipelines.runtime import RayOptions


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("ctsynth-demo")
    n: int = 12
    generated: int = 12
    workers: int = 2
    gan_steps: int = 80
    seg_iterations: int = 80
    sweep_total: int = 2
    tracking_uri: str = ""
    verbose: bool = False
    address: str | None = None  # a Ray cluster for every step but the last (which starts its own); None: local

    def __post_init__(self):
        if self.n < 8:
            raise ValueError(f"the demo needs at least 8 phantoms (2 in each of val and test), got {self.n}")
        if self.generated < self.sweep_total:
            raise ValueError(
                f"the demo's sweep needs at least {self.sweep_total} generated volumes, got {self.generated}"
            )


def _checked(dataset: Path, echo) -> None:
    """Print a dataset's summary; CtsynthError with one line per problem."""
    from ctsynth_ray.inspection import inspect_dataset

    summary = inspect_dataset(dataset)
    echo(summary.format())
    if not summary.ok:
        raise CtsynthError("\n".join(f"{dataset}: {p}" for p in summary.problems))


def run_demo(options: DemoOptions, echo: Callable[[str], None] = print) -> tuple[list[tuple[str, Path]], float]:
    """Run the demo into ``options.out``; returns [(what, path)] of every output and the seconds it took."""
    from ctsynth_ray.dataset import load_volume, read_manifest
    from ctsynth_ray.ingest.export import export_lidc_case
    from ctsynth_ray.models.gan import GanConfig
    from ctsynth_ray.pipelines.generate import GenerateOptions, generate
    from ctsynth_ray.pipelines.ingest import ingest
    from ctsynth_ray.pipelines.phantoms import make_phantom_dataset
    from ctsynth_ray.pipelines.prepare import BANK_NAME, prepare
    from ctsynth_ray.pipelines.segment import segment_dataset
    from ctsynth_ray.pipelines.sweep import SweepOptions, run_sweep
    from ctsynth_ray.pipelines.synth_labels import synth_labels
    from ctsynth_ray.pipelines.train_gan import TrainGanOptions, train_gan
    from ctsynth_ray.pipelines.train_seg import TrainSegOptions, train_seg
    from ctsynth_ray.preview import write_preview
    from ctsynth_ray.seg_metrics import compare, format_comparison, read_scores_csv, score_folders, write_scores_csv

    started = time.monotonic()
    out, workers = Path(options.out), options.workers
    address = options.address
    parallel = RayOptions(workers=workers, address=address, overwrite=True)
    outputs: list[tuple[str, Path]] = []
    total = 12

    def step(k: int, text: str) -> None:
        echo(f"\n[{k}/{total}] {text}  ({time.monotonic() - started:.0f} s)")

    out.mkdir(parents=True, exist_ok=True)
    phantoms = out / "phantoms"
    step(1, f"{options.n} thoracic CT phantoms with nodules, on {workers} Ray worker(s)")
    # Larger val and test splits than usual: the U-Nets are scored on val, the GAN validates on test.
    make_phantom_dataset(phantoms, options.n, seed=0, split_fractions=(0.5, 0.25, 0.25), ray_options=parallel)
    outputs.append(("phantom dataset", phantoms))

    step(2, "inspect the phantoms and draw a preview")
    _checked(phantoms, echo)
    outputs.append(("phantom preview", write_preview(phantoms, out / "phantoms-preview.png")))

    step(3, "export 2 train phantoms as LIDC-style cases (DICOM + 4-reader XML), `ingest lidc` them, then `--resume`")
    lidc_src = out / "lidc-style"
    shutil.rmtree(lidc_src, ignore_errors=True)
    train_rows = [r for r in read_manifest(phantoms) if r["split"] == "train"]
    for row in ([r for r in train_rows if r["n_nodules"]] or train_rows)[:2]:
        export_lidc_case(load_volume(phantoms, row), lidc_src)
    ingested = out / "ingested"
    report = ingest("lidc", lidc_src, ingested, ray_options=parallel)
    if not report.ok:
        raise CtsynthError("\n".join(f"case {f['case']}: {f['file']}: {f['reason']}" for f in report.failed))
    # As a run killed part way leaves it: the last case's files gone. --resume keeps the others and redoes it.
    for sub in ("images", "masks"):
        (ingested / sub / f"{report.ingested[-1]}.nii.gz").unlink()
    report = ingest("lidc", lidc_src, ingested, resume=True, ray_options=replace(parallel, overwrite=False))
    echo(f"ingest --resume: {len(report.kept)} case(s) kept, {len(report.ingested) - len(report.kept)} redone")
    _checked(ingested, echo)
    outputs += [("LIDC-style DICOM + XML", lidc_src), ("ingested dataset", ingested),
                ("ingest report", ingested / "ingest_report.json")]  # fmt: skip

    step(4, "prepare: label maps (body scheme), the nodule template bank, GAN training data (2D, 2.5D, 3D)")
    gan_data = out / "gan-data"
    description = prepare(phantoms, gan_data, scheme="body", ray_options=parallel)
    echo(f"GAN data: {description['counts']}; {len(description['templates'])} nodule templates")
    outputs += [("label maps", phantoms / "labels"), ("GAN training data", gan_data),
                ("nodule template bank", gan_data / BANK_NAME),
                ("prepare record", phantoms / "prepare.json")]  # fmt: skip

    step(5, "synth-labels: 24 new 128^3 label volumes with nodules pasted from the saved template bank")
    synthetic_labels = out / "synthetic-labels"
    rows = synth_labels(phantoms, synthetic_labels, 24, seed=0, ray_options=parallel)
    echo(f"{sum(r['inserted_nodule'] for r in rows)} of {len(rows)} with a pasted nodule")
    _checked(synthetic_labels, echo)
    outputs += [("synthetic label volumes", synthetic_labels),
                ("label volume preview", write_preview(synthetic_labels, out / "synthetic-labels-preview.png"))]  # fmt: skip

    step(6, f"train-gan: pix2pix 2D on Ray Train, {options.gan_steps} steps on {workers} worker(s), in MLflow")
    gan_run = out / "gan-run"
    shutil.rmtree(gan_run, ignore_errors=True)
    gan_options = TrainGanOptions(gandata=str(gan_data), run_dir=str(gan_run), dims="2", steps=options.gan_steps,
                                  checkpoint_every=max(options.gan_steps // 2, 1), workers=workers,
                                  tracking_uri=options.tracking_uri, experiment="ctsynth-demo", log_every=25)  # fmt: skip
    config = GanConfig(model="pix2pix", batch=4, epochs=100, decay_epochs=100, unet_width=16)
    metrics = train_gan(gan_options, config, address=address, verbose=options.verbose).metrics
    echo(
        f"validation: MAE {metrics.get('val_mae_hu', float('nan')):.0f} HU, SSIM {metrics.get('val_ssim', float('nan')):.2f}"
    )
    samples = sorted((gan_run / "samples").glob("*.png"))
    outputs += [("generator", gan_run / "generator.pt"), ("generator description", gan_run / "generator.json")]
    outputs += [("GAN samples (last epoch)", samples[-1])] if samples else []
    outputs += [("MLflow store", Path(options.tracking_uri.removeprefix("sqlite:///")))]

    step(7, f"generate: {options.generated} synthetic CT volumes of 128^3 from new label volumes, with the GAN")
    synthetic = out / "synthetic"
    shutil.rmtree(synthetic, ignore_errors=True)
    summary = generate(GenerateOptions(n=options.generated, model=str(gan_run), out=str(synthetic), actors=workers,
                                       gpus_per_actor=0, chunk=2), RayOptions(workers=workers, address=address),
                       echo=echo)  # fmt: skip
    echo(summary.format())
    _checked(synthetic, echo)
    outputs += [("generated CT dataset", synthetic),
                ("generated CT preview", write_preview(synthetic, out / "synthetic-preview.png"))]  # fmt: skip

    step(
        8,
        f"audit: the generated set against {phantoms.name}:test (never seen by the GAN): realism, diversity, "
        "privacy; a blind Turing page",
    )
    from ctsynth_ray.pipelines.audit import AuditOptions, run_audit

    audited = run_audit(AuditOptions(synthetic=str(synthetic), real=f"{phantoms}:test", out=str(out / "audit"),
                                     turing=4, workers=workers, address=address, tracking_uri=options.tracking_uri,
                                     experiment="ctsynth-demo", progress=True), echo=echo)  # fmt: skip
    echo(audited.format())
    outputs += [("audit (JSON)", audited.files["json"]), ("audit (HTML)", audited.files["html"]),
                ("blind Turing page", audited.files["turing"])]  # fmt: skip

    step(9, f"train-seg: a tiny 3D U-Net on {phantoms.name}:train, evaluated on {phantoms.name}:val")
    seg_run = out / "seg-real-only"
    shutil.rmtree(seg_run, ignore_errors=True)
    seg_options = TrainSegOptions(train=(f"{phantoms}:train",), val=f"{phantoms}:val", run_dir=str(seg_run),
                                  iterations=options.seg_iterations, patch=32, batch=4, features=(8, 16, 32), lr=1e-3,
                                  eval_every=options.seg_iterations, workers=1, cpus_per_worker=workers,
                                  tracking_uri=options.tracking_uri, experiment="ctsynth-demo")  # fmt: skip
    seg_metrics = train_seg(seg_options, address=address, verbose=options.verbose).metrics
    echo(f"real-only: validation Dice {seg_metrics.get('val_dice', float('nan')):.3f}")
    outputs += [("U-Net real-only model", seg_run / "model.pt"), ("U-Net real-only scores", seg_run / "metrics.csv")]

    step(10, f"segment: the U-Net applied to {phantoms.name}:test, then scored")
    pred = out / "segment-test"
    segment_dataset(seg_run, phantoms, pred, split="test", ray_options=parallel)
    scores = write_scores_csv(out / "segment-test.csv", score_folders(pred, phantoms, "test"))
    outputs += [("segmented test volumes", pred), ("their scores", scores)]

    # The thesis' mixed set-up takes its real part from a split the GAN never trained on: so does this sweep.
    fractions = (0.0, 0.5, 1.0)
    step(11, f"sweep: {options.sweep_total} training volumes of {phantoms.name}:test, synthetic share "
             f"{', '.join(f'{f:g}' for f in fractions)}, as Ray Tune trials of train-seg; compared in MLflow; report")  # fmt: skip
    sweep_dir = out / "sweep"
    shutil.rmtree(sweep_dir, ignore_errors=True)
    sweep = run_sweep(SweepOptions(real=f"{phantoms}:test", synthetic=str(synthetic), val=f"{phantoms}:val",
                                   out=str(sweep_dir), preset="ratio", total=options.sweep_total, fractions=fractions,
                                   seeds=1, iterations=max(1, options.seg_iterations // 2), max_concurrent=3,
                                   tracking_uri=options.tracking_uri,
                                   experiment="ctsynth-demo-sweep", patch=32, batch=4, features=(4, 8, 16), lr=1e-3),
                      address=address, verbose=options.verbose, echo=echo)  # fmt: skip
    echo(sweep.format())
    if sweep.failed:
        raise CtsynthError("the demo sweep had failed trials:\n" + "\n".join(sweep.failed))
    trials = sweep_dir / "trials"
    echo("\ncompare real-only (baseline) with the half-synthetic set (candidate), as `ctsynth compare` does:")
    echo(format_comparison(compare(read_scores_csv(trials / "real-only-seed0" / "metrics.csv"),
                                   read_scores_csv(trials / "synthetic-50%-seed0" / "metrics.csv"))))  # fmt: skip
    outputs += [("sweep (trials, Tune state)", sweep_dir), ("sweep report", sweep.report["report"]),
                ("sweep report, one HTML page", sweep.report["html"])]  # fmt: skip

    step(12, "submit: `generate` as a Ray job on a Ray cluster of its own (`ray start`, token authentication, "
             "127.0.0.1 only), its output through a file:// URI")  # fmt: skip
    job_out = (out / "synthetic-by-job").resolve()
    shutil.rmtree(job_out, ignore_errors=True)
    _submitted_generate(gan_run.resolve(), job_out, workers, echo)
    outputs += [("generated by a Ray job", job_out)]
    return outputs, time.monotonic() - started


def _submitted_generate(model: Path, out: Path, workers: int, echo) -> None:
    """``ctsynth submit -- generate --n 2`` onto a fresh one-node cluster, as a user would type it (a process of its
    own, the cluster's token in its environment), then ``ctsynth jobs list``; the cluster is stopped after."""
    import subprocess
    import sys

    from ctsynth_ray.pipelines.loopback_cluster import LoopbackCluster

    ctsynth = [sys.executable, "-m", "ctsynth_ray.cli.main"]
    with LoopbackCluster(node_cpus=(workers,)) as cluster:
        echo(f"cluster: {cluster.address}, dashboard and Jobs API {cluster.dashboard}")
        for command in (["submit", "--address", cluster.dashboard, "--", "generate", "--n", "2", "--actors", "1",
                         "--chunk", "2", "--model", str(model), "--out", f"file://{out}"],
                        ["jobs", "list", "--address", cluster.dashboard]):  # fmt: skip
            done = subprocess.run([*ctsynth, *command], env=cluster.env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)  # fmt: skip
            for line in done.stdout.splitlines():
                if line.strip() and "%|" not in line:  # the job's progress bars, redrawn, are noise here
                    echo(line)
            if done.returncode:
                raise CtsynthError(f"ctsynth {command[0]} on the demo's cluster failed (exit {done.returncode})")
