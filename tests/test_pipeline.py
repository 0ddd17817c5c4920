"""The registration pipeline on real images: one physical frame (orientation, obliquity, field
of view do not matter), the guarded start, images the model does not fit, background padding.

Thresholds: "within 1.5× the error of the plain-geometry control pair" (docs/architecture.md);
errors are landmark TRE in mm over the landmarks whose moving position lies inside the moving
image. Measured with ``quality="fast"`` on the lung case (2 CPU cores, the defaults otherwise):
control 0.34 mm; LPS 0.34, PIR 0.34, oblique 0.45, slab of 18 of 34 slices 0.35 (2026-12-01, the
3-D prior of refine.PRIORS with the edge margin of refine.EDGE_MARGIN, the fast preset at 64³).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import gaussian_blobs

import equireg.api
import equireg.refine
from equireg.cases import Case
from equireg.evaluate import target_registration_error
from equireg.io import read_landmarks
from equireg.refine import QUALITY, pyramid
from equireg.space import Grid

TESTING = Path(__file__).resolve().parents[1] / "Testing"
LUNG = Case(TESTING / "lung" / "chest", "plain")
RETINA = Case(TESTING / "retina" / "photo", "plain")


def _landmark_error(case: Case, transform: sitk.Transform, moving: sitk.Image) -> float:
    """Mean TRE (mm) over the landmarks whose moving position lies inside ``moving``."""
    dim = moving.GetDimension()
    fixed_points = read_landmarks(case.folder / "fixed_landmarks.csv", dim)
    moving_points = read_landmarks(case.folder / "moving_landmarks.csv", dim)
    inside = Grid.of(moving).contains(moving_points)
    errors, _ = target_registration_error(fixed_points[inside], moving_points[inside], transform)
    return float(np.mean(errors))


def _oblique_thick(image: sitk.Image, degrees: float, slice_mm: float) -> sitk.Image:
    """``image`` resampled onto a grid tilted by ``degrees`` about x with ``slice_mm`` slices."""
    angle = np.radians(degrees)
    tilt = np.array(
        [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    )
    direction = np.asarray(image.GetDirection()).reshape(3, 3) @ tilt
    spacing = np.array([*image.GetSpacing()[:2], slice_mm])
    size = np.round(np.asarray(image.GetSize()) * image.GetSpacing() / spacing).astype(int)
    centre = np.array(
        image.TransformContinuousIndexToPhysicalPoint((np.array(image.GetSize()) - 1) / 2)
    )
    reference = sitk.Image(size.tolist(), sitk.sitkFloat32)
    reference.SetSpacing(spacing.tolist())
    reference.SetDirection(direction.flatten().tolist())
    reference.SetOrigin((centre - direction @ (spacing * (size - 1) / 2)).tolist())
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1024.0)


@pytest.fixture(scope="module")
def lung_control() -> float:
    moving = sitk.ReadImage(str(LUNG.moving), sitk.sitkFloat32)
    result = equireg.api.register(str(LUNG.fixed), moving, quality="fast", device="cpu")
    levels = result.report["refinement"]["levels"]
    # the finest 3-D level measures on its own grid with its field on the previous level's
    assert levels[-1]["field_shape"] == levels[-2]["shape"] != levels[-1]["shape"]
    assert [level["field_shape"] for level in levels[:-1]] == [
        level["shape"] for level in levels[:-1]
    ]
    return _landmark_error(LUNG, result.transform, moving)


# The moving CT re-stored, and the most its landmark error may grow over the control's.
RESTORED = {
    "LPS axis order (DICOMOrient)": (lambda image: sitk.DICOMOrient(image, "LPS"), 1.5),
    "sagittal axis order (PIR)": (lambda image: sitk.DICOMOrient(image, "PIR"), 1.5),
    "oblique 12°, 6 mm slices": (lambda image: _oblique_thick(image, 12.0, 6.0), 1.5),
    "slab of 18 of 34 slices": (lambda image: image[:, :, 8:26], 1.5),
}


@pytest.mark.parametrize("name", list(RESTORED))
def test_orientation_and_field_of_view_do_not_matter(name: str, lung_control: float) -> None:
    restore, bound = RESTORED[name]
    moving = restore(sitk.ReadImage(str(LUNG.moving), sitk.sitkFloat32))
    result = equireg.api.register(str(LUNG.fixed), moving, quality="fast", device="cpu")
    error = _landmark_error(LUNG, result.transform, moving)
    assert error <= bound * lung_control, (error, lung_control)


def test_the_same_ct_stored_in_another_axis_order_does_not_move() -> None:
    """The issue's replayed report: a CT registered to itself re-stored by ``DICOMOrient``
    moved points by ~300 mm; now the transform is close to the identity."""
    fixed = sitk.ReadImage(str(LUNG.fixed), sitk.sitkFloat32)
    result = equireg.api.register(fixed, sitk.DICOMOrient(fixed, "LPS"), quality="fast")
    points = read_landmarks(LUNG.folder / "fixed_landmarks.csv", 3)
    moved = np.array([result.transform.TransformPoint(p.tolist()) for p in points])
    assert np.linalg.norm(moved - points, axis=1).mean() < 1.0


def test_a_cropped_2d_moving_image_is_registered() -> None:
    """A 180 × 170 crop of the 256² fundus photograph: the landmarks inside the crop end within
    1.5× the control's error or one pixel of it (the control is sub-pixel: 0.004 mm, pixels
    0.05 mm; measured 0.034 mm for the crop)."""
    moving = sitk.ReadImage(str(RETINA.moving), sitk.sitkFloat32)
    control = equireg.api.register(str(RETINA.fixed), moving).transform
    cropped = moving[40:220, 30:200]
    result = equireg.api.register(str(RETINA.fixed), cropped)
    reference = _landmark_error(RETINA, control, cropped)
    error = _landmark_error(RETINA, result.transform, cropped)
    assert error <= max(1.5 * reference, reference + 0.05), (error, reference)


class _WrongShift(torch.nn.Module):
    """A network whose map is a large wrong translation (a third of the field of view)."""

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor):
        offset = torch.full((1, fixed.dim() - 2, *[1] * (fixed.dim() - 2)), 0.3)
        return lambda coords: coords + offset


def test_the_guard_never_returns_worse_than_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(equireg.api, "load_network", lambda card: _WrongShift())
    result = equireg.api.register(
        str(RETINA.fixed), str(RETINA.moving), refine_steps=0, initial="none"
    )
    report = result.report
    assert report["refinement"]["start"]["chosen"] == "identity"
    assert report["similarity_after"]["lncc"] >= report["similarity_before"]["lncc"]


def test_a_refinement_that_makes_things_worse_returns_its_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = equireg.refine.optimise_level

    def sabotaged(level, start, *args, **kwargs):
        field, summary = real(level, start, *args, **kwargs)
        return field + torch.randn_like(field) * 5 * min(level.grid.spacing), summary

    monkeypatch.setattr(equireg.refine, "optimise_level", sabotaged)
    result = equireg.api.register(str(RETINA.fixed), str(RETINA.moving), quality="fast")
    assert any("worse" in warning for warning in result.report["warnings"])
    assert result.report["folding_fraction"] == 0.0


def test_an_mr_like_volume_skips_the_ct_models_network_with_a_warning() -> None:
    """lung3d's −1000…0 HU window would make a 0–400 image constant: the network is skipped
    with a warning, and the refinement still registers the pair. (``auto`` picks generic3d,
    whose preprocessing fits any intensity range.)"""

    def mr_like(path: Path) -> sitk.Image:
        image = sitk.ReadImage(str(path), sitk.sitkFloat32)
        return sitk.Clamp(image + 1024.0, lowerBound=0.0) * 0.2

    moving = mr_like(LUNG.moving)
    result = equireg.api.register(mr_like(LUNG.fixed), moving, model="lung3d", quality="fast")
    assert not result.report["model"]["used"]
    assert any("intensity window" in warning for warning in result.report["warnings"])
    identity = sitk.Transform(3, sitk.sitkIdentity)
    assert _landmark_error(LUNG, result.transform, moving) < 0.5 * _landmark_error(
        LUNG, identity, moving
    )


def test_warped_image_is_padded_with_the_moving_background() -> None:
    """Where the transform reads outside a CT slab, warped.nrrd holds −1024 HU, not 0."""
    moving = sitk.ReadImage(str(LUNG.moving), sitk.sitkFloat32)[:, :, 12:22]
    result = equireg.api.register(str(LUNG.fixed), moving, refine_steps=0)
    values = sitk.GetArrayFromImage(result.warped)
    assert values[0].max() <= -1000 and values[-1].max() <= -1000


def test_the_pyramid_reaches_the_fixed_spacing_within_the_budget() -> None:
    """A 512 × 512 × 133 CT (0.7 × 0.7 × 2.5 mm): the finest level keeps within the budget,
    no axis is finer than the image's, each coarser level doubles the voxel size."""
    ct = Grid((512, 512, 133), (0.7, 0.7, 2.5), (0.0, 0.0, 0.0), tuple(np.eye(3).flatten()))
    for quality in QUALITY.values():
        grids = pyramid(ct, quality.budget[3], quality.levels)
        assert np.prod(grids[-1].size) <= quality.budget[3] * 1.05
        for grid in grids:
            assert all(s >= o - 1e-9 for s, o in zip(grid.spacing, ct.spacing, strict=True))
        coarsest = grids[-1].spacing[0] * 2 ** (len(grids) - 1)
        assert grids[0].spacing[0] == pytest.approx(coarsest, rel=0.05)  # sizes are rounded
    small = Grid((64, 48), (0.5, 0.5), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    assert pyramid(small, 512**2, 3)[-1].size == small.size
    # the smallest accepted image had levels of one and two voxels, scored −∞ (null in the
    # report); a slab of 5 slices keeps its coarse levels, fine in-plane and 1–2 slices thick
    tiny = Grid((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).flatten()))
    assert [grid.size for grid in pyramid(tiny, 96**3, 3)] == [(4, 4, 4)]
    slab = Grid((64, 64, 5), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).flatten()))
    assert [grid.size[2] for grid in pyramid(slab, 96**3, 3)] == [1, 2, 5]


