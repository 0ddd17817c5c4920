"""What ``equireg evaluate`` computes: the metrics of ``evaluate.py`` for any transform file.

The transform maps fixed physical points to moving ones (README), whichever tool made it, so
the same function scores this project, elastix, ANTs or a hand-made transform. Every file
problem is an ``InputError`` naming the file; metrics whose inputs are not given are left out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

from .errors import InputError
from .evaluate import (
    FOREGROUND,
    dense_field_error,
    dice,
    equivariance_error,
    folding_fraction,
    overlap_mask,
    similarity_report,
    target_registration_error,
    transform_field,
)
from .io import read_image, read_labels, read_landmarks, read_transform
from .preprocess import normalise_intensity
from .space import Grid, points_to_plane, resample_to_grid, restrict_transform
from .validate import slice_plane

PathLike = str | os.PathLike


def network_input(
    image: sitk.Image,
    shape: tuple[int, ...],
    intensity: dict[str, Any],
    mask: sitk.Image | None = None,
) -> tuple[torch.Tensor, Grid]:
    """Resample ``image`` to ``shape`` over its own extent and normalise it: ``(1, 1, *shape)``.

    Voxels outside ``mask`` are set to zero after normalisation. Also returns the network grid.
    """
    grid = Grid.of(image).resized(shape)
    values = sitk.GetArrayFromImage(resample_to_grid(image, grid))
    values = normalise_intensity(values, intensity)
    if mask is not None:
        inside = sitk.GetArrayFromImage(resample_to_grid(mask, grid, sitk.sitkNearestNeighbor))
        values = values * (inside > 0)
    return torch.from_numpy(values)[None, None], grid


def _read_mapping(path: PathLike, fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """The transform file, of the images' dimension; a 3-D transform for two images read from
    one-slice 3-D files (as ``register`` writes it) is taken between their planes."""
    dim = fixed.GetDimension()
    mapping = read_transform(path)
    fixed_plane = slice_plane(fixed)
    if mapping.GetDimension() == 3 and dim == 2 and fixed_plane is not None:
        moving_plane = slice_plane(moving) or fixed_plane
        return restrict_transform(mapping, fixed_plane, moving_plane, Grid.of(fixed))
    if mapping.GetDimension() != dim:
        raise InputError(f"{path}: {mapping.GetDimension()}-D transform for {dim}-D images")
    return mapping


def _read_points(path: PathLike, image: sitk.Image) -> Any:
    """Landmarks of ``image``; 3-D points of an image read from a one-slice 3-D file are taken
    into its plane."""
    plane = slice_plane(image)
    if plane is not None and Path(path).is_file():
        header = Path(path).read_text(errors="replace").split("\n", 1)[0]
        if header.count(",") == 2:
            return points_to_plane(read_landmarks(path, 3), plane)
    return read_landmarks(path, image.GetDimension())


def _pair(first: PathLike | None, second: PathLike | None, what: str) -> bool:
    """Whether an optional fixed/moving pair is given; one without the other is an error."""
    if (first is None) != (second is None):
        raise InputError(f"{what}: give both the fixed and the moving file, or neither")
    return first is not None


def _landmarks(
    fixed: PathLike,
    moving: PathLike,
    transform: sitk.Transform,
    images: tuple[sitk.Image, sitk.Image],
) -> dict[str, Any]:
    dim = images[0].GetDimension()
    fixed_points, moving_points = _read_points(fixed, images[0]), _read_points(moving, images[1])
    if fixed_points.shape != moving_points.shape:
        raise InputError(
            f"{moving}: {len(moving_points)} landmarks, but {fixed} has {len(fixed_points)}"
        )
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    _, before = target_registration_error(fixed_points, moving_points, identity)
    _, after = target_registration_error(fixed_points, moving_points, transform)
    result = {"count": len(fixed_points), "before_mm": before, "after_mm": after}
    # Landmarks the moving image does not contain (a slab, a crop) measure an extrapolation.
    inside = Grid.of(images[1]).contains(moving_points)
    if not inside.all():
        result["outside_moving"] = int((~inside).sum())
        if inside.any():
            result["after_inside_moving_mm"] = target_registration_error(
                fixed_points[inside], moving_points[inside], transform
            )[1]
    return result


def _dice(
    fixed: PathLike,
    moving: PathLike,
    transform: sitk.Transform,
    images: tuple[sitk.Image, sitk.Image],
) -> dict[str, Any]:
    dim = images[0].GetDimension()
    fixed_labels = read_labels(fixed, images[0], "fixed")
    moving_labels = read_labels(moving, images[1], "moving")
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    nearest = sitk.sitkNearestNeighbor
    return {
        "before": dice(fixed_labels, sitk.Resample(moving_labels, fixed_labels, identity, nearest)),
        "after": dice(fixed_labels, sitk.Resample(moving_labels, fixed_labels, transform, nearest)),
    }


def assess_transform(
    fixed: PathLike,
    moving: PathLike,
    transform: PathLike,
    *,
    fixed_landmarks: PathLike | None = None,
    moving_landmarks: PathLike | None = None,
    fixed_labels: PathLike | None = None,
    moving_labels: PathLike | None = None,
    truth: PathLike | None = None,
) -> dict[str, Any]:
    """Metrics of ``transform`` (fixed → moving physical points) on the pair, as a JSON-able dict.

    Always: similarity before/after (``moving`` resampled onto the fixed grid without, then
    with the transform) and the folding fraction of the transform sampled on the fixed grid.
    With landmarks: TRE (mm) before and after (and, when some moving landmarks lie outside the
    moving image, their number and the TRE over the others); with labels: Dice of the moving
    labels warped by nearest neighbour; with ``truth``: the dense-field error (mm) over the
    fixed voxels whose true position lies inside the moving image. Images read from one-slice
    3-D files are scored in their plane (a 3-D transform and 3-D landmarks are taken into it).

    Raises:
        InputError: an input ``read_image``, ``read_transform``, ``read_landmarks`` or
            ``read_labels`` refuses (labels must lie on their image's grid), a transform of
            another dimension, landmark files of different lengths, or only one file of a
            fixed/moving pair.
    """
    with_landmarks = _pair(fixed_landmarks, moving_landmarks, "landmarks")
    with_labels = _pair(fixed_labels, moving_labels, "labels")
    fixed_image, moving_image = read_image(fixed), read_image(moving)
    dim = fixed_image.GetDimension()
    if moving_image.GetDimension() != dim:
        raise InputError(
            f"{moving}: {moving_image.GetDimension()}-D but the fixed image is {dim}-D"
        )
    mapping = _read_mapping(transform, fixed_image, moving_image)
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    before = sitk.Resample(moving_image, fixed_image, identity, sitk.sitkLinear, 0.0)
    after = sitk.Resample(moving_image, fixed_image, mapping, sitk.sitkLinear, 0.0)
    arrays = (sitk.GetArrayFromImage(image) for image in (fixed_image, before, after))
    field = transform_field(mapping, fixed_image)
    metrics: dict[str, Any] = {
        "inputs": {"fixed": str(fixed), "moving": str(moving), "transform": str(transform)},
        "similarity": similarity_report(*arrays),
        "folding_fraction": folding_fraction(
            field, fixed_image.GetSpacing(), fixed_image.GetDirection()
        ),
    }
    if with_landmarks:
        images = (fixed_image, moving_image)
        metrics["landmarks"] = _landmarks(fixed_landmarks, moving_landmarks, mapping, images)
    if with_labels:
        images = (fixed_image, moving_image)
        metrics["dice"] = _dice(fixed_labels, moving_labels, mapping, images)
    if truth is not None:
        true_mapping = _read_mapping(truth, fixed_image, moving_image)
        inside = overlap_mask(true_mapping, fixed_image, moving_image)
        metrics["field_error_mm"] = dense_field_error(mapping, true_mapping, fixed_image, inside)
    return metrics


def model_equivariance(
    fixed: PathLike,
    moving: PathLike,
    model: str,
    shift: int,
    device: str = "auto",
) -> dict[str, Any]:
    """``evaluate.equivariance_error`` of a model on this pair, moving image shifted by ``shift``.

    Both images are brought to the model's input grid as ``register`` does; the moving content
    is moved by ``shift`` voxels along every axis inside its grid (zero-filled, as content moved
    inside a field of view; a multiple of 4 keeps the 1/4-resolution attention step on its grid),
    and the error is the mean distance, in moving voxels of the model grid, between the map of
    the shifted pair and the unshifted map with the shift undone, over fixed voxels at least
    ``|shift| + 8`` from the border whose answer is still in the moving grid: over the fixed
    image's foreground (``FOREGROUND``; in a constant background any map is as good as another,
    docs/equivariance.md) and everywhere.
    """
    from .device import resolve_device
    from .models import load_network, read_card

    torch_device = resolve_device(device)
    fixed_image, moving_image = read_image(fixed), read_image(moving)
    card = read_card(model, fixed_image.GetDimension())
    margin = abs(shift) + 8
    if 2 * margin >= min(card.input_shape):
        raise InputError(
            f"--shift {shift}: too large for the {card.name} input grid {card.input_shape}"
        )
    network = load_network(card).to(torch_device)
    fixed_net, _ = network_input(fixed_image, card.input_shape, card.preprocessing)
    moving_net, _ = network_input(moving_image, card.input_shape, card.preprocessing)
    dim = card.dim
    fixed_net, moving_net = fixed_net.to(torch_device), moving_net.to(torch_device)
    errors = {
        where: equivariance_error(
            network,
            moving_net,
            fixed_net,
            shift_moving=(shift,) * dim,
            shift_fixed=(0,) * dim,
            margin=margin,
            fill="zero",
            mask=mask,
        )
        for where, mask in (("foreground", fixed_net > FOREGROUND), ("everywhere", None))
    }
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "model": card.name,
        "trained": card.trained,
        "device": str(torch_device),
        "shift_voxels": [shift] * dim,
        "margin_voxels": margin,
        "fill": "zero",
        "error_voxels": errors["foreground"],
        "error_everywhere_voxels": errors["everywhere"],
    }
