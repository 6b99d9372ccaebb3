import numpy as np
import pytest
import torch

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.segmentation import (
    UNet,
    dice_ce_loss,
    parse_spec,
    sample_patches,
    select_volumes,
    sliding_window,
)


@pytest.mark.parametrize(
    "kwargs, input_shape, expected",
    [({}, (1, 1, 32, 32, 32), (1, 2, 32, 32, 32)),
     ({"features": (4, 8, 16, 32)}, (2, 1, 16, 24, 32), (2, 2, 16, 24, 32)),
     ({"spatial_dims": 2, "features": (4, 8)}, (3, 1, 20, 20), (3, 2, 20, 20)),
     ({"in_channels": 2, "out_channels": 3, "features": (4, 8, 16)}, (1, 2, 8, 8, 8), (1, 3, 8, 8, 8))],
)  # fmt: skip
def test_unet_shapes(kwargs, input_shape, expected):
    with torch.no_grad():
        assert tuple(UNet(**kwargs)(torch.zeros(input_shape)).shape) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [({"spatial_dims": 1}, "spatial_dims"), ({"features": (8,)}, "at least two"), ({"out_channels": 1}, "out_channels")],
)  # fmt: skip
def test_unet_bad_configurations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(**kwargs)


def test_patch_sampler_balances_nodule_and_background_centres():
    mask = np.zeros((40, 40, 40), np.uint8)
    mask[18:22, 18:22, 18:22] = 1  # 0.1 % of the voxels
    ct = np.random.default_rng(0).random((40, 40, 40), dtype=np.float32)
    _, masks = sample_patches(np.random.default_rng(1), ct, mask, 8, 400)
    centre_is_nodule = masks[:, 4, 4, 4] == 1
    assert 0.42 < centre_is_nodule.mean() < 0.58
    _, none = sample_patches(np.random.default_rng(1), ct, np.zeros_like(mask), 8, 20)
    assert none.sum() == 0


def test_sliding_window_of_an_identity_model_reproduces_its_input():
    volume = np.random.default_rng(0).random((37, 30, 21)).astype(np.float32)
    out = sliding_window(volume, lambda windows: windows.numpy(), patch=16, overlap=0.5)
    assert out.shape == (1, 37, 30, 21)
    np.testing.assert_allclose(out[0], volume, rtol=1e-5, atol=1e-6)
    small = sliding_window(volume[:10], lambda w: w.numpy(), patch=16)  # smaller than a patch: padded
    np.testing.assert_allclose(small[0], volume[:10], rtol=1e-5, atol=1e-6)


def test_dice_ce_loss_is_lower_for_the_right_answer():
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    right = torch.stack([1 - target.float(), target.float()], 1) * 20 - 10
    assert dice_ce_loss(right, target) < 0.01 < dice_ce_loss(-right, target)


def test_specs_and_volume_selection(phantom_dataset):
    spec = parse_spec(f"{phantom_dataset}:train:n=2")
    assert spec.split == "train" and spec.n == 2
    a = select_volumes([spec], seed=0)
    assert len(a) == 2 and a == select_volumes([spec], seed=0)
    assert len(select_volumes([parse_spec(str(phantom_dataset))], 0)) == 6
    with pytest.raises(ValueError, match="expected DATASET"):
        parse_spec("ds:training")
    with pytest.raises(CtsynthError, match="asked for n=50"):
        select_volumes([parse_spec(f"{phantom_dataset}:n=50")], 0)


def test_prefetch_yields_in_order():
    from ctsynth_ray.segmentation import prefetch

    assert list(prefetch(lambda k: k * k, range(7), depth=3)) == [k * k for k in range(7)]
    assert list(prefetch(lambda k: k, [])) == []
