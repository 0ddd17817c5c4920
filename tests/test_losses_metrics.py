"""Losses and metrics against analytic values (losses.py, evaluate.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from torch import nn

from equireg import evaluate
from equireg.compose import DisplacementStep, RegistrationStep
from equireg.evaluate import (
    equivariance_error,
    folding_fraction,
    jacobian_determinant,
    map_folding_fraction,
    map_jacobian_determinant,
    shifted,
    similarity_report,
    target_registration_error,
)
from equireg.losses import (
    diffusion,
    gradient_inverse_consistency,
    lncc,
    lncc_pyramid,
    mse,
    registration_loss,
)
from equireg.maps import Map, displacement_map, identity_grid
from equireg.space import Grid

SHAPES = [(24, 32), (12, 14, 16)]


def smooth_image(shape: tuple[int, ...], seed: int, batch: int = 1) -> torch.Tensor:
    """Blurred noise with unit standard deviation, ``(batch, 1, *shape)`` float64."""
    noise = np.random.default_rng(seed).standard_normal((batch, 1, *shape))
    blurred = ndimage.gaussian_filter(noise, sigma=(0, 0) + (1.5,) * len(shape))
    return torch.from_numpy(blurred / blurred.std())


def noise_image(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((1, 1, *shape)))


def blob(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> torch.Tensor:
    """A bump with compact support, so rolling the image never wraps any of it around."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    r2 = np.sum((index - np.asarray(centre)) ** 2, axis=-1) / radius**2
    return torch.from_numpy(np.clip(1 - r2, 0, None) ** 2)[None, None]


