import pytest
import torch
from torch import nn

from ctsynth_ray.models.networks import PatchDiscriminator, ResnetGenerator, UnetGenerator

SHAPE_CASES = [
    # (network, kwargs, input shape, expected output shape)
    (ResnetGenerator, {"spatial_dims": 2, "in_channels": 1, "out_channels": 1}, (2, 1, 64, 64), (2, 1, 64, 64)),
    (ResnetGenerator, {"spatial_dims": 2, "in_channels": 3, "out_channels": 1, "widths": (8, 16, 32), "n_blocks": 2},
     (1, 3, 32, 32), (1, 1, 32, 32)),
    (ResnetGenerator, {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "widths": (4, 8, 16), "n_blocks": 1},
     (1, 1, 16, 16, 16), (1, 1, 16, 16, 16)),
    (UnetGenerator, {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "width": 8, "n_down": 7},
     (2, 1, 128, 128), (2, 1, 128, 128)),
    (UnetGenerator, {"spatial_dims": 2, "in_channels": 7, "out_channels": 1, "width": 8, "n_down": 5},
     (1, 7, 32, 32), (1, 1, 32, 32)),
    (UnetGenerator, {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "width": 4, "n_down": 4},
     (1, 1, 16, 16, 16), (1, 1, 16, 16, 16)),
    (PatchDiscriminator, {"spatial_dims": 2, "in_channels": 2}, (1, 2, 128, 128), (1, 1, 14, 14)),
    (PatchDiscriminator, {"spatial_dims": 3, "in_channels": 1, "width": 4}, (1, 1, 32, 32, 32), (1, 1, 2, 2, 2)),
]  # fmt: skip


@pytest.mark.parametrize("network, kwargs, input_shape, expected", SHAPE_CASES)
def test_output_shapes(network, kwargs, input_shape, expected):
    with torch.no_grad():
        out = network(**kwargs)(torch.randn(input_shape))
    assert tuple(out.shape) == expected
    if network is not PatchDiscriminator:
        assert out.abs().max() <= 1  # tanh


BAD_CASES = [
    (ResnetGenerator, {"spatial_dims": 4, "in_channels": 1, "out_channels": 1}, "spatial_dims must be 2 or 3"),
    (ResnetGenerator, {"spatial_dims": 2, "in_channels": 0, "out_channels": 1}, "must be positive"),
    (ResnetGenerator, {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "widths": (8, 16)}, "three positive"),
    (ResnetGenerator, {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "n_blocks": -1}, "n_blocks"),
    (UnetGenerator, {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "n_down": 1}, "n_down"),
    (PatchDiscriminator, {"spatial_dims": 2, "in_channels": 1, "n_layers": 0}, "n_layers"),
    (UnetGenerator, {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "norm": "group"}, "norm must be one of"),
    (PatchDiscriminator, {"spatial_dims": 2, "in_channels": 1, "norm": "layer"}, "norm must be one of"),
]


@pytest.mark.parametrize("network, kwargs, message", BAD_CASES)
def test_bad_configurations_raise(network, kwargs, message):
    with pytest.raises(ValueError, match=message):
        network(**kwargs)


def test_unet_generator_is_the_reference_pix2pix_unet():
    """Batch norm, no conv bias before a norm, element-wise dropout (not channel-wise) in the two 8w -> 8w levels."""
    net = UnetGenerator(2, 1, 1, width=8, n_down=7)
    modules = list(net.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in modules)
    assert not any(isinstance(m, (nn.InstanceNorm2d, nn.Dropout2d)) for m in modules)
    assert sum(type(m) is nn.Dropout for m in modules) == 2
    convs = [m for m in modules if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert sum(c.bias is not None for c in convs) == 1  # only the outermost up-convolution, which feeds tanh


def test_dropout_is_off_in_eval_mode_and_on_in_train_mode():
    torch.manual_seed(0)
    net = UnetGenerator(2, 1, 1, width=4, n_down=6)  # one dropout level
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        net.train()
        assert not torch.equal(net(x), net(x))  # dropout draws differ
        net.eval()
        torch.testing.assert_close(net(x), net(x), rtol=0, atol=0)


def test_cyclegan_networks_keep_instance_norm_by_default():
    for net in (ResnetGenerator(2, 1, 1, widths=(4, 8, 16), n_blocks=1), PatchDiscriminator(2, 1, width=4)):
        modules = list(net.modules())
        assert any(isinstance(m, nn.InstanceNorm2d) for m in modules)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in modules)