def test_auto_similarity_takes_mind_for_two_modalities_and_lncc_for_one() -> None:
    """The photograph against itself in inverted contrast (a T1/T2-like pair) is registered
    with MIND to within two pixels of the same-contrast pair, which takes LNCC (measured:
    0.045 mm against 0.004 mm; identity 0.48 mm; the network, trained on one contrast, is
    rightly passed over for the identity start)."""
    moving = sitk.ReadImage(str(RETINA.moving), sitk.sitkFloat32)
    inverted = 255.0 - moving
    same = equireg.api.register(str(RETINA.fixed), moving)
    other = equireg.api.register(str(RETINA.fixed), inverted)
    assert same.report["refinement"]["similarity"] == "lncc"
    assert other.report["refinement"]["similarity"] == "mind"
    assert other.report["refinement"]["similarity_choice"]["pearson_r"] < 0
    reference = _landmark_error(RETINA, same.transform, moving)
    assert _landmark_error(RETINA, other.transform, inverted) <= reference + 0.1
    # LNCC forced on the inverted pair is the user's call, with a warning (a newcomer's
    # brain volume ended 80 mm off without one)
    forced = equireg.api.register(str(RETINA.fixed), inverted, similarity="lncc", quality="fast")
    assert any("two modalities" in warning for warning in forced.report["warnings"])
    assert not any("two modalities" in warning for warning in same.report["warnings"])


