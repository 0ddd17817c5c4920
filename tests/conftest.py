"""Shared fixtures: small images with non-trivial geometry (oblique, anisotropic, offset)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk


def rotation_matrix(dim: int, angle: float) -> np.ndarray:
    """A rotation by ``angle`` (about z in 3-D, then a small tilt about x)."""
    c, s = math.cos(angle), math.sin(angle)
    if dim == 2:
        return np.array([[c, -s], [s, c]])
    about_z = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    t = 0.3 * angle
    about_x = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    return about_z @ about_x


def oblique_image(values: np.ndarray, angle: float = 0.4) -> sitk.Image:
    """``values`` (tensor-axis order) as an image with oblique direction, anisotropic spacing."""
    dim = values.ndim
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing([0.7, 1.3, 2.1][:dim])
    image.SetOrigin([-12.5, 40.0, 7.25][:dim])
    image.SetDirection(rotation_matrix(dim, angle).flatten().tolist())
    return image


def gaussian_blobs(
    shape: tuple[int, ...],
    seed: int = 0,
    centres: tuple[float, float] = (0.1, 0.9),
    widths: tuple[float, float] = (0.05, 0.15),
) -> np.ndarray:
    """Twelve Gaussian blobs: a smooth random image to register. Centres are drawn uniformly
    in ``centres`` and widths in ``widths``, both as fractions of the field of view."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    image = np.zeros(shape)
    for _ in range(12):
        centre = rng.uniform(*centres, len(shape))
        width = rng.uniform(*widths)
        image += np.exp(
            -sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) / (2 * width**2)
        )
    return (100 * image).astype(np.float32)


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def dim(request: pytest.FixtureRequest) -> int:
    return request.param
