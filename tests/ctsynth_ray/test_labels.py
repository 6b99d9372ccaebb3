import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from scipy import ndimage

from ctsynth_ray.labels import Tissue, body_mask, encode_labels, hu_to_network, label_map, n_classes, network_to_hu

hu_arrays = arrays(np.int16, (6, 5, 4), elements=st.integers(-1024, 3071))
mask_arrays = arrays(np.uint8, (6, 5, 4), elements=st.integers(0, 1))


@settings(max_examples=200, deadline=None)
@given(hu=hu_arrays, mask=mask_arrays)
def test_classes_follow_the_hu_bins_exactly(hu, mask):
    label = label_map(hu, mask, "thesis")
    h = hu.astype(int)
    expected = np.select([h < -200, h < 0, h == 0, h <= 500], [0, 1, 2, 3], 4)
    expected[mask == 1] = 5
    np.testing.assert_array_equal(label, expected)


@settings(max_examples=50, deadline=None)
@given(hu=hu_arrays, mask=mask_arrays)
def test_body_scheme_only_splits_class_0(hu, mask):
    thesis, body = label_map(hu, mask, "thesis"), label_map(hu, mask, "body")
    same = thesis != Tissue.OTHER
    np.testing.assert_array_equal(body[same], thesis[same])
    assert set(np.unique(body[~same])) <= {Tissue.OTHER, Tissue.OUTSIDE_AIR}


def test_body_mask_keeps_lungs_inside_and_air_outside():
    hu = np.full((40, 40, 3), -1000, np.int16)
    yy, xx = np.mgrid[:40, :40]
    body = (xx - 20) ** 2 + (yy - 20) ** 2 < 15**2
    lung = (xx - 20) ** 2 + (yy - 20) ** 2 < 8**2
    hu[body] = 40
    hu[lung] = -850
    label = label_map(hu, np.zeros(hu.shape, np.uint8), "body")
    assert np.all(label[lung] == Tissue.OTHER) and np.all(label[~body] == Tissue.OUTSIDE_AIR)
    assert body_mask(hu)[body].all()


def reference_body_mask(hu: np.ndarray) -> np.ndarray:
    """The body mask as one whole-volume labelling defines it (what the slab-wise one must equal bit for bit)."""
    labelled, count = ndimage.label(hu > -500)
    if count == 0:
        return np.zeros(hu.shape, bool)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    body = labelled == int(np.argmax(sizes))
    for z in range(body.shape[2]):
        body[:, :, z] = ndimage.binary_fill_holes(body[:, :, z])
    return body


def reference_label_map(hu: np.ndarray, mask: np.ndarray, scheme: str) -> np.ndarray:
    label = np.full(hu.shape, Tissue.BONE, np.uint8)
    label[hu <= 500] = Tissue.SOFT_TISSUE
    label[hu == 0] = Tissue.WATER
    label[hu < 0] = Tissue.FAT
    label[hu < -200] = Tissue.OTHER
    if scheme == "body":
        label[(label == Tissue.OTHER) & ~reference_body_mask(hu)] = Tissue.OUTSIDE_AIR
    label[mask > 0] = Tissue.NODULE
    return label


@settings(max_examples=200, deadline=None)
@given(
    tissue=arrays(bool, array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=9)),
    slab=st.integers(1, 4),
    fortran=st.booleans(),
)
def test_the_slab_wise_body_mask_is_the_whole_volume_one(tissue, slab, fortran):
    """Any slab size (dividing z or not), C or Fortran order: many components, ties, holes, all as one labelling."""
    hu = np.where(tissue, 40, -1000).astype(np.int16)
    hu = np.asfortranarray(hu) if fortran else hu
    np.testing.assert_array_equal(body_mask(hu, slab_slices=slab), reference_body_mask(hu))


def test_a_component_joined_only_in_a_later_slab_is_one_body():
    """A U: two arms, each smaller than a third block, joined only in the last slices; slabs of 2 cut it 4 times."""
    hu = np.full((12, 6, 9), -1000, np.int16)
    hu[1:3, 1:5, 0:9] = 40  # arm 1: 72 voxels
    hu[7:9, 1:5, 0:9] = 40  # arm 2: 72 voxels
    hu[1:9, 1:5, 7:9] = 40  # the bottom of the U, in z 7 and 8 only
    hu[10:12, 0:6, 0:9] = 40  # a block of 108 voxels: larger than either arm, smaller than the U
    body = body_mask(hu, slab_slices=2)
    np.testing.assert_array_equal(body, reference_body_mask(hu))
    assert body[1, 1, 0] and body[7, 1, 0] and not body[10:].any()


