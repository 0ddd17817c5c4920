"""Geometry in one place: index ↔ network ↔ physical (LPS, mm) coordinates.

* Index coordinates follow ITK: ``(i, j[, k])`` along x, y[, z], voxel centres at integers.
* Physical coordinates are ITK's LPS millimetres: ``p = origin + direction · (spacing ⊙ index)``.
* Network coordinates (``maps.py``) are in tensor-axis order (z, y, x for 3-D, i.e. NumPy's
  ``GetArrayFromImage`` order) and normalised so that the image's edge-to-edge extent is
  ``[0, 1]``: voxel ``i`` of ``n`` has its centre at ``(i + 0.5) / n``.

Because network coordinates describe the physical extent rather than the voxel count, an image
and its resampling onto a grid of another size with the same extent (``Grid.resized``) share
network coordinates; that is how the network runs at its own resolution.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from .maps import Map


@dataclass(frozen=True)
class Grid:
    """The geometry of an ITK image: ``size``, ``spacing``, ``origin`` in ITK (x, y, z) order."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major d×d, as ITK stores it

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
        return cls(
            tuple(int(s) for s in image.GetSize()),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()),
            tuple(float(v) for v in image.GetDirection()),
        )

    @property
    def dim(self) -> int:
        return len(self.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape in tensor-axis order (reversed ITK size)."""
        return tuple(reversed(self.size))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(self.dim, self.dim)

    def _index_to_physical_matrix(self) -> np.ndarray:
        return self.direction_matrix @ np.diag(self.spacing)

    def index_to_physical(self, index: np.ndarray) -> np.ndarray:
        """``(..., d)`` ITK indices (x, y, z order) -> ``(..., d)`` LPS mm."""
        return np.asarray(index) @ self._index_to_physical_matrix().T + np.asarray(self.origin)

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """``(..., d)`` LPS mm -> ``(..., d)`` continuous ITK indices."""
        inverse = np.linalg.inv(self._index_to_physical_matrix())
        return (np.asarray(points) - np.asarray(self.origin)) @ inverse.T

    def network_to_index(self, coords: np.ndarray) -> np.ndarray:
        """``(..., d)`` network coordinates (tensor order) -> ITK indices (x, y, z order)."""
        return np.asarray(coords)[..., ::-1] * np.asarray(self.size) - 0.5

    def index_to_network(self, index: np.ndarray) -> np.ndarray:
        return ((np.asarray(index) + 0.5) / np.asarray(self.size))[..., ::-1]

    def network_to_physical(self, coords: np.ndarray) -> np.ndarray:
        return self.index_to_physical(self.network_to_index(coords))

    def physical_to_network(self, points: np.ndarray) -> np.ndarray:
        return self.index_to_network(self.physical_to_index(points))

    def resized(self, shape: Sequence[int]) -> Grid:
        """Same edge-to-edge extent and direction, ``shape`` voxels (tensor-axis order)."""
        size = tuple(int(s) for s in reversed(tuple(shape)))
        spacing = tuple(sp * n / m for sp, n, m in zip(self.spacing, self.size, size, strict=True))
        # Keep the outer edge (half a voxel before the first centre) where it was.
        first_centre_index = 0.5 * (np.asarray(spacing) / np.asarray(self.spacing)) - 0.5
        origin = tuple(float(v) for v in self.index_to_physical(first_centre_index))
        return Grid(size, spacing, origin, self.direction)

    def reference_image(self, pixel_id: int = sitk.sitkFloat32) -> sitk.Image:
        """An empty image with this geometry (for resampling onto it)."""
        image = sitk.Image(list(self.size), pixel_id)
        self.stamp(image)
        return image

    def stamp(self, image: sitk.Image) -> sitk.Image:
        """Give ``image`` (whose size must match) this grid's geometry."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def physical_points(self) -> np.ndarray:
        """LPS mm of every voxel centre, ``(*shape, d)`` in tensor-axis order of the array."""
        axes = [np.arange(n, dtype=np.float64) for n in self.size]
        index = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (x, y, z, d)
        index = index.transpose(*reversed(range(self.dim)), self.dim)  # (z, y, x, d)
        return self.index_to_physical(index)


def resample_to_grid(
    image: sitk.Image, grid: Grid, interpolator: int = sitk.sitkLinear, antialias: bool = True
) -> sitk.Image:
    """Resample ``image`` onto ``grid`` (identity transform), smoothing first when shrinking.

    The anti-aliasing Gaussian has, per axis, sigma = half the increase of the voxel size, so
    that a 512² slice resampled to 128² does not alias.
    """
    if antialias and interpolator != sitk.sitkNearestNeighbor:
        source = Grid.of(image)
        source_size = np.asarray(source.spacing) * np.asarray(source.size)
        target_spacing = source_size / np.asarray(grid.size)
        sigma = 0.5 * np.sqrt(np.clip(target_spacing**2 - np.asarray(source.spacing) ** 2, 0, None))
        image = sitk.Cast(image, sitk.sitkFloat32)
        for axis in np.flatnonzero(sigma > 0):  # only the shrinking axes (ITK wants sigma > 0)
            image = sitk.RecursiveGaussian(image, float(sigma[axis]), direction=int(axis))
    return sitk.Resample(
        image, grid.reference_image(), sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32
    )


def network_map_points(
    phi: Map,
    fixed: Grid,
    moving: Grid,
    points: np.ndarray,
    like: torch.Tensor,
    chunk: int = 1 << 20,
) -> np.ndarray:
    """``T(p)`` for ``(..., d)`` fixed LPS mm points: the network map ``phi`` (fixed network
    coordinates -> moving network coordinates of the grids ``fixed`` and ``moving``) in
    physical terms. Returns the moving LPS mm points, float64, same shape. Evaluated in chunks
    of ``chunk`` points (tensors like ``like``) so that a full-resolution CT grid fits."""
    flat = np.asarray(points, dtype=np.float64).reshape(-1, fixed.dim)
    moved = np.empty_like(flat)
    for start in range(0, len(flat), chunk):
        block = flat[start : start + chunk]
        coords = torch.as_tensor(
            np.ascontiguousarray(fixed.physical_to_network(block)),
            dtype=like.dtype,
            device=like.device,
        )
        coords = coords.T.reshape(1, fixed.dim, len(block), *([1] * (fixed.dim - 1)))
        with torch.no_grad():
            mapped = phi(coords).reshape(fixed.dim, len(block)).T.double().cpu().numpy()
        moved[start : start + chunk] = moving.network_to_physical(mapped)
    return moved.reshape(np.shape(points))


def physical_displacement(
    phi: Map, fixed: Grid, moving: Grid, output: Grid, like: torch.Tensor, chunk: int = 1 << 20
) -> np.ndarray:
    """The displacement ``u(x) = T(x) - x`` in LPS mm on ``output``'s voxel centres.

    ``T`` maps fixed physical points to moving physical points through the network map ``phi``
    (``network_map_points``). Returns ``(*output.shape, d)`` float64.
    """
    points = output.physical_points()
    return network_map_points(phi, fixed, moving, points, like, chunk) - points


def physical_bounds(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest LPS mm corner of ``grid``'s edge-to-edge extent (axis-aligned box)."""
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in grid.size])))
    points = grid.index_to_physical(corners)
    return points.min(axis=0), points.max(axis=0)


