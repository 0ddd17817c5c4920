"""Lung CT training data: procedural chest phantoms, packaged chest CTs, synthetic breathing.

Phantoms (body, fat, lungs with a domed diaphragm, heart, spine, ribs, airway and vessel trees,
in Hounsfield units) keep the model from memorising the one or two real chest CTs that ship in
PyPI packages. Arrays are ``(z, y, x)`` with ``z`` from inferior to superior, as NumPy sees an
axial CT whose slices go up the body.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..maps import identity_grid
from ..preprocess import normalise_intensity
from .synthetic import draw_segment, smooth_noise

LABELS = {"body": 1, "right_lung": 2, "left_lung": 3, "airways": 4, "vessels": 5, "bone": 6}
LUNG_WINDOW = {"kind": "window", "low": -1000, "high": 0}


def _tree(
    canvas: np.ndarray,
    start: np.ndarray,
    direction: np.ndarray,
    length: float,
    radius: float,
    depth: int,
    rng: np.random.Generator,
    inside: np.ndarray | None = None,
) -> None:
    """A 3-D branching tree of capsules; branches leaving ``inside`` (a mask) stop there."""
    branches = [(start, direction / np.linalg.norm(direction), length, radius, 0)]
    while branches:
        start, direction, length, radius, level = branches.pop()
        end = start + direction * length
        index = tuple(np.clip(end.astype(int), 0, np.array(canvas.shape) - 1))
        if inside is not None and level > 0 and not inside[index]:
            continue
        draw_segment(canvas, start, end, radius)
        if level < depth:
            for _ in range(2):
                turn = rng.normal(0, 0.6, 3)
                child = direction + turn - (turn @ direction) * direction
                child /= np.linalg.norm(child)
                branches.append((end, child, length * 0.75, max(radius * 0.75, 0.4), level + 1))


def chest_phantom(shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random chest CT phantom ``(z, y, x)`` in HU and its label map (``LABELS``)."""
    depth, height, width = shape
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    wobble = smooth_noise(tuple(shape), 2, 6.0, generator)[0].numpy()
    centre_y, centre_x = height * rng.uniform(0.47, 0.53), width * rng.uniform(0.47, 0.53)
    body_y, body_x = height * rng.uniform(0.28, 0.36), width * rng.uniform(0.40, 0.47)
    body_r = np.hypot((y - centre_y) / body_y, (x - centre_x) / body_x) + 0.04 * wobble[0]
    hu = np.full(shape, -1000.0)
    labels = np.zeros(shape, np.uint8)
    hu[body_r < 1] = -100  # subcutaneous fat
    hu[body_r < 0.92] = 40  # soft tissue
    labels[body_r < 1] = LABELS["body"]
    diaphragm = depth * rng.uniform(0.25, 0.4)
    apex = depth * rng.uniform(0.85, 0.95)
    lungs = np.zeros(shape, bool)
    hila = []
    for side, name in ((-1, "right_lung"), (1, "left_lung")):
        lung_x = centre_x + side * body_x * rng.uniform(0.42, 0.5)
        lung_y = centre_y + body_y * rng.uniform(-0.1, 0.05)
        semi_x, semi_y = body_x * rng.uniform(0.3, 0.38), body_y * rng.uniform(0.6, 0.72)
        radial = np.hypot((x - lung_x) / semi_x, (y - lung_y) / semi_y) + 0.08 * wobble[1]
        dome = diaphragm + 0.15 * depth * np.clip(1 - radial**2, 0, 1)  # the diaphragm's dome
        taper = np.clip((apex - z) / (0.35 * depth), 0, 1) ** 0.5  # narrower towards the apex
        lung = (radial < taper) & (z > dome) & (z < apex)
        lungs |= lung
        labels[lung] = LABELS[name]
        hila.append(np.array([(diaphragm + apex) / 2, lung_y, lung_x - side * semi_x * 0.5]))
    texture = smooth_noise(tuple(shape), 1, 3.0, generator)[0, 0].numpy()
    hu[lungs] = -860 + 40 * texture[lungs]
    heart = (
        ((z - diaphragm - 0.12 * depth) / (0.15 * depth)) ** 2
        + ((y - centre_y - 0.25 * body_y) / (0.45 * body_y)) ** 2
        + ((x - centre_x - 0.12 * body_x) / (0.3 * body_x)) ** 2
    ) < 1
    hu[heart] = 40
    labels[heart] = LABELS["body"]
    lungs &= ~heart
    vessels = np.zeros(shape)
    airways = np.zeros(shape)
    scale = min(height, width) / 128
    carina = np.array([apex - 0.25 * depth, centre_y, centre_x])
    draw_segment(airways, np.array([depth - 1.0, centre_y, centre_x]), carina, 3.0 * scale)
    for hilum in hila:
        towards = hilum - carina
        _tree(airways, carina, towards, np.linalg.norm(towards), 2.2 * scale, 4, rng, lungs)
        for _ in range(3):
            _tree(vessels, hilum, rng.normal(0, 1, 3), 12 * scale, 1.5 * scale, 4, rng, lungs)
    hu[vessels > 0.5] = 40
    labels[(vessels > 0.5) & lungs] = LABELS["vessels"]
    hu[airways > 0.5] = -1000
    labels[airways > 0.5] = LABELS["airways"]
    spine = np.hypot(
        (y - centre_y + 0.8 * body_y) / (0.14 * body_y), (x - centre_x) / (0.1 * body_x)
    )
    bone = spine < 1
    ring = np.abs(body_r - 0.85) < 0.035
    rib_phase = np.sin(2 * math.pi * (z / (depth / rng.uniform(9, 12)) + 0.15 * wobble[0]))
    bone |= ring & (rib_phase > 0.55) & (np.abs(x - centre_x) > 0.15 * body_x)
    hu[bone] = 700
    labels[bone] = LABELS["bone"]
    hu += rng.normal(0, 15, shape) * (labels > 0)
    return hu.astype(np.float32), labels


