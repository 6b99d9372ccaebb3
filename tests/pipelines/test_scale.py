"""Whole-collection ingest and prepare on real-sized data: the real LIDC-IDRI-0001 case (736 x 736 x 331 after
resampling) and an adult-size phantom exported as an LIDC-style case. Each command runs as the user runs it, in a
process of its own: its peak memory is measured (``os.wait4``), and it is killed part way to test ``--resume``."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctsynth_ray.dataset import TARGET_SPACING_MM, read_manifest
from ctsynth_ray.ingest.cases import find_lidc_cases
from ctsynth_ray.ingest.export import export_lidc_case
from ctsynth_ray.phantom import PhantomConfig, make_phantom
from ctsynth_ray.pipelines.ingest import case_memory, ingest
from ctsynth_ray.pipelines.prepare import prepare, volume_memory
from ctsynth_ray.pipelines.runtime import RayOptions, parallel_map
from ctsynth_ray.progress import PROGRESS

QUIET = RayOptions(progress=False)
MEMORY_LIMIT = 1.5e9  # bytes: the bound on ingest and prepare of a 736 x 736 x 331 case
CTSYNTH = [sys.executable, "-m", "ctsynth_ray.cli.main"]
PREPARE_OPTIONS = ["--size", "64", "--templates", "all"]


#: Runs a command and writes its peak resident memory (KiB) to a file. A child forked from this big test process
#: would count this process' pages as its own (Linux keeps the larger high-water mark across exec), so the command
#: is started by a small Python process of its own.
PEAK_OF = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, s, u = os.wait4(p.pid, 0); "
           "open(sys.argv[1], 'w').write(str(u.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(s))")  # fmt: skip


def run_measured(args: list[str], log: Path) -> int:
    """Run a ctsynth command to its end; its peak resident memory in bytes."""
    peak = log.with_suffix(".peak")
    with open(log, "wb") as sink:
        done = subprocess.run([sys.executable, "-c", PEAK_OF, str(peak), *args], stdout=sink, stderr=subprocess.STDOUT)
    assert done.returncode == 0, log.read_text()[-2000:]
    return int(peak.read_text()) * 1024


def run_until_first_record(args: list[str], out: Path, log: Path) -> None:
    """Start a ctsynth command and kill it (SIGKILL) as soon as it has recorded its first finished unit."""
    with open(log, "wb") as sink:
        process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not list((out / PROGRESS).glob("*.json")) if (out / PROGRESS).is_dir() else True:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()


def same_files(a: Path, b: Path, ignore: set[str] = frozenset()) -> None:
    names = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()} - ignore
    assert names == {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()} - ignore
    for name in sorted(names):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def collection(test_data, tmp_path_factory) -> Path:
    """The real case and an adult-size phantom with nodules (512 x 512 pixels of 0.7 mm and 2.5 mm slices, as
    LIDC-IDRI-0001, but 48 of them: 736 x 736 x 118 after resampling)."""
    src = tmp_path_factory.mktemp("collection")
    shutil.copytree(test_data / "lidc" / "LIDC-IDRI-0001", src / "LIDC-IDRI-0001")  # a search does not follow links
    phantom = make_phantom(0, 1, PhantomConfig(shape=(512, 512, 48), spacing_mm=(0.703125, 0.703125, 2.5)))
    assert phantom.nodules
    phantom.volume.volume_id = "phantom-adult"
    export_lidc_case(phantom.volume, src)
    return src


@pytest.fixture(scope="module")
def ingested(collection, tmp_path_factory) -> tuple[Path, int]:
    """An uninterrupted `ctsynth ingest lidc` of the collection, and its peak memory."""
    out = tmp_path_factory.mktemp("uninterrupted") / "real"
    peak = run_measured([*CTSYNTH, "ingest", "lidc", str(collection), "--out", str(out)], out.parent / "log")
    return out, peak


def test_ingest_of_a_real_sized_collection_stays_under_the_memory_bound(collection, ingested):
    out, peak = ingested
    assert [(r["volume_id"], r["shape_z"]) for r in read_manifest(out)] == [
        ("LIDC-IDRI-0001", 331),
        ("phantom-adult", 118),
    ]
    assert peak < MEMORY_LIMIT, f"peak {peak / 1e9:.2f} GB"
    cases, _ = find_lidc_cases(collection)
    assert case_memory(cases[0], TARGET_SPACING_MM) > peak  # what a task declares to Ray covers what it takes


def test_an_interrupted_ingest_resumes_without_redoing_cases_and_equals_an_uninterrupted_one(
    collection, ingested, tmp_path
):
    reference, _ = ingested
    out = tmp_path / "real"
    run_until_first_record([*CTSYNTH, "ingest", "lidc", str(collection), "--out", str(out)], out, tmp_path / "log")
    assert not (out / "manifest.parquet").exists()  # killed before the end: not a dataset yet
    (first,) = [p.stem for p in (out / PROGRESS).glob("*.json")]
    written = {p: p.stat().st_mtime_ns for p in out.glob(f"*/{first}.nii.gz")}
    assert len(written) == 2

    report = ingest("lidc", collection, out, resume=True, ray_options=QUIET)
    assert report.ok and report.kept == [first] and report.ingested == ["LIDC-IDRI-0001", "phantom-adult"]
    assert {p: p.stat().st_mtime_ns for p in written} == written  # the finished case was not redone
    assert read_manifest(out) == read_manifest(reference)
    same_files(out, reference, ignore={"ingest.json", "ingest_report.json"})
    summary = {k: v for k, v in json.loads((out / "ingest_report.json").read_text()).items() if k != "dataset"}
    assert summary == {k: v for k, v in json.loads((reference / "ingest_report.json").read_text()).items()
                       if k not in ("dataset", "kept")} | {"kept": [first]}  # fmt: skip


def test_prepare_measured_then_interrupted_and_resumed_equals_uninterrupted(ingested, tmp_path):
    source, _ = ingested
    datasets = [tmp_path / "a" / "real", tmp_path / "b" / "real"]
    for dataset in datasets:
        shutil.copytree(source, dataset)
    gan = [tmp_path / "a" / "gan", tmp_path / "b" / "gan"]
    peak = run_measured([*CTSYNTH, "prepare", str(datasets[0]), "--out", str(gan[0]), *PREPARE_OPTIONS],
                        tmp_path / "a" / "log")  # fmt: skip
    assert peak < MEMORY_LIMIT, f"peak {peak / 1e9:.2f} GB"
    assert volume_memory(read_manifest(source)[0]) > peak  # declared to Ray, covers what it takes

    command = [*CTSYNTH, "prepare", str(datasets[1]), "--out", str(gan[1]), *PREPARE_OPTIONS]
    run_until_first_record(command, gan[1], tmp_path / "b" / "log")
    assert not (gan[1] / "gan_data.json").exists()
    (first,) = [p.stem for p in (gan[1] / PROGRESS).glob("*.json")]
    label = datasets[1] / "labels" / f"{first}.nii.gz"
    written = label.stat().st_mtime_ns

    prepare(datasets[1], gan[1], size=64, n_templates=None, resume=True, ray_options=QUIET)
    assert label.stat().st_mtime_ns == written  # the finished volume was not redone
    again = prepare(datasets[1], gan[1], size=64, n_templates=None, resume=True, ray_options=QUIET)
    assert again == json.loads((gan[1] / "gan_data.json").read_text()) and label.stat().st_mtime_ns == written
    assert read_manifest(datasets[1]) == read_manifest(datasets[0])
    same_files(datasets[1], datasets[0], ignore={"prepare.json"})
    same_files(gan[1], gan[0], ignore={"prepare_run.json", "gan_data.json"})
    descriptions = [json.loads((g / "gan_data.json").read_text()) for g in gan]
    assert [{k: v for k, v in d.items() if k != "source_dataset"} for d in descriptions] == [
        {k: v for k, v in descriptions[0].items() if k != "source_dataset"}
    ] * 2
    assert descriptions[0]["counts"]["train"]["3d"] == 2  # both volumes have nodules: one 3D crop each


def test_resume_refuses_other_settings_and_a_new_run_refuses_a_busy_folder(collection, ingested):
    out, _ = ingested
    with pytest.raises(Exception, match=r"min_readers differ\): --resume continues the same run only"):
        ingest("lidc", collection, out, min_readers=2, resume=True, ray_options=QUIET)
    with pytest.raises(Exception, match=r"already exists and is not empty \(pass --resume to continue it"):
        ingest("lidc", collection, out, ray_options=QUIET)
    with pytest.raises(Exception, match=r"--out holds SRC"):  # --overwrite would delete the source
        ingest("lidc", collection, collection, ray_options=RayOptions(overwrite=True, progress=False))
    assert (collection / "LIDC-IDRI-0001" / "069.xml").is_file()


def _exit_on_two(value: int) -> int:
    if value == 2:
        os._exit(1)  # the worker dies, as one killed for memory does
    return value


def test_a_task_whose_worker_dies_is_reported_and_the_others_finish(ray_session):
    results = parallel_map(_exit_on_two, [(1,), (2,), (3,)], RayOptions(workers=2, progress=False),
                           memory=[100 << 20] * 3, on_failure=lambda k, exc: ("failed", k, type(exc).__name__))  # fmt: skip
    assert results[0] == 1 and results[2] == 3
    assert results[1][:2] == ("failed", 1) and "Crashed" in results[1][2]
