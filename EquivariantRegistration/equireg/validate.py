"""The input checks of every entry point, in one place (docs/errors.md).

The command line, ``register`` and the Slicer bridge (which runs the command) call these
functions, so an image in memory gets the same checks as the same image read from a file.
Every problem is an ``InputError`` whose one-line message names the file or argument and the
problem; checks run before any work.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from numbers import Integral
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .options import BY_NAME, MAX_REFINE_STEPS
from .space import Grid, SlicePlane

Notify = Callable[[str], None]

MIN_SIZE = 4  # voxels along each axis of an image to register
SLICE_KEY = "equireg.slice"  # metadata of a one-slice 3-D image read as 2-D: its 3-D grid

_RGB_WEIGHTS = (0.299, 0.587, 0.114)
_COMPLEX = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}


def _to_grey(image: sitk.Image, name: str, notify: Notify) -> sitk.Image:
    channels = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() != 2 or channels not in (3, 4):
        raise InputError(
            f"{name}: vector image with {channels} components per voxel; a scalar image is needed"
        )
    notify(f"{name}: colour image converted to grey (luminance)")
    grey = sum(
        w * sitk.Cast(sitk.VectorIndexSelectionCast(image, c), sitk.sitkFloat32)
        for c, w in enumerate(_RGB_WEIGHTS)
    )
    grey.CopyInformation(image)
    return grey


def _require_image(value: Any, name: str) -> None:
    if not isinstance(value, sitk.Image):
        raise InputError(f"{name}: expected a SimpleITK image, got {type(value).__name__}")


def _check_geometry(image: sitk.Image, name: str) -> None:
    grid = Grid.of(image)
    spacing, origin = np.asarray(grid.spacing), np.asarray(grid.origin)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise InputError(f"{name}: voxel spacing {grid.spacing} must be positive and finite")
    if not np.isfinite(origin).all():
        raise InputError(f"{name}: origin {grid.origin} is not finite")
    matrix = grid.direction_matrix
    if not np.isfinite(matrix).all() or abs(np.linalg.det(matrix)) < 1e-6:
        raise InputError(f"{name}: direction matrix is singular or not finite")


def slice_plane(image: sitk.Image) -> SlicePlane | None:
    """The 3-D plane of an image that ``check_image`` took from a one-slice 3-D image."""
    if not image.HasMetaDataKey(SLICE_KEY):
        return None
    data = json.loads(image.GetMetaData(SLICE_KEY))
    return SlicePlane.of(
        Grid(*(tuple(data[k]) for k in ("size", "spacing", "origin", "direction")))
    )


def _flatten_slice(image: sitk.Image, name: str) -> tuple[sitk.Image, SlicePlane | None]:
    if image.GetDimension() != 3:
        return image, None
    plane = SlicePlane.of(Grid.of(image))
    if plane is None:
        if sorted(image.GetSize())[1] == 1:
            raise InputError(f"{name}: image too small (size {image.GetSize()})")
        return image, None
    return plane.to_plane(image), plane


def check_image(image: Any, name: str, notify: Notify = lambda _m: None) -> sitk.Image:
    """A scalar 2-D or 3-D ``float32`` image ready to register, after every input check.

    Colour 2-D images become grey (with a notice through ``notify``). A one-slice 3-D image
    (one voxel along any axis, e.g. a slice saved by Slicer) becomes a 2-D image in its plane;
    its 3-D geometry is kept in the image's metadata (``slice_plane``) so that the outputs can
    be lifted back onto it (``outputs.lift_to_slice``). ``name`` (a path or an argument name)
    starts every message.

    Raises:
        InputError: not a SimpleITK image; complex or vector voxels; not 2-D or 3-D; fewer
            than ``MIN_SIZE`` voxels along an axis; bad spacing, origin or direction; NaN or
            infinite voxels; all zero; constant.
    """
    _require_image(image, name)
    plane_data = image.GetMetaData(SLICE_KEY) if image.HasMetaDataKey(SLICE_KEY) else None
    if image.GetPixelID() in _COMPLEX or "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"{name}: complex voxel values; a real-valued image is needed")
    if image.GetDimension() not in (2, 3):
        raise InputError(f"{name}: {image.GetDimension()}-D image; only 2-D and 3-D are supported")
    _check_geometry(image, name)
    image, plane = _flatten_slice(image, name)
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = _to_grey(image, name, notify)
    if min(image.GetSize()) < MIN_SIZE:
        raise InputError(
            f"{name}: image too small (size {image.GetSize()}; at least {MIN_SIZE} voxels "
            "along each axis)"
        )
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(values).all():
        raise InputError(f"{name}: image contains NaN or infinite voxel values")
    low, high = float(values.min()), float(values.max())
    if low == high:
        what = "all zero" if low == 0 else f"constant ({low:g} everywhere)"
        raise InputError(f"{name}: image is {what}")
    if plane is not None:
        grid = plane.grid
        plane_data = json.dumps(
            {
                "size": grid.size,
                "spacing": grid.spacing,
                "origin": grid.origin,
                "direction": grid.direction,
            }
        )
    if plane_data is not None and image.GetDimension() == 2:
        image.SetMetaData(SLICE_KEY, plane_data)
    return image


def grid_difference(a: Grid, b: Grid, tolerance: float = 1e-4) -> str | None:
    """Every property in which grid ``a`` differs from grid ``b`` with both values (``"spacing
    2×1 against 1×1 mm; origin (0, 3) against (0, 0) mm"``), or ``None`` when they have the
    same size and spacing/origin/direction equal within ``tolerance`` (relative to the
    spacing)."""

    def listed(values: tuple[float, ...] | tuple[int, ...], join: str = "×") -> str:
        return join.join(f"{v:g}" for v in values)

    def rows(grid: Grid) -> str:
        matrix = np.round(np.asarray(grid.direction).reshape(grid.dim, grid.dim), 3) + 0.0
        return "(" + ", ".join(listed(tuple(row), " ") for row in matrix) + ")"

    if a.dim != b.dim:
        return f"{a.dim}-D ({listed(a.size)} voxels) against {b.dim}-D ({listed(b.size)} voxels)"
    differences = []
    if a.size != b.size:
        differences.append(f"size {listed(a.size)} against {listed(b.size)} voxels")
    if not np.allclose(a.spacing, b.spacing, rtol=tolerance, atol=0):
        differences.append(f"spacing {listed(a.spacing)} against {listed(b.spacing)} mm")
    if not np.allclose(a.origin, b.origin, atol=tolerance * max(max(a.spacing), 1e-12) * 10):
        differences.append(
            f"origin ({listed(a.origin, ', ')}) against ({listed(b.origin, ', ')}) mm"
        )
    if not np.allclose(a.direction, b.direction, atol=tolerance):
        differences.append(f"direction {rows(a)} against {rows(b)}")
    return "; ".join(differences) or None


def same_grid(a: Grid, b: Grid, tolerance: float = 1e-4) -> bool:
    """Same size, and spacing/origin/direction equal within ``tolerance`` (relative to spacing)."""
    return grid_difference(a, b, tolerance) is None


def _on_reference_grid(
    image: Any, reference: sitk.Image, name: str, what: str, role: str
) -> sitk.Image:
    """``image`` (scalar, finite) brought to ``reference``'s dimension (a one-slice 3-D image
    for a 2-D reference becomes 2-D as in ``check_image``), on ``reference``'s grid."""
    _require_image(image, name)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetPixelID() in _COMPLEX:
        raise InputError(f"{name}: {what} must be a scalar image")
    if image.GetDimension() == 3 and reference.GetDimension() == 2:
        image, _ = _flatten_slice(image, name)
    difference = grid_difference(Grid.of(image), Grid.of(reference))
    if difference is not None:
        raise InputError(f"{name}: {what} is not on the {role} image's grid ({difference})")
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InputError(f"{name}: {what} contains NaN or infinite values")
    return image


