"""The refinement's building blocks: box means, the prior's window, the edge margin."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from equireg.errors import InputError
from equireg.losses import box_mean, box_sum
from equireg.refine import (
    EDGE_MARGIN,
    PRIORS,
    QUALITY,
    ImagePair,
    _eroded,
    _grid_sample,
    _MovingSampler,
    optimise_level,
    points_of,
    prior_window,
    refine,
    resize_field,
)
from equireg.similarity import get as get_similarity
from equireg.space import Grid


@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 9, 10, 20])
@pytest.mark.parametrize("width", [3, 5, 9, 21])
def test_box_means_equal_a_direct_sum(length: int, width: int) -> None:
    """Against the definition: the mean over the box cropped at the borders."""
    x = torch.randn(1, 2, length, 4, 3, dtype=torch.float64)
    r = width // 2
    direct = torch.stack(
        [x[:, :, max(0, i - r) : i + r + 1].mean(dim=2) for i in range(length)], dim=2
    )
    torch.testing.assert_close(box_mean(x, (width, 1, 1)), direct)


def test_the_prior_smooths_the_same_length_in_mm_along_thick_slices() -> None:
    image = sitk.Image([128, 128, 34], sitk.sitkFloat32)
    image.SetSpacing([3.0, 3.0, 10.0])
    grid = Grid.of(image)  # tensor order (z, y, x)
    assert prior_window(PRIORS["smooth"], grid) == (3, 9, 9)
    assert prior_window(PRIORS["diffusion"], grid) == (1, 3, 3)


def test_erosion_is_a_cube_of_the_margin() -> None:
    inside = torch.zeros(1, 1, 16, 17, 18)
    inside[:, :, 1:15, 1:16, 1:17] = 1
    inside[:, :, 7, 8, 9] = 0  # a hole
    cube = 1 - F.max_pool3d(1 - inside, 2 * EDGE_MARGIN + 1, stride=1, padding=EDGE_MARGIN)
    torch.testing.assert_close(_eroded(inside, EDGE_MARGIN), cube)


def test_a_point_counts_only_between_the_voxel_centres_and_the_margin_inside() -> None:
    """The moving image's rim of half a voxel, where linear interpolation fades into zero
    padding, and ``EDGE_MARGIN`` level voxels inside it do not count."""
    moving = sitk.Image([10, 10], sitk.sitkFloat32)  # 1 mm voxels, centres at 0 … 9 mm
    level = sitk.Image([34, 34], sitk.sitkFloat32)  # 0.5 mm voxels from −3.75 to 12.75 mm
    level.SetSpacing([0.5, 0.5])
    level.SetOrigin([-3.75, -3.75])
    points = points_of(Grid.of(level), torch.device("cpu"))
    _, inside = _MovingSampler(moving, None, torch.device("cpu"))(points)
    x = -3.75 + 0.5 * np.arange(34)
    between = (x >= 0.25 + 0.5 * EDGE_MARGIN) & (x <= 8.75 - 0.5 * EDGE_MARGIN)
    np.testing.assert_array_equal(inside[0, 0].numpy(), np.outer(between, between))


@pytest.mark.parametrize("length", [1, 3, 9, 20])
def test_the_running_sum_has_the_box_sums_gradient(length: int) -> None:
    """``_BoxSum``'s backward pass is the same box sum of the incoming gradient."""
    x = torch.randn(1, 2, 4, length, 3, dtype=torch.float64, requires_grad=True)
    for width in (5, 9):
        assert torch.autograd.gradcheck(lambda t, w=width: box_sum(t, 3, w), (x,))
        assert torch.autograd.gradgradcheck(lambda t, w=width: box_sum(t, 3, w), (x,))


def test_images_that_overlap_from_no_start_are_an_input_error() -> None:
    """Scores of −∞ everywhere used to refine the identity and report null similarities."""
    fixed = sitk.GetImageFromArray(np.random.default_rng(0).random((32, 32)).astype(np.float32))
    moving = sitk.Image(fixed)
    moving.SetOrigin([1000.0, 0.0])  # 1 m to the side
    pair = ImagePair(fixed, moving, None, None, ((0.0, 1.0), (0.0, 1.0)), torch.device("cpu"))
    starts = {"identity": lambda grid: np.zeros((*grid.shape, 2))}
    with pytest.raises(InputError, match=r"do not overlap in physical space from any start"):
        refine(pair, starts, get_similarity("lncc"), QUALITY["fast"], steps=5)


def test_erosion_spares_an_axis_it_would_empty() -> None:
    """A slab three voxels thick keeps its voxels along its thin axis, not in-plane."""
    inside = torch.zeros(1, 1, 10, 20, 20)
    inside[:, :, 4:7, 2:18, 2:18] = 1
    eroded = _eroded(inside, EDGE_MARGIN)
    expected = torch.zeros_like(inside)
    expected[:, :, 4:7, 2 + EDGE_MARGIN : 18 - EDGE_MARGIN, 2 + EDGE_MARGIN : 18 - EDGE_MARGIN] = 1
    torch.testing.assert_close(eroded, expected)


