import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctsynth_ray.dataset import read_manifest, read_nifti, write_nifti
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.inspection import inspect_dataset
from ctsynth_ray.preview import write_preview


def test_clean_dataset_summary(phantom_dataset):
    summary = inspect_dataset(phantom_dataset)
    assert summary.ok, summary.problems
    assert summary.n_volumes == 6 and sum(summary.per_split.values()) == 6
    assert summary.per_source == {"phantom": 6}
    assert summary.hu_min >= -1024 and summary.hu_max > 500
    assert summary.hu_percentiles[1] < -900 < summary.hu_percentiles[50] < summary.hu_percentiles[99]
    text = summary.format()
    assert "6 volume(s)" in text and "nodules per volume" in text and "0.488281 x 0.488281 x 1" in text


def rewrite(root, column, func):
    table = pq.read_table(root / "manifest.parquet")
    values = func(table.column(column).to_pylist())
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(values)),
                   root / "manifest.parquet")  # fmt: skip


def first(root):
    return read_manifest(root)[0]


def break_missing(root):
    (root / first(root)["image"]).unlink()
    return "file not found"


def break_grid(root):
    row = first(root)
    mask, affine = read_nifti(root / row["mask"])
    write_nifti(root / row["mask"], mask[:-1], affine)
    return "does not match the mask grid"


def break_affine(root):
    row = first(root)
    mask, affine = read_nifti(root / row["mask"])
    affine[0, 3] += 5.0
    write_nifti(root / row["mask"], mask, affine)
    return "does not match the mask grid"


def break_dtype(root):
    row = first(root)
    hu, affine = read_nifti(root / row["image"])
    write_nifti(root / row["image"], hu.astype(np.float32), affine)
    return "is float32, expected int16"


def break_mask_values(root):
    row = first(root)
    mask, affine = read_nifti(root / row["mask"])
    mask[0, 0, 0] = 2
    write_nifti(root / row["mask"], mask, affine)
    return "outside {0, 1}"


def break_duplicate(root):
    rewrite(root, "volume_id", lambda ids: [ids[1]] + ids[1:])
    return "duplicate volume_id"


@pytest.mark.parametrize(
    "breaker", [break_missing, break_grid, break_affine, break_dtype, break_mask_values, break_duplicate]
)
def test_each_broken_dataset_case_is_named(copy_dataset, breaker):
    root = copy_dataset()
    vid = first(root)["volume_id"] if breaker is not break_duplicate else read_manifest(root)[1]["volume_id"]
    expected = breaker(root)
    summary = inspect_dataset(root)
    assert not summary.ok
    assert any(p.startswith(f"{vid}: ") and expected in p for p in summary.problems), summary.problems


def test_missing_manifest_is_an_error(tmp_path):
    with pytest.raises(CtsynthError, match="no manifest"):
        inspect_dataset(tmp_path)


def test_preview_is_a_png_with_the_montage(phantom_dataset, tmp_path):
    png = write_preview(phantom_dataset, tmp_path / "p.png", max_volumes=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
