import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

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
