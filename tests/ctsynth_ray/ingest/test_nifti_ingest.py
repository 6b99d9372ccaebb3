import shutil

import nibabel as nib
import numpy as np
import pytest

from ctsynth_ray.dataset import read_manifest, read_nifti
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.pipelines.ingest import ingest
from ctsynth_ray.pipelines.runtime import RayOptions
from ctsynth_ray.resample import clean_hu, resample_hu, resample_linear

QUIET = RayOptions(progress=False)


@pytest.fixture
def chest_pair(test_data, tmp_path):
    """The real chest CT crop with a sphere 'nodule' mask beside it (X.nii.gz + X_mask.nii.gz)."""
    image = nib.load(test_data / "ct" / "chest_cta_crop.nii.gz")
    src = tmp_path / "src"
    src.mkdir()
    nib.save(image, src / "chest.nii.gz")
    grid = np.indices(image.shape)
    centre = np.array([60, 63, 82])
    sphere = (((grid - centre[:, None, None, None]) ** 2).sum(0) <= 16).astype(np.uint8)
    nib.save(nib.Nifti1Image(sphere, image.affine), src / "chest_mask.nii.gz")
    return src, image, centre


def test_nifti_pair_is_reoriented_resampled_and_cleaned(chest_pair, tmp_path):
    src, image, centre = chest_pair
    report = ingest("nifti", src, tmp_path / "ds", ray_options=QUIET)
    assert report.ok, report.failed
    (row,) = read_manifest(tmp_path / "ds")
    hu, affine = read_nifti(tmp_path / "ds" / row["image"])
    mask, _ = read_nifti(tmp_path / "ds" / row["mask"])
    assert row["source"] == "nifti" and row["source_spacing_x"] == pytest.approx(1.5)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), (0.48828125, 0.48828125, 1.0))
    assert hu.dtype == np.int16 and hu.min() >= -1024 and hu.max() <= 1900  # 3343 HU of the source became 50
    # The sphere's centre stays where it was in world (RAS) coordinates.
    world_before = (
        nib.as_closest_canonical(image).affine
        @ np.r_[np.linalg.solve(nib.as_closest_canonical(image).affine, image.affine @ np.r_[centre, 1])[:3], 1]
    )
    centroid = np.array([row["nodules"][0][f"center_{a}_mm"] for a in "xyz"])
    np.testing.assert_allclose(centroid, world_before[:3], atol=1.0)
    assert row["nodules"][0]["volume_mm3"] == pytest.approx(mask.sum() * 0.48828125**2, rel=1e-6)


def test_image_without_mask_is_a_clear_failure(chest_pair, test_data, tmp_path):
    src, _, _ = chest_pair
    shutil.copy(test_data / "ct" / "chest_cta_crop.nii.gz", src / "alone.nii.gz")
    report = ingest("nifti", src, tmp_path / "ds", ray_options=QUIET)
    (failure,) = report.failed
    assert failure["case"] == "alone" and failure["reason"].startswith("no mask") and len(report.ingested) == 1
    # Nothing but an image without its mask: nothing to ingest, one line naming the first problem, nothing written.
    with pytest.raises(
        CtsynthError, match=r"nothing to ingest \(1 problem\(s\); the first: .*chest_cta_crop.nii.gz: no mask"
    ):
        ingest("nifti", test_data / "ct", tmp_path / "none", ray_options=QUIET)
    assert not (tmp_path / "none").exists()


def test_mismatched_mask_grid_is_a_clear_failure(chest_pair, tmp_path):
    src, image, _ = chest_pair
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), image.affine), src / "chest_mask.nii.gz")
    report = ingest("nifti", src, tmp_path / "ds", ray_options=QUIET)
    (failure,) = report.failed
    assert "does not match the image grid" in failure["reason"]
    assert not list((tmp_path / "ds").rglob("*.nii.gz"))


@pytest.mark.parametrize(
    "shape, spacing_mm, new_spacing_mm",
    [
        ((37, 29, 13), (0.703125, 0.703125, 2.5), (0.48828125, 0.48828125, 1.0)),  # LIDC: finer on every axis
        ((41, 23, 31), (0.4, 0.9, 0.8), (0.48828125, 0.48828125, 1.0)),  # coarser in x and z, finer in y
        ((17, 19, 11), (0.48828125, 0.7, 1.0), (0.48828125, 0.48828125, 1.0)),  # x and z keep their grid
        ((9, 8, 7), (0.5, 0.5, 1.0), (0.5, 0.5, 1.0)),  # nothing to resample: clean only
    ],
)
def test_resample_hu_is_resample_linear_then_clean_hu_bit_for_bit(shape, spacing_mm, new_spacing_mm):
    hu = np.random.default_rng(7).uniform(-2600, 3200, shape).astype(np.float32)  # padding, tissue, metal
    for source in (hu, np.asfortranarray(hu), np.rint(hu).astype(np.int16)):
        before = source.copy()
        out = resample_hu(source, spacing_mm, new_spacing_mm)
        expected = clean_hu(resample_linear(source, spacing_mm, new_spacing_mm))
        assert out.dtype == np.int16 and out.flags.f_contiguous
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(source, before)  # cleaned plane by plane, never in the caller's array


def test_clean_hu_rules_round_half_to_even():
    hu = np.array([0.5, 1.5, 2.5, -0.5, -1024.5, -1024.0, 1900.0, 1900.4, 3000.0])
    padding = np.array([False] * 8 + [True])
    np.testing.assert_array_equal(clean_hu(hu), [0, 2, 2, 0, -1000, -1024, 1900, 50, 50])
    np.testing.assert_array_equal(clean_hu(hu, padding), [0, 2, 2, 0, -1000, -1024, 1900, 50, -1000])
    assert clean_hu(hu).dtype == np.int16
