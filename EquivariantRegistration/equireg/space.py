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

    def contains(self, points: np.ndarray) -> np.ndarray:
        """``(N, d)`` LPS mm -> ``(N,)`` bool: inside the grid's edge-to-edge extent."""
        index = self.physical_to_index(points)
        return np.all((index >= -0.5) & (index <= np.asarray(self.size) - 0.5), axis=-1)

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
        """LPS mm of every voxel centre, ``(*shape, d)`` in tensor-axis order of the array:
        ``origin + Σ_k index_k · column_k`` added axis by axis (``index_to_physical`` of every
        index, without forming the index array)."""
        matrix = self._index_to_physical_matrix()
        points = np.empty((*self.shape, self.dim))
        points[...] = np.asarray(self.origin, dtype=np.float64)
        for k, n in enumerate(self.size):  # ITK axis k is tensor axis dim - 1 - k
            shape = [1] * self.dim
            shape[self.dim - 1 - k] = n
            points += np.arange(n, dtype=np.float64).reshape(*shape, 1) * matrix[:, k]
        return points


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


# --- One-slice 3-D images -------------------------------------------------------------------
# A 3-D image with one voxel along one axis (a slice saved by Slicer, any orientation) is
# registered as a 2-D image in its plane; its outputs are lifted back onto the slice's 3-D
# geometry (docs/errors.md, "One-slice 3-D images").


@dataclass(frozen=True)
class SlicePlane:
    """The plane of a one-slice 3-D grid and its in-plane frame.

    In-plane coordinates ``q`` (2-D, mm) are the 3-D LPS point ``centre + basis @ q``. The
    ``basis`` (3×2, orthonormal) is the two world axes least aligned with the plane's
    ``normal``, projected onto the plane (Gram–Schmidt), and ``centre`` is the plane's point
    nearest the world origin: an axial slice's in-plane coordinates are its x and y, and
    parallel slices (any offset along the normal) share in-plane coordinates.
    """

    grid: Grid  # the 3-D grid, one axis of size 1
    axis: int  # that axis (ITK order)
    normal: np.ndarray  # (3,), sign: its largest component is positive
    basis: np.ndarray  # (3, 2)
    centre: np.ndarray  # (3,)

    @classmethod
    def of(cls, grid: Grid) -> SlicePlane | None:
        """The plane of ``grid`` when it is 3-D with exactly one size-1 axis, else ``None``."""
        if grid.dim != 3 or [s == 1 for s in grid.size].count(True) != 1:
            return None
        axis = grid.size.index(1)
        inplane = [a for a in range(3) if a != axis]
        columns = grid.direction_matrix[:, inplane]
        normal = np.cross(columns[:, 0], columns[:, 1])
        normal /= np.linalg.norm(normal)
        dominant = int(np.argmax(np.abs(normal)))
        normal *= np.sign(normal[dominant])
        basis = []
        for world in (a for a in range(3) if a != dominant):
            vector = np.eye(3)[world] - (np.eye(3)[world] @ normal) * normal
            for previous in basis:
                vector -= (vector @ previous) * previous
            basis.append(vector / np.linalg.norm(vector))
        centre = normal * float(normal @ np.asarray(grid.origin))
        return cls(grid, axis, normal, np.stack(basis, axis=1), centre)

    @property
    def in_plane_axes(self) -> tuple[int, int]:
        first, second = (a for a in range(3) if a != self.axis)
        return first, second

    def in_plane_grid(self) -> Grid:
        """The 2-D grid of the slice in in-plane coordinates (same voxels, same order)."""
        axes = list(self.in_plane_axes)
        direction = self.basis.T @ self.grid.direction_matrix[:, axes]
        origin = self.basis.T @ (np.asarray(self.grid.origin) - self.centre)
        return Grid(
            tuple(self.grid.size[a] for a in axes),
            tuple(self.grid.spacing[a] for a in axes),
            tuple(float(v) for v in origin),
            tuple(float(v) for v in direction.flatten()),
        )

    def lift_grid(self, grid: Grid) -> Grid:
        """A 2-D grid in in-plane coordinates as a one-slice 3-D grid on this plane (the size-1
        axis, its spacing and direction column as in this slice's own grid)."""
        axes = self.in_plane_axes
        direction = self.grid.direction_matrix.copy()
        direction[:, list(axes)] = self.basis @ grid.direction_matrix
        size, spacing = list(self.grid.size), list(self.grid.spacing)
        for source, target in enumerate(axes):
            size[target], spacing[target] = grid.size[source], grid.spacing[source]
        origin = self.centre + self.basis @ np.asarray(grid.origin)
        return Grid(
            tuple(size),
            tuple(spacing),
            tuple(float(v) for v in origin),
            tuple(float(v) for v in direction.flatten()),
        )

    def to_plane(self, image: sitk.Image) -> sitk.Image:
        """The one-slice 3-D ``image`` (on this plane's grid) as a 2-D image in its plane."""
        values = np.squeeze(sitk.GetArrayFromImage(image), axis=2 - self.axis)
        flat = sitk.GetImageFromArray(values, isVector=image.GetNumberOfComponentsPerPixel() > 1)
        return self.in_plane_grid().stamp(flat)

    def lift_image(self, image: sitk.Image) -> sitk.Image:
        """A 2-D image in in-plane coordinates as a one-slice 3-D image on this plane."""
        values = np.expand_dims(sitk.GetArrayFromImage(image), axis=2 - self.axis)
        lifted = sitk.GetImageFromArray(values, isVector=image.GetNumberOfComponentsPerPixel() > 1)
        return self.lift_grid(Grid.of(image)).stamp(lifted)


