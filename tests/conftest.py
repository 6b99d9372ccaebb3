"""Shared fixtures: the real test data folder, one local Ray instance for the whole session, small phantoms."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ctsynth_ray.pipelines.runtime import RayOptions

QUIET = RayOptions(progress=False)

# Set before any Ray starts, so its workers inherit them: object-store clients never ask a cloud metadata server
# (no traffic off loopback), and copies of object-store inputs go to a folder of this session, not ~/.cache.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("CTSYNTH_CACHE", tempfile.mkdtemp(prefix="ctsynth-cache-", dir="/tmp"))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The real CT of ../shared/data (or $CTSYNTH_TEST_DATA). Missing data fails: CI must run these tests."""
    root = Path(os.environ.get("CTSYNTH_TEST_DATA", REPO.parent / "shared" / "data"))
    if not (root / "SOURCES.md").is_file():
        pytest.fail(f"real test data not found at {root}: set CTSYNTH_TEST_DATA")
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One loopback-only local Ray for every test that needs it (started on first use)."""
    from ctsynth_ray.pipelines.runtime import ensure_ray

    temp_dir = tempfile.mkdtemp(prefix="ctsynth-ray-", dir="/tmp")
    ensure_ray(num_cpus=2, temp_dir=temp_dir)
    import ray

    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def small_phantom_config():
    from ctsynth_ray.phantom import PhantomConfig

    return PhantomConfig(shape=(128, 96, 64))


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory, small_phantom_config) -> Path:
    """A small phantom dataset made in-process (6 volumes), shared read-only by tests."""
    from ctsynth_ray.pipelines.phantoms import make_phantom_dataset

    out = tmp_path_factory.mktemp("phantoms") / "ds"
    make_phantom_dataset(out, 6, config=small_phantom_config, seed=7, ray_options=QUIET)
    return out


@pytest.fixture
def copy_dataset(tmp_path, phantom_dataset):
    """A private copy of the shared phantom dataset, for tests that break it."""

    def make() -> Path:
        target = tmp_path / "copy"
        shutil.copytree(phantom_dataset, target)
        return target

    return make


@pytest.fixture(scope="session")
def labelled_dataset(tmp_path_factory, phantom_dataset) -> Path:
    """A copy of the phantom dataset with body-scheme label maps (read-only for tests)."""
    from ctsynth_ray.pipelines.prepare import write_label_maps

    root = tmp_path_factory.mktemp("labelled") / "ds"
    shutil.copytree(phantom_dataset, root)
    write_label_maps(root, "body", QUIET)
    return root


@pytest.fixture(scope="session")
def gan_data(tmp_path_factory, small_phantom_config) -> Path:
    """GAN training data (32^3 crops, 2D / 2.5D / 3D) from 8 small phantoms, half of them in the test split."""
    from ctsynth_ray.pipelines.phantoms import make_phantom_dataset
    from ctsynth_ray.pipelines.prepare import prepare

    root = tmp_path_factory.mktemp("gan")
    make_phantom_dataset(root / "ds", 8, config=small_phantom_config, seed=21, split_fractions=(0.5, 0.0, 0.5),
                         ray_options=QUIET)  # fmt: skip
    prepare(root / "ds", root / "gan", scheme="body", size=32, n_templates=4, ray_options=QUIET)
    return root / "gan"


@pytest.fixture(scope="session")
def tiny_generator(gan_data, tmp_path_factory) -> Path:
    """An untrained but complete pix2pix 2D generator run on ``gan_data`` (generator.pt + generator.json, written
    by the function train-gan exports with)."""
    import json

    from ctsynth_ray.models.gan import GanConfig, GanTrainer
    from ctsynth_ray.pipelines.train_gan import TrainGanOptions, export_generator

    run_dir = tmp_path_factory.mktemp("generator")
    description = json.loads((gan_data / "gan_data.json").read_text())
    trainer = GanTrainer(GanConfig(model="pix2pix", unet_width=4, unet_downs=5), 2, 1, 1)
    export_generator(run_dir, trainer, TrainGanOptions(gandata=str(gan_data), run_dir=str(run_dir)), description)
    return run_dir


def _live_processes(*titles: bytes) -> list[int]:
    """Pids of live processes whose title starts with one of ``titles`` (Ray titles its workers ``ray::<Class>...``;
    Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # not a process, or gone meanwhile
        if title.startswith(titles) and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def ray_processes():
    """``ray_processes(b"ray::VolumeMaker", ...)``: pids of the live Ray workers of those titles."""
    return _live_processes
