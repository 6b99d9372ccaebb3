"""`ctsynth`: the Typer app. Commands parse their options and call `ctsynth_ray.pipelines`.

Exit codes: 0 ok, 1 failed (one line per problem, naming the file or volume; no traceback), 2 usage.
Heavy imports (torch, ray, nibabel) stay inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ctsynth_ray import __version__

app = typer.Typer(
    name="ctsynth",
    help="Synthetic thoracic CT volumes with lung-nodule masks, made on Ray, and measures of their worth.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


# ----------------------------------------------------------------------------------------- choices


class Scheme(str, Enum):
    thesis = "thesis"
    body = "body"


class Model(str, Enum):
    cyclegan = "cyclegan"
    pix2pix = "pix2pix"


class Dims(str, Enum):
    d2 = "2"
    d2p5 = "2.5"
    d3 = "3"


class Encoding(str, Enum):
    scalar = "scalar"
    onehot = "onehot"


class GanMode(str, Enum):
    lsgan = "lsgan"
    vanilla = "vanilla"


class Crops(str, Enum):
    one = "one"
    per_nodule = "per-nodule"


class CiMethod(str, Enum):
    t = "t"
    thesis = "thesis"


class Preset(str, Enum):
    thesis = "thesis"
    ratio = "ratio"


# ------------------------------------------------------------------------------- errors and parsing


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"ctsynth: warning: {message}", err=True)


def user_errors(command):
    """Print each line of a CtsynthError as ``ctsynth: error: ...`` and exit 1; show CtsynthWarnings as one
    ``ctsynth: warning: ...`` line each."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from ctsynth_ray.errors import CtsynthError, CtsynthWarning

        with warnings.catch_warnings():
            warnings.simplefilter("always", CtsynthWarning)
            warnings.showwarning = _show_warning
            try:
                return command(*args, **kwargs)
            except CtsynthError as exc:
                for line in str(exc).splitlines() or [type(exc).__name__]:
                    typer.echo(f"ctsynth: error: {line}", err=True)
                raise typer.Exit(1) from None

    return wrapper


def parse_numbers(text: str, name: str, kind=float, count: int | None = None) -> tuple:
    """Comma-separated numbers of ``kind`` (int or float); a usage error for anything else (``8.5`` is not an int)."""
    what = f"{count or ''} comma-separated {'whole numbers' if kind is int else 'numbers'}".strip()
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{name} must be {what}, got {text!r}") from None
    if count is not None and len(values) != count:
        raise typer.BadParameter(f"{name} must be {what}, got {text!r}")
    return values


def parse_shape(text: str) -> tuple[int, int, int]:
    values = parse_numbers(text, "--shape", int, 3)
    if min(values) < 32:
        raise typer.BadParameter(f"--shape must be three whole numbers of at least 32, got {text!r}")
    return values


def parse_split(text: str) -> tuple[float, float, float]:
    values = parse_numbers(text, "--split", float, 3)
    if min(values) < 0 or abs(sum(values) - 1) > 1e-6:
        raise typer.BadParameter(f"--split fractions (train,val,test) must be >= 0 and sum to 1, got {text!r}")
    return values


def parse_spacing(text: str) -> tuple[float, float, float]:
    values = parse_numbers(text, "--spacing", float, 3)
    if min(values) <= 0:
        raise typer.BadParameter(f"--spacing must be three positive sizes in mm, got {text!r}")
    return values


def parse_widths(text: str, name: str, count: int | None = None) -> tuple[int, ...]:
    values = parse_numbers(text, name, int, count)
    if min(values) < 1:
        raise typer.BadParameter(f"{name} must be positive whole numbers, got {text!r}")
    return values


