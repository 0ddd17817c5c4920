"""One-slice 3-D inputs (a slice saved by Slicer, any orientation): registered as 2-D in their
plane, with 3-D one-slice outputs on the fixed slice's geometry that ``equireg warp``,
``equireg evaluate`` and Slicer (3-D transforms only) accept; memory and file alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import gaussian_blobs

import equireg.api
from equireg.cli import main
from equireg.compose import RegistrationStep
from equireg.errors import InputError
from equireg.io import read_image
from equireg.maps import Map
from equireg.preprocess import background_value
from equireg.space import Grid


class _Shift(RegistrationStep):
    """x ↦ x + t in network units (tensor order): a known answer for the network."""

    def __init__(self, shift: tuple[float, float]):
        super().__init__()
        self.shift = shift

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        offset = torch.tensor(self.shift, dtype=fixed.dtype).view(1, -1, 1, 1)
        return lambda coords: coords + offset


@pytest.fixture(autouse=True)
def known_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(equireg.api, "load_network", lambda card: _Shift((0.061, -0.037)))


def _slice(size: tuple[int, int, int], direction=None, origin=(5.0, -7.0, 12.5), seed=0):
    """A one-slice 3-D image of ``size`` (ITK order, one entry 1) with blobs in its plane."""
    values = gaussian_blobs(tuple(s for s in reversed(size) if s != 1), seed)
    image = sitk.GetImageFromArray(values.reshape(tuple(reversed(size))))
    image.SetSpacing((0.8, 1.2, 3.0))
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


LAYOUTS = {
    "axial 48x48x1": ((48, 40, 1), None),
    "1xNxM": ((1, 48, 40), None),
    "sagittal (Slicer)": ((48, 40, 1), (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
    "oblique": (
        (48, 1, 40),
        tuple(np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0].flatten()),
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_slice_gives_3d_one_slice_outputs_on_the_fixed_geometry(
    layout: str, tmp_path: Path
) -> None:
    size, direction = LAYOUTS[layout]
    fixed, moving = _slice(size, direction), _slice(size, direction, seed=1)
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nrrd"))
    sitk.WriteImage(moving, str(tmp_path / "moving.nrrd"))
    assert read_image(tmp_path / "fixed.nrrd").GetDimension() == 2  # the 2-D model runs
    from_file = equireg.api.register(tmp_path / "fixed.nrrd", tmp_path / "moving.nrrd")
    in_memory = equireg.api.register(  # the same images, as a script holds them in memory
        sitk.ReadImage(str(tmp_path / "fixed.nrrd")), sitk.ReadImage(str(tmp_path / "moving.nrrd"))
    )
    assert from_file.report["model"]["name"] == in_memory.report["model"]["name"] == "generic2d"
    for result in (from_file, in_memory):
        assert result.transform.GetDimension() == 3
        assert result.displacement.GetDimension() == 3 and 1 in result.displacement.GetSize()
        warped, expected = Grid.of(result.warped), Grid.of(fixed)
        assert warped.size == expected.size
        for part in ("spacing", "origin", "direction"):
            np.testing.assert_allclose(getattr(warped, part), getattr(expected, part), atol=1e-6)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(from_file.warped), sitk.GetArrayFromImage(in_memory.warped)
    )
    # The 3-D transform keeps points in the slice's plane and reproduces the warped image.
    columns = np.asarray(fixed.GetDirection()).reshape(3, 3).T
    normal = np.cross(*columns[[a for a in range(3) if size[a] != 1]])
    point = np.asarray(fixed.TransformIndexToPhysicalPoint([s // 2 for s in size]))
    moved = np.asarray(from_file.transform.TransformPoint(point.tolist()))
    assert abs((moved - point) @ normal) < 1e-6 and np.linalg.norm(moved - point) > 0.5
    fill = background_value(sitk.GetArrayViewFromImage(moving))  # warped.nrrd's padding
    resampled = sitk.Resample(moving, fixed, from_file.transform, sitk.sitkLinear, fill)
    inner = tuple(slice(2, -2) if n > 1 else slice(None) for n in reversed(size))
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(resampled)[inner],
        sitk.GetArrayFromImage(from_file.warped)[inner],
        atol=1e-3,
    )


def test_one_slice_outputs_go_through_warp_and_evaluate(tmp_path: Path) -> None:
    size, direction = LAYOUTS["sagittal (Slicer)"]
    fixed, moving = tmp_path / "fixed.nrrd", tmp_path / "moving.nrrd"
    sitk.WriteImage(_slice(size, direction), str(fixed))
    sitk.WriteImage(_slice(size, direction, seed=1), str(moving))
    out = tmp_path / "out"
    args = ["register", str(fixed), str(moving), "-o", str(out), "--inverse", "--progress", "none"]
    assert main(args) == 0
    assert sitk.ReadTransform(str(out / "transform.h5")).GetDimension() == 3
    assert sitk.ReadTransform(str(out / "inverse_transform.h5")).GetDimension() == 3
    warped = tmp_path / "warped_again.nrrd"
    warp = ["warp", str(moving), "--transform", str(out / "transform.h5"), "--reference"]
    assert main([*warp, str(fixed), "-o", str(warped)]) == 0
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(sitk.ReadImage(str(warped))),
        sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nrrd"))),
        atol=1e-3,
    )
    image = sitk.ReadImage(str(fixed))
    points = [image.TransformIndexToPhysicalPoint((i, j, 0)) for i, j in ((10, 12), (30, 25))]
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    (tmp_path / "f.csv").write_text("x,y,z\n" + "".join(f"{p[0]},{p[1]},{p[2]}\n" for p in points))
    moved = [transform.TransformPoint(p) for p in points]
    (tmp_path / "m.csv").write_text("x,y,z\n" + "".join(f"{p[0]},{p[1]},{p[2]}\n" for p in moved))
    report = tmp_path / "metrics.json"
    evaluate = ["evaluate", str(fixed), str(moving), "--transform", str(out / "transform.h5")]
    landmarks = [
        "--fixed-landmarks",
        str(tmp_path / "f.csv"),
        "--moving-landmarks",
        str(tmp_path / "m.csv"),
    ]
    assert main([*evaluate, *landmarks, "-o", str(report)]) == 0
    metrics = json.loads(report.read_text())
    assert (
        metrics["landmarks"]["after_mm"]["mean"] < 1e-3 < metrics["landmarks"]["before_mm"]["mean"]
    )


def test_initial_alignment_and_inverse_lift_to_3d(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(equireg.api, "load_network", lambda card: _Shift((0.0, 0.0)))
    size, direction = LAYOUTS["1xNxM"]
    fixed = _slice(size, direction)
    moving = sitk.Resample(
        fixed, fixed, sitk.TranslationTransform(3, (0.0, 2.0, -1.5)), sitk.sitkLinear, 0.0
    )
    result = equireg.api.register(
        fixed, moving, initial="translation", inverse=True, refine_steps=0
    )
    assert result.transform.GetDimension() == result.inverse_transform.GetDimension() == 3
    point = fixed.TransformIndexToPhysicalPoint((0, 24, 20))
    there = result.transform.TransformPoint(point)
    back = result.inverse_transform.TransformPoint(there)
    np.testing.assert_allclose(back, point, atol=0.05)
    assert there[0] == pytest.approx(point[0])  # no motion off the sagittal-like plane x = 5


def test_slices_in_different_planes_are_refused(tmp_path: Path, capfd) -> None:
    axial = _slice((48, 40, 1))
    coronal = _slice((48, 1, 40))
    with pytest.raises(InputError, match="90.0° from the fixed slice's"):
        equireg.api.register(axial, coronal)
    sitk.WriteImage(axial, str(tmp_path / "a.nrrd"))
    sitk.WriteImage(coronal, str(tmp_path / "c.nrrd"))
    code = main(
        ["register", str(tmp_path / "a.nrrd"), str(tmp_path / "c.nrrd"), "-o", str(tmp_path / "o")]
    )
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "two slices must be parallel" in err[0]


def test_parallel_slices_at_another_depth_map_across(tmp_path: Path) -> None:
    """Two axial slices 6 mm apart: the transform carries the fixed slice onto the moving one."""
    fixed = _slice((48, 40, 1))
    moving = _slice((48, 40, 1), origin=(5.0, -7.0, 18.5), seed=1)
    result = equireg.api.register(fixed, moving)
    point = fixed.TransformIndexToPhysicalPoint((20, 20, 0))
    assert result.transform.TransformPoint(point)[2] == pytest.approx(18.5)
