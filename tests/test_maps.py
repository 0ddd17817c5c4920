"""The registration algebra against analytic maps: sampling, composition, TwoStep, Downsample."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from equireg.compose import Downsample, RegistrationStep, TwoStep
from equireg.maps import (
    Map,
    compose,
    displacement_map,
    evaluate,
    identity_grid,
    sample,
    sampled_map,
    warp,
)


def _affine(matrix: torch.Tensor, offset: torch.Tensor) -> Map:
    dim = offset.numel()

    def phi(coords: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,bj...->bi...", matrix, coords) + offset.view(1, dim, *[1] * dim)

    return phi


def _random_affine(dim: int, seed: int) -> Map:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.eye(dim, dtype=torch.float64) + 0.1 * torch.randn(
        dim, dim, generator=generator, dtype=torch.float64
    )
    return _affine(matrix, 0.05 * torch.randn(dim, generator=generator, dtype=torch.float64))


def test_identity_grid_is_voxel_centres(dim: int) -> None:
    shape = (4, 6, 8)[:dim]
    grid = identity_grid(shape, batch=2)
    assert grid.shape == (2, dim, *shape)
    for axis, n in enumerate(shape):
        line = grid[0, axis].movedim(axis, 0).reshape(n, -1)[:, 0]
        torch.testing.assert_close(line, (torch.arange(n) + 0.5) / n)


def test_sampling_a_linear_function_is_exact_inside(dim: int) -> None:
    shape = (8, 10, 12)[:dim]
    grid = identity_grid(shape, dtype=torch.float64)
    weights = torch.tensor([0.3, -1.2, 2.0][:dim], dtype=torch.float64).view(1, dim, *[1] * dim)
    image = (grid * weights).sum(1, keepdim=True)
    points = 0.1 + 0.8 * torch.rand(1, dim, *[5] * dim, dtype=torch.float64)
    torch.testing.assert_close(sample(image, points), (points * weights).sum(1, keepdim=True))


def test_sampled_affine_map_reproduces_the_map_inside(dim: int) -> None:
    shape = (16, 12, 10)[:dim]
    phi = _random_affine(dim, seed=1)
    approx = sampled_map(evaluate(phi, shape, 1, torch.zeros((), dtype=torch.float64)))
    points = 0.1 + 0.8 * torch.rand(1, dim, *[4] * dim, dtype=torch.float64)
    torch.testing.assert_close(approx(points), phi(points))


def test_displacement_map_of_a_constant_is_a_translation_everywhere(dim: int) -> None:
    shift = torch.tensor([0.25, -0.1, 0.05][:dim], dtype=torch.float64).view(1, dim, *[1] * dim)
    field = shift.expand(1, dim, *[6] * dim)
    points = torch.rand(1, dim, *[3] * dim, dtype=torch.float64) * 3 - 1  # also far outside
    torch.testing.assert_close(displacement_map(field)(points), points + shift)


def test_compose_applies_inner_first(dim: int) -> None:
    shape = (12, 12, 12)[:dim]
    outer, inner = _random_affine(dim, 2), _random_affine(dim, 3)
    grid = identity_grid(shape, dtype=torch.float64)
    torch.testing.assert_close(compose(outer, inner)(grid), outer(inner(grid)))
    assert not torch.allclose(compose(outer, inner)(grid), inner(outer(grid)))


def test_warp_by_an_integer_shift_is_a_roll(dim: int) -> None:
    shape = (16, 16, 16)[:dim]
    image = torch.rand(1, 1, *shape, dtype=torch.float64)
    shift = torch.tensor([3, -2, 1][:dim], dtype=torch.float64)
    offset = (shift / torch.tensor(shape)).view(1, dim, *[1] * dim)
    moved = warp(image, lambda c: c + offset, shape)  # moved(x) = image(x + shift)
    rolled = torch.roll(image, shifts=tuple(int(-s) for s in shift), dims=tuple(range(2, 2 + dim)))
    inner = (slice(None), slice(None), *[slice(4, -4)] * dim)
    torch.testing.assert_close(moved[inner], rolled[inner])


class _Translate(RegistrationStep):
    """A step that returns a fixed translation, and records the size it was called at."""

    def __init__(self, voxels: float):
        super().__init__()
        self.voxels = voxels
        self.seen_shape: tuple[int, ...] = ()

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        self.seen_shape = tuple(fixed.shape[2:])
        return lambda c: c + self.voxels / fixed.shape[2]


def test_two_step_composes_first_then_second() -> None:
    first, second = _Translate(2.0), _Translate(3.0)
    image = torch.rand(1, 1, 32, 32)
    phi = TwoStep(first, second)(image, image)
    grid = identity_grid((32, 32))
    torch.testing.assert_close(phi(grid), grid + 5.0 / 32)


def test_two_step_feeds_the_warped_moving_image_to_the_second_step() -> None:
    class Record(RegistrationStep):
        def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
            self.moving = moving
            return lambda c: c

    moving = torch.rand(1, 1, 16, 16)
    recorder = Record()
    TwoStep(_Translate(4.0), recorder)(moving, moving)
    expected = torch.roll(moving, shifts=(-4, -4), dims=(2, 3))  # shifted along both axes
    torch.testing.assert_close(recorder.moving[:, :, :8, :8], expected[:, :, :8, :8])


def test_downsample_runs_coarse_and_keeps_positions(dim: int) -> None:
    shape = (16, 16, 16)[:dim]
    step = _Translate(1.0)  # one coarse voxel
    image = torch.rand(1, 1, *shape)
    phi = Downsample(step, 2)(image, image)
    assert step.seen_shape == tuple(n // 2 for n in shape)
    grid = identity_grid(shape)
    torch.testing.assert_close(phi(grid), grid + 2.0 / shape[0])  # two fine voxels
    pool = F.avg_pool2d if dim == 2 else F.avg_pool3d
    torch.testing.assert_close(pool(grid, 2), identity_grid(tuple(n // 2 for n in shape)))