def test_a_moving_image_a_metre_away_is_found() -> None:
    """The moving CT stored 1 m further along every axis: its network frame moves with it, so
    the network's start maps centre to centre and the refinement ends as on the control; a
    start with no overlap scores −∞ instead of a perfect empty similarity."""
    moving = sitk.ReadImage(str(LUNG.moving), sitk.sitkFloat32)
    far = sitk.Image(moving)
    far.SetOrigin([o + 1000.0 for o in moving.GetOrigin()])
    result = equireg.api.register(str(LUNG.fixed), far, quality="fast", initial="none")
    start = result.report["refinement"]["start"]
    assert start["chosen"] == "network" and start["scores"]["identity"] == float("-inf")
    shifted = sitk.TranslationTransform(3, (1000.0, 1000.0, 1000.0))
    composite = sitk.CompositeTransform([shifted.GetInverse(), result.transform])
    control = equireg.api.register(str(LUNG.fixed), moving, quality="fast", initial="none")
    error = _landmark_error(LUNG, composite, moving)
    assert error <= 1.5 * _landmark_error(LUNG, control.transform, moving), error


def test_a_moving_slab_that_covers_little_of_the_fixed_image_is_a_warning() -> None:
    moving = sitk.ReadImage(str(LUNG.moving), sitk.sitkFloat32)[:, :, 14:19]
    result = equireg.api.register(str(LUNG.fixed), moving, quality="fast")
    assert any("covers only" in warning for warning in result.report["warnings"])


def test_a_thin_volume_moved_in_plane_is_not_said_to_be_poorly_covered() -> None:
    """Five slices moved by 1 mm in-plane cover about 95 % of the fixed volume; the coverage
    warning and ``refinement.overlap`` measure the moving image's extent, not the
    similarity's counted region (which leaves out the end slices: 36 % was reported)."""
    volume = gaussian_blobs((5, 37, 35), seed=3, widths=(0.15, 0.3))
    fixed = sitk.GetImageFromArray((100 * volume).astype(np.float32))
    moving = sitk.Image(fixed)
    moving.SetOrigin((1.0, 0.0, 0.0))
    result = equireg.api.register(fixed, moving, quality="fast")
    assert not any("covers only" in warning for warning in result.report["warnings"])
    assert result.report["refinement"]["overlap"] > 0.9