def linear_map(matrix: np.ndarray, offset: np.ndarray) -> Map:
    """``x ↦ M x + t`` in network coordinates, for any ``(B, d, *S)`` points."""
    m = torch.as_tensor(matrix, dtype=torch.float64)
    t = torch.as_tensor(offset, dtype=torch.float64).view(1, -1, *([1] * len(offset)))

    def phi(coords: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,bj...->bi...", m, coords) + t

    return phi


def random_matrix(dims: int, seed: int, scale: float = 0.2) -> np.ndarray:
    return np.eye(dims) + scale * np.random.default_rng(seed).standard_normal((dims, dims))


# --- LNCC and MSE -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_lncc_of_image_with_itself_is_zero(shape):
    image = smooth_image(shape, seed=0)
    assert lncc(image, image).item() == pytest.approx(0, abs=1e-4)


@pytest.mark.parametrize("shape", [(96, 96), (28, 28, 28)])
def test_lncc_of_independent_noise_is_about_one(shape):
    assert lncc(noise_image(shape, 1), noise_image(shape, 2)).item() == pytest.approx(1, abs=0.05)


@pytest.mark.parametrize("shape", SHAPES)
def test_lncc_ignores_affine_intensity_change(shape):
    a = smooth_image(shape, seed=3)
    b = a + 0.5 * smooth_image(shape, seed=4)
    assert lncc(a, 3 * b + 2).item() == pytest.approx(lncc(a, b).item(), abs=1e-4)
    assert lncc(a, 3 * a + 2).item() == pytest.approx(0, abs=1e-4)
    assert lncc(a, -a).item() == pytest.approx(2, abs=1e-4)


@pytest.mark.parametrize("shape, window", [((7, 9), (3, 5)), ((5, 6, 7), (3, 1, 5))])
def test_lncc_matches_direct_windows_cropped_at_the_border(shape, window):
    a, b = smooth_image(shape, 5), smooth_image(shape, 6)
    eps = 1e-5
    correlations = []
    for index in np.ndindex(*shape):
        box = tuple(
            slice(max(i - w // 2, 0), i + w // 2 + 1) for i, w in zip(index, window, strict=True)
        )
        wa, wb = a[0, 0][box].numpy().ravel(), b[0, 0][box].numpy().ravel()
        covariance = np.mean((wa - wa.mean()) * (wb - wb.mean()))
        correlations.append(covariance / np.sqrt((wa.var() + eps) * (wb.var() + eps)))
    expected = 1 - np.mean(correlations)
    assert lncc(a, b, window, eps).item() == pytest.approx(expected, abs=1e-10)


def test_lncc_rejects_even_window():
    image = smooth_image((8, 8), 0)
    with pytest.raises(ValueError, match="odd"):
        lncc(image, image, window=4)


def test_mse():
    image = smooth_image((8, 8), 0)
    assert mse(image, image + 2).item() == pytest.approx(4)


# --- diffusion ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_diffusion_of_identity_is_zero(shape):
    assert diffusion(identity_grid(shape, batch=2, dtype=torch.float64)).item() == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_diffusion_of_linear_displacement_is_analytic(shape):
    """``u = A x`` in network coordinates is ``A_kj n_k / n_j`` per voxel in voxel units."""
    dims = len(shape)
    a = 0.1 * np.random.default_rng(7).standard_normal((dims, dims))
    grid = identity_grid(shape, dtype=torch.float64)
    values = linear_map(np.eye(dims) + a, np.zeros(dims))(grid)
    n = np.asarray(shape, dtype=np.float64)
    expected = np.sum((a * n[:, None] / n[None, :]) ** 2)
    assert diffusion(values).item() == pytest.approx(expected, rel=1e-9)


# --- gradient inverse consistency ---------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_gradicon_of_exact_inverses_is_zero(shape):
    dims = len(shape)
    like = torch.zeros(2, 1, *shape, dtype=torch.float64)
    t = np.linspace(0.05, 0.15, dims)
    translation = gradient_inverse_consistency(
        linear_map(np.eye(dims), t), linear_map(np.eye(dims), -t), shape, like
    )
    m = random_matrix(dims, seed=8)
    m_inverse = np.linalg.inv(m)
    affine = gradient_inverse_consistency(
        linear_map(m, t), linear_map(m_inverse, -m_inverse @ t), shape, like
    )
    assert translation.item() == pytest.approx(0, abs=1e-12)
    assert affine.item() == pytest.approx(0, abs=1e-12)


def test_gradicon_of_sampled_translation_fields_is_zero():
    shape = (10, 12)
    field = torch.zeros(1, 2, *shape, dtype=torch.float64)
    field[:, 0], field[:, 1] = 0.1, -0.05
    like = torch.zeros(1, 1, *shape, dtype=torch.float64)
    there, back = displacement_map(field), displacement_map(-field)
    loss = gradient_inverse_consistency(there, back, shape, like)
    assert loss.item() == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradicon_of_non_inverse_maps_is_analytic(shape):
    """``φ_AB = φ_BA = M`` has round-trip Jacobian ``M²``, ``D (M² − I) D⁻¹`` in voxels."""
    dims = len(shape)
    m = random_matrix(dims, seed=9)
    like = torch.zeros(1, 1, *shape, dtype=torch.float64)
    loss = gradient_inverse_consistency(
        linear_map(m, np.zeros(dims)), linear_map(m, np.zeros(dims)), shape, like
    )
    n = np.diag(np.asarray(shape, dtype=np.float64))
    expected = np.sum((n @ (m @ m - np.eye(dims)) @ np.linalg.inv(n)) ** 2)
    assert expected > 0.1
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_gradicon_ignores_a_leftover_translation():
    """The gradient, not the round trip, is penalised: ``x+t`` twice is not inverse yet costs 0."""
    t = np.array([0.1, 0.2])
    like = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    phi = linear_map(np.eye(2), t)
    loss = gradient_inverse_consistency(phi, phi, (8, 8), like)
    assert loss.item() == pytest.approx(0, abs=1e-12)


# --- registration_loss --------------------------------------------------------------------------


class LearnedTranslation(RegistrationStep):
    """``x ↦ x + t`` with a trainable ``t``, whatever the images."""

    def __init__(self, dims: int):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(dims, dtype=torch.float64))

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        offset = self.offset.view(1, -1, *([1] * self.offset.numel()))
        return lambda coords: coords + offset


def conv_step(dims: int) -> DisplacementStep:
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(2, dims, 3, padding=1, padding_mode="circular")
    return DisplacementStep(conv.double())


@pytest.mark.parametrize("similarity", ["lncc", "lncc_pyramid", "mse"])
@pytest.mark.parametrize("regulariser", ["diffusion", "gradicon"])
def test_registration_loss_parts_add_up_and_differentiate(similarity, regulariser):
    torch.manual_seed(0)
    step = conv_step(2)
    moving, fixed = smooth_image((16, 16), 1), smooth_image((16, 16), 2)
    total, parts = registration_loss(
        step, moving, fixed, similarity=similarity, regulariser=regulariser, weight=0.5
    )
    assert set(parts) == {"similarity", "regulariser", "total"}
    assert parts["regulariser"] > 0
    assert parts["total"] == pytest.approx(parts["similarity"] + 0.5 * parts["regulariser"])
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in step.parameters())


def test_lncc_pyramid_is_zero_for_equal_images_and_widens_the_basin():
    """Thin lines: plain LNCC has no basin at a 4-voxel offset; the pyramid does."""
    lines = torch.zeros(1, 1, 64, 64, dtype=torch.float64)
    lines[:, :, 8::16, :] = 1.0
    lines[:, :, :, 5::16] = 1.0
    noisy = lines + 0.01 * torch.randn(lines.shape, generator=torch.Generator().manual_seed(0))
    assert lncc_pyramid(noisy, noisy).item() == pytest.approx(0.0, abs=0.05)  # eps in flat windows
    plain = [lncc(lines, torch.roll(lines, k, dims=2)).item() for k in (0, 2, 4)]
    pyramid = [lncc_pyramid(lines, torch.roll(lines, k, dims=2)).item() for k in (0, 2, 4)]
    assert pyramid == sorted(pyramid) and pyramid[2] - pyramid[1] > 0.1
    assert plain != sorted(plain)


def test_registration_loss_rejects_unknown_names():
    image = smooth_image((8, 8), 0)
    with pytest.raises(ValueError, match="similarity"):
        registration_loss(LearnedTranslation(2), image, image, similarity="ncc")
    with pytest.raises(ValueError, match="regulariser"):
        registration_loss(LearnedTranslation(2), image, image, regulariser="bending")


def test_instance_optimisation_of_a_translation_recovers_the_shift():
    """A few gradient steps on the loss move ``t`` to the blob's 3-voxel shift along axis 1."""
    fixed = blob((32, 32), (16, 14), 8)
    moving = blob((32, 32), (16, 17), 8)
    step = LearnedTranslation(2)
    optimiser = torch.optim.Adam(step.parameters(), lr=0.01)
    for _ in range(60):
        optimiser.zero_grad()
        total, parts = registration_loss(step, moving, fixed, similarity="mse")
        total.backward()
        optimiser.step()
    assert parts["regulariser"] == pytest.approx(0, abs=1e-12)
    assert step.offset.detach().numpy() * 32 == pytest.approx([0, 3], abs=0.3)


# --- Jacobian determinant and folding -----------------------------------------------------------

GRIDS = [
    Grid((9, 7), (0.5, 1.5), (3.0, -2.0), (1.0, 0.0, 0.0, 1.0)),
    Grid((8, 7, 6), (0.7, 1.1, 2.5), (1.0, 2.0, 3.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)),
]


def oblique(grid: Grid, angle: float = 0.4) -> Grid:
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.eye(grid.dim)
    rotation[:2, :2] = [[c, -s], [s, c]]
    if grid.dim == 3:
        rotation = rotation @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return Grid(grid.size, grid.spacing, grid.origin, tuple(rotation.ravel()))


@pytest.mark.parametrize("grid", GRIDS + [oblique(g) for g in GRIDS])
def test_jacobian_determinant_of_linear_field(grid):
    """``u(p) = A p`` (LPS mm) has ``det(I + A)`` everywhere, on anisotropic, oblique grids."""
    a = random_matrix(grid.dim, seed=10, scale=0.3) - np.eye(grid.dim)
    displacement = grid.physical_points() @ a.T
    determinant = jacobian_determinant(displacement, grid.spacing, grid.direction)
    assert determinant.shape == grid.shape
    np.testing.assert_allclose(determinant, np.linalg.det(np.eye(grid.dim) + a), rtol=1e-10)


def test_jacobian_determinant_needs_the_direction_of_an_oblique_grid():
    grid = oblique(GRIDS[1])
    a = np.diag([0.5, 0.0, 0.0])
    displacement = grid.physical_points() @ a.T
    ignoring = jacobian_determinant(displacement, grid.spacing)
    assert not np.allclose(ignoring, 1.5)


def test_jacobian_determinant_in_slabs_matches_one_pass(monkeypatch):
    grid = GRIDS[1]
    points = grid.physical_points()
    displacement = 2 * np.sin(points[..., ::-1] / 3) * np.cos(points / 4)
    whole = jacobian_determinant(displacement, grid.spacing)
    monkeypatch.setattr(evaluate, "_SLAB_VOXELS", 7)
    np.testing.assert_allclose(jacobian_determinant(displacement, grid.spacing), whole, rtol=1e-12)


@pytest.mark.parametrize("grid", GRIDS)
def test_folding_fraction(grid):
    points = grid.physical_points()
    assert folding_fraction(np.zeros_like(points), grid.spacing) == 0
    # u_x = -a sin(k x): det = 1 - a k cos(k x) folds where cos(k x) > 1 / (a k).
    fold = np.zeros_like(points)
    k = 2 * math.pi / (grid.size[0] * grid.spacing[0])
    fold[..., 0] = -(2 / k) * np.sin(k * points[..., 0])
    assert 0.1 < folding_fraction(fold, grid.spacing) < 0.9


@pytest.mark.parametrize("shape", SHAPES)
def test_map_jacobian_determinant_of_affine_map(shape):
    dims = len(shape)
    m = random_matrix(dims, seed=11)
    values = linear_map(m, np.full(dims, 0.1))(identity_grid(shape, batch=2, dtype=torch.float64))
    determinant = map_jacobian_determinant(values)
    assert determinant.shape == (2, *shape)
    np.testing.assert_allclose(determinant.numpy(), np.linalg.det(m), rtol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_map_folding_fraction(shape):
    dims = len(shape)
    identity = identity_grid(shape, dtype=torch.float64)
    assert map_folding_fraction(identity) == 0
    mirror = np.eye(dims)
    mirror[0, 0] = -1
    assert map_folding_fraction(linear_map(mirror, np.zeros(dims))(identity)) == 1


# --- equivariance error -------------------------------------------------------------------------


def centroid(image: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted centre ``(B, d, 1, …)`` in network coordinates."""
    grid = identity_grid(image.shape[2:], device=image.device, dtype=image.dtype)
    spatial = tuple(range(2, image.dim()))
    weights = image.sum(dim=1, keepdim=True)
    return (grid * weights).sum(dim=spatial, keepdim=True) / weights.sum(dim=spatial, keepdim=True)


class CentroidStep(RegistrationStep):
    """Aligns intensity centroids: exactly ``[W, U]``-equivariant for content away from borders."""

    def __init__(self, gain: float = 1.0):
        super().__init__()
        self.gain = gain

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        offset = self.gain * (centroid(moving) - centroid(fixed))
        return lambda coords: coords + offset


class IdentityStep(RegistrationStep):
    """Only ``[U, U]``-equivariant: it ignores how far apart the images were shifted."""

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        return lambda coords: coords


@pytest.mark.parametrize("shape", SHAPES)
def test_equivariance_error_of_an_equivariant_step_is_zero(shape):
    dims = len(shape)
    moving = blob(shape, tuple(n / 2 - 1 for n in shape), 3)
    fixed = blob(shape, tuple(n / 2 + 1 for n in shape), 3)
    error = equivariance_error(
        CentroidStep(), moving, fixed, (3, -2, 1)[:dims], (-1, 2, 2)[:dims], margin=4
    )
    assert error < 1e-9


def test_equivariance_error_is_in_voxels():
    """The identity step is off by exactly ``w − u``: (2, 0) − (0, −1) voxels, i.e. √5."""
    image = blob((16, 24), (8, 12), 4)
    error = equivariance_error(IdentityStep(), image, image, (2, 0), (0, -1), margin=3)
    assert error == pytest.approx(math.sqrt(5), rel=1e-9)
    assert equivariance_error(IdentityStep(), image, image, (2, 1), (2, 1), margin=3) == 0


def test_equivariance_error_of_a_non_equivariant_step():
    moving = blob((24, 24), (11, 12), 4)
    fixed = blob((24, 24), (13, 12), 4)
    error = equivariance_error(CentroidStep(gain=2.0), moving, fixed, (2, 0), (-1, 1), margin=4)
    assert error > 1


@pytest.mark.parametrize("shape", SHAPES)
def test_equivariance_error_of_a_circular_conv_under_equal_shifts_is_zero(shape):
    """A convolution commutes with rolls; the margin keeps ``φ(x + u)`` inside the grid."""
    torch.manual_seed(1)
    dims = len(shape)
    moving, fixed = smooth_image(shape, 12), smooth_image(shape, 13)
    shift = (2, -3, 1)[:dims]
    assert equivariance_error(conv_step(dims), moving, fixed, shift, shift, margin=3) < 1e-9


class HalfStep(RegistrationStep):
    """Aligns centroids (``[W, U]``-equivariant) on the first half of axis 0, the identity (only
    ``[U, U]``) on the second: a step whose error depends on where it is measured."""

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        offset = centroid(moving) - centroid(fixed)
        return lambda coords: coords + offset * (coords[:, :1] < 0.5)


class OutsideStep(RegistrationStep):
    """Maps every point two fields of view away: no expected value lies in the moving grid."""

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        return lambda coords: coords + 2


def test_shifted_moves_content_by_minus_the_shift():
    image = torch.arange(20.0).view(1, 1, 4, 5)
    zero = shifted(image, (1, -2), "zero")
    assert torch.equal(zero[0, 0, :3, 2:], image[0, 0, 1:, :3])  # out[i] = image[i + shift]
    assert zero[0, 0, 3].abs().sum() == 0 and zero[0, 0, :, :2].abs().sum() == 0
    assert torch.equal(shifted(image, (1, -2), "roll"), torch.roll(image, (-1, 2), (2, 3)))
    assert shifted(image, (4, 0), "zero").abs().sum() == 0
    with pytest.raises(ValueError, match="fill"):
        shifted(image, (1, 1), "wrap")


@pytest.mark.parametrize("shape", SHAPES)
def test_equivariance_error_with_zero_fill_is_zero_when_no_content_is_lost(shape):
    """The bumps stay inside the grid under these shifts: zero-filled is a pure translation."""
    dims = len(shape)
    moving = blob(shape, tuple(n / 2 - 1 for n in shape), 3)
    fixed = blob(shape, tuple(n / 2 + 1 for n in shape), 3)
    w, u = (3, -2, 1)[:dims], (-1, 2, 2)[:dims]
    error = equivariance_error(CentroidStep(), moving, fixed, w, u, margin=4, fill="zero")
    assert error < 1e-9


def test_equivariance_error_counts_only_the_mask():
    """HalfStep is exact where axis 0 is below 0.5 (before and after the shift ``u``) and off by
    ``|w − u|`` = √5 voxels beyond; the mask picks the part that is measured."""
    shape = (24, 24)
    moving, fixed = blob(shape, (11, 12), 4), blob(shape, (13, 12), 4)
    w, u = (2, 0), (0, -1)
    first = torch.zeros(shape, dtype=torch.bool)
    first[:12] = True
    error = equivariance_error(HalfStep(), moving, fixed, w, u, margin=3, mask=first)
    assert error < 1e-9
    second = equivariance_error(HalfStep(), moving, fixed, w, u, margin=3, mask=~first[None, None])
    assert second == pytest.approx(math.sqrt(5), rel=1e-9)
    everywhere = equivariance_error(HalfStep(), moving, fixed, w, u, margin=3)
    assert 0 < everywhere < second


def test_equivariance_error_with_nothing_to_compare_is_nan():
    image = blob((16, 16), (8, 8), 4)
    nothing = torch.zeros(16, 16, dtype=torch.bool)
    assert math.isnan(
        equivariance_error(IdentityStep(), image, image, (1, 1), (0, 0), 2, mask=nothing)
    )
    assert math.isnan(equivariance_error(OutsideStep(), image, image, (1, 1), (0, 0), 2))


def test_equivariance_error_checks_arguments():
    image = blob((8, 8), (4, 4), 2)
    with pytest.raises(ValueError, match="shifts"):
        equivariance_error(IdentityStep(), image, image, (1,), (1, 1), margin=1)
    with pytest.raises(ValueError, match="margin"):
        equivariance_error(IdentityStep(), image, image, (1, 1), (1, 1), margin=4)
    with pytest.raises(ValueError, match="mask"):
        equivariance_error(IdentityStep(), image, image, (1, 1), (1, 1), 1, mask=image[0, 0, 1:])


# --- similarity report and TRE ------------------------------------------------------------------


def test_similarity_report():
    fixed, moving = smooth_image((20, 20), 14), smooth_image((20, 20), 15)
    report = similarity_report(fixed, moving, fixed.clone())
    assert report["lncc_after"] == pytest.approx(1, abs=1e-4)
    assert report["mse_after"] == 0
    assert report["lncc_before"] < 0.5
    assert report["mse_before"] > 0.5
    from_arrays = similarity_report(fixed[0, 0].numpy(), moving[0, 0].numpy(), fixed[0, 0].numpy())
    assert from_arrays == pytest.approx(report)


def test_tre_of_translation_maps_fixed_points_to_moving_points():
    offset = np.array([1.5, -2.0, 0.5])
    transform = sitk.TranslationTransform(3, offset.tolist())
    fixed = np.random.default_rng(16).uniform(-50, 50, size=(10, 3))
    distances, _ = target_registration_error(fixed, fixed + offset, transform)
    np.testing.assert_allclose(distances, 0, atol=1e-12)
    distances, _ = target_registration_error(fixed, fixed - offset, transform)
    np.testing.assert_allclose(distances, 2 * np.linalg.norm(offset))


def test_tre_summary():
    offset = np.array([1.0, 2.0, 3.0])
    fixed = np.zeros((10, 3))
    moving = fixed + offset
    moving[:, 0] += np.arange(10)
    distances, summary = target_registration_error(
        fixed, moving, sitk.TranslationTransform(3, offset.tolist())
    )
    np.testing.assert_allclose(distances, np.arange(10))
    assert summary == pytest.approx({"mean": 4.5, "median": 4.5, "p90": 8.1, "max": 9.0})


def test_tre_rejects_mismatched_landmarks():
    with pytest.raises(ValueError, match="landmarks"):
        target_registration_error(np.zeros((3, 3)), np.zeros((4, 3)), sitk.TranslationTransform(3))
