import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import ndimage

from ctsynth_ray.dataset import Volume, centred_affine, crop_cube, load_volume, read_manifest
from ctsynth_ray.gan_data import GanPairs, nodule_crops, pairs_from_crop, parse_dims, write_volume_shards
from ctsynth_ray.labels import Tissue


def test_parse_dims():
    assert parse_dims("2,2.5,3") == ["2d", "2p5d", "3d"]
    with pytest.raises(ValueError, match=r"dims must be from 2, 2\.5, 3"):
        parse_dims("2,4")


def test_pairs_come_from_nodule_slices_and_stacks_are_centred():
    label = np.zeros((8, 8, 6), np.uint8)
    hu = np.arange(8 * 8 * 6, dtype=np.int16).reshape(8, 8, 6)
    label[3:5, 3:5, 2:4] = Tissue.NODULE
    label[:, :, 1] = Tissue.FAT
    pairs = list(pairs_from_crop(label, hu, "2d", 3, Tissue.OTHER))
    assert [z for z, *_ in pairs] == [2, 3]
    _z, stack, target = next(iter(pairs_from_crop(label, hu, "2p5d", 3, Tissue.OTHER)))
    assert stack.shape == (3, 8, 8) and np.all(stack[0] == Tissue.FAT)  # slice z-1 first
    np.testing.assert_array_equal(target, hu[:, :, 2])
    ((z3, crop, _),) = list(pairs_from_crop(label, hu, "3d", 3, Tissue.OTHER))
    assert z3 == -1 and crop.shape == (8, 8, 6)


def test_shards_have_tensor_columns_and_the_loader_encodes(labelled_dataset, tmp_path):
    import json

    row = next(r for r in read_manifest(labelled_dataset) if r["n_nodules"])
    volume = load_volume(labelled_dataset, row)
    counts = write_volume_shards(tmp_path, "train", volume, ["2d", "2p5d", "3d"], 32, 3, int(Tissue.OUTSIDE_AIR),
                                 "per-nodule")  # fmt: skip
    assert counts["3d"] == row["n_nodules"] and counts["2d"] == counts["2p5d"] > 0
    table = pq.read_table(tmp_path / "train" / f"2d-{row['volume_id']}.parquet")
    assert table.column("label").type.shape == [32, 32] and str(table.column("hu").type.value_type) == "int16"
    (tmp_path / "gan_data.json").write_text(json.dumps({"scheme": "body"}))
    pairs = GanPairs(tmp_path, "train", "2p5d", encoding="onehot")
    label, ct = pairs[0]
    assert tuple(label.shape) == (7 * 3, 32, 32) and tuple(ct.shape) == (1, 32, 32)
    assert float(label.sum()) == 3 * 32 * 32  # one-hot: one class per voxel and slice
    assert float(ct.min()) >= -0.52 and float(ct.max()) < 2  # HU / 2000
    scalar, _ = GanPairs(tmp_path, "train", "3d")[0]
    assert tuple(scalar.shape) == (1, 32, 32, 32)


def two_nodule_volume() -> Volume:
    """A 40^3 volume with a large nodule (5^3) and a small one (3^3) far apart, HU = x index."""
    mask = np.zeros((40, 40, 40), np.uint8)
    mask[5:10, 5:10, 5:10] = 1
    mask[30:33, 30:33, 30:33] = 1
    hu = np.broadcast_to(np.arange(40, dtype=np.int16)[:, None, None], mask.shape).copy()
    label = np.where(mask > 0, Tissue.NODULE, Tissue.SOFT_TISSUE).astype(np.uint8)
    return Volume("two", hu, mask, centred_affine(mask.shape, (1, 1, 1)), label)


