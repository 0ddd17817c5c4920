"""A translation-equivariant featurizer: features that move exactly with the image.

Every layer has stride 1 and keeps the spatial size, and the normalisation works on each voxel's
channel vector alone, so shifting the input by any integer number of voxels shifts the features
by the same amount (up to the zero padding at the borders). The receptive field still grows fast
because the residual blocks use increasing dilations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_class(dim: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    """``nn.Conv2d`` or ``nn.Conv3d`` for a ``dim``-dimensional image."""
    if dim not in (2, 3):
        raise ValueError(f"images must be 2-D or 3-D, got dim={dim}")
    return nn.Conv2d if dim == 2 else nn.Conv3d


class ChannelNorm(nn.Module):
    """Layer normalisation over the channels of each voxel separately.

    Instance or batch normalisation would mix statistics over space, so content entering or
    leaving the image would change the features everywhere; this one cannot.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        variance = x.var(dim=1, unbiased=False, keepdim=True)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        normalised = (x - mean) * torch.rsqrt(variance + self.eps)
        return normalised * self.weight.view(shape) + self.bias.view(shape)


class DilatedResidualBlock(nn.Module):
    """``x + conv(act(norm(conv(act(norm(x))))))`` with dilated 3-wide kernels."""

    def __init__(self, dim: int, channels: int, dilation: int):
        super().__init__()
        conv = conv_class(dim)
        self.body = nn.Sequential(
            ChannelNorm(channels),
            nn.GELU(),
            conv(channels, channels, 3, padding=dilation, dilation=dilation),
            ChannelNorm(channels),
            nn.GELU(),
            conv(channels, channels, 3, padding=dilation, dilation=dilation),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Featurizer(nn.Module):
    """``(B, in_channels, *S) -> (B, out_channels, *S)``, translation-equivariant.

    ``dilations`` lists one residual block each; ``(1, 2, 4, 8, 1)`` sees 67 voxels across with
    eleven 3-wide convolutions.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int = 1,
        width: int = 32,
        dilations: Sequence[int] = (1, 2, 4, 8, 1),
        out_channels: int = 64,
    ):
        super().__init__()
        conv = conv_class(dim)
        self.stem = conv(in_channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*(DilatedResidualBlock(dim, width, d) for d in dilations))
        self.head = nn.Sequential(ChannelNorm(width), nn.GELU(), conv(width, out_channels, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(image)))
