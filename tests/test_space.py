"""Geometry round trips: index ↔ network ↔ physical on oblique, anisotropic, offset grids."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from conftest import oblique_image

from equireg.maps import identity_grid, sampled_map
from equireg.space import Grid, physical_displacement, resample_to_grid


def _grid(dim: int) -> tuple[sitk.Image, Grid]:
    shape = (9, 12, 15)[:dim]
    image = oblique_image(np.zeros(shape))
    return image, Grid.of(image)


def test_index_to_physical_matches_simpleitk(dim: int) -> None:
    image, grid = _grid(dim)
    rng = np.random.default_rng(0)
    for index in rng.uniform(-2, 10, size=(5, dim)):
        expected = image.TransformContinuousIndexToPhysicalPoint(index.tolist())
        np.testing.assert_allclose(grid.index_to_physical(index), expected, atol=1e-9)


def test_physical_points_are_every_voxel_centre(dim: int) -> None:
    """``physical_points`` (built axis by axis) is SimpleITK's centre of each voxel, in tensor
    order, on an oblique, anisotropic, offset grid."""
    image, grid = _grid(dim)
    points = grid.physical_points()
    assert points.shape == (*grid.shape, dim)
    for index in np.ndindex(*grid.size):
        expected = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(points[index[::-1]], expected, atol=1e-9)


def test_network_physical_round_trip(dim: int) -> None:
    _, grid = _grid(dim)
    coords = np.random.default_rng(1).uniform(-0.2, 1.2, size=(100, dim))
    np.testing.assert_allclose(
        grid.physical_to_network(grid.network_to_physical(coords)), coords, atol=1e-12
    )


def test_network_coordinates_follow_tensor_axes(dim: int) -> None:
    """Channel k of a network coordinate is tensor axis k (z, y, x); voxel i of n is at (i+.5)/n."""
    image, grid = _grid(dim)
    index_xyz = np.array([1, 2, 3][:dim])
    coords = grid.index_to_network(index_xyz)
    expected = (index_xyz + 0.5) / np.array(grid.size)
    np.testing.assert_allclose(coords, expected[::-1])
    # identity_grid's voxel at array index (reversed ITK index) holds the same coordinates
    values = identity_grid(grid.shape, dtype=torch.float64)[0]
    np.testing.assert_allclose(values[(slice(None), *index_xyz[::-1])].numpy(), coords, atol=1e-12)


def test_resized_grid_keeps_extent_and_network_coordinates(dim: int) -> None:
    _, grid = _grid(dim)
    coarse = grid.resized((4, 5, 6)[:dim])
    assert coarse.shape == (4, 5, 6)[:dim]
    assert coarse.direction == grid.direction
    # the outer corner (network 0 and 1) is the same physical point in both grids
    for corner in (np.zeros(dim), np.ones(dim)):
        np.testing.assert_allclose(
            coarse.network_to_physical(corner), grid.network_to_physical(corner), atol=1e-9
        )
    point = grid.network_to_physical(np.array([0.3, 0.6, 0.85][:dim]))
    np.testing.assert_allclose(
        coarse.physical_to_network(point), grid.physical_to_network(point), atol=1e-12
    )


def test_resample_to_grid_samples_a_linear_ramp_exactly(dim: int) -> None:
    shape = (20, 24, 28)[:dim]
    image = oblique_image(np.zeros(shape))
    grid = Grid.of(image)
    ramp_direction = np.array([0.2, -0.5, 0.8][:dim])
    values = grid.physical_points() @ ramp_direction
    image = grid.stamp(sitk.GetImageFromArray(values.astype(np.float32)))
    coarse = grid.resized((10, 12, 14)[:dim])
    resampled = sitk.GetArrayFromImage(resample_to_grid(image, coarse, antialias=False))
    expected = coarse.physical_points() @ ramp_direction
    inner = tuple(slice(1, -1) for _ in range(dim))
    np.testing.assert_allclose(resampled[inner], expected[inner], atol=1e-3)


def test_physical_displacement_of_a_network_translation(dim: int) -> None:
    """Φ(c) = c + t in network units is a physical shift of direction·spacing·(t·size) mm."""
    _, grid = _grid(dim)
    shift = np.array([0.1, -0.05, 0.2][:dim])
    values = identity_grid(grid.shape) + torch.tensor(shift, dtype=torch.float32).view(
        1, dim, *[1] * dim
    )
    field = physical_displacement(sampled_map(values), grid, grid, grid, like=values)
    expected = grid.direction_matrix @ (np.array(grid.spacing) * shift[::-1] * np.array(grid.size))
    assert field.shape == (*grid.shape, dim)
    np.testing.assert_allclose(
        field.reshape(-1, dim), np.broadcast_to(expected, (field[..., 0].size, dim)), atol=1e-4
    )


def test_physical_displacement_between_different_grids(dim: int) -> None:
    """The identity network map between two grids is the physical map between their extents."""
    _, fixed = _grid(dim)
    moving_image = oblique_image(np.zeros((7, 11, 13)[:dim]), angle=-0.2)
    moving = Grid.of(moving_image)
    values = identity_grid(fixed.shape)
    field = physical_displacement(sampled_map(values), fixed, moving, fixed, like=values)
    points = fixed.physical_points()
    expected = moving.network_to_physical(fixed.physical_to_network(points)) - points
    np.testing.assert_allclose(field, expected, atol=1e-4)


def test_antialiasing_smooths_only_the_shrinking_axes() -> None:
    # A CT with few thick slices onto a cube grid: z grows, x and y shrink (ITK refuses a zero
    # sigma, so the smoothing must skip the growing axis rather than fail).
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(size=(6, 64, 64)).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 8.0))
    target = Grid.of(image).resized((16, 16, 16))
    smoothed = sitk.GetArrayFromImage(resample_to_grid(image, target))
    aliased = sitk.GetArrayFromImage(resample_to_grid(image, target, antialias=False))
    assert smoothed.shape == (16, 16, 16)
    assert smoothed.std() < 0.5 * aliased.std()  # white noise averaged over ~4×4 pixels


def test_grid_contains_its_edge_to_edge_extent() -> None:
    image = sitk.Image([4, 3], sitk.sitkFloat32)
    image.SetSpacing([2.0, 1.0])
    image.SetOrigin([10.0, 0.0])  # x spans 9 … 17 mm, y −0.5 … 2.5 mm
    points = np.array([[9.0, -0.5], [17.0, 2.5], [8.9, 1.0], [12.0, 2.6]])
    np.testing.assert_array_equal(Grid.of(image).contains(points), [True, True, False, False])
