"""Maps: functions from network coordinates to network coordinates.

Network coordinates (the only coordinates the network sees; ``space.py`` converts to physical):
a tensor ``(B, d, *S)`` whose channel ``k`` is the position along spatial tensor axis ``k``,
normalised so that the image domain is ``[0, 1]`` along every axis and voxel ``i`` of ``n`` has
its centre at ``(i + 0.5) / n`` (``align_corners=False``). With this convention average-pooling
by two keeps every point where it was, so a map computed at a coarse resolution is valid at a
fine one, and an integer shift of ``k`` voxels is a shift of ``k / n``.

A registration step returns a map ``φ`` with ``moving ∘ φ ≈ fixed``: ``φ`` takes coordinates of
the fixed image to coordinates of the moving image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Map = Callable[[torch.Tensor], torch.Tensor]


def identity_grid(
    shape: Sequence[int],
    batch: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Voxel-centre coordinates of a grid of ``shape``: ``(batch, d, *shape)``."""
    axes = [(torch.arange(n, device=device, dtype=dtype) + 0.5) / n for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid.unsqueeze(0).expand(batch, *grid.shape).contiguous()


def padded_identity_grid(
    shape: Sequence[int],
    pad: int,
    batch: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Coordinates of ``shape`` padded by ``pad`` voxels per side, extrapolated linearly."""
    axes = [(torch.arange(-pad, n + pad, device=device, dtype=dtype) + 0.5) / n for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid.unsqueeze(0).expand(batch, *grid.shape).contiguous()


def _to_sampling_grid(coords: torch.Tensor) -> torch.Tensor:
    """``(B, d, *S)`` network coordinates -> ``grid_sample``'s ``(B, *S, d)`` in [-1, 1], xyz."""
    d = coords.shape[1]
    grid = coords.flip(1) * 2 - 1
    return grid.permute(0, *range(2, 2 + d), 1)


def sample(
    image: torch.Tensor,
    coords: torch.Tensor,
    mode: str = "bilinear",
    padding: str = "zeros",
) -> torch.Tensor:
    """Interpolate ``image`` ``(B, C, *S)`` at ``coords`` ``(B, d, *T)``: returns ``(B, C, *T)``.

    ``mode`` is ``bilinear`` (linear in 3-D too) or ``nearest``; ``padding`` is ``zeros`` or
    ``border``.
    """
    if coords.shape[0] != image.shape[0]:
        coords = coords.expand(image.shape[0], *coords.shape[1:])
    grid = _to_sampling_grid(coords).to(image.dtype)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=False)


def displacement_map(displacement: torch.Tensor) -> Map:
    """The map ``x ↦ x + u(x)`` of a displacement field ``u`` ``(B, d, *S)`` sampled on a grid.

    Between voxel centres ``u`` is interpolated linearly; outside the grid it is extended by its
    border value, so the map stays defined (and translation-like) everywhere.
    """

    def phi(coords: torch.Tensor) -> torch.Tensor:
        return coords + sample(displacement, coords, padding="border")

    return phi


def sampled_map(values: torch.Tensor) -> Map:
    """The map whose values ``φ(x)`` at the voxel centres of a grid are ``values`` ``(B,d,*S)``."""
    identity = identity_grid(values.shape[2:], device=values.device, dtype=values.dtype)
    return displacement_map(values - identity)


def compose(outer: Map, inner: Map) -> Map:
    """``outer ∘ inner``: ``x ↦ outer(inner(x))``."""

    def phi(coords: torch.Tensor) -> torch.Tensor:
        return outer(inner(coords))

    return phi


def evaluate(phi: Map, shape: Sequence[int], batch: int, like: torch.Tensor) -> torch.Tensor:
    """``φ`` on the voxel centres of a grid of ``shape``: ``(batch, d, *shape)``."""
    return phi(identity_grid(shape, batch, device=like.device, dtype=like.dtype))


def warp(
    image: torch.Tensor, phi: Map, shape: Sequence[int], mode: str = "bilinear"
) -> torch.Tensor:
    """``image ∘ φ`` on a grid of ``shape`` (the fixed grid): the warped moving image."""
    return sample(image, evaluate(phi, shape, image.shape[0], image), mode=mode)
