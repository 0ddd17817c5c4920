"""The network stage: the model's map at its own grid, in one physical frame for both images.

The network captures large and independent shifts of the two images, which no optimiser finds
from a cold start; its map is a *start* for the refinement (``refine.py``), which scores it
against the identity and the linear alignment before using it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from .device import with_cpu_fallback
from .maps import evaluate, sampled_map
from .models import ModelCard
from .preprocess import background_value, normalise_intensity, window_coverage
from .space import Grid, network_frames, network_map_points, resample_isotropic

PointMap = Callable[[np.ndarray], np.ndarray]  # (..., d) LPS mm -> (..., d) LPS mm

MIN_WINDOW_COVERAGE = 0.02  # below this fraction of voxels inside a model's window: no network


@dataclass
class Capture:
    """The network's map as a physical point map (fixed -> moving LPS mm), and where it ran."""

    map: PointMap
    device: torch.device


def _frame_input(
    image: sitk.Image, frame: Grid, card: ModelCard, mask: sitk.Image | None
) -> torch.Tensor:
    """``image`` on its network frame, padded with its background, normalised as the model was
    trained; voxels outside ``mask`` are zero. ``(1, 1, *shape)`` float32."""
    fill = background_value(sitk.GetArrayViewFromImage(image))
    values = sitk.GetArrayFromImage(resample_isotropic(image, frame, fill))
    values = normalise_intensity(values, card.preprocessing)
    if mask is not None:
        inside = resample_isotropic(mask, frame, 0, sitk.sitkNearestNeighbor)
        values = values * (sitk.GetArrayFromImage(inside) > 0)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]


def unsuitable(card: ModelCard, images: dict[str, sitk.Image]) -> str | None:
    """Why ``card``'s intensity preprocessing cannot see these images (``None`` if it can).

    A model with a fixed window (CT in HU) leaves an MR, a label map or a CT without its rescale
    intercept nearly constant; its map would be noise, so the network step is skipped."""
    for name, image in images.items():
        coverage = window_coverage(sitk.GetArrayViewFromImage(image), card.preprocessing)
        if coverage < MIN_WINDOW_COVERAGE:
            spec = card.preprocessing
            return (
                f"{name}: only {100 * coverage:.1f}% of its voxels lie inside model "
                f"{card.name}'s intensity window ({spec['low']:g} to {spec['high']:g}); the "
                "network step is skipped (the input does not look like what the model was "
                "trained on)"
            )
    return None


def capture(
    network: torch.nn.Module,
    card: ModelCard,
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image | None,
    moving_mask: sitk.Image | None,
    device: torch.device,
    warnings: list[str],
) -> Capture:
    """Run ``network`` on both images in their network frames (``space.network_frames``).

    Returns the map from fixed to moving physical points; CUDA out-of-memory falls back to the
    CPU with a warning (``RegistrationFailure`` if that fails too).
    """
    frames = network_frames(Grid.of(fixed), Grid.of(moving), card.input_shape)
    fixed_net = _frame_input(fixed, frames[0], card, fixed_mask)
    moving_net = _frame_input(moving, frames[1], card, moving_mask)

    def run(on: torch.device) -> torch.Tensor:
        model = network.to(on)
        autocast = nullcontext()
        if on.type == "cuda":  # bf16 convolutions, TF32 matmuls; the map is kept in float32
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        with torch.no_grad(), autocast:
            phi = model(moving_net.to(on), fixed_net.to(on))
            return evaluate(phi, fixed_net.shape[2:], 1, fixed_net.to(on)).float()

    values = with_cpu_fallback(run, device, warnings)
    phi = sampled_map(values)

    def point_map(points: np.ndarray) -> np.ndarray:
        return network_map_points(phi, frames[0], frames[1], points, values)

    return Capture(point_map, values.device)
