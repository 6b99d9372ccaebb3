"""Locations: paths, file:// URIs and object-store URIs, as the CLI and the dataset layer read them."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from ctsynth_ray.dataset import read_nifti, write_nifti
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.segmentation import parse_spec, split_spec
from ctsynth_ray.storage import Remote, location, masked, output_folder


def test_paths_and_file_uris_are_local_paths():
    assert location("data/ds") == Path("data/ds")
    assert location("file:///shared/runs/synth") == Path("/shared/runs/synth")
    assert location("file://localhost/shared/a%20b") == Path("/shared/a b")
    assert isinstance(location("s3://bucket/x"), Remote) and isinstance(location("hdfs://nn:8020/x"), Remote)
    with pytest.raises(CtsynthError, match="names a path on this machine"):
        location("file://otherhost/x")


def test_a_remote_joins_parts_before_its_query_and_masks_credentials():
    root = Remote("s3://KEY:SECRET@bucket/runs/?endpoint_override=127.0.0.1:9000&scheme=http")
    image = root / "synth" / "images/v.nii.gz"
    assert image.uri == "s3://KEY:SECRET@bucket/runs/synth/images/v.nii.gz?endpoint_override=127.0.0.1:9000&scheme=http"
    assert str(image) == "s3://***@bucket/runs/synth/images/v.nii.gz?endpoint_override=127.0.0.1:9000&scheme=http"
    assert image.name == "v.nii.gz" and image.parent == root / "synth/images"
    assert pickle.loads(pickle.dumps(image)) == image  # it travels to Ray workers as strings
    with pytest.raises(TypeError):
        Path(image)  # never mistaken for a local path


def test_specs_keep_a_uris_colons_with_the_dataset():
    assert split_spec("s3://b/real:val") == ("s3://b/real", ["val"])
    assert split_spec("hdfs://namenode:8020/ds:train:n=4") == ("hdfs://namenode:8020/ds", ["train", "n=4"])
    assert parse_spec("ds:test:n=3").split == "test"
    with pytest.raises(ValueError, match="expected DATASET"):
        parse_spec("ds:bogus")
    with pytest.raises(ValueError, match="expected DATASET"):
        parse_spec("s3://b/ds:bogus")


def test_an_unknown_scheme_is_one_line():
    with pytest.raises(CtsynthError, match=r"nosuch://b/x: not a usable filesystem URI"):
        Remote("nosuch://b/x").exists()


def test_nifti_round_trip_through_a_file_uri(tmp_path):
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    write_nifti(f"file://{tmp_path}/v.nii.gz", array, np.eye(4))
    back, _ = read_nifti(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(back, array)


def test_a_local_output_folder_is_the_folder_itself(tmp_path):
    with output_folder(f"file://{tmp_path}/out") as local:
        assert local == tmp_path / "out"


def test_credentials_are_masked_wherever_a_uri_appears():
    assert masked("error at s3://AKIA:SECRET@b/x now") == "error at s3://***@b/x now"
    assert masked("abfs://c@acct.dfs.core.windows.net/x?client_secret=abc&tenant_id=t") == (
        "abfs://***@acct.dfs.core.windows.net/x?client_secret=***&tenant_id=t"
    )
    assert masked("/plain/path:train") == "/plain/path:train"
    with pytest.raises(CtsynthError) as caught:
        Remote("nosuch://KEY:SECRET@b/x").exists()
    assert "SECRET" not in str(caught.value)
