"""Datasets on an object store: a real S3 API server on 127.0.0.1 (moto's), written by the CLI and by generation's
Ray actors directly, read back through node-local copies."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctsynth_ray.cli.main import app
from ctsynth_ray.dataset import read_manifest, staged_dataset, write_nifti
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.pipelines.generate import GenerateOptions, generate
from ctsynth_ray.storage import Remote, local_copy

from ..conftest import QUIET

runner = CliRunner()


@pytest.fixture(scope="module")
def bucket():
    """``s3://test:test@ctsynth-test`` on a moto S3 server bound to 127.0.0.1 (dummy credentials in the URI)."""
    import pyarrow.fs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        fs = pyarrow.fs.S3FileSystem(access_key="test", secret_key="test", endpoint_override=f"127.0.0.1:{port}",
                                     scheme="http", region="us-east-1", allow_bucket_creation=True)  # fmt: skip
        fs.create_dir("ctsynth-test")
        yield (
            lambda key: (
                f"s3://test:test@ctsynth-test/{key}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
            )
        )
    finally:
        server.terminate()
        server.wait(timeout=10)


def stored(uri: str) -> list[str]:
    return [rel for rel, _, _ in Remote(uri).files()]


def test_phantoms_to_a_bucket_refuse_then_replace_and_read_back(bucket, ray_session):
    uri = bucket("phantoms")
    # two workers: Ray tasks write their volumes straight to the bucket, the driver the manifest after them
    made = runner.invoke(app, ["phantom", "--n", "3", "--shape", "64,64,48", "--out", uri, "--workers", "2"])
    assert made.exit_code == 0, made.output
    assert "s3://***@ctsynth-test/phantoms/manifest.parquet" in made.output  # the secret is not printed
    assert len([p for p in stored(uri) if p.startswith("images/")]) == 3
    assert runner.invoke(app, ["inspect", uri]).exit_code == 0
    again = runner.invoke(app, ["phantom", "--n", "2", "--shape", "64,64,48", "--out", uri])
    assert again.exit_code == 1 and "already exists and is not empty (pass --overwrite" in again.output
    replaced = runner.invoke(app, ["phantom", "--n", "2", "--shape", "64,64,48", "--out", uri, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert len(read_manifest(Remote(uri))) == 2
    assert len([p for p in stored(uri) if p.startswith("images/")]) == 2  # the third volume's files are gone


def test_generate_writes_straight_to_a_bucket_and_resumes_there(bucket, tiny_generator, ray_session):
    model = bucket("runs/gan")
    for path in sorted(tiny_generator.rglob("*")):
        if path.is_file():
            (Remote(model) / path.relative_to(tiny_generator).as_posix()).write_bytes(path.read_bytes())
    out = bucket("synth")
    summary = generate(GenerateOptions(n=3, model=model, out=out, chunk=1), QUIET, echo=lambda line: None)
    assert summary.made == 3
    rows = read_manifest(Remote(out))
    files = stored(out)
    assert sorted(files) == sorted(["generate.json", "manifest.parquet"]
                                   + [r[c] for r in rows for c in ("image", "mask", "label")])  # fmt: skip
    first = {p: (Remote(out) / p).read_bytes() for p in files if p.startswith("images/")}
    more = generate(GenerateOptions(n=4, model=model, out=out, chunk=1, resume=True), QUIET, echo=lambda line: None)
    assert (more.made, more.skipped) == (1, 3)
    assert sorted(r["synth_index"] for r in read_manifest(Remote(out))) == [0, 1, 2, 3]
    assert all((Remote(out) / p).read_bytes() == data for p, data in first.items())
    assert "***@" in (Remote(out) / "generate.json").read_text()  # the run record keeps no secret


def test_a_node_local_copy_follows_the_stored_content(bucket):
    uri = bucket("bank/nodule_bank.parquet")
    Remote(uri).write_bytes(b"first")
    first = local_copy(uri)
    assert first.read_bytes() == b"first" and local_copy(uri) == first
    Remote(uri).write_bytes(b"second, longer")
    assert local_copy(uri).read_bytes() == b"second, longer"
    with pytest.raises(Exception, match="no such folder"):
        local_copy(bucket("nothing/here"))


def test_a_failed_build_leaves_nothing_and_a_bucket_root_is_refused(bucket):
    import numpy as np

    uri = bucket("half")
    with pytest.raises(RuntimeError), staged_dataset(uri) as stage:
        write_nifti(stage / "images" / "a.nii.gz", np.zeros((2, 2, 2), np.int16), np.eye(4))
        raise RuntimeError("a task failed")
    assert stored(uri) == []
    root = bucket("").split("?")[0].rstrip("/") + "?" + bucket("").split("?", 1)[1]
    with pytest.raises(CtsynthError, match="a whole bucket"):
        staged_dataset(root).__enter__()


def test_audit_never_replaces_a_prefix_that_holds_something_else(bucket):
    uri = bucket("keep")
    Remote(uri).__truediv__("manifest.parquet").write_bytes(b"somebody's dataset")
    done = runner.invoke(app, ["audit", uri, "--real", uri, "--out", uri])
    assert done.exit_code == 1 and "holds no audit.json" in done.output
    assert stored(uri) == ["manifest.parquet"]


def test_synth_labels_and_segment_read_and_write_a_bucket_from_ray_tasks(bucket, gan_data, tmp_path, ray_session):
    from ctsynth_ray.storage import upload

    dataset = gan_data.parent / "ds"
    upload(dataset, Remote(bucket("ds")))
    made = runner.invoke(app, ["synth-labels", "--n", "4", "--size", "32", "--source", bucket("ds"), "--out",
                               bucket("labels"), "--workers", "2"])  # fmt: skip
    assert made.exit_code == 0, made.output
    rows = read_manifest(Remote(bucket("labels")))
    assert sorted(stored(bucket("labels"))) == sorted(
        ["manifest.parquet", *(r[c] for r in rows for c in ("mask", "label"))]
    )
    train = ["train-seg", "--train", f"{dataset}:train", "--val", f"{dataset}:test", "--out", str(tmp_path / "run"),
             "--iterations", "2", "--patch", "32", "--batch", "2", "--features", "4,8,16", "--eval-every", "2",
             "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    assert runner.invoke(app, train).exit_code == 0
    upload(tmp_path / "run", Remote(bucket("seg-run")))
    done = runner.invoke(app, ["segment", bucket("seg-run"), f"{bucket('ds')}:test", "--out", bucket("pred"),
                               "--workers", "2"])  # fmt: skip
    assert done.exit_code == 0, done.output
    test_ids = sorted(r["volume_id"] for r in read_manifest(dataset) if r["split"] == "test")
    assert stored(bucket("pred")) == [f"{v}.nii.gz" for v in test_ids]
    assert "test:test@" not in done.output  # the URI's key is masked in what the command prints


def test_a_versioned_copy_asks_the_store_once_per_process(bucket, monkeypatch):
    from ctsynth_ray import storage

    uri = bucket("versioned/source.bin")
    Remote(uri).write_bytes(b"v1")
    first = local_copy(uri, version="fingerprint-1")
    monkeypatch.setattr(storage, "_copied", lambda where, what: pytest.fail("listed the store again"))
    assert local_copy(uri, version="fingerprint-1") == first  # every later chunk of a run: no request at all
    monkeypatch.undo()
    Remote(uri).write_bytes(b"v2, another version")
    assert local_copy(uri, version="fingerprint-2").read_bytes() == b"v2, another version"
