"""Training pairs: procedural base images seen through random smooth maps and shifts.

Each pair is ``moving = base ∘ ψ_m`` and ``fixed = moving ∘ ψ`` (sampled from the base in one
interpolation), where ``ψ_m`` and ``ψ`` are independent random diffeomorphisms plus independent
translations of up to ``max_shift`` of the field of view (with, where the config asks, random
rotations and scales: ``random_linear``). The network has to find ``ψ``, the
map from fixed to moving coordinates, which is returned with the pair: unsupervised training
ignores it, the supervised warm-up and the tests use it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from ..maps import identity_grid, sample
from .lung import breathing_map
from .synthetic import deform, fundus_photograph, random_diffeomorphism, vessel_tree


class TrainingBatch(NamedTuple):
    moving: torch.Tensor  # (B, 1, *S)
    fixed: torch.Tensor  # (B, 1, *S)
    true_map: torch.Tensor  # (B, d, *S): fixed grid → moving coordinates, moving ∘ ψ = fixed

    def to(self, device: torch.device) -> TrainingBatch:
        return TrainingBatch(*(tensor.to(device) for tensor in self))


def retina_pool(count: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """``count`` base images ``(count, 1, *shape)``: alternately grey fundus photographs and
    binary-like vessel segmentations (the two kinds of input the retina model must handle)."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        if index % 2 == 0:
            images.append(fundus_photograph(shape, rng))
        else:
            images.append(vessel_tree(shape, rng)[0].astype(np.float32))
    return torch.from_numpy(np.stack(images))[:, None]


def random_linear(dim: int, spec: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """A random rotation times a random per-axis scale ``(d, d)``: rotation angles uniform within
    ``max_rotation`` degrees about each axis, scales within ``1 ± max_scale``. ``random_map``
    draws it only when a config sets either, so older configs keep their data stream."""
    max_rotation = math.radians(spec.get("max_rotation", 0.0))
    max_scale = spec.get("max_scale", 0.0)
    linear = torch.diag(1 + (torch.rand(dim, generator=generator) * 2 - 1) * max_scale)
    planes = [(0, 1)] if dim == 2 else [(0, 1), (0, 2), (1, 2)]
    for first, second in planes:
        angle = float(torch.rand((), generator=generator) * 2 - 1) * max_rotation
        rotation = torch.eye(dim)
        rotation[first, first] = rotation[second, second] = math.cos(angle)
        rotation[first, second], rotation[second, first] = -math.sin(angle), math.sin(angle)
        linear = rotation @ linear
    return linear


def random_map(
    shape: tuple[int, ...], spec: dict[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """A random diffeomorphism, then a random rotation and scale about the centre
    (``random_linear``), then a random shift, as map values ``(1, d, *S)``."""
    dim = len(shape)
    warp = random_diffeomorphism(shape, spec["warp_magnitude"], spec["warp_smoothness"], generator)
    if spec.get("max_rotation", 0) or spec.get("max_scale", 0):
        linear = random_linear(dim, spec, generator)
        warp = torch.einsum("ij,bj...->bi...", linear, warp - 0.5) + 0.5
    shift = (torch.rand(dim, generator=generator) * 2 - 1) * spec["max_shift"]
    return warp + shift.view(1, -1, *[1] * dim)


def _breathing(
    inner: torch.Tensor, spec: dict[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """``B ∘ inner`` for a random breathing map ``B`` (inhale or exhale, random depth)."""
    depth = (torch.rand((), generator=generator) * 2 - 1).item()
    breathing = breathing_map(
        inner.shape[2:], depth * spec["breathing_max"], depth * spec.get("expansion_max", 0.0)
    )
    identity = identity_grid(inner.shape[2:])
    return sample(breathing - identity, inner, padding="border") + inner


def _random_intensity(
    view: torch.Tensor, spec: dict[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Random gamma, contrast and brightness, then noise: the network must not rely on them."""
    gamma = torch.exp(torch.randn((), generator=generator) * spec.get("gamma_sigma", 0.2))
    contrast = 1 + (torch.rand((), generator=generator) - 0.5) * spec.get("contrast_range", 0.0)
    view = view.clamp(min=0) ** gamma * contrast
    return view + torch.randn(view.shape, generator=generator) * spec.get("noise", 0.01)


def random_pairs(
    pool: torch.Tensor, batch: int, spec: dict[str, Any], generator: torch.Generator
) -> TrainingBatch:
    """A batch of ``(moving, fixed, true_map)`` from random pool images."""
    shape = tuple(pool.shape[2:])
    identity = identity_grid(shape)
    picks = torch.randint(len(pool), (batch,), generator=generator)
    moving, fixed, true_maps = [], [], []
    for index in picks:
        base = pool[index : index + 1]
        moving_map = random_map(shape, spec, generator)
        relative = random_map(shape, spec, generator)
        if spec.get("breathing_max", 0) > 0:  # lungs: breathing after the random warp
            relative = _breathing(relative, spec, generator)
        # ψ_m ∘ ψ evaluated on the fixed grid: the fixed view in one interpolation of the base.
        fixed_map = sample(moving_map - identity, relative, padding="border") + relative
        moving.append(_random_intensity(deform(base, moving_map), spec, generator))
        fixed.append(_random_intensity(deform(base, fixed_map), spec, generator))
        true_maps.append(relative)
    return TrainingBatch(torch.cat(moving), torch.cat(fixed), torch.cat(true_maps))
