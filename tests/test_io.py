"""Input checks of ``read_image`` and ``read_mask``: one ``InputError`` per problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from equireg.errors import InputError
from equireg.io import read_image, read_mask, write_image


def _write(array: np.ndarray, path: Path, vector: bool = False) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))
    return path


def _junk(path: Path) -> Path:
    path.write_text("not an image")
    return path


def _smooth(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).random(shape).astype(np.float32)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.nrrd", "no such file"),
        (lambda d: _junk(d / "junk.nrrd"), "cannot be read"),
        (lambda d: _write(np.zeros((4, 5, 6, 7), np.float32), d / "four.nii.gz"), "4-D"),
        (lambda d: _write(_smooth((6, 7, 8, 5)), d / "vector.nrrd", vector=True), "vector image"),
        (lambda d: _write(np.full((8, 9), 3.0, np.float32), d / "constant.nrrd"), "constant"),
        (
            lambda d: _write(
                np.where(_smooth((8, 9)) > 0.5, np.nan, 1).astype(np.float32), d / "nan.nrrd"
            ),
            "NaN",
        ),
        (
            lambda d: _write(
                np.where(_smooth((8, 9)) > 0.5, np.inf, 1).astype(np.float32), d / "inf.nrrd"
            ),
            "infinite",
        ),
        (lambda d: _write(np.zeros((1, 9), np.float32), d / "empty.nrrd"), "too small"),
    ],
    ids=["missing", "unreadable", "4d", "vector", "constant", "nan", "inf", "empty"],
)
def test_bad_images_raise_one_clear_error(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(InputError) as caught:
        read_image(path)
    text = str(caught.value)
    assert str(path) in text and message in text and "\n" not in text


@pytest.mark.parametrize(
    "name", ["colour.png", "colour-slice.nrrd"], ids=["png", "single-slice-3d-as-slicer-saves"]
)
def test_colour_image_becomes_grey_with_a_notice(tmp_path: Path, name: str) -> None:
    rgb = (np.random.default_rng(0).random((10, 12, 3)) * 255).astype(np.uint8)
    stored = rgb if name.endswith(".png") else rgb[None]
    path = _write(stored, tmp_path / name, vector=True)
    notices: list[str] = []
    image = read_image(path, notices.append)
    assert image.GetNumberOfComponentsPerPixel() == 1 and image.GetSize() == (12, 10)
    expected = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected, rtol=1e-5, atol=1e-3)
    assert len(notices) == 1 and "grey" in notices[0]


def test_single_slice_3d_image_is_read_as_2d(tmp_path: Path) -> None:
    path = _write(_smooth((1, 8, 9)), tmp_path / "slice.nrrd")
    assert read_image(path).GetDimension() == 2


def test_mask_must_share_the_image_grid(tmp_path: Path) -> None:
    image = read_image(_write(_smooth((8, 9)), tmp_path / "image.nrrd"))
    good = _write((_smooth((8, 9)) > 0.5).astype(np.uint8), tmp_path / "mask.nrrd")
    assert read_mask(good, image, "fixed").GetSize() == image.GetSize()
    other = sitk.GetImageFromArray((_smooth((8, 9)) > 0.5).astype(np.uint8))
    other.SetSpacing((2.0, 1.0))
    sitk.WriteImage(other, str(tmp_path / "shifted.nrrd"))
    with pytest.raises(InputError, match=r"not on the fixed image's grid \(spacing 2×1 against"):
        read_mask(tmp_path / "shifted.nrrd", image, "fixed")
    with pytest.raises(InputError, match="mask is empty"):
        read_mask(_write(np.zeros((8, 9), np.uint8), tmp_path / "empty.nrrd"), image, "fixed")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda m: sitk.Image(m[:, :7]), r"size 9×7 against 9×8 voxels"),
        (lambda m: m.SetOrigin((0.0, 3.0)), r"origin \(0, 3\) against \(0, 0\) mm"),
        (
            lambda m: m.SetDirection((0.0, 1.0, 1.0, 0.0)),
            r"direction \(0 1, 1 0\) against \(1 0, 0 1\)",
        ),
        (
            lambda m: (m.SetOrigin((0.0, 3.0)), m.SetSpacing((2.0, 1.0)))[0],
            r"spacing 2×1 against 1×1 mm; origin \(0, 3\) against \(0, 0\) mm",
        ),
    ],
    ids=["size", "origin", "direction", "spacing and origin"],
)
def test_a_mask_off_the_grid_is_told_what_differs(change, named: str, tmp_path: Path) -> None:
    image = read_image(_write(_smooth((8, 9)), tmp_path / "image.nrrd"))
    mask = sitk.GetImageFromArray(np.ones((8, 9), np.uint8))
    changed = change(mask)
    sitk.WriteImage(changed if changed is not None else mask, str(tmp_path / "mask.nrrd"))
    with pytest.raises(InputError, match=named):
        read_mask(tmp_path / "mask.nrrd", image, "fixed")


def test_write_image_leaves_no_partial_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.nrrd"
    with pytest.raises(InputError, match="cannot be written"):
        write_image(sitk.Image(), target)  # an empty image cannot be written
    assert list(tmp_path.iterdir()) == []