def network_frames(fixed: Grid, moving: Grid, shape: Sequence[int]) -> tuple[Grid, Grid]:
    """The grids on which the network sees the fixed and the moving image: one physical frame.

    Both have ``shape`` voxels (tensor-axis order), the LPS axes as directions (identity
    cosines) and one isotropic voxel size, the smallest that lets either grid hold its image's
    whole axis-aligned box; each is centred on its own image's box. Axis order, flips,
    obliquity, anisotropy and the field of view of the stored images then no longer look like
    reflections or zooms to the network, and a physical shift of either image is a shift of
    its grid's content in whole millimetres (the [W, U] translation equivariance of the
    network, in mm). Content that does not fill a grid is padded (``resample_isotropic``).
    """
    size = np.asarray(list(reversed(tuple(shape))), dtype=np.float64)
    boxes = [physical_bounds(grid) for grid in (fixed, moving)]
    spacing = max(float(np.max((high - low) / size)) for low, high in boxes)
    frames = []
    for low, high in boxes:
        centre = (low + high) / 2
        origin = centre - spacing * (size - 1) / 2
        frames.append(
            Grid(
                tuple(int(n) for n in size),
                (spacing,) * len(size),
                tuple(float(v) for v in origin),
                tuple(float(v) for v in np.eye(len(size)).flatten()),
            )
        )
    return frames[0], frames[1]


def resample_isotropic(
    image: sitk.Image, grid: Grid, fill: float, interpolator: int = sitk.sitkLinear
) -> sitk.Image:
    """Resample ``image`` onto ``grid`` (isotropic voxels of ``grid.spacing[0]`` mm, any
    direction), padding with ``fill`` (the image's background) and smoothing first along each
    axis whose voxels are finer than the grid's (Gaussian sigma = half the increase)."""
    target = float(max(grid.spacing))
    source = np.asarray(image.GetSpacing(), dtype=np.float64)
    if interpolator != sitk.sitkNearestNeighbor:
        sigma = 0.5 * np.sqrt(np.clip(target**2 - source**2, 0, None))
        image = sitk.Cast(image, sitk.sitkFloat32)
        for axis in np.flatnonzero(sigma > 0):
            image = sitk.RecursiveGaussian(image, float(sigma[axis]), direction=int(axis))
    return sitk.Resample(
        image, grid.reference_image(), sitk.Transform(), interpolator, float(fill), sitk.sitkFloat32
    )
