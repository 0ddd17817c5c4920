"""A U-Net that predicts a displacement field from ``cat(moving, fixed)``.

It is translation-equivariant for shifts that are multiples of ``2 ** levels`` voxels (the
pooling grid), which is the ``[U, U]`` equivariance the refinement steps need.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .featurizer import conv_class


class ConvBlock(nn.Sequential):
    """Two 3-wide convolutions with leaky ReLUs: the unit of every U-Net level."""

    def __init__(self, dim: int, in_channels: int, out_channels: int):
        conv = conv_class(dim)
        super().__init__(
            conv(in_channels, out_channels, 3, padding=1),
            nn.LeakyReLU(0.2),
            conv(out_channels, out_channels, 3, padding=1),
            nn.LeakyReLU(0.2),
        )


class UNet(nn.Module):
    """``(B, in_channels, *S) -> (B, out_channels, *S)``; sizes must be divisible by
    ``2 ** levels`` with ``levels = len(channels) - 1``.

    ``channels[k]`` is the width at level ``k`` (resolution ``2 ** -k``); ``out_channels``
    defaults to ``dim``, a displacement. The output convolution starts at zero, so an untrained
    network predicts no displacement and a :class:`~equireg.compose.DisplacementStep` around it
    starts as the identity map.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int = 2,
        out_channels: int | None = None,
        channels: Sequence[int] = (16, 32, 64, 128),
    ):
        super().__init__()
        if len(channels) < 1:
            raise ValueError("a U-Net needs at least one level of channels")
        self.dim = dim
        self.levels = len(channels) - 1
        widths = list(channels)
        self.encoders = nn.ModuleList(
            ConvBlock(dim, fan_in, fan_out)
            for fan_in, fan_out in zip([in_channels, *widths[:-1]], widths, strict=True)
        )
        self.decoders = nn.ModuleList(
            ConvBlock(dim, widths[k] + widths[k + 1], widths[k]) for k in range(self.levels)
        )
        self.output = conv_class(dim)(widths[0], out_channels or dim, 3, padding=1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.dim == 2 else F.avg_pool3d(x, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = 2**self.levels
        if any(n % stride for n in x.shape[2:]):
            raise ValueError(
                f"U-Net input sizes {tuple(x.shape[2:])} must be divisible by {stride}"
            )
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level:
                skips.append(x)
                x = self._pool(x)
            x = encoder(x)
        for level in reversed(range(self.levels)):
            upsampled = F.interpolate(x, scale_factor=2, mode="nearest")
            x = self.decoders[level](torch.cat([upsampled, skips[level]], dim=1))
        return self.output(x)