def _linear_parts(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """``(A, b)`` with ``T(q) = A q + b`` for a linear 2-D transform (from three points)."""
    origin = np.asarray(transform.TransformPoint((0.0, 0.0)))
    columns = [np.asarray(transform.TransformPoint(tuple(e))) - origin for e in np.eye(2)]
    return np.stack(columns, axis=1), origin


def _lifted_field(field: sitk.Image, source: SlicePlane, target: SlicePlane) -> sitk.Image:
    """A 2-D displacement image from ``source``'s to ``target``'s in-plane coordinates as a
    one-slice 3-D displacement image (LPS mm) on ``source``'s plane."""
    grid = Grid.of(field)
    points = grid.physical_points()  # (ny, nx, 2) in-plane points q
    moved = points + sitk.GetArrayFromImage(field)
    lifted = (target.centre + moved @ target.basis.T) - (source.centre + points @ source.basis.T)
    image = sitk.GetImageFromArray(
        np.expand_dims(lifted, axis=2 - source.axis).astype(np.float64), isVector=True
    )
    return source.lift_grid(grid).stamp(image)


def lift_transform(
    transform: sitk.Transform, source: SlicePlane, target: SlicePlane, between: SlicePlane
) -> sitk.Transform:
    """A 2-D transform from ``source``'s in-plane coordinates to ``target``'s as a 3-D transform.

    Points of the source plane go where the 2-D transform sends them, on the target plane; a
    point off the source plane by ``h`` mm goes ``h`` mm off the target plane (linear parts).
    The components of a composite pass through ``between``'s in-plane coordinates. Displacement
    fields become one-slice 3-D fields (their out-of-plane component is the planes' offset);
    linear transforms become 3-D affine transforms.
    """
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        count = composite.GetNumberOfTransforms()
        parts = []
        for k in range(count):  # the last added is applied first
            first, last = k == count - 1, k == 0
            parts.append(
                lift_transform(
                    composite.GetNthTransform(k),
                    source if first else between,
                    target if last else between,
                    between,
                )
            )
        return sitk.CompositeTransform(parts)
    if transform.GetName() == "DisplacementFieldTransform":
        field = sitk.DisplacementFieldTransform(transform).GetDisplacementField()
        return sitk.DisplacementFieldTransform(_lifted_field(field, source, target))
    linear, offset = _linear_parts(transform)
    matrix = target.basis @ linear @ source.basis.T + np.outer(target.normal, source.normal)
    translation = target.centre + target.basis @ offset - matrix @ source.centre
    return sitk.AffineTransform(matrix.flatten().tolist(), translation.tolist())


def lift_displacement(field: sitk.Image, source: SlicePlane, target: SlicePlane) -> sitk.Image:
    """A 2-D displacement image (in-plane mm, ``q ↦ q + u(q)`` from ``source``'s plane to
    ``target``'s) as a one-slice 3-D displacement image in LPS mm on ``source``'s plane."""
    return _lifted_field(field, source, target)


def restrict_transform(
    transform: sitk.Transform, source: SlicePlane, target: SlicePlane, grid: Grid
) -> sitk.Transform:
    """A 3-D transform (``source``'s plane to ``target``'s) as a 2-D displacement-field
    transform between their in-plane coordinates, sampled on the 2-D ``grid`` (the inverse of
    ``lift_transform`` where the 3-D transform maps the plane into the target plane)."""
    points = grid.physical_points()
    flat = points.reshape(-1, 2)
    world = source.centre + flat @ source.basis.T
    moved = np.array([transform.TransformPoint(tuple(p)) for p in world])
    in_plane = (moved - target.centre) @ target.basis
    field = sitk.GetImageFromArray((in_plane - flat).reshape(points.shape), isVector=True)
    return sitk.DisplacementFieldTransform(grid.stamp(field))


def points_to_plane(points: np.ndarray, plane: SlicePlane) -> np.ndarray:
    """``(N, 3)`` LPS mm on (or near) ``plane`` -> ``(N, 2)`` in-plane coordinates."""
    return (np.asarray(points, dtype=np.float64) - plane.centre) @ plane.basis
