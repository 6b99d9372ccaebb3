"""`ctsynth`: the Typer app. Commands parse their options and call `ctsynth_ray.pipelines`.

Exit codes: 0 ok, 1 failed (a clear one-line message, no traceback), 2 usage.
Heavy imports (torch, ray, nibabel) stay inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Annotated

import typer

from ctsynth_ray import __version__

app = typer.Typer(
    name="ctsynth",
    help="Synthetic thoracic CT with lung-nodule masks: phantoms, ingest, inspection, and the demo chain.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def user_errors(command):
    """Turn a CtsynthError into one line on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from ctsynth_ray.errors import CtsynthError

        try:
            return command(*args, **kwargs)
        except CtsynthError as exc:
            typer.echo(f"ctsynth: error: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def parse_floats(text: str, count: int, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{name} must be {count} comma-separated numbers, got {text!r}") from None
    if len(values) != count:
        raise typer.BadParameter(f"{name} must be {count} comma-separated numbers, got {text!r}")
    return values


def parse_shape(text: str) -> tuple[int, int, int]:
    values = parse_floats(text, 3, "--shape")
    if any(v != int(v) or v < 32 for v in values):
        raise typer.BadParameter(f"--shape must be three whole numbers of at least 32, got {text!r}")
    return tuple(int(v) for v in values)


