"""Resumable runs: which outputs a run may take, continue or replace."""

import json

import pytest

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.progress import PROGRESS, begin_run, read_records, write_record

SETTINGS = {"source": "/data/lidc", "spacing_mm": [0.5, 0.5, 1.0]}


def test_a_new_run_takes_an_empty_folder_and_records_its_settings(tmp_path):
    begin_run(tmp_path / "out", "run.json", SETTINGS, resume=False, overwrite=False)
    assert json.loads((tmp_path / "out" / "run.json").read_text()) == SETTINGS


def test_resume_starts_a_run_in_an_empty_folder_and_continues_only_the_same_run(tmp_path):
    out = tmp_path / "out"
    begin_run(out, "run.json", SETTINGS, resume=True, overwrite=False)  # nothing there yet: a first run
    write_record(out, "case-1", {"row": 1})
    begin_run(out, "run.json", SETTINGS, resume=True, overwrite=False)
    assert (out / PROGRESS / "case-1.json").is_file()
    with pytest.raises(CtsynthError, match=r"\(spacing_mm differ\): --resume continues the same run only"):
        begin_run(out, "run.json", {**SETTINGS, "spacing_mm": [1, 1, 1]}, resume=True, overwrite=False)
    (out / "run.json").unlink()
    with pytest.raises(CtsynthError, match="nothing to resume"):
        begin_run(out, "run.json", SETTINGS, resume=True, overwrite=False)


def test_overwrite_replaces_an_earlier_output_only(tmp_path):
    out = tmp_path / "out"
    begin_run(out, "run.json", SETTINGS, resume=False, overwrite=False)
    (out / "images").mkdir()
    (out / "images" / "a.nii.gz").write_bytes(b"old")
    (out / "manifest.parquet").write_bytes(b"old")
    with pytest.raises(CtsynthError, match=r"already exists and is not empty \(pass --resume"):
        begin_run(out, "run.json", SETTINGS, resume=False, overwrite=False)
    with pytest.raises(CtsynthError, match="pass one of them"):
        begin_run(out, "run.json", SETTINGS, resume=True, overwrite=True)
    begin_run(out, "run.json", SETTINGS, resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]
    foreign = tmp_path / "home"
    (foreign / "notes").mkdir(parents=True)
    with pytest.raises(CtsynthError, match=r"not an earlier output of this command .* refusing to delete it"):
        begin_run(foreign, "run.json", SETTINGS, resume=False, overwrite=True)
    assert (foreign / "notes").is_dir()


def test_records_count_only_when_their_files_are_there(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.nii.gz").write_bytes(b"x")
    write_record(tmp_path, "a", {"image": "images/a.nii.gz"})
    write_record(tmp_path, "b", {"image": "images/b.nii.gz"})
    assert read_records(tmp_path, lambda _, record, stored: record["image"] in stored) == {
        "a": {"image": "images/a.nii.gz"}
    }
