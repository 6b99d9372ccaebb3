"""Small DICOM series written with pydicom, each with exactly the property under test."""

import numpy as np
import pydicom
import pytest

from ctsynth_ray.dataset import Volume, centred_affine, read_manifest, read_nifti
from ctsynth_ray.ingest.export import export_lidc_case, write_dicom_series
from ctsynth_ray.phantom import PhantomConfig, make_phantom
from ctsynth_ray.pipelines.ingest import ingest
from ctsynth_ray.pipelines.runtime import RayOptions

QUIET = RayOptions(progress=False)

SPACING = (0.48828125, 0.48828125, 1.0)  # the target grid, so no resampling blurs the comparison


def ramp_volume(vid="P1", shape=(24, 20, 6)):
    hu = (np.arange(np.prod(shape)).reshape(shape) % 1500 - 1000).astype(np.int16)
    return Volume(vid, hu, np.zeros(shape, np.uint8), centred_affine(shape, SPACING))


def ingest_one(src, out):
    report = ingest("lidc", src, out, ray_options=QUIET)
    return report, (read_manifest(out) if (out / "manifest.parquet").exists() else [])


@pytest.mark.parametrize("slope, intercept", [(1.0, -1024.0), (2.0, -2048.0), (0.5, -1000.0)])
def test_rescale_slope_and_intercept(tmp_path, slope, intercept):
    volume = ramp_volume()
    write_dicom_series(volume, tmp_path / "src", patient_id="P1", rescale_slope=slope, rescale_intercept=intercept)
    _report, (row,) = ingest_one(tmp_path / "src", tmp_path / "ds")
    hu, _ = read_nifti(tmp_path / "ds" / row["image"])
    tolerance = max(slope / 2, 0.5)  # stored values are integers: HU is exact to half a step
    np.testing.assert_allclose(hu, volume.hu, atol=tolerance)


def test_padding_value_becomes_air(tmp_path):
    volume = ramp_volume()
    padding = np.zeros(volume.hu.shape, bool)
    padding[:4] = True
    write_dicom_series(volume, tmp_path / "src", patient_id="P1", padding_value=-2000, padding_mask=padding)
    _, (row,) = ingest_one(tmp_path / "src", tmp_path / "ds")
    hu, _ = read_nifti(tmp_path / "ds" / row["image"])
    assert np.all(hu[:4] == -1000)
    np.testing.assert_array_equal(hu[4:], volume.hu[4:])


def test_values_over_1900_become_soft_tissue(tmp_path):
    volume = ramp_volume()
    volume.hu[0, 0, :] = 3000
    write_dicom_series(volume, tmp_path / "src", patient_id="P1")
    _, (row,) = ingest_one(tmp_path / "src", tmp_path / "ds")
    hu, _ = read_nifti(tmp_path / "ds" / row["image"])
    assert np.all(hu[0, 0, :] == 50)


def test_reversed_slice_order_gives_the_same_volume(tmp_path):
    volume = ramp_volume()
    write_dicom_series(volume, tmp_path / "a", patient_id="P1")
    write_dicom_series(volume, tmp_path / "b", patient_id="P1")
    files = sorted((tmp_path / "b").glob("*.dcm"))
    for k, path in enumerate(files):  # file names and instance numbers in reverse order of position
        path.rename(path.with_name(f"x-{len(files) - k:03d}.dcm"))
    _, (a,) = ingest_one(tmp_path / "a", tmp_path / "da")
    _, (b,) = ingest_one(tmp_path / "b", tmp_path / "db")
    np.testing.assert_array_equal(
        read_nifti(tmp_path / "da" / a["image"])[0], read_nifti(tmp_path / "db" / b["image"])[0]
    )


def test_missing_slice_is_refused_and_writes_nothing(tmp_path):
    write_dicom_series(ramp_volume(), tmp_path / "src", patient_id="P1")
    (tmp_path / "src" / "1-003.dcm").unlink()
    report, rows = ingest_one(tmp_path / "src", tmp_path / "ds")
    (failure,) = report.failed
    assert failure["case"] == "P1" and "missing slice" in failure["reason"] and failure["file"].endswith("1-004.dcm")
    assert rows == [] and not list((tmp_path / "ds").rglob("*.nii.gz"))