def test_a_parameter_on_a_coarser_grid_is_smoothed_over_the_same_length() -> None:
    image = sitk.Image([64, 64, 64], sitk.sitkFloat32)
    image.SetSpacing([2.0, 2.0, 4.0])
    level = Grid.of(image)
    control = level.resized((32, 32, 32))  # 4 × 4 × 8 mm
    assert prior_window(PRIORS["smooth"], level) == (5, 9, 9)  # 18 mm along each axis
    assert prior_window(PRIORS["smooth"], control, level) == (3, 5, 5)


def _blobs(grid: Grid, shift: np.ndarray) -> sitk.Image:
    """Smooth blobs at LPS points ``x − shift`` on ``grid``: moving = fixed moved by ``shift``."""
    centres = np.random.default_rng(3).uniform(0, 48, size=(40, 3))
    points = grid.physical_points() - shift
    values = sum(np.exp(-((points - c) ** 2).sum(-1) / 30.0) for c in centres)
    return grid.stamp(sitk.GetImageFromArray(values.astype(np.float32)))


@pytest.mark.parametrize("on_coarser_grid", [False, True])
def test_a_level_recovers_a_translation_with_its_field_on_either_grid(
    on_coarser_grid: bool,
) -> None:
    """The finest level's field on the previous level's grid (``finest_on_coarser_grid``)
    finds the same sub-voxel shift as one on the level's own grid, and comes back on the
    level's grid."""
    reference = sitk.Image([24, 24, 24], sitk.sitkFloat32)
    reference.SetSpacing([2.0, 2.0, 2.0])
    grid = Grid.of(reference)
    shift = np.array([1.0, -0.8, 0.6])
    pair = ImagePair(
        _blobs(grid, np.zeros(3)),
        _blobs(grid, shift),
        None,
        None,
        ((0, 1), (0, 1)),
        torch.device("cpu"),
    )
    level = pair.level(grid)
    control = grid.resized((12, 12, 12)) if on_coarser_grid else None
    start = torch.zeros(1, 3, *(control or grid).shape)
    field, report = optimise_level(
        level, start, get_similarity("lncc"), 50, PRIORS["smooth"], control=control
    )
    assert tuple(field.shape[2:]) == grid.shape
    inner = field[0, :, 6:-6, 6:-6, 6:-6].mean(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(inner, shift, atol=0.03)  # measured: within 0.015 mm
    assert report.similarity_end > report.similarity_start


@pytest.mark.parametrize(
    ("source", "target"),
    [((5, 4, 3), (10, 8, 6)), ((1, 4, 3), (1, 8, 6)), ((3, 1, 2), (6, 2, 2)), ((6, 7), (6, 14))],
)
def test_doubling_a_field_has_linear_interpolations_gradient(
    source: tuple[int, ...], target: tuple[int, ...]
) -> None:
    """``resize_field``'s written-out transpose for factors of 1 and 2 against PyTorch's own
    backward pass of the same interpolation (values and gradients)."""
    x = torch.randn(1, 3, *source, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(1, 3, *target, dtype=torch.float64)
    mode = "bilinear" if len(source) == 2 else "trilinear"
    reference = F.interpolate(x, size=target, mode=mode, align_corners=False)
    doubled = resize_field(x, target)
    torch.testing.assert_close(doubled, reference)
    (expected,) = torch.autograd.grad((reference * weights).sum(), x)
    (got,) = torch.autograd.grad((doubled * weights).sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [(6, 5, 4), (5, 7, 4), (5, 7, 3), (9, 8)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_sampling_cut_into_one_batch_per_thread_equals_one_call(
    size: tuple[int, ...], mode: str
) -> None:
    """``_grid_sample`` on two threads (points cut along the first axis, along the flattened
    points, or, for an odd count, not at all) against one ``F.grid_sample`` call: the same
    values and the same gradient with respect to the points."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, *[n + 2 for n in size], dtype=torch.float64, generator=generator)
    grid = torch.rand(1, *size, len(size), dtype=torch.float64, generator=generator) * 2.2 - 1.1
    weights = torch.randn(1, 1, *size, dtype=torch.float64, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cut = grid.clone().requires_grad_(True)
        values = _grid_sample(image, cut, mode)
        (values * weights).sum().backward()
    finally:
        torch.set_num_threads(threads)
    whole = grid.clone().requires_grad_(True)
    reference = F.grid_sample(image, whole, mode=mode, align_corners=False)
    (reference * weights).sum().backward()
    torch.testing.assert_close(values, reference)
    torch.testing.assert_close(cut.grad, whole.grad)