def breathing_map(shape: Sequence[int], amplitude: float, expansion: float) -> torch.Tensor:
    """Map values ``(1, 3, *shape)`` (network units) of synthetic breathing, fixed → moving.

    Superior–inferior motion of ``amplitude`` (network units along axis 0) at and below the
    diaphragm, fading to nothing at the apex, and an antero-posterior expansion of ``expansion``
    (relative) that also grows towards the diaphragm.
    """
    grid = identity_grid(shape)
    height = grid[:, 0:1]
    # 1 below ~0.35 of the height (diaphragm and abdomen), 0 at the top, smooth in between.
    ramp = torch.clamp((0.95 - height) / 0.6, 0, 1) ** 2
    displacement = torch.zeros_like(grid)
    displacement[:, 0:1] = amplitude * ramp
    displacement[:, 1:2] = expansion * (grid[:, 1:2] - 0.5) * ramp
    return grid + displacement


def read_ct(path: Path, shape: Sequence[int]) -> torch.Tensor:
    """A CT file resampled over its whole extent onto ``shape`` and put in the lung window.

    SimpleITK is imported here, not with the module: phantom-only training (``generic3d``)
    runs where only torch and NumPy are installed."""
    import SimpleITK as sitk

    from ..space import Grid, resample_to_grid

    image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(resample_to_grid(image, Grid.of(image).resized(shape)))
    return torch.from_numpy(normalise_intensity(values, LUNG_WINDOW))[None]


def lung_pool(
    count: int, shape: Sequence[int], seed: int, ct_paths: Sequence[Path] = ()
) -> torch.Tensor:
    """``count`` phantoms and the given CTs, lung-windowed to ``[0, 1]``: ``(N, 1, *shape)``."""
    rng = np.random.default_rng(seed)
    images = [
        torch.from_numpy(normalise_intensity(chest_phantom(shape, rng)[0], LUNG_WINDOW))[None]
        for _ in range(count)
    ]
    images += [read_ct(path, shape) for path in ct_paths]
    return torch.stack(images).float()