def test_truncated_slice_is_refused_naming_the_file(tmp_path):
    write_dicom_series(ramp_volume(), tmp_path / "src", patient_id="P1")
    victim = tmp_path / "src" / "1-002.dcm"
    victim.write_bytes(victim.read_bytes()[:-300])
    report, rows = ingest_one(tmp_path / "src", tmp_path / "ds")
    (failure,) = report.failed
    assert failure["file"].endswith("1-002.dcm") and rows == []
    assert not list((tmp_path / "ds").rglob("*.nii.gz"))


def test_missing_rescale_tags_are_refused(tmp_path):
    write_dicom_series(ramp_volume(), tmp_path / "src", patient_id="P1")
    path = tmp_path / "src" / "1-001.dcm"
    ds = pydicom.dcmread(path)
    del ds.RescaleIntercept
    ds.save_as(path)
    report, _ = ingest_one(tmp_path / "src", tmp_path / "ds")
    (failure,) = report.failed
    assert failure["reason"] == "missing RescaleIntercept" and failure["file"].endswith("1-001.dcm")


def test_a_folder_mixing_two_series_gives_two_volumes(tmp_path):
    a, b = ramp_volume(), ramp_volume()
    b.hu = (b.hu + 7).astype(np.int16)
    write_dicom_series(a, tmp_path / "mixed", patient_id="P1", series_uid="1.2.3.1")
    for path in (tmp_path / "mixed").glob("*.dcm"):
        path.rename(path.with_name("a" + path.name))
    write_dicom_series(b, tmp_path / "mixed", patient_id="P1", series_uid="1.2.3.2")
    report, rows = ingest_one(tmp_path / "mixed", tmp_path / "ds")
    assert report.ok and sorted(r["volume_id"] for r in rows) == ["P1_1", "P1_2"]
    by_id = {r["volume_id"]: r for r in rows}
    np.testing.assert_array_equal(read_nifti(tmp_path / "ds" / by_id["P1_1"]["image"])[0], a.hu)
    np.testing.assert_array_equal(read_nifti(tmp_path / "ds" / by_id["P1_2"]["image"])[0], b.hu)
    # One patient, one split: by volume id these two would fall in val and train.
    ingest("lidc", tmp_path / "mixed", tmp_path / "split", split_fractions=(0.34, 0.33, 0.33), ray_options=QUIET)
    assert [r["split"] for r in read_manifest(tmp_path / "split")] == ["test", "test"]


def test_one_bad_case_does_not_stop_the_others(tmp_path):
    write_dicom_series(ramp_volume("GOOD"), tmp_path / "src" / "good", patient_id="GOOD")
    write_dicom_series(ramp_volume("BAD"), tmp_path / "src" / "bad", patient_id="BAD")
    (tmp_path / "src" / "bad" / "1-003.dcm").unlink()
    report, rows = ingest_one(tmp_path / "src", tmp_path / "ds")
    assert [r["volume_id"] for r in rows] == ["GOOD"] and [f["case"] for f in report.failed] == ["BAD"]
    assert sorted(p.name for p in (tmp_path / "ds").rglob("*.nii.gz")) == ["GOOD.nii.gz", "GOOD.nii.gz"]
    assert "BAD" in (tmp_path / "ds" / "ingest_report.json").read_text()


@pytest.mark.parametrize("min_readers, kept", [(3, True), (4, True), (5, False)])
def test_phantom_round_trip_through_dicom_and_reader_xml(tmp_path, min_readers, kept):
    from ctsynth_ray.dataset import measure_nodules

    # The first small phantom of seed 0 with nodules: all 4 exported readers mark each of them.
    phantom = next(p for p in (make_phantom(0, i, PhantomConfig(shape=(128, 96, 64))) for i in range(10))
                   if p.volume.mask.any())  # fmt: skip
    expected = len(measure_nodules(phantom.volume.mask, phantom.volume.affine)) if kept else 0
    assert not kept or expected >= 1
    export_lidc_case(phantom.volume, tmp_path / "src")
    report = ingest("lidc", tmp_path / "src", tmp_path / "ds", min_readers=min_readers, ray_options=QUIET)
    assert report.ok
    (row,) = read_manifest(tmp_path / "ds")
    mask, affine = read_nifti(tmp_path / "ds" / row["mask"])
    hu, _ = read_nifti(tmp_path / "ds" / row["image"])
    np.testing.assert_array_equal(hu, phantom.volume.hu)
    np.testing.assert_allclose(affine, phantom.volume.affine, atol=1e-6)
    assert row["n_nodules"] == expected
    if expected:
        truth = phantom.volume.mask > 0
        dice = 2 * (truth & (mask > 0)).sum() / (truth.sum() + (mask > 0).sum())
        assert dice > 0.9