def test_one_crop_per_volume_centred_on_the_largest_nodule():
    volume = two_nodule_volume()
    ((label, hu),) = nodule_crops(volume, 16, int(Tissue.OUTSIDE_AIR), "one")
    assert hu[8, 8, 8] == 7  # centred on the large nodule (x 5..9)
    assert (label == Tissue.NODULE).sum() == 125
    both = nodule_crops(volume, 16, int(Tissue.OUTSIDE_AIR), "per-nodule")
    assert [int(h[8, 8, 8]) for _, h in both] == [7, 31]  # largest first
    with pytest.raises(ValueError, match="crops must be one of"):
        nodule_crops(volume, 16, 0, "all")


def reference_nodule_crops(volume: Volume, size: int, air_label: int, crops: str):
    """Crops as one whole-volume labelling finds them (what the bounding-box version must equal bit for bit)."""
    labelled, count = ndimage.label(volume.mask > 0, structure=np.ones((3, 3, 3), bool))
    components = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(np.ones(labelled.shape, np.uint8), labelled, components)
    order = components[np.argsort(-sizes, kind="stable")]
    out = []
    for centre in ndimage.center_of_mass(volume.mask > 0, labelled, order[:1] if crops == "one" else order):
        origin = np.rint(centre).astype(int) - size // 2
        out.append((crop_cube(volume.label, origin, size, air_label), crop_cube(volume.hu, origin, size, -1000)))
    return out


@pytest.mark.parametrize("crops", ["one", "per-nodule"])
def test_crops_are_those_of_a_whole_volume_labelling(crops):
    """Nodules at the borders, touching diagonally (one component), of equal size (label order breaks the tie),
    with centroids at .5 (rounded to even) and off the grid, in a volume the crops overhang."""
    rng = np.random.default_rng(3)
    mask = np.zeros((30, 27, 23), np.uint8)
    mask[0:2, 5:7, 3:5] = 1  # 8 voxels at x = 0
    mask[10:12, 20:22, 0:2] = 1  # 8 voxels at z = 0, but later in C order (x first): the tie goes to the one above
    mask[20:23, 3:6, 8:10] = 1
    mask[23, 6, 10] = 1  # diagonal neighbour: the same component, 19 voxels
    mask[28:30, 25:27, 0:3] = 1
    mask[29, 24, 0] = 1  # 13 voxels, centroid off the grid, in the far corner
    hu = rng.integers(-1024, 3071, mask.shape).astype(np.int16)
    volume = Volume("v", np.asfortranarray(hu), np.asfortranarray(mask), centred_affine(mask.shape, (1, 1, 1)),
                    rng.integers(0, 7, mask.shape).astype(np.uint8))  # fmt: skip
    got = nodule_crops(volume, 9, int(Tissue.OUTSIDE_AIR), crops)
    expected = reference_nodule_crops(volume, 9, int(Tissue.OUTSIDE_AIR), crops)
    assert len(got) == len(expected) == (1 if crops == "one" else 4)
    for (label, hu_crop), (label_ref, hu_ref) in zip(got, expected):
        np.testing.assert_array_equal(label, label_ref)
        np.testing.assert_array_equal(hu_crop, hu_ref)
    assert nodule_crops(Volume("none", hu, np.zeros_like(mask), volume.affine, volume.label), 9, 6, crops) == []


def test_slices_are_grouped_by_crop_for_the_interslice_measure(tmp_path):
    import json

    from ctsynth_ray.models.validation import validate

    volume = two_nodule_volume()
    write_volume_shards(tmp_path, "val", volume, ["2d"], 16, 3, int(Tissue.OUTSIDE_AIR), "per-nodule")
    (tmp_path / "gan_data.json").write_text(json.dumps({"scheme": "body"}))
    pairs = GanPairs(tmp_path, "val", "2d")
    assert pairs.crops == [0] * 5 + [1] * 3 and pairs.z == [6, 7, 8, 9, 10, 7, 8, 9]
    # Real slices of one crop are identical along z (HU = x index); slices of the two crops are not (the first
    # crop is padded with air), so pairing z 7 of one crop with z 8 of the other would show a difference.
    metrics = validate(lambda label: torch.zeros(len(label), 1, 16, 16), pairs)
    assert metrics["interslice_real"] == 0.0 and metrics["interslice_generated"] == 0.0
