"""The refinement's building blocks: box means, the prior's window, the edge margin."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

import equireg.losses
from equireg.losses import box_mean
from equireg.refine import EDGE_MARGIN, PRIORS, _eroded, _MovingSampler, points_of, prior_window
from equireg.space import Grid


@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 9, 10, 20])
@pytest.mark.parametrize("width", [5, 7, 9, 21])
def test_running_sums_equal_the_convolution(
    length: int, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(1, 2, length, 4, 3, dtype=torch.float64)
    running = box_mean(x, (width, 1, 3))
    monkeypatch.setattr(equireg.losses, "RUNNING_SUM_WIDTH", 10**9)
    torch.testing.assert_close(running, box_mean(x, (width, 1, 3)))


def test_the_prior_smooths_the_same_length_in_mm_along_thick_slices() -> None:
    image = sitk.Image([128, 128, 34], sitk.sitkFloat32)
    image.SetSpacing([3.0, 3.0, 10.0])
    grid = Grid.of(image)  # tensor order (z, y, x)
    assert prior_window(PRIORS["smooth"], grid) == (3, 9, 9)
    assert prior_window(PRIORS["diffusion"], grid) == (1, 3, 3)


def test_erosion_is_a_cube_of_the_margin() -> None:
    inside = (torch.rand(1, 1, 12, 13, 14) > 0.2).float()
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