def test_of_equally_large_components_the_first_in_c_order_wins_across_slabs():
    """Two equal blocks: one in the first slab, the other in the last but at lower x, so first in C order."""
    hu = np.full((8, 3, 8), -1000, np.int16)
    hu[5:7, 0:2, 0:2] = 40
    hu[0:2, 0:2, 6:8] = 40
    body = body_mask(hu, slab_slices=3)
    np.testing.assert_array_equal(body, reference_body_mask(hu))
    assert body[0, 0, 6] and not body[5, 0, 0]


def test_holes_are_filled_per_slice_but_not_open_bays():
    hu = np.full((30, 20, 5), -1000, np.int16)
    hu[2:28, 2:18] = 40
    hu[5:10, 5:10] = -800  # a hole: filled
    hu[12:16, 5:10, :2] = -800  # a hole in two slices only
    hu[20:24, 0:12] = -800  # a bay reaching the border: not filled
    hu[6:8, 6:8, 3] = 40  # an island inside the hole, not connected to the body in 3D
    body = body_mask(hu, slab_slices=2)
    np.testing.assert_array_equal(body, reference_body_mask(hu))
    assert body[5:10, 5:10].all() and body[12:16, 5:10].all() and not body[20:24, 2:12].any()


@settings(max_examples=100, deadline=None)
@given(
    hu=arrays(np.int16, (7, 6, 5), elements=st.sampled_from([-1000, -600, -300, -200, -1, 0, 1, 500, 501])),
    mask=arrays(np.uint8, (7, 6, 5), elements=st.integers(0, 1)),
    slab=st.integers(1, 6),
)
def test_the_slab_wise_label_map_is_the_whole_volume_one(hu, mask, slab):
    for scheme in ("thesis", "body"):
        label = label_map(np.asfortranarray(hu), np.asfortranarray(mask), scheme, slab_slices=slab)
        np.testing.assert_array_equal(label, reference_label_map(hu, mask, scheme))
        assert label.flags.f_contiguous  # laid out like the NIfTI-ordered HU: written without a copy


def test_encodings():
    label = np.array([[0, 3], [5, 6]], np.uint8)
    np.testing.assert_allclose(encode_labels(label, "body", "scalar")[0], label / 3 - 1)
    onehot = encode_labels(label, "body", "onehot")
    assert onehot.shape == (7, 2, 2) and np.all(onehot.sum(0) == 1) and onehot[5, 1, 0] == 1
    assert n_classes("thesis") == 6
    with pytest.raises(ValueError, match="encoding must be one of"):
        encode_labels(label, "body", "bits")
    with pytest.raises(ValueError, match="scheme must be one of"):
        label_map(np.zeros((2, 2, 2), np.int16), np.zeros((2, 2, 2), np.uint8), "organs")


def test_hu_normalisation_round_trip():
    hu = np.array([-1024, -1000, 0, 40, 1900, 3071], np.int16)
    np.testing.assert_allclose(hu_to_network(hu), hu / 2000)
    np.testing.assert_array_equal(network_to_hu(hu_to_network(hu)), hu)


@pytest.mark.parametrize("scheme, encoding", [("thesis", "scalar"), ("body", "scalar"), ("body", "onehot")])
def test_the_tensor_encoders_give_the_numpy_values_bit_for_bit(scheme, encoding):
    import torch

    from ctsynth_ray.labels import encode_labels, encode_labels_tensor, network_to_hu, network_to_hu_tensor

    labels = np.random.default_rng(0).integers(0, n_classes(scheme), (3, 5, 6)).astype(np.uint8)
    tensor = encode_labels_tensor(torch.from_numpy(labels), scheme, encoding).numpy()
    expected = np.stack([encode_labels(label, scheme, encoding) for label in labels])
    np.testing.assert_array_equal(tensor, expected)
    values = np.random.default_rng(1).normal(0, 1, (4, 7)).astype(np.float32)
    values[0, :3] = [0.00025, -0.00025, 2.0]  # halves round to even; beyond the range clips
    np.testing.assert_array_equal(network_to_hu_tensor(torch.from_numpy(values)).numpy(), network_to_hu(values))
