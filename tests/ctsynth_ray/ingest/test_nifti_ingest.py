import nibabel as nib
import numpy as np
import pytest

from ctsynth_ray.dataset import read_manifest, read_nifti
from ctsynth_ray.pipelines.ingest import ingest
from ctsynth_ray.pipelines.runtime import RayOptions

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


def test_image_without_mask_is_a_clear_failure(test_data, tmp_path):
    report = ingest("nifti", test_data / "ct", tmp_path / "ds", ray_options=QUIET)
    (failure,) = report.failed
    assert failure["case"] == "chest_cta_crop" and failure["reason"].startswith("no mask")


def test_mismatched_mask_grid_is_a_clear_failure(chest_pair, tmp_path):
    src, image, _ = chest_pair
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), image.affine), src / "chest_mask.nii.gz")
    report = ingest("nifti", src, tmp_path / "ds", ray_options=QUIET)
    (failure,) = report.failed
    assert "does not match the image grid" in failure["reason"]
    assert not list((tmp_path / "ds").rglob("*.nii.gz"))
