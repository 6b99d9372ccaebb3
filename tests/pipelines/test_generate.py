"""`generate` on CPU with a tiny generator on the shared Ray: files, determinism, exactly once, resume, errors."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ctsynth_ray.dataset import read_manifest, read_nifti
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.generation import finished_rows, generator_fingerprint
from ctsynth_ray.pipelines.generate import GenerateOptions, generate
from ctsynth_ray.pipelines.runtime import RayOptions
from ctsynth_ray.progress import PROGRESS

QUIET = RayOptions(progress=False)


def silent(*_) -> None:
    """Print nothing."""


@pytest.fixture(scope="module")
def generator(tiny_generator):
    return tiny_generator


def options(generator, out, **kwargs):
    return GenerateOptions(**{"n": 6, "model": str(generator), "out": str(out), "chunk": 2, **kwargs})


def arrays(out: Path) -> dict:
    rows = read_manifest(out)
    return {r["volume_id"]: [read_nifti(out / r[c])[0] for c in ("image", "mask", "label")] for r in rows}


def test_files_dtypes_affine_and_manifest(generator, gan_data, tmp_path, ray_session):
    out = tmp_path / "synth"
    summary = generate(options(generator, out, seed=3), QUIET, echo=silent)
    assert summary.made == 6 and summary.skipped == 0
    assert summary.actors == int(ray_session.cluster_resources()["CPU"])  # one CPU actor per CPU by default
    rows = read_manifest(out)
    assert [r["synth_index"] for r in rows] == list(range(6))
    assert [r["volume_id"] for r in rows] == [f"synth-s3-{i:06d}" for i in range(6)]
    source = read_manifest(gan_data.parent / "ds")
    spacing = [source[0][f"spacing_{a}"] for a in "xyz"]
    for row in rows:
        assert row["source"] == "synthetic" and row["split"] == "train" and row["synth_seed"] == 3
        assert row["generator_fingerprint"] == generator_fingerprint(generator)
        assert row["source_volume_id"] in {r["volume_id"] for r in source if r["split"] == "train"}
        image, affine = read_nifti(out / row["image"])
        mask, mask_affine = read_nifti(out / row["mask"])
        label, label_affine = read_nifti(out / row["label"])
        assert image.dtype == np.int16 and mask.dtype == np.uint8 and label.dtype == np.uint8
        assert image.shape == mask.shape == label.shape == (32, 32, 32)
        assert image.min() >= -1024 and image.max() <= 3071
        np.testing.assert_array_equal(mask, (label == 5).astype(np.uint8))
        np.testing.assert_allclose(affine, label_affine) and np.testing.assert_allclose(affine, mask_affine)
        assert [row[f"spacing_{a}"] for a in "xyz"] == pytest.approx(spacing)
    assert not (out / PROGRESS).exists() and not list(out.rglob(".*.tmp.*"))


def test_volumes_are_bitwise_the_same_whatever_the_actors_and_batch(generator, tmp_path, ray_session):
    one = generate(options(generator, tmp_path / "one", actors=1, batch=7), QUIET, echo=silent)
    two = generate(options(generator, tmp_path / "two", actors=2, batch=64, chunk=1), QUIET, echo=silent)
    assert one.actors == 1 and two.actors == 2
    a, b = arrays(tmp_path / "one"), arrays(tmp_path / "two")
    assert list(a) == list(b)
    for vid in a:
        for x, y in zip(a[vid], b[vid]):
            np.testing.assert_array_equal(x, y)
    for sub in ("images", "masks", "labels"):  # the files themselves, gzip header included
        for path in sorted((tmp_path / "one" / sub).iterdir()):
            assert path.read_bytes() == (tmp_path / "two" / sub / path.name).read_bytes()


def named_generator_actors(ray):
    return [name for name in ray.util.list_named_actors() if name.startswith("ctsynth-generator-")]


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_a_killed_actor_is_replaced_and_every_volume_made_once(generator, tmp_path, ray_session, how):
    ray = ray_session
    out = tmp_path / "synth"
    result = {}

    def run():
        try:
            result["summary"] = generate(options(generator, out, n=30, actors=2, chunk=1), QUIET, echo=silent)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while not list((out / PROGRESS).glob("*.json")) if (out / PROGRESS).is_dir() else True:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)  # kill mid-run: once a volume is finished
    victim = ray.get_actor(named_generator_actors(ray)[0])
    if how == "ray.kill":
        ray.kill(victim)
    else:
        os.kill(ray.get(victim.pid.remote()), signal.SIGKILL)
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary.actors_replaced >= 1
    rows = read_manifest(out)
    assert [r["synth_index"] for r in rows] == list(range(30))
    assert len(list((out / "images").iterdir())) == 30 and not list(out.rglob(".*.tmp.*"))


def test_resume_after_an_interrupted_run_redoes_nothing_finished(generator, tmp_path, ray_session, ray_processes):
    out = tmp_path / "synth"
    address = ray_session.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "ctsynth_ray.cli.main", "generate", "--n", "40", "--model", str(generator),
               "--out", str(out), "--address", address]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while len(list((out / PROGRESS).glob("*.json")) if (out / PROGRESS).is_dir() else []) < 3:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    assert ray_processes(b"ray::VolumeMaker")  # the wait below looks for the right processes
    process.send_signal(signal.SIGKILL)
    process.wait()
    # The dead driver's actors die with it, a moment later; an actor can be unregistered while its process still
    # finishes a write, so wait for the processes themselves.
    while ray_processes(b"ray::VolumeMaker") or any(
        a["name"].startswith("ctsynth-generator-") for a in ray_session.util.list_named_actors(all_namespaces=True)
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    finished = {r["image"]: (out / r["image"]).stat().st_mtime_ns for r in finished_rows(out).values()}
    assert 3 <= len(finished) < 40 and not (out / "manifest.parquet").exists()
    summary = generate(options(generator, out, n=40, resume=True), QUIET, echo=silent)
    assert summary.skipped == len(finished) and summary.made == 40 - len(finished)
    assert all((out / image).stat().st_mtime_ns == mtime for image, mtime in finished.items())  # not redone
    assert [r["synth_index"] for r in read_manifest(out)] == list(range(40))
    assert not list(out.rglob(".*.tmp.*")) and not (out / PROGRESS).exists()
    # A finished run resumed with a larger N keeps its volumes and adds the new ones.
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.nii.gz")}
    more = generate(options(generator, out, n=44, resume=True), QUIET, echo=silent)
    assert more.skipped == 40 and more.made == 4
    assert all((out / "images" / name).stat().st_mtime_ns == mtime for name, mtime in before.items())
    with pytest.raises(CtsynthError, match="--resume can add volumes, not take them away"):
        generate(options(generator, out, n=10, resume=True), QUIET, echo=silent)


def test_bad_runs_are_clear_errors(generator, gan_data, tmp_path, ray_session):
    out = tmp_path / "synth"
    with pytest.raises(CtsynthError, match="--size 40 does not fit the generator"):
        generate(options(generator, out, size=40), QUIET, echo=silent)
    with pytest.raises(CtsynthError, match=r"need about .* GB, but only"):
        generate(options(generator, out, n=10**12), QUIET, echo=silent)
    generate(options(generator, out, n=2), QUIET, echo=silent)
    with pytest.raises(CtsynthError, match="already exists and is not empty"):
        generate(options(generator, out, n=2), QUIET, echo=silent)
    with pytest.raises(CtsynthError, match="seed differ"):
        generate(options(generator, out, n=2, seed=9, resume=True), QUIET, echo=silent)
    with pytest.raises(CtsynthError, match="do not fit the Ray cluster's 2 CPU"):
        generate(options(generator, tmp_path / "many", actors=16), QUIET, echo=silent)
    with pytest.raises(CtsynthError, match="the Ray cluster has 0 GPU"):
        generate(options(generator, tmp_path / "gpu", gpus_per_actor=1), QUIET, echo=silent)
    assert not (tmp_path / "many").exists() and not (tmp_path / "gpu").exists()
    with pytest.raises(CtsynthError, match="nothing to resume"):
        generate(options(generator, tmp_path / "other", resume=True), QUIET, echo=silent)
    import shutil

    from ctsynth_ray.pipelines.prepare import write_label_maps

    thesis = tmp_path / "thesis"
    shutil.copytree(gan_data.parent / "ds", thesis)
    write_label_maps(thesis, "thesis", QUIET)
    with pytest.raises(CtsynthError, match="trained on body label maps, the source has thesis ones"):
        generate(options(generator, tmp_path / "t", source=str(thesis)), QUIET, echo=silent)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("dims", ["2.5", "3"])
def test_two_and_a_half_d_and_three_d_generators_make_the_same_labels_and_valid_ct(
    dims, generator, gan_data, tmp_path, ray_session
):
    """End to end with a 2.5D (stacks of k label slices) and a 3D generator: the label volumes and masks are those
    of the 2D run with the same seed (they depend on (seed, i) only), the CT is int16 HU on the same grid."""
    import json

    from ctsynth_ray.models.gan import GanConfig, GanTrainer
    from ctsynth_ray.pipelines.train_gan import TrainGanOptions, export_generator

    description = json.loads((gan_data / "gan_data.json").read_text())
    stack = description.get("stack_slices") or 1
    run_dir = tmp_path / f"generator-{dims}"
    spatial, channels = (3, 1) if dims == "3" else (2, stack)
    trainer = GanTrainer(GanConfig(model="pix2pix", unet_width=4, unet_downs=5), spatial, channels, 1)
    export_generator(run_dir, trainer, TrainGanOptions(gandata=str(gan_data), run_dir=str(run_dir), dims=dims),
                     description)  # fmt: skip
    made = generate(options(run_dir, tmp_path / "synth", n=3, chunk=2), QUIET, echo=silent)
    reference = generate(options(generator, tmp_path / "synth-2d", n=3, chunk=2), QUIET, echo=silent)
    assert made.made == reference.made == 3
    ours, theirs = arrays(tmp_path / "synth"), arrays(tmp_path / "synth-2d")
    assert sorted(ours) == sorted(theirs)
    for vid, (ct, mask, label) in ours.items():
        assert ct.dtype == np.int16 and ct.shape == label.shape == mask.shape
        assert ct.min() >= -1024 and ct.max() <= 3071
        assert np.array_equal(mask, theirs[vid][1]) and np.array_equal(label, theirs[vid][2])
