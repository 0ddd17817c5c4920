"""Intensity preprocessing named by a model card, and images -> network tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from .space import Grid, resample_to_grid


def normalise_intensity(values: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Map intensities to [0, 1] as the model was trained.

    ``{"kind": "percentile", "low": 1, "high": 99}`` clips to the image's own percentiles
    (photographs, MR: no absolute scale); ``{"kind": "window", "low": -1000, "high": 0}`` clips
    to fixed values (CT in HU).
    """
    kind = spec["kind"]
    if kind == "percentile":
        low, high = np.percentile(values, [spec["low"], spec["high"]])
    elif kind == "window":
        low, high = float(spec["low"]), float(spec["high"])
    else:
        raise ValueError(f"unknown intensity preprocessing {kind!r}")
    if high <= low:  # almost constant after clipping: fall back to the full range
        low, high = float(values.min()), float(values.max())
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


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


def network_mask(mask: sitk.Image, shape: tuple[int, ...]) -> torch.Tensor:
    """``mask`` on the network grid of ``shape`` as ``(1, 1, *shape)`` float in {0, 1}."""
    grid = Grid.of(mask).resized(shape)
    inside = sitk.GetArrayFromImage(resample_to_grid(mask, grid, sitk.sitkNearestNeighbor))
    return torch.from_numpy((inside > 0).astype(np.float32))[None, None]
