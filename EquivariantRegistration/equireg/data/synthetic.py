"""Procedural images and random smooth deformations, deterministic for a given seed.

Used for the demo's sample pair, the tests and (later) training data. Arrays follow the
tensor-axis order of ``maps.py``; deformations are maps in network coordinates.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..maps import identity_grid, sample


def smooth_noise(
    shape: tuple[int, ...], channels: int, scale: float, generator: torch.Generator
) -> torch.Tensor:
    """Gaussian-smoothed white noise ``(1, channels, *shape)``, unit maximum amplitude."""
    noise = torch.randn(1, channels, *shape, generator=generator)
    spectrum = torch.fft.fftn(noise, dim=tuple(range(2, 2 + len(shape))))
    frequencies = torch.meshgrid(*[torch.fft.fftfreq(n) * n for n in shape], indexing="ij")
    radius2 = sum(f**2 for f in frequencies)
    spectrum = spectrum * torch.exp(
        -0.5 * radius2 * (scale / max(shape)) ** 2 * (2 * math.pi) ** 2 / 4
    )
    field = torch.fft.ifftn(spectrum, dim=tuple(range(2, 2 + len(shape)))).real
    return field / field.abs().amax().clamp_min(1e-12)


def random_diffeomorphism(
    shape: tuple[int, ...],
    magnitude: float,
    smoothness: float,
    generator: torch.Generator,
    squarings: int = 6,
) -> torch.Tensor:
    """A random smooth invertible map sampled on ``shape``: ``(1, d, *shape)``.

    A stationary velocity field (smooth noise of peak ``magnitude`` in network units, features
    of about ``smoothness`` voxels) is integrated by scaling and squaring, which keeps the map
    diffeomorphic.
    """
    velocity = smooth_noise(shape, len(shape), max(shape) / smoothness, generator) * magnitude
    displacement = velocity / 2**squarings
    for _ in range(squarings):
        displacement = displacement + sample(
            displacement, identity_grid(shape) + displacement, padding="border"
        )
    return identity_grid(shape) + displacement


def translation(shape: tuple[int, ...], shift: tuple[float, ...]) -> torch.Tensor:
    """The map ``x ↦ x + shift`` (network units) sampled on ``shape``."""
    offset = torch.tensor(shift, dtype=torch.float32).view(1, -1, *[1] * len(shape))
    return identity_grid(shape) + offset


def deform(image: torch.Tensor, map_values: torch.Tensor) -> torch.Tensor:
    """``image ∘ φ`` with ``φ`` given by its values on the output grid."""
    return sample(image, map_values, padding="border")


def draw_segment(canvas: np.ndarray, start: np.ndarray, end: np.ndarray, radius: float) -> None:
    """Paint an anti-aliased capsule of ``radius`` voxels into ``canvas`` (2-D or 3-D, maximum
    blending); ``start`` and ``end`` are positions in voxel indices."""
    low = np.maximum(np.floor(np.minimum(start, end) - radius - 1), 0).astype(int)
    high = np.minimum(np.ceil(np.maximum(start, end) + radius + 2), canvas.shape).astype(int)
    if np.any(high <= low):
        return
    axes = np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high, strict=True)], indexing="ij")
    points = np.stack(axes, -1).astype(np.float64)
    direction = end - start
    t = np.clip(((points - start) @ direction) / max(direction @ direction, 1e-12), 0, 1)
    distance = np.linalg.norm(points - (start + t[..., None] * direction), axis=-1)
    window = canvas[tuple(slice(a, b) for a, b in zip(low, high, strict=True))]
    np.maximum(window, np.clip(radius + 0.5 - distance, 0, 1), out=window)


def vessel_tree(
    shape: tuple[int, int], rng: np.random.Generator, depth: int = 6
) -> tuple[np.ndarray, np.ndarray]:
    """A branching, gently curving vessel tree as a soft mask in [0, 1] (like DRIVE's masks).

    Returns the mask and the root (optic disc) position in pixels.
    """
    height, width = shape
    vessels = np.zeros(shape)
    disc = np.array([height * rng.uniform(0.4, 0.6), width * rng.uniform(0.25, 0.4)])
    branches = [
        (disc, angle, 0.2 * max(shape), 0.009 * max(shape) + 0.6, 0)
        for angle in rng.uniform(0, 2 * math.pi, size=4)
    ]
    while branches:
        start, angle, length, radius, level = branches.pop()
        for _ in range(4):  # a branch is a few short segments with a wandering direction
            angle += rng.normal(0, 0.15)
            end = start + length / 4 * np.array([math.sin(angle), math.cos(angle)])
            draw_segment(vessels, start, end, radius)
            start = end
        if level < depth:
            for turn in (-1, 1):
                branches.append(
                    (
                        start,
                        angle + turn * rng.uniform(0.3, 0.8),
                        length * rng.uniform(0.6, 0.8),
                        max(radius * 0.72, 0.5),
                        level + 1,
                    )
                )
    return vessels, disc


def fundus_photograph(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A grey fundus-like photograph: bright optic disc, dark vessels, vignetting, noise."""
    vessels, disc = vessel_tree(shape, rng)
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    centre = np.array(shape) / 2
    radius = np.hypot(rows - centre[0], cols - centre[1]) / (0.5 * min(shape))
    background = 0.55 * np.clip(1.15 - radius**2 * 0.6, 0, 1) * (radius < 0.98)
    optic_disc = 0.4 * np.exp(
        -((rows - disc[0]) ** 2 + (cols - disc[1]) ** 2) / (2 * (0.05 * min(shape)) ** 2)
    )
    image = background + optic_disc - 0.35 * vessels * (radius < 0.98)
    image += rng.normal(0, 0.01, size=shape)
    return np.clip(image, 0, 1).astype(np.float32)