def parse_templates(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise typer.BadParameter(f"--templates must be a positive number or 'all', got {text!r}")
    return int(text)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ctsynth {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """ctsynth: manufacture synthetic thoracic CT volumes with nodule masks, and measure their worth."""


# -------------------------------------------------------------------------------- shared options

OutDataset = Annotated[str, typer.Option("--out", help="Dataset folder or URI to create.")]
Workers = Annotated[int, typer.Option(min=1, help="Ray tasks in parallel (1: in this process, no Ray).")]
Address = Annotated[str | None, typer.Option(help="Ray cluster address (default: a local Ray on 127.0.0.1).")]
Overwrite = Annotated[bool, typer.Option(help="Replace OUT if it exists.")]
Seed = Annotated[int, typer.Option(min=0, help="Run seed: volume i depends only on (seed, i).")]
TrackingUri = Annotated[str | None, typer.Option(help="MLflow tracking URI (default: sqlite in ./ctsynth-mlflow).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue RUN from its latest checkpoint.")]
ResumeCases = Annotated[
    bool,
    typer.Option("--resume", help="Continue an interrupted run with the same settings: what it finished is kept, "
                                  "the rest (failed cases too) is done."),
]  # fmt: skip
Verbose = Annotated[bool, typer.Option("--verbose", help="Show Ray's own messages (reports, checkpoints, workers).")]
TrainWorkers = Annotated[int, typer.Option(min=1, help="Ray Train workers (data parallel).")]
SPACING_HELP = "Target voxel size X,Y,Z in mm (the thesis' grid by default)."
SPLIT_HELP = "Train,val,test fractions; a volume's split is a stable hash of its id."
TARGET_SPACING = "0.48828125,0.48828125,1"


def ray_options(workers: int = 1, address: str | None = None, overwrite: bool = False):
    from ctsynth_ray.pipelines.runtime import RayOptions

    return RayOptions(workers=workers, address=address, overwrite=overwrite)


def local_input(text: str, what: str = "folder", address: str | None = None) -> Path:
    """A local path for an input: a path or ``file://`` URI as it is, an object-store URI (``s3://``...) as this
    machine's cached copy (``ctsynth_ray.storage``). With a cluster (``address``, or inside a Ray job), Ray
    workers on other nodes read that copy: a warning unless ``CTSYNTH_CACHE`` names a folder they can see."""
    from ctsynth_ray.errors import CtsynthWarning
    from ctsynth_ray.pipelines.runtime import job_cluster
    from ctsynth_ray.storage import cache_root, local_copy, location

    where = location(text)
    if isinstance(where, Path):
        return where
    if (address or job_cluster()) and not os.environ.get("CTSYNTH_CACHE"):
        warnings.warn(f"{where} is read through a copy in {cache_root()} on this machine; Ray workers on other "
                      f"nodes see it only if CTSYNTH_CACHE names storage every node shares", CtsynthWarning,
                      stacklevel=2)  # fmt: skip
    return local_copy(where, what)


def local_spec(text: str, address: str | None = None) -> str:
    """``DATASET[:split][:n=N]`` with DATASET made local as :func:`local_input` does."""
    from ctsynth_ray.segmentation import split_spec

    dataset, rest = split_spec(text)
    return ":".join([str(local_input(dataset, "dataset", address)), *rest])


def output(text: str, replace: bool = False, marker: str | None = None):
    """A context giving a local folder for an output the driver alone writes: the path itself, or for an
    object-store URI a staging folder uploaded when the command succeeds (``ctsynth_ray.storage.output_folder``)."""
    from ctsynth_ray.storage import output_folder

    return output_folder(text, replace=replace, marker=marker)


def shown(text: str) -> str:
    """A path or URI for a message: credentials in a URI masked."""
    from ctsynth_ray.storage import masked

    return masked(text)


def local_only(text: str, option: str) -> Path:
    """A path or ``file://`` URI; one line for an object-store URI where a command needs a filesystem."""
    from ctsynth_ray.errors import CtsynthError
    from ctsynth_ray.storage import location

    where = location(text)
    if not isinstance(where, Path):
        raise CtsynthError(f"{where}: {option} needs a folder on a filesystem every node sees (a path, or file:// "
                           f"on a shared mount), not an object store")  # fmt: skip
    return where


def check_dataset(dataset: Path) -> None:
    """Print a dataset's summary; exit 1 with one line per problem."""
    from ctsynth_ray.inspection import inspect_dataset

    summary = inspect_dataset(dataset)
    typer.echo(summary.format())
    if not summary.ok:
        for problem in summary.problems:
            typer.echo(f"ctsynth: error: {dataset}: {problem}", err=True)
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------- commands


@app.command()
@user_errors
def phantom(
    n: int = typer.Option(..., "--n", min=1, help="Number of volumes."),
    out: str = typer.Option(..., "--out", help="Dataset folder (or file://, s3://... URI) to create."),
    shape: str = typer.Option("256,192,128", help="Grid X,Y,Z in voxels (0.488 x 0.488 x 1 mm); sets body size."),
    seed: Seed = 0,
    split: str = typer.Option("0.8,0.1,0.1", help="Train,val,test fractions."),
    workers: Workers = 1,
    address: Address = None,
    overwrite: Overwrite = False,
) -> None:
    """Make thoracic CT phantoms with nodules."""
    from ctsynth_ray.phantom import PhantomConfig
    from ctsynth_ray.pipelines.phantoms import make_phantom_dataset

    config = PhantomConfig(shape=parse_shape(shape))
    manifest = make_phantom_dataset(out, n, config=config, seed=seed, split_fractions=parse_split(split),
                                    ray_options=ray_options(workers, address, overwrite))  # fmt: skip
    typer.echo(f"wrote {n} phantom(s): {manifest}")


@app.command()
@user_errors
def inspect(
    dataset_text: str = typer.Argument(..., metavar="DATASET", help="Dataset folder or URI (with manifest.parquet)."),
    preview: Path | None = typer.Option(None, "--preview", help="Write a PNG montage here."),
) -> None:
    """Summarise and check a dataset; exit 1 naming bad volumes."""
    from ctsynth_ray.preview import write_preview

    dataset = local_input(dataset_text, "dataset")
    check_dataset(dataset)
    if preview is not None:
        typer.echo(f"preview: {write_preview(dataset, preview)}")


ingest_app = typer.Typer(help="Ingest real CT (LIDC DICOM + XML, or NIfTI pairs).", no_args_is_help=True)


def report_ingest_failures(report) -> None:
    for failure in report.failed:
        typer.echo(f"ctsynth: error: case {failure['case']}: {failure['file']}: {failure['reason']}", err=True)


def _run_ingest(kind: str, src_text: str, out: str, spacing: str, split: str, resume: bool, options, **extra) -> None:
    from ctsynth_ray.pipelines.ingest import REPORT_NAME, ingest

    src = local_input(src_text, "source folder", options.address)
    if not src.is_dir():
        raise typer.BadParameter(f"{src} is not a folder", param_hint="SRC")
    from ctsynth_ray.storage import resolved

    report = ingest(kind, src, out, spacing_mm=parse_spacing(spacing), split_fractions=parse_split(split),
                    resume=resume, source_name=str(resolved(src_text)), ray_options=options, **extra)  # fmt: skip
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    report_ingest_failures(report)
    kept = f" ({len(report.kept)} finished by an earlier run)" if report.kept else ""
    typer.echo(
        f"ingested {len(report.ingested)} volume(s) into {report.dataset}{kept}; {len(report.failed)} failed; "
        f"report: {report.dataset / REPORT_NAME}"
    )
    if not report.ok:
        raise typer.Exit(1)


@ingest_app.command("lidc")
@user_errors
def ingest_lidc(
    src: Annotated[str, typer.Argument(help="Folder tree (or URI) of DICOM series and LIDC reader XML files.")],
    out: OutDataset,
    min_readers: Annotated[int, typer.Option(min=1, help="Keep nodules marked by at least this many readers.")] = 3,
    spacing: Annotated[str, typer.Option(help=SPACING_HELP)] = TARGET_SPACING,
    split: Annotated[str, typer.Option(help=SPLIT_HELP)] = "1,0,0",
    workers: Workers = 1,
    address: Address = None,
    overwrite: Overwrite = False,
    resume: ResumeCases = False,
) -> None:
    """LIDC-IDRI style DICOM + reader XML: HU, consensus nodule masks, resampled NIfTI. Exit 1 if any case failed."""
    _run_ingest("lidc", src, out, spacing, split, resume, ray_options(workers, address, overwrite),
                min_readers=min_readers)  # fmt: skip


@ingest_app.command("nifti")
@user_errors
def ingest_nifti(
    src: Annotated[
        str, typer.Argument(help="Folder (or URI) of image/mask NIfTI pairs (images/ + masks/, or X + X_mask).")
    ],
    out: OutDataset,
    spacing: Annotated[str, typer.Option(help=SPACING_HELP)] = TARGET_SPACING,
    split: Annotated[str, typer.Option(help=SPLIT_HELP)] = "1,0,0",
    workers: Workers = 1,
    address: Address = None,
    overwrite: Overwrite = False,
    resume: ResumeCases = False,
) -> None:
    """Image/mask NIfTI pairs already converted: reoriented to RAS, resampled when the spacing differs."""
    _run_ingest("nifti", src, out, spacing, split, resume, ray_options(workers, address, overwrite))


app.add_typer(ingest_app, name="ingest", help="Ingest real CT: LIDC DICOM + reader XML, or NIfTI pairs.")


@app.command()
@user_errors
def prepare(
    dataset_text: str = typer.Argument(
        ..., metavar="DATASET", help="Dataset folder; label maps go to DATASET/labels/."
    ),
    out_text: str = typer.Option(..., "--out", help="GAN training data folder to create."),
    scheme: Scheme = typer.Option(Scheme.body, help="Label scheme: thesis (6 classes) or body (adds outside air)."),
    size: int = typer.Option(128, min=8, help="Crop size in voxels (nodule-centred cubes)."),
    dims: str = typer.Option("2,2.5,3", help="Which pairs to write: 2 (slices), 2.5 (stacks), 3 (crops)."),
    stack_slices: int = typer.Option(3, min=1, help="Label slices per 2.5D stack (odd)."),
    crops: Crops = typer.Option(Crops.one, help="one crop per volume (largest nodule; the thesis) or per-nodule."),
    templates: str = typer.Option("15", help="Nodule templates in the bank (the thesis used 15), or 'all'."),
    seed: int = typer.Option(0, min=0, help="Seed of the template choice."),
    workers: Workers = 1,
    address: Address = None,
    overwrite: Overwrite = False,
    resume: ResumeCases = False,
) -> None:
    """Label maps, the nodule template bank and GAN training data.

    Records in DATASET/prepare.json which split trained the GAN and where the bank is (synth-labels' default).
    """
    from ctsynth_ray.gan_data import parse_dims
    from ctsynth_ray.pipelines.prepare import prepare as run_prepare

    # prepare writes into DATASET and records absolute paths that later commands follow: a filesystem, not a bucket
    dataset, out = local_only(dataset_text, "prepare's DATASET"), local_only(out_text, "prepare's --out")
    try:
        kinds = parse_dims(dims)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dims") from None
    description = run_prepare(
        dataset, out, scheme=scheme.value, size=size, kinds=kinds, stack_slices=stack_slices, crops=crops.value,
        n_templates=parse_templates(templates), seed=seed, resume=resume,
        ray_options=ray_options(workers, address, overwrite),
    )  # fmt: skip
    counts = "; ".join(
        f"{part}: " + ", ".join(f"{k} {n}" for k, n in c.items()) for part, c in description["counts"].items()
    )
    typer.echo(f"label maps ({scheme.value}) in {dataset / 'labels'}; {len(description['templates'])} nodule templates")
    typer.echo(f"GAN data in {out}: {counts}")


@app.command("synth-labels")
@user_errors
def synth_labels(
    n: int = typer.Option(..., "--n", min=1, help="Number of new label volumes."),
    source: str = typer.Option(..., "--source", help="Dataset (folder or URI) with label maps (run `prepare` first)."),
    out: str = typer.Option(..., "--out", help="Dataset folder or URI to create (labels + masks, no images)."),
    bank: str | None = typer.Option(None, help="Template bank (default: the one `prepare` saved for SOURCE)."),
    size: int = typer.Option(128, min=8, help="Cube size in voxels."),
    seed: Seed = 0,
    p_nodule: float = typer.Option(0.8, min=0.0, max=1.0, help="Probability of pasting a nodule template."),
    lung_fraction: float = typer.Option(0.8, min=0.01, max=1.0, help="Share of a pasted nodule that must lie on lung."),
    augment: bool = typer.Option(False, help="Flip, turn and scale (+-20 %) templates (the thesis did not)."),
    workers: Workers = 1,
    address: Address = None,
    overwrite: Overwrite = False,
) -> None:
    """New label volumes: cubes of real ones with pasted nodules."""
    from ctsynth_ray.pipelines.synth_labels import synth_labels as run_synth_labels
    from ctsynth_ray.synth_labels import SynthLabelConfig

    config = SynthLabelConfig(size=size, p_nodule=p_nodule, lung_fraction=lung_fraction, augment=augment)
    rows = run_synth_labels(source, out, n, config=config, seed=seed,
                            bank=local_input(bank, "template bank", address) if bank else None,
                            ray_options=ray_options(workers, address, overwrite))  # fmt: skip
    pasted = sum(r["inserted_nodule"] for r in rows)
    failed = sum(r["paste_failed"] for r in rows)
    typer.echo(f"wrote {len(rows)} label volume(s) to {shown(out)}: {pasted} with a pasted nodule")
    if failed:
        typer.echo(f"note: {failed} volume(s) found no site with {lung_fraction:.0%} of the nodule on lung "
                   f"within the retry limit; they have no pasted nodule (column paste_failed)", err=True)  # fmt: skip


@app.command("train-gan")
@user_errors
def train_gan(
    gandata_text: str = typer.Argument(..., metavar="GANDATA", help="GAN training data made by `ctsynth prepare`."),
    out_text: str = typer.Option(..., "--out", help="Run folder: generator.pt/.json, samples, checkpoints."),
    model: Model = typer.Option(
        Model.cyclegan, help="cyclegan (ResNet generator, unpaired) or pix2pix (U-Net, paired)."
    ),
    dims: Dims = typer.Option(Dims.d2, help="2 (slices), 2.5 (label stacks -> centre slice) or 3 (crops)."),
    epochs: int = typer.Option(100, min=0, help="Epochs at a constant learning rate."),
    decay_epochs: int = typer.Option(100, min=0, help="Epochs of linear decay to 0 after those."),
    batch: int = typer.Option(32, min=1, help="Batch size per worker."),
    steps: int | None = typer.Option(None, min=1, help="Cap on optimiser steps (smoke runs)."),
    gan_mode: GanMode | None = typer.Option(None, help="GAN loss [default: lsgan for cyclegan, vanilla for pix2pix]."),
    pool_size: int | None = typer.Option(None, min=0, help="Image pool size [default: 50 cyclegan, 0 pix2pix]."),
    lambda_identity: float = typer.Option(
        0.0, min=0.0, help="CycleGAN identity loss, as a fraction of the cycle weight."
    ),
    widths: str = typer.Option("32,64,128", help="ResNet generator widths (CycleGAN)."),
    blocks: int = typer.Option(6, min=0, help="ResNet generator residual blocks (CycleGAN)."),
    unet_width: int = typer.Option(64, min=1, help="U-Net generator base width (pix2pix)."),
    encoding: Encoding = typer.Option(Encoding.scalar, help="Label encoding: scalar (label / 3 - 1) or onehot."),
    checkpoint_every: int = typer.Option(200, min=1, help="Steps between checkpoints."),
    workers: TrainWorkers = 1,
    gpus_per_worker: float = typer.Option(0.0, min=0.0, help="GPUs per worker (0: CPU, gloo)."),
    resume: Resume = False,
    tracking_uri: TrackingUri = None,
    experiment: str = typer.Option("ctsynth-gan", help="MLflow experiment."),
    address: Address = None,
    verbose: Verbose = False,
) -> None:
    """Train a label-map-to-CT GAN (CycleGAN, pix2pix) on Ray."""
    from ctsynth_ray.models.gan import GanConfig
    from ctsynth_ray.pipelines.tracking import default_tracking_uri
    from ctsynth_ray.pipelines.train_gan import TrainGanOptions
    from ctsynth_ray.pipelines.train_gan import train_gan as run_train_gan

    if epochs + decay_epochs < 1:
        raise typer.BadParameter("--epochs plus --decay-epochs must be at least 1")
    # Ray Train's workers write checkpoints into the run folder: a filesystem every node sees
    gandata, out = local_only(gandata_text, "train-gan's GANDATA"), local_only(out_text, "train-gan's --out")
    config = GanConfig(model=model.value, epochs=epochs, decay_epochs=decay_epochs, batch=batch,
                       gan_mode=gan_mode.value if gan_mode else None, pool_size=pool_size,
                       lambda_identity=lambda_identity, generator_widths=parse_widths(widths, "--widths", 3),
                       residual_blocks=blocks, unet_width=unet_width)  # fmt: skip
    options = TrainGanOptions(
        gandata=str(gandata), run_dir=str(out), dims=dims.value, encoding=encoding.value, steps=steps,
        checkpoint_every=checkpoint_every, workers=workers, gpus_per_worker=gpus_per_worker,
        tracking_uri=tracking_uri or default_tracking_uri(), experiment=experiment,
    )  # fmt: skip
    result = run_train_gan(options, config, resume=resume, address=address, verbose=verbose)
    metrics = result.metrics or {}
    typer.echo(f"trained {model.value} {dims.value}D to step {metrics.get('step')}: generator {out / 'generator.pt'}, "
               f"description {out / 'generator.json'}; MLflow {options.tracking_uri} (experiment {experiment})")  # fmt: skip


@app.command()
@user_errors
def generate(
    n: int = typer.Option(..., "--n", min=1, help="Number of volumes (volume i depends only on (seed, i))."),
    model: str = typer.Option(..., "--model", help="A finished train-gan run (folder or URI: generator.pt + .json)."),
    out: str = typer.Option(..., "--out", help="Dataset folder or URI (s3://, gs://, file://...) to create."),
    source: str | None = typer.Option(None, help="Dataset to cut label cubes from [default: the generator's]."),
    bank: str | None = typer.Option(None, help="Nodule template bank [default: the generator's GAN data bank]."),
    size: int | None = typer.Option(None, min=8, help="Cube size in voxels [default: the generator's]."),
    seed: Seed = 0,
    actors: int | None = typer.Option(None, min=1, help="Generator actors [default: one per GPU, else one per CPU]."),
    gpus_per_actor: float | None = typer.Option(None, min=0.0, help="GPUs per actor [default: 1 if there are GPUs]."),
    batch: int | None = typer.Option(None, min=1, help="Slices per pass (3D: volumes) [default: 512 GPU, 16 CPU]."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the generator (worth it on GPUs)."),
    chunk: int = typer.Option(8, min=1, help="Volumes per label task and actor call (the unit of work and of redo)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run; finished volumes are kept."),
    audit: bool = typer.Option(False, "--audit", help="Audit the set at the end into OUT/audit (exit 1 on copies)."),
    audit_real: str | None = typer.Option(
        None, help="--audit's real CT [default: the source split the GAN never saw]."
    ),
    address: Address = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Make synthetic CT volumes with nodule masks from a generator."""
    from ctsynth_ray.pipelines.generate import GenerateOptions
    from ctsynth_ray.pipelines.generate import generate as run_generate

    options = GenerateOptions(n=n, model=model, out=out, source=source, bank=bank, size=size, seed=seed, actors=actors,
                              gpus_per_actor=gpus_per_actor, batch=batch, compile=compile, resume=resume,
                              chunk=chunk)  # fmt: skip
    summary = run_generate(options, ray_options(address=address), echo=typer.echo)
    typer.echo(summary.format())
    if audit:
        from ctsynth_ray.pipelines.audit import AuditOptions, default_real, run_audit
        from ctsynth_ray.storage import as_text, location

        synthetic, audit_target = local_input(out, "synthetic dataset"), as_text(location(out) / "audit")
        with output(audit_target, replace=True, marker="audit.json") as audit_out:
            result = run_audit(AuditOptions(synthetic=str(synthetic), real=local_spec(audit_real or default_real(synthetic)),
                                            out=str(audit_out), workers=max(1, os.cpu_count() or 1) if address is None else 1,
                                            address=address, tracking_uri=tracking_uri or ""), echo=typer.echo)  # fmt: skip
        typer.echo(result.format())
        _exit_if_flagged(result, audit_target)


@app.command()
@user_errors
def audit(
    synthetic: str = typer.Argument(
        ..., help="A synthetic dataset (folder or URI) with provenance (ctsynth generate)."
    ),
    real: str = typer.Option(..., "--real", help="DATASET[:split] of real CT; the GAN should not have seen it."),
    out: str = typer.Option(
        ..., "--out", help="Folder or URI for audit.json, audit.html, figures (replaced if an audit)."
    ),
    gan_data: str | None = typer.Option(None, help="The GAN's training data [default: the generator's]."),
    turing: int = typer.Option(0, min=0, help="Write turing.html: N real and N synthetic slices, blind."),
    json_output: bool = typer.Option(False, "--json", help="Print audit.json instead of the summary."),
    workers: Workers = 1,
    address: Address = None,
    tracking_uri: TrackingUri = None,
    experiment: str = typer.Option("ctsynth-audit", help="MLflow experiment."),
    seed: int = typer.Option(0, min=0, help="Seed of the voxel, patch, cube and pair draws."),
) -> None:
    """Realism, diversity and patient copies of a synthetic set.

    Writes OUT/audit.json, audit.html and figures, logs them to MLflow; exits 1 when a volume copies a patient.
    """
    from ctsynth_ray.pipelines.audit import AuditOptions, run_audit

    echo = (lambda line: typer.echo(line, err=True)) if json_output else typer.echo
    with output(out, replace=True, marker="audit.json") as local:
        options = AuditOptions(synthetic=str(local_input(synthetic, "synthetic dataset", address)),
                               real=local_spec(real, address), out=str(local),
                               gan_data=str(local_input(gan_data, "GAN data", address)) if gan_data else None,
                               turing=turing, workers=workers, address=address, tracking_uri=tracking_uri or "",
                               experiment=experiment, seed=seed)  # fmt: skip
        result = run_audit(options, echo=echo)
    if json_output:
        typer.echo(json.dumps(result.report, indent=2, default=float))
    else:
        typer.echo(result.format())
    _exit_if_flagged(result, out)


def _exit_if_flagged(result, out: str) -> None:
    """Exit 1 with one line when the audit flagged a volume as a patient copy (a release gate)."""
    from ctsynth_ray.storage import location

    if result.flagged:
        typer.echo(f"ctsynth: error: {len(result.flagged)} volume(s) flagged as patient copies: "
                   f"{', '.join(result.flagged[:10])} (see {location(out) / 'audit.html'})", err=True)  # fmt: skip
        raise typer.Exit(1)


@app.command("train-seg")
@user_errors
def train_seg(
    train: list[str] = typer.Option(..., "--train", help="DATASET[:split][:n=N]; repeat to mix datasets."),
    val: str = typer.Option(..., "--val", help="DATASET[:split] of whole real volumes to evaluate on."),
    out_text: str = typer.Option(..., "--out", help="Run folder: model, pred/, metrics.csv, evals/."),
    iterations: int = typer.Option(1000, min=1, help="Optimiser steps (the thesis: 100,000)."),
    patch: int = typer.Option(96, min=8, help="Patch size in voxels."),
    samples_per_volume: int = typer.Option(8, min=1, help="Patches per volume and epoch."),
    batch: int = typer.Option(2, min=1, help="Patches per step and worker."),
    features: str = typer.Option("32,64,128,256", help="U-Net widths, one per level."),
    lr: float = typer.Option(3e-4, min=0.0, help="Adam learning rate."),
    workers: TrainWorkers = 1,
    cpus_per_worker: int = typer.Option(1, min=1, help="CPU threads per worker."),
    gpus_per_worker: float = typer.Option(0.0, min=0.0, help="GPUs per worker (0: CPU)."),
    seed: int = typer.Option(0, min=0, help="Seed of the volume draw, patches and initial weights."),
    resume: Resume = False,
    eval_every: int = typer.Option(500, min=1, help="Iterations between evaluations."),
    tracking_uri: TrackingUri = None,
    experiment: str = typer.Option("ctsynth-seg", help="MLflow experiment."),
    address: Address = None,
    verbose: Verbose = False,
) -> None:
    """Train the 3D U-Net segmenter on real/synthetic/mixed sets.

    Refuses a training set that shares a volume with --val, or holds synthetic volumes cut from one.
    """
    from ctsynth_ray.pipelines.tracking import default_tracking_uri
    from ctsynth_ray.pipelines.train_seg import TrainSegOptions
    from ctsynth_ray.pipelines.train_seg import train_seg as run_train_seg
    from ctsynth_ray.segmentation import parse_spec

    for spec in [*train, val]:
        try:
            parse_spec(spec)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    if parse_spec(val).n is not None:
        raise typer.BadParameter("--val takes DATASET[:split]: every volume is evaluated, not :n=N")
    out = local_only(out_text, "train-seg's --out")  # Ray Train's workers write checkpoints there
    train, val = [local_spec(spec, address) for spec in train], local_spec(val, address)
    try:
        options = TrainSegOptions(
            train=tuple(train), val=val, run_dir=str(out), iterations=iterations, patch=patch,
            samples_per_volume=samples_per_volume, batch=batch, features=parse_widths(features, "--features"), lr=lr,
            seed=seed, eval_every=eval_every, workers=workers, cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker, tracking_uri=tracking_uri or default_tracking_uri(), experiment=experiment,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = run_train_seg(options, resume=resume, address=address, verbose=verbose)
    metrics = result.metrics or {}
    typer.echo(f"trained the U-Net to iteration {metrics.get('step')}: validation Dice {metrics.get('val_dice', float('nan')):.3f}; "
               f"model {out / 'model.pt'}, predictions {out / 'pred'}, scores {out / 'metrics.csv'}")  # fmt: skip


@app.command()
@user_errors
def segment(
    model_run: str = typer.Argument(..., help="A finished train-seg run (folder or URI: model.pt + model.json)."),
    dataset: str = typer.Argument(..., help="DATASET[:split] of CT volumes to segment."),
    out: str = typer.Option(..., "--out", help="Folder or URI to create: one <volume_id>.nii.gz mask per volume."),
    workers: Workers = 1,
    address: Address = None,
    overwrite: Overwrite = False,
) -> None:
    """Segment nodules in CT volumes with a trained U-Net."""
    from ctsynth_ray.pipelines.segment import segment_dataset
    from ctsynth_ray.segmentation import parse_spec, split_spec

    try:
        spec = parse_spec(dataset)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="DATASET") from None
    if spec.n is not None:
        raise typer.BadParameter("takes DATASET[:split], not :n=N", param_hint="DATASET")
    written = segment_dataset(model_run, split_spec(dataset)[0], out, split=spec.split,
                              ray_options=ray_options(workers, address, overwrite))  # fmt: skip
    typer.echo(f"segmented {len(written)} volume(s) into {shown(out)}; score them with: ctsynth score {shown(out)} "
               f"{shown(dataset)} --out CSV")  # fmt: skip


@app.command()
@user_errors
def score(
    pred_dir: Path = typer.Argument(..., help="Predicted masks <volume_id>.nii.gz (non-zero is positive)."),
    truth: str = typer.Argument(..., help="True masks: a folder with the same names, or DATASET[:split]."),
    out: Path = typer.Option(..., "--out", help="CSV to write."),
) -> None:
    """Score predicted masks: sensitivity, accuracy, Dice, F2."""
    from ctsynth_ray.seg_metrics import score_folders, write_scores_csv
    from ctsynth_ray.segmentation import parse_spec

    try:
        spec = parse_spec(truth)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="TRUTH") from None
    if spec.n is not None:
        raise typer.BadParameter("takes a folder or DATASET[:split], not :n=N", param_hint="TRUTH")
    rows = score_folders(pred_dir, spec.dataset, spec.split)
    write_scores_csv(out, rows)
    typer.echo(f"scored {len(rows)} volume(s): {out}")


@app.command()
@user_errors
def compare(
    baseline: Path = typer.Argument(..., help="Score CSV of the baseline (e.g. the real-only model)."),
    candidate: Path = typer.Argument(..., help="Score CSV of the candidate."),
    ci: CiMethod = typer.Option(CiMethod.t, help="95 % CI: t (Student's t, n - 1) or thesis (1.96 sd / sqrt(all))."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Paired statistics of two score CSVs: CI, t-test, Wilcoxon."""
    import json

    from ctsynth_ray.seg_metrics import compare as run_compare
    from ctsynth_ray.seg_metrics import format_comparison, read_scores_csv

    result = run_compare(read_scores_csv(baseline), read_scores_csv(candidate), ci=ci.value)
    if as_json:
        for metric in result["metrics"].values():
            for side in ("baseline", "candidate"):
                metric[side].pop("n")
        typer.echo(json.dumps(result, allow_nan=True))
    else:
        typer.echo(format_comparison(result))


@app.command()
@user_errors
def sweep(
    real: str = typer.Option(..., "--real", help="DATASET[:split] of real volumes (default split: train)."),
    synthetic: str = typer.Option(..., "--synthetic", help="A generated dataset (ctsynth generate)."),
    val: str = typer.Option(..., "--val", help="DATASET[:split] of real volumes every trial is scored on."),
    out_text: str = typer.Option(..., "--out", help="Sweep folder: plan, trials/, tune/, report/."),
    preset: Preset = typer.Option(Preset.thesis, help="thesis: the four set-ups scaled; ratio: fixed total."),
    total: int | None = typer.Option(None, min=1, help="thesis: real set size (default all); ratio: the total."),
    fractions: str = typer.Option("0,0.25,0.5,0.75,0.9,1", help="ratio: synthetic fractions (0 always runs)."),
    real_sizes: str | None = typer.Option(None, help="Extra real-only set-ups of these sizes, e.g. 10,20,40."),
    seeds: int = typer.Option(3, min=1, help="Seeds per set-up (0..K-1): volume draw, patches, weights."),
    iterations: int = typer.Option(1000, min=1, help="U-Net iterations per trial."),
    max_concurrent: int | None = typer.Option(None, min=1, help="Trials at once (default: the cluster's fill)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep: finished trials are not rerun."),
    tracking_uri: TrackingUri = None,
    experiment: str = typer.Option("ctsynth-sweep", help="MLflow experiment."),
    address: Address = None,
    patch: int = typer.Option(96, min=8, help="U-Net patch size in voxels."),
    batch: int = typer.Option(2, min=1, help="Patches per step."),
    features: str = typer.Option("32,64,128,256", help="U-Net widths, one per level."),
    lr: float = typer.Option(3e-4, min=0.0, help="Adam learning rate."),
    verbose: Verbose = False,
) -> None:
    """Synthetic/real set-ups x seeds as Ray Tune trials, in MLflow.

    Each set-up is compared with real-only of the same seed (paired t-test, Wilcoxon); ends with the report.
    """
    from ctsynth_ray.pipelines.sweep import SweepOptions, run_sweep
    from ctsynth_ray.segmentation import parse_spec

    for option, spec in (("--real", real), ("--val", val)):
        try:
            parsed = parse_spec(spec)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=option) from None
        if parsed.n is not None:
            raise typer.BadParameter("takes DATASET[:split], not :n=N", param_hint=option)
    out = local_only(out_text, "sweep's --out")  # Tune and Ray Train write trials and checkpoints there
    real, val = local_spec(real, address), local_spec(val, address)
    synthetic = local_input(synthetic, "synthetic dataset", address)
    fraction_values = parse_numbers(fractions, "--fractions", float)
    if min(fraction_values) < 0 or max(fraction_values) > 1:
        raise typer.BadParameter(f"--fractions must lie in [0, 1], got {fractions!r}")
    try:
        options = SweepOptions(
            real=real, synthetic=str(synthetic), val=val, out=str(out), preset=preset.value, total=total,
            fractions=fraction_values, real_sizes=parse_widths(real_sizes, "--real-sizes") if real_sizes else (),
            seeds=seeds, iterations=iterations, max_concurrent=max_concurrent, tracking_uri=tracking_uri or "",
            experiment=experiment, patch=patch, batch=batch, features=parse_widths(features, "--features"), lr=lr,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    summary = run_sweep(options, resume=resume, address=address, verbose=verbose, echo=typer.echo)
    typer.echo(summary.format())
    if summary.failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def report(
    sweep_dir: Path | None = typer.Argument(None, metavar="SWEEP", help="A sweep folder (ctsynth sweep --out)."),
    out: Path = typer.Option(..., "--out", help="Folder for report.md, report.html, results.csv and the PNGs."),
    experiment: str | None = typer.Option(None, help="Build it from MLflow alone: the newest sweep there."),
    tracking_uri: TrackingUri = None,
) -> None:
    """A sweep's report: tables, p-values and plots (Markdown, HTML)."""
    from ctsynth_ray.pipelines.sweep import report_from_folder, report_from_mlflow

    if (sweep_dir is None) == (experiment is None):
        raise typer.BadParameter("give a SWEEP folder or --experiment NAME (one of them)")
    if sweep_dir is not None:
        written = report_from_folder(sweep_dir, out)
    else:
        written = report_from_mlflow(experiment, out, tracking_uri or "")
    typer.echo(f"report: {written['report']} and {written['html']} ({len(written) - 3} figure(s))")


@app.command()
@user_errors
def ui(
    port: int = typer.Option(5000, min=1, max=65535, help="Port of the MLflow UI."),
    tracking_uri: TrackingUri = None,
) -> None:
    """MLflow's UI on 127.0.0.1; prints each experiment's runs table."""
    import socket

    from ctsynth_ray.errors import CtsynthError
    from ctsynth_ray.pipelines.runtime import LOOPBACK
    from ctsynth_ray.pipelines.ui import experiment_links, start_server, temporary_artifacts

    links = experiment_links(tracking_uri or "", port)
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError as exc:
            raise CtsynthError(
                f"{LOOPBACK}:{port}: cannot listen there ({exc.strerror}); choose another --port"
            ) from None
    for warning in temporary_artifacts(links):
        typer.echo(f"ctsynth: warning: {warning}", err=True)
    typer.echo(f"MLflow UI on http://{LOOPBACK}:{port} (Ctrl-C stops it). Runs tables:")
    for link in links:
        typer.echo(f"  {link.name:<24} {link.runs:>4} run(s)  {link.url}")
        for sweep_name, url in link.sweeps.items():
            typer.echo(f"    sweep {sweep_name}: its trials side by side: {url}")
    process = start_server(tracking_uri or "", port)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        return
    if code:
        raise CtsynthError(f"the MLflow server stopped with exit code {code} (its messages are above)")


@app.command(context_settings={"allow_interspersed_args": False})
@user_errors
def submit(
    command: list[str] = typer.Argument(..., metavar="-- COMMAND...", help="A ctsynth command and its arguments."),
    address: str | None = typer.Option(
        None, help="The cluster's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, else 127.0.0.1:8265)."
    ),
    gpus: float = typer.Option(0.0, min=0.0, help="GPUs for the command's own process (its Ray work takes its own)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job's log and exit with its status."),
    submission_id: str | None = typer.Option(None, help="The job's id (default: one Ray makes)."),
) -> None:
    """Run a ctsynth command as a Ray job; follow its log to the end.

    ctsynth submit --address http://HEAD:8265 -- generate --n 10000 --model URI --out URI. Paths in COMMAND are read on the cluster: give shared-storage paths or URIs (s3://, gs://, file://).
    """
    from ctsynth_ray.pipelines.jobs import SubmitOptions
    from ctsynth_ray.pipelines.jobs import submit as run_submit

    options = SubmitOptions(command=tuple(command), address=address, gpus=gpus, wait=wait,
                            submission_id=submission_id)  # fmt: skip
    code = run_submit(options, echo=lambda line: typer.echo(line, err=True))
    if code:
        raise typer.Exit(code)


jobs_app = typer.Typer(help="Ray jobs on a cluster: list, logs, stop.", no_args_is_help=True)
JobsAddress = Annotated[
    str | None, typer.Option(help="The cluster's dashboard (default: $RAY_API_SERVER_ADDRESS, else 127.0.0.1:8265).")
]


@jobs_app.command("list")
@user_errors
def jobs_list(address: JobsAddress = None) -> None:
    """Every job of the cluster, newest first: id, status, start, command."""
    from ctsynth_ray.pipelines.jobs import JobsClient, job_rows

    for line in job_rows(JobsClient(address)) or ["no jobs"]:
        typer.echo(line)


@jobs_app.command("logs")
@user_errors
def jobs_logs(
    job_id: str = typer.Argument(..., metavar="ID", help="Submission id (ctsynth jobs list)."),
    follow: bool = typer.Option(False, "--follow", help="Keep printing until the job ends; exit with its status."),
    address: JobsAddress = None,
) -> None:
    """A job's log."""
    from ctsynth_ray.pipelines.jobs import JobsClient
    from ctsynth_ray.pipelines.jobs import follow as follow_job

    client = JobsClient(address)
    if follow:
        code = follow_job(client, job_id, echo=lambda line: typer.echo(line, err=True))
        if code:
            raise typer.Exit(code)
        return
    typer.echo(client.logs(job_id), nl=False)


@jobs_app.command("stop")
@user_errors
def jobs_stop(
    job_id: str = typer.Argument(..., metavar="ID", help="Submission id (ctsynth jobs list)."),
    address: JobsAddress = None,
) -> None:
    """Stop a running job."""
    from ctsynth_ray.pipelines.jobs import JobsClient

    running = JobsClient(address).stop(job_id)
    typer.echo(f"job {job_id}: {'stop requested' if running else 'had already ended'}")


app.add_typer(jobs_app, name="jobs", help="Ray jobs on a cluster: list, logs ID, stop ID.")


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("ctsynth-demo"), help="Folder for every demo output (replaced each run)."),
    n: int = typer.Option(12, min=8, help="Number of phantoms."),
    generated: int = typer.Option(12, min=1, help="Synthetic CT volumes to generate."),
    workers: int = typer.Option(2, min=1, help="Ray tasks in parallel (and Ray Train workers)."),
    gan_steps: int = typer.Option(80, min=1, help="GAN training steps."),
    seg_iterations: int = typer.Option(80, min=1, help="U-Net training iterations per run."),
    tracking_uri: TrackingUri = None,
    address: str | None = typer.Option(
        None, help="A Ray cluster for the chain (default: a local Ray on 127.0.0.1); OUT must be shared with it."
    ),
    verbose: Verbose = False,
) -> None:
    """Run the whole chain on built-in phantoms; list every output."""
    import shlex

    from ctsynth_ray.pipelines.demo import DemoOptions, run_demo
    from ctsynth_ray.pipelines.tracking import default_tracking_uri

    options = DemoOptions(out=out, n=n, generated=generated, workers=workers, gan_steps=gan_steps,
                          seg_iterations=seg_iterations,
                          tracking_uri=tracking_uri or default_tracking_uri(), verbose=verbose,
                          address=address)  # fmt: skip
    outputs, seconds = run_demo(options, echo=typer.echo)
    typer.echo(f"\ndemo finished in {seconds:.0f} s. Outputs:")
    for name, path in outputs:
        typer.echo(f"  {name:<28} {Path(path).resolve()}")
    typer.echo(f"\nBrowse every run in MLflow: ctsynth ui --tracking-uri {shlex.quote(options.tracking_uri)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
