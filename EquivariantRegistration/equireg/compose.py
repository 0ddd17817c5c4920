"""Registration steps and how they combine (docs/architecture.md).

Contract of every step, written once: ``step(moving, fixed)`` returns a map ``φ`` (see
``maps.py``) with ``moving ∘ φ ≈ fixed``. Images are ``(B, C, *S)`` tensors in network space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .maps import Map, compose, displacement_map, warp


class RegistrationStep(nn.Module):
    """Base class: ``forward(moving, fixed) -> Map`` with ``moving ∘ φ ≈ fixed``."""

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:  # pragma: no cover
        raise NotImplementedError


class DisplacementStep(RegistrationStep):
    """Wraps a network that predicts a displacement field from ``cat(moving, fixed)``.

    The network's output ``(B, d, *S)`` is read as a displacement in network coordinates, so the
    step's map is ``x ↦ x + u(x)``; callers never add the identity themselves.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        return displacement_map(self.net(torch.cat([moving, fixed], dim=1)))


class TwoStep(RegistrationStep):
    """``TwoStep{Φ, Ψ}[A, B] = Φ[A, B] ∘ Ψ[A ∘ Φ[A, B], B]``: Ψ refines what Φ left over."""

    def __init__(self, first: RegistrationStep, second: RegistrationStep):
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        phi = self.first(moving, fixed)
        moved = warp(moving, phi, fixed.shape[2:])
        psi = self.second(moved, fixed)
        return compose(phi, psi)


class Downsample(RegistrationStep):
    """Runs ``step`` on both images average-pooled by ``factor``.

    Network coordinates are resolution-independent (``maps.py``), so the coarse map is used as
    it is at the fine resolution. Spatial sizes must be divisible by ``factor``.
    """

    def __init__(self, step: RegistrationStep, factor: int = 2):
        super().__init__()
        self.step = step
        self.factor = factor

    def _pool(self, image: torch.Tensor) -> torch.Tensor:
        pool = F.avg_pool2d if image.dim() == 4 else F.avg_pool3d
        return pool(image, self.factor)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        return self.step(self._pool(moving), self._pool(fixed))
