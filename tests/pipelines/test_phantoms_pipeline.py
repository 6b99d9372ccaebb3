import numpy as np

from ctsynth_ray.dataset import read_manifest, read_nifti
from ctsynth_ray.pipelines.phantoms import make_phantom_dataset
from ctsynth_ray.pipelines.runtime import RayOptions

QUIET = RayOptions(progress=False)


def test_worker_count_does_not_change_any_volume(tmp_path, ray_session, small_phantom_config, phantom_dataset):
    """The session's dataset was made in-process; the same seed on 2 Ray workers gives identical files."""
    out = tmp_path / "ray2"
    make_phantom_dataset(out, 6, config=small_phantom_config, seed=7, ray_options=RayOptions(workers=2, progress=False))
    serial, parallel = read_manifest(phantom_dataset), read_manifest(out)
    assert [r["volume_id"] for r in serial] == [r["volume_id"] for r in parallel]
    assert [r["split"] for r in serial] == [r["split"] for r in parallel]
    for a, b in zip(serial, parallel):
        for column in ("image", "mask"):
            np.testing.assert_array_equal(read_nifti(phantom_dataset / a[column])[0], read_nifti(out / b[column])[0])
    assert ray_session.is_initialized()


def test_volume_i_does_not_depend_on_n(tmp_path, small_phantom_config, phantom_dataset):
    out = tmp_path / "two"
    make_phantom_dataset(out, 2, config=small_phantom_config, seed=7, ray_options=QUIET)
    row = read_manifest(out)[1]
    reference = next(r for r in read_manifest(phantom_dataset) if r["volume_id"] == row["volume_id"])
    np.testing.assert_array_equal(
        read_nifti(out / row["image"])[0], read_nifti(phantom_dataset / reference["image"])[0]
    )


def test_manifest_records_the_phantom_provenance(phantom_dataset, small_phantom_config):
    from scipy import ndimage

    from ctsynth_ray.phantom import make_phantom

    rows = read_manifest(phantom_dataset)
    assert [r["phantom_index"] for r in rows] == list(range(6))
    assert all(r["source"] == "phantom" and r["phantom_seed"] == 7 for r in rows)
    for row in rows:
        nodules = make_phantom(7, row["phantom_index"], small_phantom_config).nodules
        assert row["nodule_kinds"] == [f"{n.texture}/{n.shape}/{n.site}" for n in nodules]
        mask = read_nifti(phantom_dataset / row["mask"])[0]
        labelled, count = ndimage.label(mask, np.ones((3, 3, 3)))
        assert count == row["n_nodules"]
        # Every placed nodule is in the mask and no two merge; only a spiculated nodule's cut-off spicule tip
        # can add a component of its own.
        owners = {int(labelled[tuple(round(c) for c in n.center_vox)]) for n in nodules}
        assert 0 not in owners and len(owners) == len(nodules)
        assert count == len(nodules) or any(n.shape == "spiculated" for n in nodules)