def check_mask(mask: Any, reference: sitk.Image, role: str, name: str) -> sitk.Image:
    """``mask`` as a 0/1 UInt8 image on ``reference``'s grid (non-zero voxels are inside).

    Raises:
        InputError: not a scalar image; NaN or infinite values; not on ``reference``'s grid
            (the message names every property that differs, with both values); no voxel
            inside.
    """
    checked = _on_reference_grid(mask, reference, name, "mask", role)
    mask = sitk.Cast(checked != 0, sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(mask).any():
        raise InputError(f"{name}: mask is empty")
    return mask


def check_labels(labels: Any, reference: sitk.Image, role: str, name: str) -> sitk.Image:
    """``labels`` as an Int32 label map on ``reference``'s grid (label 0 is background).

    Raises:
        InputError: not a scalar image; NaN, infinite or non-integer values; not on
            ``reference``'s grid (the message names what differs).
    """
    checked = _on_reference_grid(labels, reference, name, "label map", role)
    values = sitk.GetArrayViewFromImage(checked)
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        raise InputError(f"{name}: label map has non-integer values")
    return sitk.Cast(checked, sitk.sitkInt32)


def check_landmarks(points: Any, dim: int, name: str) -> np.ndarray:
    """Landmarks as ``(N, dim)`` float64 LPS mm, N ≥ 1, every coordinate finite.

    Raises:
        InputError: wrong shape, no rows, or NaN/infinite coordinates.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != dim or not len(points):
        raise InputError(f"{name}: expected rows of {dim} coordinates, got shape {points.shape}")
    bad = np.flatnonzero(~np.isfinite(points).all(axis=1))
    if len(bad):
        raise InputError(f"{name}: landmark row {bad[0] + 1} has a NaN or infinite coordinate")
    return points


def check_pair(fixed: sitk.Image, moving: sitk.Image, moving_name: str) -> None:
    """The two checked images can be registered together.

    Raises:
        InputError: different dimensions, or two one-slice images in planes that are not
            parallel.
    """
    if fixed.GetDimension() != moving.GetDimension():
        slices = {"fixed": slice_plane(fixed), "moving": slice_plane(moving)}
        single = [name for name, plane in slices.items() if plane is not None]
        if single:  # a one-slice volume is read as 2-D: say so rather than "2-D"
            raise InputError(
                f"{moving_name}: the {single[0]} image is a single slice and the other a "
                "volume; slice-to-volume registration is not supported"
            )
        raise InputError(
            f"{moving_name}: {moving.GetDimension()}-D but the fixed image is "
            f"{fixed.GetDimension()}-D"
        )
    fixed_plane, moving_plane = slice_plane(fixed), slice_plane(moving)
    if fixed_plane is not None and moving_plane is not None:
        cosine = float(abs(fixed_plane.normal @ moving_plane.normal))
        if cosine < 1 - 1e-6:
            angle = math.degrees(math.acos(min(cosine, 1.0)))
            raise InputError(
                f"{moving_name}: one-slice image in a plane {angle:.1f}° from the fixed slice's; "
                "two slices must be parallel"
            )


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    flag = BY_NAME[name].flag if name in BY_NAME else name
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InputError(f"{flag} {value!r}: must be a whole number, not {type(value).__name__}")
    if not low <= value <= high:
        raise InputError(f"{flag} {value}: must be between {low} and {high}")


def check_run_options(**options: Any) -> None:
    """Check ``register``'s run options (names and values of ``options.RUN_OPTIONS``) by type,
    choice and range before any work is done.

    Raises:
        InputError: an unknown option, a value of the wrong type (``refine_steps=2.5`` or
            ``"10"``), a value outside its choices, or ``refine_steps`` outside
            0..``MAX_REFINE_STEPS``.
    """
    for name, value in options.items():
        option = BY_NAME.get(name)
        if option is None:
            raise InputError(f"{name}: unknown option of register")
        if value is None and option.default is None:
            continue
        if name == "refine_steps":
            _check_int(name, value, 0, MAX_REFINE_STEPS)
        elif option.kind is bool:
            if not isinstance(value, bool):
                raise InputError(f"{option.flag} {value!r}: must be True or False")
        elif not isinstance(value, option.kind):
            raise InputError(
                f"{option.flag} {value!r}: must be a {option.kind.__name__}, "
                f"not {type(value).__name__}"
            )
        elif option.choices is not None and value not in option.choices:
            raise InputError(f"{option.flag} {value}: must be one of {', '.join(option.choices)}")


def check_path_argument(value: Any, name: str) -> None:
    """``value`` is a path (``str`` or ``os.PathLike``) or a SimpleITK image.

    Raises:
        InputError: anything else (a NumPy array, a number, ``None`` where a value is needed).
    """
    if not isinstance(value, (str, os.PathLike, sitk.Image)):
        raise InputError(
            f"{name}: expected a file path or a SimpleITK image, got {type(value).__name__}"
        )
