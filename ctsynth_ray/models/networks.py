"""GAN networks whose 2D / 3D form is a parameter (``spatial_dims``), after the CycleGAN / pix2pix reference.

- :class:`ResnetGenerator`: 7x7 conv, two stride-2 convs, residual blocks, two transposed convs, 7x7 conv +
  tanh; reflection padding and instance norm (the thesis: widths 32-64-128, 6 blocks).
- :class:`UnetGenerator`: pix2pix's U-Net (4x4 stride-2 convs, skip connections, element-wise dropout in the
  inner decoder levels; batch norm by default, as the reference's pix2pix).
- :class:`PatchDiscriminator`: the 70x70 PatchGAN (3 stride-2 layers of 4x4 convs in 2D), no sigmoid (the loss
  takes logits: least squares, or BCE with logits).
- :func:`init_weights`: normal(0, 0.02) as in the reference.

Normalisation is ``"instance"`` (no affine parameters, no running statistics: the reference's instance norm) or
``"batch"`` (affine, running statistics). As in the reference, convolutions followed by batch norm have no bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _check(spatial_dims: int, in_channels: int, out_channels: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")


def conv(spatial_dims: int):
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def conv_transpose(spatial_dims: int):
    return nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d


def instance_norm(spatial_dims: int):
    return nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d


NORMS = ("instance", "batch")


def norm_layer(spatial_dims: int, norm: str):
    """The reference's two normalisations: ``instance`` (affine=False) or ``batch`` (affine, running stats)."""
    if norm == "instance":
        return instance_norm(spatial_dims)
    if norm == "batch":
        return nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def reflection_pad(spatial_dims: int):
    return nn.ReflectionPad2d if spatial_dims == 2 else nn.ReflectionPad3d


class ResidualBlock(nn.Module):
    def __init__(self, spatial_dims: int, channels: int, norm: str = "instance"):
        super().__init__()
        Conv, Norm, Pad = conv(spatial_dims), norm_layer(spatial_dims, norm), reflection_pad(spatial_dims)
        bias = norm == "instance"
        self.body = nn.Sequential(
            Pad(1), Conv(channels, channels, 3, bias=bias), Norm(channels), nn.ReLU(True),
            Pad(1), Conv(channels, channels, 3, bias=bias), Norm(channels),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's ResNet generator. Input (N, in_channels, *spatial) with spatial sizes divisible by 4."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, widths: Sequence[int] = (32, 64, 128),
                 n_blocks: int = 6, norm: str = "instance"):  # fmt: skip
        super().__init__()
        _check(spatial_dims, in_channels, out_channels)
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive channel counts, got {tuple(widths)}")
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        Conv, ConvT = conv(spatial_dims), conv_transpose(spatial_dims)
        Norm, Pad = norm_layer(spatial_dims, norm), reflection_pad(spatial_dims)
        bias = norm == "instance"
        w0, w1, w2 = widths
        layers = [Pad(3), Conv(in_channels, w0, 7, bias=bias), Norm(w0), nn.ReLU(True)]
        layers += [Conv(w0, w1, 3, stride=2, padding=1, bias=bias), Norm(w1), nn.ReLU(True)]
        layers += [Conv(w1, w2, 3, stride=2, padding=1, bias=bias), Norm(w2), nn.ReLU(True)]
        layers += [ResidualBlock(spatial_dims, w2, norm) for _ in range(n_blocks)]
        layers += [ConvT(w2, w1, 3, stride=2, padding=1, output_padding=1, bias=bias), Norm(w1), nn.ReLU(True)]
        layers += [ConvT(w1, w0, 3, stride=2, padding=1, output_padding=1, bias=bias), Norm(w0), nn.ReLU(True)]
        layers += [Pad(3), Conv(w0, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _UnetLevel(nn.Module):
    """One level of the U-Net: down, the inner levels, up, concatenated with the input (skip)."""

    def __init__(self, spatial_dims: int, outer: int, inner: int, submodule: nn.Module | None, *, norm: str,
                 in_channels=None, outermost=False, use_dropout=False):  # fmt: skip
        super().__init__()
        Conv, ConvT, Norm = conv(spatial_dims), conv_transpose(spatial_dims), norm_layer(spatial_dims, norm)
        bias = norm == "instance"  # a bias before batch norm is redundant (the reference drops it)
        in_channels = in_channels or outer
        self.outermost = outermost
        down = [Conv(in_channels, inner, 4, stride=2, padding=1, bias=bias)]
        if outermost:
            up = [nn.ReLU(True), ConvT(inner * 2, outer, 4, stride=2, padding=1), nn.Tanh()]
            model = [*down, submodule, *up]
        elif submodule is None:  # innermost
            up = [nn.ReLU(True), ConvT(inner, outer, 4, stride=2, padding=1, bias=bias), Norm(outer)]
            model = [nn.LeakyReLU(0.2, True), *down, *up]
        else:
            up = [nn.ReLU(True), ConvT(inner * 2, outer, 4, stride=2, padding=1, bias=bias), Norm(outer)]
            if use_dropout:
                up.append(nn.Dropout(0.5))  # element-wise, as the reference
            model = [nn.LeakyReLU(0.2, True), *down, Norm(inner), submodule, *up]
        self.model = nn.Sequential(*model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """pix2pix's U-Net generator: ``n_down`` stride-2 levels (input sizes divisible by 2**n_down); widths
    double from ``width`` up to ``8 * width``; dropout in the inner levels that stay at ``8 * width``;
    ``norm`` batch (the reference's pix2pix) or instance."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, width: int = 64, n_down: int = 7,
                 use_dropout: bool = True, norm: str = "batch"):  # fmt: skip
        super().__init__()
        _check(spatial_dims, in_channels, out_channels)
        if n_down < 2:
            raise ValueError(f"n_down must be at least 2, got {n_down}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        norm_layer(spatial_dims, norm)  # a ValueError for an unknown norm
        widths = [min(width * 2**k, width * 8) for k in range(n_down)]
        block = _UnetLevel(spatial_dims, widths[-2], widths[-1], None, norm=norm)
        for k in range(n_down - 2, 0, -1):
            dropout_here = use_dropout and widths[k - 1] == width * 8  # the reference's 8w -> 8w levels
            block = _UnetLevel(spatial_dims, widths[k - 1], widths[k], block, norm=norm, use_dropout=dropout_here)
        self.model = _UnetLevel(spatial_dims, out_channels, width, block, norm=norm, in_channels=in_channels,
                                outermost=True)  # fmt: skip
        self.n_down = n_down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN: a map of real / fake scores, each over a 70x70 patch in 2D with the default 3 layers."""

    def __init__(self, spatial_dims: int, in_channels: int, width: int = 64, n_layers: int = 3,
                 norm: str = "instance"):  # fmt: skip
        super().__init__()
        _check(spatial_dims, in_channels, 1)
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        Conv, Norm = conv(spatial_dims), norm_layer(spatial_dims, norm)
        bias = norm == "instance"
        layers = [Conv(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        channels = width
        for k in range(1, n_layers + 1):
            nxt = width * min(2**k, 8)
            stride = 2 if k < n_layers else 1
            layers += [Conv(channels, nxt, 4, stride=stride, padding=1, bias=bias), Norm(nxt), nn.LeakyReLU(0.2, True)]
            channels = nxt
        layers += [Conv(channels, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def init_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """The reference initialisation: conv weights ~ normal(0, std), biases 0; norm weights ~ normal(1, std)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif (
            isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm2d, nn.BatchNorm3d))
            and m.weight is not None
        ):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)
    return module