def parse_split(text: str) -> tuple[float, float, float]:
    values = parse_floats(text, 3, "--split")
    if min(values) < 0 or abs(sum(values) - 1) > 1e-6:
        raise typer.BadParameter(f"--split fractions (train,val,test) must be >= 0 and sum to 1, got {text!r}")
    return values


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ctsynth {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """ctsynth: manufacture synthetic thoracic CT volumes with nodule masks, and measure their worth."""


@app.command()
@user_errors
def phantom(
    n: int = typer.Option(..., "--n", min=1, help="Number of volumes."),
    out: Path = typer.Option(..., "--out", help="Dataset folder to create."),
    shape: str = typer.Option("256,192,128", help="Grid X,Y,Z in voxels (0.488 x 0.488 x 1 mm); sets body size."),
    seed: int = typer.Option(0, min=0, help="Run seed: volume i depends only on (seed, i)."),
    split: str = typer.Option("0.8,0.1,0.1", help="Train,val,test fractions."),
    workers: int = typer.Option(1, min=1, help="Parallel Ray tasks on a local instance (1: no Ray)."),
    address: str | None = typer.Option(None, help="Ray cluster address (e.g. 127.0.0.1:6379)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Make procedural thoracic CT phantoms with nodules, in the dataset layout."""
    from ctsynth_ray.phantom import PhantomConfig
    from ctsynth_ray.pipelines.phantoms import make_phantom_dataset

    config = PhantomConfig(shape=parse_shape(shape))
    manifest = make_phantom_dataset(
        out, n, config=config, seed=seed, split_fractions=parse_split(split), workers=workers,
        address=address, overwrite=overwrite,
    )  # fmt: skip
    typer.echo(f"wrote {n} phantom(s): {manifest}")


def check_dataset(dataset: Path) -> None:
    """Print a dataset's summary; exit 1 with one line per problem."""
    from ctsynth_ray.inspection import inspect_dataset

    summary = inspect_dataset(dataset)
    typer.echo(summary.format())
    if not summary.ok:
        for problem in summary.problems:
            typer.echo(f"ctsynth: error: {dataset}: {problem}", err=True)
        raise typer.Exit(1)


def report_ingest_failures(report) -> None:
    for failure in report.failed:
        typer.echo(f"ctsynth: error: case {failure['case']}: {failure['file']}: {failure['reason']}", err=True)


@app.command()
@user_errors
def inspect(
    dataset: Path = typer.Argument(..., help="Dataset folder (holding manifest.parquet)."),
    preview: Path | None = typer.Option(None, "--preview", help="Write a PNG montage here."),
) -> None:
    """Summarise a dataset and check it; exit 1 naming each inconsistent volume."""
    from ctsynth_ray.preview import write_preview

    check_dataset(dataset)
    if preview is not None:
        typer.echo(f"preview: {write_preview(dataset, preview)}")


ingest_app = typer.Typer(help="Ingest real CT into the dataset layout.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")


def parse_spacing(text: str) -> tuple[float, float, float]:
    values = parse_floats(text, 3, "--spacing")
    if min(values) <= 0:
        raise typer.BadParameter(f"--spacing must be three positive sizes in mm, got {text!r}")
    return values


def _run_ingest(kind: str, src: Path, out: Path, spacing: str, split: str, workers: int, address, overwrite: bool,
                **options) -> None:  # fmt: skip
    from ctsynth_ray.pipelines.ingest import REPORT_NAME, ingest

    if not src.is_dir():
        raise typer.BadParameter(f"{src} is not a folder", param_hint="SRC")
    report = ingest(
        kind, src, out, spacing_mm=parse_spacing(spacing), split_fractions=parse_split(split), workers=workers,
        address=address, overwrite=overwrite, **options,
    )  # fmt: skip
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    report_ingest_failures(report)
    typer.echo(
        f"ingested {len(report.ingested)} volume(s) into {out}; {len(report.failed)} failed; "
        f"report: {out / REPORT_NAME}"
    )
    if not report.ok:
        raise typer.Exit(1)


SPACING_HELP = "Target voxel size X,Y,Z in mm (the thesis' grid by default)."
SPLIT_HELP = "Train,val,test fractions; a volume's split is a stable hash of its id."


# Options the two ingest commands share.
OutDataset = Annotated[Path, typer.Option("--out", help="Dataset folder to create.")]
Spacing = Annotated[str, typer.Option(help=SPACING_HELP)]
Split = Annotated[str, typer.Option(help=SPLIT_HELP)]
Workers = Annotated[int, typer.Option(min=1, help="Cases in parallel as Ray tasks (1: no Ray).")]
Address = Annotated[str | None, typer.Option(help="Ray cluster address.")]
Overwrite = Annotated[bool, typer.Option(help="Replace OUT if it exists.")]
TARGET_SPACING = "0.48828125,0.48828125,1"


@ingest_app.command("lidc")
@user_errors
def ingest_lidc(
    src: Annotated[Path, typer.Argument(help="Folder tree of DICOM series and LIDC reader XML files.")],
    out: OutDataset,
    min_readers: Annotated[int, typer.Option(min=1, help="Keep nodules marked by at least this many readers.")] = 3,
    spacing: Spacing = TARGET_SPACING,
    split: Split = "1,0,0",
    workers: Workers = 1,
    address: Address = None,
    overwrite: Overwrite = False,
) -> None:
    """LIDC-IDRI style DICOM + reader XML: HU, consensus nodule masks, resampled NIfTI. Exit 1 if any case failed."""
    _run_ingest("lidc", src, out, spacing, split, workers, address, overwrite, min_readers=min_readers)


@ingest_app.command("nifti")
@user_errors
def ingest_nifti(
    src: Annotated[Path, typer.Argument(help="Folder of image/mask NIfTI pairs (images/ + masks/, or X + X_mask).")],
    out: OutDataset,
    spacing: Spacing = TARGET_SPACING,
    split: Split = "1,0,0",
    workers: Workers = 1,
    address: Address = None,
    overwrite: Overwrite = False,
) -> None:
    """Image/mask NIfTI pairs already converted: reoriented to RAS, resampled when the spacing differs."""
    _run_ingest("nifti", src, out, spacing, split, workers, address, overwrite)


def parse_templates(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise typer.BadParameter(f"--templates must be a positive number or 'all', got {text!r}")
    return int(text)


@app.command()
@user_errors
def prepare(
    dataset: Path = typer.Argument(..., help="Dataset folder; its label maps are written into DATASET/labels/."),
    out: Path = typer.Option(..., "--out", help="GAN training data folder to create."),
    scheme: str = typer.Option("body", help="Label scheme: thesis (6 classes) or body (adds outside air)."),
    size: int = typer.Option(128, min=8, help="Crop size in voxels (nodule-centred cubes)."),
    dims: str = typer.Option("2,2.5,3", help="Which pairs to write: 2 (slices), 2.5 (stacks), 3 (crops)."),
    stack_slices: int = typer.Option(3, min=1, help="Label slices per 2.5D stack (odd)."),
    templates: str = typer.Option("15", help="Nodule templates in the bank (the thesis used 15), or 'all'."),
    seed: int = typer.Option(0, min=0, help="Seed of the template choice."),
    workers: int = typer.Option(1, min=1, help="Volumes in parallel as Ray tasks (1: no Ray)."),
    address: str | None = typer.Option(None, help="Ray cluster address."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Label maps of every volume, the nodule template bank, and GAN training data (Parquet shards)."""
    from ctsynth_ray.gan_data import parse_dims
    from ctsynth_ray.labels import SCHEMES
    from ctsynth_ray.pipelines.prepare import prepare as run_prepare

    if scheme not in SCHEMES:
        raise typer.BadParameter(f"--scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    try:
        kinds = parse_dims(dims)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dims") from None
    description = run_prepare(
        dataset, out, scheme=scheme, size=size, kinds=kinds, stack_slices=stack_slices,
        n_templates=parse_templates(templates), seed=seed, workers=workers, address=address, overwrite=overwrite,
    )  # fmt: skip
    counts = "; ".join(
        f"{part}: " + ", ".join(f"{k} {n}" for k, n in c.items()) for part, c in description["counts"].items()
    )
    typer.echo(f"label maps ({scheme}) in {dataset / 'labels'}; {len(description['templates'])} nodule templates")
    typer.echo(f"GAN data in {out}: {counts}")


@app.command("synth-labels")
@user_errors
def synth_labels(
    n: int = typer.Option(..., "--n", min=1, help="Number of new label volumes."),
    source: Path = typer.Option(..., "--source", help="Dataset with label maps (run `prepare` first)."),
    out: Path = typer.Option(..., "--out", help="Dataset folder to create (labels + masks, no images)."),
    size: int = typer.Option(128, min=8, help="Cube size in voxels."),
    seed: int = typer.Option(0, min=0, help="Run seed: volume i depends only on (seed, i)."),
    p_nodule: float = typer.Option(0.8, min=0.0, max=1.0, help="Probability of pasting a nodule template."),
    templates: str = typer.Option("15", help="Nodule templates to draw from, or 'all'."),
    lung_fraction: float = typer.Option(0.8, min=0.01, max=1.0, help="Share of a pasted nodule that must lie on lung."),
    augment: bool = typer.Option(True, help="Flip, turn and scale (+-20 %) templates before pasting."),
    workers: int = typer.Option(1, min=1, help="Ray tasks in parallel (1: no Ray)."),
    address: str | None = typer.Option(None, help="Ray cluster address."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """New label volumes: random cubes of training volumes with pasted nodule templates."""
    from ctsynth_ray.pipelines.synth_labels import synth_labels as run_synth_labels
    from ctsynth_ray.synth_labels import SynthLabelConfig

    config = SynthLabelConfig(size=size, p_nodule=p_nodule, lung_fraction=lung_fraction, augment=augment)
    rows = run_synth_labels(source, out, n, config=config, n_templates=parse_templates(templates), seed=seed,
                            workers=workers, address=address, overwrite=overwrite)  # fmt: skip
    pasted = sum(r["inserted_nodule"] for r in rows)
    failed = sum(r["paste_failed"] for r in rows)
    typer.echo(f"wrote {len(rows)} label volume(s) to {out}: {pasted} with a pasted nodule")
    if failed:
        typer.echo(f"note: {failed} volume(s) found no site with {lung_fraction:.0%} of the nodule on lung "
                   f"within the retry limit; they have no pasted nodule (column paste_failed)", err=True)  # fmt: skip


@app.command("train-gan")
@user_errors
def train_gan(
    gandata: Path = typer.Argument(..., help="GAN training data made by `ctsynth prepare`."),
    out: Path = typer.Option(..., "--out", help="Run folder: generator.pt/.json, samples, checkpoints."),
    model: str = typer.Option("cyclegan", help="cyclegan (ResNet generator, unpaired) or pix2pix (U-Net, paired)."),
    dims: str = typer.Option("2", help="2 (slices), 2.5 (label stacks -> centre slice) or 3 (crops)."),
    epochs: int = typer.Option(100, min=0, help="Epochs at a constant learning rate."),
    decay_epochs: int = typer.Option(100, min=0, help="Epochs of linear decay to 0 after those."),
    batch: int = typer.Option(32, min=1, help="Batch size per worker."),
    steps: int | None = typer.Option(None, min=1, help="Cap on optimiser steps (smoke runs)."),
    widths: str = typer.Option("32,64,128", help="ResNet generator widths (CycleGAN)."),
    blocks: int = typer.Option(6, min=0, help="ResNet generator residual blocks (CycleGAN)."),
    unet_width: int = typer.Option(64, min=1, help="U-Net generator base width (pix2pix)."),
    encoding: str = typer.Option("scalar", help="Label encoding: scalar (label / 3 - 1) or onehot."),
    checkpoint_every: int = typer.Option(200, min=1, help="Steps between checkpoints."),
    workers: int = typer.Option(1, min=1, help="Ray Train workers (data parallel)."),
    gpus_per_worker: float = typer.Option(0.0, min=0.0, help="GPUs per worker (0: CPU, gloo)."),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN from its latest checkpoint."),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: sqlite in ./ctsynth-mlflow)."),
    experiment: str = typer.Option("ctsynth-gan", help="MLflow experiment."),
    address: str | None = typer.Option(None, help="Ray cluster address."),
) -> None:
    """Train a label-map-to-CT GAN on Ray Train, tracked in MLflow; export RUN/generator.pt + generator.json."""
    from ctsynth_ray.models.gan import MODELS, GanConfig
    from ctsynth_ray.pipelines.tracking import default_tracking_uri
    from ctsynth_ray.pipelines.train_gan import DIMS, TrainGanOptions
    from ctsynth_ray.pipelines.train_gan import train_gan as run_train_gan

    if model not in MODELS:
        raise typer.BadParameter(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    if dims not in DIMS:
        raise typer.BadParameter(f"--dims must be one of {', '.join(DIMS)}, got {dims!r}")
    if encoding not in ("scalar", "onehot"):
        raise typer.BadParameter(f"--encoding must be scalar or onehot, got {encoding!r}")
    if epochs + decay_epochs < 1:
        raise typer.BadParameter("--epochs plus --decay-epochs must be at least 1")
    generator_widths = parse_floats(widths, 3, "--widths")
    config = GanConfig(model=model, epochs=epochs, decay_epochs=decay_epochs, batch=batch,
                       generator_widths=tuple(int(w) for w in generator_widths), residual_blocks=blocks,
                       unet_width=unet_width)  # fmt: skip
    options = TrainGanOptions(
        gandata=str(gandata), run_dir=str(out), dims=dims, encoding=encoding, steps=steps,
        checkpoint_every=checkpoint_every, workers=workers, gpus_per_worker=gpus_per_worker,
        tracking_uri=tracking_uri or default_tracking_uri(), experiment=experiment,
    )  # fmt: skip
    result = run_train_gan(options, config, resume=resume, address=address)
    metrics = result.metrics or {}
    typer.echo(f"trained {model} {dims}D to step {metrics.get('step')}: generator {out / 'generator.pt'}, "
               f"description {out / 'generator.json'}; MLflow {options.tracking_uri} (experiment {experiment})")  # fmt: skip


@app.command("train-seg")
@user_errors
def train_seg(
    train: list[str] = typer.Option(..., "--train", help="DATASET[:split][:n=N]; repeat to mix datasets."),
    val: str = typer.Option(..., "--val", help="DATASET[:split] of whole real volumes to evaluate on."),
    out: Path = typer.Option(..., "--out", help="Run folder: model, pred/, metrics.csv, evals/."),
    iterations: int = typer.Option(1000, min=1, help="Optimiser steps (the thesis: 100,000)."),
    patch: int = typer.Option(96, min=8, help="Patch size in voxels."),
    samples_per_volume: int = typer.Option(8, min=1, help="Patches per volume and epoch."),
    batch: int = typer.Option(2, min=1, help="Patches per step and worker."),
    features: str = typer.Option("32,64,128,256", help="U-Net widths, one per level."),
    lr: float = typer.Option(3e-4, min=0.0, help="Adam learning rate."),
    workers: int = typer.Option(1, min=1, help="Ray Train workers (data parallel)."),
    cpus_per_worker: int = typer.Option(1, min=1, help="CPU threads per worker."),
    gpus_per_worker: float = typer.Option(0.0, min=0.0, help="GPUs per worker (0: CPU)."),
    seed: int = typer.Option(0, min=0, help="Seed of the volume draw, patches and weights."),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN from its latest checkpoint."),
    eval_every: int = typer.Option(500, min=1, help="Iterations between evaluations."),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: sqlite in ./ctsynth-mlflow)."),
    experiment: str = typer.Option("ctsynth-seg", help="MLflow experiment."),
    address: str | None = typer.Option(None, help="Ray cluster address."),
) -> None:
    """Train the 3D U-Net nodule segmenter on real / synthetic / mixed sets; evaluate on whole real volumes."""
    from ctsynth_ray.pipelines.tracking import default_tracking_uri
    from ctsynth_ray.pipelines.train_seg import TrainSegOptions
    from ctsynth_ray.pipelines.train_seg import train_seg as run_train_seg
    from ctsynth_ray.segmentation import parse_spec

    for spec in [*train, val]:
        try:
            parse_spec(spec)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    widths = parse_floats(features, len(features.split(",")), "--features")
    try:
        options = TrainSegOptions(
            train=tuple(train), val=val, run_dir=str(out), iterations=iterations, patch=patch,
            samples_per_volume=samples_per_volume, batch=batch, features=tuple(int(w) for w in widths), lr=lr, seed=seed,
            eval_every=eval_every, workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
            tracking_uri=tracking_uri or default_tracking_uri(), experiment=experiment,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = run_train_seg(options, resume=resume, address=address)
    metrics = result.metrics or {}
    typer.echo(f"trained the U-Net to iteration {metrics.get('step')}: validation Dice {metrics.get('val_dice', float('nan')):.3f}; "
               f"predictions {out / 'pred'}, scores {out / 'metrics.csv'}")  # fmt: skip


@app.command()
@user_errors
def score(
    pred_dir: Path = typer.Argument(..., help="Predicted masks <volume_id>.nii.gz (non-zero is positive)."),
    truth_dir: Path = typer.Argument(..., help="True masks with the same names."),
    out: Path = typer.Option(..., "--out", help="CSV to write."),
) -> None:
    """Per-volume sensitivity, accuracy, Dice and F2 of predicted against true masks."""
    from ctsynth_ray.seg_metrics import score_folders, write_scores_csv

    rows = score_folders(pred_dir, truth_dir)
    write_scores_csv(out, rows)
    typer.echo(f"scored {len(rows)} volume(s): {out}")


@app.command()
@user_errors
def compare(
    baseline: Path = typer.Argument(..., help="Score CSV of the baseline (e.g. the real-only model)."),
    candidate: Path = typer.Argument(..., help="Score CSV of the candidate."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Paired statistics over the volumes with a nodule: median, mean, sd, 95 % CI, t-test and Wilcoxon p."""
    import json

    from ctsynth_ray.seg_metrics import compare as run_compare
    from ctsynth_ray.seg_metrics import format_comparison, read_scores_csv

    result = run_compare(read_scores_csv(baseline), read_scores_csv(candidate))
    if as_json:
        for metric in result["metrics"].values():
            for side in ("baseline", "candidate"):
                metric[side].pop("n")
        typer.echo(json.dumps(result, allow_nan=True))
    else:
        typer.echo(format_comparison(result))


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("ctsynth-demo"), help="Folder for every demo output (replaced each run)."),
    n: int = typer.Option(10, min=2, help="Number of phantoms."),
    workers: int = typer.Option(2, min=1, help="Ray tasks in parallel (and Ray Train workers)."),
    gan_steps: int = typer.Option(80, min=1, help="GAN training steps."),
    seg_iterations: int = typer.Option(80, min=1, help="U-Net training iterations per run."),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: sqlite in ./ctsynth-mlflow)."),
) -> None:
    """Run the whole chain, as far as it is built, on built-in phantoms; print where every output is."""
    import shutil

    from ctsynth_ray.dataset import load_volume, read_manifest
    from ctsynth_ray.ingest.export import export_lidc_case
    from ctsynth_ray.models.gan import GanConfig
    from ctsynth_ray.pipelines.ingest import ingest
    from ctsynth_ray.pipelines.phantoms import make_phantom_dataset
    from ctsynth_ray.pipelines.prepare import prepare as run_prepare
    from ctsynth_ray.pipelines.synth_labels import synth_labels as run_synth_labels
    from ctsynth_ray.pipelines.tracking import default_tracking_uri
    from ctsynth_ray.pipelines.train_gan import TrainGanOptions
    from ctsynth_ray.pipelines.train_gan import train_gan as run_train_gan
    from ctsynth_ray.pipelines.train_seg import TrainSegOptions
    from ctsynth_ray.pipelines.train_seg import train_seg as run_train_seg
    from ctsynth_ray.preview import write_preview
    from ctsynth_ray.seg_metrics import compare as run_compare
    from ctsynth_ray.seg_metrics import format_comparison, read_scores_csv

    started = time.monotonic()
    outputs: list[tuple[str, Path]] = []
    steps = 8

    def step(k: int, text: str) -> None:
        typer.echo(f"\n[{k}/{steps}] {text}  ({time.monotonic() - started:.0f} s)")

    out.mkdir(parents=True, exist_ok=True)
    phantoms = out / "phantoms"
    step(1, f"{n} thoracic CT phantoms with nodules, on {workers} Ray worker(s)")
    # A larger test split than usual, so that the GAN has held-out nodule slices to validate on.
    make_phantom_dataset(phantoms, n, seed=0, split_fractions=(0.6, 0.1, 0.3), workers=workers, overwrite=True)
    outputs.append(("phantom dataset", phantoms))

    step(2, "inspect the phantoms and draw a preview")
    check_dataset(phantoms)
    outputs.append(("phantom preview", write_preview(phantoms, out / "phantoms-preview.png")))

    step(3, "export 2 phantoms as LIDC-style cases (DICOM + 4-reader XML), then `ingest lidc` them back")
    lidc_src = out / "lidc-style"
    shutil.rmtree(lidc_src, ignore_errors=True)
    rows = [r for r in read_manifest(phantoms) if r["n_nodules"] > 0][:2] or read_manifest(phantoms)[:2]
    for row in rows:
        export_lidc_case(load_volume(phantoms, row), lidc_src)
    ingested = out / "ingested"
    report = ingest("lidc", lidc_src, ingested, workers=workers, overwrite=True)
    if not report.ok:
        report_ingest_failures(report)
        raise typer.Exit(1)
    check_dataset(ingested)
    outputs += [("LIDC-style DICOM + XML", lidc_src), ("ingested dataset", ingested),
                ("ingest report", ingested / "ingest_report.json")]  # fmt: skip

    step(4, "prepare: label maps (body scheme), the nodule template bank, GAN training data (2D, 2.5D, 3D)")
    gan_data = out / "gan-data"
    description = run_prepare(phantoms, gan_data, scheme="body", workers=workers, overwrite=True)
    typer.echo(f"GAN data: {description['counts']}; {len(description['templates'])} nodule templates")
    outputs += [("label maps", phantoms / "labels"), ("GAN training data", gan_data),
                ("nodule template bank", gan_data / "nodule_bank.parquet")]  # fmt: skip

    step(5, "synth-labels: 24 new 128^3 label volumes with pasted nodules")
    synthetic_labels = out / "synthetic-labels"
    rows = run_synth_labels(phantoms, synthetic_labels, 24, seed=0, workers=workers, overwrite=True)
    typer.echo(f"{sum(r['inserted_nodule'] for r in rows)} of {len(rows)} with a pasted nodule")
    check_dataset(synthetic_labels)
    outputs += [("synthetic label volumes", synthetic_labels),
                ("label volume preview", write_preview(synthetic_labels, out / "synthetic-labels-preview.png"))]  # fmt: skip

    step(6, f"train-gan: pix2pix 2D (U-Net) on Ray Train, {gan_steps} steps on {workers} worker(s), tracked in MLflow")
    gan_run = out / "gan-run"
    shutil.rmtree(gan_run, ignore_errors=True)
    tracking_uri = default_tracking_uri() if tracking_uri is None else tracking_uri
    options = TrainGanOptions(gandata=str(gan_data), run_dir=str(gan_run), dims="2", steps=gan_steps,
                              checkpoint_every=max(gan_steps // 2, 1), workers=workers, tracking_uri=tracking_uri,
                              experiment="ctsynth-demo", log_every=25)  # fmt: skip
    config = GanConfig(model="pix2pix", batch=4, epochs=100, decay_epochs=100, unet_width=16)
    metrics = run_train_gan(options, config).metrics
    typer.echo(
        f"validation: MAE {metrics.get('val_mae_hu', float('nan')):.0f} HU, SSIM {metrics.get('val_ssim', float('nan')):.2f}"
    )
    samples = sorted((gan_run / "samples").glob("*.png"))
    outputs += [("generator", gan_run / "generator.pt"), ("generator description", gan_run / "generator.json")]
    outputs += [("GAN samples (last epoch)", samples[-1])] if samples else []
    outputs += [("MLflow store", Path(tracking_uri.removeprefix("sqlite:///")))]

    seg_runs = {}
    for k, (name, train_specs) in enumerate(
        (("real-only", (f"{phantoms}:train",)), ("mixed", (f"{phantoms}:train:n=3", str(ingested)))), start=7
    ):
        step(k, f"train-seg: a tiny 3D U-Net, {name} ({' + '.join(train_specs)}), evaluated on {phantoms.name}:test")
        run = out / f"seg-{name}"
        shutil.rmtree(run, ignore_errors=True)
        seg_options = TrainSegOptions(train=train_specs, val=f"{phantoms}:test", run_dir=str(run),
                                      iterations=seg_iterations, patch=32, batch=4, features=(8, 16, 32), lr=1e-3,
                                      eval_every=seg_iterations, workers=1, cpus_per_worker=workers,
                                      tracking_uri=tracking_uri, experiment="ctsynth-demo")  # fmt: skip
        seg_metrics = run_train_seg(seg_options).metrics
        typer.echo(f"{name}: validation Dice {seg_metrics.get('val_dice', float('nan')):.3f}")
        seg_runs[name] = run
        outputs += [(f"U-Net {name} scores", run / "metrics.csv"), (f"U-Net {name} predictions", run / "pred")]
    typer.echo("\ncompare real-only (baseline) with mixed (candidate):")
    typer.echo(format_comparison(run_compare(read_scores_csv(seg_runs["real-only"] / "metrics.csv"),
                                             read_scores_csv(seg_runs["mixed"] / "metrics.csv"))))  # fmt: skip

    typer.echo(f"\ndemo finished in {time.monotonic() - started:.0f} s. Outputs:")
    for name, path in outputs:
        typer.echo(f"  {name:<24} {path.resolve()}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
