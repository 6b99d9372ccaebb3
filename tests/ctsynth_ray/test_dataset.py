import gzip

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from ctsynth_ray.dataset import (
    REQUIRED_COLUMNS,
    Volume,
    centred_affine,
    measure_nodules,
    read_manifest,
    read_nifti,
    staged_dataset,
    write_manifest,
    write_nifti,
    write_volume,
)
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.storage import Remote


def make_volume(vid="v1", shape=(20, 16, 12), spacing=(0.5, 0.5, 1.0)):
    hu = np.arange(np.prod(shape), dtype=np.int16).reshape(shape) - 1000
    mask = np.zeros(shape, np.uint8)
    mask[5:9, 5:9, 4:8] = 1
    return Volume(vid, hu, mask, centred_affine(shape, spacing))


def test_nifti_round_trip_keeps_dtype_values_and_affine(tmp_path):
    affine = np.array([[-0.7, 0, 0, 120.0], [0, -0.7, 0, 80.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    data = np.random.default_rng(0).integers(-1024, 3000, (7, 6, 5)).astype(np.int16)
    path = tmp_path / "x.nii.gz"
    write_nifti(path, data, affine)
    back, back_affine = read_nifti(path)
    assert back.dtype == np.int16
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(back_affine, affine)
    header = nib.load(path).header
    assert header["sform_code"] == 1 and header["qform_code"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]  # no temp file left


def test_write_nifti_streams_the_same_standard_gzip_for_c_and_fortran_order(tmp_path):
    affine = np.array([[-0.7, 0, 0, 120.0], [0, -0.7, 0, 80.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    data = np.random.default_rng(1).integers(-1024, 3000, (13, 11, 7)).astype(np.int16)
    timings = {}
    write_nifti(tmp_path / "c.nii.gz", data, affine, timings)
    write_nifti(tmp_path / "f.nii.gz", np.asfortranarray(data), affine)
    write_nifti(tmp_path / "plain.nii", data, affine)
    packed = (tmp_path / "c.nii.gz").read_bytes()
    # Neither the memory order nor the file name nor the time reaches the file: the same volume, the same bytes.
    assert packed == (tmp_path / "f.nii.gz").read_bytes()
    assert packed[3] == 0 and packed[4:8] == bytes(4)  # gzip header: no FNAME flag, mtime 0
    image = nib.Nifti1Image.from_bytes(gzip.decompress(packed))  # standard gzip, one member
    assert gzip.decompress(packed) == (tmp_path / "plain.nii").read_bytes()
    assert image.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(image.dataobj), data)
    np.testing.assert_allclose(image.affine, affine, rtol=1e-6)  # the header stores float32
    assert timings["compression"] > 0 and timings["write"] > 0


def test_read_nifti_gives_what_nibabel_loads(tmp_path):
    data = np.random.default_rng(2).integers(-1024, 3000, (9, 8, 5)).astype(np.int16)
    affine = np.array([[0, -0.8, 0, 10.0], [0.6, 0, 0, -4.0], [0, 0, 1.25, 7.0], [0, 0, 0, 1]])
    scaled = nib.Nifti1Image(data, affine)
    scaled.header.set_slope_inter(0.5, -3.0)  # voxels nibabel scales: read through nibabel
    files = {
        "scaled.nii.gz": scaled,
        "big_endian.nii.gz": nib.Nifti1Image(data.astype(">i2"), affine),
        "float.nii.gz": nib.Nifti1Image(data / np.float32(7), affine),
        "plain.nii": nib.Nifti1Image(data.astype(np.uint8), affine),
        "nifti2.nii.gz": nib.Nifti2Image(data, affine),
    }
    for name, image in files.items():
        nib.save(image, tmp_path / name)
        array, back_affine = read_nifti(tmp_path / name)
        expected = nib.load(tmp_path / name)
        np.testing.assert_array_equal(array, np.asarray(expected.dataobj), err_msg=name)
        assert array.dtype == np.asarray(expected.dataobj).dtype, name
        np.testing.assert_array_equal(back_affine, expected.affine, err_msg=name)
    cut = tmp_path / "cut.nii.gz"
    write_nifti(cut, data, affine)
    cut.write_bytes(gzip.compress(gzip.decompress(cut.read_bytes())[:-10]))  # a sound header, voxels missing
    with pytest.raises(CtsynthError, match=r"cut\.nii\.gz: not a readable NIfTI file \(the voxel data ends early\)"):
        read_nifti(cut)


def test_nifti_on_an_object_store_is_the_local_file(tmp_path):
    root = Remote("mock:///ctsynth-test-dataset")
    root.fs.create_dir(root.path)
    data = np.random.default_rng(3).integers(0, 2, (6, 7, 8)).astype(np.uint8)
    write_nifti(root / "m.nii.gz", data, np.eye(4))
    write_nifti(tmp_path / "m.nii.gz", data, np.eye(4))
    assert (root / "m.nii.gz").read_bytes() == (tmp_path / "m.nii.gz").read_bytes()
    array, affine = read_nifti(root / "m.nii.gz")
    np.testing.assert_array_equal(array, data)
    np.testing.assert_array_equal(affine, np.eye(4))


def test_centred_affine_puts_the_grid_centre_at_the_origin():
    affine = centred_affine((11, 21, 5), (0.5, 0.25, 2.0))
    centre = affine @ np.array([5, 10, 2, 1.0])
    np.testing.assert_allclose(centre[:3], 0)


def test_read_nifti_names_the_file_for_damaged_input(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(CtsynthError, match=r"bad\.nii\.gz: not a readable NIfTI"):
        read_nifti(bad)
    with pytest.raises(CtsynthError, match=r"missing\.nii\.gz: file not found"):
        read_nifti(tmp_path / "missing.nii.gz")


def test_manifest_schema_round_trip_with_extra_columns(tmp_path):
    row = write_volume(tmp_path, make_volume(), split="train", source="phantom", hospital="A", score=0.5)
    write_manifest(tmp_path, [row])
    schema = pq.read_schema(tmp_path / "manifest.parquet")
    for name, dtype in REQUIRED_COLUMNS.items():
        assert schema.field(name).type == dtype, name
    (back,) = read_manifest(tmp_path)
    assert back["image"] == "images/v1.nii.gz" and back["mask"] == "masks/v1.nii.gz" and back["label"] is None
    assert back["hospital"] == "A" and back["score"] == 0.5
    assert (back["shape_x"], back["shape_y"], back["shape_z"]) == (20, 16, 12)
    assert (back["spacing_x"], back["spacing_z"]) == (0.5, 1.0)
    assert back["n_nodules"] == 1 and back["nodule_voxels"] == 64
    assert back["nodules"][0]["volume_mm3"] == pytest.approx(64 * 0.25)


def test_manifest_refuses_duplicate_ids_and_missing_columns(tmp_path):
    row = write_volume(tmp_path, make_volume(), split="train", source="phantom")
    with pytest.raises(CtsynthError, match="duplicate volume_id 'v1'"):
        write_manifest(tmp_path, [row, row])
    pq.write_table(_table_without(row, "split"), tmp_path / "manifest.parquet")
    with pytest.raises(CtsynthError, match="missing column\\(s\\) split"):
        read_manifest(tmp_path)


def _table_without(row, column):
    import pyarrow as pa

    return pa.Table.from_pylist([{k: v for k, v in row.items() if k not in (column, "nodules")}])


def test_write_volume_refuses_wrong_dtypes(tmp_path):
    volume = make_volume()
    volume.hu = volume.hu.astype(np.float32)
    with pytest.raises(ValueError, match="image must be int16"):
        write_volume(tmp_path, volume, split="train", source="phantom")


def test_measure_nodules_centroid_in_world_mm_and_equal_volume_diameter():
    shape, spacing = (40, 40, 20), (0.5, 0.5, 1.0)
    affine = centred_affine(shape, spacing)
    mask = np.zeros(shape, np.uint8)
    mask[10:20, 10:20, 5:10] = 1
    (nodule,) = measure_nodules(mask, affine)
    expected = affine @ np.array([14.5, 14.5, 7, 1.0])
    assert (nodule["center_x_mm"], nodule["center_y_mm"], nodule["center_z_mm"]) == pytest.approx(tuple(expected[:3]))
    assert nodule["volume_mm3"] == pytest.approx(500 * 0.25)
    assert nodule["diameter_mm"] == pytest.approx((6 * 125 / np.pi) ** (1 / 3))


def test_staged_dataset_leaves_nothing_on_failure_and_refuses_non_empty_out(tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError), staged_dataset(out) as stage:
        write_volume(stage, make_volume(), split="train", source="phantom")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with staged_dataset(out) as stage:
        write_manifest(stage, [write_volume(stage, make_volume(), split="train", source="phantom")])
    assert sorted(p.name for p in out.iterdir()) == ["images", "manifest.parquet", "masks"]
    with pytest.raises(CtsynthError, match="already exists and is not empty"), staged_dataset(out):
        ...  # never reached: entering refuses
    with staged_dataset(out, overwrite=True) as stage:
        write_manifest(stage, [write_volume(stage, make_volume("v2"), split="test", source="phantom")])
    assert [r["volume_id"] for r in read_manifest(out)] == ["v2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_crop_cube_pads_outside_the_array():
    from ctsynth_ray.dataset import crop_cube

    array = np.arange(27, dtype=np.int16).reshape(3, 3, 3)
    np.testing.assert_array_equal(crop_cube(array, (0, 0, 0), 3, -1), array)
    cube = crop_cube(array, (-1, 1, 2), 3, -1)
    assert cube[0].min() == -1 and cube[1, 0, 0] == array[0, 1, 2] and cube[1, 0, 1] == -1
    assert np.all(crop_cube(array, (5, 5, 5), 2, 7) == 7)
