"""Training pairs: procedural base images seen through two random smooth maps and shifts.

Each pair is ``moving = base ∘ ψ_m`` and ``fixed = base ∘ ψ_f`` with independent random
diffeomorphisms and independent translations (up to ``max_shift`` of the field of view), so
the network has to undo large relative shifts as well as local deformation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .synthetic import deform, fundus_photograph, random_diffeomorphism, vessel_tree


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


def _random_view(
    base: torch.Tensor, spec: dict[str, Any], generator: torch.Generator
) -> torch.Tensor:
    shape = tuple(base.shape[2:])
    warp = random_diffeomorphism(shape, spec["warp_magnitude"], spec["warp_smoothness"], generator)
    shift = (torch.rand(len(shape), generator=generator) * 2 - 1) * spec["max_shift"]
    view = deform(base, warp + shift.view(1, -1, *[1] * len(shape)))
    gamma = torch.exp(torch.randn((), generator=generator) * spec.get("gamma_sigma", 0.2))
    view = view.clamp(min=0) ** gamma
    return view + torch.randn(view.shape, generator=generator) * spec.get("noise", 0.01)


def random_pairs(
    pool: torch.Tensor, batch: int, spec: dict[str, Any], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``(moving, fixed)`` views of random pool images, each ``(batch, 1, *S)``."""
    picks = torch.randint(len(pool), (batch,), generator=generator)
    moving = torch.cat([_random_view(pool[i : i + 1], spec, generator) for i in picks])
    fixed = torch.cat([_random_view(pool[i : i + 1], spec, generator) for i in picks])
    return moving, fixed
