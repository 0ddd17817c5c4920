"""Reading and writing images and transforms (SimpleITK), with the input checks users rely on.

Every problem with an input becomes an ``InputError`` naming the file and the problem; writes
go through a temporary file in the destination folder so that nothing is left half-written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .space import Grid

Notify = Callable[[str], None]

_RGB_WEIGHTS = (0.299, 0.587, 0.114)


def _read_any(path: Path, what: str) -> sitk.Image:
    """Read a file or a DICOM folder; a missing or unreadable one is an ``InputError``."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    try:
        if not path.is_dir():
            return sitk.ReadImage(str(path))
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise InputError(f"{path}: folder holds no DICOM series")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        return reader.Execute()
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        reason = lines[-1] if lines else "unknown error"
        raise InputError(f"{path}: cannot be read as {what} ({reason})") from None


def _to_grey(image: sitk.Image, path: Path, notify: Notify) -> sitk.Image:
    channels = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() != 2 or channels not in (3, 4):
        raise InputError(
            f"{path}: vector image with {channels} components per voxel; a scalar image is needed"
        )
    notify(f"{path}: colour image converted to grey (luminance)")
    grey = sum(
        w * sitk.Cast(sitk.VectorIndexSelectionCast(image, c), sitk.sitkFloat32)
        for c, w in enumerate(_RGB_WEIGHTS)
    )
    grey.CopyInformation(image)
    return grey


def read_image(path: str | os.PathLike, notify: Notify = lambda _m: None) -> sitk.Image:
    """Read a 2-D or 3-D scalar image as float32; colour 2-D images become grey (with a notice).

    Raises ``InputError`` for a missing/unreadable file, 4-D or vector data, an empty or
    constant image, or NaN/Inf voxels.
    """
    path = Path(path)
    image = _read_any(path, "an image")
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        image = image[:, :, 0]  # a 2-D image stored as a single slice (as Slicer saves one)
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = _to_grey(image, path, notify)
    if image.GetDimension() not in (2, 3):
        raise InputError(f"{path}: {image.GetDimension()}-D image; only 2-D and 3-D are supported")
    if min(image.GetSize()) < 2:
        raise InputError(f"{path}: empty image (size {image.GetSize()})")
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(values).all():
        raise InputError(f"{path}: image contains NaN or infinite voxel values")
    if values.min() == values.max():
        raise InputError(f"{path}: image is constant ({values.min():g} everywhere)")
    return image


def read_mask(path: str | os.PathLike, reference: sitk.Image, role: str) -> sitk.Image:
    """Read a mask that must lie on ``reference``'s grid; non-zero voxels are inside."""
    path = Path(path)
    return checked_mask(_read_any(path, "a mask image"), reference, role, str(path))


def checked_mask(mask: sitk.Image, reference: sitk.Image, role: str, name: str) -> sitk.Image:
    """``mask`` as a 0/1 UInt8 image after checking it is scalar, non-empty and on
    ``reference``'s grid; ``name`` (a path) is what the error messages call it."""
    if mask.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name}: mask must be a scalar image")
    if mask.GetDimension() == 3 and reference.GetDimension() == 2 and mask.GetSize()[2] == 1:
        mask = mask[:, :, 0]
    if not same_grid(Grid.of(mask), Grid.of(reference)):
        raise InputError(
            f"{name}: mask is not on the {role} image's grid (size/spacing/origin/direction)"
        )
    mask = sitk.Cast(mask != 0, sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(mask).any():
        raise InputError(f"{name}: mask is empty")
    return mask


def same_grid(a: Grid, b: Grid, tolerance: float = 1e-4) -> bool:
    """Same size, and spacing/origin/direction equal within ``tolerance`` (relative to spacing)."""
    if a.size != b.size:
        return False
    scale = max(max(a.spacing), 1e-12)
    return (
        np.allclose(a.spacing, b.spacing, rtol=tolerance, atol=0)
        and np.allclose(a.origin, b.origin, atol=tolerance * scale * 10)
        and np.allclose(a.direction, b.direction, atol=tolerance)
    )


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)`` then move the result onto ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=".tmp-", suffix="".join(path.suffixes)
    )
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    atomic_write(path, lambda p: sitk.WriteImage(image, p, compress))


def write_transform(transform: sitk.Transform, path: str | os.PathLike) -> None:
    atomic_write(path, lambda p: sitk.WriteTransform(transform, p))


def read_transform(path: str | os.PathLike) -> sitk.Transform:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such transform file")
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError:
        raise InputError(f"{path}: cannot be read as an ITK transform") from None


def read_landmarks(path: str | os.PathLike, dim: int) -> np.ndarray:
    """Points ``(N, dim)`` in LPS mm from a CSV file with a header row (``x,y`` or ``x,y,z``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such landmark file")
    try:
        points = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
    except ValueError as error:
        raise InputError(f"{path}: not a CSV of numbers with one header row ({error})") from None
    if points.shape[1] != dim or not len(points):
        raise InputError(f"{path}: expected rows of {dim} coordinates, got shape {points.shape}")
    return points
